"""The INT8 (and FP8) convolution kernel's launch configurations, layer by layer, beside cuDNN's FP16 convolution of
the same shape, one run, one GPU (issue 16): which tiles make each SIDNet layer fastest, how far that is from the
INT8 peak, and whether every chosen configuration is still exact.

    python benchmarks/int8_conv_sweep.py --onnx model_int8.onnx [--batch 64] [--fp8] --out DIR

For each INT8 convolution of the plan (:func:`sidnet.quant.int8_plan.plan_from_onnx`), at the plan's own shapes and
``--batch``: cuDNN FP16 (channels-last, the FP16 backend's convolution), the kernel at :func:`default_tiles`, and every
candidate configuration (median of CUDA-event timings, ``triton.testing.do_bench``); with ``--fp8`` the same kernel
on e4m3 operands. The best INT8 configuration of each layer is then checked against the exact integer reference at
batch 2 (INT32 accumulators equal). Markdown table + JSON (``int8_conv_sweep.{md,json}``) in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sidnet.environment import environment, publish_report
from sidnet.kernels import int8 as K
from sidnet.quant.int8_plan import QConv, plan_from_onnx

INT8_DENSE_TOPS = 1979.0  # H100/H200 SXM dense INT8 (and FP8) tensor-core peak

# (bm, bn, bk, warps, stages, group)
CANDIDATES = [
    (128, 128, 64, 4, 4, 8), (128, 128, 64, 8, 4, 8), (128, 128, 128, 8, 3, 8), (128, 128, 128, 4, 3, 8),
    (128, 256, 64, 8, 3, 8), (128, 256, 128, 8, 3, 8), (256, 128, 64, 8, 4, 8), (256, 128, 128, 8, 3, 8),
    (64, 128, 128, 4, 4, 8), (128, 64, 128, 4, 4, 8), (64, 64, 128, 4, 4, 8), (128, 32, 64, 4, 4, 8),
    (128, 64, 64, 4, 4, 8), (64, 32, 32, 4, 4, 8), (128, 32, 32, 4, 4, 8), (256, 32, 32, 8, 4, 8),
]


def candidates(c: int, co: int) -> list[K.Tiles]:
    """The candidates that fit the layer: no column tile wider than the layer's channels (rounded up to 32), no
    reduction step wider than one tap's channels (the gathered stem takes 32)."""
    bn_max = max(32, 1 << (co - 1).bit_length())
    bk_max = 32 if c < 16 else max(32, 1 << (c - 1).bit_length())
    return [K.Tiles(*t) for t in CANDIDATES if t[1] <= bn_max and t[2] <= bk_max]


