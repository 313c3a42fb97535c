"""The fused INT8 first layer (:func:`sidnet.kernels.int8.stem_int8`, from the packed NHWC4 words and quantising the
float images on load) beside the three steps it replaces (quantise, the 3→32 conv through the gathered-reduction
kernel, the 2×2 max-pool) and cuDNN's FP16 conv + max-pool, at SIDNet's 416² shape, one run, one GPU; random
weights (speed does not depend on them), outputs checked equal.

    python benchmarks/int8_stem.py [--batches 64 1] [--size 416]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sidnet.environment import environment
from sidnet.kernels import int8 as K


def _ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    p.add_argument("--size", type=int, default=416)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/int8_stem.py needs a CUDA GPU")
    env = environment(torch.device("cuda"))
    print(f"# INT8 fused stem — {env['device']}, {env['date']}, torch {env['torch']}\n")
    print(
        "| batch | fused, packed ms | fused, float load ms | quantise + conv + pool ms | cuDNN FP16 conv + pool ms "
        "| packed / steps | packed / FP16 | equal |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randint(-127, 128, (32, 3, 3, 3), dtype=torch.int8, device="cuda", generator=g)
    scale = torch.rand(32, device="cuda", generator=g) * 1e-3 + 1e-4
    bias = torch.randn(32, device="cuda", generator=g) * 0.1
    wh = torch.randn(32, 3, 3, 3, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    for n in args.batches:
        x = torch.rand(n, 3, args.size, args.size, device="cuda", generator=g)
        xh = x.half().contiguous(memory_format=torch.channels_last)

        win = {p: K.stem_window_weights(w, pool=2, packed=p) for p in (True, False)}

        def fused(x=x, packed=True, win=win):
            return K.stem_int8(x, w, scale, bias, in_scale=1 / 127, pad=1, conv_scale=0.05, pool=2, pool_scale=0.06,
                               packed=packed, window=win[packed])  # fmt: skip

        def fused_float(x=x):
            return fused(x, packed=False)

        def steps(x=x):
            q = K.quantize(x.permute(0, 2, 3, 1), 1 / 127).contiguous()
            y = K.conv2d_int8(q, w, scale, bias, stride=1, pad=1, relu=True, out_scale=0.05)
            return K.maxpool2d_int8(y, kernel=2, stride=2, pad=0, in_scale=0.05, out_scale=0.06)

        def fp16(xh=xh):
            return F.max_pool2d(F.relu(F.conv2d(xh, wh, None, padding=1)), 2, 2)

        ref = steps().int()
        diffs = [(f().int() - ref).abs() for f in (fused, fused_float)]
        ok = all(bool(d.max() <= 1 and (d > 0).float().mean() < 1e-3) for d in diffs)
        same = torch.equal(fused(), fused_float())
        a, a2, b, c = _ms(fused), _ms(fused_float), _ms(steps), _ms(fp16)
        print(
            f"| {n} | {a:.3f} | {a2:.3f} | {b:.3f} | {c:.3f} | {a / b:.2f}x | {a / c:.2f}x | {ok} (max diff "
            f"{max(int(d.max()) for d in diffs)}; packed == float load: {same}) |"
        )


if __name__ == "__main__":
    main()
