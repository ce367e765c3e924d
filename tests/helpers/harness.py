"""Harnesses several test files share: kill a run part-way and resume it, run a tiny bench suite, and the
digits source model most SFDA tests adapt.

    from helpers.harness import kill_and_resume, assert_same_weights, run_suite, publish_section, digits_source
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml


class Killed(Exception):
    """Raised inside the run to simulate a crash."""


def kill_and_resume(run: Callable[..., Any], cls: type, checkpoint_dir: Path | str, monkeypatch,
                    at_epoch: int = 1) -> tuple[Any, Any]:
    """Run ``run()`` to the end; run it again with ``checkpoint_dir`` and kill it when ``cls.epoch_begin``
    starts epoch ``at_epoch`` (the resume checkpoint of the epochs before is on disk); then resume it.

    ``run(**kw)`` starts the run (e.g. ``lambda **kw: dfkt.adapt(model, target, **common, **kw)``); it is
    called with no keywords, then with ``checkpoint_dir=...``, then with ``checkpoint_dir=..., resume=True``.
    ``cls``: the method class (its ``epoch_begin`` is patched only while the killed run goes).
    Returns (the uninterrupted result, the resumed result).
    """
    full = run()
    orig = cls.epoch_begin

    def die(self, epoch):
        if epoch == at_epoch:
            raise Killed
        return orig(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(cls, "epoch_begin", die)
        with pytest.raises(Killed):
            run(checkpoint_dir=str(checkpoint_dir))
    resumed = run(checkpoint_dir=str(checkpoint_dir), resume=True)
    assert resumed.history.resumed_from_epoch == at_epoch
    return full, resumed


def assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict, atol: float = 1e-5) -> None:
    """Every floating entry of the two state dicts (or models) agrees within ``atol``; same keys."""
    sa = a.state_dict() if isinstance(a, torch.nn.Module) else a
    sb = b.state_dict() if isinstance(b, torch.nn.Module) else b
    assert list(sa) == list(sb)
    for k, v in sa.items():
        if v.is_floating_point():
            assert torch.allclose(v.float(), sb[k].float(), atol=atol), k
        else:
            assert torch.equal(v, sb[k]), k


def run_suite(tmp_path: Path, suite: dict, *args: str, out: Path | None = None) -> tuple[dict, Path]:
    """Write ``suite`` as YAML under ``tmp_path``, run ``dfkt bench`` on it (quiet, no progress, extra
    ``args``) and return (results.json, the output folder). The command must succeed."""
    from dfkt.cli import main

    path = tmp_path / f"{suite['suite']}.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    out = out if out is not None else tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out), "--no-progress", "-q", *args]) == 0
    return json.loads((out / "results.json").read_text()), out


def publish_section(tmp_path: Path, doc: dict, out: Path) -> str:
    """Publish ``doc`` into a fresh RESULTS.md under ``tmp_path``; returns its text, after checking that
    the suite's section and its results.json copy are there."""
    from dfkt.bench.report import publish

    md = tmp_path / "RESULTS.md"
    publish(doc, out, md)
    text = md.read_text()
    assert f"<!-- suite:{doc['suite']} -->" in text
    assert (tmp_path / "results" / doc["suite"] / "results.json").exists()
    return text


@functools.cache
def digits_source():
    """shot-lenet trained once per test session on 90 % of the UCI digits (SHOT's recipe, 6 epochs, seed 0):
    the training result (``.model`` in eval mode). Tests must not modify the model (dfkt.adapt copies it)."""
    import dfkt
    from dfkt.data import get_domain
    from dfkt.models import build_model
    torch.manual_seed(0)
    model = build_model("shot-lenet", num_classes=10)
    res = dfkt.train_supervised(model, get_domain("digits", split="source_train"),
                                get_domain("digits", split="source_val"), smoothing=0.1, epochs=6, lr=0.01,
                                batch_size=64, seed=0, device="cpu", progress=False)
    res.model.eval()
    return res
