"""DFKD from parts: each synthesizer alone (shapes, state round-trip, determinism, g_steps), the student
learner driven by a fake synthesizer, kill/resume of a generator and a pixel-optimisation method, and the
package's shape (file sizes). Teachers are untrained (seeded) nets: nothing here needs accuracy."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import dfkt
from dfkt.api import split_options
from dfkt.core.context import Context
from dfkt.core.loop import fit
from dfkt.distill import DFKD, DistillOptions, GeneratorSynthesizer, LatentSynthesizer, PixelSynthesizer, SynthEnv
from dfkt.distill.lopes import record_metadata
from dfkt.distill.method import DFKDMethod
from dfkt.models import build_model
from dfkt.registry import get_method
from helpers.harness import assert_same_weights, kill_and_resume

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 32, 32)
BN_METHODS = {"deepinversion", "dfq", "cmi", "fast"}
# (method, options): every method's synthesizer, cut down to a few steps
CASES = [("dafl", {"adv": 1.0}), ("dfad", {}), ("rdskd", {}), ("zskt", {"g_steps": 2}),
         ("dfq", {"g_steps": 2, "conditional": True}), ("cmi", {"g_steps": 2, "bank_size": 24}),
         ("cmi", {"g_steps": 2, "bank_size": 24, "init": "meta"}),
         ("fast", {"g_steps": 2}), ("deepinversion", {"inv_steps": 2}),
         ("deepinversion", {"inv_steps": 2, "pixels": 24, "adi": 1.0}), ("lopes", {"inv_steps": 2})]
KINDS = {"dafl": GeneratorSynthesizer, "dfad": GeneratorSynthesizer, "rdskd": GeneratorSynthesizer,
         "zskt": GeneratorSynthesizer, "dfq": GeneratorSynthesizer, "cmi": LatentSynthesizer,
         "fast": LatentSynthesizer, "deepinversion": PixelSynthesizer, "lopes": PixelSynthesizer}


def _teacher(method: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5-bn" if method in BN_METHODS else "lenet5").eval()


def _options(method: str, teacher: nn.Module, **kw):
    if method == "lopes":
        g = torch.Generator().manual_seed(0)
        kw["metadata"] = record_metadata(teacher, [(torch.randn(40, *SHAPE, generator=g), torch.arange(40) % 10)])
    return split_options(get_method(method, task="dfkd"), {"batch_size": 8, "epochs": 1, "iters_per_epoch": 1,
                                                           **kw})


def _synth(method: str, kw: dict, seed: int = 0, rng_seed: int = 1):
    """The method's synthesizer, set up alone: a SynthEnv with a (seeded) student, no learner, no method."""
    teacher = _teacher(method)
    opts, tc = _options(method, teacher, **kw)
    torch.manual_seed(0)
    student = build_model("lenet5-half")     # the same student: adversarial objectives read it
    torch.manual_seed(seed)                  # the synthesizer's own initial weights
    ctx = Context(learner=student, teacher=teacher, train=tc, device=torch.device("cpu"), num_classes=10,
                  input_shape=SHAPE, rng=torch.Generator().manual_seed(rng_seed))
    env = SynthEnv(ctx=ctx, teacher=teacher, student=student, learner=student, opts=opts, batch=8, method=method,
                   progress=lambda: 0.0, lr_factor=lambda p, warmup=True: 1.0, discard_student_grads=lambda: None)
    synth = get_method(method, task="dfkd").synthesizer(opts)
    synth.setup(env)
    return synth


def _run(synth, seed: int):
    torch.manual_seed(seed)       # generators built per batch (cmi) draw their weights from torch's RNG
    x, t, terms = synth.synthesize()
    return x.detach().clone(), t.detach().clone(), {k: v.clone() for k, v in terms.items()}


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}{'-pixels' if 'pixels' in k else ''}" for m, k in CASES])
def test_synthesizer_alone(method, kw):
    synth = _synth(method, kw)
    assert isinstance(synth, KINDS[method])
    x, t, terms = _run(synth, 5)
    assert x.shape == (8, *SHAPE) and t.shape == (8, 10)
    assert terms and all(torch.isfinite(v).all() for v in terms.values()), terms
    imgs = synth.images(3)
    assert imgs is None or (imgs.shape == (3, *SHAPE) and torch.isfinite(imgs).all())
    # determinism: the same seeds give the same batches
    again = _synth(method, kw)
    for a, b in zip(_run(again, 5)[:2], (x, t)):
        assert torch.equal(a, b)
    # state round-trip: a synthesizer built from other seeds, given the first one's state (and RNG), continues
    # exactly as the first one does
    other = _synth(method, kw, seed=7, rng_seed=9)
    other.load_state_dict(copy.deepcopy(synth.state_dict()))      # (a checkpoint holds copies)
    other.env.ctx.rng.set_state(synth.env.ctx.rng.get_state())
    for seed in (11, 12):         # the second batch also shows the first one's update
        a, b = _run(synth, seed), _run(other, seed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2]), (a[2], b[2])


def test_every_generator_method_takes_g_steps_generator_steps():
    for method in ("dafl", "dfad", "rdskd", "zskt", "dfq"):
        synth = _synth(method, {"g_steps": 3})
        synth.synthesize()
        steps = {int(s["step"]) for s in synth.g_opt.state.values()}
        assert steps == {3}, (method, steps)
    fast = _synth("fast", {"g_steps": 3})       # the meta generator steps once per batch
    fast.synthesize()
    assert {int(s["step"]) for s in fast.g_opt.state.values()} == {1}


