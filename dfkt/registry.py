"""The one method registry shared by all tasks (``@register("shot", task="sfda", family="self-training")``).

A name is unique within its task: ``tent`` is both an SFDA method (offline) and an online TTA method.
This module is a leaf: it imports no method package and not the API, and importing it imports no method
module (``python -c "import dfkt.registry"``). The method packages register by being imported: ``dfkt/__init__.py``
names them with :func:`provide`, and the first lookup (:func:`get_method`, :func:`list_methods`,
:func:`method_table`, :func:`methods`) imports the named packages, whose modules then call :func:`register`.
So every lookup sees every built-in method, and nothing is imported that no lookup needs.

Every method belongs to one **family**, the survey taxonomy of what the method reconstructs and how;
``dfkt list``, :func:`method_table` and the README's methods table group by it. The rule per family:

SFDA (``dfkt.adapt``)
  * ``self-training``: model-based. The source model is adapted with the target images alone: pseudo-labels,
    entropy / information maximisation, neighbour consistency, or re-estimating its normalisation statistics
    on the target. Tent and AdaBN (offline, over the whole target set) are here: they reconstruct no
    source data and change the model from target data only (the entropy-minimisation and the
    statistics-only cases of the model-based branch).
  * ``reconstruction``: data-based. Source-like data is reconstructed from the source model (its BatchNorm
    statistics, or a generator conditioned on its classifier) and the target is aligned to it.
Online test-time adaptation (``dfkt.tta``)
  * ``online``: predict each test batch first, then adapt, in one pass over a stream.
DFKD (``dfkt.distill``), by what reconstructs the transfer data:
  * ``generator``: a generator network that lives through the run (trained from scratch or meta-learned,
    reused for every batch) produces the images.
  * ``inversion``: every batch is optimised anew against the teacher (its pixels, or latent codes and a
    freshly initialised generator used as an image prior), usually kept in a data pool.
  * ``metadata``: inputs are reconstructed from statistics recorded on the real training data besides the
    model (e.g. per-class activation statistics).
Source-free compression (``compress``, adapt + distil to a smaller student)
  * ``compress``: recipes that turn a source model and unlabeled target data into a small student.
Any task
  * ``baseline``: no adaptation or transfer at all; the reference row (``source-only``, online ``source``).

An unknown or missing family is an error at registration.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable, TypeVar

from .errors import ConfigError, suggest

T = TypeVar("T")
TASKS = ("sfda", "dfkd", "tta", "compress")
_API = {"sfda": "adapt", "dfkd": "distill", "tta": "tta", "compress": "compress"}

# task -> its families, in display order (``baseline`` is valid for every task and listed last).
FAMILIES: dict[str, tuple[str, ...]] = {
    "sfda": ("self-training", "reconstruction"),
    "dfkd": ("generator", "inversion", "metadata"),
    "tta": ("online",),
    "compress": ("compress",),
}
BASELINE = "baseline"
FAMILY_DESCRIPTIONS: dict[str, str] = {
    "self-training": "adapt the source model with the target images alone (pseudo-labels, entropy, "
                     "neighbours, normalisation statistics)",
    "reconstruction": "reconstruct source-like data from the source model and align the target to it",
    "online": "predict each test batch, then adapt, in one pass over a stream",
    "generator": "a generator network produces the transfer data",
    "inversion": "each batch is optimised against the teacher (pixels or a fresh generator as image prior)",
    "metadata": "inputs reconstructed from statistics recorded on the training data",
    "compress": "source model + unlabeled target data -> small adapted student",
    BASELINE: "no adaptation: the reference row",
}
_METHODS: dict[tuple[str, str], type] = {}     # (task, name) -> class (or configured method object)
_PROVIDERS: list[str] = []                     # packages whose import registers methods (see provide)
_LOADED: set[str] = set()


def provide(*packages: str) -> None:
    """Name packages (dotted module names) that register methods when imported; they are imported at the
    first lookup, not here (``dfkt/__init__.py`` names dfkt's own method packages)."""
    for p in packages:
        if p not in _PROVIDERS:
            _PROVIDERS.append(p)


def _load() -> None:
    """Import the provided packages not imported yet (each once; re-entrant lookups during an import see
    what is registered so far)."""
    for p in list(_PROVIDERS):
        if p not in _LOADED:
            _LOADED.add(p)
            try:
                importlib.import_module(p)
            except BaseException:
                _LOADED.discard(p)
                raise


def methods() -> dict[tuple[str, str], type]:
    """Every registered method: ``(task, name) -> method class`` (the provided packages loaded first)."""
    _load()
    return _METHODS


def families(task: str | None = None) -> list[str]:
    """The valid families of ``task`` (all families when ``task`` is None), in display order."""
    tasks = TASKS if task is None else (task,)
    out = [f for t in tasks for f in FAMILIES[t]]
    return out + [BASELINE]


def register(name: str, task: str, family: str | None = None) -> Callable[[T], T]:
    """Class decorator: make a method available by ``name`` for ``task`` ('sfda', 'dfkd', 'tta' or
    'compress'), in ``family`` (one of :data:`FAMILIES` for the task, or 'baseline'; see the module doc)."""
    if task not in TASKS:
        raise ConfigError(f"register({name!r}): task must be one of {', '.join(TASKS)}, got {task!r}.")
    valid = families(task)
    if family not in valid:
        got = "no family" if family is None else f"family {family!r}"
        hint = suggest(family, valid) if isinstance(family, str) else ""
        raise ConfigError(f"register({name!r}, task={task!r}) got {got}: pass family= one of "
                          f"{', '.join(valid)} (see dfkt.registry's docstring for the rule).{hint}")

    def deco(cls: T) -> T:
        if (task, name) in _METHODS and _METHODS[(task, name)] is not cls:
            raise ValueError(f"{task} method {name!r} is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        cls.task = task  # type: ignore[attr-defined]
        cls.family = family  # type: ignore[attr-defined]
        _METHODS[(task, name)] = cls  # type: ignore[assignment]
        return cls

    return deco


def get_method(name: str, task: str | None = None) -> type:
    """The method class registered as ``name`` (for ``task``); unknown names raise ConfigError with close
    matches, a name registered for several tasks needs ``task``."""
    _load()
    found = [c for (t, n), c in _METHODS.items() if n == name and task in (None, t)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"method {name!r} exists for tasks {', '.join(sorted(c.task for c in found))}; "
                          f"say which (e.g. dfkt.{_API[found[0].task]}(...)).")
    names = list_methods(task)
    where = f" for task {task!r}" if task else ""
    other = next((c for (t, n), c in _METHODS.items() if n == name), None)
    hint = (f" {name!r} is a {other.task} method: use dfkt.{_API[other.task]}()." if other is not None
            else suggest(name, names))
    raise ConfigError(f"unknown method {name!r}{where}.{hint} Available: {', '.join(names)}.")


def list_methods(task: str | None = None, family: str | None = None) -> list[str]:
    """Registered method names, optionally for one task and/or one family."""
    _load()
    return sorted({n for (t, n), c in _METHODS.items() if task in (None, t) and family in (None, c.family)})


_TITLED = re.compile(r"^(?P<title>[^():]+?) \((?P<paper>[^()]*)\): (?P<description>.+)$")


def method_table(task: str | None = None) -> list[dict]:
    """One row per registered (task, method), grouped: by task (sfda, dfkd, tta, compress), then by family
    in :data:`FAMILIES` order ('baseline' last), then by name. Each row: ``task``, ``family``, ``name``,
    ``description`` (the docstring's first line without its title), ``paper`` (from the docstring's
    "Title (Authors, Venue Year): ..." form; empty for dfkt's own baselines), ``summary`` (the whole first
    line) and ``file`` (the module's path in the package)."""
    _load()
    order = {(t, f): i for i, (t, f) in enumerate((t, f) for t in TASKS for f in families(t))}
    rows = []
    for (t, n), cls in _METHODS.items():
        if task not in (None, t):
            continue
        doc = (cls.__doc__ or "").strip().splitlines()
        summary = doc[0].strip() if doc else ""
        m = _TITLED.match(summary)
        paper, description = (m["paper"], m["description"]) if m else ("", summary.partition(": ")[2] or summary)
        file = cls.__module__.replace(".", "/") + ".py"
        rows.append({"task": t, "family": cls.family, "name": n, "description": description, "paper": paper,
                     "summary": summary, "file": file})
    rows.sort(key=lambda r: (order[(r["task"], r["family"])], r["name"]))
    return rows
