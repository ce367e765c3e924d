"""Command line: ``dfkt demo | adapt | distill | compress | tta | train-source | train-teacher | bench | list``."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from .errors import ConfigError, DfktError
from .registry import TASKS, get_method


class _TqdmHandler(logging.StreamHandler):
    """Log lines that don't break progress bars (written through tqdm.write, to stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


def setup_logging(verbose: int = 0) -> None:
    from .core import distributed as dist

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    root = logging.getLogger("dfkt")
    root.handlers = [h for h in root.handlers if not isinstance(h, _TqdmHandler)]
    h = _TqdmHandler()
    rank = int(os.environ.get("RANK", "0"))
    h.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{' [rank %d]' % rank if rank else ''} %(message)s",
                                     "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level if dist.rank() == 0 and rank == 0 else logging.WARNING)


def _load(kind: str, args) -> object:
    from .config import apply_overrides, load_yaml
    from .runconfig import parse

    return parse(kind, apply_overrides(load_yaml(args.config), args.set))


def _train_overrides(cfg, args) -> None:
    from .core.device import seed_everything

    if getattr(args, "device", None):
        cfg.train.device = args.device
    if getattr(args, "no_progress", False):
        cfg.train.progress = False
    if getattr(args, "out", None):
        cfg.out = args.out
    if getattr(args, "log_dir", None):
        cfg.train.log_dir = args.log_dir
    # models are built (randomly initialised) before the run seeds itself: seed here too, so that
    # train.seed decides the initial weights and a run does not depend on what ran before it
    seed_everything(cfg.train.seed)


def _source_ref(cfg, kind: str):
    """The source model reference of an adapt/compress config: ``source_model`` (a dfkt model.pt) merged
    into ``model.checkpoint``; one of the two is needed."""
    if cfg.source_model:
        if cfg.model.checkpoint and cfg.model.checkpoint != cfg.source_model:
            raise ConfigError(f"{kind} config: give the source weights once: `source_model` or `model.checkpoint`.")
        cfg.model.checkpoint = cfg.source_model
    if cfg.model.arch is None and cfg.model.checkpoint is None:
        raise ConfigError(f"{kind} config: give `source_model` (a dfkt model.pt) and/or `model`.")
    return cfg.model


def _student_arch(cfg, kind: str) -> None:
    if cfg.student.arch is None:
        raise ConfigError(f"{kind} config: student needs `name` (a registry model, see `dfkt list`), `timm` or "
                          "`torchvision`.")


def cmd_adapt(args) -> int:
    from . import api as dfkt     # not ``import dfkt``: the subpackage dfkt.distill can shadow dfkt.distill()
    cfg = _load("adapt", args)
    _train_overrides(cfg, args)
    get_method(cfg.method, task="sfda")  # fail fast, before any loading
    model = _source_ref(cfg, "adapt").build()
    target = cfg.target.build(args.data_root)
    eval_data = cfg.eval.build(args.data_root) if cfg.eval else None
    res = dfkt.adapt(model, target, method=cfg.method, eval_data=eval_data, train=cfg.train, out=cfg.out,
                     resume=args.resume, num_classes=cfg.model.num_classes if cfg.model.arch else None, **cfg.options)
    _print_result(res)
    return 0


def cmd_distill(args) -> int:
    from . import api as dfkt

    cfg = _load("distill", args)
    _train_overrides(cfg, args)
    get_method(cfg.method, task="dfkd")
    teacher = cfg.teacher.build()
    _student_arch(cfg, "distill")
    if "num_classes" not in (cfg.student.kwargs or {}):
        cfg.student.num_classes = cfg.teacher.num_classes if cfg.teacher.arch else cfg.student.num_classes
    student = cfg.student.build()
    eval_data = cfg.eval.build(args.data_root) if cfg.eval else None
    res = dfkt.distill(teacher, student, method=cfg.method, input_shape=tuple(cfg.input_shape),
                       num_classes=cfg.num_classes, eval_data=eval_data, train=cfg.train, out=cfg.out,
                       resume=args.resume, **cfg.options)
    _print_result(res)
    return 0


