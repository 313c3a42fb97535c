"""Export on the CPU: torch → ONNX → surgery → onnxruntime / onnx.reference parity, for both targets, and the CLI.

One tiny 2-class SIDNet (width 0.125, 128², BatchNorm statistics calibrated so outputs are not all ties) is saved as
a checkpoint and exported once per target for the whole module.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from sidnet.checkpoint import save_checkpoint
from sidnet.export.adapters import calibrate_batchnorm
from sidnet.export.config import BatchConfig, ExportConfig
from sidnet.export.pipeline import run_export
from sidnet.export.reference_ops import REFERENCE_OPS, region_topk_numpy, reorg_numpy
from sidnet.graph.errors import ExportError, SurgeryError
from sidnet.graph.onnx_export import export_onnx, module_scopes, read_metadata
from sidnet.graph.surgery import SurgeryLog, fold_batchnorm, remove_noops, rewrite
from sidnet.graph.wrapper import DeployModel, TopKDecode
from sidnet.models import build_model, region_topk, reorg

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = [[12.0, 24.0], [30.0, 60.0], [70.0, 110.0]]
SPEC = {"name": "sidnet", "anchors": ANCHORS, "num_classes": 2, "input_size": 128, "kwargs": {"width": 0.125}}
CONF = 0.005  # cuts about half of the 48 cells of the tiny model, so thresholding and zero rows are exercised
REORG_PATH = "model.head.reorg"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(SPEC["name"], anchors=ANCHORS, num_classes=2, input_size=128, **SPEC["kwargs"])
    return calibrate_batchnorm(model)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    state = {
        "model": SPEC,
        "model_state": tiny_model().state_dict(),
        "ema": None,
        "config": {"data": {"class_names": ["person", "car"]}},
    }
    save_checkpoint(state, path)
    return path


def _export(checkpoint: Path, out: Path, **kw):
    cfg = ExportConfig(checkpoint=str(checkpoint), out=str(out), conf_thresh=CONF, **kw)
    return run_export(cfg, project_root=ROOT)


@pytest.fixture(scope="module")
def native(checkpoint, tmp_path_factory):
    return _export(checkpoint, tmp_path_factory.mktemp("native"), target="native")


@pytest.fixture(scope="module")
def plugins(checkpoint, tmp_path_factory):
    return _export(checkpoint, tmp_path_factory.mktemp("plugins"), target="plugins")


def _images(n: int, seed: int = 1) -> np.ndarray:
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed)).numpy()


def _torch_reference(images: np.ndarray):
    model = tiny_model()
    with torch.no_grad():
        raw = model(torch.from_numpy(images))
        return region_topk(raw, model.anchors, stride=(32.0, 32.0), conf_thresh=CONF, topk=100)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node]


# -- native target -----------------------------------------------------------------------------------------------------
def test_native_export_runs_in_onnxruntime_with_dynamic_batch(native):
    model = onnx.load(str(native.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "images" and dims == ["batch", 3, 128, 128]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # one graph, two batch sizes
        images = _images(n)
        dets, num = session.run(["detections", "num_detections"], {"images": images})
        assert dets.shape == (n, 100, 6) and dets.dtype == np.float32 and num.shape == (n,) and num.dtype == np.int32
        ref_dets, ref_num = _torch_reference(images)
        assert np.array_equal(num, ref_num.numpy()) and (0 < num).all() and (num < 48).all()  # the threshold cut
        np.testing.assert_allclose(dets, ref_dets.numpy(), atol=1e-2, rtol=1e-4)
        for i in range(n):
            assert not dets[i, num[i] :].any()  # zero rows after the valid ones
    assert native.parity.passed and native.parity.max_abs["raw"] < 1e-4, native.parity.summary()


def test_native_graph_is_clean_and_metadata_complete(native):
    model = onnx.load(str(native.onnx_path))
    ops = _ops(model)
    assert ops.count("SpaceToDepth") == 1 and "Identity" not in ops and "BatchNormalization" not in ops
    assert not any(op.startswith("sidnet::") for op in ops)
    report = native.report["onnx"]
    assert report["final_nodes"] < report["exported_nodes"]  # reorg: Reshape, Transpose, Reshape → SpaceToDepth
    meta = read_metadata(model)
    for key in (
        "anchors",
        "num_classes",
        "class_names",
        "input_size",
        "preprocessing",
        "conf_thresh",
        "topk",
        "sidnet_version",
        "target",
        "precision",
    ):
        assert key in meta, key
    assert json.loads(meta["anchors"]) == ANCHORS and json.loads(meta["class_names"]) == ["person", "car"]
    assert json.loads(meta["topk"]) == 100 and json.loads(meta["conf_thresh"]) == CONF and meta["target"] == "native"
    assert "letterbox" in meta["preprocessing"]
    text = native.report_path.read_text()
    assert "remove no-ops" in text and "SpaceToDepth" in text and "PASS" in text


# -- plugins target ----------------------------------------------------------------------------------------------------
def test_plugin_target_has_two_sidnet_nodes_with_attributes(plugins, native):
    model = onnx.load(str(plugins.onnx_path))
    ops = _ops(model)
    assert ops.count("sidnet::Reorg") == 1 and ops.count("sidnet::RegionDecode") == 1
    assert {"Reshape", "Transpose", "TopK", "SpaceToDepth"}.isdisjoint(ops)  # only the conv body is left
    assert len(ops) < len(onnx.load(str(native.onnx_path)).graph.node)
    assert "sidnet" in {o.domain for o in model.opset_import}
    nodes = {n.op_type: n for n in model.graph.node if n.domain == "sidnet"}
    attrs = {n: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for n, node in nodes.items()}
    assert attrs["Reorg"]["stride"] == 2 and attrs["Reorg"]["plugin_namespace"] == b"sidnet"
    region = attrs["RegionDecode"]
    assert np.allclose(region["anchors"], np.ravel(ANCHORS)) and region["num_anchors"] == 3
    assert region["num_classes"] == 2 and region["topk"] == 100 and region["stride_x"] == region["stride_y"] == 32.0
    assert region["version"] == 1 and region["plugin_version"] == b"1" and abs(region["conf_thresh"] - CONF) < 1e-9
    assert list(nodes["RegionDecode"].output) == ["detections", "num_detections"]


def test_plugin_target_in_reference_evaluator_equals_native_and_torch(plugins, native):
    images = _images(3, seed=5)
    ref = ReferenceEvaluator(onnx.load(str(plugins.onnx_path)), new_ops=REFERENCE_OPS)
    dets, num = ref.run(["detections", "num_detections"], {"images": images})
    session = ort.InferenceSession(str(native.onnx_path), providers=["CPUExecutionProvider"])
    nat_dets, nat_num = session.run(None, {"images": images})
    ref_dets, ref_num = _torch_reference(images)
    assert np.array_equal(num, nat_num) and np.array_equal(num, ref_num.numpy())
    np.testing.assert_allclose(dets, nat_dets, atol=1e-2, rtol=1e-4)  # box pixels: exp() in two runtimes
    np.testing.assert_allclose(dets, ref_dets.numpy(), atol=1e-2, rtol=1e-4)
    assert plugins.parity.passed and plugins.parity.runtime.startswith("onnx.reference")


# -- surgery units -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported():
    deploy = DeployModel(tiny_model(), conf_thresh=CONF, topk=100)
    model = export_onnx(deploy)
    return model, module_scopes(model)


def test_module_scopes_find_reorg_and_decode(exported):
    model, scopes = exported
    reorg_nodes = [n for n, s in scopes.items() if REORG_PATH in s]
    decode_nodes = [n for n, s in scopes.items() if "decode" in s]
    assert len(reorg_nodes) == 3 and len(decode_nodes) > 20
    # TorchScript-style names are understood too.
    legacy = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"], name="/model/head/reorg/Relu")],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    assert module_scopes(legacy)["/model/head/reorg/Relu"] == ("model", "model.head", REORG_PATH)


def test_rewrite_fails_clearly_when_a_module_is_not_found(exported):
    model, scopes = exported
    with pytest.raises(SurgeryError, match="no ONNX node was traced in module 'model.head.nope'"):
        rewrite(model, scopes, target="native", reorgs={"model.head.nope": 2}, decode_path="decode", decode_attrs={})


def test_surgery_log_counts_every_rewrite(exported):
    model, scopes = exported
    final, slog = rewrite(
        model,
        scopes,
        target="plugins",
        reorgs={REORG_PATH: 2},
        decode_path="decode",
        decode_attrs={
            "anchors": sum(ANCHORS, []),
            "num_anchors": 3,
            "num_classes": 2,
            "stride_x": 32.0,
            "stride_y": 32.0,
            "conf_thresh": CONF,
            "topk": 100,
        },
    )
    steps = [line for line in slog.lines if "->" in line and "nodes" in line and not line.startswith(" ")]
    assert [s.split(": ")[0] for s in steps] == [
        "sanitize",
        "remove no-ops",
        "fold BatchNorm",
        "reorg -> sidnet::Reorg",
        "decode + top-K -> sidnet::RegionDecode",
        "final sanitize",
    ]
    assert f"{len(model.graph.node)} -> " in steps[0] and steps[-1].endswith(
        f"-> {len(final.graph.node)} nodes (1 pass(es))"
    )


def _noop_graph() -> gs.Graph:
    """x → Identity → Conv → BatchNormalization → Dropout → Transpose(identity) → Identity → y."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, [1, 3, 8, 8])
    graph = gs.Graph(inputs=[x], opset=18, ir_version=10)  # onnxruntime 1.30/1.31 read IR <= 11
    (t,) = graph.layer(op="Identity", inputs=[x], outputs=["id0"])
    w = gs.Constant("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))
    (t,) = graph.layer(op="Conv", inputs=[t, w], outputs=["conv"], attrs={"pads": [1, 1, 1, 1]})
    bn = [
        gs.Constant(name, v.astype(np.float32))
        for name, v in (
            ("g", rng.uniform(0.5, 2, 4)),
            ("b", rng.normal(size=4)),
            ("m", rng.normal(size=4)),
            ("v", rng.uniform(0.5, 2, 4)),
        )
    ]
    (t,) = graph.layer(op="BatchNormalization", inputs=[t, *bn], outputs=["bn"])
    (t,) = graph.layer(op="Dropout", inputs=[t], outputs=["drop"])
    (t,) = graph.layer(op="Transpose", inputs=[t], outputs=["tr"], attrs={"perm": [0, 1, 2, 3]})
    y = gs.Variable("y", np.float32, [1, 4, 8, 8])
    graph.layer(op="Identity", inputs=[t], outputs=[y])
    graph.outputs = [y]
    return graph


def test_remove_noops_and_fold_batchnorm_keep_the_numbers():
    graph = _noop_graph()
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(gs.export_onnx(graph).SerializeToString()).run(None, {"x": x})[0]
    slog = SurgeryLog()
    graph = fold_batchnorm(remove_noops(graph, slog), slog)
    model = gs.export_onnx(graph)
    assert _ops(model) == ["Conv"] and model.graph.output[0].name == "y"  # the graph output keeps its name
    assert slog.lines[0] == "remove no-ops: 6 -> 2 nodes (Identity x2, Dropout x1, Transpose x1)"
    assert slog.lines[1] == "fold BatchNorm: 2 -> 1 nodes (1 folded into Conv)"
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


# -- semantics of the pieces -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3, 4, 6), (2, 5, 8, 2)])
def test_reorg_reference_op_matches_torch(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(reorg_numpy(x.numpy(), 2), reorg(x, 2).numpy())


@pytest.mark.parametrize("topk", [5, 200])
def test_region_references_and_traced_decode_match_region_topk(topk):
    gen = torch.Generator().manual_seed(3)
    anchors = torch.tensor(ANCHORS)
    raw = torch.randn(2, 3 * 7, 3, 5, generator=gen) * 2
    raw[:, 4::7] = raw[:, 4::7].clamp(min=0.5)  # exact ties: equal objectness and class logits in two grid rows
    raw[0, :, 1, :] = raw[0, :, 0, :]
    stride = (32.0, 160 / 3)  # a 3x5 grid of a 160x160 input: non-square grids decode per axis
    ref_d, ref_n = region_topk(raw, anchors, stride=stride, conf_thresh=0.3, topk=topk)
    np_d, np_n = region_topk_numpy(raw.numpy(), anchors.numpy(), stride=stride, conf_thresh=0.3, topk=topk)
    np.testing.assert_allclose(np_d, ref_d.numpy(), rtol=1e-5, atol=1e-4)
    assert np.array_equal(np_n, ref_n.numpy()) and 0 < int(ref_n.min())
    # The traced decode as deployed: ONNX TopK breaks ties by lower index (eager torch.topk does not promise that).
    decode = TopKDecode(anchors, input_size=160, conf_thresh=0.3, topk=topk).eval()
    assert decode.stride(raw) == stride
    program = torch.onnx.export(
        decode, (raw,), dynamo=True, input_names=["raw"], dynamic_shapes={"raw": {0: torch.export.Dim("batch")}}
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    dets, num = session.run(None, {"raw": raw.numpy()})
    assert dets.shape == (2, topk, 6) and np.array_equal(num, ref_n.numpy())
    np.testing.assert_allclose(dets, ref_d.numpy(), rtol=1e-5, atol=1e-4)


# -- bad input ---------------------------------------------------------------------------------------------------------
def _main(*argv: str) -> str:
    from export.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_input_gives_one_line_errors(tmp_path, checkpoint):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "not a SIDNet checkpoint" in _main("--checkpoint", str(foreign))
    assert "checkpoint not found" in _main("--checkpoint", str(tmp_path / "missing.pt"))
    assert "no checkpoint" in _main()
    assert "must be a multiple of 32 in 32..4096" in _main(
        "--random-init", "--model", "sidnet", "model.input_size=100", "model.anchors=[[10,10],[20,20],[30,30]]"
    )
    assert "unsupported precision 'fp8'" in _main("--checkpoint", str(checkpoint), "--precision", "fp8")
    assert "unsupported backend 'tflite'" in _main("--checkpoint", str(checkpoint), "--backend", "tflite")
    assert "no plugin layer" in _main(
        "--checkpoint", str(checkpoint), "--backend", "tensorrt-rtx", "--target", "plugins"
    )
    assert "bad configuration" in _main("--checkpoint", str(checkpoint), "batch.maxx=3")
    assert "unrecognised argument" in _main("--checkpoint", str(checkpoint), "--fast")
    if importlib.util.find_spec("tensorrt") is None:  # checked before the slow export starts
        assert "backend tensorrt is not importable" in _main("--checkpoint", str(checkpoint), "--backend", "tensorrt")
    with pytest.raises(ExportError, match="min <= opt <= max"):
        run_export(ExportConfig(checkpoint=str(checkpoint), batch=BatchConfig(min=8, opt=4, max=64)), project_root=ROOT)


def _cli(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_int8_and_missing_checkpoint_are_one_line_errors(checkpoint, tmp_path):
    # INT8 without a calibration set is refused once the checkpoint is known not to be QAT (which brings its ranges)
    for argv, expected in [
        (
            ["--precision", "int8", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")],
            "error: INT8 needs a calibration set: pass exactly one of --calib-images FOLDER or --calib-data",
        ),
        (["--precision", "int8", "--checkpoint", str(tmp_path / "nope.pt")], "error: checkpoint not found"),
        (["--checkpoint", str(tmp_path / "nope.pt")], "error: checkpoint not found"),
    ]:
        result = _cli(*argv)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_cli_end_to_end_with_flags_and_overrides(checkpoint, tmp_path):
    out = tmp_path / "cli"
    result = _cli(
        "--precision",
        "fp32",
        "--backend",
        "onnx",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "topk=50",
        "conf_thresh=0.004",
        "parity.batches=[2]",
    )
    assert result.returncode == 0, result.stderr
    meta = read_metadata(onnx.load(str(out / "model.onnx")))
    assert json.loads(meta["topk"]) == 50 and json.loads(meta["conf_thresh"]) == 0.004 and meta["precision"] == "fp32"
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["batches"] == [2] and report["target"] == "native"
    assert "exported to" in result.stdout


def test_default_output_folder_per_precision_and_backend(tmp_path):
    """The README's fp32 → fp16 → int8 sequence never collides: one folder per precision (and backend)."""
    from sidnet.export.pipeline import default_out_dir

    ckpt = str(tmp_path / "run" / "best.pt")
    out = {(p, b): default_out_dir(ExportConfig(checkpoint=ckpt, precision=p, backend=b), project_root=tmp_path)
           for p in ("fp32", "fp16", "int8") for b in ("onnx", "tensorrt-rtx", "triton")}  # fmt: skip
    assert out["fp32", "onnx"] == tmp_path / "run" / "export" / "fp32"
    assert out["int8", "onnx"] == tmp_path / "run" / "export" / "int8"
    assert out["fp16", "tensorrt-rtx"] == tmp_path / "run" / "export" / "tensorrt-rtx_fp16"
    assert out["fp32", "triton"] == tmp_path / "run" / "export" / "triton_fp32"
    assert len(set(out.values())) == len(out)
    chosen = ExportConfig(checkpoint=ckpt, out=str(tmp_path / "x"))
    assert default_out_dir(chosen, project_root=tmp_path) == tmp_path / "x"


def test_int8_overwrite_is_refused_before_any_work(tmp_path):
    """An INT8 export into a folder that holds one fails at once (before the checkpoint is even read), not after the
    ONNX export and calibration."""
    pytest.importorskip("modelopt")
    out = tmp_path / "int8"
    out.mkdir()
    (out / "model_fp32.onnx").write_bytes(b"earlier export")
    cfg = ExportConfig(checkpoint=str(tmp_path / "never_read.pt"), precision="int8", out=str(out))
    cfg.int8.images = str(tmp_path)
    with pytest.raises(ExportError, match=r"already holds model_fp32.onnx: pass --force"):
        run_export(cfg, project_root=tmp_path)


def test_checkpoint_exported_at_another_input_size(checkpoint, tmp_path):
    """``input_size=N``: the trained weights at another input side (YOLOv2's speed/accuracy knob): the graph's input and
    grid follow it, parity holds at that size, the report says both sizes; a bad size and --random-init are refused."""
    result = _export(checkpoint, tmp_path / "s192", target="native", input_size=192)
    graph = onnx.load(str(result.onnx_path))
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 192, 192]
    assert json.loads(read_metadata(graph)["input_size"]) == 192
    report = json.loads((tmp_path / "s192" / "report.json").read_text())
    assert report["parity"]["passed"] and "at input 192 (trained at 128)" in report["model"]["source"]
    assert report["model"]["input_size"] == 192
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).random((1, 3, 192, 192), dtype=np.float32)
    dets, _ = sess.run(None, {graph.graph.input[0].name: image})
    assert dets.shape == (1, 100, 6)
    with pytest.raises(Exception, match="input size 200"):
        _export(checkpoint, tmp_path / "bad", input_size=200)
    with pytest.raises(ExportError, match="input_size= applies to --checkpoint"):
        run_export(ExportConfig(random_init=True, input_size=192, out=str(tmp_path / "r")), project_root=ROOT)
