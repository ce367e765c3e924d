"""The CLI end to end on the shipped example configs (embedded digits, shrunk with --set)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import dfkt
from dfkt.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"


@pytest.fixture()
def examples(tmp_path, monkeypatch):
    shutil.copytree(EXAMPLES, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "configs"


def test_train_source_then_adapt(examples, capsys):
    assert main(["train-source", str(examples / "source-digits.yaml"), "--set", "train.epochs=3",
                 "--no-progress", "-q"]) == 0
    src = dfkt.load("runs/source-digits/model.pt")
    assert src.dfkt_meta["metrics"]["val_acc"] > 85
    assert main(["adapt", str(examples / "shot-digits.yaml"), "--set", "train.epochs=2", "--no-progress", "-q"]) == 0
    out = capsys.readouterr().out
    assert "method: shot" in out and "acc:" in out
    hist = json.loads(Path("runs/shot-digits/history.json").read_text())
    assert len(hist["history"]) == 2 and hist["config"]["method"] == "shot"
    adapted = dfkt.load("runs/shot-digits/model.pt")
    assert adapted.dfkt_meta["method"] == "shot"
    sa, sb = adapted.state_dict(), src.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sb if k.startswith("backbone."))   # adapted
    assert all(torch.equal(sa[k], sb[k]) for k in sb if k.startswith("head."))           # head frozen


def test_train_teacher_then_distill(examples, capsys):
    assert main(["train-teacher", str(examples / "teacher-digits.yaml"), "--set", "train.epochs=3",
                 "--no-progress", "-q"]) == 0
    assert main(["distill", str(examples / "dafl-digits.yaml"), "--set", "train.epochs=1",
                 "--set", "train.iters_per_epoch=3", "--no-progress", "-q", "--log-dir", "logs/dafl"]) == 0
    steps = Path("logs/dafl/steps.csv").read_text().splitlines()     # --log-dir: the DFKD terms per step
    assert len(steps) == 4 and steps[0].startswith("step,epoch,") and "kd" in steps[0].split(",")
    assert Path("logs/dafl/epochs.csv").is_file()
    student = dfkt.load("runs/dafl-digits/model.pt")
    assert student.dfkt_meta["method"] == "dafl"
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(
        p.numel() for p in dfkt.load("runs/teacher-digits/model.pt").parameters())


def test_cli_errors_are_one_line_not_tracebacks(examples, capsys):
    assert main(["adapt", str(examples / "shot-digits.yaml")]) == 2      # source model not trained yet
    err = capsys.readouterr().err
    assert "error:" in err and "not found" in err and "Traceback" not in err
    assert main(["adapt", str(examples / "shot-digits.yaml"), "--set", "method=shoot"]) == 2
    assert "Did you mean 'shot'" in capsys.readouterr().err


def test_shipped_run_configs_parse():
    from dfkt.config import load_yaml
    from dfkt.runconfig import parse

    root = EXAMPLES.parent
    kinds = {"sfda": "adapt", "dfkd": "distill"}
    for sub, kind in kinds.items():
        files = sorted((root / sub).glob("*.yaml"))
        assert files, sub
        for f in files:
            cfg = parse(kind, load_yaml(f))
            assert cfg.method in dfkt.list_methods(), f


def test_image_list_target_gets_a_test_time_view(tmp_path):
    from PIL import Image

    from dfkt.runconfig import DataRef

    lines = []
    for i in range(4):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i % 2}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    ds = DataRef(image_list=str(tmp_path / "list.txt"), train=True, resize=36, crop=32).build()
    x, y, idx = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and idx == 1
    assert ds.eval_view is not None and len(ds.eval_view) == 4
    a, b = ds.eval_view[2][0], ds.eval_view[2][0]
    assert torch.equal(a, b)   # the test-time view is deterministic (centre crop, no flip)
