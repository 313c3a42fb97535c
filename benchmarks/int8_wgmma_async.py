"""What Triton makes of the INT8/FP8 convolution kernels for Hopper, compiled ahead of time on any machine (no GPU):
for each kernel, operand type and accumulate form, whether the warpgroup MMAs stay in flight across loop iterations
(``warp_group_dot_wait {pendings = 1}``) or each one is waited for (``pendings = 0``), whether A comes from shared
memory or through registers, and the loads (cp.async, TMA).

    python benchmarks/int8_wgmma_async.py [--out DIR]

Found with it (Triton 3.8, sm_90): INT8 ``tl.dot`` is always waited for; FP8 stays in flight only in the
``acc = tl.dot(a, b, acc)`` form and with e4m3-typed loads (a bitcast from int8 after the load, or ``acc +=
tl.dot(a, b)``, turns it off); a TMA box of several pixel rows reaches the MMA through registers.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sidnet.environment import environment, publish_report
from sidnet.kernels.int8 import triton_kernels as TK

TARGET = GPUTarget("cuda", 90, 32)


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            FORM: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    # The plainest GEMM loop, for the accumulate forms: FORM 0 ``acc = tl.dot(a, b, acc)``, 1 ``acc += tl.dot(a, b)``,
    # 2 the form 0 with int8 loads bitcast to e4m3.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32 if FP8 else tl.int32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + rn[None, :] * K + (k + rk)[:, None])
        if FORM == 2:
            a = a.to(tl.float8e4nv, bitcast=True)
            b = b.to(tl.float8e4nv, bitcast=True)
        if FORM == 1:
            acc += tl.dot(a, b)
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def _compile(fn, signature: dict, constants: dict, divisible: list[str], *, warps: int, stages: int):
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return triton.compile(ASTSource(fn, signature, constants, attrs=attrs), target=TARGET,
                          options={"num_warps": warps, "num_stages": stages})  # fmt: skip


def _facts(k) -> dict:
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    pend = sorted({int(p) for p in re.findall(r"pendings = (\d+)", ttgir)})
    dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
    a_smem = bool(dots) and all(re.search(r"warp_group_dot %\S+, %\S+, %\S+ .*: !ttg\.memdesc", d) for d in dots)
    return {"in_flight": max(pend, default=0) >= 1, "pendings": pend, "a_from": "shared" if a_smem else "registers",
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)), "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), "smem_bytes": k.metadata.shared}  # fmt: skip


def cases() -> list[tuple[str, object]]:
    out = []
    for fp8 in (False, True):
        ty = "*fp8e4nv" if fp8 else "*i8"
        for form, what in ((0, "acc = tl.dot(a, b, acc)"), (1, "acc += tl.dot(a, b)"), (2, "bitcast from int8")):
            if form == 2 and not fp8:
                continue
            sig = {"a_ptr": "*i8" if form == 2 else ty, "b_ptr": "*i8" if form == 2 else ty,
                   "c_ptr": "*fp32" if fp8 else "*i32", "M": "i32", "N": "i32", "K": "i32", "BM": "constexpr",
                   "BN": "constexpr", "BK": "constexpr", "FORM": "constexpr", "FP8": "constexpr"}  # fmt: skip
            out.append((f"GEMM loop, {'FP8' if fp8 else 'INT8'}, {what}", lambda sig=sig, form=form, fp8=fp8: _compile(
                _matmul, sig, {"BM": 128, "BN": 128, "BK": 128, "FORM": form, "FP8": fp8},
                ["a_ptr", "b_ptr", "c_ptr", "M", "N", "K"], warps=4, stages=3)))  # fmt: skip
    conv = ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "out_ptr", "M", "H", "W", "C", "HO", "WO", "CO", "stride", "pad",
            "out_scale", "ratio"]  # fmt: skip
    for fp8 in (False, True):
        ty = "*fp8e4nv" if fp8 else "*i8"
        sig = dict(zip(conv, [ty, ty, "*fp32", "*fp32", "*i8"] + ["i32"] * 9 + ["fp32", "fp32"], strict=True))
        const = {"KH": 3, "KW": 3, "RELU": True, "OUT_Q": True, "FP8": fp8, "GATHER": False, "EVEN_C": True, "POOL": 1,
                 "REQUANT": False, "BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8, "SPLIT": 1}  # fmt: skip
        sig.update({k: "constexpr" for k in const})
        out.append((f"conv, pointer kernel, {'FP8' if fp8 else 'INT8'} (128x256x128)", lambda sig=sig, const=const:
                    _compile(TK._conv_q8_kernel, sig, const, ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "out_ptr", "M",
                                                              "C", "CO"], warps=8, stages=3)))  # fmt: skip
    tma = ["x_desc", "w_desc", "scale_ptr", "bias_ptr", "out_ptr", "H", "W", "C", "HO", "WO", "CO", "tiles_h",
           "tiles_w", "num_m", "out_scale", "ratio"]  # fmt: skip
    for bh, bw in ((1, 128), (8, 16)):
        for fp8 in (False, True):
            e = "fp8e4nv" if fp8 else "i8"
            sig = dict(zip(tma, [f"tensordesc<{e}[1,{bh},{bw},128]>", f"tensordesc<{e}[128,128]>", "*fp32", "*fp32",
                                 "*i8"] + ["i32"] * 9 + ["fp32", "fp32"], strict=True))  # fmt: skip
            const = {"KH": 3, "KW": 3, "PAD": 1, "RELU": True, "OUT_Q": True, "FP8": fp8, "POOL": 1, "REQUANT": False,
                     "BH": bh, "BW": bw, "BN": 128, "BK": 128, "GROUP_M": 8}  # fmt: skip
            sig.update({k: "constexpr" for k in const})
            out.append((f"conv, TMA kernel, {bh}x{bw} pixel box, {'FP8' if fp8 else 'INT8'}",
                        lambda sig=sig, const=const: _compile(TK._conv_tma_kernel, sig, const,
                                                              ["scale_ptr", "bias_ptr", "out_ptr", "C", "CO"], warps=4,
                                                              stages=3)))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    env = environment(None)
    rows = []
    for name, build in cases():
        rows.append({"case": name, **_facts(build())})
    lines = [f"# Triton's Hopper code for the INT8/FP8 kernels (sm_90, compiled ahead of time, Triton "
             f"{triton.__version__})", "", f"{env['date']} · `{env['command']}`", "",
             "| kernel | MMAs in flight across iterations | pendings | A operand from | wgmma | cp.async | TMA "
             "| shared bytes |", "|---|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['case']} | {'yes' if r['in_flight'] else 'no'} | {r['pendings']} | {r['a_from']} | "
                     f"{r['wgmma']} | {r['cp_async']} | {r['tma']} | {r['smem_bytes']:,} |")  # fmt: skip
    publish_report(lines, out=args.out / "wgmma_async.md" if args.out else None,
                   payload={"env": env, "triton": triton.__version__, "rows": rows})


if __name__ == "__main__":
    main()
