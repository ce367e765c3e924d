"""dfkt's ``shot`` against the official SHOT digit code on mnist->uci: per-epoch time on one CPU thread.

Issue 14 ("no work done twice") asks for dfkt's SHOT epoch to take at most half the time of the official
code's (tim-learn/SHOT, ``digit/uda_digit.py``, ``train_target``) on the same machine, one thread each,
interleaved, 3 seeds, with accuracy unchanged. This script measures both sides:

* the task is sfda-digits' ``mnist->digits``: the shot-lenet source model of each seed, trained (and cached)
  by the suite's source recipe (benchmarks/sfda-digits.yaml; ``--source-epochs`` shortens it, for timing
  only), adapted to the 1,797 UCI digits at 28x28 (transductive: adapted and scored on the same images);
* the official side runs the official ``train_target`` itself, imported at run time from a SHOT checkout
  or git directory given by ``--official`` (nothing of it is copied into dfkt). A thin adapter feeds it:
  its ``digit_load`` is replaced by loaders over the same UCI images (uint8 -> PIL -> ToTensor ->
  Normalize(0.5, 0.5), as its m2u target transform; ``num_workers=0``: one thread), ``.cuda()`` is a no-op,
  DataLoader iterators get back the ``.next()`` the code calls, and the source model is dfkt's, its
  weights written as the official netF/netB/netC state dicts (``--dset m2u``, ``--cls_par 0.1``, the
  published digit command; dropout on, as its code trains);
* the dfkt side is ``dfkt.adapt(..., method="shot")`` at its registered defaults (``--variants`` picks
  sfda-digits method entries, e.g. ``shot-paper``) with the same number of epochs;
* each run is its own process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``); per seed the two
  sides run one after the other, alternating which goes first.

Per-epoch time is the mean over epochs 2..N of the time between the starts of consecutive pseudo-labelling
refreshes (dfkt: ``Shot.epoch_begin``; official: ``obtain_label``), so one epoch = its training steps + the
no-grad pass(es) over the target (official: ``obtain_label`` + ``cal_acc``; dfkt: the one evaluation pass
that its scores, its collapse guard and the next pseudo-labels share) and excludes the one-time set-up.
``wall_per_epoch_s`` (the whole run / epochs, set-up included) and the process CPU time are reported too.

    PYTHONPATH=$PWD python benchmarks/shot_vs_official.py --official /path/to/SHOT --data-root ../shared/data

writes ``results.json`` and ``report.md`` into ``--out`` (default bench-out/shot-vs-official).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
TASK = "mnist->digits"


# ----------------------------------------------------------------------------- shared helpers
def _target(root: str):
    from dfkt.runconfig import DataRef

    return DataRef(domain="digits", size=28).build(root)


def _uint8_images(target):
    """The target's images back as uint8 [N,28,28] (they were normalised as (u8/255 - 0.5)/0.5)."""
    import torch

    x, y = target.tensors
    u8 = torch.round((x[:, 0] * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8)
    again = (u8.float().unsqueeze(1) / 255 - 0.5) / 0.5
    if not torch.allclose(again, x, atol=1e-6):
        raise SystemExit("the digits target is not (u8/255 - 0.5)/0.5 normalised; the official adapter would "
                         "see other inputs than dfkt")
    return u8.numpy(), y.numpy()


def _official_dir(spec: str, into: Path) -> Path:
    """The official ``digit/`` folder: from a checkout (``<spec>/digit/uda_digit.py``) or extracted from a git
    directory (``git archive HEAD digit``) into ``into``."""
    p = Path(spec)
    if (p / "digit" / "uda_digit.py").is_file():
        return p / "digit"
    if (p / "uda_digit.py").is_file():
        return p
    into.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["git", "--git-dir", str(p), "archive", "HEAD", "digit"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=arch, check=True)
    if not (into / "digit" / "uda_digit.py").is_file():
        raise SystemExit(f"{spec!r} holds no digit/uda_digit.py (give a SHOT checkout or its git directory)")
    return into / "digit"


def _official_state(model) -> dict:
    """dfkt's shot-lenet weights as the official (netF, netB, netC) state dicts."""
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    f = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    b = {k[len("bottleneck."):]: v for k, v in sd.items() if k.startswith("bottleneck.")}
    c = {"fc.weight_g": sd["head.fc.parametrizations.weight.original0"],
         "fc.weight_v": sd["head.fc.parametrizations.weight.original1"], "fc.bias": sd["head.fc.bias"]}
    return {"F": f, "B": b, "C": c}


def _variant(spec: str) -> tuple[str, dict]:
    """'shot' -> ('shot', {}); 'shot:memory_format=contiguous' -> ('shot', {'memory_format': 'contiguous'}):
    an sfda-digits method entry plus train settings of the dfkt side."""
    import yaml

    name, _, rest = spec.partition(":")
    extra = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        extra[k] = yaml.safe_load(v)
    return name, extra


# ----------------------------------------------------------------------------- workers (one process each)
def worker_dfkt(a: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from dfkt import api
    from dfkt.bench.suite import load_suite
    from dfkt.core.checkpoint import load_model
    from dfkt.sfda.shot import Shot

    name, extra = _variant(a["variant"])
    run = load_suite("sfda-digits").methods[name]
    target = _target(a["data_root"])
    model = load_model(a["source"])
    starts: list[float] = []
    cpu_starts: list[float] = []
    begin = Shot.epoch_begin

    def timed(self, epoch):
        starts.append(time.perf_counter())
        cpu_starts.append(time.process_time())
        return begin(self, epoch)

    Shot.epoch_begin = timed
    train = {**run.train, "epochs": a["epochs"], "progress": False, **a.get("train", {}), **extra}
    c0, t0 = time.process_time(), time.perf_counter()
    res = api.adapt(model, target, method=run.method or name, seed=a["seed"], device="cpu", train=train,
                    **run.options)
    t1, c1 = time.perf_counter(), time.process_time()
    per = [s1 - s0 for s0, s1 in zip(starts, starts[1:])]
    cpu_per = [s1 - s0 for s0, s1 in zip(cpu_starts, cpu_starts[1:])]
    return {"side": "dfkt", "cpu_per_epoch_s": statistics.mean(cpu_per), "variant": a["variant"], "seed": a["seed"], "epochs": len(starts),
            "epoch_s": [round(v, 4) for v in per], "per_epoch_s": statistics.mean(per),
            "wall_s": t1 - t0, "wall_per_epoch_s": (t1 - t0) / len(starts), "cpu_s": c1 - c0,
            "acc": float(res.acc), "acc_last_epoch": float(res.history.last.get("acc", float("nan"))),
            "threads": torch.get_num_threads(), "train": train, "options": dict(run.options)}


def worker_official(a: dict) -> dict:
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(1)
    digit = Path(a["official_dir"])
    sys.path.insert(0, str(digit))
    # the adapter: CPU instead of CUDA, and the Python-2 style iterator .next() the code calls
    torch.Tensor.cuda = lambda self, *args, **kw: self
    nn.Module.cuda = lambda self, *args, **kw: self
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    _BaseDataLoaderIter.next = _BaseDataLoaderIter.__next__
    import uda_digit  # the official module, imported from --official
    from PIL import Image
    from torchvision import transforms

    u8, labels = _uint8_images(_target(a["data_root"]))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])

    class Target(Dataset):
        """The UCI digits as the official m2u target data sets yield them (PIL 'L' image -> tf)."""

        def __init__(self, with_index: bool):
            self.with_index = with_index

        def __len__(self):
            return len(u8)

        def __getitem__(self, i):
            img = tf(Image.fromarray(u8[i]))
            return (img, int(labels[i]), i) if self.with_index else (img, int(labels[i]))

    def digit_load(args):
        bs = args.batch_size
        return {"target": DataLoader(Target(True), batch_size=bs, shuffle=True, num_workers=args.worker, drop_last=False),
                "target_te": DataLoader(Target(True), batch_size=bs, shuffle=False, num_workers=args.worker,
                                        drop_last=False),
                "test": DataLoader(Target(False), batch_size=bs * 2, shuffle=False, num_workers=args.worker,
                                   drop_last=False)}

    uda_digit.digit_load = digit_load
    starts: list[float] = []
    cpu_starts: list[float] = []
    accs: list[float] = []
    obtain, cal = uda_digit.obtain_label, uda_digit.cal_acc

    def timed_obtain(*args, **kw):
        starts.append(time.perf_counter())
        cpu_starts.append(time.process_time())
        return obtain(*args, **kw)

    def recorded_acc(*args, **kw):
        out = cal(*args, **kw)
        accs.append(float(out[0]))
        return out

    uda_digit.obtain_label, uda_digit.cal_acc = timed_obtain, recorded_acc
    work = Path(a["work_dir"])
    args = argparse.Namespace(dset="m2u", max_epoch=a["epochs"], batch_size=64, worker=0, lr=0.01, seed=a["seed"],
                              cls_par=0.1, ent_par=1.0, gent=True, ent=True, bottleneck=256, layer="wn",
                              classifier="bn", smooth=0.1, issave=False, class_num=10, output_dir=str(work),
                              out_file=open(work / "log_tar.txt", "w"), savename="par_0.1")
    # the same seeding as the official __main__
    torch.manual_seed(a["seed"])
    np.random.seed(a["seed"])
    random.seed(a["seed"])
    sys.stdout = open(work / "stdout.txt", "w")         # its per-epoch prints
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        uda_digit.train_target(args)
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        sys.stdout.close()
        sys.stdout = sys.__stdout__
    per = [s1 - s0 for s0, s1 in zip(starts, starts[1:])]
    cpu_per = [s1 - s0 for s0, s1 in zip(cpu_starts, cpu_starts[1:])]
    return {"side": "official", "cpu_per_epoch_s": statistics.mean(cpu_per), "seed": a["seed"], "epochs": len(starts), "epoch_s": [round(v, 4) for v in per],
            "per_epoch_s": statistics.mean(per), "wall_s": t1 - t0, "wall_per_epoch_s": (t1 - t0) / len(starts),
            "cpu_s": c1 - c0, "acc": accs[-1], "threads": torch.get_num_threads(),
            "source_check_max_abs_diff": a.get("source_check")}


