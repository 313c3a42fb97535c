"""INT8 tensor-core kernels and the INT8 torch backend on the GPU (issue 16); ``benchmarks/run_gpu.sh int8``.

- the Triton kernels at SIDNet's layer shapes (416², batch 2) against the exact integer reference: INT32 accumulators
  equal; the fused requantised outputs equal but for rounding ties (the GPU may fuse the epilogue's multiply-add);
- a real 416² SIDNet INT8 export (``$SIDNET_INT8_ONNX``, e.g. ``fold_weight_quantize`` of ``python -m export
  --precision int8``): the network's raw head against onnxruntime's Q/DQ run (relative L2 < 1e-2), and the CUDA-graph
  backend against the eager network, on the bundled sample images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sidnet" / "sample" / "images" / "val2017"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (H, W, C, CO, k, stride): SIDNet's stem, a 3x3 of stage 8, a 1x1 of stage 16, the 3x3 1024 of stage 32
SHAPES = [(416, 416, 3, 32, 3, 1), (104, 104, 64, 128, 3, 1), (26, 26, 512, 256, 1, 1), (13, 13, 512, 1024, 3, 1)]


@cuda
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[2]}to{s[3]}k{s[4]}" for s in SHAPES])
def test_conv_int8_on_the_tensor_cores_equals_the_integer_reference(shape):
    from sidnet.kernels import int8 as K

    h, w, c, co, k, st = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (2, h, w, c), dtype=torch.int8, generator=g)
    wt = torch.randint(-127, 128, (co, k, k, c), dtype=torch.int8, generator=g)
    ones, zeros = torch.ones(co), torch.zeros(co)
    ref = K.reference_conv2d_int8(x, wt, ones, zeros, stride=st, pad=k // 2, relu=False, out_scale=None,
                                  accumulators=True)  # fmt: skip
    xc, wc = x.cuda(), wt.cuda()
    acc = K.conv2d_int8(xc, wc, ones.cuda(), zeros.cuda(), stride=st, pad=k // 2, relu=False, out_scale=None,
                        out_dtype=torch.float32)  # fmt: skip
    assert ref.abs().max() < 2**24  # exactly representable in the float32 output
    assert torch.equal(acc.cpu().to(torch.int64), ref.to(torch.int64))
    scale = torch.rand(co, generator=g) * 2e-5
    bias = torch.randn(co, generator=g) * 0.1
    q = K.conv2d_int8(xc, wc, scale.cuda(), bias.cuda(), stride=st, pad=k // 2, relu=True, out_scale=0.02).cpu()
    qr = K.reference_conv2d_int8(x, wt, scale, bias, stride=st, pad=k // 2, relu=True, out_scale=0.02)
    diff = (q.int() - qr.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4 and (q != 0).float().mean() > 0.05


# (H, W, C, CO, k, pool): SIDNet's stride-1 layers that tuning chooses a kernel for (the TMA tiles among them)
# (TMA multi-row blocks with a pool, one-row blocks, 1x1 GEMMs; split-K where batch 2 leaves the GPU mostly idle)
TUNED = [(208, 208, 32, 64, 3, 2), (104, 104, 64, 128, 3, 1), (104, 104, 128, 64, 1, 1), (52, 52, 128, 256, 3, 2),
         (52, 52, 128, 256, 3, 1), (26, 26, 512, 256, 1, 1), (13, 13, 1280, 1024, 3, 1)]


@cuda
@pytest.mark.parametrize("shape", TUNED, ids=[f"{s[0]}x{s[2]}to{s[3]}k{s[4]}p{s[5]}" for s in TUNED])
def test_every_tuning_candidate_equals_the_integer_reference(shape):
    """Each configuration tuning may pick (the pointer kernel's and the TMA kernel's tiles) gives the exact INT32
    sums and, with a fused pool, the same int8 output as the pointer kernel: the choice never changes results."""
    from sidnet.kernels import int8 as K

    h, w, c, co, k, pool = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-128, 128, (2, h, w, c), dtype=torch.int8, generator=g)
    wt = torch.randint(-127, 128, (co, k, k, c), dtype=torch.int8, generator=g)
    xc, wc = x.cuda(), wt.cuda()
    ones, zeros = torch.ones(co, device="cuda"), torch.zeros(co, device="cuda")
    scale = (torch.rand(co, generator=g) * 2e-5).cuda()
    bias = (torch.randn(co, generator=g) * 0.1).cuda()
    cands = K.candidate_tiles(n=2, ho=h, wo=w, c=c, co=co, taps=k * k, stride=1, pool=pool, device=xc.device)
    assert len(cands) >= 2, cands
    ref = None
    if pool == 1:
        ref = K.reference_conv2d_int8(x, wt, ones.cpu(), zeros.cpu(), stride=1, pad=k // 2, relu=False,
                                      out_scale=None, accumulators=True).cuda().to(torch.int64)  # fmt: skip
    first = None
    for t in cands:
        if pool == 1:
            acc = K.conv2d_int8(xc, wc, ones, zeros, stride=1, pad=k // 2, relu=False, out_scale=None,
                                out_dtype=torch.float32, tiles=t)  # fmt: skip
            assert torch.equal(acc.to(torch.int64), ref), t
        q = K.conv2d_int8(xc, wc, scale, bias, stride=1, pad=k // 2, relu=True, out_scale=0.02, tiles=t, pool=pool,
                          pool_scale=0.03 if pool > 1 else None)  # fmt: skip
        first = q if first is None else first
        assert (q != 0).float().mean() > 0.05 and torch.equal(q, first), t


@cuda
def test_maxpool_int8_on_the_gpu():
    from sidnet.kernels import int8 as K

    x = torch.randint(-128, 128, (2, 52, 52, 256), dtype=torch.int8)
    for s_out in (0.1, 0.13):
        assert torch.equal(K.maxpool2d_int8(x.cuda(), kernel=2, stride=2, pad=0, in_scale=0.1, out_scale=s_out).cpu(),
                           K.maxpool2d_int8(x, kernel=2, stride=2, pad=0, in_scale=0.1, out_scale=s_out))  # fmt: skip


def _export() -> Path:
    path = os.environ.get("SIDNET_INT8_ONNX")
    if not path or not Path(path).is_file():
        pytest.skip("set SIDNET_INT8_ONNX to a 416² SIDNet INT8 export (see benchmarks/run_gpu.sh int8)")
    return Path(path)


def _images(size: int) -> np.ndarray:
    import cv2

    from sidnet.letterbox import letterbox

    out = []
    for p in sorted(SAMPLE.glob("*.jpg")):
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        image, _, _ = letterbox(rgb, np.zeros((0, 4)), size=size)
        out.append(image.transpose(2, 0, 1).astype(np.float32) / 255)
    return np.stack(out)


def _ort_raw(path: Path, images: np.ndarray, *, optimised: bool) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info("raw", onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    if not optimised:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ arithmetic as written
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["raw"], {"images": images})[0]


@cuda
def test_int8_sidnet_layers_on_the_gpu_equal_the_reference():
    """Every INT8 layer of the 416² network, fed the reference run's own input, gives the reference's output on the
    GPU (ties of the float epilogue aside)."""
    from sidnet.quant.int8_plan import Int8Network, QConv, QMaxPool, plan_from_onnx

    plan = plan_from_onnx(_export())
    images = torch.from_numpy(_images(416)[:2])
    cpu = Int8Network(plan, device=torch.device("cpu"), dtype=torch.float32)
    gpu = Int8Network(plan, device=torch.device("cuda"), dtype=torch.float32, fuse=False)  # step by step
    env = {plan.input: images.permute(0, 2, 3, 1)}
    checked = 0
    with torch.no_grad():
        for ref_layer, gpu_layer, step in zip(cpu.layers, gpu.layers, plan.steps, strict=True):
            inputs = {k: v for k, v in env.items()}
            ref_layer(env)
            if isinstance(step, (QConv, QMaxPool)) and step.out_scale is not None:
                g = {k: v.cuda() for k, v in inputs.items() if k == step.x}
                gpu_layer(g)
                diff = (g[step.out].cpu().int() - env[step.out].int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (step.name, int(diff.max()))
                checked += 1
    assert checked >= 20


@cuda
def test_fused_stem_on_the_gpu_equals_the_three_steps():
    """The first layer as one kernel (float images quantised on load, conv, ReLU, requantisation, 2x2 max-pool) gives
    the separate steps' int8 output on the real export (ties of the float epilogue aside)."""
    from sidnet.quant.int8_plan import Int8Network, QStem, plan_from_onnx

    plan = plan_from_onnx(_export())
    fused = Int8Network(plan, device=torch.device("cuda"), dtype=torch.float32)
    stem = fused.plan.steps[0]
    assert isinstance(stem, QStem) and plan.steps[3].name == stem.pool.name, fused.plan.steps[:2]  # Q, conv, alias
    images = torch.from_numpy(_images(416)[:2])
    cpu = Int8Network(plan, device=torch.device("cpu"), dtype=torch.float32)
    env = {plan.input: images.permute(0, 2, 3, 1)}
    with torch.no_grad():
        for layer, step in zip(cpu.layers, cpu.plan.steps, strict=True):
            layer(env)
            if step.name == stem.pool.name:
                break
        g = {plan.input: images.cuda().permute(0, 2, 3, 1)}
        fused.layers[0](g)
    diff = (g[stem.out].cpu().int() - env[stem.out].int()).abs()
    assert g[stem.out].shape == env[stem.out].shape and (env[stem.out] != 0).float().mean() > 0.05
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (int(diff.max()), float((diff > 0).float().mean()))


