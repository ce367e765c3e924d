"""Run the dfkt CLI and freeze part-way through a run, so that a test can SIGKILL it there.

    python tests/helpers/cli_hang.py MARKER HANG_AFTER_EPOCH STEPS -- <dfkt argv...>

Once ``resume.pt`` for epoch HANG_AFTER_EPOCH has been written, the run goes on for STEPS more
optimiser steps (so the killed process holds half-done work of the next epoch that a resume must
throw away), then writes MARKER (JSON: the checkpointed epoch and the current step) and sleeps
until it is killed. Everything else is the unmodified ``dfkt`` command line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import dfkt.core.loop as loop
from dfkt.cli import main
from dfkt.core.context import Context


def install(marker: Path, hang_after: int, steps: int) -> None:
    state = {"saved": 0, "steps": 0}
    save_resume, optimize = loop.save_resume, Context.optimize

    def saving(path, method, history, epoch, meta):
        save_resume(path, method, history, epoch, meta)
        state["saved"] = epoch

    def optimizing(self, *args, **kwargs):
        ok = optimize(self, *args, **kwargs)
        stream = kwargs.get("stream", args[4] if len(args) > 4 else "main")
        if state["saved"] >= hang_after and stream == "main":   # learner steps (not DFKD synthesis steps)
            state["steps"] += 1
            if state["steps"] >= steps:
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(json.dumps({"epoch": state["saved"], "step": self.step}))
                tmp.replace(marker)
                while True:          # wait for SIGKILL
                    time.sleep(0.5)
        return ok

    loop.save_resume = saving
    Context.optimize = optimizing


if __name__ == "__main__":
    torch.set_num_threads(1)
    sep = sys.argv.index("--")
    marker, hang_after, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    install(marker, hang_after, steps)
    sys.exit(main(sys.argv[sep + 1:]))
