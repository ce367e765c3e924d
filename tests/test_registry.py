"""The registry's taxonomy: every method has a family of its task, shown grouped by `dfkt list`,
`dfkt.method_table()` and the README (no training here: fast)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dfkt
from dfkt import registry
from dfkt.cli import TASK_TITLES, main, methods_markdown
from dfkt.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def _contiguous(keys: list) -> bool:
    """Each distinct key occupies one unbroken run of the list."""
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    return len(runs) == len(set(runs))


def test_every_registered_method_has_a_family_of_its_task():
    assert registry.methods(), "no method registered"
    for (task, name), cls in registry.methods().items():
        assert cls.family in registry.families(task), f"{task} method {name!r} has family {cls.family!r}"
    # the classification the registry's docstring states
    expected = {("sfda", "shot"): "self-training", ("sfda", "tent"): "self-training", ("sfda", "adabn"): "self-training",
                ("sfda", "source-only"): "baseline", ("tta", "tent"): "online", ("tta", "source"): "baseline",
                ("dfkd", "dafl"): "generator", ("dfkd", "fast"): "generator", ("dfkd", "cmi"): "inversion",
                ("dfkd", "deepinversion"): "inversion", ("dfkd", "lopes"): "metadata"}
    assert {k: registry.methods()[k].family for k in expected} == expected
    assert dfkt.list_methods("dfkd", family="inversion") == ["cmi", "deepinversion"]
    assert "tent" in dfkt.list_methods(family="online") and "shot" not in dfkt.list_methods(family="online")


def test_unknown_missing_or_foreign_family_is_an_error_at_registration():
    before = dict(registry.methods())
    with pytest.raises(ConfigError, match=r"family 'self-trainng'.*self-training, reconstruction, baseline"
                                          r".*Did you mean 'self-training'"):
        registry.register("x", task="sfda", family="self-trainng")
    with pytest.raises(ConfigError, match="got no family: pass family= one of generator, inversion, metadata"):
        registry.register("x", task="dfkd")
    with pytest.raises(ConfigError, match="family 'online'"):
        registry.register("x", task="dfkd", family="online")       # a TTA family is no DFKD family
    with pytest.raises(ConfigError, match="task must be one of sfda, dfkd, tta, compress"):
        registry.register("x", task="sfdaa", family="self-training")
    assert registry.methods() == before


def test_register_records_the_family(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry.methods()))

    @registry.register("my-compress", task="compress", family="compress")
    class Mine:
        """Mine (Doe et al., NeurIPS 2030): a test recipe."""

    assert Mine.family == "compress" and registry.get_method("my-compress") is Mine
    row = [r for r in registry.method_table() if r["name"] == "my-compress"]
    assert row == [{"task": "compress", "family": "compress", "name": "my-compress", "description": "a test recipe.",
                    "paper": "Doe et al., NeurIPS 2030", "summary": Mine.__doc__, "file": f"{__name__.replace('.', '/')}.py"}]
    assert registry.method_table()[-1]["name"] == "my-compress"      # compress is the last task


def test_method_table_rows():
    rows = dfkt.method_table()
    assert len(rows) == len(registry.methods())
    assert {(r["task"], r["name"]) for r in rows} == set(registry.methods())
    # grouped: tasks in registry order, families contiguous within a task and in the registry's order
    assert [t for t in registry.TASKS if any(r["task"] == t for r in rows)] == list(dict.fromkeys(r["task"] for r in rows))
    assert _contiguous([(r["task"], r["family"]) for r in rows])
    for task in registry.TASKS:
        fams = list(dict.fromkeys(r["family"] for r in rows if r["task"] == task))
        assert fams == [f for f in registry.families(task) if f in fams]
    shot = next(r for r in rows if (r["task"], r["name"]) == ("sfda", "shot"))
    assert shot["family"] == "self-training" and shot["paper"] == "Liang et al., ICML 2020"
    assert shot["file"] == "dfkt/sfda/shot.py" and shot["description"].startswith("information maximisation")
    for r in rows:
        assert r["description"] and (Path(__file__).resolve().parents[1] / r["file"]).is_file(), r
        if r["family"] != "baseline" and r["paper"] != "dfkt":
            assert re.search(r"\b(19|20)\d\d\b", r["paper"]), f"{r['name']}: no paper year in {r['summary']!r}"
    assert {r["task"] for r in dfkt.method_table("tta")} == {"tta"}


def test_dfkt_list_groups_methods_by_family(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("methods:")
    header, seen = None, []
    for line in out[1:]:
        if not line.startswith("  "):
            break                                      # models/domains/suites follow the methods
        m = re.match(r"  (\w+) / ([\w-]+): ", line)
        if m:
            header = (m[1], m[2])
            seen.append(header)
            continue
        name = line.split()[0]
        assert registry.methods()[(header[0], name)].family == header[1], line
        seen.append((header, name))
    groups = [s for s in seen if isinstance(s[0], str)]
    assert len(groups) == len(set(groups)) == len({(c.task, c.family) for c in registry.methods().values()})
    assert len(seen) - len(groups) == len(registry.methods())

    assert main(["list", "--task", "dfkd"]) == 0
    out = capsys.readouterr().out
    assert "  dfkd / generator:" in out and "  dfkd / inversion:" in out and "sfda /" not in out and "tta /" not in out


def test_readme_methods_tables_are_grouped_by_family():
    text = README.read_text()
    block = text[text.index("<!-- methods -->"):text.index("<!-- /methods -->")]
    titles = {f"**{v}**": k for k, v in TASK_TITLES.items()}
    task = family = None
    found = {}
    for line in block.splitlines():
        if line in titles:
            task, family = titles[line], None
        elif m := re.match(r"\*([\w-]+)\*: ", line):
            family = m[1]
        elif m := re.match(r"\| `([^`]+)` \|", line):
            found[(task, m[1])] = family
    assert found == {k: c.family for k, c in registry.methods().items()}, \
        "README methods tables are out of date: paste `python -m dfkt list --markdown` between the methods markers"
    assert "*reconstruction*" in methods_markdown()              # an empty family of a task shows as 'None yet'


def test_registry_is_a_leaf_and_distill_is_both_function_and_package():
    """`import dfkt.registry` imports no method module and not the API's method packages; the first lookup
    loads them. `dfkt.distill` is the DFKD package and calls dfkt.api.distill (no re-binding)."""
    import inspect
    import subprocess
    import sys

    code = ("import sys, dfkt.registry as r\n"
            "pk = ('dfkt.distill', 'dfkt.sfda', 'dfkt.online')\n"
            "print(sorted(m for m in sys.modules if m.startswith(pk)))\n"
            "r.get_method('dafl')\n"
            "print(sorted(m for m in sys.modules if m.startswith(pk))[:1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()
    assert out[0] == "[]", f"import dfkt.registry imported method modules: {out[0]}"
    assert out[1] == "['dfkt.distill']"
    src = (Path(__file__).resolve().parents[1] / "dfkt" / "registry.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+(\.|dfkt\.)(distill|sfda|online|api|compress)\b", src, re.M)
    import dfkt.api
    import dfkt.distill.dafl
    assert inspect.ismodule(dfkt.distill) and dfkt.distill.dafl.__name__ == "dfkt.distill.dafl"
    assert inspect.signature(dfkt.distill) == inspect.signature(dfkt.api.distill)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        dfkt.distill(None, None, method="nope", input_shape=(1, 8, 8))
