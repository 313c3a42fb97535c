"""CUDA kernels (csrc/, sidnet.kernels) against the PyTorch references in sidnet.models.

CPU part (CI): the library compiles with nvcc, exports its C ABI, and rejects bad arguments without touching a GPU.
GPU part (``-m gpu``, run by benchmarks/run_gpu.sh on the GPU machine): every launcher against the reference on
random inputs (never zeros), odd and empty shapes, fp32 and fp16, outputs poisoned first so unwritten elements show.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import pytest
import torch

import sidnet.kernels as kernels
from sidnet.kernels import build as kbuild
from sidnet.models.layers import reorg as ref_reorg
from sidnet.models.region import region_decode as ref_decode
from sidnet.models.region import region_topk as ref_topk
from sidnet.models.region import scores_and_boxes

GPU_REASON = "needs CUDA; run benchmarks/run_gpu.sh on the GPU machine"
INVALID = 1  # cudaErrorInvalidValue
TIE_EPS = 1e-6  # scores closer than this may legitimately order differently between kernel and reference


# ----------------------------------------------------------------------------------------------------------- CPU


@pytest.fixture(scope="module")
def built_lib(tmp_path_factory):
    try:
        kbuild.find_nvcc()
    except kbuild.BuildError as e:
        pytest.skip(f"cannot compile the kernels: {e}")
    out = tmp_path_factory.mktemp("kernels")
    return kbuild.build(out, resource_usage=True, verbose=False)


def test_build_exports_c_abi_and_validates_without_gpu(built_lib):
    lib = kernels.load_library(built_lib)
    assert lib.sidnetKernelsAbiVersion() == kernels.ABI_VERSION
    assert lib.sidnetGetErrorString(INVALID) == b"invalid argument"
    fake = 4096  # never dereferenced: every call below returns before any CUDA work
    # reorgForward(in, out, dtype, n, c, h, w, stride, stream)
    assert lib.reorgForward(fake, fake, 0, 1, 3, 13, 13, 2, None) == INVALID  # 13 not a multiple of 2
    assert lib.reorgForward(fake, fake, 0, 1, 3, 12, 12, 0, None) == INVALID
    assert lib.reorgForward(fake, fake, 7, 1, 3, 12, 12, 2, None) == INVALID
    assert lib.reorgForward(fake, fake, 0, -1, 3, 12, 12, 2, None) == INVALID
    assert lib.reorgForward(None, None, 1, 1, 3, 12, 12, 2, None) == INVALID  # null with work to do
    assert lib.reorgForward(None, None, 0, 0, 3, 12, 12, 2, None) == 0  # n == 0: nothing to do
    # regionDecode(raw, dtype, anchors, n, a, c, h, w, sx, sy, out, stream)
    assert lib.regionDecode(fake, 0, fake, 1, 5, 0, 13, 13, 32.0, 32.0, fake, None) == INVALID  # c < 1
    assert lib.regionDecode(None, 0, None, 0, 5, 1, 13, 13, 32.0, 32.0, None, None) == 0
    # regionTopK(raw, dtype, anchors, n, a, c, h, w, sx, sy, thresh, topk, dets, num, ws, wsBytes, stream)
    ws = lib.regionTopKWorkspaceSize
    assert ws(4, 5, 13, 13, 100) == 0  # 845 candidates fit in shared memory
    assert ws(4, 5, 32, 32, 100) == 4 * 5 * 32 * 32 * 8
    assert ws(0, 5, 32, 32, 100) == 0
    args = (fake, 0, fake, 2, 5, 1, 13, 13, 32.0, 32.0, 0.5)
    assert lib.regionTopK(*args, -1, fake, fake, None, 0, None) == INVALID
    assert lib.regionTopK(fake, 2, *args[2:], 10, fake, fake, None, 0, None) == INVALID  # dtype
    big = (fake, 0, fake, 2, 5, 1, 32, 32, 32.0, 32.0, 0.5)
    assert lib.regionTopK(*big, kernels.REGION_TOPK_MAX_K + 1, fake, fake, fake, ws(2, 5, 32, 32, 0), None) == INVALID
    assert lib.regionTopK(*big, 100, fake, fake, None, 0, None) == INVALID  # workspace missing
    assert lib.regionTopK(*big, 100, fake, fake, fake, 8, None) == INVALID  # workspace short
    assert lib.regionTopK(None, 0, None, 0, 5, 1, 32, 32, 32.0, 32.0, 0.5, 100, None, None, None, 0, None) == 0


def test_build_has_no_spills(built_lib):
    report = (built_lib.parent / "resource-usage.txt").read_text()
    for arch in kbuild.DEFAULT_ARCHS:
        assert f"sm_{arch}" in report
    assert re.findall(r"(\d+) bytes spill stores", report), "no ptxas report"
    assert set(re.findall(r"(\d+) bytes spill (?:stores|loads)", report)) == {"0"}
    assert set(re.findall(r"(\d+) bytes stack frame", report)) == {"0"}


def test_gencode_covers_ampere_to_hopper_with_ptx():
    flags = kbuild.gencode_flags(kbuild.DEFAULT_ARCHS)
    for a in ("80", "86", "89"):
        assert f"-gencode=arch=compute_{a},code=sm_{a}" in flags
    assert flags[-1] == "-gencode=arch=compute_90,code=[sm_90,compute_90]"


def test_build_without_nvcc_says_so(monkeypatch, capsys):
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(kbuild.shutil, "which", lambda _: None)
    monkeypatch.setattr(kbuild, "CUDA_HOME_DEFAULTS", ())
    assert kbuild.main([]) == 1
    assert capsys.readouterr().err.strip() == f"error: {kbuild.NVCC_MISSING}"


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.LIB_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(FileNotFoundError, match="SIDNET_KERNELS_LIB"):
        kernels.load_library()
    with pytest.raises(FileNotFoundError, match="python -m sidnet.kernels.build"):
        kernels.library_path(tmp_path / "nope.so")


def test_import_does_not_load_torch_or_library():
    code = "import sys, sidnet.kernels; assert 'torch' not in sys.modules; assert not sidnet.kernels.library._loaded"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=kbuild.REPO_ROOT)


# ----------------------------------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if not torch.cuda.is_available():
        if os.environ.get("SIDNET_REQUIRE_GPU") == "1":
            pytest.fail("SIDNET_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
        pytest.skip(GPU_REASON)
    saved = os.environ.get(kernels.LIB_ENV)
    try:
        kernels.library_path()
    except FileNotFoundError:  # not built yet: build into a temporary folder (raises if nvcc is missing)
        os.environ[kernels.LIB_ENV] = str(kbuild.build(tmp_path_factory.mktemp("kernels"), verbose=False))
    yield kernels.load_library()
    if saved is None:
        os.environ.pop(kernels.LIB_ENV, None)
    else:
        os.environ[kernels.LIB_ENV] = saved


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _poison(shape, dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    return torch.full(shape, -1, dtype=dtype, device="cuda")


DTYPES = [torch.float32, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "n,c,h,w,s",
    [(1, 64, 26, 26, 2), (64, 64, 26, 26, 2), (2, 3, 14, 6, 2), (3, 1, 2, 2, 2), (2, 5, 21, 21, 3), (1, 3, 7, 7, 1)],
)
def test_reorg_matches_reference(lib, dtype, n, c, h, w, s):
    x = torch.randn(n, c, h, w, generator=_gen(n * 1000 + c * 10 + h), device="cuda").to(dtype)
    out = _poison((n, c * s * s, h // s, w // s), dtype)
    got = kernels.reorg(x, s, out=out)
    torch.cuda.synchronize()
    assert got is out
    assert not torch.isnan(out).any(), "unwritten output elements"
    assert torch.equal(out, ref_reorg(x, s))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_reorg_unaligned_input_takes_scalar_path(lib, dtype):
    n, c, h, w = 2, 3, 10, 6
    flat = torch.randn(n * c * h * w + 1, generator=_gen(7), device="cuda").to(dtype)
    x = flat[1:].view(n, c, h, w)  # data pointer one element past an aligned allocation
    assert x.data_ptr() % (2 * x.element_size()) != 0
    out = _poison((n, c * 4, h // 2, w // 2), dtype)
    kernels.reorg(x, 2, out=out)
    assert torch.equal(out, ref_reorg(x, 2))


@pytest.mark.gpu
def test_reorg_empty_and_bad_shapes(lib):
    assert kernels.reorg(torch.randn(0, 3, 4, 4, device="cuda")).shape == (0, 12, 2, 2)
    with pytest.raises(ValueError, match="not a multiple of stride"):
        kernels.reorg(torch.randn(1, 3, 13, 13, device="cuda"))
    x = torch.randn(1, 3, 13, 13, device="cuda")
    assert lib.reorgForward(x.data_ptr(), x.data_ptr(), 0, 1, 3, 13, 13, 2, None) == INVALID


def _region_inputs(n, a, c, h, w, dtype, seed, scale=2.0):
    g = _gen(seed)
    raw = (torch.randn(n, a * (5 + c), h, w, generator=g, device="cuda") * scale).to(dtype)
    anchors = torch.rand(a, 2, generator=g, device="cuda") * 150 + 10
    return raw, anchors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "n,a,c,h,w",
    [
        (1, 5, 1, 13, 13),
        (64, 5, 1, 13, 13),
        (2, 3, 3, 26, 26),
        (3, 1, 1, 7, 7),
        (2, 5, 3, 7, 13),
        (1, 2, 80, 7, 7),
        (1, 1, 400, 3, 5),  # rows too wide to stage in shared memory: written in place
    ],
)
def test_region_decode_matches_reference(lib, dtype, n, a, c, h, w):
    raw, anchors = _region_inputs(n, a, c, h, w, dtype, seed=n + 10 * a + 100 * c + h)
    stride = (416 / w, 416 / h)
    out = _poison((n, a * h * w, 5 + c), torch.float32)
    kernels.region_decode(raw, anchors, stride=stride, out=out)
    assert not torch.isnan(out).any(), "unwritten output elements"
    torch.testing.assert_close(out, ref_decode(raw, anchors, stride=stride), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_region_decode_empty_batch(lib):
    raw, anchors = _region_inputs(1, 5, 1, 13, 13, torch.float32, seed=3)
    assert kernels.region_decode(raw[:0], anchors, stride=(32.0, 32.0)).shape == (0, 845, 6)


def _unambiguous(raw, anchors, stride, thresh, topk) -> bool:
    """No score within TIE_EPS of the threshold, and the top-K cut does not split near-equal (unequal) scores."""
    _, score, _ = scores_and_boxes(ref_decode(raw, anchors, stride=stride))
    if ((score - thresh).abs() < TIE_EPS).any():
        return False
    for s in score:
        s = s[s >= thresh].sort(descending=True).values
        if topk < s.numel() and 0 < float(s[topk - 1] - s[topk]) < TIE_EPS:
            return False
    return True


def _assert_topk_close(dets, num, ref_dets, ref_num, box_rtol):
    assert torch.equal(num.cpu(), ref_num.cpu()), "candidate counts differ"
    assert not torch.isnan(dets).any(), "unwritten output elements"
    d, r = dets.cpu().double(), ref_dets.cpu().double()
    for i in range(d.shape[0]):
        k = int(ref_num[i])
        assert torch.all(d[i, k:] == 0), f"image {i}: rows past num are not zero"
        # Both lists are sorted by score, so scores compare position by position even across near-ties.
        torch.testing.assert_close(d[i, :k, 4], r[i, :k, 4], rtol=1e-5, atol=1e-6)
        # Rows whose scores are within TIE_EPS of a neighbour may swap: compare each such run as a set.
        start = 0
        while start < k:
            end = start + 1
            while end < k and float(r[i, end - 1, 4] - r[i, end, 4]) <= TIE_EPS:
                end += 1
            dg, rg = d[i, start:end], r[i, start:end]
            if end - start > 1:
                dg, rg = dg[dg[:, 0].argsort()], rg[rg[:, 0].argsort()]
            torch.testing.assert_close(dg[:, :4], rg[:, :4], rtol=box_rtol, atol=1e-4)
            assert torch.equal(dg[:, 5], rg[:, 5]), f"image {i} rows {start}:{end}: classes differ"
            start = end


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "n,a,c,h,w,thresh,topk",
    [
        (1, 3, 1, 13, 13, 0.5, 100),  # candidates > topk
        (64, 5, 1, 13, 13, 0.3, 100),
        (16, 3, 3, 26, 26, 0.2, 200),
        (2, 1, 1, 7, 7, 0.4, 64),  # topk > A*H*W: trailing zero rows
        (3, 5, 3, 7, 13, 0.05, 1000),
        (2, 5, 1, 32, 32, 0.05, 300),  # 5120 cells: workspace + radix select (count > 4096)
        (1, 5, 1, 32, 32, 0.05, 4096),
        (2, 5, 3, 32, 32, 0.6, 50),  # workspace, count <= 4096
    ],
)
def test_region_topk_matches_reference(lib, dtype, n, a, c, h, w, thresh, topk):
    stride = (416 / w, 416 / h)
    for seed in range(10):
        raw, anchors = _region_inputs(n, a, c, h, w, dtype, seed=1000 * seed + n + a + c + h)
        if _unambiguous(raw, anchors, stride, thresh, topk):
            break
    else:
        pytest.fail("no random draw without near-ties at the threshold or the top-K cut")
    dets, num = _poison((n, topk, 6), torch.float32), _poison((n,), torch.int32)
    kernels.region_topk(raw, anchors, stride=stride, conf_thresh=thresh, topk=topk, out=(dets, num))
    ref_dets, ref_num = ref_topk(raw, anchors, stride=stride, conf_thresh=thresh, topk=topk)
    if topk < a * h * w:
        assert int(ref_num.max()) > 0
    _assert_topk_close(dets, num, ref_dets, ref_num, box_rtol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n,a,c,h,w,topk", [(4, 5, 1, 13, 13, 100), (2, 3, 3, 13, 13, 300), (2, 5, 1, 32, 32, 500)])
def test_region_topk_exact_ties_order_by_lower_m(lib, n, a, c, h, w, topk):
    """Scores drawn from three levels: ties everywhere, including across the top-K cut; ties go to lower m."""
    raw, anchors = _region_inputs(n, a, c, h, w, torch.float32, seed=11)
    levels = torch.tensor([-1.0, 0.5, 2.0], device="cuda")
    g = _gen(12)
    for ai in range(a):  # objectness takes three values; boxes stay random
        obj = ai * (5 + c) + 4
        raw[:, obj] = levels[torch.randint(0, 3, raw[:, obj].shape, generator=g, device="cuda")]
        # One class-logit pattern for every cell: permuted patterns could round their softmax sums differently.
        raw[:, obj + 1 : obj + 1 + c] = torch.linspace(1.0, -1.0, c, device="cuda").view(1, c, 1, 1)
    stride = (416 / w, 416 / h)
    dets, num = kernels.region_topk(raw, anchors, stride=stride, conf_thresh=0.1, topk=topk)
    ref_dets, ref_num = ref_topk(raw, anchors, stride=stride, conf_thresh=0.1, topk=topk)
    assert torch.equal(num, ref_num)
    assert int(ref_num.min()) == topk, "the case must cut through tied scores"
    torch.testing.assert_close(dets, ref_dets, rtol=1e-5, atol=1e-4)  # position by position
    again, _ = kernels.region_topk(raw, anchors, stride=stride, conf_thresh=0.1, topk=topk)
    assert torch.equal(dets, again), "not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_region_topk_no_candidates_and_empty(lib, dtype):
    raw, anchors = _region_inputs(3, 5, 1, 13, 13, dtype, seed=5)
    dets, num = _poison((3, 100, 6), torch.float32), _poison((3,), torch.int32)
    kernels.region_topk(raw, anchors, stride=(32.0, 32.0), conf_thresh=1.5, topk=100, out=(dets, num))
    assert torch.equal(num.cpu(), torch.zeros(3, dtype=torch.int32))
    assert torch.equal(dets.cpu(), torch.zeros(3, 100, 6))
    dets, num = kernels.region_topk(raw[:0], anchors, stride=(32.0, 32.0), conf_thresh=0.5, topk=100)
    assert dets.shape == (0, 100, 6) and num.shape == (0,)
    dets, num = torch.empty(3, 0, 6, device="cuda"), _poison((3,), torch.int32)
    kernels.region_topk(raw, anchors, stride=(32.0, 32.0), conf_thresh=0.5, topk=0, out=(dets, num))
    assert dets.shape == (3, 0, 6) and torch.equal(num.cpu(), torch.zeros(3, dtype=torch.int32))


@pytest.mark.gpu
def test_region_topk_rejects_too_large_k(lib):
    raw, anchors = _region_inputs(1, 5, 1, 32, 32, torch.float32, seed=9)
    with pytest.raises(ValueError, match="4096"):
        kernels.region_topk(raw, anchors, stride=(13.0, 13.0), conf_thresh=0.5, topk=5000)


@pytest.mark.gpu
def test_wrappers_use_the_current_stream_and_capture_in_cuda_graphs(lib):
    # Captured launches must go to the capturing stream: one sent elsewhere fails the capture or never replays.
    x = torch.randn(2, 8, 6, 6, device="cuda")
    raw, anchors = _region_inputs(2, 5, 1, 13, 13, torch.float32, seed=21)
    kw = dict(stride=(32.0, 32.0), conf_thresh=0.3, topk=50)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernels.reorg(x)
        kernels.region_topk(raw, anchors, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.reorg(x)
        dets, num = kernels.region_topk(raw, anchors, **kw)
    x.copy_(torch.randn(x.shape, generator=_gen(22), device="cuda"))
    raw.copy_(_region_inputs(2, 5, 1, 13, 13, torch.float32, seed=23)[0])
    assert _unambiguous(raw, anchors, kw["stride"], kw["conf_thresh"], kw["topk"])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref_reorg(x))
    _assert_topk_close(dets, num, *ref_topk(raw, anchors, **kw), box_rtol=1e-5)


@pytest.mark.gpu
def test_launch_error_is_reported(lib):
    # The wrappers check cudaError_t: an error from the launcher surfaces as RuntimeError with CUDA's text.
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.library._check(lib, INVALID, "regionTopK")
    assert isinstance(lib, ctypes.CDLL)


# ------------------------------------------------------------------------------------------ pyramid RoIAlign


def test_pyramid_roi_align_validates_without_gpu(built_lib):
    lib = kernels.load_library(built_lib)
    fake = 4096
    levels = (ctypes.c_void_p * 3)(fake, fake, fake)
    hs, ws = (ctypes.c_int * 3)(8, 4, 2), (ctypes.c_int * 3)(8, 4, 2)
    sc = (ctypes.c_float * 3)(1 / 8, 1 / 16, 1 / 32)
    # pyramidRoiAlign(features, L, h, w, scale, dtype, n, c, rois, r, ph, pw, sampling, minLevel, k0, s0, out, s)
    call = lambda *a: lib.pyramidRoiAlign(*a)  # noqa: E731
    assert call(levels, 0, hs, ws, sc, 0, 1, 4, fake, 3, 7, 7, 2, 3, 4.0, 224.0, fake, None) == INVALID  # no level
    assert call(levels, 9, hs, ws, sc, 0, 1, 4, fake, 3, 7, 7, 2, 3, 4.0, 224.0, fake, None) == INVALID  # > 8
    assert call(levels, 3, hs, ws, sc, 2, 1, 4, fake, 3, 7, 7, 2, 3, 4.0, 224.0, fake, None) == INVALID  # dtype
    assert call(levels, 3, hs, ws, sc, 0, 1, 4, fake, 3, 7, 7, 0, 3, 4.0, 224.0, fake, None) == INVALID  # sampling
    assert call(levels, 3, hs, ws, sc, 0, 1, 4, None, 3, 7, 7, 2, 3, 4.0, 224.0, fake, None) == INVALID  # null rois
    assert call(levels, 3, hs, ws, sc, 0, 1, 4, None, 0, 7, 7, 2, 3, 4.0, 224.0, None, None) == 0  # no RoIs


def _pyramid_reference(features, rois, *, output_size, scales):
    """torchvision's own MultiScaleRoIAlign (LevelMapper + roi_align) on (N, R, 4) RoIs → (N, R, C, PH, PW)."""
    from torchvision.ops import MultiScaleRoIAlign

    n, r = rois.shape[:2]
    size = round(features[0].shape[-1] / scales[0])
    pool = MultiScaleRoIAlign([str(i) for i in range(len(features))], output_size=output_size, sampling_ratio=2)
    maps = {str(i): f.float() for i, f in enumerate(features)}
    out = pool(maps, list(rois.float()), [(size, size)] * n)
    return out.view(n, r, *out.shape[1:])


