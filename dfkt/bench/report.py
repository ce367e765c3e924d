"""report.md (mean ± std per task and method) and PNG plots (when matplotlib is installed)."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("dfkt.bench")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task_name, method): mean/std of acc and wall time, reference accuracy, seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task_name"], r["method"])].append(r)
    rows = []
    for (task, method), rs in groups.items():
        acc, acc_sd = _mean_std([r["acc"] for r in rs])
        wall, wall_sd = _mean_std([r["wall_s"] for r in rs])
        ref, _ = _mean_std([r["ref_acc"] for r in rs])
        if all(r.get("labelled_target") is False for r in rs):     # unlabeled target: label-free scores
            snd, _ = _mean_std([r.get("snd") for r in rs])
            ref_snd, _ = _mean_std([r.get("ref_snd") for r in rs])
        else:
            snd = ref_snd = None
        row = {"task_name": task, "method": method, "seeds": len(rs), "acc": acc, "acc_std": acc_sd,
               "wall_s": wall, "wall_std": wall_sd, "ref_acc": ref,
               "per_seed": [r["acc"] for r in sorted(rs, key=lambda r: r["seed"])], "snd": snd, "ref_snd": ref_snd}
        if rs[0]["task"] == "dfkd":
            row["teacher"], row["student"] = rs[0].get("teacher"), rs[0].get("student")
            row["of_teacher"] = 100 * acc / ref if ref else float("nan")
        else:
            sel, _ = _mean_std([r.get("selected_acc_snd") for r in rs])
            row["selected_acc_snd"] = sel
            row["heldout"] = bool(rs[0].get("heldout", False))
            row["acc_unguarded"], _ = _mean_std([r.get("acc_unguarded", r["acc"]) for r in rs])
            row["guard_fired"] = sum(bool(r.get("guard_fired")) for r in rs)
        rows.append(row)
    return rows


def _below(r: dict, key: str, margin: float = 1.0) -> bool:
    v = r.get(key, r["acc"])
    return v is not None and v < r["ref_acc"] - margin


def sfda_summary(records: list[dict]) -> list[dict]:
    """One row per method over the tasks of each half (dev / held-out): mean returned and unguarded
    accuracy, mean source-only, runs below source-only - 1 (returned / unguarded), guard firings."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("task") == "sfda":
            by_method[r["method"]].append(r)
    out = []
    for method, rs in by_method.items():
        row = {"method": method, "runs": len(rs), "guard_fired": sum(bool(r.get("guard_fired")) for r in rs),
               "below_returned": sum(_below(r, "acc") for r in rs),
               "below_unguarded": sum(_below(r, "acc_unguarded") for r in rs)}
        for half, want in (("heldout", True), ("dev", False)):
            sub = [r for r in rs if bool(r.get("heldout", False)) == want]
            # task means first, then the mean over tasks (every task weighs the same whatever its seeds)
            tasks: dict[str, list[dict]] = defaultdict(list)
            for r in sub:
                tasks[r["task_name"]].append(r)
            def tmean(key):
                vals = [_mean_std([r.get(key, r["acc"]) for r in t])[0] for t in tasks.values()]
                return _mean_std(vals)[0] if vals else float("nan")
            row[f"{half}_tasks"] = len(tasks)
            row[f"{half}_acc"] = tmean("acc")
            row[f"{half}_unguarded"] = tmean("acc_unguarded")
            row[f"{half}_ref"] = tmean("ref_acc")
        out.append(row)
    return sorted(out, key=lambda r: -(r["heldout_acc"] if not math.isnan(r["heldout_acc"]) else r["dev_acc"]))


