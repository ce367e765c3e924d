"""Feature banks of any size: the neighbour index rule, approximate vs exact search, index refresh as
bank rows change, train.neighbour_index reaching the methods, and the `dfkt bench` scale task."""

import pytest
import torch
import torch.nn.functional as F
import yaml

import dfkt
from dfkt.bench.scale import synthetic_features
from dfkt.core import neighbors
from dfkt.core.neighbors import EXACT_MAX_ROWS, BankIndex, choose_index, knn
from dfkt.errors import ConfigError
from dfkt.sfda.common import batch_knn
from helpers.harness import assert_same_weights, kill_and_resume, publish_section, run_suite

pytest.importorskip("faiss")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bank() -> torch.Tensor:
    return synthetic_features(20_000, 64, classes=20, seed=0, device=CPU)


def _recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum()) / b.numel()


def test_rule_exact_below_threshold_and_on_accelerators_ivf_above():
    assert choose_index(EXACT_MAX_ROWS - 1, CPU) == "exact"
    assert choose_index(EXACT_MAX_ROWS, CPU) == "ivf"
    assert choose_index(10 ** 7, torch.device("cuda")) == "exact"      # exact is cheap on a GPU
    assert choose_index(100, CPU, "ivf") == "ivf"                       # the override wins
    assert choose_index(10 ** 7, CPU, "exact") == "exact"
    with pytest.raises(ConfigError, match="unknown neighbour index 'annoy'"):
        choose_index(100, CPU, "annoy")
    assert BankIndex(torch.randn(1000, 8)).kind == "exact"


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_agrees_with_exact(bank, kind):
    index = BankIndex(bank.clone(), kind)
    q = bank[torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(1))[:384]]
    s, i = index.search(q, 6)
    se, ie = knn(q, bank, 6, metric="ip", backend="torch")
    assert _recall(i, ie) >= 0.95
    # every returned score is the exact inner product with the returned row (candidates are re-scored)
    torch.testing.assert_close(s, (bank[i] * q.unsqueeze(1)).sum(2))
    # batch_knn through the index excludes each query's own row, as on the plain bank
    rows = torch.arange(384)
    _, nn = batch_knn(bank[rows], index, 5, rows)
    _, nn_exact = batch_knn(bank[rows], bank, 5, rows)
    assert not (nn == rows.unsqueeze(1)).any() and _recall(nn, nn_exact) >= 0.95


def test_index_refresh_finds_rewritten_rows(bank):
    b = bank.clone()
    index = BankIndex(b, "ivf")
    index.search(b[:1], 1)                                   # built on the old rows
    rows = torch.arange(5000, 5064)
    new = synthetic_features(64, 64, classes=20, seed=7, device=CPU)
    b[rows] = new
    index.mark(rows)
    s, i = index.search(new, 1)
    assert torch.equal(i[:, 0], rows)                        # the new rows are found at once ...
    torch.testing.assert_close(s[:, 0], torch.ones(64))
    old = bank[rows]                                         # ... and their old values are gone
    _, i_old = index.search(old, 6)
    _, i_old_exact = knn(old, b, 6, metric="ip")
    assert _recall(i_old, i_old_exact) >= 0.95
    assert index.builds == 1
    # after an epoch's worth of rewritten rows the index is rebuilt from the current bank
    b.copy_(F.normalize(b + 0.05 * torch.randn(b.shape, generator=torch.Generator().manual_seed(2)), dim=1))
    index.mark(torch.arange(b.shape[0]))
    _, i = index.search(b[:200], 6)
    assert index.builds == 2 and _recall(i, knn(b[:200], b, 6, metric="ip")[1]) >= 0.95
    index.reset()                                            # e.g. resumed banks
    index.search(b[:1], 1)
    assert index.builds == 3


def test_exact_knn_in_blocks_of_bank_rows_matches_one_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(5000, 16, generator=g), torch.randn(70, 16, generator=g)
    s1, i1 = knn(q, bank, 7, metric="ip", backend="torch")
    monkeypatch.setattr(neighbors, "MAX_SCORES", 70 * 300)  # bank in blocks of 300 rows
    s2, i2 = knn(q, bank, 7, metric="ip", backend="torch")
    assert torch.equal(i1, i2) and torch.equal(s1, s2)


def test_neighbour_index_reaches_the_bank_methods():
    from dfkt.data import get_domain
    from dfkt.models import build_model

    torch.manual_seed(0)
    target = get_domain("digits", split="test")
    res = dfkt.adapt(build_model("shot-lenet", num_classes=10), target, method="aad", epochs=1,
                     neighbour_index="ivf", device="cpu", progress=False, on_collapse="warn")
    assert res.config["train"]["neighbour_index"] == "ivf"
    with pytest.raises(ConfigError, match="neighbour_index"):
        dfkt.adapt(build_model("shot-lenet", num_classes=10), target, method="aad", epochs=1,
                   neighbour_index="annoy", device="cpu", progress=False)


SCALE_SUITE = {
    "suite": "tiny-scale", "task": "scale", "seeds": 1,
    "methods": {"auto": {}, "exact": {}, "ivf-wide": {"method": "ivf", "options": {"nprobe": 16}}},
    "tasks": [{"name": f"{n // 1000}k", "scale": {"rows": n, "dim": 32, "classes": 10, "steps": 3, "recall_steps": 2}}
              for n in (3000, 6000)],
}


def test_bench_scale_suite_records_report_and_publish(tmp_path):
    doc, out = run_suite(tmp_path, SCALE_SUITE)
    recs = doc["records"]
    assert len(recs) == 2 * 3
    by = {(r["rows"], r["method"]): r for r in recs}
    assert by[(3000, "auto")]["index"] == "exact" and by[(6000, "ivf-wide")]["index"] == "ivf"
    for r in recs:
        assert r["step_ms"] > 0 and r["step_ms_amortised"] >= r["step_ms"]
        assert r["recall"] == 1.0 if r["index"] == "exact" else r["recall"] >= 0.9
    report = (out / "report.md").read_text()
    assert "| ivf-wide | 6,000 | ivf |" in report and "## Floors" in report and "recall@K" in report
    publish_section(tmp_path, doc, out)


def test_scale_suite_errors(tmp_path):
    from dfkt.bench.suite import load_suite

    for bad, msg in [({"methods": {"annoy": {}}}, "not a neighbour index mode"),
                     ({"tasks": [{"name": "x"}]}, "needs `scale`"),
                     ({"tasks": [{"name": "x", "scale": {"rows": 10}}]}, "must exceed")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**SCALE_SUITE, **bad}))
        with pytest.raises(ConfigError, match=msg):
            load_suite(str(path))


def test_resume_with_an_approximate_index_ends_with_the_same_weights(tmp_path, monkeypatch):
    from dfkt.data import get_domain
    from dfkt.models import build_model
    from dfkt.sfda.nrc import NRC

    torch.manual_seed(0)
    model = build_model("shot-lenet", num_classes=10)
    target = get_domain("digits", split="test")
    kw = dict(method="nrc", epochs=2, K=3, KK=2, neighbour_index="ivf", device="cpu", progress=False,
              on_collapse="warn")
    full, res = kill_and_resume(lambda **more: dfkt.adapt(model, target, **kw, **more), NRC, tmp_path, monkeypatch)
    assert_same_weights(full.model, res.model)