def cmd_compress(args) -> int:
    from .compression.api import DEFAULT, compress

    if args.resume or args.log_dir:
        raise ConfigError(f"dfkt compress does not take {'--resume' if args.resume else '--log-dir'} (a compress run "
                          f"is a few short stages, each started afresh); run it again without it.")
    cfg = _load("compress", args)
    seed = cfg.train.get("seed", 0)
    if getattr(args, "device", None):
        cfg.train["device"] = args.device
    if getattr(args, "no_progress", False):
        cfg.train["progress"] = False
    if getattr(args, "out", None):
        cfg.out = args.out
    from .core.device import seed_everything

    seed_everything(seed if isinstance(seed, int) else 0)   # the student's initial weights follow train.seed
    method = cfg.method or DEFAULT
    get_method(method, task="compress")          # fail fast, before any loading
    _source_ref(cfg, "compress")
    _student_arch(cfg, "compress")
    source = cfg.model.build()
    if "num_classes" not in (cfg.student.kwargs or {}) and cfg.model.arch:
        cfg.student.num_classes = cfg.model.num_classes
    student = cfg.student.build()
    target = cfg.target.build(args.data_root)
    eval_data = cfg.eval.build(args.data_root) if cfg.eval else None
    res = compress(source, student, target, method=method, eval_data=eval_data, train=cfg.train, out=cfg.out,
                   **cfg.options)
    _print_result(res)
    for st in res.stages:
        acc = f", acc {st['acc']:.2f} %" if isinstance(st.get("acc"), float) else ""
        print(f"  stage {st['stage']} ({st['method']}): {st['wall_s']:.1f} s{acc}")
    return 0


def cmd_tta(args) -> int:
    from .config import apply_overrides, from_dict, load_yaml
    from .core.checkpoint import load_model
    from .online.api import tta
    from .online.config import TTAConfig

    cfg = from_dict(TTAConfig, apply_overrides(load_yaml(args.config), args.set), "tta config")
    _train_overrides(cfg, args)
    get_method(cfg.method, task="tta")
    model = cfg.model.build() if cfg.model.name else None
    if cfg.source_model:
        model = load_model(cfg.source_model, model=model)
    if model is None:
        raise ConfigError("tta config: give `source_model` (a dfkt model.pt) and/or `model`.")
    stream = cfg.build_stream(args.data_root)
    source_data = cfg.source_data.build(args.data_root) if cfg.source_data else None
    res = tta(model, stream, method=cfg.method, chunk_batches=cfg.chunk_batches, source_data=source_data,
              train=cfg.train, out=cfg.out, resume=args.resume,
              num_classes=cfg.model.num_classes if cfg.model.name else None, **cfg.options)
    print(f"method: {res.method} ({res.protocol}, {len(res.predictions)} samples, batch {cfg.train.batch_size or 'default'})")
    for name, err in res.errors().items():
        print(f"  {name:<20} err {err:6.2f} %")
    print(f"  {'mean':<20} err {res.mean_err:6.2f} %")
    print(f"  {res.samples_per_s:.0f} samples/s ({res.wall_s:.1f} s)")
    if res.path:
        print(f"  saved: {res.path}")
    return 0


def cmd_train(args, source: bool) -> int:
    from . import api as dfkt

    cfg = _load("supervised", args)
    _train_overrides(cfg, args)
    recipe = {"smoothing": 0.1, "schedule": "poly"} if source else {"schedule": "cosine"}
    recipe.update(cfg.options)
    model = cfg.model.build()
    train_set = cfg.data.build(args.data_root)
    val_set = cfg.val.build(args.data_root) if cfg.val else None
    res = dfkt.train_supervised(model, train_set, val_set, out=cfg.out, train=cfg.train, resume=args.resume,
                                **recipe)
    _print_result(res)
    return 0


