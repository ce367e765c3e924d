"""The one method registry shared by all tasks (``@register("shot", task="sfda")``).

A name is unique within its task: ``tent`` is both an SFDA method (offline) and an online TTA method.
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from .errors import ConfigError, suggest

T = TypeVar("T")
TASKS = ("sfda", "dfkd", "tta")
_API = {"sfda": "adapt", "dfkd": "distill", "tta": "tta"}
_METHODS: dict[tuple[str, str], type] = {}     # (task, name) -> class
_LOADED = False


def register(name: str, task: str) -> Callable[[T], T]:
    """Class decorator: make a method available by ``name`` for ``task`` ('sfda', 'dfkd' or 'tta')."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def deco(cls: T) -> T:
        if (task, name) in _METHODS and _METHODS[(task, name)] is not cls:
            raise ValueError(f"{task} method {name!r} is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        cls.task = task  # type: ignore[attr-defined]
        _METHODS[(task, name)] = cls  # type: ignore[assignment]
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        importlib.import_module("dfkt.sfda")
        importlib.import_module("dfkt.distill")
        importlib.import_module("dfkt.online")
        _LOADED = True
        # Importing the subpackage dfkt.distill sets the attribute ``dfkt.distill`` to that module,
        # hiding the function dfkt.distill(); bind the API function again.
        import dfkt
        from . import api

        dfkt.distill = api.distill


def get_method(name: str, task: str | None = None) -> type:
    """The method class registered as ``name`` (for ``task``); unknown names raise ConfigError with close
    matches, a name registered for several tasks needs ``task``."""
    _load_all()
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


def list_methods(task: str | None = None) -> list[str]:
    """Registered method names, optionally for one task."""
    _load_all()
    return sorted({n for (t, n) in _METHODS if task in (None, t)})


def method_table() -> list[dict]:
    """One row per (method, task): name, task and the first line of its docstring (for README/CLI)."""
    _load_all()
    rows = []
    for (t, n), cls in sorted(_METHODS.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append({"method": n, "task": t, "summary": doc[0] if doc else ""})
    return rows
