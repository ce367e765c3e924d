"""Data-parallel runs: ``torchrun --nproc_per_node=2`` (gloo, CPU).

One launch of tests/helpers/ddp_run.py runs, on 2 processes: SHOT, SHOT crashed after epoch 1 and
resumed, a generator DFKD method, and ``dfkt bench`` on a tiny suite. The test then checks that the
data were sharded per rank, that only rank 0 logged and wrote checkpoints, that resume gives the
uninterrupted run exactly, that both ranks hold the same model, and that the results are within
0.5 points of one process with the same global batch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dfkt
from dfkt import api
from dfkt.core import distributed as dist
from dfkt.core.checkpoint import save_model
from dfkt.data import get_domain
from dfkt.models import build_model

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / "helpers" / "ddp_run.py"
SFDA_METHOD = "shot"
DFKD_METHOD = "dafl"
TOLERANCE = 0.5   # accuracy points between 2 processes and 1 process with the same global batch

SHOT_RUN = {"kind": "adapt", "method": SFDA_METHOD,
            "target": {"name": "digits", "split": "all", "size": 32, "corruption": "gaussian_noise", "severity": 4},
            "subset": 1792,   # 28 full global batches of 64: one process and 2 x 32 see the same batches
            "options": {"beta": 0.3}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.01, "seed": 3}}
# the student starts from a (briefly) trained LeNet-5-half: early DAFL from scratch is chaotic (float
# rounding alone moves the accuracy by points), so the comparison would measure noise, not DDP
DAFL_RUN = {"kind": "distill", "method": DFKD_METHOD, "input_shape": [1, 32, 32],
            "eval": {"name": "digits", "split": "test", "size": 32},
            "train": {"epochs": 2, "iters_per_epoch": 5, "batch_size": 64, "lr": 0.01, "seed": 3}}
TERMS = {"adapt": ("ent", "div", "ce"), "distill": ("oh", "act", "ie")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(run: dict) -> "api.Result":
    """The same run in this process (one thread, like each torchrun worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = dict(run["train"], device="cpu", progress=False)
        if run["kind"] == "adapt":
            target = get_domain(**run["target"]).subset(range(run["subset"]))
            return api.adapt(api.load(run["source_model"]), target, method=run["method"],
                             train=train, **run.get("options", {}))
        teacher = api.load(run["teacher"])
        torch.manual_seed(0)          # as ddp_run.py: teacher loaded, then the student built under seed 0
        student = api.load(run["student"]) if run["student"].endswith(".pt") else build_model(run["student"])
        return api.distill(teacher, student, method=run["method"],
                           input_shape=tuple(run["input_shape"]), eval_data=get_domain(**run["eval"]), train=train,
                           **run.get("options", {}))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    """Launch the 2-process runs once; return {name: [rank0 report, rank1 report]} and the specs."""
    missing = [m for m in (SFDA_METHOD, DFKD_METHOD) if m not in dfkt.list_methods()]
    if missing:
        pytest.fail(f"method(s) {missing} not registered yet (dfkt.list_methods() = {dfkt.list_methods()})")
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    src = dfkt.train_supervised(build_model("lenet5-bn"), get_domain("digits", split="source_train", size=32),
                                epochs=1, batch_size=64, smoothing=0.1, device="cpu", progress=False)
    torch.manual_seed(0)
    teacher = dfkt.train_supervised(build_model("lenet5"), get_domain("digits", split="train", size=32), epochs=2,
                                    batch_size=64, lr=0.05, schedule="cosine", device="cpu", progress=False)
    torch.manual_seed(0)
    student = dfkt.train_supervised(build_model("lenet5-half"), get_domain("digits", split="train", size=32),
                                    epochs=1, batch_size=64, lr=0.05, device="cpu", progress=False)
    shot = dict(SHOT_RUN, source_model=str(save_model(tmp / "source.pt", src.model)))
    dafl = dict(DAFL_RUN, teacher=str(save_model(tmp / "teacher.pt", teacher.model)),
                student=str(save_model(tmp / "student.pt", student.model)))
    suite = tmp / "tiny-suite.yaml"
    suite.write_text(yaml.safe_dump({
        "suite": "tiny", "task": "sfda", "seeds": 1,
        "source": {"model": "lenet5-bn", "options": {"epochs": 1, "batch_size": 64}, "val_split": None},
        "methods": {SFDA_METHOD: {"train": {"epochs": 1, "batch_size": 64}}},
        "tasks": [{"name": "uci-noise", "source": {"domain": "digits", "size": 32},
                   "target": {"domain": "digits", "size": 32, "split": "test", "corruption": "gaussian_noise"}}]}))
    logged = lambda name: dict(shot, train=dict(shot["train"], log_dir=str(tmp / "logs" / name)))  # noqa: E731
    runs = [dict(logged("shot"), name="shot"), dict(logged("shot_resumed"), name="shot_resumed", crash_after_epoch=1),
            dict(dafl, name="dafl"),
            {"name": "bench", "kind": "bench", "suite": str(suite)}]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp / "out"), "runs": runs}))
    # DFKT_DEVICE=cpu: these runs are the gloo/CPU check even under DFKT_TEST_DEVICE=cuda (2 ranks, maybe 1 GPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DFKT_DEVICE": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(HELPER), str(spec)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    out = tmp / "out"
    reports = {run["name"]: [json.loads((out / f"{run['name']}.rank{k}.json").read_text()) for k in (0, 1)]
               for run in runs}
    return {"reports": reports, "out": out, "shot": shot, "dafl": dafl}


