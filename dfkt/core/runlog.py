"""Experiment logs of one run (``train.log_dir``): per-step loss terms and per-epoch records.

Written to ``<log_dir>/steps.csv`` (step, epoch, one column per loss term) and
``<log_dir>/epochs.csv`` (the loop's epoch records: loss means, metrics, time), and, when the optional
``tensorboard`` package is installed (``pip install 'dfkt[tensorboard]'``), as TensorBoard event files
in the same folder (tags ``step/<term>`` and ``epoch/<key>``, against the global step).

The loop hands over each step's loss terms as 0-d device tensors; they are buffered and read in one
host transfer per flush (every ``FLUSH_EVERY`` steps and at each epoch end), so logging adds no
per-step sync. Under torchrun every rank buffers, the buffered values are averaged over ranks (one
collective per flush) and rank 0 alone writes. A run resumed after epoch E (global step S) first drops
the rows of later epochs/steps (logged before the kill but not checkpointed), so it appends without
duplicates; a fresh run starts the files anew. TensorBoard gets the same rule through ``purge_step``.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError
from . import distributed as dist

log = logging.getLogger("dfkt")

FLUSH_EVERY = 500        # buffered steps before a flush (bounds memory; curves update during long epochs)
STEPS_CSV, EPOCHS_CSV = "steps.csv", "epochs.csv"


class _CsvLog:
    """A CSV file of rows numbered by a ``key`` column (step or epoch) whose columns may grow (the file is
    rewritten then). Opening it keeps only the rows with ``key <= keep_through``."""

    def __init__(self, path: Path, key: str, keep_through: int):
        self.path, self.key = path, key
        self.fields: list[str] = []
        rows = self._read() if path.exists() else []
        kept = [r for r in rows if int(float(r[key])) <= keep_through]
        self._rewrite(self.fields if kept else [], kept)

    def _read(self) -> list[dict]:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            self.fields = list(reader.fieldnames or [])
            if self.key not in self.fields:
                raise ConfigError(f"{str(self.path)!r} is not a dfkt log (it has no {self.key!r} column); point "
                                  f"train.log_dir (--log-dir) at another folder or delete the file.")
            try:
                rows = list(reader)
                for r in rows:
                    int(float(r[self.key]))
            except (ValueError, TypeError, csv.Error) as e:
                raise ConfigError(f"{str(self.path)!r} cannot be read as a dfkt log ({e}); point train.log_dir "
                                  f"(--log-dir) at another folder or delete the file.") from None
        return rows

    def _rewrite(self, fields: list[str], rows: list[dict]) -> None:
        self.fields = fields
        if not fields:
            self.path.unlink(missing_ok=True)
            return
        with self.path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        new = [k for r in rows for k in r if k not in self.fields]
        if new:   # a column appears (a metric evaluated every few epochs, a term of a later phase)
            old = self._read() if self.path.exists() else []
            self._rewrite(self.fields + list(dict.fromkeys(new)), old)
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerows(rows)


def _tensorboard(log_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: experiment logs in %s are CSV only "
                 "(pip install 'dfkt[tensorboard]' for TensorBoard event files)", log_dir)
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


class RunLog:
    """The experiment log of one run; every rank makes one, rank 0 alone writes (see the module doc)."""

    def __init__(self, log_dir: str | Path, start_epoch: int, start_step: int, device: torch.device):
        self.dir = Path(log_dir)
        self.device = device
        self.writes = dist.is_main()
        self._steps: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        self.tb = None
        if not self.writes:
            return
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"train.log_dir {str(self.dir)!r} is an existing file; give a folder for the "
                              f"experiment logs.")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.steps_csv = _CsvLog(self.dir / STEPS_CSV, "step", start_step)
        self.epochs_csv = _CsvLog(self.dir / EPOCHS_CSV, "epoch", start_epoch)
        # TensorBoard hides the earlier events at steps >= purge_step: all of them in a fresh run
        self.tb = _tensorboard(self.dir, start_step + 1 if start_epoch else 0)
        log.info("experiment logs: %s (CSV%s)", self.dir, " + TensorBoard" if self.tb else "")

    @classmethod
    def open(cls, log_dir: Optional[str | Path], start_epoch: int, start_step: int,
             device: torch.device) -> Optional["RunLog"]:
        """The run's log, or None without a log_dir; ``start_*``: where the run (re)starts (0, 0: fresh)."""
        return cls(log_dir, start_epoch, start_step, device) if log_dir else None

    @property
    def pending(self) -> int:
        return len(self._steps)

    def add_step(self, step: int, epoch: int, terms: dict[str, torch.Tensor]) -> None:
        """Buffer one step's (detached, 0-d) loss terms: no host sync."""
        self._steps.append((step, epoch, terms))

    def flush_steps(self) -> None:
        """Write the buffered steps: one host transfer (and, under torchrun, one collective on all ranks)."""
        if not self._steps:
            return
        names = list(dict.fromkeys(k for _, _, t in self._steps for k in t))
        if names:
            nan = torch.full((), float("nan"), device=self.device)
            cols = [torch.stack([t.get(k, nan).to(self.device, torch.float32).reshape(()) for _, _, t in self._steps])
                    for k in names]
            table = torch.stack(cols, 1)
            if dist.is_dist():
                table = dist.all_reduce_sum(table, differentiable=False) / dist.world_size()
            values = table.tolist() if self.writes else []   # the one sync of this flush (rank 0)
        else:
            values = [[] for _ in self._steps]
        if self.writes:
            rows = []
            for (step, epoch, _), vals in zip(self._steps, values):
                rows.append({"step": step, "epoch": epoch, **{k: _cell(v) for k, v in zip(names, vals)}})
                if self.tb is not None:
                    for k, v in zip(names, vals):
                        if not math.isnan(v):
                            self.tb.add_scalar(f"step/{k}", v, step)
            self.steps_csv.append(rows)
            if self.tb is not None:
                self.tb.flush()
        self._steps.clear()

    def add_epoch(self, rec: dict) -> None:
        """Write the loop's record of an epoch (flush the steps first)."""
        self.flush_steps()
        if not self.writes:
            return
        self.epochs_csv.append([{k: _cell(v) for k, v in rec.items()}])
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"epoch/{k}", v, rec["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
