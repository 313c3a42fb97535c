"""Tests for sidnet.anchors (IoU k-means, evolution, metrics) and the ``python -m train.anchors`` entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sidnet.anchors import (
    YOLOV2_VOC_ANCHORS,
    anchor_metrics,
    evolve_anchors,
    kmeans_anchors,
    letterboxed_wh,
    wh_iou,
)
from train.anchors import main, read_current_anchors, tune, write_anchors_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = np.array([[12.0, 30.0], [60.0, 140.0], [220.0, 180.0]])  # sorted by area


def _clustered_wh(seed: int, per_cluster: int = 150, noise: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c * np.exp(rng.normal(0.0, noise, size=(per_cluster, 2))) for c in CLUSTERS])


def _mean_best_iou(wh: np.ndarray, anchors: np.ndarray) -> float:
    return float(wh_iou(wh, anchors).max(axis=1).mean())


def test_letterboxed_wh_known_example() -> None:
    wh = np.array([[64.0, 48.0], [30.0, 60.0]])
    sizes = np.array([[640, 480], [300, 600]])
    # Long sides 640 and 600 map to 416: scales 0.65 and 416/600.
    np.testing.assert_allclose(letterboxed_wh(wh, sizes, size=416), [[41.6, 31.2], [20.8, 41.6]])
    assert letterboxed_wh(np.zeros((0, 2)), np.zeros((0, 2)), size=416).shape == (0, 2)
    with pytest.raises(ValueError, match="rows"):
        letterboxed_wh(wh, sizes[:1], size=416)


def test_wh_iou_hand_values() -> None:
    iou = wh_iou(np.array([[10.0, 10.0]]), np.array([[10.0, 10.0], [5.0, 20.0], [20.0, 20.0]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 100 / 400]])
    assert wh_iou(np.zeros((1, 2)), np.zeros((1, 2)))[0, 0] == 0.0  # two empty boxes: no overlap, no NaN


def test_kmeans_recovers_known_clusters() -> None:
    wh = _clustered_wh(seed=1)
    anchors = kmeans_anchors(wh, k=3, seed=0)
    assert anchors.shape == (3, 2)
    np.testing.assert_allclose(anchors, CLUSTERS, rtol=0.10)
    assert np.all(np.diff(anchors.prod(axis=1)) > 0)  # sorted by area


def test_kmeans_is_deterministic_and_seed_robust() -> None:
    wh = _clustered_wh(seed=2)
    first = kmeans_anchors(wh, k=3, seed=0, evolve_generations=200)
    np.testing.assert_array_equal(first, kmeans_anchors(wh, k=3, seed=0, evolve_generations=200))
    for seed in (1, 7, 123):
        np.testing.assert_allclose(kmeans_anchors(wh, k=3, seed=seed), CLUSTERS, rtol=0.10)


def test_kmeans_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="only 2 boxes"):
        kmeans_anchors(np.array([[10.0, 10.0], [20.0, 20.0]]), k=3)
    with pytest.raises(ValueError, match="positive"):
        kmeans_anchors(np.array([[10.0, 0.0], [20.0, 20.0]]), k=1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        kmeans_anchors(np.ones((4, 3)), k=1)


def test_kmeans_with_fewer_distinct_sizes_than_k() -> None:
    # k-means++ has zero distance everywhere after the first pick; it must still return k finite anchors.
    anchors = kmeans_anchors(np.tile([[20.0, 40.0]], (5, 1)), k=3)
    np.testing.assert_allclose(anchors, np.tile([[20.0, 40.0]], (3, 1)))


def test_metrics_for_known_anchors() -> None:
    wh = _clustered_wh(seed=3, noise=0.0)
    exact = anchor_metrics(wh, CLUSTERS)
    assert exact == {"avg_iou": pytest.approx(1.0), "bpr": 1.0, "iou_threshold": 0.5, "num_boxes": len(wh)}
    # Hand example: best IoUs 1 and 1/3.
    boxes = np.array([[10.0, 10.0], [5.0, 20.0]])
    m = anchor_metrics(boxes, np.array([[10.0, 10.0]]))
    assert m["avg_iou"] == pytest.approx(2 / 3)
    assert m["bpr"] == 0.5
    assert anchor_metrics(boxes, np.array([[10.0, 10.0]]), iou_threshold=1 / 3)["bpr"] == 1.0  # threshold is >=
    with pytest.raises(ValueError, match="at least one box"):
        anchor_metrics(np.zeros((0, 2)), CLUSTERS)


def test_evolution_never_lowers_fitness() -> None:
    wh = _clustered_wh(seed=4, noise=0.2)
    for start in (CLUSTERS * 1.3, np.array([[10.0, 10.0], [50.0, 50.0], [100.0, 100.0]]), CLUSTERS):
        before = _mean_best_iou(wh, start)
        for seed in range(3):
            after = _mean_best_iou(wh, evolve_anchors(wh, start, generations=300, seed=seed))
            assert after >= before
    # A poor start must actually improve, and zero generations is the identity (up to sorting).
    poor = np.array([[10.0, 10.0], [50.0, 50.0], [100.0, 100.0]])
    assert _mean_best_iou(wh, evolve_anchors(wh, poor, generations=300)) > _mean_best_iou(wh, poor) + 0.05
    np.testing.assert_array_equal(evolve_anchors(wh, poor[::-1], generations=0), poor)


def test_kmeans_with_evolution_not_worse_than_plain() -> None:
    wh = _clustered_wh(seed=5, noise=0.3)
    plain = kmeans_anchors(wh, k=3, seed=0)
    evolved = kmeans_anchors(wh, k=3, seed=0, evolve_generations=500)
    assert _mean_best_iou(wh, evolved) >= _mean_best_iou(wh, plain)


def test_yolov2_anchors_are_pixels() -> None:
    assert YOLOV2_VOC_ANCHORS.shape == (5, 2)
    np.testing.assert_allclose(YOLOV2_VOC_ANCHORS[0], [1.3221 * 32, 1.73145 * 32])


def test_tune_and_yaml_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wh = np.concatenate([_clustered_wh(seed=6), [[1.0, 1.5]]])  # one tiny box: left out of the fit, kept in metrics
    anchors, table, metrics = tune(wh, k=3, seed=0, evolve=100, current=(YOLOV2_VOC_ANCHORS, "yolov2-voc"))
    out = capsys.readouterr().out
    assert "ignores 1 boxes" in out and "yolov2-voc" in table and "BPR@0.5" in table
    np.testing.assert_array_equal(anchors, anchors.round(1))
    assert metrics["avg_iou"] == pytest.approx(anchor_metrics(wh, anchors)["avg_iou"])

    path = tmp_path / "conf" / "anchors.yaml"
    meta = {"size": 416, "k": 3, "seed": 0, "data": "conf/data/x.yaml", "num_boxes": len(wh), "avg_iou": 0.7}
    write_anchors_yaml(path, anchors, meta)
    text = path.read_text()
    assert text.startswith("# Written by `python -m train.anchors` on ")
    loaded = yaml.safe_load(text)
    np.testing.assert_allclose(loaded["anchors"], anchors)
    assert {k: loaded[k] for k in meta} == meta
    assert [p.name for p in path.parent.iterdir()] == ["anchors.yaml"]

    # The written file is read back as the "current" anchors, rescaled when the input size differs.
    current, label = read_current_anchors(str(path), size=832)
    np.testing.assert_allclose(current, anchors * 2)
    assert "rescaled 416->832" in label
    voc, label = read_current_anchors("yolov2-voc", size=416)
    assert label == "yolov2-voc" and np.array_equal(voc, YOLOV2_VOC_ANCHORS)
    with pytest.raises(SystemExit, match="missing.yaml not found"):
        read_current_anchors(str(tmp_path / "missing.yaml"), size=416)  # a typo is not silently the VOC anchors


def _write_yolo_dataset(root: Path) -> None:
    """Six images, each with three person boxes from CLUSTERS-like sizes (normalised), plus other-class boxes."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        width, height = (640, 480) if i % 2 else (480, 640)
        Image.new("RGB", (width, height), (i * 30, 90, 120)).save(root / "images" / f"{i:06d}.png")
        lines = []
        for w, h in CLUSTERS * np.exp(rng.normal(0.0, 0.05, size=(3, 2))):
            lines.append(f"0 0.5 0.5 {w / width:.6f} {h / height:.6f}")
        lines.append("5 0.5 0.5 0.1 0.1")  # another COCO class: must not reach the anchors
        (root / "labels" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    Image.new("RGB", (320, 240)).save(root / "images" / "000099.png")  # a negative image


def test_entry_point_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_root = tmp_path / "data"
    _write_yolo_dataset(data_root)
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump(
            {
                "root": str(data_root),
                "train": {"format": "yolo", "images": "images", "labels": "labels"},
                "class_names": ["person"],
                "class_map": {0: 0},
                "num_label_classes": 80,
                "lenient": False,
            }
        )
    )
    out = tmp_path / "anchors.yaml"
    cmd = [sys.executable, "-m", "train.anchors", "--data", str(data_yaml), "--size", "416", "-k", "3"]
    cmd += ["--evolve", "50", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "7 images (1 without persons), 18 person boxes" in result.stdout
    # no --current: compared against the anchors the default model trains with (conf/model/sidnet_mobilenetv2.yaml)
    assert "current (conf/anchors/coco128_person.yaml)" in result.stdout
    loaded = yaml.safe_load(out.read_text())
    assert loaded["k"] == 3 and loaded["size"] == 416 and loaded["num_boxes"] == 18
    assert 0.0 < loaded["avg_iou"] <= 1.0 and 0.0 <= loaded["bpr"] <= 1.0
    assert np.asarray(loaded["anchors"]).shape == (3, 2)

    # Second run (in process: importing torch for the data layer costs seconds) compares against the file it
    # is about to overwrite.
    args = [*cmd[3:], "--current", str(out)]
    assert main(args) == 0
    assert f"current ({out})" in capsys.readouterr().out

    # Bad input: a one-line SystemExit message, not a traceback.
    with pytest.raises(SystemExit, match="k=50 anchors requested but only 18 boxes"):
        main(args[:-2] + ["-k", "50"])
    with pytest.raises(SystemExit, match="not found"):
        main(["--data", str(tmp_path / "nope.yaml")])
    data_yaml.write_text(data_yaml.read_text().replace("class_names:\n- person", "class_names:\n- car"))
    with pytest.raises(SystemExit, match="has no 'person'"):
        main(args)
