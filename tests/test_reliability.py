"""Reliability: kill-and-resume, damaged checkpoints, the NaN guard, determinism.

The resume tests run the real command line in a subprocess, SIGKILL it part-way through an epoch
(after the checkpoint of epoch 2 was written), resume it with ``--resume`` and check that the final
model, metrics and history equal those of an uninterrupted run with the same seed (exactly: CPU,
one thread). Sizes are tiny so that each test takes seconds.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import dfkt
from dfkt import api
from dfkt.cli import main as cli_main
from dfkt.core.checkpoint import RESUME_NAME, atomic_save, read_checkpoint, save_model
from dfkt.core.context import Context, StepGuard, TrainConfig
from dfkt.data import get_domain
from dfkt.errors import CheckpointError, NonFiniteError
from dfkt.models import build_model

HELPERS = Path(__file__).parent / "helpers"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
TIME_KEYS = ("time_s",)

SFDA_METHOD = "shot"
DFKD_METHOD = "dafl"


# ----------------------------------------------------------------------------- helpers
def require_method(name: str) -> None:
    """Fail (not skip) with a clear message while a method is not registered yet."""
    methods = dfkt.list_methods()
    if name not in methods:
        pytest.fail(f"method {name!r} is not registered yet (dfkt.list_methods() = {methods}); "
                    f"this test runs as soon as it is.")


@contextlib.contextmanager
def one_thread_and_quiet_logging():
    """Run the CLI in-process like the subprocesses run it: one thread; restore the logger after."""
    log = logging.getLogger("dfkt")
    saved = (list(log.handlers), log.level, log.propagate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        log.handlers, log.level, log.propagate = saved[0], saved[1], saved[2]


def strip_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def outcome(out: Path) -> dict:
    """What a finished run left in ``out``: history (from resume.pt), metrics and weights (model.pt)."""
    ck = read_checkpoint(out / RESUME_NAME)
    model = read_checkpoint(out / "model.pt")
    return {"history": strip_times(ck["history"]), "epoch": ck["epoch"],
            "metrics": {k: v for k, v in model["metrics"].items() if k not in TIME_KEYS},
            "state": model["state_dict"]}


def assert_same_outcome(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert a["history"] == b["history"], "history differs from the uninterrupted run"
    assert a["metrics"] == b["metrics"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"weights {k} differ from the uninterrupted run"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def kill_part_way(cmd: str, cfg: Path, out: Path, hang_after: int = 2, steps: int = 2, timeout: float = 240) -> dict:
    """Start ``dfkt cmd cfg`` in a subprocess, SIGKILL it a few steps into the epoch after the
    checkpoint of epoch ``hang_after``; return what the checkpoint held."""
    marker = out.parent / f"{out.name}.hung"
    err = (out.parent / f"{out.name}.stderr").open("w")
    proc = subprocess.Popen([sys.executable, str(HELPERS / "cli_hang.py"), str(marker), str(hang_after), str(steps),
                             "--", cmd, str(cfg), "--out", str(out), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    t0 = time.monotonic()
    try:
        while not marker.exists():
            if proc.poll() is not None:
                err.close()
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n"
                            + (out.parent / f"{out.name}.stderr").read_text()[-3000:])
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"the run did not reach epoch {hang_after} within {timeout} s")
            time.sleep(0.1)
        ck = read_checkpoint(out / RESUME_NAME)
        assert ck["epoch"] == hang_after
        assert not (out / "model.pt").exists(), "results written before the run finished"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    info = json.loads(marker.read_text())
    assert info["step"] > ck["step"], "the killed run should have been part-way into the next epoch"
    return ck


def resume_cli(cmd: str, cfg: Path, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dfkt", cmd, str(cfg), "--out", str(out), "--resume", "--no-progress"],
                       env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def reference_run(cmd: str, cfg: Path, out: Path) -> dict:
    with one_thread_and_quiet_logging():
        assert cli_main([cmd, str(cfg), "--out", str(out), "--no-progress", "-q"]) == 0
    return outcome(out)


def check_kill_and_resume(cmd: str, cfg: Path, tmp_path: Path, epochs: int) -> None:
    ref = reference_run(cmd, cfg, tmp_path / "ref")
    assert ref["epoch"] == epochs and len(ref["history"]) == epochs
    ck = kill_part_way(cmd, cfg, tmp_path / "run")
    assert strip_times(ck["history"]) == ref["history"][:2]      # the first two epochs already agree
    r = resume_cli(cmd, cfg, tmp_path / "run")
    assert "resumed" in r.stderr and "at epoch 2" in r.stderr, r.stderr[-2000:]
    assert_same_outcome(outcome(tmp_path / "run"), ref)


# ----------------------------------------------------------------------------- fixtures: trained models
@pytest.fixture(scope="module")
def source_model(tmp_path_factory) -> Path:
    """A SHOT digit source model (1 epoch on clean digits), saved as a dfkt model.pt."""
    torch.manual_seed(0)
    res = dfkt.train_supervised(build_model("shot-lenet", num_classes=10),
                                get_domain("digits", split="source_train", size=28), epochs=1, batch_size=64,
                                smoothing=0.1, device="cpu", progress=False)
    return save_model(tmp_path_factory.mktemp("src") / "model.pt", res.model, method="supervised")


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory) -> Path:
    """A LeNet-5 teacher (2 epochs on digits 32x32), saved as a dfkt model.pt."""
    torch.manual_seed(0)
    res = dfkt.train_supervised(build_model("lenet5", num_classes=10),
                                get_domain("digits", split="train", size=32), epochs=2, batch_size=64,
                                lr=0.05, schedule="cosine", device="cpu", progress=False)
    return save_model(tmp_path_factory.mktemp("teacher") / "model.pt", res.model, method="supervised")


def adapt_config(tmp_path: Path, source_model: Path, epochs: int = 4, **train) -> Path:
    return write_yaml(tmp_path / "adapt.yaml", {
        "method": SFDA_METHOD, "model": {"name": "shot-lenet", "num_classes": 10}, "source_model": str(source_model),
        "target": {"domain": "digits", "split": "test", "size": 28, "corruption": "gaussian_noise", "severity": 4},
        "options": {"beta": 0.3},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.01, "seed": 3, "device": "cpu", **train}})


def distill_config(tmp_path: Path, teacher_model: Path, epochs: int = 4, **train) -> Path:
    return write_yaml(tmp_path / "distill.yaml", {
        "method": DFKD_METHOD, "teacher": {"name": "lenet5", "num_classes": 10, "checkpoint": str(teacher_model)},
        "student": {"name": "lenet5-half"}, "input_shape": [1, 32, 32],
        "eval": {"domain": "digits", "split": "test", "size": 32},
        # one student step per iteration, so that a kill a few student steps into an epoch is a few
        # iterations into it; the default replay pool stays on (its state must survive the resume too)
        "options": {"kd_steps": 1},
        "train": {"epochs": epochs, "iters_per_epoch": 4, "batch_size": 32, "lr": 0.05, "seed": 3, "device": "cpu",
                  **train}})


# ----------------------------------------------------------------------------- 1. kill and resume
def test_kill_and_resume_supervised_cli(tmp_path) -> None:
    cfg = write_yaml(tmp_path / "source.yaml", {
        "model": {"name": "shot-lenet", "num_classes": 10},
        "data": {"domain": "digits", "split": "source_train", "size": 28},
        "val": {"domain": "digits", "split": "source_val", "size": 28},
        "train": {"epochs": 4, "batch_size": 128, "seed": 5, "device": "cpu"}})
    check_kill_and_resume("train-source", cfg, tmp_path, epochs=4)


def test_kill_and_resume_sfda_cli(tmp_path, source_model) -> None:
    require_method(SFDA_METHOD)
    check_kill_and_resume("adapt", adapt_config(tmp_path, source_model), tmp_path, epochs=4)


def test_kill_and_resume_dfkd_cli(tmp_path, teacher_model) -> None:
    require_method(DFKD_METHOD)
    check_kill_and_resume("distill", distill_config(tmp_path, teacher_model), tmp_path, epochs=4)


def test_resume_refuses_another_config(tmp_path, source_model) -> None:
    require_method(SFDA_METHOD)
    target = get_domain("digits", split="test", size=28).subset(range(64))
    model = dfkt.load(source_model)
    kw = dict(method=SFDA_METHOD, epochs=1, batch_size=32, device="cpu", progress=False)
    dfkt.adapt(model, target, out=tmp_path, **kw)
    with pytest.raises(CheckpointError, match=r"another configuration .*new checkpoint_dir"):
        dfkt.adapt(model, target, out=tmp_path, resume=True, beta=0.5, **kw)
    with pytest.raises(CheckpointError, match=r"written by method 'shot', not 'tent'"):
        dfkt.adapt(build_model("shot-lenet"), target, out=tmp_path, resume=True, method="tent", epochs=1,
                   device="cpu", progress=False)


# ----------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def good_resume_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good")
    data = get_domain("digits", split="source_val", size=28)
    dfkt.train_supervised(build_model("shot-lenet"), data, out=out, epochs=1, batch_size=64,
                          device="cpu", progress=False)
    return out / RESUME_NAME


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "plain_dict", "empty", "model_file"])
def test_damaged_resume_file_is_an_error_not_a_restart(tmp_path, damage, good_resume_file) -> None:
    good = good_resume_file
    out = tmp_path / "run"
    out.mkdir()
    bad = out / RESUME_NAME
    if damage == "truncated":
        blob = good.read_bytes()
        bad.write_bytes(blob[: len(blob) // 2])
    elif damage == "random_bytes":
        bad.write_bytes(os.urandom(4096))
    elif damage == "plain_dict":
        torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}}, bad)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        save_model(bad, build_model("shot-lenet"))
    data = get_domain("digits", split="source_val", size=28)
    expect = {"truncated": r"cannot be read.*truncated, corrupted or not a dfkt checkpoint",
              "random_bytes": r"cannot be read.*truncated, corrupted or not a dfkt checkpoint",
              "empty": r"cannot be read.*truncated, corrupted or not a dfkt checkpoint",
              "plain_dict": r"is not a dfkt checkpoint \(no dfkt format tag\)",
              "model_file": r"is a 'dfkt-model' file where a 'dfkt-resume' file was expected"}[damage]
    with pytest.raises(CheckpointError, match=expect):
        dfkt.train_supervised(build_model("shot-lenet"), data, out=out, resume=True, epochs=2, batch_size=64,
                              device="cpu", progress=False)
    assert not (out / "model.pt").exists()
    assert dfkt.load(good).dfkt_spec["name"] == "shot-lenet"     # the intact file still loads
    if damage != "truncated":
        return
    # the CLI says so too, and exits with status 2 (no traceback, no silent restart)
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"name": "shot-lenet"}, "data": {"domain": "digits",
                     "split": "source_val"}, "train": {"epochs": 2, "device": "cpu"}, "out": str(out)})
    r = subprocess.run([sys.executable, "-m", "dfkt", "train-source", str(cfg), "--resume", "--no-progress"],
                       env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "model.pt").exists()


def test_atomic_save_keeps_the_previous_file_when_interrupted(tmp_path, monkeypatch) -> None:
    path = atomic_save({"format": "dfkt-resume", "version": 1, "v": 1}, tmp_path / RESUME_NAME)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"format": "dfkt-resume", "version": 1, "v": 2}, path)
    assert read_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [RESUME_NAME]     # no temporary file left behind


# ----------------------------------------------------------------------------- 3. numerical safety
def _tiny_ctx(max_bad: int = 3) -> tuple[Context, torch.optim.Optimizer]:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    ctx = Context(learner=net, teacher=None, train=TrainConfig(max_bad_steps=max_bad).resolved({}),
                  device=torch.device("cpu"), num_classes=3, input_shape=(4,))
    return ctx, torch.optim.SGD(net.parameters(), lr=0.1)


def test_step_guard_skips_and_logs_bad_steps(caplog, monkeypatch) -> None:
    monkeypatch.setattr(logging.getLogger("dfkt"), "propagate", True)
    ctx, opt = _tiny_ctx(max_bad=3)
    w0 = ctx.learner[0].weight.detach().clone()
    x = torch.randn(5, 4)
    with caplog.at_level(logging.WARNING, logger="dfkt"):
        ctx.step = 7
        loss = ctx.learner(x).sum() * float("nan")
        assert ctx.optimize(loss, opt, {"ce": loss, "reg": torch.tensor(0.5)}) is False
        assert torch.equal(ctx.learner[0].weight, w0), "a NaN step changed the weights"
        ctx.step = 8
        y = ctx.learner(x).sum()
        y.register_hook(lambda g: g * float("inf"))        # finite loss, infinite gradient
        assert ctx.optimize(y, opt, {"ce": y.detach()}) is False
        assert torch.equal(ctx.learner[0].weight, w0)
        ctx.step = 9
        assert ctx.optimize(ctx.learner(x).pow(2).mean(), opt) is True   # a good step resets the count
    assert not torch.equal(ctx.learner[0].weight, w0)
    assert ctx.guard.skipped == 2 and ctx.guard.bad_in_a_row == 0
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 2
    assert warns[0].startswith("step 7: non-finite loss or gradient, step skipped (1 in a row)")
    assert "terms: ce=nan, reg=0.5; non-finite: ce" in warns[0]
    assert warns[1].startswith("step 8:") and "non-finite: gradients only" in warns[1]
    assert all(p.grad is None for p in ctx.learner.parameters())


def test_step_guard_stops_after_consecutive_bad_steps() -> None:
    ctx, opt = _tiny_ctx(max_bad=3)
    x = torch.randn(5, 4)
    with pytest.raises(NonFiniteError) as ei:
        for step in range(10):
            ctx.step = step
            out = ctx.learner(x)
            ent = out.mean() * float("inf")
            kd = out.pow(2).mean()
            ctx.optimize(ent + kd, opt, {"ent": ent, "kd": kd})
    msg = str(ei.value)
    assert ctx.step == 2 and msg.startswith("3 consecutive non-finite steps, the last at step 2: loss=")
    assert ("terms: ent=inf, kd=" in msg or "terms: ent=-inf, kd=" in msg) and "non-finite: ent." in msg and "max_bad_steps" in msg


def test_step_guard_direct() -> None:
    g = StepGuard(max_bad=1)
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(NonFiniteError, match="at step 4"):
        g((p * float("nan")).sum(), torch.optim.SGD([p], lr=1.0), step=4, terms={"x": torch.tensor(float("nan"))})
    assert torch.equal(p.detach(), torch.ones(2))


def test_step_guard_counts_each_stream_on_its_own() -> None:
    """Good student steps between failing generator steps must not reset the generator's count."""
    ctx, opt = _tiny_ctx(max_bad=3)
    gen = torch.nn.Linear(4, 4)
    g_opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    x = torch.randn(5, 4)
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite synthesis steps, the last at step 2"):
        for step in range(10):
            ctx.step = step
            bad = gen(x).sum() * float("nan")
            assert ctx.optimize(bad, g_opt, {"g": bad.detach()}, stream="synthesis") is False
            assert ctx.optimize(ctx.learner(x).pow(2).mean(), opt) is True
            assert ctx.guard.in_a_row["main"] == 0 and ctx.guard.in_a_row["synthesis"] == step + 1
    assert ctx.guard.skipped == 3 and ctx.guard.bad_in_a_row == 3


