"""INT8 on the tensor cores without TensorRT (issue 16), the parts a CPU can check:

- the Triton kernels (run by Triton's interpreter, ``TRITON_INTERPRET=1``, in a subprocess) against the exact integer
  reference: INT32 accumulators equal, requantised int8 outputs equal, int8 max-pool equal;
- the planner on a real Q/DQ export (``python -m export --precision int8`` of the tiny model, calibrated on the bundled
  sample's images): every INT8 layer fed onnxruntime's own int8 input gives onnxruntime's int8 output (rounding ties
  aside), and the whole network stays within onnxruntime's own spread (its optimised vs unoptimised sessions);
- ``Detector(int8 model.onnx, backend="torch")`` and ``python -m deploy --backend torch`` run it end to end.

Speed and the GPU kernels themselves: ``tests/test_int8_gpu.py`` and ``python -m deploy.benchmark`` on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sidnet" / "sample" / "images"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None

KERNEL_CHECK = r"""
import json, torch
from sidnet.kernels import int8 as K
assert K.available(torch.device("cpu")), "the interpreter did not take the kernels"
g = torch.Generator().manual_seed(0)
rows = []
# (N, H, W, C, CO, k, stride, pad, tiles): the stem's 3 channels (gathered reduction), a 1x1 with C off the tile, a
# strided 3x3, several channel blocks per tap with grouped tile order and column tiles narrower than CO
cases = [(2, 9, 7, 3, 16, 3, 1, 1, None), (1, 8, 8, 40, 24, 1, 1, 0, None), (1, 10, 10, 64, 48, 3, 2, 1, None),
         (2, 9, 11, 96, 40, 3, 1, 1, K.Tiles(32, 16, 32, 4, 1, 2))]
# the TMA kernel: a 3x3 in 4x8 pixel blocks with C = 48 off the 32-channel step (the second block's columns past C
# read zeros from the input box and the next tap's weights), one in 2x16 blocks, and a 1x1 as one GEMM over the pixels
cases += [(2, 9, 11, 48, 40, 3, 1, 1, K.Tiles(32, 32, 32, 4, 1, 2, tma=True, bh=4)),
          (1, 7, 13, 32, 24, 3, 1, 1, K.Tiles(32, 16, 32, 4, 1, 1, tma=True, bh=2)),
          (2, 7, 9, 64, 48, 1, 1, 0, K.Tiles(32, 32, 32, 4, 1, 2, tma=True))]
# split-K: 27 reduction steps in 4 parts (the last one shorter), summed in the int32 workspace
cases += [(1, 6, 7, 96, 40, 3, 1, 1, K.Tiles(32, 16, 32, 4, 1, 2, split=4))]
for n, h, w, c, co, k, st, pad, tiles in cases:
    x = torch.randint(-128, 128, (n, h, w, c), dtype=torch.int8, generator=g)
    wt = torch.randint(-127, 128, (co, k, k, c), dtype=torch.int8, generator=g)
    ones, zeros = torch.ones(co), torch.zeros(co)
    acc = K.conv2d_int8(x, wt, ones, zeros, stride=st, pad=pad, relu=False, out_scale=None, out_dtype=torch.float32,
                        tiles=tiles)
    ref = K.reference_conv2d_int8(x, wt, ones, zeros, stride=st, pad=pad, relu=False, out_scale=None,
                                  accumulators=True)
    scale, bias = torch.rand(co, generator=g) * 1e-4, torch.randn(co, generator=g) * 0.1
    q = K.conv2d_int8(x, wt, scale, bias, stride=st, pad=pad, relu=True, out_scale=0.02, tiles=tiles)
    qr = K.reference_conv2d_int8(x, wt, scale, bias, stride=st, pad=pad, relu=True, out_scale=0.02)
    p = K.maxpool2d_int8(x, kernel=2, stride=2, pad=0, in_scale=0.1, out_scale=0.13)
    pr = K.maxpool2d_int8(x.clone(), kernel=2, stride=2, pad=0, in_scale=0.1, out_scale=0.13)  # same launcher
    mp = torch.nn.functional.max_pool2d(x.permute(0, 3, 1, 2).float(), 2, 2).permute(0, 2, 3, 1)
    mp = torch.round((mp * (0.1 / 0.13)).clamp(-128, 127)).to(torch.int8)
    rows.append({"shape": [n, h, w, c, co, k, st, pad],
                 "acc_equal": bool(torch.equal(acc.to(torch.int64), ref.to(torch.int64))),
                 "acc_absmax": int(ref.abs().max()), "int8_equal": bool(torch.equal(q, qr)),
                 "int8_nonzero": float((q != 0).float().mean()), "pool_equal": bool(torch.equal(p, mp))})