@cuda
def test_convs_with_their_pool_on_the_gpu_equal_the_two_steps():
    """Each conv + max-pool run as one kernel (the max of the window's INT32 sums, then one epilogue) gives exactly
    the conv's requantised output pooled (and requantised) by the separate kernel: the epilogue is monotonic."""
    from sidnet.quant.int8_plan import Int8Network, QConvPool, plan_from_onnx

    plan = plan_from_onnx(_export())
    dev = torch.device("cuda")
    fused = Int8Network(plan, device=dev, dtype=torch.float32)
    steps = Int8Network(plan, device=dev, dtype=torch.float32, fuse=False)
    by_name = dict(zip([s.name for s in steps.plan.steps], steps.layers, strict=True))
    env = {plan.input: torch.from_numpy(_images(416)[:2]).cuda().permute(0, 2, 3, 1)}
    checked = 0
    with torch.no_grad():
        for layer, s in zip(fused.layers, fused.plan.steps, strict=True):
            if isinstance(s, QConvPool):
                two = {s.x: env[s.x]}
                by_name[s.conv.name](two)
                two[s.pool.x] = two[s.conv.out]  # the Alias between them, if any
                by_name[s.pool.name](two)
            layer(env)
            if isinstance(s, QConvPool):
                assert env[s.out].shape == two[s.pool.out].shape and (env[s.out] != 0).float().mean() > 0.05
                assert torch.equal(env[s.out], two[s.pool.out]), s.name
                checked += 1
    assert checked == 3, fused.plan.summary()