def _nan_after(fn, n_good: int):
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        out = fn(*a, **k)
        return out * float("nan") if calls["n"] > n_good else out
    return wrapped, calls


def test_injected_nan_in_a_real_run_stops_with_nothing_written(tmp_path, monkeypatch, source_model, caplog) -> None:
    """SHOT with its entropy loss turned NaN from the 5th step: steps are skipped and logged, then
    the run stops with NonFiniteError naming the step and the terms; no model.pt/history.json."""
    require_method(SFDA_METHOD)
    shot_mod = importlib.import_module("dfkt.sfda." + SFDA_METHOD)

    wrapped, calls = _nan_after(shot_mod.entropy, 4)
    monkeypatch.setattr(shot_mod, "entropy", wrapped)
    monkeypatch.setattr(logging.getLogger("dfkt"), "propagate", True)
    target = get_domain("digits", split="test", size=28)
    with caplog.at_level(logging.WARNING, logger="dfkt"), pytest.raises(NonFiniteError) as ei:
        dfkt.adapt(dfkt.load(source_model), target, method=SFDA_METHOD, epochs=3, batch_size=32, max_bad_steps=3,
                   out=tmp_path, device="cpu", progress=False)
    msg = str(ei.value)
    assert msg.startswith("3 consecutive non-finite steps, the last at step 6: loss=nan")
    assert "ent=nan" in msg and "div=" in msg and "non-finite: ent, " in msg
    warns = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert [w.split(":")[0] for w in warns] == ["step 4", "step 5", "step 6"]
    assert calls["n"] == 7
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "history.json").exists()


