"""Experiment logs (train.log_dir / --log-dir): CSV files (+ TensorBoard), resume appends, rank 0 only."""
from __future__ import annotations

import csv
import logging
import sys

import pytest
import torch
from torch import nn

import dfkt
import dfkt.core.loop as loop
from dfkt.core import distributed as dist
from dfkt.core.runlog import RunLog
from dfkt.data import get_domain
from dfkt.errors import ConfigError


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    return (get_domain("digits", split="source_train", size=8).subset(range(256)),
            get_domain("digits", split="source_val", size=8))


KW = dict(epochs=3, lr=0.05, batch_size=64, seed=1, progress=False)   # 4 steps per epoch


def tb_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return [(s.step, s.value) for s in ea.Scalars(tag)]


def test_log_files_have_steps_and_epochs(digits, tmp_path):
    tr, va = digits
    res = dfkt.train_supervised(tiny_net(), tr, va, **KW, log_dir=str(tmp_path / "logs"))
    steps, epochs = rows(tmp_path / "logs" / "steps.csv"), rows(tmp_path / "logs" / "epochs.csv")
    assert header(tmp_path / "logs" / "steps.csv") == ["step", "epoch", "ce"]
    assert [int(r["step"]) for r in steps] == list(range(1, 13))
    assert [int(r["epoch"]) for r in steps] == [1] * 4 + [2] * 4 + [3] * 4
    assert header(tmp_path / "logs" / "epochs.csv")[:4] == ["epoch", "step", "time_s", "ce"]
    assert "val_acc" in epochs[0]
    assert [int(r["step"]) for r in epochs] == [4, 8, 12]
    # the epoch means of the logged steps are the history's (the same values, read once per epoch)
    for e, rec in enumerate(res.history.records, 1):
        step_ce = [float(r["ce"]) for r in steps if int(r["epoch"]) == e]
        assert sum(step_ce) / 4 == pytest.approx(rec["ce"], rel=1e-4)
        assert float(epochs[e - 1]["val_acc"]) == pytest.approx(rec["val_acc"], abs=1e-3)
    pytest.importorskip("tensorboard")
    ce = tb_scalars(tmp_path / "logs", "step/ce")
    assert [s for s, _ in ce] == list(range(1, 13))
    assert [v for _, v in ce] == pytest.approx([float(r["ce"]) for r in steps], rel=1e-4)
    assert [s for s, _ in tb_scalars(tmp_path / "logs", "epoch/val_acc")] == [4, 8, 12]


def test_resumed_run_appends_without_duplicates(digits, tmp_path, monkeypatch):
    tr, va = digits
    full = tmp_path / "full"
    dfkt.train_supervised(tiny_net(), tr, va, **KW, log_dir=str(full))
    # killed while writing the checkpoint of epoch 2: epoch 2 is in the logs but not in resume.pt
    real_save, calls = loop.save_resume, []

    def die_at_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(*a, **k)

    monkeypatch.setattr(loop, "save_resume", die_at_second)
    logs, ck = tmp_path / "logs", str(tmp_path / "ck")
    with pytest.raises(KeyboardInterrupt):
        dfkt.train_supervised(tiny_net(), tr, va, **KW, checkpoint_dir=ck, log_dir=str(logs))
    assert [int(r["step"]) for r in rows(logs / "steps.csv")] == list(range(1, 9))
    monkeypatch.setattr(loop, "save_resume", real_save)
    res = dfkt.train_supervised(tiny_net(), tr, va, **KW, checkpoint_dir=ck, log_dir=str(logs), resume=True)
    assert res.history.resumed_from_epoch == 1
    assert rows(logs / "steps.csv") == rows(full / "steps.csv")       # steps 1-12 once each, same values
    drop_time = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    assert drop_time(rows(logs / "epochs.csv")) == drop_time(rows(full / "epochs.csv"))
    if _has_tensorboard():
        assert [s for s, _ in tb_scalars(logs, "step/ce")] == list(range(1, 13))   # the purged epoch-2 events
    # a fresh (not resumed) run in the same folder starts the files anew
    dfkt.train_supervised(tiny_net(), tr, va, **{**KW, "epochs": 1}, log_dir=str(logs))
    assert [int(r["step"]) for r in rows(logs / "steps.csv")] == [1, 2, 3, 4]
    assert len(rows(logs / "epochs.csv")) == 1


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_sfda_run_logs_its_terms_and_metrics(tmp_path):
    """The hook sits in the core loop: an SFDA method logs its own terms with no code of its own."""
    src = get_domain("digits", split="source_train", size=8)
    torch.manual_seed(0)
    model = dfkt.train_supervised(tiny_net(), src, epochs=1, batch_size=64, progress=False).model
    target = get_domain("digits", split="test", size=8, corruption="gaussian_noise")
    dfkt.adapt(model, target, method="shot", epochs=2, batch_size=64, progress=False, log_dir=str(tmp_path))
    h = header(tmp_path / "steps.csv")
    assert h[:2] == ["step", "epoch"] and {"ent", "div", "ce"} <= set(h)
    assert {"epoch", "step", "acc", "ent", "div"} <= set(header(tmp_path / "epochs.csv"))
    assert len(rows(tmp_path / "epochs.csv")) == 2


def test_only_rank0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "is_main", lambda: False)
    log = RunLog.open(tmp_path / "logs", 0, 0, torch.device("cpu"))
    log.add_step(1, 1, {"loss": torch.tensor(1.0)})
    log.add_epoch({"epoch": 1, "step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "logs").exists()


def test_new_columns_and_bad_log_dir(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # tensorboard not installed: CSV only
    monkeypatch.setattr(logging.getLogger("dfkt"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="dfkt"):
        log = RunLog.open(tmp_path, 0, 0, torch.device("cpu"))
    assert log.tb is None and "tensorboard is not installed" in caplog.text
    log.add_epoch({"epoch": 1, "step": 2, "loss": 0.5})
    log.add_epoch({"epoch": 2, "step": 4, "loss": 0.25, "acc": 90.0, "segment": "fog", "extra": None})
    log.close()
    assert rows(tmp_path / "epochs.csv") == [
        {"epoch": "1", "step": "2", "loss": "0.5", "acc": "", "segment": "", "extra": ""},
        {"epoch": "2", "step": "4", "loss": "0.25", "acc": "90", "segment": "fog", "extra": ""}]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        RunLog.open(tmp_path / "file", 0, 0, torch.device("cpu"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "steps.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="not a dfkt log"):
        RunLog.open(tmp_path / "other", 1, 4, torch.device("cpu"))
