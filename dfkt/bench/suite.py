"""Suite files (benchmarks/<name>.yaml) validated into dataclasses.

An SFDA suite trains (and caches) one source model per (source domain, seed) and adapts it to each
target with each method; a DFKD suite trains (and caches) teachers and distils them into students; a
TTA suite adapts the cached source models online on corruption streams (dfkt/bench/tta.py); a scale
suite times neighbour search on synthetic feature banks (dfkt/bench/scale.py); a compress suite compresses
the cached source models into small students for each target (dfkt/bench/compress.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..config import from_dict, load_yaml
from ..errors import ConfigError, suggest
from ..online.config import StreamSpec
from ..runconfig import DataRef
from .scale import ScaleSpec


@dataclass
class ModelRecipe:
    """A model from the registry and the supervised recipe that trains it (cached by config hash)."""

    model: str
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)        # train_supervised options (epochs, lr, smoothing...)
    train_split: str = "source_train"
    val_split: Optional[str] = "source_val"


@dataclass
class MethodRun:
    """A method of the suite with its options and training settings (TrainConfig keys)."""

    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    method: Optional[str] = None       # the registered method, when the entry's key is a variant label
    #                                    (e.g. `dafl+adv: {method: dafl, options: {adv: 1.0}}`)
    teacher: Optional[str] = None      # DFKD: key into `teachers`
    student: Optional[str] = None      # DFKD: model name (default: the suite's student)
    student_kwargs: dict = field(default_factory=dict)


@dataclass
class TaskSpec:
    """SFDA: source -> target. DFKD: ``source`` the teacher's training data, ``target`` the evaluation
    data (default: the source's ``test`` split). Both are data references of any kind (``DataRef``:
    named domain, image_folder, image_list, npz, torchvision), relative paths resolved by ``--data-root``;
    an SFDA target may be unlabeled (its records then carry label-free scores instead of accuracy).

    ``heldout: true`` marks a task of the held-out half: fixed before any tuning, never used to choose
    a setting, reported apart (the headline of a shift suite is the held-out mean).
    """

    name: str
    source: Optional[DataRef] = None
    target: Optional[DataRef] = None
    heldout: bool = False
    methods: Optional[list[str]] = None                # restrict to these methods
    source_options: dict = field(default_factory=dict)  # merged into the source recipe's options (SFDA)
    overrides: Optional[dict] = None                   # refused: see validate()
    stream: Optional[StreamSpec] = None                # TTA: corruptions, severity, protocol of the stream
    scale: Optional[ScaleSpec] = None                  # scale: the synthetic feature bank (dfkt/bench/scale.py)
    student: Optional[str] = None                      # compress: key into the suite's `students`

    def validate(self, where: str = "task") -> None:
        if self.overrides is not None:
            raise ConfigError(
                f"{where}: task {self.name!r} has per-task `overrides`, which suites do not allow: every "
                f"method runs with the same settings on every task (what dfkt.adapt/distill does with those "
                f"settings), so that no figure comes from settings tuned to its task. Remove `overrides`; to "
                f"compare other settings, add a named variant under `methods:` (e.g. `shot-b03: {{method: "
                f"shot, options: {{beta: 0.3}}}}`), which runs the same way on every task.")


@dataclass
class StudentSpec:
    """A compress suite's student: a registry model, built untrained with the run's seed."""

    model: str
    kwargs: dict = field(default_factory=dict)


@dataclass
class QuickSpec:
    seeds: int = 1
    methods: list[str] = field(default_factory=list)
    tasks: Optional[list[str]] = None
    overrides: dict = field(default_factory=dict)      # method -> {options, train} for --quick


@dataclass
class Suite:
    suite: str
    task: Literal["sfda", "dfkd", "tta", "scale", "compress"]
    methods: dict[str, MethodRun]
    tasks: list[TaskSpec]
    seeds: int = 3
    description: str = ""
    source: Optional[ModelRecipe] = None               # SFDA source recipe
    teachers: dict[str, ModelRecipe] = field(default_factory=dict)   # DFKD
    student: Optional[str] = None                      # DFKD default student model name
    students: dict[str, StudentSpec] = field(default_factory=dict)   # compress: untrained students by key
    input_shape: Optional[list[int]] = None            # DFKD
    num_classes: int = 10
    quick: QuickSpec = field(default_factory=QuickSpec)
    defaults_only: bool = False                        # every method runs at its registered defaults

    def validate(self) -> None:
        from ..registry import get_method

        if self.task == "scale":            # methods are neighbour index modes, not registered methods
            from .scale import validate
            return validate(self)
        for name, run in self.methods.items():
            get_method(run.method or name, task=self.task)   # unknown method: a clear error at load time
            settings = {**({"options": run.options} if run.options else {}), **_not_run_length(run.train)}
            if self.defaults_only and settings:
                raise ConfigError(
                    f"suite {self.suite!r} runs every method at its registered defaults (defaults_only: true), "
                    f"but method {name!r} sets {settings}; remove them (change the method's defaults instead, "
                    f"with the reason in its docstring) or set defaults_only: false. Only the run length "
                    f"(train: {{{', '.join(RUN_LENGTH)}}}) may be given per method.")
        if self.defaults_only:
            for name, ov in self.quick.overrides.items():
                if set(ov) - {"train"} or _not_run_length(ov.get("train") or {}):
                    raise ConfigError(f"suite {self.suite!r}: defaults_only suites take no quick.overrides other "
                                      f"than the run length (train: {{{', '.join(RUN_LENGTH)}}}); {name!r} sets {ov}.")
        if self.task == "tta":
            from .tta import validate
            validate(self)
        if self.task in ("sfda", "compress") and self.source is None:
            raise ConfigError(f"suite {self.suite!r}: an {self.task} suite needs a `source` recipe.")
        if self.task == "compress":
            for t in self.tasks:
                if t.student not in self.students:
                    raise ConfigError(f"suite {self.suite!r}: compress task {t.name!r} needs `student:` one of the "
                                      f"suite's students ({', '.join(self.students) or 'none defined'}), got "
                                      f"{t.student!r}." + (suggest(t.student, self.students) if t.student else ""))
        if self.task == "dfkd":
            if not self.teachers or not self.input_shape:
                raise ConfigError(f"suite {self.suite!r}: a dfkd suite needs `teachers` and `input_shape`.")
            for name, run in self.methods.items():
                if run.teacher is not None and run.teacher not in self.teachers:
                    raise ConfigError(f"suite {self.suite!r}: method {name!r} uses unknown teacher "
                                      f"{run.teacher!r}.{suggest(run.teacher, self.teachers)}")
        for m in self.quick.methods:
            if m not in self.methods:
                raise ConfigError(f"suite {self.suite!r}: quick method {m!r} is not in methods."
                                  + suggest(m, self.methods))


RUN_LENGTH = ("time_budget_s",)
"""The one training setting a defaults_only suite may give per method: how long it runs (what the user passes
to dfkt.distill as ``time_budget_s``), not how."""


def _not_run_length(train: dict) -> dict:
    return {"train": {k: v for k, v in train.items() if k not in RUN_LENGTH}} if set(train) - set(RUN_LENGTH) else {}


SUITE_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def find_suite(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = SUITE_DIR / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    known = sorted(q.stem for q in SUITE_DIR.glob("*.yaml")) if SUITE_DIR.is_dir() else []
    raise ConfigError(f"unknown suite {name_or_path!r}.{suggest(name_or_path, known)} "
                      f"Suites: {', '.join(known) or 'none found in ' + str(SUITE_DIR)}; or pass a YAML path.")


def load_suite(name_or_path: str) -> Suite:
    path = find_suite(name_or_path)
    return from_dict(Suite, load_yaml(path), f"suite {path.name}")
