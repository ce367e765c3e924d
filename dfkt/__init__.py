"""dfkt: data-free knowledge transfer.

Two branches on one core of "data reconstruction + knowledge transfer":

* ``dfkt.distill(teacher, student, method=...)`` — data-free knowledge distillation (DFKD);
* ``dfkt.adapt(model, target, method=...)`` — source-free domain adaptation (SFDA);
* ``dfkt.tta(model, stream, method=...)`` — online test-time adaptation (predict, then adapt, on a stream);
* ``dfkt.compress(source_model, student, target, method=...)`` — both: a small student for a new domain.
"""
from __future__ import annotations

import importlib
import logging

from . import registry
from .api import Result, adapt, load, train_supervised
from .core.context import TrainConfig
from .deploy import export
from .errors import CheckpointError, ConfigError, DataError, DfktError, ModelError, NonFiniteError
from .registry import list_methods, method_table, register

# The method packages register their methods when imported; the registry imports them at its first lookup
# (so `import dfkt.registry` imports no method module). `dfkt.distill` is the DFKD package itself, callable
# as the API function (see dfkt/distill/__init__.py): the name is bound once, by the import system.
registry.provide("dfkt.distill", "dfkt.sfda", "dfkt.online", "dfkt.compression")
_LAZY = {"tta": "dfkt.online.api", "TTAResult": "dfkt.online.api", "Stream": "dfkt.online.stream",
         "compress": "dfkt.compression.api", "CompressResult": "dfkt.compression.api"}


def __getattr__(name: str):
    """``dfkt.distill`` (the package, callable), the online TTA and the compress names, imported on first use."""
    if name == "distill":
        return importlib.import_module("dfkt.distill")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dfkt' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["adapt", "distill", "tta", "compress", "CompressResult", "load", "export", "list_methods", "method_table", "register", "train_supervised", "Result", "TrainConfig",
           "Stream", "TTAResult",
           "DfktError", "ConfigError", "DataError", "ModelError", "CheckpointError", "NonFiniteError"]



class _FallbackHandler(logging.Handler):
    """Shows dfkt's warnings (skipped NaN steps, CPU fallback, converted models...) on stderr when the
    application has configured no logging; silent as soon as the root logger or the ``dfkt`` logger
    has a handler of its own (``logging.basicConfig``, the CLI's, pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("dfkt %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers or any(h is not self for h in logging.getLogger("dfkt").handlers):
            return
        try:
            import sys

            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


logging.getLogger("dfkt").addHandler(_FallbackHandler())
