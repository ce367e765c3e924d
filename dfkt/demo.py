"""`dfkt demo`: both branches on scikit-learn's embedded digits, in a few minutes on a laptop CPU.

1. SFDA: a source model (SHOT's LeNet + bottleneck + weight-norm head) trained on clean digits is
   adapted, without its source data, to a corrupted copy of the digits (brightness, severity 5).
2. DFKD: a LeNet-5 teacher trained on the digits is distilled into LeNet-5-half with no data at all.

Floors it checks: SFDA target accuracy >= source-only + 5 points on a shift where source-only loses
>= 15 points to in-domain accuracy; DFKD student >= 90 % of the teacher's accuracy.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from .bench.report import markdown, write_report
from .bench.runner import _domain, cached_supervised, env_info, run_suite
from .bench.suite import MethodRun, ModelRecipe, QuickSpec, Suite, TaskSpec
from .runconfig import DataRef
from .core.device import resolve_device
from .core.evaluate import evaluate

log = logging.getLogger("dfkt.demo")

SFDA_METHOD = "shot"
DFKD_METHOD = "dafl"
SHIFT = DataRef(domain="digits", corruption="brightness", severity=5, corruption_seed=0)

SFDA_SUITE = Suite(
    suite="demo-sfda", task="sfda", seeds=1,
    source=ModelRecipe(model="shot-lenet", options={"smoothing": 0.1, "epochs": 20, "lr": 0.01, "batch_size": 64}),
    methods={"source-only": MethodRun(), SFDA_METHOD: MethodRun(train={"epochs": 10})},
    tasks=[TaskSpec(name="uci → uci-c", source=DataRef(domain="digits"), target=SHIFT)],
    quick=QuickSpec())

DFKD_SUITE = Suite(
    suite="demo-dfkd", task="dfkd", seeds=1, student="lenet5-half", input_shape=[1, 32, 32],
    teachers={"lenet5": ModelRecipe(model="lenet5", options={"epochs": 30, "lr": 0.05, "schedule": "cosine",
                                                             "batch_size": 64},
                                    train_split="train", val_split=None)},
    methods={DFKD_METHOD: MethodRun(teacher="lenet5", options={"pool_batches": 100, "kd_steps": 4},
                                    train={"epochs": 10, "iters_per_epoch": 25, "batch_size": 128})},
    tasks=[TaskSpec(name="uci (32x32)", source=DataRef(domain="digits", size=32, split="train"),
                    target=DataRef(domain="digits", size=32, split="test"))],
    quick=QuickSpec())


def run_demo(out: str | None = None, device: str = "auto", progress: bool = True) -> int:
    outdir = Path(out) if out else Path(tempfile.mkdtemp(prefix="dfkt-demo-"))
    outdir.mkdir(parents=True, exist_ok=True)
    cache = outdir / "cache"
    dev = resolve_device(device)
    log.info("dfkt demo: SFDA (%s) and DFKD (%s) on the embedded digits; output in %s", SFDA_METHOD, DFKD_METHOD,
             outdir)
    sfda = run_suite(SFDA_SUITE, outdir / "sfda", cache_dir=str(cache), device=device, progress=progress)
    dfkd = run_suite(DFKD_SUITE, outdir / "dfkd", cache_dir=str(cache), device=device, progress=progress)
    # in-domain accuracy of the (cached) source model, to show the size of the shift
    src = cached_supervised(SFDA_SUITE.source, DataRef(domain="digits"), 0, None, cache, device, 10)
    in_domain = evaluate(src.to(dev), _domain(DataRef(domain="digits"), None, "source_val"), dev)["acc"]
    for r in dfkd["records"]:
        if r.get("grid"):
            r["grid"] = f"dfkd/{r['grid']}"
    doc = {"suite": "demo", "command": "dfkt demo", "quick": False, "env": env_info(dev),
           "records": sfda["records"] + dfkd["records"], "in_domain_acc": in_domain,
           "suite_wall_s": round(sfda.get("suite_wall_s", 0) + dfkd.get("suite_wall_s", 0), 1)}
    (outdir / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    write_report(doc, outdir)

    ad = next(r for r in sfda["records"] if r["method"] == SFDA_METHOD)
    kd = dfkd["records"][0]
    checks = [
        (f"shift: source-only loses >= 15 points to in-domain ({in_domain:.1f} -> {ad['ref_acc']:.1f})",
         in_domain - ad["ref_acc"] >= 15),
        (f"SFDA {SFDA_METHOD}: target acc >= source-only + 5 ({ad['acc']:.1f} vs {ad['ref_acc']:.1f})",
         ad["acc"] >= ad["ref_acc"] + 5),
        (f"DFKD {DFKD_METHOD}: student >= 90 % of teacher ({kd['acc']:.1f} vs {kd['ref_acc']:.1f}: "
         f"{100 * kd['acc'] / kd['ref_acc']:.1f} %)", kd["acc"] >= 0.9 * kd["ref_acc"]),
    ]
    print(markdown(doc))
    print(f"in-domain accuracy of the source model (clean digits, held-out 10 %): {in_domain:.2f} %\n")
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    print(f"\nresults: {outdir / 'results.json'}\nreport:  {outdir / 'report.md'}")
    return 0 if all(ok for _, ok in checks) else 1