def test_persistent_pixels_go_round_robin():
    synth = _synth("deepinversion", {"inv_steps": 1, "pixels": 20})
    store = synth.store
    before = store.data["x"].clone()
    synth.synthesize()
    assert len(store) == 8 and store.head == 8
    assert not torch.equal(store.data["x"][:8], before[:8]) and torch.equal(store.data["x"][8:], before[8:])
    synth.synthesize()
    synth.synthesize()                          # 24 rows written into 20: wraps to the start
    assert len(store) == 20 and store.head == 4


# ----------------------------------------------------------------------------- the student learner
class FixedNoise:
    """A fake synthesizer: fresh N(0, 1) images and the teacher's logits on them, no optimisation."""

    store = None

    def setup(self, env: SynthEnv) -> None:
        self.env = env
        self.calls = 0

    def synthesize(self):
        self.calls += 1
        x = torch.randn((self.env.batch, *SHAPE), generator=self.env.rng)
        with torch.no_grad():
            return x, self.env.teacher(x), {"calls": torch.tensor(float(self.calls))}

    def sample(self, n):
        return None

    def images(self, n):
        return None

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def _agreement(student: nn.Module, teacher: nn.Module) -> float:
    x = torch.randn((512, *SHAPE), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float((student.eval()(x).argmax(1) == teacher(x).argmax(1)).float().mean())


@pytest.mark.parametrize("kw", [{}, {"pool_batches": 4, "kd_steps": 2, "ema": 0.9}])
def test_student_learner_matches_a_fixed_teacher_from_a_fake_synthesizer(kw):
    """The one DFKD method type, configured with a fake synthesizer: the KD loss falls and the student
    agrees with the teacher far more often than before training."""
    spec = DFKD("Fake (dfkt): fixed noise", Options=DistillOptions, synthesizer=lambda o: FixedNoise(),
                module=__name__)
    torch.manual_seed(0)
    # a fixed teacher whose classes vary on noise (a linear map of 4x4 block means) and a student able to
    # match it: the test is about the learner, not about a network's capacity
    teacher = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        teacher[2].weight.mul_(40)
    student = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    before = _agreement(student, teacher)
    opts, tc = split_options(spec, {"epochs": 4, "iters_per_epoch": 25, "batch_size": 64, "lr": 0.01,
                                    "optimizer": "adam", "progress": False, **kw})
    ctx = Context(learner=student, teacher=teacher, train=tc, device=torch.device("cpu"), num_classes=10,
                  input_shape=SHAPE, rng=torch.Generator().manual_seed(0))
    method = spec(ctx, opts)
    assert type(method) is DFKDMethod
    hist = fit(method)
    kd = [r["kd"] for r in hist.records]
    assert kd[-1] < 0.3 * kd[0], kd
    assert method.synth.calls == 4 * 25 and hist.records[-1]["calls"] > 0     # one synthesis per iteration
    if kw.get("pool_batches"):
        assert len(method.learner.pool) == 4 * 64 and method.model() is not student  # the EMA copy is deployed
    after = _agreement(method.model(), teacher)
    assert after > before + 0.5 and after > 0.7, (before, after)     # measured 0.07 -> 0.86


# ----------------------------------------------------------------------------- kill and resume
@pytest.mark.parametrize("method,kw", [("dfad", {"kd_steps": 2}),
                                       ("deepinversion", {"inv_steps": 2, "pixels": 48, "kd_steps": 2}),
                                       ("fast", {"g_steps": 1, "pool_batches": 3, "kd_steps": 1})])
def test_kill_and_resume_gives_the_uninterrupted_run(method, kw, tmp_path, monkeypatch):
    """A generator method (dfad; fast: meta generator, BN momentum and pool) and a pixel-optimisation method
    (deepinversion's persistent pixels with per-image Adam) killed after epoch 1 and resumed end with the
    weights and the history of the uninterrupted run."""
    teacher = _teacher(method)
    run = dict(method=method, input_shape=SHAPE, epochs=2, iters_per_epoch=2, batch_size=16, seed=3,
               progress=False, **kw)

    def student():
        torch.manual_seed(1)
        return build_model("lenet5-half")

    full, res = kill_and_resume(lambda **more: dfkt.distill(teacher, student(), **run, **more), DFKDMethod, tmp_path,
                                monkeypatch)
    assert len(res.history.records) == 2
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(res.history.records) == strip(full.history.records)
    assert_same_weights(full.model, res.model, atol=1e-6)


# ----------------------------------------------------------------------------- the package's shape
def test_distill_files_are_small_and_methods_are_configured_not_subclassed():
    for path in sorted((ROOT / "dfkt" / "distill").glob("*.py")):
        n = len(path.read_text().splitlines())
        assert n <= 250, f"{path.relative_to(ROOT)} has {n} lines (> 250): split it"
    for name in dfkt.list_methods("dfkd"):
        spec = get_method(name, task="dfkd")
        assert isinstance(spec, DFKD), name
        base = name.split("+")[0]         # a named variant (dafl+adv) lives in its method's file
        assert spec.__module__ == f"dfkt.distill.{base}" and spec.__doc__.startswith(spec.summary)
    src = "\n".join(p.read_text() for p in (ROOT / "dfkt" / "distill").glob("*.py"))
    assert "(DFKDMethod)" not in src and "(Method)" in src    # only DFKDMethod derives from the core's Method
