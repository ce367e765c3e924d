"""The shared core: configs, hooks, kNN/k-means, losses, checkpoints and the loop."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfkt
from dfkt.config import apply_overrides, from_dict, load_yaml
from dfkt.core import losses
from dfkt.core.checkpoint import atomic_save, load_model, read_checkpoint, save_model
from dfkt.core.hooks import BNStatsRecorder, FeatureRecorder
from dfkt.core.neighbors import kmeans, knn
from dfkt.errors import CheckpointError, ConfigError, ModelError
from dfkt.models import build_model


# ----- configs --------------------------------------------------------------------------------------
@dataclass
class Inner:
    k: int = 5
    name: Literal["a", "b"] = "a"


@dataclass
class Outer:
    lr: float = 0.1
    steps: Optional[int] = None
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_config_valid_and_coerced():
    c = from_dict(Outer, {"lr": "1e-3", "steps": 4, "inner": {"k": 3.0, "name": "b"}, "tags": ["x"]})
    assert c.lr == pytest.approx(1e-3) and c.steps == 4 and c.inner.k == 3 and c.inner.name == "b"


@pytest.mark.parametrize("data, words", [
    ({"lrr": 0.1}, ["unknown key 'lrr'", "Did you mean 'lr'"]),
    ({"inner": {"kk": 1}}, ["config.inner", "unknown key 'kk'", "'k'"]),
    ({"steps": "many"}, ["config.steps", "expected", "int"]),
    ({"inner": {"name": "c"}}, ["'c' is not one of"]),
    ({"tags": "x"}, ["expected a list"]),
    ({"lr": True}, ["expected a number"]),
])
def test_config_errors_name_the_key(data, words):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    for w in words:
        assert w in str(e.value)


def test_overrides_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.5\ninner: {k: 2}\n")
    d = apply_overrides(load_yaml(p), ["inner.k=7", "tags=[a, b]", "steps=3"])
    c = from_dict(Outer, d)
    assert (c.lr, c.inner.k, c.tags, c.steps) == (0.5, 7, ["a", "b"], 3)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["nokey"])
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "bad.yaml")


# ----- hooks ----------------------------------------------------------------------------------------
def test_bn_stats_equal_direct_computation():
    torch.manual_seed(0)
    model = build_model("lenet5-bn").eval()
    x = torch.randn(16, 1, 32, 32) * 2 + 0.3
    with BNStatsRecorder(model) as rec:
        model(x)
    # direct computation of the first BN layer's input statistics
    first_bn_name = next(iter(rec.layers))
    conv_out = {}
    with FeatureRecorder(model, [first_bn_name], inputs=True, detach=True) as fr:
        model(x)
        conv_out = fr[first_bn_name]
    mean = conv_out.mean(dim=(0, 2, 3))
    var = conv_out.permute(1, 0, 2, 3).reshape(conv_out.shape[1], -1).var(1, unbiased=False)
    m, v = rec.stats[first_bn_name]
    assert torch.allclose(m, mean, atol=1e-5) and torch.allclose(v, var, atol=1e-5)
    assert len(rec.stats) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loss = rec.loss()
    assert loss.ndim == 0 and loss > 0
    # hooks are removed on exit: the model is unchanged
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_bn_recorder_on_bn_free_model_is_a_clear_error():
    with pytest.raises(ModelError, match="no BatchNorm"):
        BNStatsRecorder(build_model("lenet5"), method="deepinversion")


def test_feature_recorder_by_name_and_unknown_name():
    model = build_model("lenet5")
    with FeatureRecorder(model, ["features.0", "fc"]) as rec:
        out = model(torch.randn(2, 1, 32, 32))
    assert rec["features.0"].shape == (2, 6, 28, 28) and out.shape == (2, 10)
    with pytest.raises(ModelError, match="Did you mean"):
        FeatureRecorder(model, ["feature.0"])


# ----- kNN and k-means ------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_knn_faiss_and_torch_agree(metric):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 16, generator=g)
    query = torch.randn(50, 16, generator=g)
    st, it = knn(query, bank, 7, metric=metric, backend="torch", chunk=16)
    sf, i_f = knn(query, bank, 7, metric=metric, backend="faiss")
    assert torch.equal(it, i_f)
    assert torch.allclose(st, sf, atol=1e-4)
    # brute force check
    if metric == "cosine":
        full = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).t()
    elif metric == "ip":
        full = query @ bank.t()
    else:
        full = -torch.cdist(query, bank) ** 2
    assert torch.equal(full.topk(7, 1).indices, it)


def test_knn_exclude_self():
    x = torch.randn(100, 8)
    _, idx = knn(x, x, 5, exclude_self=True)
    assert idx.shape == (100, 5)
    assert not (idx == torch.arange(100).unsqueeze(1)).any()


def test_kmeans_torch_and_faiss_find_the_same_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 10, generator=g) * 6
    x = torch.cat([c + 0.3 * torch.randn(60, 10, generator=g) for c in centers])
    truth = torch.arange(4).repeat_interleave(60)
    parts = {}
    for backend in ("torch", "faiss"):
        c, a = kmeans(x, 4, iters=20, seed=0, metric="l2", backend=backend)
        # same partition as the truth up to a relabelling
        pairs = {(int(t), int(p)) for t, p in zip(truth, a)}
        assert len(pairs) == 4, backend
        parts[backend] = (c, a)
    assert torch.equal(parts["torch"][1], parts["faiss"][1])
    assert torch.allclose(parts["torch"][0], parts["faiss"][0], atol=1e-4)


# ----- losses ---------------------------------------------------------------------------------------
def test_losses_behave():
    t = torch.randn(8, 10)
    assert losses.kd_kl(t, t).abs() < 1e-5 and losses.kd_kl(torch.randn(8, 10), t) > 0
    confident = torch.eye(10)[:8] * 20
    uniform = torch.zeros(8, 10)
    assert losses.entropy(confident) < 0.01 < losses.entropy(uniform)
    im_good, _ = losses.information_maximization(torch.eye(10) * 20)   # confident and diverse
    im_bad, _ = losses.information_maximization(torch.zeros(10, 10))   # uncertain
    assert im_good < im_bad
    y = torch.arange(8) % 10
    assert losses.smoothed_ce(confident, y, 0.1) > losses.smoothed_ce(confident, y, 0.0)
    lab = torch.tensor([0, -1, 2, -1])
    ce = losses.pseudo_label_ce(torch.zeros(4, 3), lab)
    assert torch.isclose(ce, torch.log(torch.tensor(3.0)))
    fs, ft = torch.randn(6, 4, 5, 5), torch.randn(6, 8, 5, 5)
    for name, fn in losses.FEATURE_LOSSES.items():
        assert torch.isfinite(fn(fs, ft)), name
    assert losses.total_variation(torch.ones(2, 1, 4, 4)) == 0


# ----- checkpoints ----------------------------------------------------------------------------------
def test_deployable_checkpoint_roundtrip(tmp_path):
    m = build_model("shot-lenet", num_classes=10)
    p = save_model(tmp_path / "m.pt", m, method="shot", config={"a": 1}, metrics={"acc": 90.0})
    m2 = dfkt.load(p)
    x = torch.randn(3, 1, 28, 28)
    m.eval()
    assert torch.allclose(m(x), m2(x))
    assert m2.dfkt_meta["method"] == "shot" and m2.dfkt_meta["metrics"]["acc"] == 90.0
    with pytest.raises(CheckpointError, match="another architecture"):
        load_model(p, model=build_model("lenet5"))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    p = save_model(tmp_path / "m.pt", build_model("lenet5"))
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "trunc.pt")
    atomic_save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dfkt checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")


# ----- the loop -------------------------------------------------------------------------------------
def test_supervised_loop_learns_and_resumes(tmp_path, monkeypatch):
    import dfkt.core.loop as loop
    from dfkt.data import get_domain

    tr, va = get_domain("digits", split="source_train"), get_domain("digits", split="source_val")

    def net():
        torch.manual_seed(0)  # same initial weights for every run
        return build_model("shot-lenet")

    kw = dict(epochs=4, lr=0.02, batch_size=64, seed=3, progress=False, smoothing=0.1)
    full = dfkt.train_supervised(net(), tr, va, **kw)
    losses_ = [r["ce"] for r in full.history.records]
    assert losses_[-1] < losses_[0]
    assert full.metrics["val_acc"] > 90.0
    # interrupted after 2 epochs, then resumed: identical history and weights
    ck = tmp_path / "ck"
    real_save, saved = loop.save_resume, []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saved.append(1)
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed right after the 2nd checkpoint

    monkeypatch.setattr(loop, "save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dfkt.train_supervised(net(), tr, va, **kw, checkpoint_dir=str(ck))
    monkeypatch.setattr(loop, "save_resume", real_save)
    ckpt = read_checkpoint(ck / "resume.pt")
    assert ckpt["epoch"] == 2
    # resuming with another config is refused
    with pytest.raises(CheckpointError, match="another configuration"):
        dfkt.train_supervised(net(), tr, va, **{**kw, "lr": 0.5}, checkpoint_dir=str(ck),
                              resume=True)
    resumed = dfkt.train_supervised(net(), tr, va, **kw, checkpoint_dir=str(ck), resume=True)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert resumed.history.resumed_from_epoch == 2
    assert strip(resumed.history.records) == strip(full.history.records)


def test_snd_subsamples_large_sets_with_a_fixed_subset():
    from dfkt.core.evaluate import snd

    g = torch.Generator().manual_seed(0)
    big = torch.softmax(torch.randn(3000, 10, generator=g) * 2, 1)
    keep = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:1000]
    # above max_samples: the score of a fixed subset (same rows at every evaluation), below: all rows
    assert snd(big, max_samples=1000) == snd(big, max_samples=1000) == pytest.approx(snd(big[keep]), rel=1e-6)
    assert snd(big, max_samples=5000) == pytest.approx(snd(big), rel=1e-6)
    assert snd(big, max_samples=1000) != pytest.approx(snd(big), rel=1e-3)