# a conv with its 2x2 max-pool fused (odd sizes: floor mode), requantised to the pool's scale or not, against the
# reference conv then a float max-pool
for n, h, w, c, co, k, st, pad, tiles, pool_scale in [(2, 9, 7, 3, 16, 3, 1, 1, None, 0.02),
                                                      (2, 9, 11, 96, 40, 3, 1, 1, K.Tiles(32, 16, 32, 4, 1, 2), 0.03),
                                                      (1, 8, 8, 40, 24, 1, 1, 0, None, 0.025),
                                                      (2, 10, 13, 48, 40, 3, 1, 1,
                                                       K.Tiles(32, 32, 32, 4, 1, 1, tma=True, bh=4), 0.03)]:
    x = torch.randint(-128, 128, (n, h, w, c), dtype=torch.int8, generator=g)
    wt = torch.randint(-127, 128, (co, k, k, c), dtype=torch.int8, generator=g)
    scale, bias = torch.rand(co, generator=g) * 1e-4, torch.randn(co, generator=g) * 0.1
    fused = K.conv2d_int8(x, wt, scale, bias, stride=st, pad=pad, relu=True, out_scale=0.02, tiles=tiles, pool=2,
                          pool_scale=pool_scale)
    qr = K.reference_conv2d_int8(x, wt, scale, bias, stride=st, pad=pad, relu=True, out_scale=0.02)
    mp = torch.nn.functional.max_pool2d(qr.permute(0, 3, 1, 2).float(), 2, 2).permute(0, 2, 3, 1)
    mp = torch.round((mp * (0.02 / pool_scale)).clamp(-128, 127)).to(torch.int8)
    rows.append({"shape": ["conv+pool", n, h, w, c, co, k, pool_scale], "acc_equal": True, "acc_absmax": 10**5,
                 "int8_equal": bool(torch.equal(fused, mp)), "int8_nonzero": float((fused != 0).float().mean()),
                 "pool_equal": True})
# the fused first layer (float NCHW images -> quantise -> 3x3 conv -> ReLU -> requantise -> 2x2 max-pool) against
# the three steps it replaces, with and without a requantising pool, from the packed NHWC4 words and from the floats
for n, h, w, co, pool_scale, packed in [(2, 12, 10, 16, 0.05, True), (1, 8, 14, 40, 0.07, True),
                                        (2, 12, 10, 16, 0.05, False), (1, 8, 14, 40, 0.07, False)]:
    images = torch.rand(n, 3, h, w, generator=g)
    wt = torch.randint(-127, 128, (co, 3, 3, 3), dtype=torch.int8, generator=g)
    scale, bias = torch.rand(co, generator=g) * 1e-3 + 1e-4, torch.randn(co, generator=g) * 0.1
    fused = K.stem_int8(images, wt, scale, bias, in_scale=1 / 127, pad=1, conv_scale=0.05, pool=2,
                        pool_scale=pool_scale, packed=packed)
    x = K.reference_conv2d_int8(K.quantize(images.permute(0, 2, 3, 1), 1 / 127).contiguous(), wt, scale, bias,
                                stride=1, pad=1, relu=True, out_scale=0.05)
    y = torch.nn.functional.max_pool2d(x.permute(0, 3, 1, 2).float(), 2, 2).permute(0, 2, 3, 1)
    y = torch.round((y * (0.05 / pool_scale)).clamp(-128, 127)).to(torch.int8)
    rows.append({"shape": ["stem", n, h, w, co, packed], "acc_equal": True, "acc_absmax": 10**5,
                 "int8_equal": bool(torch.equal(fused, y)), "int8_nonzero": float((fused != 0).float().mean()),
                 "pool_equal": True})
