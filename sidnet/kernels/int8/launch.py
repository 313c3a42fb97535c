"""Launch configurations of the convolution kernels (:class:`Tiles`), the launch itself (:class:`Problem`), and the
per-launch tuning that picks the fastest configuration (like cuDNN's benchmark mode: the output never changes)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .triton_kernels import (
    TensorDescriptor,
    _conv_q8_kernel,
    _conv_tma_kernel,
    _split_epilogue_kernel,
    interpreting,
    triton,
)


@dataclass(frozen=True)
class Tiles:
    """A launch configuration of the convolution kernel: the output tile (bm pixels × bn channels), the reduction
    step bk, warps, software-pipeline stages and the grouped tile order's group height. ``tma``: the TMA kernel
    (stride 1; its tile is ``bh`` rows × ``bm // bh`` columns of one image, or ``bm`` consecutive pixels for a 1×1
    convolution without padding) instead of the pointer-gather kernel. ``split``: the pointer kernel's reduction
    split over that many programs per tile (split-K, INT8 without a fused pool), summed in an int32 workspace."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group: int = 8
    tma: bool = False
    bh: int = 1
    split: int = 1


def default_tiles(*, m: int, c: int, co: int, taps: int) -> Tiles:
    """The kernel's configuration for a layer (m output pixels, c → co channels, taps = KH·KW), from the per-layer
    sweep on an H100 (``benchmarks/int8_conv_sweep.py``, ``benchmarks/results/int8_tensorcores/``): 128-pixel tiles,
    256 channels wide for the 1024-channel 3×3s, 64 for the 1×1s, a 128-channel reduction step where the layer has
    it; 64×64 tiles where the big ones would leave most SMs idle (batch 1); small tiles in the interpreter."""
    if interpreting():
        return Tiles(32, 32, 32, 4, 1, 1)
    bk = 32 if c < 16 else min(128, max(32, triton.next_power_of_2(c)))
    if taps == 1:
        bn, bk = 64, min(bk, 64)
    else:
        bn = 256 if co >= 1024 else min(128, max(32, triton.next_power_of_2(co)))
    bm = 128
    if triton.cdiv(m, bm) * triton.cdiv(co, bn) < 264:  # under two waves of CTAs on a 132-SM GPU
        bm, bn = 64, min(bn, 64)
    return Tiles(bm, bn, bk, 8 if bm * bn >= 128 * 256 else 4, 3 if bk >= 128 else 4)


