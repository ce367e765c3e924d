"""Runs under ``torchrun --nproc_per_node=2`` (gloo, CPU) for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node=2 --master_port=P tests/helpers/ddp_run.py SPEC.json

SPEC (JSON): {"out": dir, "runs": [{"name", "kind": "adapt"|"distill"|"bench", ...}, ...]}.
Every rank runs every entry; each rank writes ``<out>/<name>.rank<r>.json`` with what it saw (the
sample indices it trained on, the files it saved, its log lines, the result), so the test can
check sharding, rank-0-only checkpoints and logging, and compare results with a single process.
A run with ``"crash_after_epoch": k`` raises on every rank right after epoch k (before its
checkpoint is written, like a kill), then is resumed with ``resume=True`` in the same processes.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

import dfkt.core.checkpoint as checkpoint
import dfkt.core.loop as loop
from dfkt import api
from dfkt.core import distributed as dist
from dfkt.core import loader as loader_mod
from dfkt.data import get_domain
from dfkt.models import build_model


class Crash(Exception):
    pass


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


SEEN: dict = {}


def instrument() -> None:
    """Record the sample indices each rank's loaders yield and every checkpoint file written."""
    tl_iter = loader_mod.TensorLoader.__iter__

    def tensor_iter(self):
        epoch: list[int] = []
        if self.world > 1:
            SEEN["indices"].append(epoch)     # one list per pass of a sharded loader
        for x, y, idx in tl_iter(self):
            epoch.extend(idx.tolist())
            yield x, y, idx

    loader_mod.TensorLoader.__iter__ = tensor_iter
    save = checkpoint.atomic_save

    def saving(obj, path):
        SEEN["saved"].append(Path(path).name)
        return save(obj, path)

    checkpoint.atomic_save = saving
    loop.atomic_save = saving


def run_one(spec: dict, out: Path):
    kind = spec["kind"]
    train = dict(spec.get("train", {}), device="cpu", progress=False)
    if kind == "adapt":
        model = api.load(spec["source_model"])
        target = get_domain(**spec["target"])
        if "subset" in spec:
            target = target.subset(range(spec["subset"]))
        return api.adapt(model, target, method=spec["method"], train=train, out=out, resume=spec.get("resume", False),
                         **spec.get("options", {}))
    if kind == "distill":
        teacher = api.load(spec["teacher"])
        torch.manual_seed(spec.get("student_seed", 0))
        student = api.load(spec["student"]) if spec["student"].endswith(".pt") else build_model(spec["student"])
        eval_data = get_domain(**spec["eval"])
        return api.distill(teacher, student, method=spec["method"], input_shape=tuple(spec["input_shape"]),
                           eval_data=eval_data, train=train, out=out, resume=spec.get("resume", False),
                           **spec.get("options", {}))
    raise ValueError(kind)


def crashing_fit(after_epoch: int):
    fit = loop.fit

    def wrapped(method, eval_fn=None, resume=False, meta=None, callbacks=()):
        def crash(rec):
            if rec["epoch"] == after_epoch + 1:
                raise Crash(f"simulated crash in epoch {rec['epoch']}")
        return fit(method, eval_fn, resume, meta, tuple(callbacks) + (crash,))
    return wrapped


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    rank = int(os.environ["RANK"])
    log = logging.getLogger("dfkt")
    log.setLevel(logging.INFO)
    instrument()
    for run in spec["runs"]:
        seen = SEEN
        seen.clear()
        seen.update({"indices": [], "saved": [], "crashed": False})
        rec = Recorder()
        log.addHandler(rec)
        name = run["name"]
        try:
            if run["kind"] == "bench":
                from dfkt.cli import main as cli_main

                rc = cli_main(["bench", run["suite"], "--out", str(out / name), "--device", "cpu", "--no-progress"])
                result = {"rc": rc}
            else:
                if "crash_after_epoch" in run:
                    api.fit, fit = crashing_fit(run["crash_after_epoch"]), api.fit
                    try:
                        run_one(run, out / name)
                    except Crash:
                        seen["crashed"] = True
                    finally:
                        api.fit = fit
                    seen["saved_before_crash"] = list(seen["saved"])
                    run = dict(run, resume=True)
                res = run_one(run, out / name)
                result = {"acc": res.acc, "history": res.history.records, "metrics": res.metrics,
                          "resumed_from_epoch": res.history.resumed_from_epoch,
                          "world_size": dist.world_size(), "rank": dist.rank()}
        finally:
            log.removeHandler(rec)
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(
            {**result, **seen, "log": rec.lines}, default=str))
        SEEN.clear()
        dist.barrier()


if __name__ == "__main__":
    main()
