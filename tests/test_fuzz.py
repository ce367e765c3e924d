"""Property-based tests of the config loader and the CLI's argument handling.

Whatever the input, it either loads or fails with :class:`dfkt.errors.ConfigError` (or another
:class:`dfkt.errors.DfktError` once a loaded value is used, or argparse's ``SystemExit`` for bad
argv) -- no ``KeyError``/``TypeError``/``AttributeError``/... ever escapes to the user.
"""
from __future__ import annotations

import dataclasses
import logging
import string
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dfkt
from dfkt import cli
from dfkt.config import apply_overrides, from_dict, load_yaml, parse_override
from dfkt.core.context import TrainConfig
from dfkt.core.device import resolve_device, seed_everything
from dfkt.errors import ConfigError, DfktError
from dfkt.runconfig import AdaptConfig, DataRef, DistillConfig, ModelRef, SupervisedConfig, parse

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------- strategies
_KEYS = sorted({f.name for cls in (AdaptConfig, DistillConfig, SupervisedConfig, TrainConfig, ModelRef, DataRef)
                for f in dataclasses.fields(cls)})
keys = st.one_of(st.sampled_from(_KEYS), st.text(max_size=12), st.integers(-5, 5), st.none(), st.booleans())
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "shot", "dafl", "lenet5", "digits", "sfda", "dfkd",
                     "poly", "1e-3", "0x10", "", "null", "~", "yes", "2020-13-45"]),
    st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def _near_valid(cls) -> st.SearchStrategy:
    """Mappings that start from a valid config and mutate some keys (reach deep validation)."""
    base = {
        AdaptConfig: {"method": "shot", "target": {"domain": "digits"}, "model": {"name": "shot-lenet"}},
        DistillConfig: {"method": "dafl", "teacher": {"name": "lenet5"}, "student": {"name": "lenet5-half"},
                        "input_shape": [1, 32, 32]},
        TrainConfig: {"epochs": 2, "lr": 0.01},
        SupervisedConfig: {"model": {"name": "lenet5"}, "data": {"domain": "digits"}},
    }[cls]
    sub = {"train": {f.name for f in dataclasses.fields(TrainConfig)},
           "target": {f.name for f in dataclasses.fields(DataRef)},
           "model": {f.name for f in dataclasses.fields(ModelRef)}}

    @st.composite
    def build(draw):
        d = yaml.safe_load(yaml.safe_dump(base))
        names = [f.name for f in dataclasses.fields(cls)]
        for _ in range(draw(st.integers(0, 4))):
            k = draw(st.sampled_from(names + ["trian", "epoch", "lr_", "metod"]))
            if k in sub and draw(st.booleans()):
                inner = d.get(k) if isinstance(d.get(k), dict) else {}
                inner[draw(st.sampled_from(sorted(sub[k])))] = draw(values)
                d[k] = inner
            else:
                d[k] = draw(values)
        if draw(st.booleans()) and d:
            d.pop(draw(st.sampled_from(sorted(d, key=str))))
        return d
    return build()


CONFIG_CLASSES = [AdaptConfig, DistillConfig, SupervisedConfig, TrainConfig]


def _loads_or_config_error(fn, *args):
    try:
        return fn(*args)
    except ConfigError as e:
        assert str(e), "ConfigError without a message"
        return None


# ----------------------------------------------------------------------------- from_dict
@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.data())
def test_from_dict_loads_or_config_error(cls, data) -> None:
    raw = data.draw(st.one_of(values, st.dictionaries(keys, values, max_size=6), _near_valid(cls)))
    obj = _loads_or_config_error(from_dict, cls, raw, "config")
    if obj is not None:
        assert isinstance(obj, cls)


@FUZZ
@given(raw=st.one_of(_near_valid(TrainConfig), st.dictionaries(
    st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), values, max_size=5)))
def test_train_config_values_are_usable_once_loaded(raw) -> None:
    """A TrainConfig that validates can be resolved, seeded and placed on a device without a crash."""
    tc = _loads_or_config_error(from_dict, TrainConfig, raw, "train")
    if tc is None:
        return
    tc = tc.resolved({})
    seed_everything(tc.seed)
    _loads_or_config_error(resolve_device, tc.device)


@FUZZ
@given(spec=st.one_of(st.text(max_size=12), st.sampled_from(["cuda:x", "cpu:0", "CPU", "meta", "cuda:-1", "mps:0"])))
def test_resolve_device_any_string(spec, caplog) -> None:
    _loads_or_config_error(resolve_device, spec)


# ----------------------------------------------------------------------------- YAML files
yaml_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=string.printable, max_size=200),
    values.map(lambda v: yaml.safe_dump(v, allow_unicode=True) if not isinstance(v, bytes) else "x: !!binary ''"),
    st.builds(lambda k, v: f"{k}: {v}\n", st.sampled_from(_KEYS), st.sampled_from(
        ["[", "{a: 1", "2020-13-45", "!!int 0x", "!!float abc", "!!timestamp x", "&a [*a]", "!!python/tuple [1]",
         "!!binary 'abc'", "*undefined", "'unterminated", "@", "`x`", "%TAG", "- - -", "? [a]\n: 1"])))


@FUZZ
@given(text=yaml_texts, raw=st.booleans(), junk=st.binary(max_size=64))
def test_load_yaml_any_file(tmp_path_factory, text, raw, junk) -> None:
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    if raw:
        p.write_bytes(junk)
    else:
        p.write_text(text, encoding="utf-8")
    data = _loads_or_config_error(load_yaml, p)
    if data is None:
        return
    assert isinstance(data, dict)
    for kind in ("adapt", "distill", "supervised"):
        _loads_or_config_error(parse, kind, data)


