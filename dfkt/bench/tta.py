"""The ``tta`` bench task: online test-time adaptation of a cached source model on corruption streams.

A suite task names the source model's training domain (``source``), the clean test data (``target``)
and the stream (``stream``: corruptions, severity, protocol; :class:`dfkt.online.config.StreamSpec`).
One run = (task, method, seed): the source model of that seed is adapted online on the stream (its
order drawn with the same seed) and gives one record per corruption: ``protocol``, ``method``
(``source`` = unadapted), ``corruption``, ``err`` (% of that corruption's samples predicted wrongly
before the update on their batch), ``samples_per_s`` (the whole stream, this run's torch threads)
and ``seed``. The report tabulates the error per corruption and the mean, per protocol, as the public
test-time-adaptation tables do, and checks the suite's floors.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from ..config import config_hash, to_dict
from ..errors import ConfigError
from .report import suite_time


_SEGMENTS: dict[str, object] = {}      # corrupted test sets, built once per process


def _segment(spec, root: Optional[str]):
    from .runner import _domain

    key = config_hash({"spec": to_dict(spec), "root": str(root)})
    if key not in _SEGMENTS:
        _SEGMENTS[key] = _domain(spec, root)
    return _SEGMENTS[key]


def validate(suite) -> None:
    """A tta suite needs a source recipe and, per task, source/target domains and a stream."""
    if suite.source is None:
        raise ConfigError(f"suite {suite.suite!r}: a tta suite needs a `source` recipe (the model to adapt).")
    for t in suite.tasks:
        missing = [k for k in ("source", "target", "stream") if getattr(t, k) is None]
        if missing:
            raise ConfigError(f"suite {suite.suite!r}: tta task {t.name!r} needs {', '.join(missing)} (source: the "
                              f"source model's domain; target: the clean test data; stream: corruptions, "
                              f"severity, protocol).")


def run_tta(suite, task, name: str, seed: int, root, cache: Path, device: str, override, progress: bool,
            out: Path) -> list[dict]:
    """One (task, method, seed): the records of every corruption of the stream."""
    from ..online.api import tta
    from .runner import _base_model, _domain, _domain_label, _merge, cached_supervised

    recipe, model_seed = _base_model(suite, task, name, seed)
    model = cached_supervised(recipe, task.source, model_seed, root, cache, device, suite.num_classes)

    def make(corruption, severity, corruption_seed):
        return _segment(dataclasses.replace(task.target, corruption=corruption, severity=severity,
                                            corruption_seed=corruption_seed), root)

    stream = task.stream.build(make, seed)
    source_data = _domain(task.source, root, recipe.train_split)
    run = suite.methods[name]
    opts, train = _merge(run, override)
    train.setdefault("progress", progress)
    res = tta(model, stream, method=run.method or name, seed=seed, device=device, train=train,
              source_data=source_data, **opts)
    counts = torch.bincount(res.segment, minlength=len(res.segment_names)).tolist()
    common = {"task": "tta", "method": name, "protocol": res.protocol, "source": _domain_label(task.source),
              "target": _domain_label(task.target), "severity": task.stream.severity,
              "batch_size": res.config["train"]["batch_size"], "samples_per_s": round(res.samples_per_s, 1),
              "wall_s": round(res.wall_s, 3), "stream_err": round(res.err, 3)}
    return [{**common, "corruption": c, "err": round(e, 3), "samples": counts[i]}
            for i, (c, e) in enumerate(res.errors().items())]


# ----------------------------------------------------------------------------- report
def is_tta(doc: dict) -> bool:
    return bool(doc.get("records")) and all(r.get("task") == "tta" for r in doc["records"])


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def table(records: list[dict]) -> dict:
    """{task_name: {"corruptions": [...], "rows": {method: row}}}; a row holds the seed-mean error per
    corruption, the mean over corruptions (mean and std over seeds), samples/s and the seed count."""
    out: dict = {}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task_name"]].append(r)
    for task, rs in by_task.items():
        corruptions = list(dict.fromkeys(r["corruption"] for r in rs))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        rows = {}
        for m in methods:
            mr = [r for r in rs if r["method"] == m]
            seeds = sorted({r["seed"] for r in mr})
            per_c = {c: _mean([r["err"] for r in mr if r["corruption"] == c]) for c in corruptions}
            per_seed = [_mean([r["err"] for r in mr if r["seed"] == s]) for s in seeds]
            sps = _mean([next(r["samples_per_s"] for r in mr if r["seed"] == s) for s in seeds])
            rows[m] = {"per_corruption": per_c, "mean": _mean(per_seed), "std": _std(per_seed), "seeds": len(seeds),
                       "samples_per_s": sps, "protocol": mr[0]["protocol"], "source": mr[0]["source"],
                       "threads": sorted({r.get("torch_threads") for r in mr}, key=str)}
        out[task] = {"corruptions": corruptions, "rows": rows}
    return out


def floors(records: list[dict], baseline: str = "source", tent: str = "tent") -> list[str]:
    """The suite's floors, one line each, saying plainly which hold and which do not (with figures)."""
    tab = table(records)
    lines = []
    by_source: dict[str, dict[str, dict]] = defaultdict(dict)
    for task, t in tab.items():
        any_row = next(iter(t["rows"].values()))
        by_source[any_row["source"]][any_row["protocol"]] = {"task": task, **t}
    for src, protos in by_source.items():
        for proto, t in protos.items():
            rows = t["rows"]
            if baseline not in rows:
                continue
            base = rows[baseline]
            worse = [f"{m} {r['mean']:.2f}" for m, r in rows.items() if m != baseline and r["mean"] > base["mean"]]
            lines.append(f"- {t['task']}: every method's mean error <= {baseline} ({base['mean']:.2f}): "
                         + ("**met**" if not worse else f"**MISSED** by {', '.join(worse)}"))
            if proto == "reset":
                bad = [f"{m} on {c} {r['per_corruption'][c]:.2f} vs {base['per_corruption'][c]:.2f}"
                       for m, r in rows.items() if m != baseline for c in t["corruptions"]
                       if r["per_corruption"][c] > base["per_corruption"][c] + 1.0]
                lines.append(f"- {t['task']}: no method's error on any corruption > {baseline} + 1: "
                             + ("**met**" if not bad else f"**MISSED**: {'; '.join(bad)}"))
            if proto == "continual" and tent in rows:
                best_m, best = min(((m, r) for m, r in rows.items() if m != baseline), key=lambda kv: kv[1]["mean"])
                gap = rows[tent]["mean"] - best["mean"]
                lines.append(f"- {t['task']}: best method ({best_m} {best['mean']:.2f}) <= {tent} "
                             f"({rows[tent]['mean']:.2f}) - 2: " + ("**met**" if gap >= 2.0 else
                                                                      f"**MISSED** (only {gap:.2f} points better)"))
    return lines


_SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "speckle_noise": "speck",
          "gaussian_blur": "gblur", "motion_blur": "motn", "pixelate": "pixel", "contrast": "contr",
          "brightness": "brit", "elastic": "elast", "invert": "invrt", "stripe": "strip", "dotted_line": "dotln",
          "zigzag": "zigzg", "rotate": "rot", "shear": "shear", "scale": "scale", "translate": "trans"}


def markdown(doc: dict) -> str:
    env = doc.get("env", {})
    out = [f"# Suite `{doc['suite']}`{' (quick)' if doc.get('quick') else ''}", ""]
    if doc.get("command"):
        out += ["Command:", "", f"    {doc['command']}", ""]
    out += [f"Environment: dfkt {env.get('dfkt')}, torch {env.get('torch')}, device `{env.get('device')}`, "
            f"{env.get('cpu_count')} CPUs / {env.get('torch_threads')} torch threads, {env.get('platform')}.",
            f"{suite_time(doc)}.", "",
            "Online test-time adaptation: every batch is predicted before the model adapts on it; `err` is the "
            "error % of those predictions per corruption (mean over seeds), `mean` the mean over corruptions "
            "(± std over seeds), `samples/s` the throughput over the whole stream with the torch threads listed. "
            "`source` is the unadapted model.", ""]
    abbrev = [f"`{v}` = {k}" for k, v in _SHORT.items()
              if any(k in t["corruptions"] for t in table(doc["records"]).values())]
    for task, t in table(doc["records"]).items():
        cs = t["corruptions"]
        proto = next(iter(t["rows"].values()))["protocol"]
        out += [f"## {task} ({proto})", ""]
        out.append("| method | " + " | ".join(_SHORT.get(c, c) for c in cs) + " | mean | samples/s | threads | seeds |")
        out.append("|---|" + "---|" * (len(cs) + 4))
        for m, r in t["rows"].items():
            cells = " | ".join(f"{r['per_corruption'][c]:.1f}" for c in cs)
            out.append(f"| {m} | {cells} | **{r['mean']:.2f}** ± {r['std']:.2f} | {r['samples_per_s']:.0f} | "
                       f"{', '.join(str(x) for x in r['threads'])} | {r['seeds']} |")
        out.append("")
    if abbrev:
        out += ["Corruptions (severity " + ", ".join(sorted({str(r.get('severity')) for r in doc['records']}))
                + "): " + ", ".join(abbrev) + ".", ""]
    lines = floors(doc["records"])
    if lines:
        out += ["## Floors", ""] + lines + [""]
    return "\n".join(out) + "\n"


def plots(doc: dict, out: Path) -> list[Path]:
    """Called by report.plots, which checked that matplotlib is there and chose its Agg backend."""
    import matplotlib.pyplot as plt

    tab = table(doc["records"])
    if not tab:
        return []
    tasks = list(tab)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = tab[task]["rows"]
        names = list(rows)
        ax.barh(names, [rows[m]["mean"] for m in names], xerr=[rows[m]["std"] for m in names], color="#4c72b0")
        if "source" in rows:
            ax.axvline(rows["source"]["mean"], color="k", ls="--", lw=1)
        ax.invert_yaxis()
        ax.set_title(task, fontsize=8)
        ax.set_xlabel("mean error % (lower is better)")
    fig.tight_layout()
    p = Path(out) / "tta_error.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]