def _pyramid_inputs(seed, *, n, c, size, r, dtype):
    g = _gen(seed)
    strides = (8, 16, 32)
    features = [torch.randn(n, c, size // s, size // s, generator=g, device="cuda").to(dtype) for s in strides]
    xy = torch.rand(n, r, 2, generator=g, device="cuda") * size * 0.9
    wh = torch.rand(n, r, 2, generator=g, device="cuda") ** 2 * size * 0.9 + 0.5  # tiny to image-sized: every level
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
    return features, boxes, [1 / s for s in strides]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "c", "size", "r", "pooled"), [(1, 256, 512, 1000, 7), (2, 37, 224, 33, 14),
                                                             (3, 5, 96, 7, (5, 3)), (2, 16, 128, 0, 7)])  # fmt: skip
def test_pyramid_roi_align_matches_torchvision(lib, dtype, n, c, size, r, pooled):
    pooled = pooled if isinstance(pooled, tuple) else (pooled, pooled)
    features, rois, scales = _pyramid_inputs(n * 1000 + r, n=n, c=c, size=size, r=r, dtype=dtype)
    got = kernels.pyramid_roi_align(features, rois, output_size=pooled, sampling_ratio=2, scales=scales)
    assert got.shape == (n, r, c, *pooled) and got.dtype == dtype
    if r == 0:
        return
    ref = _pyramid_reference(features, rois, output_size=pooled, scales=scales)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # fp16 output rounding of values of magnitude ~1
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    assert torch.isfinite(got).all()


