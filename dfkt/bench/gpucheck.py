"""Throughput of dfkt's own training steps on random data, for ``benchmarks/gpu-check.sh``.

Two workloads, timed through the methods' real ``setup`` / ``epoch_begin`` / ``batches`` / ``step``
(the loop's work per step, AMP included, without evaluation or checkpoints):

- ``shot-resnet50``: a SHOT step (information maximisation + clustering pseudo-label CE) adapting
  dfkt's ``resnet50`` (torchvision ResNet-50 + bottleneck + weight-norm head, random weights) at 224x224;
- ``dafl-resnet34-resnet18``: a DAFL iteration (generator step against the teacher + KD step of the
  student) from ``resnet34-cifar`` to ``resnet18-cifar`` at 32x32.

samples/s = batch size x timed steps / time (after warm-up steps; CUDA synchronised). ``--dry`` runs
the same code on the CPU with tiny batches and images for 2 steps: a check that the code runs, not a
measurement. Results: ``<out>/gpu-check.json`` and a Markdown section ``<out>/gpu-check.md`` (with the
test-suite and demo outcomes the shell script left in ``<out>``); ``--publish`` puts that section into
benchmarks/RESULTS.md (CUDA runs only).

    python -m dfkt.bench.gpucheck --out bench-out/gpu-check [--dry] [--publish]
    python -m dfkt.bench.gpucheck --publish-from bench-out/gpu-check/gpu-check.json   # a saved CUDA run
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..core.device import synchronize
from ..errors import DfktError

log = logging.getLogger("dfkt.gpucheck")

SECTION = "gpu-check"


@dataclass
class Workload:
    name: str
    method: str          # a registered method
    task: str            # sfda | dfkd
    model: str           # the learner (SFDA: adapted model; DFKD: student)
    teacher: str | None  # DFKD teacher
    size: int            # image side
    classes: int
    batch: int           # per step (GPU)
    dry_batch: int
    dry_size: int
    options: dict = field(default_factory=dict)   # method options over its defaults


WORKLOADS = (
    Workload("shot-resnet50", "shot", "sfda", "resnet50", None, 224, 12, batch=256, dry_batch=2, dry_size=64),
    Workload("dafl-resnet34-resnet18", "dafl", "dfkd", "resnet18-cifar", "resnet34-cifar", 32, 10, batch=1024,
             dry_batch=4, dry_size=32, options={"kd_steps": 1, "pool_batches": 0}),   # one KD step on the fresh batch
)


def _method(w: Workload, device: torch.device, batch: int, size: int, n_steps: int):
    """The method object of ``w`` on ``device``, set up as the API would (random weights, random data)."""
    from ..api import split_options
    from ..core.context import Context
    from ..core.device import seed_everything
    from ..models import build_model
    from ..registry import get_method

    cls = get_method(w.method, task=w.task)
    rng = seed_everything(0)
    train = {"batch_size": batch, "epochs": 1, "device": str(device), "progress": False}
    shape = (3, size, size)
    if w.task == "sfda":
        model = build_model(w.model, num_classes=w.classes)
        learner = model.to(device)
        teacher = copy.deepcopy(learner).eval().requires_grad_(False)
        n = batch * n_steps
        target = TensorDataset(torch.randn(n, *shape), torch.randint(0, w.classes, (n,)))
        opts, tc = split_options(cls, {}, train)
        ctx = Context(learner=learner, teacher=teacher, train=tc, device=device, num_classes=w.classes,
                      input_shape=shape, target=target, rng=rng)
    else:
        teacher = build_model(w.teacher, num_classes=w.classes).to(device).eval().requires_grad_(False)
        learner = build_model(w.model, num_classes=w.classes).to(device)
        opts, tc = split_options(cls, dict(w.options), {**train, "iters_per_epoch": n_steps})
        ctx = Context(learner=learner, teacher=teacher, train=tc, device=device, num_classes=w.classes,
                      input_shape=shape, rng=rng)
    return cls(ctx, opts)


def measure(w: Workload, device: torch.device, batch: int, size: int, steps: int, warmup: int) -> dict:
    """Time ``steps`` steps of workload ``w`` after ``warmup`` untimed ones; samples/s and peak memory."""
    m = _method(w, device, batch, size, warmup + steps)
    m.setup()
    m.epoch_begin(0)            # SHOT: the pseudo-labelling pass over the target (not timed)
    it = iter(m.batches())
    terms = {}
    for _ in range(warmup):
        terms = m.step(next(it))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        terms = m.step(next(it))
    synchronize(device)
    dt = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(v).all()) for v in terms.values())
    out = {"name": w.name, "method": w.method, "model": w.model, "teacher": w.teacher,
           "input": f"3x{size}x{size}", "batch": batch, "steps": steps, "warmup": warmup,
           "amp": str(m.ctx.amp_dtype).replace("torch.", "") if m.ctx.amp_dtype else "off",
           "time_s": round(dt, 4), "step_ms": round(1000 * dt / steps, 2),
           "samples_per_s": round(batch * steps / dt, 1), "finite_loss": finite}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return out


def _read(out: Path, name: str) -> str | None:
    p = out / name
    return p.read_text(errors="replace").strip() if p.is_file() else None


def _stage(out: Path, name: str) -> dict:
    """The outcome of a stage the shell script ran (``<name>.rc`` and the tail of ``<name>.log``)."""
    rc = _read(out, f"{name}.rc")
    if rc is None:
        return {"ran": False}
    lines = (_read(out, f"{name}.log") or "").splitlines()
    return {"ran": True, "rc": int(rc) if rc.lstrip("-").isdigit() else rc, "tail": lines[-8:]}


def environment(device: torch.device) -> dict:
    from .. import __version__

    env = {"dfkt": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_mem_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    return env


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"## GPU check{' (CPU dry run: not a measurement)' if doc['dry'] else ''}", "",
             "Command:", "", f"    {doc['command']}", "",
             f"Environment: dfkt {env['dfkt']}, torch {env['torch']} (CUDA {env['cuda']}), device `{env['device']}`"
             + (f", {env['gpu']} ({env['gpu_mem_gib']} GiB)" if "gpu" in env else "") + f", {env['platform']}.", ""]
    for name, what in (("tests", "Test suite with `DFKT_TEST_DEVICE=cuda`"), ("demo", "`dfkt demo --device cuda` (AMP)")):
        st = doc[name]
        if not st["ran"]:
            lines.append(f"- {what}: not run.")
        else:
            last = next((t for t in reversed(st["tail"]) if t.strip()), "")
            lines.append(f"- {what}: exit {st['rc']}{' (passed)' if st['rc'] == 0 else ' (FAILED)'}; `{last[:200]}`")
    lines += ["", "Throughput (random data, random weights; samples/s = batch x timed steps / time):", "",
              "| workload | input | batch | AMP | step ms | samples/s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in doc["throughput"]:
        what = f"{r['method']} {r['teacher']} -> {r['model']}" if r["teacher"] else f"{r['method']} {r['model']}"
        lines.append(f"| {what} | {r['input']} | {r['batch']} | {r['amp']} | {r['step_ms']} | {r['samples_per_s']} | "
                     f"{r.get('peak_mem_gib', '-')} |")
    return "\n".join(lines) + "\n"


def run(out: Path, dry: bool, steps: int, warmup: int, command: str, batches: dict[str, int] | None = None) -> dict:
    device = torch.device("cpu") if dry else torch.device("cuda")
    if not dry and not torch.cuda.is_available():
        raise DfktError("no CUDA device: the GPU throughput run needs one; use --dry for the CPU dry path.")
    if dry:
        steps, warmup = 2, 0
    rows = []
    for w in WORKLOADS:
        batch = w.dry_batch if dry else (batches or {}).get(w.name, w.batch)
        size = w.dry_size if dry else w.size
        log.info("gpu-check: %s, batch %d at %dx%d on %s", w.name, batch, size, size, device)
        while True:
            try:
                r = measure(w, device, batch, size, steps, warmup)
                break
            except torch.OutOfMemoryError:
                if batch < 16:
                    raise
                batch //= 2       # the default batch did not fit this GPU: halve it (recorded in the results)
                torch.cuda.empty_cache()
                log.warning("gpu-check: %s ran out of GPU memory; retrying with batch %d", w.name, batch)
        log.info("gpu-check: %s: %.1f samples/s (%.1f ms per step)", w.name, r["samples_per_s"], r["step_ms"])
        rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    doc = {"dry": dry, "command": command, "environment": environment(device), "tests": _stage(out, "tests"),
           "demo": _stage(out, "demo"), "throughput": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(doc, indent=1))
    (out / "gpu-check.md").write_text(markdown(doc))
    return doc


def publish(doc: dict, results_md: Path) -> Path:
    from .report import write_section

    if doc["dry"]:
        raise DfktError("a CPU dry run is not a measurement: only a CUDA run is published to RESULTS.md.")
    return write_section(results_md, SECTION, markdown(doc))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dfkt.bench.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out/gpu-check", help="folder for gpu-check.json / gpu-check.md")
    p.add_argument("--dry", action="store_true", help="CPU, tiny batches, 2 steps: the code runs (no figures)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per workload (GPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (GPU)")
    for w in WORKLOADS:
        p.add_argument(f"--batch-{w.name.split('-')[0]}", type=int, default=w.batch, help=f"{w.name} batch size")
    p.add_argument("--publish", action="store_true", help="write the section into benchmarks/RESULTS.md")
    p.add_argument("--command", default=None, help="the command to record (default: this one)")
    p.add_argument("--publish-from", default=None, metavar="JSON",
                   help="publish a gpu-check.json a CUDA run wrote (e.g. copied back from a GPU machine), measuring "
                        "nothing here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.backends.cudnn.benchmark = True
    batches = {w.name: getattr(a, f"batch_{w.name.split('-')[0]}") for w in WORKLOADS}
    command = a.command or "python -m dfkt.bench.gpucheck " + " ".join(sys.argv[1:] if argv is None else argv)
    from .suite import SUITE_DIR

    try:
        if a.publish_from:          # a saved CUDA run (e.g. copied back from a GPU machine): measure nothing
            doc = json.loads(Path(a.publish_from).read_text())
            print(f"published to {publish(doc, SUITE_DIR / 'RESULTS.md')}")
            return 0
        doc = run(Path(a.out), a.dry, a.steps, a.warmup, command, batches)
        print(markdown(doc))
        if a.publish:
            print(f"published to {publish(doc, SUITE_DIR / 'RESULTS.md')}")
    except DfktError as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 2
    bad = [r["name"] for r in doc["throughput"] if not r["finite_loss"]]
    if bad:
        print(f"gpu-check: non-finite loss in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
