"""The data-based SFDA methods (family ``reconstruction``): each adapts better than the source model on the
embedded digits, reconstructs with DFKD's synthesizers (not a copy of them), and resumes exactly.

Runs without /work/shared: source = the embedded UCI digits (28x28), target = a contrast-shifted copy.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dfkt
from dfkt.core.evaluate import evaluate
from dfkt.core.hooks import BNStatsRecorder
from dfkt.data import get_domain
from dfkt.distill.generative import GeneratorSynthesizer
from dfkt.distill.pixels import PixelSynthesizer
from dfkt.models import build_model
from dfkt.registry import get_method
from helpers.harness import assert_same_weights, kill_and_resume, digits_source

CPU = {"device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def source_model() -> nn.Module:
    """shot-lenet trained on 90 % of the UCI digits (SHOT's recipe, 6 epochs), as in test_sfda."""
    return digits_source().model


@pytest.fixture(scope="module")
def target():
    return get_domain("digits", split="test", corruption="contrast", severity=3)   # source-only ~75 %


@pytest.fixture(scope="module")
def source_acc(source_model, target) -> float:
    return evaluate(source_model, target, torch.device("cpu"))["acc"]


def _spy(monkeypatch, cls, name: str) -> list:
    """Count the calls of ``cls.name`` (the real method still runs)."""
    calls: list = []
    orig = getattr(cls, name)

    def wrapped(self, *a, **k):
        calls.append(self)
        return orig(self, *a, **k)
    monkeypatch.setattr(cls, name, wrapped)
    return calls


def test_reconstruction_family_reuses_the_dfkd_synthesizers():
    from dfkt.sfda import impressions, reconstruction, threec_gan
    from dfkt import distill

    assert {n for n in dfkt.list_methods("sfda", family="reconstruction")} >= {"impressions", "3c-gan"}
    assert impressions.PixelSynthesizer is distill.pixels.PixelSynthesizer
    assert threec_gan.GeneratorSynthesizer is distill.generative.GeneratorSynthesizer
    assert reconstruction.SynthEnv is distill.synthesis.SynthEnv


def test_impressions_improves_over_source_only(source_model, target, source_acc, monkeypatch):
    synth = _spy(monkeypatch, PixelSynthesizer, "synthesize")
    bn = _spy(monkeypatch, BNStatsRecorder, "loss")
    res = dfkt.adapt(source_model, target, method="impressions", epochs=4, **CPU)
    assert res.acc >= source_acc + 10, (res.acc, source_acc)        # measured 74.7 -> 94 (6 epochs)
    # the impressions came from DFKD's pixel synthesizer and the core's BN hook, before adapting only
    assert len(synth) == 2 and len(bn) == 2 * 40
    last = res.history.last
    assert last["imp_agree"] > 0.9 and last["imp"] < 0.1              # the source calls them their class
    assert not res.guard["fired"]


def test_threec_gan_improves_over_source_only(source_model, target, source_acc, monkeypatch):
    synth = _spy(monkeypatch, GeneratorSynthesizer, "synthesize")
    res = dfkt.adapt(source_model, target, method="3c-gan", epochs=4, g_warmup=100, **CPU)
    assert res.acc >= source_acc + 5, (res.acc, source_acc)
    steps = res.history.last["step"]
    assert len(synth) == 100 + steps                  # the warm-up, then one generator round per adaptation step
    assert res.history.last["gen_agree"] > 0.3        # the generator draws images of the classes it is asked for
    assert {"gen", "wreg", "clu", "sem", "g_adv", "d"} <= set(res.history.last)
    assert not res.guard["fired"]


@pytest.mark.parametrize("method", ["impressions", "3c-gan"])
def test_reconstruction_resume_is_exact(method, source_model, target, tmp_path, monkeypatch):
    """The impressions pool / the generator, its discriminator and their optimisers are tracked: a run killed
    after epoch 1 and resumed ends with the same weights."""
    kw = dict(method=method, epochs=2, **({"g_warmup": 20} if method == "3c-gan" else {}), **CPU)
    full, res = kill_and_resume(lambda **more: dfkt.adapt(source_model, target, **kw, **more), get_method(method),
                                tmp_path, monkeypatch)
    assert len(res.history.records) == 2
    assert_same_weights(full.model, res.model)