# --------------------------------------------------------------------------------------------- maxpool (NHWC 2x2)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "n,c,h,w",
    # SIDNet's pools (vector path), odd spatial sizes (floor), channel counts off the 16-byte vector (scalar path)
    [(2, 32, 416, 416), (64, 64, 26, 26), (1, 512, 26, 26), (3, 8, 13, 13), (2, 3, 9, 7), (1, 5, 2, 2), (2, 12, 5, 8)],
)
def test_maxpool_nhwc_matches_torch(lib, dtype, n, c, h, w):
    x = _nhwc(torch.randn(n, c, h, w, generator=_gen(n + c + h * w), device="cuda").to(dtype))
    out = _nhwc(_poison((n, c, h // 2, w // 2), dtype))
    got = kernels.maxpool2x2_nhwc(x, out=out)
    torch.cuda.synchronize()
    assert got is out and not torch.isnan(out).any(), "unwritten output elements"
    assert torch.equal(out, torch.nn.functional.max_pool2d(x, 2, 2))


@pytest.mark.gpu
def test_maxpool_nhwc_unaligned_empty_and_bad_layout(lib):
    flat = torch.randn(2 * 5 * 8 * 16 + 1, generator=_gen(3), device="cuda").half()
    x = flat[1:].view(2, 5, 8, 16).permute(0, 3, 1, 2)  # channels-last view, data pointer off 16-byte alignment
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    assert torch.equal(kernels.maxpool2x2_nhwc(x), torch.nn.functional.max_pool2d(x, 2, 2))
    empty = _nhwc(torch.randn(0, 8, 4, 4, device="cuda"))
    assert kernels.maxpool2x2_nhwc(empty).shape == (0, 8, 2, 2)
    assert kernels.maxpool2x2_nhwc(_nhwc(torch.randn(1, 8, 1, 1, device="cuda"))).shape == (1, 8, 0, 0)
    with pytest.raises(ValueError, match="channels-last"):
        kernels.maxpool2x2_nhwc(torch.randn(1, 8, 4, 4, device="cuda"))  # NCHW contiguous, C > 1


@pytest.mark.gpu
def test_maxpool_module_inside_a_cuda_graph(lib):
    from sidnet.models.fuse import MaxPool2x2

    pool = MaxPool2x2()
    x = _nhwc(torch.randn(4, 64, 26, 26, generator=_gen(11), device="cuda").half())
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        pool(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = pool(x)
    x.copy_(_nhwc(torch.randn(4, 64, 26, 26, generator=_gen(12), device="cuda").half()))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.nn.functional.max_pool2d(x, 2, 2))


# --------------------------------------------------------------------------------- stem (conv 3x3 + act + maxpool 2x2)


def _stem_ref(x, weight, bias, act, slope):
    """float64 reference (cuDNN's fp32 convs may run in TF32)."""
    n, _, h, w = x.shape
    if h < 2 or w < 2:
        return torch.empty(n, weight.shape[0], h // 2, w // 2, dtype=torch.float64, device=x.device)
    y = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    y = {"relu": torch.relu, "identity": lambda t: t,
         "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, slope)}[act](y)  # fmt: skip
    return torch.nn.functional.max_pool2d(y, 2, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "n,k,h,w,act",
    # Darknet-19's stem at 416² (two 16-channel launches), YOLOv2's leaky stem, an 8-channel group (K=24), K=64 (four
    # launches), K=8, odd sizes (floor), a 1-row input (empty output)
    [(2, 32, 416, 416, "relu"), (3, 32, 64, 48, "leaky_relu"), (1, 24, 9, 7, "relu"), (2, 64, 20, 20, "identity"),
     (1, 8, 5, 5, "leaky_relu"), (1, 16, 1, 6, "relu")],
)  # fmt: skip
def test_stem_conv_act_pool_matches_torch(lib, dtype, n, k, h, w, act):
    g = _gen(n * 100 + k + h)
    x = _nhwc(torch.rand(n, 3, h, w, generator=g, device="cuda").to(dtype))
    weight = (0.3 * torch.randn(k, 3, 3, 3, generator=g, device="cuda")).to(dtype)
    bias = (0.1 * torch.randn(k, generator=g, device="cuda")).to(dtype)
    out = _nhwc(_poison((n, k, h // 2, w // 2), dtype))
    got = kernels.stem_conv_act_pool(x, weight, bias, act=act, slope=0.1, out=out)
    torch.cuda.synchronize()
    assert got is out and not torch.isnan(out).any(), "unwritten output elements"
    ref = _stem_ref(x, weight, bias, act, 0.1)  # exact math on the same (rounded) inputs
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    else:  # one fp16 rounding of the result (|values| < 8: ulp <= 2^-8)
        torch.testing.assert_close(out.double(), ref.half().double(), atol=4e-3, rtol=1e-3)


@pytest.mark.gpu
def test_stem_conv_act_pool_equals_cudnn_layers_in_fp16(lib):
    """Against what it replaces in the torch backend: cuDNN conv+bias+ReLU in fp16, then max-pool (both round)."""
    g = _gen(5)
    x = _nhwc(torch.rand(4, 3, 416, 416, generator=g, device="cuda").half())
    weight = (0.3 * torch.randn(32, 3, 3, 3, generator=g, device="cuda")).half()
    bias = (0.1 * torch.randn(32, generator=g, device="cuda")).half()
    cudnn = torch.cudnn_convolution_relu(x, weight.contiguous(memory_format=torch.channels_last), bias, (1, 1), (1, 1),
                                         (1, 1), 1)  # fmt: skip
    ref = torch.nn.functional.max_pool2d(cudnn, 2, 2)
    got = kernels.stem_conv_act_pool(x, weight, bias, act="relu")
    diff = (got.float() - ref.float()).abs()
    assert diff.max() <= 8e-3 and diff.mean() < 1e-4, (diff.max().item(), diff.mean().item())


@pytest.mark.gpu
def test_stem_bad_shapes_and_layout(lib):
    x = _nhwc(torch.rand(1, 3, 8, 8, device="cuda"))
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.stem_conv_act_pool(x, torch.randn(12, 3, 3, 3), None)
    with pytest.raises(ValueError, match="channels-last"):
        kernels.stem_conv_act_pool(torch.rand(1, 3, 8, 8, device="cuda").permute(0, 1, 3, 2), torch.randn(8, 3, 3, 3))
    with pytest.raises(ValueError, match="act"):
        kernels.stem_conv_act_pool(x, torch.randn(8, 3, 3, 3), act="gelu")
    # The C launcher's own refusal of K % 8 (the path a TensorRT plugin or other host code would hit)
    lib_fn = kernels.load_library().stemConvActPool
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib_fn.argtypes = [vp, vp, i, i, i, i, i, vp, vp, i, ctypes.c_float, vp]
    assert lib_fn(None, None, 0, 1, 4, 4, 12, None, None, 1, 0.0, None) == 801  # cudaErrorNotSupported


@pytest.mark.gpu
def test_stem_module_in_a_fused_network_inside_a_cuda_graph(lib):
    """fuse_for_inference(kernel_stem=True) on a SIDNet: same raw map as the unfused-stem network, and the weights
    (kernel parameters) are captured by value in a CUDA graph."""
    from sidnet.models.builders import sidnet
    from sidnet.models.fuse import StemConvActPool, fuse_for_inference

    torch.manual_seed(0)
    model = sidnet(anchors=[[1.0, 1.5], [3.0, 4.0], [7.0, 6.0]], input_size=128).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so the folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    fused = fuse_for_inference(model, kernel_stem=True, kernel_pool=True).cuda().half().to(
        memory_format=torch.channels_last)  # fmt: skip
    plain = fuse_for_inference(model, kernel_pool=True).cuda().half().to(memory_format=torch.channels_last)
    assert sum(isinstance(m, StemConvActPool) for m in fused.modules()) == 1
    x = _nhwc(torch.rand(4, 3, 128, 128, generator=_gen(9), device="cuda").half())
    s = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(s):
        fused(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        y = fused(x)
    x.copy_(_nhwc(torch.rand(4, 3, 128, 128, generator=_gen(10), device="cuda").half()))
    g.replay()
    with torch.no_grad():
        ref = plain(x)
    torch.cuda.synchronize()
    torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=2e-2)
