"""Run a suite: every (task, method, seed), with source models / teachers trained once and cached.

Results are appended to ``results.json`` after every run (so a killed benchmark loses at most one
run, and ``resume=True`` skips the runs already there), then ``report.md`` and plots are written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import api
from ..config import config_hash, to_dict
from ..core import distributed as dist
from ..core.checkpoint import load_model, save_model
from ..core.device import model_device, resolve_device, synchronize
from ..core.evaluate import evaluate
from ..core.loader import make_loader
from ..errors import ConfigError, suggest
from ..models import build_model
from ..registry import get_method
from ..runconfig import DataRef
from .suite import MethodRun, ModelRecipe, Suite, TaskSpec

log = logging.getLogger("dfkt.bench")


def env_info(device: torch.device) -> dict:
    import numpy
    import sklearn

    import dfkt

    info = {"dfkt": dfkt.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "sklearn": sklearn.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "world_size": dist.world_size()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    import faiss

    info["faiss"] = faiss.__version__
    info["ref_step_ms"] = reference_step_ms(device)
    return info


def reference_step_ms(device: torch.device, steps: int = 7) -> float:
    """The machine's speed as one number: milliseconds of a reference training step (LeNet-5, a batch of
    64 at 1x32x32, forward + backward + SGD) on ``device`` with ONE torch thread, the median of ``steps``
    after two warm-up steps. Time-budgeted results (DFKD's ``time_budget_s``) depend on it: the same code
    fits about half the steps into a budget on a machine whose reference step is twice as long (seen here
    between two sessions on the same kind of 2-core VM), so every record carries it (``ref_step_ms``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        model = build_model("lenet5", num_classes=10, seed=0).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(64, 1, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (64,), generator=g).to(device)
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return round(1000 * sorted(times)[len(times) // 2], 2)
    finally:
        torch.set_num_threads(threads)


def _domain(spec: DataRef, root: Optional[str], split: Optional[str] = None):
    """The data set of a suite's data reference (any kind; relative paths under ``root``)."""
    return spec.build(root, split)


def _domain_label(spec: DataRef) -> str:
    return spec.label()


def _data_key(spec: DataRef) -> dict:
    """What identifies a suite's data in cache keys; a named domain keeps the key it had before suites
    took any data kind (so cached source models / teachers stay valid)."""
    d = to_dict(spec)
    if spec.domain:
        key = {k: d[k] for k in ("domain", "split", "corruption", "severity", "corruption_seed")}
        key["size"] = spec.size or 28
        if spec.channels not in (None, 1):
            key["channels"] = spec.channels
        return key
    return {k: v for k, v in d.items() if v is not None}


def _acc(x: Optional[float]) -> Optional[float]:
    """Accuracy for a record: rounded, or None where the data have no labels."""
    return None if x is None or x != x else round(float(x), 3)


def cached_supervised(recipe: ModelRecipe, domain: DataRef, seed: int, root: Optional[str], cache: Path,
                      device: str, num_classes: int) -> torch.nn.Module:
    """Train (once) and cache a model by the hash of its recipe, data and seed."""
    key = config_hash({"recipe": to_dict(recipe), "domain": _data_key(domain), "seed": seed, "v": 1})
    path = cache / f"{recipe.model}-{_domain_label(domain)}-s{seed}-{key}.pt".replace(":", "_").replace("@", "_")
    torch.manual_seed(seed)  # the initial weights depend on the seed only, not on what ran before
    model = build_model(recipe.model, num_classes=num_classes, **recipe.kwargs)
    if path.exists():
        return load_model(path, model=model)
    train_set = _domain(domain, root, recipe.train_split)
    val_set = _domain(domain, root, recipe.val_split) if recipe.val_split else None
    log.info("training %s on %s (seed %d) -> cache %s", recipe.model, _domain_label(domain), seed, path.name)
    res = api.train_supervised(model, train_set, val_set, seed=seed, device=device, **recipe.options)
    save_model(path, res.model, method="supervised", config={"recipe": to_dict(recipe)}, metrics=res.metrics)
    return res.model


def _merge(run: MethodRun, override: dict | None) -> tuple[dict, dict]:
    opts, train = dict(run.options), dict(run.train)
    if override:
        unknown = set(override) - {"options", "train"}
        if unknown:
            raise ConfigError(f"override keys must be 'options'/'train', got {sorted(unknown)}")
        opts.update(override.get("options", {}))
        train.update(override.get("train", {}))
    return opts, train


def _selected(suite: Suite, quick: bool, methods: Optional[list[str]],
              task_names: Optional[list[str]] = None) -> tuple[list[TaskSpec], list[str], int]:
    tasks = suite.tasks
    names = list(suite.methods)
    seeds = suite.seeds
    if quick:
        names = suite.quick.methods or names[:2]
        seeds = suite.quick.seeds
        if suite.quick.tasks:
            tasks = [t for t in tasks if t.name in suite.quick.tasks]
    if methods:
        for m in methods:
            if m not in suite.methods:
                raise ConfigError(f"method {m!r} is not in suite {suite.suite!r}; it has {', '.join(suite.methods)}.")
        names = list(methods)
    if task_names:
        known = [t.name for t in suite.tasks]
        for t in task_names:
            if t not in known:
                raise ConfigError(f"task {t!r} is not in suite {suite.suite!r}.{suggest(t, known)} "
                                  f"Tasks: {', '.join(known)}.")
        tasks = [t for t in suite.tasks if t.name in task_names]
    return tasks, names, seeds


def run_suite(suite: Suite, out: str | Path, seeds: Optional[int] = None, quick: bool = False,
              data_root: Optional[str] = None, cache_dir: Optional[str] = None, device: str = "auto",
              methods: Optional[list[str]] = None, resume: bool = False, progress: bool = True,
              command: str = "", tasks: Optional[list[str]] = None, jobs: int = 1,
              merge: Optional[list[str]] = None) -> dict:
    """Run the selected (task, method, seed) runs and write results.json, report.md and plots.

    ``jobs > 1`` runs that many runs at a time in worker processes, each with
    ``torch threads // jobs`` threads (source models/teachers are trained first, in this process);
    the recorded ``torch_threads`` and wall times are those of the worker. ``merge``: output folders
    (or results.json files) of other runs of the same suite, e.g. parts run on other machines; their
    records count as done (as with ``resume``) and go into this folder's results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    tasks, names, n_seeds = _selected(suite, quick, methods, tasks)
    n_seeds = seeds or n_seeds
    results_path = out / "results.json"
    records: list[dict] = []
    commands = [command] if command else []
    wall_before: float | None = 0.0     # the time of the earlier commands whose records this one keeps (--resume)
    if resume and results_path.exists():
        prev = json.loads(results_path.read_text())
        records = prev.get("records", [])
        wall_before = prev.get("suite_wall_s_total")    # None: written before dfkt kept it, so unknown
        before = [c for c in prev.get("command", "").split(" && ") if c]
        commands = before + [c for c in commands if c not in before]   # a repeated command (a re-publish, a
        #                                                                resumed run) is not listed twice
    for other in merge or []:
        path = Path(other)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"--merge: no results.json at {str(path)!r}; give the output folder of a "
                              f"`dfkt bench` run.")
        prev = json.loads(path.read_text())
        if prev.get("suite") != suite.suite:
            raise ConfigError(f"--merge: {str(path)!r} holds suite {prev.get('suite')!r}, not {suite.suite!r}.")
        have = {(r["task_name"], r["method"], r["seed"]) for r in records}
        records.extend(r for r in prev.get("records", []) if (r["task_name"], r["method"], r["seed"]) not in have)
        commands = [c for c in prev.get("command", "").split(" && ") if c and c not in commands] + commands
        for r in prev.get("records", []):   # synthesized-image grids travel with their records
            if r.get("grid") and (path.parent / r["grid"]).is_file():
                (out / r["grid"]).parent.mkdir(parents=True, exist_ok=True)
                (out / r["grid"]).write_bytes((path.parent / r["grid"]).read_bytes())
    done = {(r["task_name"], r["method"], r["seed"]) for r in records}
    doc = {"suite": suite.suite, "command": " && ".join(commands), "quick": quick, "env": env_info(dev), "records": records}
    pending = []
    for task in tasks:
        for seed in range(n_seeds):
            for name in names:
                if task.methods is not None and name not in task.methods:
                    continue
                if (task.name, name, seed) in done:
                    continue
                override = suite.quick.overrides.get(name) if quick else None
                pending.append((task, name, seed, override))
    t_suite = time.perf_counter()

    def stamp_time() -> None:
        """This command's elapsed time and, where the earlier commands' is known, the total (--resume)."""
        doc["suite_wall_s"] = round(time.perf_counter() - t_suite, 1)
        if wall_before is not None:
            doc["suite_wall_s_total"] = round(wall_before + doc["suite_wall_s"], 1)

    def finish(rec: dict | list[dict], task: TaskSpec, name: str, seed: int, threads: int) -> None:
        recs = rec if isinstance(rec, list) else [rec]      # a tta run gives one record per corruption
        for r in recs:
            r.update({"suite": suite.suite, "task_name": task.name, "seed": seed, "device": str(dev),
                      "torch_threads": threads, "ref_step_ms": doc["env"]["ref_step_ms"]})   # timings depend on them
        records.extend(recs)
        score = (f"acc {recs[0]['acc']} (ref {recs[0]['ref_acc']})" if "acc" in recs[0] else
                 recs[0]["summary"] if "summary" in recs[0] else      # a scale run
                 f"mean err {sum(r['err'] for r in recs) / len(recs):.2f} % over {len(recs)} corruptions")
        log.info("%s | %s | seed %d: %s in %.1f s", task.name, name, seed, score, recs[0]["wall_s"])
        stamp_time()                    # kept if this command is killed
        if dist.is_main():
            results_path.write_text(json.dumps(doc, indent=1, default=str))

    if jobs > 1 and len(pending) > 1:
        if suite.task == "scale":
            raise ConfigError("a scale suite measures time: run it with --jobs 1 (runs side by side would time "
                              "each other).")
        if dist.is_dist():
            raise ConfigError("--jobs > 1 runs several single-process runs side by side; under torchrun use "
                              "--jobs 1 (each run is then distributed over the ranks).")
        _run_parallel(suite, pending, jobs, data_root, cache, device, out, finish)
    else:
        for task, name, seed, override in pending:
            rec = _run_one(suite, task, name, seed, data_root, cache, device, override, progress, out)
            finish(rec, task, name, seed, torch.get_num_threads())
    stamp_time()
    if dist.is_main():
        results_path.write_text(json.dumps(doc, indent=1, default=str))
        from .report import write_report

        write_report(doc, out)
    return doc


def _run_one(suite: Suite, task: TaskSpec, name: str, seed: int, root, cache: Path, device: str, override,
             progress: bool, out: Path) -> dict | list[dict]:
    return _task_runners()[suite.task](suite, task, name, seed, root, cache, device, override, progress, out)


def _task_runners() -> dict:
    """suite.task -> the function running one (task, method, seed); it returns a record (or a list of them)."""
    from .compress import run_compress
    from .scale import run_scale
    from .tta import run_tta

    return {"sfda": _run_sfda, "dfkd": _run_dfkd, "tta": run_tta, "scale": run_scale, "compress": run_compress}


def _worker_init(threads: int, parent: int | None = None) -> None:
    torch.set_num_threads(threads)
    if parent is not None:
        _exit_with_parent(parent)


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this worker process when ``parent`` (the bench) is gone.

    A bench killed with SIGTERM or SIGKILL (``kill``, ``timeout``, a job scheduler) cannot shut its process
    pool down; its workers would run on as orphans, finishing runs nobody collects and slowing every later
    job on the machine (measured: two orphans doubled the run times of the next suite). A daemon thread
    checks every ``every_s`` seconds that the worker's parent is still ``parent`` and exits at once if not.
    """
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        log.warning("the bench process (pid %d) is gone: worker %d exits", parent, os.getpid())
        os._exit(1)

    threading.Thread(target=watch, name="dfkt-parent-watch", daemon=True).start()


def _worker_run(args: tuple) -> tuple[dict, int]:
    return _run_one(*args), torch.get_num_threads()


def _base_model(suite: Suite, task: TaskSpec, name: str, seed: int) -> tuple[ModelRecipe, int]:
    """The cached model a run starts from: (recipe, seed) of the SFDA/TTA source model or of the DFKD
    teacher; one per seed, trained with that seed (a DFKD result must hold for any teacher)."""
    if suite.task in ("sfda", "tta", "compress"):
        return _source_recipe(suite, task), seed
    run = suite.methods[name]
    return suite.teachers[run.teacher or next(iter(suite.teachers))], seed


def _source_recipe(suite: Suite, task: TaskSpec) -> ModelRecipe:
    recipe = suite.source
    if task.source_options:
        recipe = dataclasses.replace(recipe, options={**recipe.options, **task.source_options})
    return recipe


def _run_parallel(suite: Suite, pending: list, jobs: int, root, cache: Path, device: str, out: Path,
                  finish) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    # train every cached source model / teacher here first (once each): workers only read the cache
    needed = {}
    for task, name, seed, _ in pending:
        recipe, model_seed = _base_model(suite, task, name, seed)
        needed[config_hash({"r": to_dict(recipe), "d": to_dict(task.source), "s": model_seed})] = (recipe, task, model_seed)
    for recipe, task, model_seed in needed.values():
        cached_supervised(recipe, task.source, model_seed, root, cache, device, suite.num_classes)
    threads = max(1, torch.get_num_threads() // jobs)
    log.info("running %d runs, %d at a time with %d torch thread(s) each", len(pending), jobs, threads)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=(threads, os.getpid())) as pool:
        futures = {pool.submit(_worker_run, (suite, task, name, seed, root, cache, device, override, False, out)):
                   (task, name, seed) for task, name, seed, override in pending}
        for fut in cf.as_completed(futures):
            task, name, seed = futures[fut]
            rec, used = fut.result()
            finish(rec, task, name, seed, used)


def _history_curve(history) -> list[list[float]]:
    return [[r["time_s"], r["acc"]] for r in history.records if "acc" in r and "time_s" in r]


def _run_sfda(suite: Suite, task: TaskSpec, name: str, seed: int, root, cache: Path, device: str,
              override, progress: bool, out: Path) -> dict:
    if task.source is None or task.target is None:
        raise ConfigError(f"sfda task {task.name!r} needs `source` and `target` domains.")
    recipe, source_seed = _base_model(suite, task, name, seed)
    model = cached_supervised(recipe, task.source, source_seed, root, cache, device, suite.num_classes)
    target = _domain(task.target, root)
    dev = resolve_device(device)
    ref = evaluate(model.to(dev), target, dev, label_free=True)
    opts, train = _merge(suite.methods[name], override)
    train.setdefault("progress", progress)
    res = api.adapt(model, target, method=suite.methods[name].method or name, seed=seed, device=device, train=train, **opts)
    from ..sfda.selection import select_epoch

    sel = select_epoch(res.history, "snd") if any("snd" in r for r in res.history.records) else {}
    guard = res.guard or {}
    return {"task": "sfda", "method": name, "source": _domain_label(task.source),
            "target": _domain_label(task.target), "heldout": task.heldout,
            "acc": _acc(res.acc), "ref_acc": _acc(ref.get("acc")),
            "acc_unguarded": _acc(res.history.last.get("acc", res.acc)),
            "labelled_target": "acc" in ref,          # unlabeled targets: label-free scores only
            "snd": round(float(res.metrics.get("snd", float("nan"))), 4), "ref_snd": round(float(ref["snd"]), 4),
            "im": round(float(res.metrics.get("im", float("nan"))), 4), "ref_im": round(float(ref["im"]), 4),
            "guard_fired": bool(guard.get("fired", False)), "returned_epoch": guard.get("returned_epoch"),
            "guard_reason": guard.get("reason"),
            "wall_s": round(res.wall_s, 3), "epochs": len(res.history.records),
            "selected_acc_snd": round(float(sel.get("acc", float("nan"))), 3) if sel else None,
            "curve": _history_curve(res.history)}


def _run_dfkd(suite: Suite, task: TaskSpec, name: str, seed: int, root, cache: Path, device: str,
              override, progress: bool, out: Path) -> dict:
    run = suite.methods[name]
    recipe, teacher_seed = _base_model(suite, task, name, seed)
    if task.source is None:
        raise ConfigError(f"dfkd task {task.name!r} needs `source` (the teacher's training domain).")
    teacher = cached_supervised(recipe, task.source, teacher_seed, root, cache, device, suite.num_classes)
    test_spec = task.target or dataclasses.replace(task.source, split="test")
    test = _domain(test_spec, root)
    dev = resolve_device(device)
    ref = evaluate(teacher.to(dev), test, dev).get("acc")
    if ref is None:
        raise ConfigError(f"dfkd task {task.name!r}: the evaluation data {test_spec.label()!r} have no labels; a "
                          f"DFKD suite scores students by accuracy: give labelled evaluation data as `target`.")
    student_name = run.student or suite.student
    if not student_name:
        raise ConfigError(f"suite {suite.suite!r}: method {name!r} has no student model.")
    torch.manual_seed(seed)
    student = build_model(student_name, num_classes=suite.num_classes, **run.student_kwargs)
    opts, train = _merge(run, override)
    train.setdefault("progress", progress)
    for k, v in opts.items():   # data specs in options (e.g. lopes' metadata) read the suite's data root
        if isinstance(v, dict) and "domain" in v and root is not None:
            opts[k] = {**v, "root": v.get("root", root)}
    if getattr(get_method(run.method or name, task="dfkd"), "needs_metadata", False) and "metadata" not in opts:
        # recorded on the teacher's training data, as the teacher's owner would (not a setting of the suite)
        from ..distill import record_metadata

        seen = _domain(task.source, root, recipe.train_split)
        opts["metadata"] = record_metadata(teacher, make_loader(seen, 512, model_device(teacher), shuffle=False))
    res = api.distill(teacher, student, method=run.method or name, input_shape=tuple(suite.input_shape), eval_data=test,
                      seed=seed, device=device, train=train, **opts)
    rec = {"task": "dfkd", "method": name, "dataset": _domain_label(task.source), "teacher": recipe.model,
           "student": student_name, "acc": round(res.acc, 3), "ref_acc": round(ref, 3),
           "wall_s": round(res.wall_s, 3), "epochs": len(res.history.records), "curve": _history_curve(res.history)}
    if seed == 0 and res.synthesize is not None and dist.is_main():
        try:
            imgs = res.synthesize(64).detach().float().cpu()
            grid_dir = out / "grids"
            grid_dir.mkdir(exist_ok=True)
            fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task.name}-{name}") + ".pt"
            torch.save(imgs, grid_dir / fname)
            rec["grid"] = f"grids/{fname}"
        except Exception as e:  # a grid is a nice-to-have; never lose the record for it
            log.warning("could not synthesize a grid for %s: %s", name, e)
    return rec
