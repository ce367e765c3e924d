"""The one method registry shared by both branches (``@register("shot", task="sfda")``)."""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from .errors import ConfigError, suggest

T = TypeVar("T")
TASKS = ("sfda", "dfkd")
_METHODS: dict[str, type] = {}
_LOADED = False


def register(name: str, task: str) -> Callable[[T], T]:
    """Class decorator: make a method available by ``name`` for ``task`` ('sfda' or 'dfkd')."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def deco(cls: T) -> T:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        cls.task = task  # type: ignore[attr-defined]
        _METHODS[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        importlib.import_module("dfkt.sfda")
        importlib.import_module("dfkt.distill")
        _LOADED = True
        # Importing the subpackage dfkt.distill sets the attribute ``dfkt.distill`` to that module,
        # hiding the function dfkt.distill(); bind the API function again.
        import dfkt
        from . import api

        dfkt.distill = api.distill


def get_method(name: str, task: str | None = None) -> type:
    """The method class registered as ``name``; unknown names raise ConfigError with close matches."""
    _load_all()
    names = [n for n, c in _METHODS.items() if task is None or c.task == task]
    if name not in names:
        where = f" for task {task!r}" if task else ""
        other = _METHODS.get(name)
        hint = (f" {name!r} is a {other.task} method: use dfkt.{'adapt' if other.task == 'sfda' else 'distill'}()."
                if other is not None else suggest(name, names))
        raise ConfigError(f"unknown method {name!r}{where}.{hint} Available: {', '.join(sorted(names))}.")
    return _METHODS[name]


def list_methods(task: str | None = None) -> list[str]:
    """Registered method names, optionally for one task."""
    _load_all()
    return sorted(n for n, c in _METHODS.items() if task is None or c.task == task)


def method_table() -> list[dict]:
    """One row per method: name, task and the first line of its docstring (for README/CLI)."""
    _load_all()
    rows = []
    for n in list_methods():
        cls = _METHODS[n]
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append({"method": n, "task": cls.task, "summary": doc[0] if doc else ""})
    return rows