def conv_output_size(size: int, *, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def launch_conv(x, w, scale, bias, *, stride, pad, relu, out_scale, out_dtype, tiles, q_dtype, pool=1,
                pool_scale=None, tune=False) -> torch.Tensor:  # fmt: skip
    n, h, wd, c = x.shape
    co, kh, kw, _ = w.shape
    ho = conv_output_size(h, kernel=kh, stride=stride, pad=pad)
    wo = conv_output_size(wd, kernel=kw, stride=stride, pad=pad)
    out = torch.empty((n, ho // pool, wo // pool, co), dtype=q_dtype if out_scale is not None else out_dtype,
                      device=x.device)  # fmt: skip
    # FP8: the operands stay float8 tensors (the kernels load e4m3 directly: Triton keeps FP8 warpgroup MMAs in
    # flight across loop iterations, which it does not do for INT8), a quantised output is stored as its bit pattern
    dst = out.view(torch.int8) if out.dtype == q_dtype else out
    ratio = float(out_scale / pool_scale) if pool > 1 and pool_scale is not None else 1.0  # FP8: no second scale
    m = n * (ho // pool) * (wo // pool) * pool * pool  # the conv rows computed (with a pool: whole windows only)
    problem = Problem(x=x, w=w, scale=scale, bias=bias, out=dst, stride=stride, pad=pad, relu=relu,
                       out_scale=float(out_scale if out_scale is not None else 1.0), out_q=out_scale is not None,
                       fp8=q_dtype != torch.int8, pool=pool, ratio=ratio, ho=ho, wo=wo)  # fmt: skip
    t = tiles
    if t is None and tune:
        key = problem.key()
        t = _TUNED.get(key)
        if t is None and x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            t = _TUNED[key] = _tune(problem)
    if t is None:
        t = default_tiles(m=m, c=c, co=co, taps=kh * kw)
    problem.run(t)
    _LAST[0] = (problem.key(), t)
    return out


@dataclass
class Problem:
    """One convolution launch (operands, output and epilogue), runnable with any :class:`Tiles`."""

    x: torch.Tensor
    w: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    out: torch.Tensor
    stride: int
    pad: int
    relu: bool
    out_scale: float
    out_q: bool
    fp8: bool
    pool: int
    ratio: float
    ho: int
    wo: int

    def key(self) -> tuple:
        return (tuple(self.x.shape), tuple(self.w.shape), self.stride, self.pad, self.pool, self.out_q, self.fp8,
                self.ratio != 1.0, self.out.dtype, self.x.device.index)  # fmt: skip

    def flat(self) -> bool:
        """A 1×1, stride-1, unpadded convolution without a pool is a GEMM over the pixels: one row of ``bm``."""
        return self.w.shape[1] == self.w.shape[2] == 1 and self.pad == 0 and self.stride == 1 and self.pool == 1

    def run(self, t: Tiles) -> None:
        x, w, p = self.x, self.w, self.pool
        n, h, wd, c = x.shape
        co, kh, kw, _ = w.shape
        if t.bm % (p * p):
            raise ValueError(f"conv2d_int8: a {p}x{p} pool needs a tile height divisible by {p * p}, got {t}")
        common = dict(RELU=self.relu, OUT_Q=self.out_q, FP8=self.fp8, POOL=p, REQUANT=self.ratio != 1.0,
                      BN=t.bn, BK=t.bk, GROUP_M=t.group, num_warps=t.warps, num_stages=t.stages)  # fmt: skip
        if t.tma:
            why = tma_unsupported(c=c, taps=kh * kw, stride=self.stride, device=x.device)
            bh, bw = (1, t.bm) if self.flat() else (t.bh, t.bm // t.bh)
            if why or bh * bw != t.bm or bh % p or bw % p:
                raise ValueError(f"conv2d_int8: the TMA kernel cannot run {t} here ({why or 'tile shape'}); "
                                 "pass tiles=None for the default")  # fmt: skip
            if self.flat():
                x, n, h, wd, ho, wo = x.view(1, 1, n * h * wd, c), 1, 1, n * h * wd, 1, n * h * wd
            else:
                ho, wo = self.ho, self.wo
            tiles_h, tiles_w = triton.cdiv(ho, bh), triton.cdiv(wo, bw)
            num_m = n * tiles_h * tiles_w
            x_desc = TensorDescriptor.from_tensor(x, [1, bh, bw, t.bk])
            w_desc = TensorDescriptor.from_tensor(w.view(co, kh * kw * c), [t.bn, t.bk])
            grid = (num_m * triton.cdiv(co, t.bn),)
            _conv_tma_kernel[grid](x_desc, w_desc, self.scale, self.bias, self.out, h, wd, c, ho, wo, co, tiles_h,
                                   tiles_w, num_m, self.out_scale, self.ratio, KH=kh, KW=kw, PAD=self.pad, BH=bh,
                                   BW=bw, **common)  # fmt: skip
            return
        m = n * (self.ho // p) * (self.wo // p) * p * p
        grid = (triton.cdiv(m, t.bm) * triton.cdiv(co, t.bn), t.split)
        if t.split > 1:
            if p > 1 or self.fp8 or c < 16:
                raise ValueError(f"conv2d_int8: split-K runs INT8 without a fused pool on C >= 16, not {t}")
            acc = torch.zeros((m, co), dtype=torch.int32, device=x.device)
            _conv_q8_kernel[grid](x, w, self.scale, self.bias, acc, m, h, wd, c, self.ho, self.wo, co, self.stride,
                                  self.pad, self.out_scale, self.ratio, KH=kh, KW=kw, GATHER=False,
                                  EVEN_C=c % t.bk == 0, BM=t.bm, SPLIT=t.split, **common)  # fmt: skip
            _split_epilogue_kernel[(triton.cdiv(m, 64), triton.cdiv(co, 64))](
                acc, self.scale, self.bias, self.out, m, co, self.out_scale, RELU=self.relu, OUT_Q=self.out_q, BM=64,
                BN=64)  # fmt: skip
            return
        _conv_q8_kernel[grid](x, w, self.scale, self.bias, self.out, m, h, wd, c, self.ho, self.wo, co, self.stride,
                              self.pad, self.out_scale, self.ratio, KH=kh, KW=kw, GATHER=c < 16,
                              EVEN_C=c % t.bk == 0, BM=t.bm, **common)  # fmt: skip


_TUNED: dict[tuple, Tiles] = {}  # the measured fastest configuration per launch (see :func:`_tune`)
_TIMINGS: dict[tuple, list[tuple[Tiles, float]]] = {}  # what tuning measured: (configuration, ms) per launch
_LAST: list = [None]  # (launch key, configuration) of the latest convolution launch


def tma_unsupported(*, c: int, taps: int, stride: int, device: torch.device) -> str:
    """Why the TMA kernel cannot run this convolution here ('' when it can)."""
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if stride != 1:
        return f"stride {stride} (the TMA kernel is stride 1)"
    if c % 16:
        return f"{c} input channels (TMA rows must be multiples of 16 bytes)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "a GPU before Hopper (sm_90) has no TMA"
    if device.type != "cuda" and not interpreting():
        return "not a CUDA device"
    return ""


def candidate_tiles(*, n: int, ho: int, wo: int, c: int, co: int, taps: int, stride: int, pool: int,
                    device: torch.device) -> list[Tiles]:  # fmt: skip
    """The configurations :func:`_tune` times for one convolution (few: each is a compile on first use):

    - the pointer kernel's default (:func:`default_tiles`), and with too few output tiles to fill the GPU (batch 1)
      the same split over 2, 4 or 8 parts of the reduction;
    - TMA: a 1×1 as one GEMM over the pixels (128-pixel tiles, 64/128 channels wide and deep); a 3×3 in one-row
      blocks (an A box the warpgroup MMA reads straight from shared memory; a multi-row box is reshaped through
      registers, measured slower on the compiler's side) of 64 or 128 pixels when at most 40% of the rows fall past
      the image's edge; with a fused pool, the least wasteful block whose sides hold whole windows."""
    m = n * ho * wo
    base = default_tiles(m=m, c=c, co=co, taps=taps)
    out = [base]
    steps = taps * triton.cdiv(c, base.bk)
    if pool == 1 and c >= 16 and triton.cdiv(m, base.bm) * triton.cdiv(co, base.bn) < 132 and steps >= 16:
        # too few output tiles to fill a 132-SM GPU (batch 1): split the reduction, >= 8 steps per part
        out += [replace(base, split=k) for k in (2, 4, 8) if steps // k >= 8]
    if tma_unsupported(c=c, taps=taps, stride=stride, device=device):
        return out
    bk = min(128, triton.next_power_of_2(c))
    wide = max(32, triton.next_power_of_2(co))

    def tiles(bm: int, bn: int, k: int, bh: int) -> Tiles:
        return Tiles(bm, bn, k, 8 if bm * bn >= 128 * 256 else 4, 3 if k >= 128 else 4, tma=True, bh=bh)

    if taps == 1 and pool == 1:
        return out + [tiles(128, bn, k, 1) for bn in sorted({min(64, wide), min(128, wide)})
                      for k in sorted({min(64, bk), bk})]  # fmt: skip
    shapes = []
    for bm in (64, 128):
        for bh in (1, 2, 4, 8, 16, 32):
            bw = bm // bh
            used = (ho * wo) / (triton.cdiv(ho, bh) * bh * triton.cdiv(wo, bw) * bw)
            if bh % pool == 0 and bw % pool == 0 and bw >= 8 and used >= 0.6:
                shapes.append((used, bm, bh))
    if pool == 1:
        rows = [(u, bm, bh) for u, bm, bh in shapes if bh == 1]
        if rows:
            _, bm, _ = max(rows)
            out += [tiles(bm, bn, bk, 1) for bn in sorted({min(128, wide), min(256 if bm == 128 else 128, wide)})]
    elif shapes:
        _, bm, bh = max(shapes)
        out.append(tiles(bm, min(128, wide), bk, bh))
    return out


def _tune(problem: Problem, *, reps: int = 5) -> Tiles:
    """Time each of :func:`candidate_tiles` on this launch (after a compile-and-warm-up call) and return the
    fastest. Every candidate computes the same integers, so the choice changes speed, never the output."""
    x, w = problem.x, problem.w
    n, _, _, c = x.shape
    co, kh, kw, _ = w.shape
    cands = candidate_tiles(n=n, ho=problem.ho, wo=problem.wo, c=c, co=co, taps=kh * kw, stride=problem.stride,
                            pool=problem.pool, device=x.device)  # fmt: skip
    best, best_ms = cands[0], float("inf")
    timings = _TIMINGS[problem.key()] = []
    for t in cands:
        try:
            problem.run(t)
        except Exception:  # a configuration this GPU or Triton cannot compile (shared memory): not a candidate
            if t is cands[0]:
                raise
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            problem.run(t)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / reps
        timings.append((t, ms))
        if ms < best_ms:
            best, best_ms = t, ms
    return best


def last_launch() -> tuple[Tiles | None, list[tuple[Tiles, float]]]:
    """The configuration of the latest :func:`conv2d_int8`/:func:`conv2d_fp8` launch, and what tuning measured for
    that launch ((configuration, ms) per candidate; empty when it was not tuned): for per-layer reports."""
    if _LAST[0] is None:
        return None, []
    key, t = _LAST[0]
    return t, list(_TIMINGS.get(key, []))
