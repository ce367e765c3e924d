"""`dfkt bench` writes a valid results.json, report.md and plots; the CLI front-ends work."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from dfkt.cli import main
from helpers.harness import run_suite

SFDA_SUITE = {
    "suite": "tiny-sfda", "task": "sfda", "seeds": 1,
    "source": {"model": "shot-lenet", "options": {"epochs": 3, "smoothing": 0.1}},
    "methods": {"source-only": {}, "tent": {"train": {"epochs": 1}}},
    "tasks": [{"name": "uci→uci-c", "source": {"domain": "digits"},
               "target": {"domain": "digits", "corruption": "gaussian_blur", "severity": 5}}],
    "quick": {"seeds": 1, "methods": ["source-only"]},
}
DFKD_SUITE = {
    "suite": "tiny-dfkd", "task": "dfkd", "seeds": 1, "student": "lenet5-half", "input_shape": [1, 32, 32],
    "teachers": {"lenet5": {"model": "lenet5", "options": {"epochs": 3, "schedule": "cosine", "lr": 0.05},
                            "train_split": "train", "val_split": None}},
    "methods": {"dafl": {"teacher": "lenet5", "train": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 16}},
                # a variant label: the registered method `dafl` with other options
                "dafl+adv": {"method": "dafl", "teacher": "lenet5", "options": {"adv": 3.0},
                             "train": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 16}},
                # no metadata given: the bench records it on the teacher's training split
                "lopes": {"teacher": "lenet5", "options": {"inv_steps": 2},
                          "train": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 16}}},
    "tasks": [{"name": "uci32", "source": {"domain": "digits", "size": 32, "split": "train"},
               "target": {"domain": "digits", "size": 32, "split": "test"}}],
}
REQUIRED = {"sfda": {"task", "method", "source", "target", "seed", "acc", "ref_acc", "wall_s", "device"},
            "dfkd": {"task", "method", "dataset", "teacher", "student", "seed", "acc", "ref_acc", "wall_s", "device"}}


@pytest.mark.parametrize("suite", [SFDA_SUITE, DFKD_SUITE], ids=["sfda", "dfkd"])
def test_bench_writes_results_report_and_plots(tmp_path, suite, capsys):
    doc, out = run_suite(tmp_path, suite)
    assert doc["suite"] == suite["suite"] and {"torch", "device", "python"} <= set(doc["env"])
    assert len(doc["records"]) == len(suite["methods"])
    for r in doc["records"]:
        assert REQUIRED[suite["task"]] <= set(r), set(REQUIRED[suite["task"]]) - set(r)
        assert 0 <= r["acc"] <= 100 and 0 <= r["ref_acc"] <= 100 and r["wall_s"] >= 0
    report = (out / "report.md").read_text()
    for m in suite["methods"]:
        assert f"| {m} |" in report
    assert (out / "accuracy.png").stat().st_size > 1000
    assert (out / "accuracy_vs_time.png").exists()
    # source models / teachers are cached by config hash and reused
    assert any((out / "cache").iterdir())
    if suite["task"] == "sfda":
        so = next(r for r in doc["records"] if r["method"] == "source-only")
        assert so["acc"] == pytest.approx(so["ref_acc"], abs=1e-6)
    # --publish: a RESULTS.md section per suite, replaced (not duplicated) on the next run
    from dfkt.bench.report import publish

    md = tmp_path / "RESULTS.md"
    publish(doc, out, md)
    publish(doc, out, md)
    text = md.read_text()
    assert text.count(f"<!-- suite:{suite['suite']} -->") == 1 and "| method |" in text
    assert (tmp_path / "results" / suite["suite"] / "results.json").exists()
    # --resume skips the runs already recorded
    again, _ = run_suite(tmp_path, suite, "--resume", out=out)
    assert len(again["records"]) == len(suite["methods"])
    # ... and the suite's time counts the commands whose runs it kept
    assert again["suite_wall_s_total"] == pytest.approx(doc["suite_wall_s_total"] + again["suite_wall_s"], abs=0.11)
    assert doc["suite_wall_s_total"] == doc["suite_wall_s"] > again["suite_wall_s"]
    assert f"{again['suite_wall_s_total']} s over all the commands above" in (out / "report.md").read_text()


def test_bench_jobs_runs_in_workers_with_the_same_results(tmp_path):
    """--jobs 2: runs go to 2 worker processes (1 torch thread each); the records match a sequential run."""
    suite = {**SFDA_SUITE, "methods": {"source-only": {}, "tent": {"train": {"epochs": 1}},
                                       "adabn": {}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert main(["bench", str(path), "--out", str(seq), "--no-progress", "-q"]) == 0
    assert main(["bench", str(path), "--out", str(par), "--cache", str(seq / "cache"), "--no-progress", "-q",
                 "--jobs", "2"]) == 0
    a = {r["method"]: r for r in json.loads((seq / "results.json").read_text())["records"]}
    b = {r["method"]: r for r in json.loads((par / "results.json").read_text())["records"]}
    assert set(a) == set(b) == set(suite["methods"])
    for m in a:
        assert b[m]["acc"] == pytest.approx(a[m]["acc"], abs=1e-6), m
        assert b[m]["torch_threads"] >= 1
        assert b[m]["ref_step_ms"] > 0          # the machine's speed travels with each timing
    assert (par / "report.md").exists()
    assert "Machine speed: a reference step" in (par / "report.md").read_text()


def test_speed_note_names_the_speed_each_run_was_timed_at():
    from dfkt.bench.report import _speed_note

    recs = [{"ref_step_ms": 20.0}, {"ref_step_ms": 41.5}, {}]
    (line,) = _speed_note(recs, 30.0)
    assert "30.0 ms now" in line and "timed at 20.0-41.5 ms" in line and "1 of 3 runs predate" in line
    assert _speed_note([{}], None) == []


def test_bench_merge_combines_parts_without_rerunning(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(SFDA_SUITE, allow_unicode=True))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--no-progress", "-q", "--cache", str(tmp_path / "cache")]
    assert main(["bench", str(path), "--out", str(a), "--methods", "source-only", *common]) == 0
    assert main(["bench", str(path), "--out", str(b), "--methods", "tent", *common]) == 0
    ra = json.loads((a / "results.json").read_text())["records"]
    rb = json.loads((b / "results.json").read_text())["records"]
    assert main(["bench", str(path), "--out", str(c), "--merge", f"{a},{b}", *common]) == 0
    doc = json.loads((c / "results.json").read_text())
    # nothing was rerun: the merged records are the parts' records, byte for byte
    assert sorted(json.dumps(r, sort_keys=True) for r in doc["records"]) == \
        sorted(json.dumps(r, sort_keys=True) for r in ra + rb)
    assert "| tent |" in (c / "report.md").read_text()
    assert main(["bench", str(path), "--out", str(c), "--merge", str(tmp_path / "nope"), *common]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_suite_variant_of_an_unknown_method_is_refused(tmp_path, capsys):
    bad = {**DFKD_SUITE, "methods": {"dafl+x": {"method": "dafll", "teacher": "lenet5"}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress", "-q"]) != 0
    err = capsys.readouterr().err
    assert "unknown method 'dafll'" in err and "dafl" in err


def test_bench_quick_and_unknown_suite(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(SFDA_SUITE, allow_unicode=True))
    assert main(["bench", str(path), "--quick", "--out", str(tmp_path / "q"), "--no-progress", "-q"]) == 0
    doc = json.loads((tmp_path / "q" / "results.json").read_text())
    assert [r["method"] for r in doc["records"]] == ["source-only"] and doc["quick"] is True
    assert main(["bench", "sfda-digit", "--out", str(tmp_path / "x")]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_shipped_suites_are_valid():
    from dfkt.bench.suite import load_suite

    for name in ("sfda-digits", "dfkd-mnist", "sfda-shifts"):
        s = load_suite(name)
        assert s.seeds == 3 and s.methods and s.quick.methods
    shifts = load_suite("sfda-shifts")
    held = [t for t in shifts.tasks if t.heldout]
    assert len(shifts.tasks) >= 20 and len(held) >= 8 and shifts.defaults_only
    assert {t.source.domain for t in shifts.tasks} >= {"mnist10k", "digits", "shapes"}
    assert all(not (r.options or r.train) for r in shifts.methods.values())


def test_suites_refuse_per_task_overrides_and_non_defaults(tmp_path, capsys):
    bad = {**SFDA_SUITE, "tasks": [{**SFDA_SUITE["tasks"][0], "overrides": {"tent": {"train": {"lr": 0.1}}}}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(bad, allow_unicode=True))
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress", "-q"]) == 2
    err = capsys.readouterr().err
    assert "per-task `overrides`" in err and "named variant" in err
    strict = {**SFDA_SUITE, "defaults_only": True}
    path.write_text(yaml.safe_dump(strict, allow_unicode=True))
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress", "-q"]) == 2
    assert "registered defaults" in capsys.readouterr().err


def test_report_shows_dev_and_heldout_apart():
    from dfkt.bench.report import markdown, sfda_summary

    def rec(task, method, seed, acc, unguarded, ref, heldout, fired=False):
        return {"task": "sfda", "task_name": task, "method": method, "seed": seed, "acc": acc,
                "acc_unguarded": unguarded, "ref_acc": ref, "heldout": heldout, "guard_fired": fired,
                "wall_s": 1.0}

    records = [rec("a", "m", 0, 90.0, 90.0, 80.0, False), rec("a", "m", 1, 70.0, 50.0, 80.0, False, True),
               rec("b", "m", 0, 60.0, 60.0, 70.0, True), rec("c", "m", 0, 100.0, 100.0, 70.0, True)]
    row = sfda_summary(records)[0]
    assert row["dev_acc"] == pytest.approx(80.0) and row["dev_unguarded"] == pytest.approx(70.0)
    assert row["heldout_acc"] == pytest.approx(80.0) and row["heldout_tasks"] == 2
    assert row["below_returned"] == 2 and row["below_unguarded"] == 2 and row["guard_fired"] == 1
    md = markdown({"suite": "s", "records": records, "env": {}})
    assert "headline: the held-out mean" in md and "## b (held-out)" in md and "## a\n" in md


def test_report_states_the_dfkd_floors():
    from dfkt.bench.report import markdown

    def rec(method, seed, acc):
        return {"task": "dfkd", "task_name": "t", "method": method, "seed": seed, "acc": acc, "ref_acc": 98.0,
                "teacher": "lenet5", "student": "lenet5-half", "wall_s": 1.0}

    records = [rec("good", 0, 97.9), rec("good", 1, 97.7), rec("weak", 0, 80.0), rec("weak", 1, 90.0)]
    md = markdown({"suite": "s", "records": records, "env": {}})
    assert "every method >= 95 % of its teacher: NO (below: weak)" in md
    assert "the best >= 99.5 %: yes (good 99.8 %)" in md
    assert "std across seeds <= 1.5 points: NO (above: weak)" in md
    assert "SFDA accuracy" not in md and "DFKD accuracy is the student's" in md


def test_cli_list_and_unknown_config_key(tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "shot" in out and "dafl" in out and "lenet5" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: shot\ntarget: {domain: digits}\ntrian: {epochs: 1}\n")
    assert main(["adapt", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'trian'" in err and "Did you mean 'train'" in err


PARENT = r"""
import concurrent.futures as cf, multiprocessing as mp, os, sys, time
from dfkt.bench.runner import _worker_init
if __name__ == "__main__":
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                  initargs=(1, os.getpid()))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 90)      # the worker is busy with a long run ...
    time.sleep(1)
    os.kill(os.getpid(), 9)          # ... when the bench is killed hard: no pool shutdown
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"      # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
def test_bench_workers_exit_when_the_bench_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == -9, out.stderr
    worker = int(out.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), f"worker {worker} outlived the killed bench"
