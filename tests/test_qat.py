"""QAT (``python -m train quant=qat``) on the CPU with real coco128 images: the run starts from the INT8 export's
calibration, writes a plain-data checkpoint that resumes; ``python -m export --precision int8`` takes its ranges with
no calibration pass; the Q/DQ ONNX follows the fake-quantized PyTorch model; bad input; ``NAME:K/N`` splits.

Model: the tiny 1-class Darknet SIDNet of ``test_export_int8`` (width 0.125, 128², BatchNorm statistics from random
images; its MaxPools are quantized too). Data: 12 coco128 val2017 images with their person labels, 8 to train and
calibrate on, 4 to validate; the ONNX/PyTorch comparison runs on 8 other val2017 images.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sidnet.checkpoint import load_checkpoint, save_checkpoint
from sidnet.config import register_configs
from sidnet.data import DataError
from sidnet.data.config import data_config
from sidnet.data.loading import load_records
from sidnet.engine.trainer import train
from sidnet.evaluation import box_iou
from sidnet.export.adapters import calibrate_batchnorm
from sidnet.export.config import ExportConfig, Int8Config
from sidnet.export.pipeline import run_export
from sidnet.models import build_model
from sidnet.quant.calibration import preprocess
from sidnet.quant.qdq import activation_scales
from sidnet.resolvers import register_resolvers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                reason="pip install -e '.[int8]' (nvidia-modelopt)")  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = [[12.0, 24.0], [30.0, 60.0], [70.0, 110.0]]
SPEC = {"name": "sidnet", "anchors": ANCHORS, "num_classes": 1, "input_size": 128, "kwargs": {"width": 0.125}}
TINY = ["model=sidnet", "model.anchors=[[12,24],[30,60],[70,110]]", "model.input_size=128", "model.kwargs.width=0.125",
        "batch_size=4", "workers=0", "device=cpu", "tensorboard=false", "aug=none"]  # fmt: skip
# Q/DQ ONNX (onnxruntime, graph as written) vs the fake-quantized PyTorch model it was exported from, raw head map on
# 8 real letterboxed val2017 images: relative L2 error below QDQ_VS_FAKEQUANT (measured 0.0042; what is left is
# float rounding of the BatchNorm-folded convs flipping near-tie roundings) and below a third of the Q/DQ model's
# distance to the same weights in FP32 (measured 0.029). Detections: >= 90% of the fake-quant model's best 5 boxes per
# image are among the ONNX best 10 at IoU >= 0.9 (measured 97.5%, worst image 80%).
QDQ_VS_FAKEQUANT = 0.02


def _compose(overrides: list[str]):
    register_configs()
    register_resolvers(project_root=ROOT)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=overrides))


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    """A tiny FP32 checkpoint, a 12-image coco128 data YAML, and a 1-epoch QAT run from the checkpoint."""
    tmp = tmp_path_factory.mktemp("qat")
    coco = shared_data / "coco128"
    images = sorted((coco / "images/val2017").glob("*.jpg"))
    for split, chosen in (("train", images[:8]), ("val", images[8:12])):
        (tmp / "data" / split / "images").mkdir(parents=True)
        (tmp / "data" / split / "labels").mkdir()
        for p in chosen:
            shutil.copy(p, tmp / "data" / split / "images" / p.name)
            label = coco / "labels/boxes/val2017" / f"{p.stem}.txt"
            (tmp / "data" / split / "labels" / label.name).write_text(label.read_text() if label.is_file() else "")
    data = tmp / "data.yaml"
    data.write_text(json.dumps({"root": str(tmp / "data"), "class_names": ["person"], "class_map": {0: 0},
                                "num_label_classes": 80, "negative_ratio": -1,
                                **{s: {"format": "yolo", "images": f"{s}/images", "labels": f"{s}/labels"}
                                   for s in ("train", "val")}}))  # fmt: skip
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model("sidnet", anchors=ANCHORS, num_classes=1, input_size=128, width=0.125))
    ckpt = tmp / "fp32.pt"
    save_checkpoint({"model": SPEC, "model_state": model.state_dict(), "ema": None,
                     "config": {"data": {"class_names": ["person"]}}}, ckpt)  # fmt: skip
    data_args = [f"data.{k}={v}" for k, v in (("root", tmp / "data"), ("negative_ratio", -1))]
    data_args += [f"data.{s}.{k}={v}" for s in ("train", "val") for k, v in
                  (("format", "yolo"), ("images", f"{s}/images"), ("labels", f"{s}/labels"))]  # fmt: skip
    base = [*TINY, *data_args, "quant.calib_method=minmax", "quant.calib_batch_size=4", "optim.lr=1e-3"]
    qat = [*base, "quant=qat", f"quant.init_from={ckpt}"]
    run = tmp / "run"
    train(_compose([*qat, "epochs=2", "max_steps_per_epoch=1"]), run_dir=run, project_root=ROOT)
    shutil.copy(run / "last.pt", tmp / "epoch2.pt")
    return {"tmp": tmp, "data": data, "ckpt": ckpt, "run": run, "qat": qat, "base": base, "images": images}


def test_qat_checkpoint_is_plain_data_starts_from_the_export_calibration_and_resumes(setup, monkeypatch):
    state = torch.load(setup["run"] / "last.pt", weights_only=True)
    quant = state["quant"]
    plain = build_model("sidnet", anchors=ANCHORS, num_classes=1, input_size=128, width=0.125)
    assert set(quant["amax"]) == set(quant["sites"]) and all(type(a) is float and a > 0 for a in quant["amax"].values())
    kinds = {n: type(m) for n, m in plain.named_modules()}
    pools = [n for n, k in kinds.items() if k is torch.nn.MaxPool2d]
    assert set(pools) <= set(quant["amax"]) and "head.out" not in quant["amax"] and "head.out" not in quant["weights"]
    assert all(kinds[n] is torch.nn.Conv2d for n in quant["weights"]) and len(quant["weights"]) >= 10
    assert quant["method"] == "minmax" and quant["calibration"]["images"] == 8 and quant["init_from"]["sha256"]
    for name, amax in quant["amax"].items():  # modelopt's own buffers hold the same ranges, as tensors
        assert state["model_state"][f"{name}.input_quantizer._amax"].item() == pytest.approx(amax, rel=1e-6)
    init = load_checkpoint(setup["ckpt"])["model_state"]
    w = "backbone.stage16.0.0.weight"
    assert not torch.equal(state["model_state"][w], init[w])  # it trained
    assert torch.equal(state["model_state"]["backbone.stage16.0.1.running_mean"],
                       init["backbone.stage16.0.1.running_mean"])  # quant.freeze_bn  # fmt: skip

    # The start is the INT8 export's calibration (minmax: order-free) on the same 8 training images.
    ptq = run_export(ExportConfig(checkpoint=str(setup["ckpt"]), out=str(setup["tmp"] / "ptq"), precision="int8",
                                  int8=Int8Config(images=str(setup["tmp"] / "data/train/images"), method="minmax",
                                                  batch_size=4)), project_root=ROOT)  # fmt: skip
    from sidnet.quant.qdq import model_placement, qat_tensor_amax

    sites, weights = model_placement(plain)
    assert sites == quant["sites"] and weights == quant["weights"]
    mapped = qat_tensor_amax(sites, quant["amax"])
    ptq = onnx.load(str(ptq.onnx_path))
    ptq_scales = activation_scales(ptq)
    weight_q = {n.input[0] for n in ptq.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("model.")}
    assert weight_q == {f"model.{w}.weight" for w in weights}  # QAT quantizes exactly the weights PTQ does
    assert set(mapped) == set(ptq_scales)
    assert all(mapped[t] / 127 == pytest.approx(s, rel=1e-4) for t, s in ptq_scales.items())

    # resume=true continues with the run's own ranges: no calibration pass
    import sidnet.quant.qat as qat

    monkeypatch.setattr(qat, "calibrate", lambda *a, **k: pytest.fail("resume must not recalibrate"))
    summary = train(_compose([*setup["qat"], "epochs=3", "max_steps_per_epoch=1", "resume=true"]),
                    run_dir=setup["run"], project_root=ROOT)  # fmt: skip
    assert summary["epochs"] == 3 and len(summary["history"]) == 3
    assert load_checkpoint(setup["run"] / "last.pt")["quant"]["amax"] == quant["amax"]


def test_qat_export_takes_the_checkpoint_ranges_without_calibration(setup, monkeypatch):
    import sidnet.quant.calibration as calib
    import sidnet.quant.qat as qat

    monkeypatch.setattr(calib, "collect_statistics", lambda *a, **k: pytest.fail("QAT export must not calibrate"))
    monkeypatch.setattr(qat, "calibrate", lambda *a, **k: pytest.fail("QAT export must not calibrate"))
    ckpt = setup["tmp"] / "epoch2.pt"
    res = run_export(ExportConfig(checkpoint=str(ckpt), out=str(setup["tmp"] / "qat_int8"), precision="int8"),
                     project_root=ROOT)  # fmt: skip
    manifest = json.loads((res.out_dir / "int8_manifest.json").read_text())
    cal = manifest["calibration"]
    assert cal["method"] == "qat" and cal["images"] == 0 and cal["qat"]["checkpoint"] == str(ckpt)
    assert cal["qat"]["method"] == "minmax" and cal["qat"]["init_from"]["path"] == str(setup["ckpt"])
    amax = load_checkpoint(ckpt)["quant"]["amax"]
    qdq = onnx.load(str(res.onnx_path))
    scales = activation_scales(qdq)
    fp32 = onnx.load(str(res.out_dir / "model_fp32.onnx"))
    # every scale is amax/127 of the QAT layer reading that tensor: convs found by weight name, MaxPools by kind
    convs = {n.input[0]: n.input[1].removeprefix("model.").removesuffix(".weight")
             for n in fp32.graph.node if n.op_type == "Conv" and n.input[0] in scales}  # fmt: skip
    assert convs and all(np.float32(scales[t]) == np.float32(amax[path] / 127) for t, path in convs.items())
    pools = [n.input[0] for n in fp32.graph.node if n.op_type == "MaxPool" and n.input[0] in scales]
    plain = build_model("sidnet", anchors=ANCHORS, num_classes=1, input_size=128, width=0.125)
    pool_amax = {a for n, a in amax.items() if isinstance(plain.get_submodule(n), torch.nn.MaxPool2d)}
    assert pools and {np.float32(scales[t]) for t in pools} <= {np.float32(a / 127) for a in pool_amax}
    assert set(scales) == set(convs) | set(pools)

    # fp32 export of a QAT checkpoint: allowed, the trained weights with the fake quantization removed
    plain = run_export(ExportConfig(checkpoint=str(ckpt), out=str(setup["tmp"] / "qat_fp32")), project_root=ROOT)
    assert "fake quantization removed" in plain.report["model"]["source"]
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(plain.onnx_path)).graph.node)
    assert plain.parity.passed


def test_qdq_onnx_follows_the_fake_quantized_model_on_real_images(setup):
    ckpt = setup["tmp"] / "epoch2.pt"
    out = setup["tmp"] / "qat_int8"
    if not (out / "model.onnx").is_file():
        run_export(ExportConfig(checkpoint=str(ckpt), out=str(out), precision="int8"), project_root=ROOT)
    images = np.stack([preprocess(p, 128) for p in setup["images"][20:28]])
    from sidnet.graph.wrapper import DeployModel
    from sidnet.quant.qat import fake_quant_model

    fake = fake_quant_model(load_checkpoint(ckpt))
    with torch.no_grad():
        raw_fq = fake(torch.from_numpy(images)).numpy()
        dets_fq = DeployModel(fake, conf_thresh=0.001, topk=100).eval()(torch.from_numpy(images))[0].numpy()

    def run(path):
        m = onnx.load(str(path))
        m.graph.output.extend([onnx.helper.make_empty_tensor_value_info("raw")])
        options = ort.SessionOptions()
        # The Q/DQ graph as written (float DequantizeLinear(QuantizeLinear(x)), what fake quantization computes);
        # onnxruntime's default optimisations swap in its own integer kernels, which round differently.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images})

    d8, n8, raw8 = run(out / "model.onnx")
    _, _, raw32 = run(out / "model_fp32.onnx")
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    to_fq, to_fp32 = rel(raw8, raw_fq), rel(raw8, raw32)
    assert to_fq < QDQ_VS_FAKEQUANT and to_fq < to_fp32 / 3, (to_fq, to_fp32)
    # detections (same decode + top-K): the fake-quant model's best 5 boxes per image among the ONNX's best 10
    matched = [(box_iou(dets_fq[i][:5, :4], d8[i][:10, :4]).max(axis=1) >= 0.9).mean() for i in range(len(images))]
    assert np.mean(matched) >= 0.9, matched


def _exit(argv: list[str]) -> str:
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_qat_input_gives_one_line_errors(setup, tmp_path):
    plain = [*setup["base"], "epochs=1", "max_steps_per_epoch=1"]
    base = [*plain, "quant=qat"]
    assert "quant.init_from" in _exit([*base, f"hydra.run.dir={tmp_path}/a"])
    assert "checkpoint not found" in _exit([*base, f"quant.init_from={tmp_path}/no.pt", f"hydra.run.dir={tmp_path}/b"])
    other = tmp_path / "other.pt"
    save_checkpoint({"model": {**SPEC, "anchors": [[10.0, 20.0], [30.0, 60.0], [70.0, 110.0]]},
                     "model_state": {}, "ema": None}, other)  # fmt: skip
    msg = _exit([*base, f"quant.init_from={other}", f"hydra.run.dir={tmp_path}/c"])
    assert "holds 'sidnet'" in msg and "model.anchors" in msg
    msg = _exit([*base, f"quant.init_from={setup['tmp'] / 'epoch2.pt'}", f"hydra.run.dir={tmp_path}/d"])
    assert "already a QAT checkpoint" in msg
    shutil.copytree(setup["run"], tmp_path / "e", ignore=shutil.ignore_patterns(".lock"))
    assert "is a QAT run" in _exit([*plain, "resume=true", "epochs=9", f"hydra.run.dir={tmp_path}/e"])


def test_split_parts_partition_a_split_by_image_id(setup):
    data = data_config(json.loads(setup["data"].read_text()))
    halves = [load_records(data, f"train:{k}/2", project_root=ROOT) for k in (0, 1)]
    ids = [{r.image_id for r in h} for h in halves]
    whole = {r.image_id for r in load_records(data, "train", project_root=ROOT)}
    assert not ids[0] & ids[1] and ids[0] | ids[1] == whole
    assert all(ids)  # 8 images: both halves non-empty
    for bad in ("train:2/2", "val:a/b", "test"):
        with pytest.raises(DataError, match="split"):
            load_records(data, bad, project_root=ROOT)
