"""dfkt: data-free knowledge transfer.

Two branches on one core of "data reconstruction + knowledge transfer":

* ``dfkt.distill(teacher, student, method=...)`` — data-free knowledge distillation (DFKD);
* ``dfkt.adapt(model, target, method=...)`` — source-free domain adaptation (SFDA);
* ``dfkt.tta(model, stream, method=...)`` — online test-time adaptation (predict, then adapt, on a stream).
"""
from __future__ import annotations

import logging

# Load the method packages first: `dfkt.distill` must end up naming the function, not the subpackage.
from . import distill as _distill_methods  # noqa: F401  (registers the DFKD methods)
from . import online as _online_methods  # noqa: F401  (registers the online TTA methods)
from . import sfda as _sfda_methods  # noqa: F401  (registers the SFDA methods)
from .api import Result, adapt, distill, load, train_supervised
from .core.context import TrainConfig
from .deploy import export
from .errors import CheckpointError, ConfigError, DataError, DfktError, ModelError, NonFiniteError
from .online.api import TTAResult, tta
from .online.stream import Stream
from .registry import list_methods, method_table, register

__version__ = "0.1.0"
__all__ = ["adapt", "distill", "tta", "load", "export", "list_methods", "method_table", "register", "train_supervised", "Result", "TrainConfig",
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
