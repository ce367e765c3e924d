"""DFKD branch: every method end to end on the embedded digits, a learning floor, loss trends,
the data pool, feature losses, CIFAR configs/nets, and the error paths."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

import dfkt
from dfkt.api import split_options
from dfkt.core.context import Context, TrainConfig
from dfkt.core.device import model_device
from dfkt.data import get_domain
from dfkt.distill import DataPool, Generator
from dfkt.distill.lopes import record_metadata
from dfkt.errors import ConfigError, ModelError, NonFiniteError
from dfkt.models import build_model
from dfkt.registry import get_method, list_methods

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["dafl", "dfad", "rdskd", "zskt", "deepinversion", "dfq", "cmi", "fast", "lopes"]
BN_METHODS = {"deepinversion", "dfq", "cmi", "fast"}
# one tiny iteration per method (synthesis sizes cut down so the whole file stays fast)
TINY = {"epochs": 1, "iters_per_epoch": 2, "batch_size": 16, "progress": False}
TINY_OPTS = {"deepinversion": {"inv_steps": 2}, "cmi": {"g_steps": 2, "bank_size": 64}, "fast": {"g_steps": 1},
             "lopes": {"inv_steps": 2}, "zskt": {"kd_steps": 2}, "dfad": {"kd_steps": 2}, "dfq": {"kd_steps": 2}}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def digits():
    return get_domain("digits", split="train", size=32), get_domain("digits", split="test", size=32)


@pytest.fixture(scope="session")
def teachers(digits):
    """LeNet-5 and LeNet-5-BN teachers trained for a few epochs on the digits."""
    train, test = digits
    out = {}
    for name in ("lenet5", "lenet5-bn"):
        torch.manual_seed(0)
        res = dfkt.train_supervised(build_model(name), train, None, epochs=8, lr=0.05, batch_size=64,
                                    schedule="cosine", progress=False)
        out[name] = res.model.eval()
        acc = dfkt.core.evaluate.evaluate(res.model, test)["acc"]
        assert acc > 85, f"{name} teacher only reached {acc:.1f}% on the digits"
        out[name].acc = acc
    return out


@pytest.fixture(scope="session")
def metadata(teachers, digits):
    loader = torch.utils.data.DataLoader(digits[0], batch_size=256)
    return record_metadata(teachers["lenet5"], loader)


def _teacher_for(method, teachers):
    return teachers["lenet5-bn" if method in BN_METHODS else "lenet5"]


def _extra(method, metadata):
    return {"metadata": metadata} if method == "lopes" else {}


def make_method(teacher, student, method, input_shape, **options):
    """Build a method object exactly as dfkt.distill does (to call synthesize / inspect it)."""
    cls = get_method(method, task="dfkd")
    opts, tc = split_options(cls, options)
    device = model_device(teacher)       # the teachers train on DFKT_TEST_DEVICE (cuda in gpu-check.sh)
    ctx = Context(learner=student.to(device), teacher=teacher.eval(), train=tc, device=device,
                  num_classes=10, input_shape=input_shape, rng=torch.Generator().manual_seed(tc.seed))
    return cls(ctx, opts)


# ----------------------------------------------------------------------------- end to end
def test_all_methods_registered():
    assert set(METHODS) <= set(list_methods("dfkd"))


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_end_to_end(method, teachers, digits, metadata):
    res = dfkt.distill(_teacher_for(method, teachers), build_model("lenet5-half"), method=method,
                       input_shape=(1, 32, 32), num_classes=10, eval_data=digits[1], **TINY,
                       **TINY_OPTS.get(method, {}), **_extra(method, metadata))
    assert 0 <= res.acc <= 100 and res.history.records
    rec = res.history.last
    assert "kd" in rec and torch.isfinite(torch.tensor(rec["kd"]))
    imgs = res.synthesize(5)
    assert imgs.shape == (5, 1, 32, 32) and torch.isfinite(imgs).all()


def test_best_method_reaches_floor(teachers, digits):
    """DAFL with a small generator and a replay pool learns the digits from no data in seconds."""
    t = teachers["lenet5"]
    res = dfkt.distill(t, build_model("lenet5-half"), method="dafl", input_shape=(1, 32, 32),
                       eval_data=digits[1], epochs=4, iters_per_epoch=25, batch_size=64, pool_batches=50,
                       kd_steps=4, progress=False, seed=0)
    # measured ~91 % (teacher ~99 %); the floor leaves room for BLAS/thread differences
    assert res.acc >= 80.0, f"student {res.acc:.1f}% (teacher {t.acc:.1f}%)"
    first = res.history.records[0]["acc"]
    assert res.acc > first - 1.0


def test_ema_student_tracks_training_without_changing_it(teachers, digits):
    """ema > 0: training is unchanged (same losses), the deployed model is the weight average and
    as good as the trained student (the run is long enough to learn: ~70-85 % on the digits)."""
    kw = dict(method="dafl", input_shape=(1, 32, 32), eval_data=digits[1], epochs=3, iters_per_epoch=15,
              batch_size=64, pool_batches=10, kd_steps=2, g_out="bn", progress=False, seed=3)
    torch.manual_seed(0)
    plain = dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), **kw)
    torch.manual_seed(0)
    ema = dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), ema=0.9, **kw)
    # bit-identical on the CPU; CUDA's conv backward is not deterministic, so there the same within 3 %
    same = (lambda a, b: a == b) if model_device(teachers["lenet5"]).type == "cpu" else \
        (lambda a, b: a == pytest.approx(b, rel=0.03))
    assert same([r["kd"] for r in ema.history.records], [r["kd"] for r in plain.history.records])
    pw, ew = plain.model.state_dict(), ema.model.state_dict()
    assert pw.keys() == ew.keys() and any(not torch.allclose(pw[k], ew[k]) for k in pw)
    assert ema.acc > 50.0 and abs(ema.acc - plain.acc) < 10.0, (ema.acc, plain.acc)
    assert all(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ConfigError, match="ema must be in"):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), **{**kw, "ema": 1.0})


def test_mixup_mixes_pairs_reproducibly():
    from dfkt.distill.student import mix_pairs

    x = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(16)])
    a = mix_pairs(x, 1.0, torch.Generator().manual_seed(5))
    b = mix_pairs(x, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    # each output is a convex combination of two inputs: constant per image, within [0, 15]
    assert torch.all(a.amax((1, 2, 3)) == a.amin((1, 2, 3))) and a.min() >= 0 and a.max() <= 15
    assert not torch.equal(a, x)


def test_losses_decrease(teachers, digits):
    """DAFL's generator makes confident, balanced samples; DFAD's student closes the L1 gap."""
    res = dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dafl", input_shape=(1, 32, 32),
                       epochs=3, iters_per_epoch=15, batch_size=32, g_lr=0.01, progress=False)
    r = res.history.records
    # the teacher is confident on the samples (one-hot CE << log 10) and their classes are balanced
    # (information-entropy loss near its minimum -log 10 = -2.30)
    assert r[-1]["oh"] < 0.5 and r[-1]["ie"] < -1.9, r[-1]   # a single class would give 0
    # the adversarial game keeps DFAD's running loss up, so compare the student's teacher gap on the
    # generator's final samples before and after training
    torch.manual_seed(0)
    student0 = build_model("lenet5-half")
    res = dfkt.distill(teachers["lenet5"], student0, method="dfad", input_shape=(1, 32, 32),
                       epochs=3, iters_per_epoch=20, batch_size=32, kd_steps=3, progress=False)
    x = res.synthesize(256)
    student0.to(x.device)
    with torch.no_grad():
        t_logits = teachers["lenet5"].eval()(x)
        gap = lambda m: (m.eval()(x) - t_logits).abs().mean()  # noqa: E731
        assert gap(res.model) < 0.5 * gap(student0)


def test_deepinversion_bn_loss_decreases(teachers):
    m = make_method(teachers["lenet5-bn"], build_model("lenet5-half"), "deepinversion", (1, 32, 32),
                    batch_size=32, inv_steps=1)
    m.setup()
    x = torch.randn(32, 1, 32, 32, device=m.ctx.device, requires_grad=True)
    y = torch.arange(32, device=m.ctx.device) % 10
    opt = torch.optim.Adam([x], lr=0.1)
    first = None
    for _ in range(20):
        _, loss, terms = m.synth.objective(m.synth.env, x, None, y)
        first = first if first is not None else float(terms["bn"])
        m.ctx.optimize(loss, opt, terms)
    assert float(terms["bn"]) < 0.7 * first


@pytest.mark.parametrize("kind", ["at", "sp", "pkt", "rkd", "fitnet"])
def test_feature_losses(kind, teachers):
    res = dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dafl", input_shape=(1, 32, 32),
                       feature_loss=kind, feature_weight=1.0, **TINY)
    assert "feat" in res.history.last and res.history.last["feat"] >= 0


def test_feature_layers_named_and_errors(teachers):
    res = dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dfad", input_shape=(1, 32, 32),
                       feature_loss="fitnet", feature_layers=["fc", "features.4:features.4"], kd_steps=1, **TINY)
    assert "feat" in res.history.last
    with pytest.raises(ModelError, match="no module named"):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dafl", input_shape=(1, 32, 32),
                     feature_loss="sp", feature_layers=["nope"], **TINY)
    with pytest.raises(ConfigError):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dafl", input_shape=(1, 32, 32),
                     feature_loss="bogus", **TINY)


# ----------------------------------------------------------------------------- parts
def test_pool_ring_buffer_and_state():
    p = DataPool(5, (1, 4, 4), 3, torch.device("cpu"))
    p.add(torch.ones(3, 1, 4, 4), torch.zeros(3, 3))
    p.add(2 * torch.ones(4, 1, 4, 4), torch.ones(4, 3))
    assert len(p) == 5 and p.head == 2
    assert float(p.x[:2].mean()) == 2.0 and float(p.x[2].mean()) == 1.0
    q = DataPool(5, (1, 4, 4), 3, torch.device("cpu"))
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.x, p.x) and q.head == p.head and len(q) == 5
    x, t = q.sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 1, 4, 4) and t.shape == (7, 3)


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32), (1, 28, 28), (3, 64, 64)])
def test_generator_sized_to_input(shape):
    g = Generator(shape, nz=16)
    assert g(torch.randn(4, 16)).shape == (4, *shape)
    assert Generator(shape, nz=16, num_classes=10)(torch.randn(4, 16), torch.arange(4)).shape == (4, *shape)


def test_generator_is_cheap_for_lenet():
    # the published generators cost ~275 LeNet-5 forwards per image; ours about one
    lenet_macs = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 120 * 400 + 120 * 84 + 840
    assert Generator((1, 32, 32)).flops() < 2 * lenet_macs


def test_resume_restores_pool_and_generator(teachers, tmp_path, monkeypatch):
    from dfkt.distill.method import DFKDMethod

    kw = dict(method="dafl", input_shape=(1, 32, 32), pool_batches=3, kd_steps=2, batch_size=16, epochs=2,
              iters_per_epoch=3, progress=False, seed=1, checkpoint_dir=str(tmp_path))
    torch.manual_seed(0)
    student = build_model("lenet5-half")
    full = dfkt.distill(teachers["lenet5"], student, **{**kw, "checkpoint_dir": str(tmp_path / "full")})

    def crash(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(DFKDMethod, "epoch_begin", crash)
    with pytest.raises(KeyboardInterrupt):
        dfkt.distill(teachers["lenet5"], student, **kw)
    monkeypatch.undo()
    resumed = dfkt.distill(teachers["lenet5"], student, resume=True, **kw)
    assert resumed.history.resumed_from_epoch == 1
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_time_schedule_continues_after_resume(teachers, tmp_path, monkeypatch):
    """With a time budget, the lr schedule follows the loop's training time; a resumed run must continue
    from the time already spent (not restart the cosine at the top)."""
    import types

    import dfkt.core.context as context_mod
    import dfkt.core.loop as loop_mod
    from dfkt.core.checkpoint import read_checkpoint
    from dfkt.distill.method import DFKDMethod
    from dfkt.distill.student import StudentLearner

    ticks = {"t": 0.0}

    def fake_clock():           # every reading of the training clock advances it by 1 s
        ticks["t"] += 1.0
        return ticks["t"]

    clock = types.SimpleNamespace(perf_counter=fake_clock)
    monkeypatch.setattr(loop_mod, "time", clock)
    monkeypatch.setattr(context_mod, "time", clock)
    kw = dict(method="dafl", input_shape=(1, 32, 32), batch_size=16, epochs=3, iters_per_epoch=2,
              progress=False, seed=1, checkpoint_dir=str(tmp_path), time_budget_s=1e6)
    seen: list[float] = []
    real_progress = StudentLearner.progress

    def spy(self):
        seen.append(self.ctx.elapsed_s())
        return real_progress(self)

    def crash(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(StudentLearner, "progress", spy)
    monkeypatch.setattr(DFKDMethod, "epoch_begin", crash)
    with pytest.raises(KeyboardInterrupt):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), **kw)
    spent = read_checkpoint(tmp_path / "resume.pt")["train_time_s"]
    assert spent >= 4 and seen == sorted(seen)
    monkeypatch.setattr(DFKDMethod, "epoch_begin", lambda self, epoch: None)
    seen.clear()
    dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), resume=True, **kw)
    assert seen[0] > spent, f"the resumed schedule restarted its clock ({seen[0]} s <= {spent} s already spent)"


# ----------------------------------------------------------------------------- errors
def test_class_count_mismatch(teachers):
    with pytest.raises(ModelError, match="classes"):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half", num_classes=5), method="dafl",
                     input_shape=(1, 32, 32), **TINY)


def test_input_shape_teacher_cannot_take(teachers):
    with pytest.raises(ModelError, match="input_shape"):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dafl", input_shape=(3, 64, 64), **TINY)


@pytest.mark.parametrize("method", sorted(BN_METHODS))
def test_bn_method_on_bn_free_teacher(method, teachers):
    with pytest.raises(ModelError, match="BatchNorm"):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method=method, input_shape=(1, 32, 32), **TINY)


def test_lopes_without_metadata(teachers):
    with pytest.raises(ConfigError, match="record_metadata"):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="lopes", input_shape=(1, 32, 32), **TINY)


def test_nan_generator_loss_skipped_then_fatal(teachers, monkeypatch, caplog):
    from dfkt.distill import dafl as dafl_mod   # (dfkt.distill is also the API function)

    real = dafl_mod.class_balance
    calls = {"n": 0}

    def once_nan(logits):
        calls["n"] += 1
        out = real(logits)
        return out * float("nan") if calls["n"] == 1 else out

    monkeypatch.setattr(dafl_mod, "class_balance", once_nan)
    res = dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dafl", input_shape=(1, 32, 32),
                       epochs=1, iters_per_epoch=3, batch_size=16, progress=False)
    assert res.history.last["skipped_steps"] == 1
    assert "non-finite" in caplog.text

    monkeypatch.setattr(dafl_mod, "class_balance", lambda logits: real(logits) * float("nan"))
    with pytest.raises(NonFiniteError, match="consecutive"):
        dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="dafl", input_shape=(1, 32, 32),
                     epochs=1, iters_per_epoch=10, batch_size=16, max_bad_steps=3, progress=False)


# ----------------------------------------------------------------------------- CIFAR configs and nets
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_configs_parse(name):
    cfg = yaml.safe_load((ROOT / "configs" / "dfkd" / f"{name}.yaml").read_text())
    assert cfg["task"] == "dfkd" and cfg["teacher"]["name"] == "resnet34-cifar"
    assert cfg["student"]["name"] == "resnet18-cifar" and cfg["input_shape"] == [3, 32, 32]
    n = cfg["num_classes"]
    assert cfg["teacher"]["num_classes"] == n == (10 if name == "cifar10" else 100)
    from dfkt.runconfig import parse

    run = parse("distill", cfg)
    cls = get_method(run.method, task="dfkd")
    opts, tc = split_options(cls, run.options, run.train)
    assert dataclasses.is_dataclass(opts) and isinstance(tc, TrainConfig)
    # the alternatives documented in the header parse as well
    text = (ROOT / "configs" / "dfkd" / f"{name}.yaml").read_text()
    for m, o, t in re.findall(r"#   (\w+) \(.*?\n#\s+options: (\{.*?\})\n#\s+train: (\{.*?\})", text, re.S):
        o = yaml.safe_load(re.sub(r"\n#\s+", " ", o))
        split_options(get_method(m, task="dfkd"), o, yaml.safe_load(t))


CIFAR_TINY = {"epochs": 1, "iters_per_epoch": 1, "batch_size": 4, "progress": False}
CIFAR_OPTS = {"deepinversion": {"inv_steps": 1}, "cmi": {"g_steps": 1, "bank_size": 16}, "fast": {"g_steps": 1},
              "lopes": {"inv_steps": 1}, "zskt": {"kd_steps": 1}, "dfad": {"kd_steps": 1}, "dfq": {"kd_steps": 1}}


@pytest.mark.parametrize("method", METHODS)
def test_one_step_wrn(method):
    torch.manual_seed(0)
    t, s = build_model("wrn-16-1").eval(), build_model("wrn-16-1")
    extra = {}
    if method == "lopes":
        data = [(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)]
        extra["metadata"] = record_metadata(t, data)
    res = dfkt.distill(t, s, method=method, input_shape=(3, 32, 32), num_classes=10, **CIFAR_TINY,
                       **CIFAR_OPTS.get(method, {}), **extra)
    assert res.history.last["step"] == 1


def test_one_step_resnet34_to_resnet18():
    torch.manual_seed(0)
    t, s = build_model("resnet34-cifar").eval(), build_model("resnet18-cifar")
    res = dfkt.distill(t, s, method="fast", input_shape=(3, 32, 32), num_classes=10, **CIFAR_TINY, g_steps=1,
                       kd_steps=1)
    assert res.history.last["step"] == 1 and "kd" in res.history.last


@pytest.mark.parametrize("name,budget", [("dfkd-mnist", 360), ("dfkd-color", 600)])
def test_dfkd_suites_run_every_method_at_its_defaults(name, budget):
    """The suites list every DFKD method with no options: what they report is what
    dfkt.distill(teacher, student, method=m, input_shape=..., time_budget_s=...) runs."""
    from dfkt.bench.suite import load_suite

    suite = load_suite(name)
    suite.validate()
    assert suite.task == "dfkd" and suite.seeds == 3 and suite.defaults_only
    assert set(METHODS) | {"dafl+adv"} == {run.method or name for name, run in suite.methods.items()}
    for label, run in suite.methods.items():
        assert run.method is None and not run.options and set(run.train) == {"time_budget_s"}, label
        assert run.train["time_budget_s"] <= budget
        cls = get_method(label, task="dfkd")
        if cls.needs_teacher_bn:
            model = build_model(suite.teachers[run.teacher].model)
            assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), label
    assert len(suite.quick.methods) == 2 and suite.quick.seeds == 1
    if name == "dfkd-color":
        assert suite.input_shape == [3, 32, 32] and suite.tasks[0].source.domain == "colormnist"
        t, s = (sum(p.numel() for p in build_model(m).parameters())
                for m in (suite.teachers["wrn-16-2"].model, suite.student))
        assert s < t / 2


def test_defaults_only_dfkd_suite_takes_only_the_run_length():
    from dfkt.bench.suite import Suite
    from dfkt.config import from_dict

    base = yaml.safe_load((ROOT / "benchmarks" / "dfkd-mnist.yaml").read_text())
    from_dict(Suite, base, "suite").validate()
    for bad in ({"options": {"adv": 1.0}}, {"train": {"time_budget_s": 10, "lr": 0.01}}):
        doc = {**base, "methods": {**base["methods"], "dafl": {"teacher": "lenet5", **bad}}}
        with pytest.raises(ConfigError, match="registered defaults"):
            from_dict(Suite, doc, "suite").validate()
    doc = {**base, "quick": {**base["quick"], "overrides": {"dfad": {"options": {"kd_steps": 1}}}}}
    with pytest.raises(ConfigError, match="quick.overrides"):
        from_dict(Suite, doc, "suite").validate()


def test_budgeted_run_length_rule():
    """With a time budget and no epochs, epochs is only an upper bound (the budget ends the run);
    without one the method's own epochs; an explicit value always wins."""
    from dfkt.distill.method import BUDGETED_EPOCHS

    cls = get_method("dafl", task="dfkd")
    assert split_options(cls, {})[1].epochs == cls.defaults["epochs"] == 20
    assert split_options(cls, {"time_budget_s": 60})[1].epochs == BUDGETED_EPOCHS
    assert split_options(cls, {"time_budget_s": 60, "epochs": 3})[1].epochs == 3
    opts, tc = split_options(get_method("dafl+adv", task="dfkd"), {})
    assert opts.adv == 3.0 and opts.g_out == "tanh" and opts.pool_batches == 200 and opts.kd_steps == 6
    assert split_options(get_method("dafl", task="dfkd"), {})[0].adv == 0.0
    opts, tc = split_options(get_method("zskt", task="dfkd"), {})
    assert opts.optimizer == "adam" and tc.lr == 0.002


def test_lopes_metadata_from_domain_spec(teachers, digits):
    res = dfkt.distill(teachers["lenet5"], build_model("lenet5-half"), method="lopes", input_shape=(1, 32, 32),
                       metadata={"domain": "digits", "split": "train", "size": 32}, inv_steps=2, **TINY)
    assert "match" in res.history.last