def test_isolated_nan_steps_are_skipped_and_the_run_finishes(tmp_path, monkeypatch, teacher_model) -> None:
    """DAFL's KD loss NaN on two isolated steps: skipped, counted in the history, run completes."""
    require_method(DFKD_METHOD)
    common = importlib.import_module("dfkt.distill.student")

    real, calls = common.kd_kl, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] in (2, 5) else out

    monkeypatch.setattr(common, "kd_kl", flaky)
    res = api.distill(dfkt.load(teacher_model), build_model("lenet5-half"), method=DFKD_METHOD,
                      input_shape=(1, 32, 32), epochs=2, iters_per_epoch=4, batch_size=16, out=tmp_path,
                      device="cpu", progress=False)
    assert res.history.records[-1]["skipped_steps"] == 2
    assert all(math.isfinite(p.detach().sum()) for p in res.model.parameters())
    assert (tmp_path / "model.pt").exists()


# ----------------------------------------------------------------------------- 4. determinism
def _history(res) -> list[dict]:
    return strip_times(res.history.records)


def test_sfda_same_seed_same_result(source_model) -> None:
    require_method(SFDA_METHOD)
    target = get_domain("digits", split="test", size=28, corruption="gaussian_noise", severity=4)
    runs = [dfkt.adapt(dfkt.load(source_model), target, method=SFDA_METHOD, epochs=2, batch_size=64, seed=11,
                       device="cpu", progress=False) for _ in range(2)]
    assert _history(runs[0]) == _history(runs[1]) and runs[0].acc == runs[1].acc
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)
    other = dfkt.adapt(dfkt.load(source_model), target, method=SFDA_METHOD, epochs=2, batch_size=64, seed=12,
                       device="cpu", progress=False)
    assert _history(other) != _history(runs[0])       # the seed matters


