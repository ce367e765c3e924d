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
        row = {"task_name": task, "method": method, "seeds": len(rs), "acc": acc, "acc_std": acc_sd,
               "wall_s": wall, "wall_std": wall_sd, "ref_acc": ref,
               "per_seed": [r["acc"] for r in sorted(rs, key=lambda r: r["seed"])]}
        if rs[0]["task"] == "dfkd":
            row["teacher"], row["student"] = rs[0].get("teacher"), rs[0].get("student")
            row["of_teacher"] = 100 * acc / ref if ref else float("nan")
        else:
            sel, _ = _mean_std([r.get("selected_acc_snd") for r in rs])
            row["selected_acc_snd"] = sel
        rows.append(row)
    return rows


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


def markdown(doc: dict) -> str:
    rows = summarize(doc["records"])
    env = doc.get("env", {})
    out = [f"# Suite `{doc['suite']}`{' (quick)' if doc.get('quick') else ''}", ""]
    if doc.get("command"):
        out += ["Command:", "", f"    {doc['command']}", ""]
    out += [f"Environment: dfkt {env.get('dfkt')}, torch {env.get('torch')}, device `{env.get('device')}`, "
            f"{env.get('cpu_count')} CPUs / {env.get('torch_threads')} torch threads, {env.get('platform')}."]
    out += _threads_note(doc["records"], env.get("torch_threads"))
    total = sum(r.get("wall_s") or 0.0 for r in doc["records"])
    out += [f"Suite wall time: {doc.get('suite_wall_s', '?')} s for the latest command (runs kept by `--resume` are "
            f"not re-timed); method time summed over all {len(doc['records'])} runs: {total:.1f} s (cached source "
            f"models/teachers not counted in `time`).", ""]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task_name"]].append(r)
    for task, rs in by_task.items():
        out.append(f"## {task}")
        out.append("")
        if rs[0].get("teacher") is not None:
            out.append("| method | teacher | student | student acc % (mean ± std) | % of teacher | teacher acc % "
                       "| time s | seeds | per seed |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            for r in sorted(rs, key=lambda r: -r["acc"]):
                out.append(f"| {r['method']} | {r['teacher']} | {r['student']} | {r['acc']:.2f} ± {r['acc_std']:.2f} "
                           f"| {r['of_teacher']:.1f} | {r['ref_acc']:.2f} | {r['wall_s']:.1f} ± {r['wall_std']:.1f} "
                           f"| {r['seeds']} | {', '.join(f'{a:.2f}' for a in r['per_seed'])} |")
        else:
            out.append("| method | target acc % (last epoch, mean ± std) | source-only % | gain | SND-selected % "
                       "| time s | seeds | per seed |")
            out.append("|---|---|---|---|---|---|---|---|")
            for r in sorted(rs, key=lambda r: -r["acc"]):
                sel = r.get("selected_acc_snd")
                sel_s = f"{sel:.2f}" if sel is not None and not math.isnan(sel) else "-"
                out.append(f"| {r['method']} | {r['acc']:.2f} ± {r['acc_std']:.2f} | {r['ref_acc']:.2f} | "
                           f"{r['acc'] - r['ref_acc']:+.2f} | {sel_s} | {r['wall_s']:.1f} ± {r['wall_std']:.1f} "
                           f"| {r['seeds']} | {', '.join(f'{a:.2f}' for a in r['per_seed'])} |")
        out.append("")
    out.append("Accuracy is the last epoch's (never selected with target labels); time is the method's own "
               "training time, excluding cached source/teacher training and evaluation.")
    return "\n".join(out) + "\n"


def plots(doc: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plots (pip install 'dfkt[plots]')")
        return []
    made = []
    rows = summarize(doc["records"])
    tasks = sorted({r["task_name"] for r in rows})
    # accuracy per method, one panel per task
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = sorted([r for r in rows if r["task_name"] == task], key=lambda r: r["acc"])
        ax.barh([r["method"] for r in rs], [r["acc"] for r in rs], xerr=[r["acc_std"] for r in rs], color="#4c72b0")
        ax.axvline(rs[0]["ref_acc"], color="k", ls="--", lw=1, label="source-only / teacher")
        lo = min(min(r["acc"] for r in rs), rs[0]["ref_acc"])
        ax.set_xlim(max(0, lo - 5), 100)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("accuracy %")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    p = out / "accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    # accuracy vs wall time (curves of every run)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
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