def test_load_yaml_specific_failures(tmp_path: Path) -> None:
    for text in ("a: 2020-13-45\n", "a: !!int 0x\n", "a: [1, 2\n", "- 1\n- 2\n", "just text\n"):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match="c.yaml"):
            load_yaml(p)
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    assert load_yaml(_write(tmp_path / "empty.yaml", "")) == {}


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- --set overrides
override_keys = st.one_of(
    st.sampled_from(["train.lr", "train.epochs", "method", "target.domain", "model.name", "options.beta",
                     "train", "out", "a.b.c", "train.lr.x", "model.kwargs.width", ".x", "x.", "..", ""]),
    st.text(max_size=15))
override_values = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", "1", "0.01", "1e-3", "-1", "true", "null", "[1, 2", "{a: 1}", "[1, 2, 3]", "2020-13-45", "!!int 0x",
     ".nan", ".inf", "=", "a=b", "x: y", "&a [*a]", "99999999999999999999999"]))
overrides = st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), st.text(max_size=25))


@FUZZ
@given(base=st.one_of(_near_valid(AdaptConfig), st.dictionaries(keys, values, max_size=4)),
       sets=st.lists(overrides, max_size=4))
def test_apply_overrides_then_parse(base, sets) -> None:
    data = _loads_or_config_error(apply_overrides, base, sets)
    if data is None:
        return
    assert isinstance(data, dict)
    _loads_or_config_error(parse, "adapt", data)


def test_parse_override_examples() -> None:
    assert parse_override("train.lr=0.01") == (["train", "lr"], 0.01)
    assert parse_override("a=2020-13-45") == (["a"], "2020-13-45")   # not a date: kept as text
    assert parse_override("out=") == (["out"], None)
    for bad in ("novalue", "=1", "a..b=1", ".a=1"):
        with pytest.raises(ConfigError, match="key"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 5}, ["train.lr=1"])


# ----------------------------------------------------------------------------- CLI argv
@pytest.fixture
def quiet_cli(monkeypatch, tmp_path):
    """cli.main with the heavy parts stubbed: configs are loaded and validated, nothing trains."""
    log = logging.getLogger("dfkt")
    monkeypatch.setattr(log, "handlers", list(log.handlers))
    monkeypatch.setattr(log, "propagate", log.propagate)
    monkeypatch.setattr(log, "level", log.level)
    fake = types.SimpleNamespace(metrics={"acc": 1.0}, method="stub", wall_s=0.0, path=None)
    calls = []

    def stub(*a, **k):
        calls.append(k)
        return fake

    for name in ("adapt", "distill", "train_supervised"):
        monkeypatch.setattr(dfkt.api, name, stub)
    monkeypatch.setattr(ModelRef, "build", lambda self: dfkt.models.build_model("lenet5"))
    monkeypatch.setattr(DataRef, "build", lambda self, root=None: None)
    monkeypatch.setattr("dfkt.bench.runner.run_suite", lambda *a, **k: pytest.fail("bench must not run here"))
    cfgs = {}
    for kind, d in {"adapt": {"method": "shot", "target": {"domain": "digits"}, "model": {"name": "shot-lenet"}},
                    "distill": {"method": "dafl", "teacher": {"name": "lenet5"}, "student": {"name": "lenet5-half"},
                                "input_shape": [1, 32, 32]},
                    "train-source": {"model": {"name": "lenet5"}, "data": {"domain": "digits"}}}.items():
        cfgs[kind] = tmp_path / f"{kind}.yaml"
        cfgs[kind].write_text(yaml.safe_dump(d))
    cfgs["train-teacher"] = cfgs["train-source"]
    return cfgs, calls


argv_words = st.one_of(st.sampled_from(
    ["--set", "--resume", "--out", "--device", "--no-progress", "--data-root", "-v", "-q", "--seeds", "--quick",
     "--task", "sfda", "cpu", "cuda", "train.lr=0.1", "train.epochs=-1", "method=nope", "x", "--", "-", "--help"]),
    st.text(max_size=12), overrides)


@FUZZ
@given(data=st.data())
def test_cli_main_any_argv(quiet_cli, data, capsys) -> None:
    cfgs, calls = quiet_cli
    cmd = data.draw(st.sampled_from(["adapt", "distill", "train-source", "train-teacher", "bench", "list",
                                     "nope", "--version"]))
    rest = data.draw(st.lists(argv_words, max_size=6))
    if cmd in cfgs and data.draw(st.booleans()):
        rest = [str(cfgs[cmd])] + rest
    if data.draw(st.booleans()):
        rest = [w for pair in zip(["--set"] * 3, data.draw(st.lists(overrides, max_size=3))) for w in pair] + rest
    try:
        rc = cli.main([cmd] + rest)
    except SystemExit as e:        # argparse: usage error (2) or --help (0)
        assert e.code in (0, 2)
        return
    assert rc in (0, 2)
    if rc == 2:
        assert "error:" in capsys.readouterr().err


def test_cli_reports_errors_with_exit_code_2(quiet_cli, capsys) -> None:
    cfgs, calls = quiet_cli
    assert cli.main(["adapt", str(cfgs["adapt"]), "--set", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lrr'" in err and "Did you mean 'lr'" in err
    assert cli.main(["adapt", str(cfgs["adapt"]), "--set", "train.epochs=two"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert cli.main(["adapt", str(cfgs["adapt"]), "--set", "train.lr=1e-3", "--set", "options.beta=0.2"]) == 0
    assert calls[-1]["beta"] == 0.2 and calls[-1]["train"].lr == 1e-3
    with pytest.raises(SystemExit):
        cli.main(["adapt"])
    assert issubclass(ConfigError, DfktError)
