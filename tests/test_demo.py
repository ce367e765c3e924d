"""The README's main job: `dfkt demo` clears its floors on the embedded digits."""
import json

from dfkt.cli import main


def test_demo_clears_its_floors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("[PASS]") == 3 and "[FAIL]" not in out
    doc = json.loads((tmp_path / "results.json").read_text())
    tasks = {r["task"] for r in doc["records"]}
    assert tasks == {"sfda", "dfkd"}
    shot = next(r for r in doc["records"] if r["method"] == "shot")
    dafl = next(r for r in doc["records"] if r["method"] == "dafl")
    assert shot["acc"] >= shot["ref_acc"] + 5 and doc["in_domain_acc"] - shot["ref_acc"] >= 15
    assert dafl["acc"] >= 0.9 * dafl["ref_acc"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "synthesized.png").exists()