def _f(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _threads_note(records: list[dict], env_threads) -> list[str]:
    """A line naming each task's torch thread counts when some runs (kept by ``--resume``) were timed with
    another count than the environment line's, or with an unrecorded one."""
    by_task: dict[str, set] = defaultdict(set)
    for r in records:
        by_task[r["task_name"]].add(r.get("torch_threads"))
    if all(ts == {env_threads} for ts in by_task.values()):
        return []
    parts = [f"{task}: {', '.join(str(t) if t is not None else 'not recorded' for t in sorted(ts, key=str))}"
             for task, ts in by_task.items()]
    return ["Torch threads the runs were timed with, per task (not all as above): " + "; ".join(parts) + "."]


def header(doc: dict, records: list[dict]) -> list[str]:
    """The lines every suite report starts with: title, command, environment and the threads note."""
    env = doc.get("env", {})
    out = [f"# Suite `{doc['suite']}`{' (quick)' if doc.get('quick') else ''}", ""]
    if doc.get("command"):
        out += ["Command:", "", f"    {doc['command']}", ""]
    out += [f"Environment: dfkt {env.get('dfkt')}, torch {env.get('torch')}, device `{env.get('device')}`, "
            f"{env.get('cpu_count')} CPUs / {env.get('torch_threads')} torch threads, {env.get('platform')}."]
    return out + _threads_note(records, env.get("torch_threads")) + _speed_note(records, env.get("ref_step_ms"))


def _speed_note(records: list[dict], now) -> list[str]:
    """The machine's reference step (runner.reference_step_ms) now and when the records were timed: runs
    kept by ``--resume`` or ``--merge`` may come from a faster or slower machine, which moves every timing
    and every time-budgeted accuracy."""
    seen = sorted({r["ref_step_ms"] for r in records if r.get("ref_step_ms") is not None})
    missing = sum(r.get("ref_step_ms") is None for r in records)
    if now is None and not seen:
        return []
    line = (f"Machine speed: a reference step (LeNet-5, batch 64, forward + backward + SGD, one thread) takes "
            f"{now if now is not None else '?'} ms now")
    if seen:
        line += (f"; the runs were timed at {seen[0]}" + (f"-{seen[-1]}" if seen[-1] != seen[0] else "") + " ms")
    if missing:
        line += f" ({missing} of {len(records)} runs predate this reading)"
    return [line + "."]


def suite_time(doc: dict) -> str:
    """The suite's elapsed time: the latest command's and, where ``--resume`` kept earlier commands' runs, the
    total over every command that made the records (source models / teachers trained by a command included)."""
    line = f"Suite wall time: {doc.get('suite_wall_s', '?')} s for the latest command"
    total = doc.get("suite_wall_s_total")
    if total is not None and total != doc.get("suite_wall_s"):
        line += f", {total} s over all the commands above (runs kept by `--resume` are counted once)"
    return line


def markdown(doc: dict) -> str:
    from .compress import is_compress, markdown as compress_markdown
    from .scale import is_scale, markdown as scale_markdown
    from .tta import is_tta, markdown as tta_markdown

    if is_compress(doc):
        return compress_markdown(doc)
    if is_tta(doc):
        return tta_markdown(doc)
    if is_scale(doc):
        return scale_markdown(doc)
    rows = summarize(doc["records"])
    out = header(doc, doc["records"])
    total = sum(r.get("wall_s") or 0.0 for r in doc["records"])
    out += [f"{suite_time(doc)}; method time summed over all {len(doc['records'])} runs: {total:.1f} s (cached "
            f"source models/teachers not counted in `time`).", ""]
    sfda_recs = [r for r in doc["records"] if r.get("task") == "sfda"]
    if sfda_recs:
        summ = sfda_summary(sfda_recs)
        has_heldout = any(r.get("heldout") for r in sfda_recs)
        out += ["## Summary over tasks" + (" (headline: the held-out mean)" if has_heldout else ""), ""]
        if has_heldout:
            out.append("Held-out tasks were fixed before any tuning and never used to choose a setting. Each mean "
                       "is over tasks (each task's mean over seeds). `returned` is what dfkt.adapt returns (after the "
                       "label-free collapse guard); `last epoch` is the unguarded final model.")
            out.append("")
        out.append("| method | held-out returned % | held-out last epoch % | held-out source-only % | dev returned % "
                   "| dev last epoch % | dev source-only % | runs < source-only - 1 (returned / last epoch) "
                   "| guard fired |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in summ:
            out.append(f"| {r['method']} | {_f(r['heldout_acc'])} | {_f(r['heldout_unguarded'])} | "
                       f"{_f(r['heldout_ref'])} | {_f(r['dev_acc'])} | {_f(r['dev_unguarded'])} | {_f(r['dev_ref'])} "
                       f"| {r['below_returned']} / {r['below_unguarded']} of {r['runs']} "
                       f"| {r['guard_fired']} of {r['runs']} |")
        out.append("")
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task_name"]].append(r)
    for task, rs in by_task.items():
        out.append(f"## {task}{' (held-out)' if rs[0].get('heldout') else ''}")
        out.append("")
        if rs[0].get("teacher") is not None:
            out.append("| method | teacher | student | student acc % (mean ± std) | % of teacher | teacher acc % "
                       "| time s | seeds | per seed |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            for r in sorted(rs, key=lambda r: -r["acc"]):
                out.append(f"| {r['method']} | {r['teacher']} | {r['student']} | {r['acc']:.2f} ± {r['acc_std']:.2f} "
                           f"| {r['of_teacher']:.1f} | {r['ref_acc']:.2f} | {r['wall_s']:.1f} ± {r['wall_std']:.1f} "
                           f"| {r['seeds']} | {', '.join(_f(a) for a in r['per_seed'])} |")
            out += ["", *_dfkd_floors(rs)]
        else:
            out.append("| method | returned acc % (mean ± std) | last epoch % | source-only % | gain | guard fired "
                       "| time s | seeds | per seed |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            for r in sorted(rs, key=lambda r: -r["acc"]):
                if r.get("snd") is not None:     # an unlabeled target: no accuracy exists
                    out.append(f"| {r['method']} | unlabeled target: SND {r['snd']:.4f} (source {r['ref_snd']:.4f}, "
                               f"higher = better clustered) | | | | {r['guard_fired']} | {r['wall_s']:.1f} ± "
                               f"{r['wall_std']:.1f} | {r['seeds']} | |")
                    continue
                out.append(f"| {r['method']} | {r['acc']:.2f} ± {r['acc_std']:.2f} | {_f(r['acc_unguarded'])} | "
                           f"{r['ref_acc']:.2f} | {r['acc'] - r['ref_acc']:+.2f} | {r['guard_fired']} "
                           f"| {r['wall_s']:.1f} ± {r['wall_std']:.1f} "
                           f"| {r['seeds']} | {', '.join(_f(a) for a in r['per_seed'])} |")
        out.append("")
    if sfda_recs:
        out.append("SFDA accuracy is that of the returned model (the last epoch, or the epoch the label-free guard "
                   "rolled back to; never selected with target labels); time is the method's own training time, "
                   "excluding cached source/teacher training and evaluation.")
    else:
        out.append("DFKD accuracy is the student's at the end of its run (never selected with data labels); time is "
                   "the method's own training time, excluding cached teacher training and evaluation.")
    return "\n".join(out) + "\n"


def _dfkd_floors(rows: list[dict]) -> list[str]:
    """The data-free floors of one DFKD task (every method >= 95 % of its teacher, the best >= 99.5 %, std
    across seeds <= 1.5 points), as lines of the report (``rows``: one task's, not empty); a method below a
    floor is named."""
    yes = lambda ok: "yes" if ok else "NO"
    low = [r["method"] for r in rows if not r["of_teacher"] >= 95.0]
    wide = [r["method"] for r in rows if r["seeds"] > 1 and not r["acc_std"] <= 1.5]
    best = max(rows, key=lambda r: r["of_teacher"])
    return ["Floors: every method >= 95 % of its teacher: " + yes(not low) + (f" (below: {', '.join(low)})" if low
                                                                             else "")
            + f"; the best >= 99.5 %: {yes(best['of_teacher'] >= 99.5)} ({best['method']} {best['of_teacher']:.1f} %)"
            + "; std across seeds <= 1.5 points: " + yes(not wide) + (f" (above: {', '.join(wide)})" if wide else "")
            + "."]


def _grid(plt, n: int, ncols: int = 5):
    """A figure with ``n`` panels in rows of at most ``ncols`` (unused panels hidden); flat list of axes."""
    cols = min(ncols, max(1, n))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def plots(doc: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plots (pip install 'dfkt[plots]')")
        return []
    from .compress import is_compress, plots as compress_plots
    from .scale import is_scale
    from .tta import is_tta, plots as tta_plots

    if is_compress(doc):
        return compress_plots(doc, out)
    if is_tta(doc):
        return tta_plots(doc, out)
    if is_scale(doc):
        return []
    made = []
    rows = [r for r in summarize(doc["records"]) if not math.isnan(r["acc"])]   # unlabeled targets: no accuracy
    tasks = sorted({r["task_name"] for r in rows})
    if not tasks:
        return made
    # accuracy per method, one panel per task
    fig, axes = _grid(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        rs = sorted([r for r in rows if r["task_name"] == task], key=lambda r: r["acc"])
        ax.barh([r["method"] for r in rs], [r["acc"] for r in rs], xerr=[r["acc_std"] for r in rs], color="#4c72b0")
        ax.axvline(rs[0]["ref_acc"], color="k", ls="--", lw=1, label="source-only / teacher")
        lo = min(min(r["acc"] for r in rs), rs[0]["ref_acc"])
        ax.set_xlim(max(0, lo - 5), 100)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("accuracy %")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    p = out / "accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    # accuracy vs wall time (curves of every run)
    fig, axes = _grid(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        methods = sorted({r["method"] for r in doc["records"] if r["task_name"] == task})
        for i, m in enumerate(methods):
            for r in doc["records"]:
                if r["task_name"] == task and r["method"] == m and r.get("curve"):
                    t, a = zip(*r["curve"])
                    ax.plot(t, a, "-o", ms=2, lw=1, color=f"C{i % 10}", label=m if r["seed"] == 0 else None)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("training time s")
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=6)
    fig.tight_layout()
    p = out / "accuracy_vs_time.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    # grids of synthesized images (DFKD)
    grids = [r for r in doc["records"] if r.get("grid")]
    if grids:
        import torch

        fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.8), squeeze=False)
        for ax, r in zip(axes[0], grids):
            imgs = torch.load(out / r["grid"], weights_only=True)[:64]
            n = int(math.ceil(math.sqrt(len(imgs))))
            c, h, w = imgs.shape[1:]
            canvas = torch.zeros(c, n * h, n * w)
            for k, im in enumerate(imgs):
                canvas[:, (k // n) * h:(k // n + 1) * h, (k % n) * w:(k % n + 1) * w] = im
            canvas = (canvas - canvas.min()) / (canvas.max() - canvas.min() + 1e-8)
            ax.imshow(canvas.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
            ax.set_title(r["method"], fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        p = out / "synthesized.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def write_report(doc: dict, out: Path) -> Path:
    out = Path(out)
    md = markdown(doc)
    made = plots(doc, out)
    if made:
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in made) + "\n"
    path = out / "report.md"
    path.write_text(md)
    return path


def publish(doc: dict, out: Path, results_md: Path) -> Path:
    """Copy results.json and plots to ``<results_md folder>/results/<suite>/`` and replace this suite's
    section of RESULTS.md with the freshly generated report (other suites' sections are kept)."""
    import shutil

    out, results_md = Path(out), Path(results_md)
    name = doc["suite"] + ("-quick" if doc.get("quick") else "")
    dest = results_md.parent / "results" / name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "results.json", dest / "results.json")
    md = markdown(doc).replace("# Suite", "## Suite", 1)
    md = md.replace("\n## ", "\n### ").replace("### Suite", "## Suite", 1)
    for png in sorted(out.glob("*.png")):
        shutil.copy2(png, dest / png.name)
        md += f"\n![{png.stem}](results/{name}/{png.name})\n"
    return write_section(results_md, name, md)


def write_section(results_md: Path, name: str, md: str) -> Path:
    """Replace (or append) the section ``name`` of RESULTS.md, between its ``<!-- suite:NAME -->`` markers."""
    results_md = Path(results_md)
    begin, end = f"<!-- suite:{name} -->", f"<!-- /suite:{name} -->"
    section = f"{begin}\n{md}\n{end}"
    text = results_md.read_text() if results_md.exists() else (
        "# Benchmark results\n\nEvery section below is written by `dfkt bench ... --publish` (never by hand): "
        "the command, the environment and the measured figures of the latest run of that suite.\n")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    results_md.write_text(text)
    return results_md