def _print_result(res) -> None:
    from .core import distributed as dist

    if not dist.is_main():
        return
    m = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}
    print(f"method: {res.method}")
    for k, v in m.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"  train time: {res.wall_s:.1f} s")
    if res.path:
        print(f"  saved: {res.path}")


def cmd_bench(args) -> int:
    from .bench.runner import run_suite
    from .bench.suite import load_suite

    suite = load_suite(args.suite)
    out = args.out or f"bench-out/{suite.suite}{'-quick' if args.quick else ''}"
    command = "dfkt " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ""
    doc = run_suite(suite, out, seeds=args.seeds, quick=args.quick, data_root=args.data_root,
                    cache_dir=args.cache, device=args.device or "auto",
                    methods=args.methods.split(",") if args.methods else None, resume=args.resume,
                    progress=False if args.no_progress else None, command=command,
                    tasks=args.tasks.split(",") if args.tasks else None, jobs=args.jobs,
                    merge=args.merge.split(",") if args.merge else None)
    from .bench.report import markdown, publish

    if args.publish:
        from .bench.suite import SUITE_DIR

        log_path = publish(doc, Path(out), SUITE_DIR / "RESULTS.md")
        print(f"published to {log_path}")
    print(markdown(doc))
    print(f"results: {Path(out) / 'results.json'}\nreport: {Path(out) / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, device=args.device or "auto", progress=False if args.no_progress else None)


def cmd_export(args) -> int:
    from .deploy import export

    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.replace("x", ",").split(","))
        except ValueError:
            raise ConfigError(f"--input-shape {args.input_shape!r}: give C,H,W, e.g. 3,32,32") from None
    res = export(args.model, format=args.format, out=args.out, input_shape=shape)
    print(f"exported {res.path} ({res.format}, {res.size_bytes / 1e6:.2f} MB; input {'x'.join(map(str, res.input_shape))}"
          f" with a dynamic batch; max |difference| to PyTorch {res.max_abs_diff:.2g})")
    return 0


TASK_TITLES = {"sfda": "SFDA (`dfkt.adapt`)", "dfkd": "DFKD (`dfkt.distill`)",
               "tta": "Online test-time adaptation (`dfkt.tta`)", "compress": "Source-free compression (`dfkt.compress`)"}