def check_export(official_dir: Path, model, state: dict, target) -> float:
    """Max |official logits - dfkt logits| (eval mode) on 256 target images: the exported source is the same net."""
    import torch

    sys.path.insert(0, str(official_dir))
    import network  # the official digit networks

    f, b, c = network.LeNetBase(), network.feat_bottleneck(type="bn", feature_dim=800, bottleneck_dim=256), \
        network.feat_classifier(type="wn", class_num=10, bottleneck_dim=256)
    f.load_state_dict(state["F"]), b.load_state_dict(state["B"]), c.load_state_dict(state["C"])
    for m in (f, b, c, model):
        m.eval()
    x = target.tensors[0][:256]
    with torch.no_grad():
        return float((c(b(f(x))) - model(x)).abs().max())


# ----------------------------------------------------------------------------- driver
def _spawn(side: str, payload: dict, pythonpath: str) -> dict:
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": pythonpath}
    p = subprocess.run([sys.executable, __file__, "--worker", side, json.dumps(payload)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{side} run failed (seed {payload['seed']}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _sources(seeds: list[int], root: str, cache: Path, source_epochs: int | None, into: Path):
    """Per seed: the sfda-digits source model of the task (trained once into ``cache``), saved into ``into``."""
    import torch

    from dfkt.bench import runner
    from dfkt.config import to_dict
    from dfkt.core.checkpoint import save_model
    from dfkt.bench.suite import load_suite

    suite = load_suite("sfda-digits")
    task = next(t for t in suite.tasks if t.name == TASK)
    recipe = runner._source_recipe(suite, task)
    if source_epochs:
        import dataclasses

        recipe = dataclasses.replace(recipe, options={**recipe.options, "epochs": source_epochs})
    out = {}
    for seed in seeds:
        torch.set_num_threads(1)
        model = runner.cached_supervised(recipe, task.source, seed, root, cache, "cpu", suite.num_classes)
        path = into / f"source-s{seed}.pt"
        save_model(path, model, method="supervised", config={"recipe": to_dict(recipe)})
        out[seed] = (model, path, dict(recipe.options))
    return out


def report(res: dict) -> str:
    s = res["summary"]
    lines = [f"## shot vs the official SHOT digit code ({TASK}, CPU, one thread each)", "",
             f"Command: `{res['command']}`", "",
             f"{res['machine']}; torch {res['torch']}; dfkt at {res['dfkt_commit']}; official SHOT at "
             f"{res['official_commit']}. Source models: sfda-digits' shot-lenet recipe "
             f"({res['source_recipe']}). Per-epoch time: mean over epochs 2..{res['epochs']} of the time between "
             f"consecutive pseudo-labelling refreshes (training steps + the no-grad target pass(es) of the epoch), "
             f"wall clock; `CPU s / epoch`: the same in process CPU time (one thread each: the work, less "
             f"sensitive to other processes on the machine); `wall/epoch`: the whole run (set-up included) / "
             f"epochs; `CPU s / run`: process CPU time of the whole run. "
             f"Runs interleaved per seed, alternating which side goes first; load average at each start in "
             f"results.json.", "",
             "| side | seeds | epochs | s / epoch | CPU s / epoch | wall / epoch | CPU s / run | acc (last epoch) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in s["sides"].items():
        lines.append(f"| {name} | {row['seeds']} | {res['epochs']} | {row['per_epoch_s']:.3f} | "
                     f"{row['cpu_per_epoch_s']:.3f} | {row['wall_per_epoch_s']:.3f} | {row['cpu_s']:.1f} | "
                     f"{row['acc']:.2f} ({', '.join(f'{v:.2f}' for v in row['accs'])}) |")
    lines.append("")
    for name, r in s["ratios"].items():
        lines.append(f"- **{name} / official, per epoch: {r['per_epoch']:.2f}x** (per seed "
                     f"{', '.join(f'{v:.2f}' for v in r['per_seed'])}); CPU per epoch {r['cpu_per_epoch']:.2f}x; "
                     f"wall/epoch {r['wall_per_epoch']:.2f}x; CPU per run {r['cpu']:.2f}x. Floor (issue 14): <= 0.50x per epoch: "
                     f"{'met' if r['per_epoch'] <= 0.5 else 'missed'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", help="a SHOT checkout or its git directory (tim-learn/SHOT)")
    ap.add_argument("--data-root", default=os.environ.get("DFKT_DATA", "../shared/data"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--variants", default="shot",
                    help="comma-separated sfda-digits method entries for the dfkt side, each optionally with "
                         "train settings: 'shot', 'shot-paper', 'shot:memory_format=contiguous' (use ';' between "
                         "variants that carry several settings)")
    ap.add_argument("--source-epochs", type=int, default=None, help="shorter source training (timing only)")
    ap.add_argument("--cache", default="bench-out/sfda-digits/cache", help="cached source models")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train setting for the dfkt side, e.g. memory_format=contiguous")
    ap.add_argument("--out", default="bench-out/shot-vs-official")
    ap.add_argument("--worker", nargs=2, metavar=("SIDE", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        side, payload = args.worker
        out = (worker_dfkt if side == "dfkt" else worker_official)(json.loads(payload))
        print(json.dumps(out))
        return
    if not args.official:
        ap.error("--official is required (a SHOT checkout or its git directory)")
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    sep = ";" if ";" in args.variants else ","
    variants = [v for v in args.variants.split(sep) if v]
    import yaml

    train_set = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        train_set[k] = yaml.safe_load(v)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="shot-vs-official-"))
    official_dir = _official_dir(args.official, tmp / "official")
    repo = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join([str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    sources = _sources(seeds, args.data_root, cache, args.source_epochs, tmp)
    target = _target(args.data_root)
    runs = []
    for i, seed in enumerate(seeds):
        model, path, recipe = sources[seed]
        state = _official_state(model)
        work = tmp / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        for part, sd in state.items():
            torch.save(sd, work / f"source_{part}.pt")
        diff = check_export(official_dir, model, state, target)
        if diff > 1e-4:
            raise SystemExit(f"the exported source differs from dfkt's (max |logit diff| {diff:.2g})")
        jobs = [("dfkt", {"variant": v, "seed": seed, "epochs": args.epochs, "source": str(path),
                          "data_root": args.data_root, "train": train_set}) for v in variants]
        jobs.append(("official", {"seed": seed, "epochs": args.epochs, "official_dir": str(official_dir),
                                  "work_dir": str(work), "data_root": args.data_root, "source_check": diff}))
        if i % 2:
            jobs.reverse()
        for side, payload in jobs:
            load = os.getloadavg()[0]
            rec = _spawn(side, payload, pythonpath)
            rec["load_avg_1min_at_start"] = round(load, 2)
            runs.append(rec)
            print(f"seed {seed} {side:8s} {rec.get('variant', ''):10s} {rec['per_epoch_s']:.3f} s/epoch, "
                  f"wall {rec['wall_s']:.1f} s, acc {rec['acc']:.2f} (load {load:.1f})", flush=True)
    sides = {}
    for rec in runs:
        name = rec["variant"] if rec["side"] == "dfkt" else "official"
        sides.setdefault(name, []).append(rec)
    summary = {"sides": {}, "ratios": {}}
    for name, recs in sides.items():
        summary["sides"][name] = {"seeds": [r["seed"] for r in recs],
                                  "per_epoch_s": statistics.mean(r["per_epoch_s"] for r in recs),
                                  "cpu_per_epoch_s": statistics.mean(r["cpu_per_epoch_s"] for r in recs),
                                  "wall_per_epoch_s": statistics.mean(r["wall_per_epoch_s"] for r in recs),
                                  "cpu_s": statistics.mean(r["cpu_s"] for r in recs),
                                  "acc": statistics.mean(r["acc"] for r in recs), "accs": [r["acc"] for r in recs]}
    off = {r["seed"]: r for r in sides["official"]}
    o = summary["sides"]["official"]
    for name in variants:
        d = summary["sides"][name]
        summary["ratios"][name] = {
            "per_epoch": d["per_epoch_s"] / o["per_epoch_s"], "wall_per_epoch": d["wall_per_epoch_s"] / o["wall_per_epoch_s"],
            "cpu_per_epoch": d["cpu_per_epoch_s"] / o["cpu_per_epoch_s"],
            "cpu": d["cpu_s"] / o["cpu_s"],
            "per_seed": [r["per_epoch_s"] / off[r["seed"]]["per_epoch_s"] for r in sides[name]]}

    def _git(d, *cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=d, capture_output=True, text=True).stdout.strip() or "?"
        except OSError:
            return "?"

    spec = Path(args.official)
    off_commit = (_git(spec, "--git-dir", str(spec), "rev-parse", "HEAD") if not (spec / "digit").is_dir()
                  else _git(spec, "rev-parse", "HEAD"))
    res = {"task": TASK, "epochs": args.epochs, "seeds": seeds, "variants": variants, "dfkt_train": train_set,
           "command": "PYTHONPATH=$PWD python " + " ".join(shlex.quote(x) for x in
                                                         [str(Path(__file__).relative_to(repo))] + sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "dfkt_commit": _git(repo, "rev-parse", "--short", "HEAD"),
           "official_commit": off_commit[:12], "source_recipe": sources[seeds[0]][2],
           "runs": runs, "summary": summary}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "report.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
