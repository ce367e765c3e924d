"""Error types. Every message says what was wrong and how to fix it."""
from __future__ import annotations

import difflib
from typing import Iterable


class DfktError(Exception):
    """Base class of all dfkt errors."""


class ConfigError(DfktError, ValueError):
    """A configuration value or key is invalid."""


class DataError(DfktError, ValueError):
    """A data set is missing, empty or malformed."""


class ModelError(DfktError, ValueError):
    """A model does not fit what the method or config needs."""


class CheckpointError(DfktError, RuntimeError):
    """A checkpoint file is missing, truncated, foreign or incompatible."""


class CollapseError(DfktError, RuntimeError):
    """An adaptation run collapsed (label-free evidence) and ``on_collapse: stop`` was asked for."""


class NonFiniteError(DfktError, RuntimeError):
    """Training produced NaN/inf for too many consecutive steps."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean ...?' for a misspelled name, or an empty string."""
    choices = list(choices)
    lower = {str(c).lower(): c for c in choices}
    if str(name).lower() in lower and lower[str(name).lower()] != name:     # 'SHOT' -> 'shot'
        return f" Did you mean {lower[str(name).lower()]!r}?"
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