def methods_markdown() -> str:
    """The README's methods tables: one per (task, family), in the registry's order; a family of a task
    that has methods but none of its own says "none yet"."""
    from .registry import FAMILY_DESCRIPTIONS, TASKS, families, method_table

    rows = method_table()
    out = []
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        out.append(f"**{TASK_TITLES[task]}**\n")
        for fam in families(task):
            group = [r for r in mine if r["family"] == fam]
            if not group and fam == "baseline":
                continue
            out.append(f"*{fam}*: {FAMILY_DESCRIPTIONS[fam]}." + ("" if group else " None yet.") + "\n")
            if group:
                out.append("| method | what it does | paper | file |\n|---|---|---|---|")
                for r in group:
                    paper = {"": "-", "dfkt": "dfkt's own"}.get(r["paper"], r["paper"])
                    what = r["description"][:1].upper() + r["description"][1:]
                    out.append(f"| `{r['name']}` | {what} | {paper} | `{r['file']}` |")
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def cmd_list(args) -> int:
    from .bench.suite import SUITE_DIR
    from .data import list_domains
    from .models import list_models
    from .registry import FAMILY_DESCRIPTIONS, method_table

    if args.markdown:
        print(methods_markdown(), end="")
        return 0
    print("methods: (by task / family)")
    group = None
    for r in method_table(args.task):
        if (r["task"], r["family"]) != group:
            group = (r["task"], r["family"])
            print(f"  {r['task']} / {r['family']}: {FAMILY_DESCRIPTIONS[r['family']]}")
        print(f"    {r['name']:<16} {r['summary']}")
    print("models: " + ", ".join(list_models()) + " (and any timm:NAME / torchvision:NAME classifier)")
    print("domains: " + ", ".join(list_domains()))
    if SUITE_DIR.is_dir():
        print("suites: " + ", ".join(sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="dfkt", description="Data-free knowledge transfer: DFKD and SFDA.")
    p.add_argument("--version", action="version", version=f"dfkt {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, config=True):
        if config:
            sp.add_argument("config", help="YAML config file")
            sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
            sp.add_argument("--resume", action="store_true", help="continue from <out>/resume.pt")
            sp.add_argument("--out", help="output folder (model.pt, history.json, resume.pt)")
            sp.add_argument("--log-dir", help="experiment logs there: per-step loss terms and per-epoch metrics as "
                                              "CSV (+ TensorBoard with dfkt[tensorboard]); = train.log_dir")
        sp.add_argument("--data-root", help="folder with the data files (default: $DFKT_DATA)")
        sp.add_argument("--device", help="auto | cpu | cuda | cuda:N")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")

    common(sub.add_parser("adapt", help="source-free domain adaptation from a config"))
    common(sub.add_parser("distill", help="data-free distillation from a config"))
    common(sub.add_parser("compress", help="source-free compression (adapt + distil into a small student) from a "
                                           "config"))
    common(sub.add_parser("tta", help="online test-time adaptation on a stream from a config"))
    common(sub.add_parser("train-source", help="train a source model (SHOT's recipe: label smoothing 0.1)"))
    common(sub.add_parser("train-teacher", help="train a teacher (cross-entropy, cosine schedule)"))
    b = sub.add_parser("bench", help="run a benchmark suite from benchmarks/")
    b.add_argument("suite", help="suite name (e.g. sfda-digits, dfkd-mnist) or YAML path")
    b.add_argument("--seeds", type=int, help="number of seeds (default: the suite's)")
    b.add_argument("--quick", action="store_true", help="the suite's quick subset (a few minutes)")
    b.add_argument("--out", help="output folder (default bench-out/<suite>)")
    b.add_argument("--methods", help="comma-separated subset of methods")
    b.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    b.add_argument("--cache", help="cache folder for source models/teachers (default <out>/cache)")
    b.add_argument("--resume", action="store_true", help="skip runs already in <out>/results.json")
    b.add_argument("--merge", help="comma-separated output folders of other runs of this suite to combine "
                                    "(their runs are not repeated)")
    b.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, in worker processes sharing the torch threads (default 1)")
    b.add_argument("--publish", action="store_true",
                   help="also update this suite's section of benchmarks/RESULTS.md (+ benchmarks/results/)")
    common(b, config=False)
    d = sub.add_parser("demo", help="both branches on the embedded digits, in a few minutes")
    d.add_argument("--out", help="write results.json/report.md there")
    common(d, config=False)
    e = sub.add_parser("export", help="write a model.pt as ONNX or TorchScript (checked against PyTorch)")
    e.add_argument("model", help="a dfkt model.pt")
    e.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    e.add_argument("--out", help="file to write (default: model.onnx / model.ts next to model.pt)")
    e.add_argument("--input-shape", help="C,H,W (default: the shape the model was trained on)")
    common(e, config=False)
    ls = sub.add_parser("list", help="methods (grouped by task and family), models, domains and suites")
    ls.add_argument("--task", choices=list(TASKS))
    ls.add_argument("--markdown", action="store_true", help="print the README's methods tables (grouped by family)")
    common(ls, config=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    handlers = {"adapt": cmd_adapt, "distill": cmd_distill, "compress": cmd_compress, "tta": cmd_tta, "bench": cmd_bench, "demo": cmd_demo, "list": cmd_list,
                "export": cmd_export,
                "train-source": lambda a: cmd_train(a, True), "train-teacher": lambda a: cmd_train(a, False)}
    try:
        rc = handlers[args.cmd](args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:          # e.g. `dfkt list | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except DfktError as e:
        print(f"dfkt {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dfkt {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
