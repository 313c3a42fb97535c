"""Several sources per split, data YAMLs by path (relative roots), data=auto's choice, per-source evaluation, and the
small-person augmentations (mosaic, multi-scale): valid boxes, deterministic per (seed, epoch, index)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sidnet.config import ConfigError
from sidnet.data import DataError, DetectionDataset, build_train_transform, sample_root
from sidnet.data.config import data_config
from sidnet.data.loading import load_records
from sidnet.data.multiscale import multiscale_size, rescale_batch
from sidnet.data.sources import ID_STRIDE, read_data_yaml
from sidnet.evaluation import evaluate_by_source, evaluate_detections

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SPLIT = {"format": "yolo", "images": "images/train2017", "labels": "labels/boxes/train2017"}
SAMPLE_VAL = {"format": "yolo", "images": "images/val2017", "labels": "labels/boxes/val2017"}


def _two_source_folder(tmp_path: Path) -> Path:
    """A user's dataset folder: two copies of the bundled sample (one renamed, so YOLO ids collide) and a YAML with
    relative roots."""
    for name in ("cams_a", "cams_b"):
        shutil.copytree(sample_root(), tmp_path / "datasets" / name)
    b = tmp_path / "datasets" / "cams_b"
    for folder in ("images/train2017", "labels/boxes/train2017"):  # non-COCO names: ids 0..N-1, as capston2/cctv
        for i, f in enumerate(sorted((b / folder).iterdir())):
            f.rename(f.with_name(f"cam_{i:02d}{f.suffix}"))
    (tmp_path / "datasets" / "mine.yaml").write_text(yaml.safe_dump({
        "root": None,
        "train": [{"name": "a", "root": "cams_a", **SAMPLE_SPLIT}, {"name": "b", "root": "cams_b", **SAMPLE_SPLIT}],
        "val": [{"name": "a", "root": "cams_a", **SAMPLE_VAL}, {"name": "b", "root": "cams_b", **SAMPLE_VAL}],
        "num_label_classes": 1, "negative_ratio": -1,
    }))  # fmt: skip
    return tmp_path / "datasets" / "mine.yaml"


def test_multi_source_split_loads_per_source_records_with_unique_ids(tmp_path):
    data = data_config(read_data_yaml(_two_source_folder(tmp_path), project_root=ROOT))
    train = load_records(data, "train", project_root=ROOT)
    assert [r.source for r in train] == ["a"] * 8 + ["b"] * 8  # the sample has 8 train images
    assert sum(len(r.boxes) for r in train if r.source == "a") == sum(len(r.boxes) for r in train if r.source == "b")
    ids = [r.image_id for r in train]
    assert len(set(ids)) == len(ids)
    assert all(i >= ID_STRIDE for r, i in zip(train, ids, strict=True) if r.source == "b")
    assert str(train[0].path).startswith(str(tmp_path / "datasets" / "cams_a"))  # relative to the YAML's folder
    val = load_records(data, "val:0/2", project_root=ROOT) + load_records(data, "val:1/2", project_root=ROOT)
    assert sorted(r.image_id for r in val) == sorted(r.image_id for r in load_records(data, "val", project_root=ROOT))


def test_single_source_yaml_still_loads_and_relative_roots(tmp_path):
    """Today's one-mapping split; a data-level relative root (against the YAML's folder) and a source root inside
    it; the project's own conf/data files stay relative to the project root."""
    shutil.copytree(sample_root(), tmp_path / "ds" / "sample")
    (tmp_path / "one.yaml").write_text(yaml.safe_dump({"root": "ds/sample", "train": SAMPLE_SPLIT, "val": SAMPLE_VAL}))
    nested = {"root": "ds", "train": [{"root": "sample", **SAMPLE_SPLIT}], "val": {"root": "sample", **SAMPLE_VAL}}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested.yaml").write_text(yaml.safe_dump({**nested, "root": "../ds"}))
    for path in (tmp_path / "one.yaml", tmp_path / "sub" / "nested.yaml"):
        data = data_config(read_data_yaml(path, project_root=ROOT))
        records = load_records(data, "train", project_root=ROOT)
        assert len(records) == 8 and all(Path(r.path).is_relative_to(tmp_path / "ds" / "sample") for r in records)
    own = read_data_yaml(ROOT / "conf/data/coco128.yaml", project_root=ROOT)
    assert own["root"] == str((ROOT / "../shared/data/coco128").resolve())