def _strip(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_data_sharded_per_rank(ddp) -> None:
    r0, r1 = ddp["reports"]["shot"]
    assert r0["world_size"] == r1["world_size"] == 2
    n = SHOT_RUN["subset"]
    assert len(r0["indices"]) == len(r1["indices"]) == SHOT_RUN["train"]["epochs"]
    for a, b in zip(r0["indices"], r1["indices"]):
        assert len(a) == len(b) == n // 2 and not set(a) & set(b)       # disjoint halves of each epoch
        assert len(set(a) | set(b)) == n // 2 * 2


def test_only_rank0_logs_and_writes(ddp) -> None:
    for name in ("shot", "shot_resumed", "dafl"):
        r0, r1 = ddp["reports"][name]
        assert r1["saved"] == [] and r1["log"] == [], f"rank 1 wrote or logged in {name}"
        assert r0["saved"][-1] == "model.pt" and "resume.pt" in r0["saved"]
        assert any("epoch 2/2" in line for line in r0["log"])
        assert (ddp["out"] / name / "model.pt").is_file() and (ddp["out"] / name / "history.json").is_file()


def test_ranks_agree(ddp) -> None:
    for name in ("shot", "shot_resumed", "dafl"):
        r0, r1 = ddp["reports"][name]
        assert r0["acc"] == r1["acc"] and _strip(r0["history"]) == _strip(r1["history"])


def test_resume_under_ddp_equals_uninterrupted(ddp) -> None:
    full, resumed = ddp["reports"]["shot"][0], ddp["reports"]["shot_resumed"][0]
    assert resumed["crashed"] and resumed["saved_before_crash"] == ["resume.pt"]
    assert resumed["resumed_from_epoch"] == 1
    assert any("resumed shot" in line and "at epoch 1" in line for line in resumed["log"])
    assert _strip(resumed["history"]) == _strip(full["history"]) and resumed["acc"] == full["acc"]


def test_experiment_logs_rank0_only_and_resumed_without_duplicates(ddp) -> None:
    logs = ddp["out"].parent / "logs"
    full, resumed = ((logs / name / "steps.csv").read_text().splitlines() for name in ("shot", "shot_resumed"))
    steps_per_epoch = SHOT_RUN["subset"] // SHOT_RUN["train"]["batch_size"]
    assert len(full) == 1 + SHOT_RUN["train"]["epochs"] * steps_per_epoch      # one row per step: rank 0 alone
    assert resumed == full       # epoch 2 was logged before the crash, dropped on resume and logged again
    epochs = (logs / "shot" / "epochs.csv").read_text().splitlines()
    assert len(epochs) == 1 + SHOT_RUN["train"]["epochs"]


def _matches_single_process(ddp, name: str) -> None:
    run = ddp[name]
    single = single_process(run)
    rep = ddp["reports"][name][0]
    # the same global batch: the first epoch's loss terms agree to float rounding ...
    first, ref = rep["history"][0], single.history.records[0]
    for k in TERMS[run["kind"]]:
        assert first[k] == pytest.approx(ref[k], rel=1e-3, abs=1e-4), (
            f"{name}: epoch-1 {k} on 2 processes {first[k]} != 1 process {ref[k]}: not the same global batch"
            + (" (a DFKD synthesizer must draw the global batch of noise with ctx.rng and keep this rank's part, "
               "dfkt.core.distributed.shard(sample_z(n * world_size, ...)), and train the generator through "
               "ctx.ddp(generator) so that its gradients and BatchNorm statistics are global)"
               if run["kind"] == "distill" else ""))
    # ... and the final accuracy is within TOLERANCE points
    assert abs(rep["acc"] - single.acc) <= TOLERANCE, f"2 processes: {rep['acc']:.2f}, 1 process: {single.acc:.2f}"


def test_sfda_ddp_matches_single_process(ddp) -> None:
    _matches_single_process(ddp, "shot")


def test_dfkd_ddp_matches_single_process(ddp) -> None:
    _matches_single_process(ddp, "dafl")


def test_bench_under_torchrun(ddp) -> None:
    r0, r1 = ddp["reports"]["bench"]
    assert r0["rc"] == r1["rc"] == 0
    doc = json.loads((ddp["out"] / "bench" / "results.json").read_text())
    assert doc["env"]["world_size"] == 2
    (rec,) = doc["records"]
    assert rec["method"] == SFDA_METHOD and 0 <= rec["acc"] <= 100
    assert (ddp["out"] / "bench" / "report.md").is_file()
    assert r1["log"] == [] or all("epoch" not in line for line in r1["log"])


# ----------------------------------------------------------------------------- in-process unit checks
def test_global_batchnorm_is_plain_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5))
    ref = __import__("copy").deepcopy(net)
    dist.global_batchnorm(net)
    assert isinstance(net[1], torch.nn.BatchNorm2d) and type(net[1]).__name__ == "GlobalBatchNorm2d"
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(net(x), ref(x))
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert list(net.state_dict()) == list(ref.state_dict())


def test_shard_is_identity_in_one_process() -> None:
    t = torch.arange(10)
    assert dist.shard(t) is t and dist.all_gather_cat(t) is t and dist.world_size() == 1
