"""Suites over your own data through `dfkt bench` (issue 11, "Must show"): an image folder, an unlabeled
flat folder, a path-only list and an npz written to disk; relative paths resolved by --data-root."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dfkt.bench.suite import load_suite
from dfkt.cli import main
from dfkt.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "benchmarks" / "examples" / "your-data.yaml"
CLASSES = 3


def _pattern(k: int, rs: np.random.RandomState) -> np.ndarray:
    """A 28x28 grey image of class k: a bright bar at a class-dependent place, plus noise."""
    img = rs.randint(0, 40, (28, 28)).astype(np.uint8)
    img[4 + 8 * k: 10 + 8 * k, 4:24] = 220
    return img


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my_data")
    rs = np.random.RandomState(0)
    labels = np.arange(90) % CLASSES
    np.savez(root / "source.npz", images=np.stack([_pattern(k, rs) for k in labels]), labels=labels)
    for i in range(30):                                    # labelled image folder: root/<class>/<img>
        k = i % CLASSES
        (root / "folder" / f"c{k}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pattern(k, rs)).save(root / "folder" / f"c{k}" / f"{i}.png")
    (root / "flat").mkdir()
    for i in range(24):                                    # unlabeled flat folder
        Image.fromarray(255 - _pattern(i % CLASSES, rs)).save(root / "flat" / f"{i}.png")
    (root / "paths.txt").write_text("".join(f"flat/{i}.png\n" for i in range(0, 24, 2)))   # path-only list
    return root


def test_suite_over_folder_flat_folder_list_and_npz_through_the_cli(data_root, tmp_path):
    files = {"channels": 1, "resize": 28, "crop": 28}
    suite = {
        "suite": "mine", "task": "sfda", "seeds": 1, "num_classes": CLASSES,
        "source": {"model": "shot-lenet", "options": {"epochs": 3, "batch_size": 32, "smoothing": 0.1}},
        "methods": {"source-only": {}, "shot-im": {"train": {"epochs": 1, "batch_size": 16}}},
        "tasks": [
            {"name": "npz -> folder", "source": {"npz": "source.npz"}, "target": {"image_folder": "folder", **files}},
            {"name": "npz -> flat", "source": {"npz": "source.npz"}, "target": {"image_folder": "flat", **files}},
            {"name": "folder -> list", "source": {"image_folder": "folder", **files},
             "target": {"image_list": "paths.txt", **files}},
        ],
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out = tmp_path / "out"
    assert main(["bench", str(path), "--data-root", str(data_root), "--out", str(out), "--seeds", "1",
                 "--no-progress", "-q"]) == 0
    doc = json.loads((out / "results.json").read_text())
    recs = {(r["task_name"], r["method"]): r for r in doc["records"]}
    assert len(recs) == 6 and {r["seed"] for r in recs.values()} == {0}
    labelled = recs[("npz -> folder", "source-only")]
    assert labelled["labelled_target"] and labelled["acc"] == labelled["ref_acc"] and labelled["acc"] > 60
    assert labelled["source"] == "source" and labelled["target"] == "folder"
    for task in ("npz -> flat", "folder -> list"):
        for m in ("source-only", "shot-im"):
            r = recs[(task, m)]
            assert r["acc"] is None and r["ref_acc"] is None and not r["labelled_target"]
            assert r["snd"] == r["snd"] and r["ref_snd"] == r["ref_snd"]          # label-free scores, finite
    assert recs[("folder -> list", "shot-im")]["epochs"] == 1
    report = (out / "report.md").read_text()
    assert "unlabeled target: SND" in report
    # a missing file names itself and the folder it was looked for in
    assert main(["bench", str(path), "--data-root", str(tmp_path), "--out", str(tmp_path / "o2"), "-q"]) == 2


def test_example_suite_loads_and_its_data_resolve(data_root):
    suite = load_suite(str(EXAMPLE))
    task = suite.tasks[0]
    assert task.source.npz == "source.npz" and task.target.image_folder == "target"
    src = task.source.build(str(data_root), split="source_train")
    assert len(src) == 81 and src.shape == (1, 28, 28) and src.has_labels       # 90 % of 90 rows
    with pytest.raises(ConfigError, match="exactly one of domain, image_list, image_folder, npz, torchvision"):
        from dfkt.config import from_dict
        from dfkt.runconfig import DataRef

        from_dict(DataRef, {"npz": "a.npz", "image_folder": "b"})
