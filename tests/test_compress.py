"""Tests of source-free compression (dfkt.compress, `dfkt compress`, the compress bench task).

Runs without /work/shared: source = shot-lenet on the embedded UCI digits, target = a contrast-shifted copy
of their test split (359 images), students = digit-cnn (2.7 % / 10 % of the source's parameters).
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import yaml
from torch import nn

import dfkt
from helpers.harness import digits_source
from dfkt.core.checkpoint import save_model
from dfkt.core.evaluate import evaluate
from dfkt.data import get_domain
from dfkt.errors import ConfigError, DataError, ModelError
from dfkt.models import build_model

CPU = {"device": "cpu", "progress": False}
# the shortest stages: no adaptation (source-only trains nothing), one student epoch
TINY = {"adapt": "source-only", "student_epochs": 1, "student_min_steps": 1}


@pytest.fixture(scope="module")
def source_model() -> nn.Module:
    return digits_source().model


@pytest.fixture(scope="module")
def target():
    return get_domain("digits", split="test", corruption="contrast", severity=3)


@pytest.fixture(scope="module")
def source_acc(source_model, target) -> float:
    return evaluate(source_model, target)["acc"]


def _student(width: int = 8, classes: int = 10) -> nn.Module:
    return build_model("digit-cnn", num_classes=classes, width=width, seed=0)


def _state(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_default_recipe_beats_source_only(source_model, target, source_acc):
    student = _student(8)
    before_src, before_stu = _state(source_model), _state(student)
    res = dfkt.compress(source_model, student, target, adapt="shot", student_min_steps=400, seed=0, **CPU)
    assert isinstance(res, dfkt.CompressResult) and res.method == "adapt-kd-st"
    m = res.metrics
    assert m["ref_acc"] == pytest.approx(source_acc, abs=1e-4)
    assert m["teacher_acc"] > source_acc + 5            # the adapted teacher (SHOT) gained
    assert m["acc"] > source_acc + 5, (m, source_acc)    # a 2.7 % student clears the unadapted source model
    assert m["student_params"] == sum(p.numel() for p in student.parameters()) < m["teacher_params"] / 4
    assert [s["stage"] for s in res.stages] == ["adapt", "distil"]
    assert res.teacher is not None and isinstance(res.model, type(student))
    assert "acc" in res.history.last and "kd" in res.history.last and "refine" in res.history.last
    # neither of the caller's models changed
    assert all(torch.equal(v, _state(source_model)[k]) for k, v in before_src.items())
    assert all(torch.equal(v, _state(student)[k]) for k, v in before_stu.items())
    # the returned student scores what the result says
    assert evaluate(res.model, target)["acc"] == pytest.approx(m["acc"], abs=1e-4)


@pytest.mark.parametrize("recipe, stages", [("baseline-a", ["adapt", "distil"]),
                                            ("baseline-b", ["distil-data-free", "adapt-student"]),
                                            ("baseline-c", ["distil", "adapt-student"])])
def test_baselines_chain_the_stages(recipe, stages, source_model, target):
    extra = {"dfkd_time_s": 0.5} if recipe == "baseline-b" else {}
    res = dfkt.compress(source_model, _student(8), target, method=recipe, **TINY, **extra, **CPU)
    assert [s["stage"] for s in res.stages] == stages
    assert (res.metrics["teacher_acc"] is not None) == (recipe == "baseline-a")
    assert 0 <= res.metrics["acc"] <= 100


def test_data_free_stage_is_reused_across_targets(source_model, target, tmp_path):
    """baseline-b's data-free stage never reads the target: with `cache`, a second target with the same
    source model, student and settings reuses it (same student weights before adaptation), is counted at its
    original time, and another student or seed distils anew."""
    other = get_domain("digits", split="test", corruption="gaussian_noise", severity=3)
    kw = dict(method="baseline-b", dfkd_time_s=0.5, cache=tmp_path / "c", seed=0, **TINY, **CPU)
    first = dfkt.compress(source_model, _student(8), target, **kw)
    assert "reused" not in first.stages[0] and len(list((tmp_path / "c").glob("*.pt"))) == 1
    second = dfkt.compress(source_model, _student(8), other, **kw)
    assert second.stages[0]["reused"] and second.stages[0]["wall_s"] == first.stages[0]["wall_s"]
    assert second.wall_s >= second.stages[0]["wall_s"]
    # source-only adaptation leaves the student as distilled: both targets got the same data-free student
    assert all(torch.equal(v, second.model.state_dict()[k]) for k, v in first.model.state_dict().items())
    third = dfkt.compress(source_model, _student(16), target, **kw)
    assert "reused" not in third.stages[0] and len(list((tmp_path / "c").glob("*.pt"))) == 2
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="folder"):
        dfkt.compress(source_model, _student(8), target, **{**kw, "cache": tmp_path / "f"})


def test_bad_inputs(source_model, target, caplog):
    with pytest.raises(ModelError, match="num_classes=10"):
        dfkt.compress(source_model, _student(8, classes=7), target, **TINY, **CPU)
    images = target.tensors[0]
    no_index = [(images[i], int(target.tensors[1][i])) for i in range(8)]
    with pytest.raises(DataError, match="IndexedDataset"):
        dfkt.compress(source_model, _student(8), no_index, **TINY, **CPU)
    with pytest.raises(ConfigError, match="student_epochs"):
        dfkt.compress(source_model, _student(8), target, student_epoch=3, **CPU)
    with pytest.raises(ConfigError, match="recipe 'adapt-kd-st' options"):
        dfkt.compress(source_model, _student(8), target, train={"epochs": 3}, **CPU)
    with pytest.raises(ConfigError, match="unknown method 'shoot'"):
        dfkt.compress(source_model, _student(8), target, adapt="shoot", **CPU)
    with pytest.raises(ConfigError, match="unknown method"):
        dfkt.compress(source_model, _student(8), target, method="baseline-d", **CPU)
    # a student larger than the teacher: allowed, with a warning
    big = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 400), nn.ReLU(), nn.Linear(400, 10))
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in source_model.parameters())
    with caplog.at_level(logging.WARNING, logger="dfkt"):
        res = dfkt.compress(source_model, big, target, **TINY, **CPU)
    assert "more parameters" in caplog.text
    assert res.metrics["student_params"] > res.metrics["teacher_params"]


def test_cli_compress(source_model, tmp_path, capsys):
    from dfkt.cli import main

    src = save_model(tmp_path / "source.pt", copy.deepcopy(source_model))
    cfg = {"method": "baseline-a", "model": {"name": "shot-lenet", "num_classes": 10}, "source_model": str(src),
           "student": {"name": "digit-cnn", "kwargs": {"width": 8}},
           "target": {"domain": "digits", "split": "test", "corruption": "contrast"},
           "options": TINY, "train": {"device": "cpu", "seed": 1}, "out": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compress", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "method: baseline-a" in text and "stage distil (target-kd)" in text
    student = dfkt.load(tmp_path / "run" / "model.pt")
    assert sum(p.numel() for p in student.parameters()) == 6330
    assert (tmp_path / "run" / "teacher.pt").is_file()
    cfg["train"]["epochs"] = 3          # a per-stage setting under train: refused, naming the recipe options
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compress", str(tmp_path / "c.yaml")]) == 2
    assert "student_epochs" in capsys.readouterr().err
    del cfg["train"]["epochs"]
    cfg["studnet"] = cfg.pop("student")  # unknown key: an error naming the closest one
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compress", str(tmp_path / "c.yaml")]) == 2
    assert "'student'" in capsys.readouterr().err


def test_bench_compress_records_and_report(tmp_path):
    from dfkt.bench.runner import run_suite
    from dfkt.bench.suite import load_suite

    suite = {
        "suite": "compress-tiny", "task": "compress", "seeds": 1, "num_classes": 10,
        "source": {"model": "shot-lenet", "options": {"epochs": 1, "lr": 0.01, "batch_size": 64},
                   "train_split": "source_train", "val_split": None},
        "students": {"w4": {"model": "digit-cnn", "kwargs": {"width": 4}},
                     "w8": {"model": "digit-cnn", "kwargs": {"width": 8}}},
        "methods": {"adapt-kd-st": {"options": TINY}, "baseline-a": {"options": TINY}},
        "tasks": [{"name": f"uci->contrast {w}", "student": w, "heldout": w == "w8", "source": {"domain": "digits"},
                   "target": {"domain": "digits", "split": "test", "corruption": "contrast"}} for w in ("w4", "w8")],
    }
    path = tmp_path / "compress-tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    doc = run_suite(load_suite(str(path)), tmp_path / "out", device="cpu", progress=False)
    recs = doc["records"]
    assert len(recs) == 4
    for r in recs:
        assert r["task"] == "compress" and r["method"] in ("adapt-kd-st", "baseline-a")
        for k in ("acc", "teacher_acc", "ref_acc", "student_params", "teacher_params", "wall_s", "heldout"):
            assert r[k] is not None, k
        assert r["student_params"] < r["teacher_params"] / 4
    assert {r["student_params"] for r in recs} == {sum(p.numel() for p in _student(w).parameters()) for w in (4, 8)}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["records"]) == 4
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Floors of dfkt's recipe" in report and "| baseline-a | w8 |" in report
    assert (tmp_path / "out" / "accuracy_vs_size.png").is_file()
    with pytest.raises(ConfigError, match="needs `student:`"):
        bad = dict(suite, tasks=[dict(suite["tasks"][0], student="w99")])
        path.write_text(yaml.safe_dump(bad))
        load_suite(str(path))


def test_compress_suite_file_is_valid():
    from dfkt.bench.suite import load_suite
    from dfkt.models import build_model as bm

    s = load_suite("compress-shifts")
    shifts = {t.name: t for t in load_suite("sfda-shifts").tasks}
    assert s.defaults_only and s.seeds == 3 and len({t.student for t in s.tasks}) >= 2
    base = {t.name.rsplit(" ", 1)[0] for t in s.tasks}
    assert len(base) >= 6
    for t in s.tasks:      # every task is a task of sfda-shifts, with its held-out flag
        assert shifts[t.name.rsplit(" ", 1)[0]].heldout == t.heldout
        assert shifts[t.name.rsplit(" ", 1)[0]].target == t.target
    teacher = sum(p.numel() for p in bm(s.source.model).parameters())
    for spec in s.students.values():
        assert sum(p.numel() for p in bm(spec.model, **spec.kwargs).parameters()) <= teacher / 4
    assert set(s.methods) == {"adapt-kd-st", "baseline-a", "baseline-b", "baseline-c"}
