"""Time the ``csrc/stem`` kernel's build variants side by side (one run, one GPU) and check they agree bit for bit.

    python benchmarks/stem_variants.py --out benchmarks/results/deploy      # on the GPU machine (run_gpu.sh bench-stem)

Each variant is ``csrc/stem/stemKernel.cu`` compiled with other ``-D`` knobs (channels per launch, loop order, minimum
resident blocks) into its own small library; the library's default is whichever wins here. Also timed in the same run:
what the kernel replaces in the torch backend (cuDNN fused conv+bias+ReLU, then the ``csrc/maxpool`` kernel). SIDNet's
stem at 416², fp16, K = 32, batch 1 and 64; CUDA-event medians of the kernel launches only (no graph, no copies).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidnet.environment import environment  # noqa: E402
from sidnet.runtime.benchmark import median_ms  # noqa: E402

VARIANTS = {  # name → -D flags
    "G16 channel-outer": ["-DSIDNET_STEM_GROUP=16", "-DSIDNET_STEM_TAP_OUTER=0"],
    "G16 tap-outer": ["-DSIDNET_STEM_GROUP=16", "-DSIDNET_STEM_TAP_OUTER=1"],
    "G16 tap-outer minblocks 5": ["-DSIDNET_STEM_GROUP=16", "-DSIDNET_STEM_TAP_OUTER=1", "-DSIDNET_STEM_MIN_BLOCKS=5"],
    "G8 tap-outer": ["-DSIDNET_STEM_GROUP=8", "-DSIDNET_STEM_TAP_OUTER=1"],
    "G8 tap-outer minblocks 8": ["-DSIDNET_STEM_GROUP=8", "-DSIDNET_STEM_TAP_OUTER=1", "-DSIDNET_STEM_MIN_BLOCKS=8"],
}


def build_variant(flags: list[str], out: Path) -> ctypes.CDLL:
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    srcs = [str(ROOT / "csrc/stem/stemKernel.cu"), str(ROOT / "csrc/common/sidnetCommon.cu")]
    cmd = ["nvcc", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", f"-arch={arch}", "--resource-usage", *flags,
           *srcs, "-o", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    regs = sorted({line.split("Used ")[1].split(" registers")[0] for line in r.stderr.splitlines() if "Used " in line})
    lib = ctypes.CDLL(str(out))
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.stemConvActPool.argtypes = [vp, vp, i, i, i, i, i, vp, vp, i, ctypes.c_float, vp]
    lib.stemConvActPool.restype = i
    lib.regs = regs
    return lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/stem_variants"))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    args = p.parse_args()
    import sidnet.kernels as K

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (0.3 * torch.randn(32, 3, 3, 3, generator=g, device="cuda")).half()
    bias = (0.1 * torch.randn(32, generator=g, device="cuda")).half()
    host_w = weight.float().permute(0, 2, 3, 1).contiguous().cpu()
    host_b = bias.float().cpu()
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    rows, ref = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {name: build_variant(flags, Path(tmp) / f"v{i}.so") for i, (name, flags) in enumerate(VARIANTS.items())}
        for bs in args.batches:
            x = torch.rand(bs, 3, 416, 416, generator=g, device="cuda").half()
            x = x.contiguous(memory_format=torch.channels_last)
            out = torch.empty(bs, 32, 208, 208, dtype=torch.half, device=dev, memory_format=torch.channels_last)
            stream = torch.cuda.current_stream().cuda_stream

            def cudnn_then_pool(x=x):
                y = torch.cudnn_convolution_relu(x, w_cl, bias, (1, 1), (1, 1), (1, 1), 1)
                return K.maxpool2x2_nhwc(y)

            reps = 200 if bs == 1 else 50
            base = median_ms(cudnn_then_pool, reps)
            rows.append({"variant": "cuDNN conv+bias+ReLU, then csrc max-pool (replaced)", "batch": bs, "ms": base,
                         "regs": "", "same_bits": ""})  # fmt: skip
            expect = cudnn_then_pool()
            for name, lib in libs.items():
                def run(lib=lib, x=x, out=out, bs=bs, stream=stream):
                    err = lib.stemConvActPool(x.data_ptr(), out.data_ptr(), 1, bs, 416, 416, 32, host_w.data_ptr(),
                                              host_b.data_ptr(), 1, 0.0, stream)  # fmt: skip
                    assert err == 0, err

                ms = median_ms(run, reps)
                run()
                torch.cuda.synchronize()
                first = ref.setdefault(bs, out.clone())
                diff = (out.float() - expect.float()).abs().max().item()
                rows.append({"variant": name, "batch": bs, "ms": ms, "regs": "/".join(lib.regs),
                             "same_bits": bool(torch.equal(out, first)), "max_diff_vs_cudnn": diff})  # fmt: skip
    flop = 2 * 27 * 4 * 32 * 208 * 208  # per image: four 3x3x3 convolutions per pooled pixel and channel
    lines = [f"# csrc/stem variants — {environment(dev)['device']}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "SIDNet stem at 416², fp16, K = 32 (conv 3x3 + bias + ReLU + max-pool 2x2); median kernel time "
             "(CUDA events).", "",
             "| variant | batch | ms | TFLOP/s (fp32 FMA) | vs replaced | registers | bit-identical | max diff vs "
             "cuDNN |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        base = next(b["ms"] for b in rows if b["batch"] == r["batch"] and b["regs"] == "")
        tf = flop * r["batch"] / r["ms"] / 1e9
        lines.append(f"| {r['variant']} | {r['batch']} | {r['ms']:.4f} | {tf:.1f} | {base / r['ms']:.2f}x | "
                     f"{r['regs']} | {r['same_bits']} | {r.get('max_diff_vs_cudnn', '')} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stem_variants_h100.md").write_text(text)
    (args.out / "stem_variants_h100.json").write_text(json.dumps({"env": environment(dev), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
