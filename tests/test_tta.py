"""Online test-time adaptation (dfkt.tta): predict-before-update order, determinism, resume in the
middle of a stream, batch size 1, protocols and clear errors."""
import json

import pytest
import torch
import yaml
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import dfkt
from dfkt.data import get_domain
from dfkt.errors import ConfigError, DataError, ModelError
from dfkt.models import build_model
from dfkt.online import Stream
from dfkt.registry import get_method, list_methods
from helpers.harness import publish_section, run_suite

METHODS = ["source", "bn", "tent", "eata", "sar", "cotta", "rotta", "roid", "deyo"]
# small-stream settings: RoTTA updates every 16 samples, CoTTA averages 4 views, SAR never resets
FAST = {"cotta": {"augmentations": 4}, "rotta": {"update_frequency": 16, "memory_size": 16},
        "sar": {"reset_constant": 0.0}, "deyo": {"plpd": 0.0}}


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(0)
    train = get_domain("digits", split="train", size=32)
    res = dfkt.train_supervised(build_model("lenet5-bn"), train, None, epochs=3, lr=0.02, batch_size=64,
                                smoothing=0.1, schedule="poly", progress=False, device="cpu", seed=0)
    return res.model.eval()


def corrupted(c, n=None):
    ds = get_domain("digits", split="test", size=32, corruption=c, severity=5)
    return ds if n is None else ds.subset(range(n))


@pytest.fixture(scope="module")
def segments():
    return {"gaussian_noise": corrupted("gaussian_noise", 96), "contrast": corrupted("contrast", 96)}


