"""The one training loop: epochs of method steps, progress, history, evaluation, checkpoint/resume.

Loss terms are summed on the device and read once per epoch; the only per-step host sync is the
NaN guard's single flag. With ``train.log_dir`` the per-step terms are buffered as device tensors and
written with the epoch records by :class:`~dfkt.core.runlog.RunLog`. Resume restores the learner, the method's tracked state (optimisers,
schedulers, generators, memory banks), all RNG states and the history, so a resumed CPU run is
identical to an uninterrupted one.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, DataError
from . import distributed as dist
from .checkpoint import (FORMAT_VERSION, RESUME_FORMAT, RESUME_NAME, atomic_save, load_state_strict, model_spec,
                         read_checkpoint)
from .device import synchronize
from .method import Method
from .runlog import FLUSH_EVERY, RunLog

log = logging.getLogger("dfkt")


@dataclass
class History:
    records: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    resumed_from_epoch: int = 0

    @property
    def last(self) -> dict:
        return self.records[-1] if self.records else {}

    def best(self, key: str, mode: str = "max") -> dict:
        recs = [r for r in self.records if key in r]
        if not recs:
            return {}
        return (max if mode == "max" else min)(recs, key=lambda r: r[key])

    def to_list(self) -> list[dict]:
        return list(self.records)


def _rng_state(ctx) -> dict:
    st = {"torch": torch.get_rng_state(), "ctx": ctx.rng.get_state(),
          "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
          "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(ctx, st: dict) -> None:
    torch.set_rng_state(st["torch"])
    ctx.rng.set_state(st["ctx"])
    keys = np.frombuffer(st["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, st["numpy_pos"], 0, 0.0))
    import ast

    random.setstate(ast.literal_eval(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def resume_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / RESUME_NAME


def save_resume(path: Path, method: Method, history: History, epoch: int, meta: dict) -> None:
    ctx = method.ctx
    atomic_save({
        "format": RESUME_FORMAT, "version": FORMAT_VERSION, "epoch": epoch, "step": ctx.step,
        "method": method.name, "task": method.task, **meta,
        "model_state": dist.unwrap(method.model()).state_dict(),
        "model_spec": model_spec(dist.unwrap(method.model())),   # dfkt.load(resume.pt) rebuilds the model
        "learner_state": dist.unwrap(ctx.learner).state_dict(),
        "method_state": method.state_dict(), "rng": _rng_state(ctx),
        "history": history.records, "train_time_s": history.train_time_s,
        "guard": {"skipped": ctx.guard.skipped},
    }, path)


def load_resume(path: Path, method: Method, meta: dict) -> tuple[int, History]:
    ck = read_checkpoint(path, expect=RESUME_FORMAT)
    if ck.get("method") != method.name:
        raise CheckpointError(f"{str(path)!r} was written by method {ck.get('method')!r}, not {method.name!r}; "
                              f"use another checkpoint_dir or the same method.")
    for key in ("fingerprint",):
        if key in meta and ck.get(key) not in (None, meta[key]):
            raise CheckpointError(f"{str(path)!r} was written with another configuration (fingerprint "
                                  f"{ck.get(key)} != {meta[key]}); resume needs the same config, or use a "
                                  f"new checkpoint_dir.")
    ctx = method.ctx
    load_state_strict(dist.unwrap(ctx.learner), ck["learner_state"], where=f"resume checkpoint {str(path)!r}")
    method.load_state_dict(ck["method_state"])
    _set_rng_state(ctx, ck["rng"])
    ctx.step = ck["step"]
    ctx.guard.skipped = ck.get("guard", {}).get("skipped", 0)
    hist = History(list(ck["history"]), float(ck.get("train_time_s", 0.0)), resumed_from_epoch=ck["epoch"])
    return ck["epoch"], hist


def _out_of_time(elapsed: float, budget: float, device: torch.device) -> bool:
    """Whether the time budget is spent; under torchrun rank 0 decides for all (no rank stops alone)."""
    over = elapsed > budget
    if dist.is_dist():
        flag = torch.tensor([float(over)], device=device)
        over = bool(dist.broadcast_(flag, 0).item())
    return over


def fit(method: Method, eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None,
        resume: bool = False, meta: Optional[dict] = None,
        callbacks: tuple[Callable[[dict], None], ...] = ()) -> History:
    """Run ``method`` for ``ctx.train.epochs`` epochs; evaluate, log, checkpoint; return the history."""
    ctx = method.ctx
    tc = ctx.train
    meta = meta or {}
    history = History()
    start = 0
    ckpt = resume_path(tc.checkpoint_dir) if tc.checkpoint_dir else None
    method.setup()
    if resume:
        if ckpt is None:
            raise CheckpointError("resume requested but train.checkpoint_dir is not set; set it to the folder "
                                  "of the interrupted run.")
        if ckpt.exists():
            start, history = load_resume(ckpt, method, meta)
            if dist.is_main():
                log.info("resumed %s from %s at epoch %d (step %d)", method.name, ckpt, start, ctx.step)
        elif dist.is_main():
            log.info("no checkpoint at %s yet: starting from scratch", ckpt)
    runlog = RunLog.open(tc.log_dir, start, ctx.step, ctx.device)   # train.log_dir: CSV (+ TensorBoard)
    epochs = tc.epochs if method.trains else 1
    show = (tc.progress if tc.progress is not None else sys.stderr.isatty()) and dist.is_main()
    for epoch in range(start, epochs):
        ctx.epoch = epoch
        t0 = time.perf_counter()
        ctx.time_base, ctx.epoch_t0 = history.train_time_s, t0
        method.epoch_begin(epoch)
        sums: dict[str, torch.Tensor] = {}
        n = 0
        bar = tqdm(total=ctx.steps_per_epoch, disable=not show, leave=False, dynamic_ncols=True,
                   desc=f"{method.name} {epoch + 1}/{epochs}")
        out_of_time = False
        for batch in method.batches():
            terms = {k: v.detach().float() for k, v in method.step(batch).items()}
            for k, v in terms.items():
                sums[k] = sums[k] + v if k in sums else v
            n += 1
            ctx.step += 1
            if runlog is not None:   # buffered on the device; written at the epoch end (or every FLUSH_EVERY)
                runlog.add_step(ctx.step, epoch + 1, terms)
                if runlog.pending >= FLUSH_EVERY:
                    runlog.flush_steps()
            bar.update()
            if tc.time_budget_s is not None and _out_of_time(history.train_time_s + time.perf_counter() - t0,
                                                             tc.time_budget_s, ctx.device):
                out_of_time = True
                break
        bar.close()
        if n == 0 and method.trains and epoch == start:
            data = ctx.target if ctx.target is not None else getattr(method, "train_set", None)
            size = f"{len(data)} sample(s)" if data is not None else "the data"
            raise DataError(f"{method.name} made no training step in its first epoch: {size} with batch_size "
                            f"{tc.batch_size} give no usable batch (batches of fewer than 2 samples are skipped: "
                            f"BatchNorm needs 2 per batch); lower batch_size or give more data.")
        synchronize(ctx.device)
        history.train_time_s += time.perf_counter() - t0
        ctx.time_base, ctx.epoch_t0 = history.train_time_s, None
        rec = {"epoch": epoch + 1, "step": ctx.step, "time_s": round(history.train_time_s, 3)}
        if sums:
            means = torch.stack(list(sums.values())) / max(n, 1)
            if dist.is_dist():   # the history holds the means over all ranks (the global batch), same on every rank
                means = dist.all_reduce_sum(means, differentiable=False) / dist.world_size()
            means = means.tolist()  # one sync per epoch
            rec.update({k: round(v, 6) for k, v in zip(sums, means)})
        last = epoch + 1 == epochs or out_of_time
        if eval_fn is not None and ((epoch + 1) % tc.eval_every == 0 or last):
            rec.update(eval_fn(method.model()))
        if ctx.guard.skipped:
            rec["skipped_steps"] = ctx.guard.skipped
        history.records.append(rec)
        if runlog is not None:
            runlog.add_epoch(rec)
        if dist.is_main():   # under torchrun only rank 0 logs (and checkpoints, below)
            log.info("%s epoch %d/%d: %s", method.name, epoch + 1, epochs,
                     ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                               if k not in ("epoch",)))
        for cb in callbacks:
            cb(rec)
        if ckpt is not None and dist.is_main() and ((epoch + 1) % tc.checkpoint_every == 0 or last):
            save_resume(ckpt, method, history, epoch + 1, meta)
        if out_of_time:
            if dist.is_main():
                log.info("time budget of %.0f s reached after epoch %d", tc.time_budget_s, epoch + 1)
            break
    if runlog is not None:
        runlog.close()
    dist.barrier()
    return history