# FP8 (e4m3 operands, FP32 sums): the pointer and TMA kernels, with a fused pool quantised once at the output scale,
# against a float64 convolution rounded the same way (sums in another order may land across an e4m3 rounding edge)
for tiles, pool in ((K.Tiles(32, 16, 32, 4, 1, 1), 2), (K.Tiles(32, 16, 32, 4, 1, 1, tma=True, bh=4), 2),
                    (K.Tiles(32, 16, 32, 4, 1, 1, tma=True), 1)):
    x8 = (torch.randn(1, 8, 6, 32, generator=g) * 2).to(torch.float8_e4m3fn)
    w8 = (torch.randn(16, 3, 3, 32, generator=g) * 0.3).to(torch.float8_e4m3fn)
    k = 3 if pool > 1 or not tiles.tma else 1
    w8 = w8[:, :k, :k].contiguous()
    y = K.conv2d_fp8(x8, w8, torch.ones(16), torch.zeros(16), stride=1, pad=k // 2, relu=True, out_scale=0.5,
                     tiles=tiles, pool=pool)
    ref = torch.nn.functional.conv2d(x8.double().permute(0, 3, 1, 2), w8.double().permute(0, 3, 1, 2),
                                     padding=k // 2).clamp_min(0)
    if pool > 1:
        ref = torch.nn.functional.max_pool2d(ref, pool)
    ref = (ref.permute(0, 2, 3, 1) / 0.5).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    same = float((y.float() == ref.float()).float().mean())
    rows.append({"shape": ["fp8", str(tiles), pool], "acc_equal": True, "acc_absmax": 10**5, "int8_equal": same > 0.95,
                 "int8_nonzero": float((y.float() != 0).float().mean()), "pool_equal": True, "same": same})
# tuning's candidates include TMA tiles here; a TMA configuration the kernel cannot run is a one-line error
for hw, c, co, taps in ((13, 512, 256, 1), (104, 64, 128, 9)):
    cands = K.candidate_tiles(n=2, ho=hw, wo=hw, c=c, co=co, taps=taps, stride=1, pool=1, device=torch.device("cpu"))
    assert any(t.tma for t in cands) and not cands[0].tma, cands
x = torch.zeros((1, 8, 8, 32), dtype=torch.int8)
wt = torch.zeros((16, 3, 3, 32), dtype=torch.int8)
try:
    K.conv2d_int8(x, wt, torch.ones(16), torch.zeros(16), stride=2, pad=1, relu=False, out_scale=0.1,
                  tiles=K.Tiles(32, 16, 32, 4, 1, tma=True, bh=4))
    raise AssertionError("a stride-2 TMA launch ran")
except ValueError as e:
    assert "stride 2" in str(e) and "\n" not in str(e), e
print(json.dumps(rows))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (it comes with CUDA builds of PyTorch)")
def test_int8_kernels_equal_the_integer_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    for row in rows:
        assert row["acc_equal"] and row["int8_equal"] and row["pool_equal"], row
        assert row["acc_absmax"] > 10_000 and 0.05 < row["int8_nonzero"] < 1.0, row  # not a trivial all-zero case


@pytest.fixture(scope="module")
def int8_export(tiny_checkpoint, tmp_path_factory) -> Path:
    if not HAS_MODELOPT:
        pytest.skip("pip install -e '.[int8]' (nvidia-modelopt) to export INT8")
    from sidnet.export.config import ExportConfig, Int8Config
    from sidnet.export.pipeline import run_export

    out = tmp_path_factory.mktemp("int8_torch")
    cfg = ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out), precision="int8", conf_thresh=0.001,
                       int8=Int8Config(images=str(SAMPLE / "train2017"), batch_size=4, batches=2, method="minmax",
                                       max_fallback=0))  # fmt: skip
    return run_export(cfg, project_root=ROOT).onnx_path


def _images(size: int) -> np.ndarray:
    from sidnet.quant.calibration import preprocess

    return np.stack([preprocess(p, size) for p in sorted((SAMPLE / "val2017").glob("*.jpg"))])


def _ort(path: Path, outputs: list[str], images: np.ndarray, *, optimised: bool) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    for name in outputs:
        kind = onnx.TensorProto.FLOAT if name == "raw" else onnx.TensorProto.INT8  # the head, or a Q output
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, kind, None))
    so = ort.SessionOptions()
    if not optimised:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(outputs, sess.run(outputs, {"images": images}), strict=True))