class GNNet(nn.Module):
    """A BatchNorm-free classifier (GroupNorm): batch size 1 works for every method that trains norm layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 5), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 5), nn.GroupNorm(4, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def run(model, stream, method, **kw):
    opts = {**FAST.get(method, {}), "batch_size": 32, "progress": False, "device": "cpu", **kw}
    return dfkt.tta(model, stream, method=method, **opts)


def test_all_methods_are_registered_for_tta():
    assert set(METHODS) <= set(list_methods("tta"))
    assert get_method("tent", task="tta") is not get_method("tent", task="sfda")   # one name, two tasks
    with pytest.raises(ConfigError, match="tasks sfda, tta"):
        get_method("tent")


class PoisonAfterStep:
    """Once armed, every optimiser step is followed by NaN weights: whatever a method predicts after
    an update of the armed batch is garbage."""

    def __init__(self):
        self.armed, self.fired = False, 0

    def __call__(self, optimizer, args, kwargs):
        if self.armed:
            self.fired += 1
            with torch.no_grad():
                for g in optimizer.param_groups:
                    for p in g["params"]:
                        p.fill_(float("nan"))


class ArmedStream(Stream):
    """Arms the poison when the last batch is fetched (i.e. after every update of the batches before)."""

    def __init__(self, *a, poison=None, last=None, **k):
        super().__init__(*a, **k)
        self.poison, self.last = poison, last

    def fetch(self, start, end, device):
        if self.poison is not None and start == self.last:
            self.poison.armed = True
        return super().fetch(start, end, device)


@pytest.mark.parametrize("method", METHODS)
def test_each_batch_is_scored_before_the_update_on_it(source_model, method):
    """NaN the weights right after every optimiser step on the last batch: its predictions must not change
    (they were made before), while a method that scored after its update would predict garbage."""
    data = {"gaussian_noise": corrupted("gaussian_noise", 128)}
    clean = run(source_model, ArmedStream(data, shuffle=False), method)
    poison = PoisonAfterStep()
    handle = register_optimizer_step_post_hook(poison)
    try:
        poisoned = run(source_model, ArmedStream(data, shuffle=False, poison=poison, last=96), method,
                       max_bad_steps=100)
    finally:
        handle.remove()
    assert torch.equal(clean.predictions, poisoned.predictions)
    if get_method(method, task="tta").adapts:
        assert poison.fired > 0, "the method took no step on the last batch: the check would prove nothing"
    else:
        assert poison.fired == 0


def test_the_order_check_catches_a_method_that_scores_after_updating(source_model, monkeypatch):
    """The check above fails for a Tent that returns the logits of a second pass after its step."""
    from dfkt import registry
    from dfkt.online.tent import Tent

    class Late(Tent):
        def step(self, batch):
            out = self.forward(batch.x)
            self.adapt(batch.x, out)
            self.predictions[batch.idx] = self.ctx.learner(batch.x).argmax(1)   # scored after the update
            return {}

    Late.name, Late.task = "tent-late", "tta"
    monkeypatch.setitem(registry._METHODS, ("tta", "tent-late"), Late)
    data = {"gaussian_noise": corrupted("gaussian_noise", 128)}
    clean = run(source_model, ArmedStream(data, shuffle=False), "tent-late")
    poison = PoisonAfterStep()
    handle = register_optimizer_step_post_hook(poison)
    try:
        poisoned = run(source_model, ArmedStream(data, shuffle=False, poison=poison, last=96), "tent-late",
                       max_bad_steps=100)
    finally:
        handle.remove()
    assert torch.equal(clean.predictions[:96], poisoned.predictions[:96])
    assert not torch.equal(clean.predictions[96:], poisoned.predictions[96:])


@pytest.mark.parametrize("method", ["cotta", "rotta", "roid", "deyo"])
def test_one_stream_is_deterministic(source_model, segments, method):
    a = run(source_model, segments, method, seed=3)
    b = run(source_model, segments, method, seed=3)
    assert torch.equal(a.predictions, b.predictions)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    c = run(source_model, segments, method, seed=4)          # another seed: another stream order
    assert not torch.equal(a.predictions, c.predictions)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["tent", "sar", "cotta", "rotta", "eata"])
def test_resume_in_the_middle_of_a_stream_is_exact(source_model, segments, method, tmp_path, monkeypatch):
    full = run(source_model, segments, method, seed=1, chunk_batches=2, source_data=corrupted(None, 64))
    ck = tmp_path / "ck"
    real = Stream.fetch
    calls = {"n": 0}

    def crash(self, start, end, device):
        calls["n"] += 1
        if calls["n"] == 6:   # (call 1 reads the sample shape) the 2nd batch of chunk 3: chunks 1-2 are saved
            raise Interrupt
        return real(self, start, end, device)

    monkeypatch.setattr(Stream, "fetch", crash)
    with pytest.raises(Interrupt):
        run(source_model, segments, method, seed=1, chunk_batches=2, checkpoint_dir=str(ck),
            source_data=corrupted(None, 64))
    monkeypatch.setattr(Stream, "fetch", real)
    assert (ck / "resume.pt").exists()
    resumed = run(source_model, segments, method, seed=1, chunk_batches=2, checkpoint_dir=str(ck), resume=True,
                  source_data=corrupted(None, 64))
    assert resumed.history.resumed_from_epoch == 2
    assert torch.equal(full.predictions, resumed.predictions)
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(dfkt.CheckpointError, match="another configuration"):
        run(source_model, segments, method, seed=1, chunk_batches=2, checkpoint_dir=str(ck), resume=True,
            lr=0.5, source_data=corrupted(None, 64))


def test_batch_size_one(source_model, segments):
    small = {k: v.subset(range(24)) for k, v in segments.items()}
    # sample-size independent on a BatchNorm model: source and RoTTA (robust BN)
    for method in ("source", "rotta"):
        res = run(source_model, small, method, batch_size=1)
        assert len(res.batches) == 48 and (res.predictions >= 0).all()
    src = run(source_model, small, "source", batch_size=1)
    assert torch.equal(src.predictions, run(source_model, small, "source", batch_size=16).predictions)
    # test-batch statistics need two samples: a clear error, before any step
    for method in ("bn", "tent", "eata", "sar", "cotta", "roid", "deyo"):
        with pytest.raises(ConfigError, match="at least 2 samples per batch"):
            run(source_model, small, method, batch_size=1)
    # a BatchNorm-free model takes batch size 1 with every method that trains norm layers
    gn = GNNet()
    for method in ("tent", "eata", "sar", "cotta", "rotta", "roid", "deyo"):
        res = run(gn, small, method, batch_size=1)
        assert (res.predictions >= 0).all() and torch.isfinite(
            torch.stack([p.float().sum() for p in res.model.parameters()])).all()
    with pytest.raises(ModelError, match="no BatchNorm layers"):
        run(gn, small, "bn", batch_size=1)


def test_tent_on_a_stream_adapts_and_beats_the_source(source_model):
    data = {"contrast": corrupted("contrast")}
    src, tent = run(source_model, data, "source"), run(source_model, data, "tent")
    assert tent.err < src.err - 20          # contrast at severity 5: BN statistics fix most of it
    assert not torch.equal(tent.model.state_dict()["features.1.weight"],
                           source_model.state_dict()["features.1.weight"])


def test_protocols(source_model, segments):
    plain = {k: v for k, v in segments.items()}
    cont = run(source_model, Stream(plain, protocol="continual", shuffle=False), "tent")
    reset = run(source_model, Stream(plain, protocol="reset", shuffle=False), "tent")
    alone = run(source_model, Stream({"contrast": plain["contrast"]}, shuffle=False), "tent")
    # reset: the second segment starts from the source model again, exactly as a run on it alone
    assert torch.equal(reset.predictions[96:], alone.predictions)
    assert torch.equal(reset.predictions[:96], cont.predictions[:96])
    w = "features.1.weight"     # continual carries the first segment's adaptation on
    assert not torch.equal(cont.model.state_dict()[w], alone.model.state_dict()[w])
    assert torch.equal(reset.model.state_dict()[w], alone.model.state_dict()[w])
    # batches never cross segments in continual/reset; mixed interleaves the segments
    assert all(e <= 96 or s >= 96 for s, e in cont.batches)
    mixed = run(source_model, Stream(plain, protocol="mixed", seed=0), "bn")
    assert any(len(set(mixed.segment[s:e].tolist())) == 2 for s, e in mixed.batches)
    assert set(mixed.errors()) == {"gaussian_noise", "contrast"} and sorted(mixed.segment.tolist()) == \
        sorted(cont.segment.tolist())
    # the record of a run: per batch predictions, error per segment and its mean, throughput
    assert [len(p) for p in cont.batch_predictions()] == [32] * 6
    assert cont.mean_err == pytest.approx(sum(cont.errors().values()) / 2)
    assert cont.samples_per_s > 0


def test_bad_input_is_a_clear_error(source_model, segments):
    with pytest.raises(ConfigError, match="Did you mean 'rotta'"):
        run(source_model, segments, "rota")
    with pytest.raises(ConfigError, match="shot.* is a sfda method: use dfkt.adapt"):
        run(source_model, segments, "shot")
    with pytest.raises(ConfigError, match="unknown stream protocol 'mixd'.*'mixed'"):
        run(source_model, segments, "tent", protocol="mixd")
    with pytest.raises(ConfigError, match="epochs.*set by the stream"):
        run(source_model, segments, "tent", epochs=3)
    with pytest.raises(ConfigError, match="unknown option 'tresh"):
        run(source_model, segments, "cotta", treshold=0.9)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        run(source_model, segments, "tent", batch_size=0)
    with pytest.raises(ConfigError, match="threshold must lie in"):
        run(source_model, segments, "cotta", threshold=2.0)
    with pytest.raises(DataError, match="unique"):
        Stream([("a", segments["contrast"]), ("a", segments["contrast"])])
    with pytest.raises(DataError, match="labels up to 9"):
        run(build_model("lenet5-bn", num_classes=5), segments, "tent")
    with pytest.raises(ModelError, match="normalisation layers"):
        run(build_model("lenet5"), segments, "tent")
    with pytest.raises(ModelError, match="cannot take input_shape"):
        run(source_model, {"x": get_domain("digits", split="test", size=28)}, "source")
    with pytest.raises(ConfigError, match="Stream was built with protocol"):
        run(source_model, Stream(segments, protocol="reset"), "tent", protocol="mixed")


def test_cli_tta_runs_a_config_and_rejects_unknown_keys(source_model, tmp_path, capsys):
    from dfkt.cli import main
    from dfkt.core.checkpoint import save_model

    save_model(tmp_path / "src.pt", source_model)
    cfg = {"method": "tent", "source_model": str(tmp_path / "src.pt"),
           "data": {"domain": "digits", "split": "test", "size": 32},
           "stream": {"corruptions": ["gaussian_noise", "contrast"], "severity": 5, "protocol": "reset"},
           "train": {"batch_size": 64}, "out": str(tmp_path / "run")}
    path = tmp_path / "tta.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["tta", str(path), "--no-progress", "-q"]) == 0
    out = capsys.readouterr().out
    assert "method: tent (reset" in out and "contrast" in out and "samples/s" in out
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert set(hist["errors"]) == {"gaussian_noise", "contrast"} and hist["config"]["stream"]["protocol"] == "reset"
    assert dfkt.load(tmp_path / "run" / "model.pt").dfkt_meta["method"] == "tent"
    path.write_text(yaml.safe_dump({**cfg, "strem": {}}))
    assert main(["tta", str(path)]) == 2
    assert "unknown key 'strem'" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**cfg, "stream": {"corruptions": ["gausian_noise"]}}))
    assert main(["tta", str(path)]) == 2
    assert "gaussian_noise" in capsys.readouterr().err


TTA_SUITE = {
    "suite": "tiny-tta", "task": "tta", "seeds": 1,
    "source": {"model": "lenet5-bn", "options": {"epochs": 2, "lr": 0.02, "smoothing": 0.1},
               "train_split": "train", "val_split": None},
    "methods": {"source": {}, "bn": {}, "tent": {}, "tent+sgd": {"method": "tent", "options": {"optimizer": "sgd"}}},
    "tasks": [{"name": f"uci-c/{p}", "source": {"domain": "digits", "size": 32},
               "target": {"domain": "digits", "split": "test", "size": 32},
               "stream": {"corruptions": ["gaussian_noise", "contrast"], "severity": 5, "protocol": p}}
              for p in ("continual", "reset")],
}


def test_bench_tta_suite_records_report_and_publish(tmp_path):
    doc, out = run_suite(tmp_path, TTA_SUITE)
    recs = doc["records"]
    assert len(recs) == 2 * 4 * 2          # tasks x methods x corruptions
    for r in recs:
        assert {"protocol", "method", "corruption", "err", "samples_per_s", "seed", "task_name"} <= set(r)
        assert 0 <= r["err"] <= 100 and r["samples_per_s"] > 0
    by = {(r["task_name"], r["method"], r["corruption"]): r["err"] for r in recs}
    # bn and the unadapted source do not depend on the protocol; tent does (reset vs carried over)
    for m in ("source", "bn"):
        assert by[("uci-c/continual", m, "contrast")] == by[("uci-c/reset", m, "contrast")]
    assert by[("uci-c/reset", "bn", "contrast")] < by[("uci-c/reset", "source", "contrast")] - 20
    report = (out / "report.md").read_text()
    assert "## uci-c/continual (continual)" in report and "| tent+sgd |" in report and "## Floors" in report
    assert "contr" in report and "samples/s" in report
    assert (out / "tta_error.png").exists()
    publish_section(tmp_path, doc, out)
    # --resume keeps the runs (one record per corruption) and adds none
    again, _ = run_suite(tmp_path, TTA_SUITE, "--resume", out=out)
    assert len(again["records"]) == len(recs)


def test_tta_suite_needs_a_stream(tmp_path):
    from dfkt.bench.suite import load_suite

    bad = {**TTA_SUITE, "tasks": [{**TTA_SUITE["tasks"][0], "stream": None}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="needs stream"):
        load_suite(str(path))
    assert load_suite("tta-digits-c").task == "tta"      # the shipped suite parses