def _ms(fn) -> float:
    if not torch.cuda.is_available():  # the Triton interpreter (TRITON_INTERPRET=1): a smoke run, not a timing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layer(step: QConv, shape_in: tuple, batch: int, *, fp8: bool) -> dict:
    h, w_, c = shape_in
    kh, kw, _, co = step.w.shape
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(-128, 128, (batch, h, w_, c), dtype=torch.int8, device=dev, generator=g)
    wq = torch.randint(-127, 128, (co, kh, kw, c), dtype=torch.int8, device=dev, generator=g)
    scale = torch.full((co,), 1e-5, device=dev)
    bias = torch.zeros(co, device=dev)
    kw_ = dict(stride=step.stride, pad=step.pad, relu=step.relu, out_scale=0.05)
    ho = K.conv_output_size(h, kernel=kh, stride=step.stride, pad=step.pad)
    wo = K.conv_output_size(w_, kernel=kw, stride=step.stride, pad=step.pad)
    m = batch * ho * wo
    ops = 2.0 * m * kh * kw * c * co
    half = torch.float16 if dev.type == "cuda" else torch.float32
    xh = torch.randn(batch, c, h, w_, device=dev, dtype=half).contiguous(memory_format=torch.channels_last)
    wh = torch.randn(co, c, kh, kw, device=dev, dtype=half).contiguous(memory_format=torch.channels_last)
    bh = torch.zeros(co, device=dev, dtype=half)
    label = f"{kh}x{kw} {c}->{co} @{ho}x{wo}" + (f" s{step.stride}" if step.stride > 1 else "")
    row = {"layer": step.name, "shape": label, "m": m, "gops": ops / 1e9,
           "fp16_ms": _ms(lambda: F.relu(F.conv2d(xh, wh, bh, stride=step.stride, padding=step.pad)))}
    default = K.default_tiles(m=m, c=c, co=co, taps=kh * kw)
    row["default"] = list(default.__dict__.values())
    row["default_ms"] = _ms(lambda: K.conv2d_int8(x, wq, scale, bias, **kw_))
    tried = [(row["default_ms"], default)]
    for t in candidates(c, co):
        if t == default:
            continue
        try:
            tried.append((_ms(lambda t=t: K.conv2d_int8(x, wq, scale, bias, tiles=t, **kw_)), t))
        except Exception as e:  # noqa: BLE001 - a configuration the compiler or the GPU refuses (shared memory)
            print(f"  {step.name} {t}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    best_ms, best = min(tried, key=lambda p: p[0])
    row.update(int8_ms=best_ms, int8=list(best.__dict__.values()), int8_tops=ops / best_ms / 1e9,
               all_int8={str(list(t.__dict__.values())): round(ms, 4) for ms, t in tried})
    # exactness of the chosen configuration (batch 2): INT32 accumulators through a float32 store
    xs, ones, zeros = x[:2].contiguous(), torch.ones(co, device=dev), torch.zeros(co, device=dev)
    acc = K.conv2d_int8(xs, wq, ones, zeros, stride=step.stride, pad=step.pad, relu=False, out_scale=None,
                        out_dtype=torch.float32, tiles=best)  # fmt: skip
    ref = F.conv2d(xs.permute(0, 3, 1, 2).double(), wq.permute(0, 3, 1, 2).double(), stride=step.stride,
                   padding=step.pad).permute(0, 2, 3, 1)  # fmt: skip
    row["exact"] = bool(ref.abs().max() < 2**24 and torch.equal(acc.double(), ref))
    if fp8 and dev.type == "cuda":
        x8 = torch.randn(x.shape, device=dev).to(torch.float8_e4m3fn)
        w8 = (torch.randn(wq.shape, device=dev) * 0.1).to(torch.float8_e4m3fn)
        f8 = []
        for t in candidates(c, co):
            try:
                f8.append((_ms(lambda t=t: K.conv2d_fp8(x8, w8, scale, bias, tiles=t, **kw_)), t))
            except Exception as e:  # noqa: BLE001
                print(f"  fp8 {step.name} {t}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        if f8:
            ms, t = min(f8, key=lambda p: p[0])
            row.update(fp8_ms=ms, fp8=list(t.__dict__.values()), fp8_tflops=ops / ms / 1e9)
    return row


def _shapes(plan, size: int) -> dict[str, tuple]:
    """Each tensor's NHWC shape (without the batch) by running the plan's shape arithmetic on a 1-image input."""
    from sidnet.quant.int8_plan import Int8Network

    net = Int8Network(plan, device=_device(), dtype=torch.float32)
    env = {plan.input: torch.rand(1, 3, size, size, device=_device()).permute(0, 2, 3, 1)}
    shapes = {}
    with torch.no_grad():
        for layer, step in zip(net.layers, net.plan.steps, strict=True):
            if isinstance(step, QConv):
                shapes[step.name] = tuple(env[step.x].shape[1:])
            layer(env)
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=416, help="the export's input size")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--out", type=Path, default=Path("outputs/int8_conv_sweep"))
    args = p.parse_args()
    if not K.available(_device()):
        raise SystemExit("error: int8_conv_sweep needs a CUDA GPU (or TRITON_INTERPRET=1 for a smoke run on a CPU)")
    plan = plan_from_onnx(args.onnx)
    shapes = _shapes(plan, args.size)
    rows = []
    for step in plan.steps:
        if isinstance(step, QConv) and step.name in shapes:  # the fused stem is timed by int8_tensorcores.py
            rows.append(_layer(step, shapes[step.name], args.batch, fp8=args.fp8))
            r = rows[-1]
            print(f"{r['layer']:>14} {r['shape']:<24} fp16 {r['fp16_ms']:.3f} default {r['default_ms']:.3f} "
                  f"best {r['int8_ms']:.3f} {r['int8']} {r['int8_tops']:.0f} TOPS exact={r['exact']}"
                  + (f" fp8 {r['fp8_ms']:.3f} {r['fp8']}" if "fp8_ms" in r else ""), flush=True)
    env = environment(_device())
    tot = {k: sum(r[k] for r in rows if k in r) for k in ("fp16_ms", "default_ms", "int8_ms", "fp8_ms")}
    lines = [f"# INT8 convolution kernel: configurations per layer — {env['device']}", "",
             f"{env['date']} · torch {env['torch']} · CUDA {env['cuda']} · batch {args.batch} · `{env['command']}`", "",
             "| layer | shape | GOP | cuDNN FP16 ms | INT8 default ms | INT8 best ms | best (bm, bn, bk, warps, "
             "stages, group) | INT8 TOPS | of peak | exact | FP8 best ms |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['gops']:.1f} | {r['fp16_ms']:.3f} | {r['default_ms']:.3f} | "
                     f"{r['int8_ms']:.3f} | {tuple(r['int8'])} | {r['int8_tops']:.0f} | "
                     f"{r['int8_tops'] / INT8_DENSE_TOPS:.0%} | {r['exact']} | {r.get('fp8_ms', float('nan')):.3f} |")
    lines += ["", f"Sum over the INT8 convolutions: cuDNN FP16 {tot['fp16_ms']:.2f} ms, INT8 default "
                  f"{tot['default_ms']:.2f} ms, INT8 best {tot['int8_ms']:.2f} ms"
              + (f", FP8 best {tot['fp8_ms']:.2f} ms" if tot["fp8_ms"] else "") + "."]
    publish_report(lines, out=args.out / "int8_conv_sweep.md", payload={"env": env, "rows": rows})


if __name__ == "__main__":
    main()