def test_plan_reads_the_export(int8_export):
    from sidnet.quant.int8_plan import FloatConv, QConv, QMaxPool, plan_from_onnx

    plan = plan_from_onnx(int8_export)
    manifest = json.loads((int8_export.parent / "int8_manifest.json").read_text())
    quantized = set(manifest["quantized_layers"])
    convs = [s for s in plan.steps if isinstance(s, QConv)]
    # The layers the export quantised are exactly the INT8 layers of the plan; the rest stay float.
    assert {s.name for s in convs} | {s.name for s in plan.steps if isinstance(s, QMaxPool)} == quantized, (
        plan.summary(), sorted(quantized))  # fmt: skip
    floats = [s.name for s in plan.steps if isinstance(s, FloatConv)]
    assert floats == plan.kept_float and floats[-1] == "node_conv2d_22" and not set(floats) & quantized
    assert len(convs) >= 15 and sum(s.out_scale is not None for s in convs) >= len(convs) - 2, plan.summary()
    assert all(s.w.dtype == np.int8 and s.w_scale.shape == (s.w.shape[3],) and (s.w_scale > 0).all() for s in convs)


def test_each_int8_layer_matches_onnxruntime(int8_export):
    """Each INT8 layer gets onnxruntime's own int8 input and must give its int8 output: equal except for values
    that sit on a rounding tie (float summation order), at most 1 apart."""
    import torch

    from sidnet.quant.int8_plan import Int8Network, Layout, QConv, QMaxPool, plan_from_onnx

    plan = plan_from_onnx(int8_export)
    names = {s.out for s in plan.steps} | {s.x for s in plan.steps if isinstance(s, (QConv, QMaxPool))}
    alias = {s.out: s.xs[0] for s in plan.steps if isinstance(s, Layout) and s.op == "Alias"}
    import onnx

    graph = onnx.load(str(int8_export)).graph
    q_out = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    wanted = sorted({q_out[t] for t in names if t in q_out} | {t for t in names if t in q_out.values()})
    ref = _ort(int8_export, wanted, _images(128), optimised=False)
    net = Int8Network(plan, device=torch.device("cpu"), dtype=torch.float32)
    checked = 0
    for layer, step in zip(net.layers, plan.steps, strict=True):
        if not isinstance(step, (QConv, QMaxPool)) or step.out_scale is None:
            continue
        src = step.x if step.x in ref else q_out.get(alias.get(step.x, step.x))
        dst = q_out.get(step.out)
        if src not in ref or dst not in ref:
            continue
        env = {step.x: torch.from_numpy(ref[src].transpose(0, 2, 3, 1).copy())}
        layer(env)
        diff = np.abs(env[step.out].numpy().astype(int) - ref[dst].transpose(0, 2, 3, 1).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (step.name, diff.max(), (diff > 0).mean())
        checked += 1
    assert checked >= 20, checked


def test_fused_plan_is_the_step_by_step_plan(int8_export):
    """The GPU plan's rewrites (the stem as one step, each conv with its max-pool as one step) keep the graph: on the
    CPU, where the same launchers run the reference arithmetic, the fused plan's raw head equals the unfused one."""
    import torch

    from sidnet.quant.int8_plan import Int8Network, QConvPool, QStem, plan_from_onnx

    plan = plan_from_onnx(int8_export)
    fused = Int8Network(plan, device=torch.device("cpu"), dtype=torch.float32, fuse=True)
    kinds = [type(s) for s in fused.plan.steps]
    # SIDNet: the stem and the conv + pool pairs whose conv is INT8 (this export keeps one of them float)
    assert kinds[0] is QStem and kinds.count(QConvPool) >= 2, fused.plan.summary()
    images = torch.from_numpy(_images(128))
    with torch.no_grad():
        a = fused(images)
        b = Int8Network(plan, device=torch.device("cpu"), dtype=torch.float32, fuse=False)(images)
    assert torch.equal(a, b)


def test_fp8_plan_keeps_the_calibrated_ranges(int8_export):
    """FP8 maps each calibrated range onto e4m3's ±448: every scale times 127/448, and the e4m3 weights times their
    scales are the INT8 weights' float values to e4m3 precision (3 mantissa bits). The GPU runs it
    (tests/test_int8_gpu.py); elsewhere it is a one-line error."""
    import torch

    from sidnet.quant.int8_plan import Int8Network, QConv, conv_operands, plan_from_onnx, to_fp8

    plan = plan_from_onnx(int8_export)
    fp8 = to_fp8(plan)
    cpu = torch.device("cpu")
    convs = 0
    for a, b in zip(plan.steps, fp8.steps, strict=True):
        assert type(a) is type(b) and a.name == b.name
        if isinstance(a, QConv):
            assert b.x_scale == pytest.approx(a.x_scale * 127 / 448, rel=1e-6)
            w, _, _ = conv_operands(a, cpu)
            w8, scale8, _ = conv_operands(b, cpu, fp8=True)
            assert w8.dtype == torch.float8_e4m3fn
            ref = w.float() * torch.from_numpy(a.w_scale)[:, None, None, None]
            got = w8.float() * torch.from_numpy(b.w_scale)[:, None, None, None]
            assert ((got - ref).abs() <= ref.abs() / 16 + 1e-12).all(), a.name
            assert torch.allclose(scale8, torch.from_numpy(a.x_scale * a.w_scale * (127 / 448) ** 2).float())
            convs += 1
    assert convs >= 5
    with pytest.raises(ValueError, match="FP8 .* runs on a CUDA GPU"):
        Int8Network(plan, device=cpu, precision="fp8")


def test_int8_network_within_onnxruntimes_own_spread(int8_export):
    import torch

    from sidnet.quant.int8_plan import Int8Network, plan_from_onnx

    images = _images(128)
    exact = _ort(int8_export, ["raw"], images, optimised=False)["raw"]
    fused = _ort(int8_export, ["raw"], images, optimised=True)["raw"]
    with torch.no_grad():
        ours = Int8Network(plan_from_onnx(int8_export), device=torch.device("cpu"), dtype=torch.float32)(
            torch.from_numpy(images)).numpy()  # fmt: skip

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    spread = rel(fused, exact)  # onnxruntime's QLinearConv fusion vs its unfused Q/DQ: the noise floor
    assert rel(ours, exact) <= max(1e-2, 1.5 * spread), (rel(ours, exact), spread)


def test_detector_and_deploy_run_the_int8_export(int8_export, tmp_path):
    from sidnet.runtime.detector import Detector

    frames = [np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(p).convert("RGB"))
              for p in sorted((SAMPLE / "val2017").glob("*.jpg"))]  # fmt: skip
    with Detector(int8_export, backend="torch", conf_thresh=0.01, device="cpu") as det:
        assert det.info.precision == "int8" and det.backend_name == "torch"
        ours = det(frames)
    with Detector(int8_export, conf_thresh=0.01) as ref:
        theirs = ref(frames)
    # The same boxes as onnxruntime's Q/DQ run, image by image (a tiny untrained model: scores sit close together,
    # so compare the top boxes by IoU rather than order).
    import torch
    from torchvision.ops import box_iou

    matched = total = 0
    for a, b in zip(ours, theirs, strict=True):
        top = b.boxes[:5]
        total += len(top)
        if len(top) and len(a.boxes):
            matched += int((box_iou(torch.as_tensor(top), torch.as_tensor(a.boxes[:10])).max(1).values >= 0.5).sum())
    assert total > 0 and matched / total >= 0.8, (matched, total)
    out = tmp_path / "deploy"
    r = subprocess.run([sys.executable, "-m", "deploy", str(int8_export), str(SAMPLE / "val2017"), "--backend", "torch",
                        "--device", "cpu", "--out", str(out), "--no-video", "-q", "--conf", "0.01"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "int8" and sum(summary["frames"].values()) == 4, summary
    # --precision fp8 needs a CUDA GPU, and applies to the torch backend only: one-line errors
    for extra, expect in ((["--backend", "torch", "--device", "cpu"], "FP8 (e4m3) runs on a CUDA GPU"),
                          (["--backend", "onnxruntime"], "applies to the torch backend")):
        r = subprocess.run([sys.executable, "-m", "deploy", str(int8_export), str(SAMPLE / "val2017"), *extra,
                            "--precision", "fp8", "--out", str(tmp_path / "fp8"), "--no-video", "-q"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode != 0 and expect in last and "Traceback" not in r.stderr, r.stderr[-2000:]
    # deploy.benchmark times it beside onnxruntime's run of the same file
    r = subprocess.run([sys.executable, "-m", "deploy.benchmark", "--int8-onnx", str(int8_export), "--onnx",
                        str(int8_export), "--batches", "1", "--seconds", "0.2", "--device", "cpu", "-q", "--out",
                        str(tmp_path / "bench")], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "bench" / "artifacts.json").read_text())["rows"]
    assert {(x["backend"], x["precision"]) for x in rows} == {("torch", "int8"), ("onnxruntime", "int8")}
    assert all(x["img_s"] > 0 for x in rows)