def test_dfkd_same_seed_same_result(teacher_model) -> None:
    require_method(DFKD_METHOD)
    eval_data = get_domain("digits", split="test", size=32)

    def run(seed):
        torch.manual_seed(seed)
        student = build_model("lenet5-half")
        return api.distill(dfkt.load(teacher_model), student, method=DFKD_METHOD, input_shape=(1, 32, 32),
                           eval_data=eval_data, epochs=2, iters_per_epoch=3, batch_size=32, seed=seed,
                           device="cpu", progress=False)

    a, b = run(4), run(4)
    assert _history(a) == _history(b) and a.acc == b.acc
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert _history(run(5)) != _history(a)


def test_cli_seed_decides_the_initial_weights(tmp_path) -> None:
    """Models built from a config are initialised under train.seed (not whatever ran before)."""
    cfg = write_yaml(tmp_path / "s.yaml", {"model": {"name": "lenet5"}, "data": {"domain": "digits",
                     "split": "source_val", "size": 32}, "train": {"epochs": 1, "seed": 2, "device": "cpu"}})
    outs = []
    for i, burn in enumerate((0, 5)):
        torch.rand(burn)        # consume global RNG state between the two runs
        with one_thread_and_quiet_logging():
            assert cli_main(["train-teacher", str(cfg), "--out", str(tmp_path / f"o{i}"), "-q", "--no-progress"]) == 0
        outs.append(outcome(tmp_path / f"o{i}"))
    assert_same_outcome(outs[0], outs[1])
