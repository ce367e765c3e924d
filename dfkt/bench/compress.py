"""Compress suites: each (task, recipe, seed) compresses the cached source model into the task's student
with :func:`dfkt.compress`; records, report tables (with the issue's floors) and the accuracy-vs-size plot.

A record: ``method`` (the recipe: ``adapt-kd-st``, ``baseline-a``...), ``student`` (the suite's key),
``acc`` (the student on the target), ``teacher_acc`` (the adapted teacher, for recipes that adapt it),
``ref_acc`` (the unadapted source model), ``student_params``, ``teacher_params``, ``wall_s`` (the whole
compress call), ``stages``, ``heldout``.

The suite's cache folder also keeps baseline-b's data-free stage (``dfkt.compress(cache=...)``): it never reads
the target, so each (source model, student, seed) distils once and the source's other targets reuse it; the
record counts the reused stage at its original wall time (its stage row says ``reused``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .. import compression
from ..errors import ConfigError
from ..models import build_model
from .report import _f, _mean_std, header, suite_time

BASELINE_A = "baseline-a"


def run_compress(suite, task, name: str, seed: int, root, cache: Path, device: str, override, progress: bool,
                 out: Path) -> dict:
    from .runner import _acc, _base_model, _domain, _domain_label, _merge, cached_supervised

    if task.source is None or task.target is None:
        raise ConfigError(f"compress task {task.name!r} needs `source` and `target` domains.")
    recipe, source_seed = _base_model(suite, task, name, seed)
    source = cached_supervised(recipe, task.source, source_seed, root, cache, device, suite.num_classes)
    target = _domain(task.target, root)
    spec = suite.students[task.student]
    student = build_model(spec.model, num_classes=suite.num_classes, seed=seed, **spec.kwargs)
    run = suite.methods[name]
    opts, train = _merge(run, override)
    res = compression.api.compress(source, student, target, method=run.method or name, seed=seed, device=device,
                                   progress=progress, train=train, cache=cache / "stages", **opts)
    m = res.metrics
    return {"task": "compress", "method": name, "recipe": run.method or name, "source": _domain_label(task.source),
            "target": _domain_label(task.target), "heldout": task.heldout, "student": task.student,
            "student_model": spec.model, "acc": _acc(m.get("acc")), "teacher_acc": _acc(m.get("teacher_acc")),
            "ref_acc": _acc(m.get("ref_acc")), "student_params": int(m["student_params"]),
            "teacher_params": int(m["teacher_params"]), "wall_s": round(res.wall_s, 3),
            "guard_fired": bool((res.guard or {}).get("fired", False)), "stages": res.stages,
            "curve": [[r["time_s"], r["acc"]] for r in res.history.records if "acc" in r and "time_s" in r]}


def is_compress(doc: dict) -> bool:
    return any(r.get("task") == "compress" for r in doc.get("records", []))


def _task_means(records: list[dict], key: str) -> dict:
    """(task_name) -> mean of ``key`` over its records that have it."""
    by: dict[str, list] = defaultdict(list)
    for r in records:
        if r.get(key) is not None:
            by[r["task_name"]].append(r[key])
    return {t: _mean_std(v)[0] for t, v in by.items()}


def summary(records: list[dict]) -> list[dict]:
    """One row per (method, student): means over tasks (each task's mean over seeds) of the student's
    accuracy (all / held-out / dev), of the adapted teacher and of the source model, and the wall time."""
    recs = [r for r in records if r.get("task") == "compress"]
    teacher = _task_means(recs, "teacher_acc")     # the adapted teacher of each task (any recipe that adapts)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        groups[(r["method"], r["student"])].append(r)
    rows = []
    for (method, student), rs in groups.items():
        acc = _task_means(rs, "acc")
        ref = _task_means(rs, "ref_acc")
        wall = _task_means(rs, "wall_s")
        held = {r["task_name"]: bool(r.get("heldout")) for r in rs}
        mean = lambda d, keys: _mean_std([d[k] for k in keys if k in d])[0]   # noqa: E731
        tasks = sorted(acc)
        rows.append({"method": method, "student": student, "student_params": rs[0]["student_params"],
                     "teacher_params": rs[0]["teacher_params"], "tasks": len(tasks), "runs": len(rs),
                     "acc": mean(acc, tasks), "heldout_acc": mean(acc, [t for t in tasks if held[t]]),
                     "dev_acc": mean(acc, [t for t in tasks if not held[t]]),
                     "teacher_acc": mean(teacher, tasks), "ref_acc": mean(ref, tasks), "wall_s": mean(wall, tasks),
                     "guard_fired": sum(bool(r.get("guard_fired")) for r in rs)})
    return sorted(rows, key=lambda r: (r["student_params"], -(r["acc"] if not math.isnan(r["acc"]) else -1)))


def floors(rows: list[dict], recipe: str = compression.DEFAULT) -> list[str]:
    """The issue's floors for ``recipe``, per student: >= adapted teacher - 1, >= each baseline, wall time
    <= 1.5x baseline-a's."""
    out = []
    for student in sorted({r["student"] for r in rows}):
        mine = {r["method"]: r for r in rows if r["student"] == student}
        me = mine.get(recipe)
        if me is None:
            continue
        checks = [f"student acc {_f(me['acc'])} >= adapted teacher {_f(me['teacher_acc'])} - 1: "
                  f"{'yes' if me['acc'] >= me['teacher_acc'] - 1 else 'NO'}"]
        for b in sorted(k for k in mine if k.startswith("baseline-")):
            checks.append(f">= {b} {_f(mine[b]['acc'])}: {'yes' if me['acc'] >= mine[b]['acc'] else 'NO'}")
        if BASELINE_A in mine and mine[BASELINE_A]["wall_s"]:
            ratio = me["wall_s"] / mine[BASELINE_A]["wall_s"]
            checks.append(f"wall time {ratio:.2f}x baseline-a's (<= 1.5x: {'yes' if ratio <= 1.5 else 'NO'})")
        out.append(f"- student `{student}` ({me['student_params']:,} parameters, "
                   f"{100 * me['student_params'] / me['teacher_params']:.1f} % of the teacher): " + "; ".join(checks))
    return out


def markdown(doc: dict) -> str:
    recs = [r for r in doc["records"] if r.get("task") == "compress"]
    out = header(doc, recs)
    out += [f"{suite_time(doc)}; {len(recs)} runs.", ""]
    rows = summary(recs)
    out += ["## Summary over tasks", "",
            "Each mean is over tasks (each task's mean over seeds). `adapted teacher` is the source model after "
            "the adaptation stage (baseline-a's and the recipe's, same method and seed); `source-only` the "
            "unadapted source model; `time` the whole compress call (all stages).", "",
            "| method | student | params | student acc % | held-out % | dev % | adapted teacher % | source-only % "
            "| time s | runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['student']} | {r['student_params']:,} | {_f(r['acc'])} | "
                   f"{_f(r['heldout_acc'])} | {_f(r['dev_acc'])} | {_f(r['teacher_acc'])} | {_f(r['ref_acc'])} | "
                   f"{_f(r['wall_s'])} | {r['runs']} |")
    out += ["", f"Floors of dfkt's recipe (`{compression.DEFAULT}`):", ""] + floors(rows) + [""]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        by_task[r["task_name"]].append(r)
    for task, rs in by_task.items():
        out += [f"## {task}{' (held-out)' if rs[0].get('heldout') else ''}", "",
                "| method | student | student acc % (mean ± std) | adapted teacher % | source-only % | time s | seeds "
                "| per seed |", "|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in rs:
            groups[(r["method"], r["student"])].append(r)
        teacher = _mean_std([r.get("teacher_acc") for r in rs])[0]
        for (method, student), g in sorted(groups.items(), key=lambda kv: -_mean_std([r["acc"] for r in kv[1]])[0]):
            acc, sd = _mean_std([r["acc"] for r in g])
            wall, _ = _mean_std([r["wall_s"] for r in g])
            ref, _ = _mean_std([r["ref_acc"] for r in g])
            per = ", ".join(_f(r["acc"]) for r in sorted(g, key=lambda r: r["seed"]))
            out.append(f"| {method} | {student} | {_f(acc)} ± {_f(sd)} | {_f(teacher)} | {_f(ref)} | {_f(wall)} "
                       f"| {len(g)} | {per} |")
        out.append("")
    out.append("Student accuracy is that of the returned student (never selected with target labels).")
    return "\n".join(out) + "\n"


def plots(doc: dict, out: Path) -> list[Path]:
    """Called by report.plots, which checked that matplotlib is there and chose its Agg backend."""
    import matplotlib.pyplot as plt

    rows = [r for r in summary(doc["records"]) if not math.isnan(r["acc"])]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, method in enumerate(sorted({r["method"] for r in rows})):
        rs = sorted([r for r in rows if r["method"] == method], key=lambda r: r["student_params"])
        ax.plot([r["student_params"] for r in rs], [r["acc"] for r in rs], "-o", color=f"C{i % 10}", label=method)
    teacher = _mean_std([r["teacher_acc"] for r in rows])[0]
    ref = _mean_std([r["ref_acc"] for r in rows])[0]
    if not math.isnan(teacher):
        ax.axhline(teacher, color="k", ls="--", lw=1, label="adapted teacher")
    if not math.isnan(ref):
        ax.axhline(ref, color="grey", ls=":", lw=1, label="source model (unadapted)")
    ax.set_xscale("log")
    ax.set_xlabel(f"student parameters (teacher: {rows[0]['teacher_params']:,})")
    ax.set_ylabel("target accuracy % (mean over tasks)")
    ax.set_title(doc["suite"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "accuracy_vs_size.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]