def test_bad_data_yaml_is_one_line(tmp_path):
    with pytest.raises(DataError, match="data YAML not found: .*nope.yaml"):
        read_data_yaml(tmp_path / "nope.yaml", project_root=ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": [{"format": "yolo", "images": "i", "lables": "l"}], "val": SAMPLE_VAL}))
    with pytest.raises(DataError, match=r"data.train\[0\] has unknown key\(s\) \['lables'\]"):
        load_records(data_config(read_data_yaml(bad, project_root=ROOT)), "train", project_root=ROOT)
    bad.write_text(yaml.safe_dump({"root": str(sample_root()), "train": SAMPLE_SPLIT}))  # enough for train.anchors
    train_only = data_config(read_data_yaml(bad, project_root=ROOT))
    assert len(load_records(train_only, "train", project_root=ROOT)) == 8
    with pytest.raises(DataError, match="data.val is missing"):
        load_records(train_only, "val", project_root=ROOT)
    bad.write_text(yaml.safe_dump({"train": SAMPLE_SPLIT, "val": SAMPLE_VAL, "negative_raito": 1}))
    with pytest.raises(DataError, match="unknown key"):
        read_data_yaml(bad, project_root=ROOT)
    with pytest.raises(ConfigError, match="data config"):
        data_config({"train": SAMPLE_SPLIT, "val": SAMPLE_VAL, "bogus": 1})
    dup = {"train": [{"name": "x", **SAMPLE_SPLIT}, {"name": "x", **SAMPLE_SPLIT}], "val": SAMPLE_VAL}
    with pytest.raises(DataError, match="several sources named"):
        load_records(data_config(dup), "train", project_root=ROOT)


def test_train_cli_takes_a_data_yaml_by_path_from_another_folder(tmp_path):
    """`python -m train data=/elsewhere/mine.yaml`: trains on it (per-source AP in the log and the checkpoint's
    report); `train.evaluate --data` the same file reports per source; a missing file is one line."""
    mine = _two_source_folder(tmp_path)
    tiny = ["model=sidnet", "model.anchors=[[12,24],[30,60],[70,110]]", "model.input_size=128",
            "model.kwargs.width=0.125", "batch_size=8", "workers=0", "device=cpu", "tensorboard=false",
            "optim.warmup_epochs=1", "epochs=1", "aug.multiscale=[96,160]"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "train", f"data={mine}", *tiny, f"hydra.run.dir={tmp_path}/run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "val a: AP50" in run.stderr and "val b: AP50" in run.stderr
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["data"]["train"][1]["root"] == str(tmp_path / "datasets" / "cams_b")  # absolute in the record
    assert yaml.safe_load((tmp_path / "run" / ".hydra" / "overrides.yaml").read_text())[0] == f"data={mine}"
    ev = subprocess.run([sys.executable, "-m", "train.evaluate", "--checkpoint", f"{tmp_path}/run/last.pt",
                         "--data", str(mine), "--out", f"{tmp_path}/r.json"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["per_source"]) == {"a", "b"} and report["num_images"] == 8
    assert all(r["num_images"] == 4 and "AP_small" in r and "recall" in r for r in report["per_source"].values())
    missing = subprocess.run([sys.executable, "-m", "train", f"data={tmp_path}/nope.yaml", *tiny], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: data YAML not found:")


def test_auto_prefers_persons_then_coco128_then_sample(tmp_path):
    from sidnet.resolvers import auto_data_name

    shared = tmp_path / "shared" / "data"
    repo = tmp_path / "repo"
    repo.mkdir()
    assert auto_data_name(repo) == "sample"
    (shared / "coco128").mkdir(parents=True)
    (shared / "capston2").mkdir()
    auto_data_name.cache_clear()
    assert auto_data_name(repo) == "coco128"  # capston2 without cctv: not persons
    (shared / "cctv").mkdir()
    auto_data_name.cache_clear()
    assert auto_data_name(repo) == "persons"
    auto_data_name.cache_clear()


def test_persons_yaml_on_shared_data(shared_data):
    """conf/data/persons.yaml reads the three real sets with their documented counts (val: coco128 350 persons in
    128 images, capston2 200 images / 635 persons, cctv 161 images / 599 persons)."""
    if not all((shared_data / d).is_dir() for d in ("capston2", "cctv")):
        pytest.skip("capston2/cctv not in the shared data")
    data = data_config({**yaml.safe_load((ROOT / "conf/data/persons.yaml").read_text()), "root": str(shared_data)})
    val = load_records(data, "val", project_root=ROOT)
    counts = {n: (sum(r.source == n for r in val), sum(len(r.boxes) for r in val if r.source == n))
              for n in ("coco128", "capston2", "cctv")}  # fmt: skip
    assert counts == {"coco128": (128, 350), "capston2": (200, 635), "cctv": (161, 599)}


def test_persons_seg_yaml_on_shared_data(shared_data):
    """conf/data/persons_seg.yaml: COCO128's masks plus capston2 and cctv as box-only train sources (no polygons
    needed there); val is COCO128's person polygons only."""
    if not all((shared_data / d).is_dir() for d in ("capston2", "cctv")):
        pytest.skip("capston2/cctv not in the shared data")
    data = data_config({**yaml.safe_load((ROOT / "conf/data/persons_seg.yaml").read_text()), "root": str(shared_data)})
    train = load_records(data, "train", project_root=ROOT, masks=True)
    flags = {n: {r.box_only for r in train if r.source == n} for n in ("coco128", "capston2", "cctv")}
    assert flags == {"coco128": {False}, "capston2": {True}, "cctv": {True}}
    repeats = {n: {r.repeat for r in train if r.source == n} for n in ("coco128", "capston2", "cctv")}
    assert repeats == {"coco128": {8}, "capston2": {1}, "cctv": {1}}  # the masked images oversampled
    assert all(len(r.polygons) + len(r.rles) >= len(r.boxes) for r in train if r.source == "coco128")
    val = load_records(data, "val", project_root=ROOT, masks=True)
    seg = data_config({**yaml.safe_load((ROOT / "conf/data/coco128_seg.yaml").read_text()),
                       "root": str(shared_data / "coco128")})  # fmt: skip
    same = load_records(seg, "val", project_root=ROOT, masks=True)  # the val of data=coco128_seg: 287 masked persons
    assert {r.source for r in val} == {"coco128"}
    assert sum(len(r.boxes) for r in val) == sum(len(r.boxes) for r in same) == 287


def _rec(image_id, boxes, source):
    from sidnet.data.records import make_record

    return make_record(path=Path("x.jpg"), width=640, height=480, boxes=boxes, labels=[0] * len(boxes),
                       image_id=image_id, source=source)  # fmt: skip


def test_per_source_report_and_small_recall():
    """Source a is found perfectly, source b not at all: per-source AP 1 and 0 from pycocotools on each source's
    image ids, overall in between; recall_small counts only ground truth under 32 x 32 pixels."""
    big, small = [100, 100, 200, 300], [10, 10, 30, 30]
    records = [_rec(1, [big, small], "a"), _rec(2, [big], "a"), _rec(ID_STRIDE + 1, [big], "b"),
               _rec(ID_STRIDE + 2, [], "b")]  # fmt: skip
    preds = {1: np.array([[*big, 0.9, 0], [*small, 0.8, 0]]), 2: np.array([[*big, 0.9, 0]]),
             ID_STRIDE + 1: np.array([[400, 300, 500, 400, 0.9, 0]])}  # fmt: skip
    report = evaluate_by_source(records, preds, operating_conf=0.3)
    a, b = report["per_source"]["a"], report["per_source"]["b"]
    assert a["AP50"] == pytest.approx(1.0) and a["recall"] == 1.0 and a["recall_small"] == 1.0
    assert b["AP50"] == pytest.approx(0.0) and b["recall"] == 0.0 and b["num_small_gt_boxes"] == 0
    assert 0.0 < report["AP50"] < 1.0 and report["num_small_gt_boxes"] == 1
    assert "per_source" not in evaluate_by_source(records[:2], {k: preds[k] for k in (1, 2)})
    missed_small = evaluate_detections(records[:1], {1: np.array([[*big, 0.9, 0]])})
    assert missed_small["recall_small"] == 0.0 and missed_small["recall"] == 0.5


def _box_images(tmp_path, n=6):
    """Synthetic images whose only white pixels are the person boxes."""
    import cv2

    from sidnet.data.records import make_record

    records = []
    for i in range(n):
        img = np.zeros((240, 320, 3), np.uint8)
        x = 20 + 25 * i
        img[40:200, x : x + 60] = 255
        cv2.imwrite(str(tmp_path / f"b{i}.png"), img)
        records.append(make_record(path=tmp_path / f"b{i}.png", width=320, height=240, boxes=[[x, 40, x + 60, 200]],
                                   labels=[0], image_id=i))  # fmt: skip
    return records


def test_mosaic_and_multiscale_valid_boxes_and_deterministic(tmp_path):
    records = _box_images(tmp_path)
    ds = DetectionDataset(records, size=128, transform=build_train_transform(size=128, scale=(0.8, 1.2)), mosaic=1.0)
    seen_boxes = 0
    for index, seed in [(0, 11), (3, 12), (5, 13), (2, 14)]:
        image, target = ds[(index, seed)]
        again, target2 = ds[(index, seed)]
        assert torch.equal(image, again) and torch.equal(target["boxes"], target2["boxes"])  # (seed, index) alone
        for size in (96, 160):
            big, [t] = rescale_batch(image[None], [target], size=size)
            assert big.shape == (1, 3, size, size)
            boxes = t["boxes"]
            assert ((boxes >= 0) & (boxes <= size)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
            for x1, y1, x2, y2 in boxes.round().int().tolist():
                patch = big[0, :, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
                assert patch.numel() == 0 or patch.mean() > 0.6  # still on its (augmented) white person
            seen_boxes += len(boxes)
    assert seen_boxes > 0
    sizes = [multiscale_size(seed=0, epoch=e, index=i, low=320, high=544) for e in range(3) for i in range(20)]
    assert set(sizes) <= set(range(320, 545, 32)) and len(set(sizes)) > 3
    assert sizes == [multiscale_size(seed=0, epoch=e, index=i, low=320, high=544) for e in range(3) for i in range(20)]
    assert sizes != [multiscale_size(seed=1, epoch=e, index=i, low=320, high=544) for e in range(3) for i in range(20)]
    with pytest.raises(ValueError, match="no multiple of 32"):
        multiscale_size(seed=0, epoch=0, index=0, low=330, high=350)


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sidnet.config import register_configs
    from sidnet.resolvers import register_resolvers

    register_configs()
    register_resolvers(project_root=ROOT)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=overrides))


def test_aug_schema_checks_mosaic_and_multiscale():
    from sidnet.config import validate_train_config

    cfg = _compose(["data=sample", "aug=small"])
    assert cfg.aug.mosaic == 0.8 and cfg.aug.multiscale == [320, 544]
    validate_train_config(cfg)
    for bad, match in (("aug.mosaic=1.5", "aug.mosaic"), ("aug.multiscale=[500,300]", "aug.multiscale")):
        with pytest.raises(ConfigError, match=match):
            validate_train_config(_compose(["data=sample", bad]))
    with pytest.raises(Exception, match="mosiac"):
        _compose(["data=sample", "aug.mosiac=0.5"])


SAMPLE_SEG = {"format": "yolo", "images": "images/train2017", "labels": "labels/segments/train2017", "polygons": True}
SAMPLE_SEG_VAL = {"format": "yolo", "images": "images/val2017", "labels": "labels/segments/val2017", "polygons": True}


def _masks_and_box_only_yaml(tmp_path: Path, *, val_box_only: bool = False) -> Path:
    """The bundled sample twice: once with its person polygons, once as a box-only source (its box labels)."""
    val = [{"name": "seg", **SAMPLE_SEG_VAL}]
    if val_box_only:
        val.append({"name": "boxes", **SAMPLE_VAL, "box_only": True})
    path = tmp_path / ("mixed_bad.yaml" if val_box_only else "mixed.yaml")
    path.write_text(yaml.safe_dump({
        "root": None, "train": [{"name": "seg", **SAMPLE_SEG}, {"name": "boxes", **SAMPLE_SPLIT, "box_only": True}],
        "val": val, "class_names": ["person"], "class_map": {0: 0}, "num_label_classes": 1, "negative_ratio": -1,
    }))  # fmt: skip
    return path


def test_box_only_source_gives_mask_targets_that_the_loss_leaves_out(tmp_path):
    """With masks asked for, a ``box_only: true`` source loads without polygons; its images keep their augmented boxes,
    carry zero masks row for row and ``has_masks`` False; the masked source's carry real masks. A box-only val source
    is refused in one line (segm AP needs masks on every val image); without masks it is an ordinary source."""
    from sidnet.data.loading import build_datasets

    data = data_config(read_data_yaml(_masks_and_box_only_yaml(tmp_path), project_root=ROOT))
    records = load_records(data, "train", project_root=ROOT, masks=True)
    assert {(r.source, r.box_only) for r in records} == {("seg", False), ("boxes", True)}
    aug = {"enabled": True, "flip_p": 0.5, "mosaic": 0.0}
    train, val = build_datasets(data, input_size=128, aug=aug, seed=0, project_root=ROOT, masks=True)
    seen = {"seg": 0, "boxes": 0}
    for i, record in enumerate(train.records):
        _, t = train[(i, 7)]
        assert t["has_masks"] is (not record.box_only)
        assert t["masks"].shape == (len(t["boxes"]), 128, 128)
        if record.box_only:
            assert not t["masks"].any()
            seen["boxes"] += len(t["boxes"])
        else:
            assert t["masks"].flatten(1).any(1).all()  # every kept instance has mask pixels
            seen["seg"] += len(t["boxes"])
    assert seen["boxes"] > 0 and seen["seg"] > 0
    assert all(t["has_masks"] for _, t in (val[i] for i in range(len(val))))
    bad = data_config(read_data_yaml(_masks_and_box_only_yaml(tmp_path, val_box_only=True), project_root=ROOT))
    with pytest.raises(DataError, match=r"data.val source\(s\) \['boxes'\] are box_only.*keep box-only sources"):
        load_records(bad, "val", project_root=ROOT, masks=True)
    assert len(load_records(bad, "val", project_root=ROOT)) == 8  # a box detector reads it as any source


@pytest.mark.slow
def test_maskrcnn_trains_on_masks_plus_box_only_images_through_the_cli(tmp_path):
    """`python -m train model=maskrcnn data=<masks + box-only>`: trains, evaluates box and segm AP on the masked val,
    and records both train sources."""
    mixed = _masks_and_box_only_yaml(tmp_path)
    run = subprocess.run([sys.executable, "-m", "train", "model=maskrcnn", f"data={mixed}", "aug=seg",
                          "model.input_size=128", "batch_size=4", "workers=0", "device=cpu", "tensorboard=false",
                          "epochs=1", "eval.every=1", f"hydra.run.dir={tmp_path}/run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train split: 16 images from {'seg': 8, 'boxes': 8}" in run.stderr
    line = next(x for x in run.stderr.splitlines() if " - epoch 1/1 {" in x)
    epoch = json.loads(line[line.index("{") :])
    for key in ("loss_mask", "loss_classifier", "val_AP50", "val_segm_AP50"):
        assert np.isfinite(epoch.get(key, np.nan)), (key, sorted(epoch))
    assert torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1


def test_repeat_oversamples_a_source_in_train_and_is_refused_in_val(tmp_path):
    """``repeat: 3`` shows each image of that source three times per epoch (each time with its own position and
    augmentation seed), epochs stay functions of (seed, epoch), and val refuses it in one line."""
    from sidnet.config import DataConfig
    from sidnet.data.dataset import SeededSampler
    from sidnet.data.loading import load_records

    split = {"root": str(sample_root()), **SAMPLE_SPLIT}
    data = DataConfig(train=[{**split, "name": "a"}, {**split, "name": "b", "repeat": 3}], val=split,
                      class_names=["person"])  # fmt: skip
    records = load_records(data, "train", project_root=tmp_path)
    reps = [r.repeat for r in records]
    assert set(reps) == {1, 3} and reps.count(3) == reps.count(1) > 0
    sampler = SeededSampler(len(records), seed=5, repeats=reps)
    sampler.set_epoch(2)
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == sum(reps)
    shown = [i for i, _ in pairs]
    assert all(shown.count(i) == r for i, r in enumerate(reps))
    assert len({s for _, s in pairs}) == len(pairs)  # every showing has its own augmentation seed
    again = SeededSampler(len(records), seed=5, repeats=reps)
    again.set_epoch(2)
    assert list(again) == pairs
    plain = SeededSampler(len(records), seed=5, repeats=[1] * len(records))
    plain.set_epoch(2)
    ref = SeededSampler(len(records), seed=5)
    ref.set_epoch(2)
    assert list(plain) == list(ref)  # repeat 1 everywhere: the order of runs without repeat, unchanged
    with pytest.raises(DataError, match=r"data.val source\(s\) \['v'\] set repeat"):
        load_records(DataConfig(train=split, val=[{**split, "name": "v", "repeat": 2}, {**split, "name": "w"}],
                                class_names=["person"]), "val", project_root=tmp_path)  # fmt: skip
    for bad in (0, 1.5, "2", True):
        with pytest.raises(DataError, match=r"data.train\[1\].repeat = .*whole number >= 1"):
            load_records(DataConfig(train=[split | {"name": "a"}, split | {"name": "b", "repeat": bad}], val=split,
                                    class_names=["person"]), "train", project_root=tmp_path)  # fmt: skip


def test_recipe_pack_writes_a_repeat_yaml_beside_the_plain_one(tmp_path):
    """``recipe_persons.py pack --repeat SOURCE=N`` (the GPU machine's oversampled copy): persons.yaml as before plus
    persons_repeat.yaml whose train source shows its images N times per epoch; a bad or unknown source is one line."""
    from sidnet.data.config import load_data_yaml

    script = [sys.executable, str(ROOT / "benchmarks" / "recipe_persons.py"), "pack", "--data", "conf/data/sample.yaml"]
    r = subprocess.run([*script, "--out", str(tmp_path / "p"), "--limit", "3", "--quality", "60", "--repeat",
                        "train=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    plain = load_records(load_data_yaml(tmp_path / "p" / "persons.yaml", project_root=ROOT), "train",
                         project_root=ROOT)  # fmt: skip
    rep = load_records(load_data_yaml(tmp_path / "p" / "persons_repeat.yaml", project_root=ROOT), "train",
                       project_root=ROOT)  # fmt: skip
    assert len(plain) == len(rep) == 3
    assert [x.repeat for x in plain] == [1, 1, 1] and [x.repeat for x in rep] == [3, 3, 3]
    assert [x.boxes.tolist() for x in plain] == [x.boxes.tolist() for x in rep]
    for bad, msg in (("train=0", "use SOURCE=N with a whole N >= 1"), ("nope=2", r"no such train source")):
        r = subprocess.run([*script, "--out", str(tmp_path / bad), "--limit", "1", "--repeat", bad], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode != 0 and re.search(msg, r.stderr.strip().splitlines()[-1]), r.stderr[-500:]