@cuda
@pytest.mark.parametrize("shape", SHAPES[1:], ids=[f"{s[0]}x{s[2]}to{s[3]}k{s[4]}" for s in SHAPES[1:]])
def test_conv_fp8_on_the_tensor_cores_matches_a_float64_convolution(shape):
    """FP8 (e4m3) operands, FP32 accumulation: the sums of the e4m3 values' exact products, to FP32 rounding."""
    import torch.nn.functional as F

    from sidnet.kernels import int8 as K

    h, w, c, co, k, st = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((2, h, w, c), device="cuda", generator=g).to(torch.float8_e4m3fn)
    wt = (torch.randn((co, k, k, c), device="cuda", generator=g) * 0.1).to(torch.float8_e4m3fn)
    ones, zeros = torch.ones(co, device="cuda"), torch.zeros(co, device="cuda")
    acc = K.conv2d_fp8(x, wt, ones, zeros, stride=st, pad=k // 2, relu=False, out_scale=None, out_dtype=torch.float32)
    ref = F.conv2d(x.double().permute(0, 3, 1, 2), wt.double().permute(0, 3, 1, 2), stride=st, padding=k // 2)
    ref = ref.permute(0, 2, 3, 1)
    err = float((acc.double() - ref).abs().max() / ref.abs().max())
    print(f"FP8 conv {shape}: max |error| / max |ref| = {err:.2e}")
    assert err < 1e-3, err
    q = K.conv2d_fp8(x, wt, ones, zeros, stride=st, pad=k // 2, relu=True, out_scale=0.5)
    expect = (ref.clamp_min(0) / 0.5).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and (q.float() == expect.float()).float().mean() > 0.99


@cuda
def test_int8_sidnet_against_onnxruntime_and_graphs_against_eager():
    from sidnet.quant.int8_plan import Int8Network, plan_from_onnx
    from sidnet.runtime.backends.torch_int8 import Int8Backend

    path = _export()
    images = _images(416)
    exact, fused = _ort_raw(path, images, optimised=False), _ort_raw(path, images, optimised=True)
    net = Int8Network(plan_from_onnx(path), device=torch.device("cuda"), dtype=torch.float32)
    with torch.no_grad():
        raw = net(torch.from_numpy(images).cuda()).cpu().numpy()

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    ours, spread = rel(raw, exact), rel(fused, exact)
    print(f"INT8 SIDNet 416², raw head relative L2: ours vs onnxruntime Q/DQ {ours:.2e}; onnxruntime's own fused vs "
          f"unfused {spread:.2e}")
    assert ours <= max(1e-2, 1.5 * spread), (ours, spread)
    backend = Int8Backend(path, device="cuda", conf_thresh=0.001, topk=100)
    dets_graph, num_graph = backend.infer(images)
    eager = Int8Backend(path, device="cuda", conf_thresh=0.001, topk=100, graphs=False)
    dets_eager, num_eager = eager.infer(images)
    assert np.array_equal(num_graph, num_eager) and np.allclose(dets_graph, dets_eager, atol=1e-2)


@cuda
def test_maxpool_fp8_on_the_gpu():
    from sidnet.kernels import int8 as K

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn((2, 26, 26, 512), device="cuda", generator=g) * 40).to(torch.float8_e4m3fn)
    mp = torch.nn.functional.max_pool2d(x.float().permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1)
    for ratio in (1.0, 0.77):
        got = K.maxpool2d_fp8(x, kernel=2, stride=2, pad=0, in_scale=ratio, out_scale=1.0)
        expect = (mp * ratio).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(got.view(torch.int8), expect.view(torch.int8)), ratio


@cuda
def test_fp8_sidnet_follows_int8_and_its_graph_equals_eager():
    """FP8 (e4m3) runs the same plan with the calibration's ranges mapped onto ±448: its raw head stays near the
    INT8 network's (a different rounding of the same float model) and near its own unfused steps, and the CUDA-graph
    backend equals the eager network."""
    from sidnet.quant.int8_plan import Int8Network, QConvPool, plan_from_onnx
    from sidnet.runtime.backends.torch_int8 import Int8Backend

    path = _export()
    plan = plan_from_onnx(path)
    images = torch.from_numpy(_images(416)).cuda()
    dev = torch.device("cuda")
    with torch.no_grad():
        int8 = Int8Network(plan, device=dev, dtype=torch.float32)(images).cpu().numpy()
        fused = Int8Network(plan, device=dev, dtype=torch.float32, precision="fp8")
        fp8 = fused(images).cpu().numpy()
        steps = Int8Network(plan, device=dev, dtype=torch.float32, precision="fp8", fuse=False)
        unfused = steps(images).cpu().numpy()
    # the fused pool rounds once at the pool's scale; the two steps round at the conv's, then at the pool's
    assert float(np.linalg.norm(unfused - fp8) / np.linalg.norm(fp8)) < 0.05
    assert sum(isinstance(s, QConvPool) for s in fused.plan.steps) == 3, fused.plan.summary()
    rel = float(np.linalg.norm(fp8 - int8) / np.linalg.norm(int8))
    print(f"FP8 SIDNet 416², raw head relative L2 vs the INT8 network: {rel:.2e}")
    assert np.isfinite(fp8).all() and rel < 0.25, rel
    backend = Int8Backend(path, device="cuda", conf_thresh=0.001, topk=100, precision="fp8")
    eager = Int8Backend(path, device="cuda", conf_thresh=0.001, topk=100, precision="fp8", graphs=False)
    (dg, ng), (de, ne) = backend.infer(_images(416)), eager.infer(_images(416))
    assert backend.info.precision == "fp8" and np.array_equal(ng, ne) and np.allclose(dg, de, atol=1e-2)
