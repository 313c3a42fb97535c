"""INT8 on the tensor cores (Triton kernels, :mod:`sidnet.runtime.backends.torch_int8`) beside the FP16 torch backend,
one run, one GPU: img/s at each batch (one CUDA graph per batch: network + decode), p50 latency, and where the INT8
time goes (each plan step timed alone, its TOPS and share of the INT8 dense peak). Two INT8 rows per batch: the
kernels' default configurations, and tuned (each layer's configuration timed on its first call: the pointer-gather
kernel beside the TMA kernel's tiles); FP8 (e4m3, the same calibration's ranges mapped onto ±448, tuned alike) beside
them. The per-layer table is the tuned INT8 network's, with what tuning measured and the FP8 kernel's time.

    python benchmarks/int8_tensorcores.py --onnx model_int8.onnx [--batches 1 64] --out DIR

``--onnx``: a 416² SIDNet INT8 export (``python -m export --precision int8``; ``fold_weight_quantize`` makes it 4x
smaller for the trip to the GPU machine). The FP16 row runs random weights of the same architecture (speed does not
depend on the values). Markdown table + JSON beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sidnet.environment import environment, publish_report
from sidnet.kernels import int8 as K
from sidnet.quant.int8_plan import QConv, QConvPool, conv_operands
from sidnet.runtime.artifact import ArtifactInfo
from sidnet.runtime.backends.torch import TorchBackend
from sidnet.runtime.backends.torch_int8 import Int8Backend
from sidnet.runtime.benchmark import build_random, median_ms, time_calls

INT8_DENSE_TOPS = {"H200": 1979.0, "H100": 1979.0}  # NVIDIA's dense INT8 tensor-core peak (SXM)


def _rate(backend, batch: int) -> dict:
    slot = backend.slot(backend.bucket(batch))
    iters = 200 if batch <= 8 else 50
    r = time_calls(lambda: backend.run(backend.bucket(batch)), batch=batch, iters=iters, lat_iters=50)
    del slot
    return r


def per_layer(backend: Int8Backend, batch: int, *, fp8_column: bool = True) -> list[dict]:
    """Each plan step alone (eager, CUDA events, median of 20) on the batch's real intermediate tensors."""
    net = backend.net
    x = backend.new_input(batch).uniform_()
    env = {net.plan.input: x.permute(0, 2, 3, 1)}
    rows = []
    for layer, step in zip(net.layers, net.plan.steps, strict=True):
        before = dict(env)
        ms = median_ms(lambda layer=layer, before=before: layer(dict(before)), 20)
        layer(env)
        row = {"step": step.name, "kind": type(step).__name__, "ms": ms}
        if isinstance(step, (QConv, QConvPool)):
            tiles, timings = K.last_launch()
            row["tiles"] = _tiles_name(tiles)
            pointer = [ms for t, ms in timings if not t.tma]
            tma = [ms for t, ms in timings if t.tma]
            if pointer:
                row["pointer_ms"] = min(pointer)
            if tma:
                row["tma_ms"] = min(tma)
            if fp8_column:
                row["fp8_ms"] = _fp8_ms(step, before, net.device)
            conv, k = (step, 1) if isinstance(step, QConv) else (step.conv, step.pool.kernel)
            out = env[step.out]  # with a fused pool, each output pixel is k² conv outputs
            ops = 2 * conv.macs_per_pixel * out.shape[0] * out.shape[1] * out.shape[2] * k * k
            kh, kw, c, co = conv.w.shape
            row.update(tops=ops / ms / 1e9, shape=f"{kh}x{kw} {c}->{co} @{out.shape[1] * k}x{out.shape[2] * k}"
                       + (f" + pool {k}" if k > 1 else ""))
        rows.append(row)
    return rows


def _fp8_ms(step, env: dict, dev: torch.device) -> float:
    """The same layer in FP8 (e4m3 operands from the int8 values, FP32 accumulation, e4m3 output), tuned alike."""
    conv, pool = (step, 1) if isinstance(step, QConv) else (step.conv, step.pool.kernel)
    w, scale, bias = conv_operands(conv, dev)
    x = env[step.x]
    if x.shape[-1] < 16:  # the stem: its fused INT8 kernel has no FP8 twin
        return float("nan")
    x8 = (x.float() * (448 / 127)).to(torch.float8_e4m3fn)
    w8 = (w.float() * (448 / 127)).to(torch.float8_e4m3fn)

    def run():
        K.conv2d_fp8(x8, w8, scale, bias, stride=conv.stride, pad=conv.pad, relu=conv.relu, out_scale=1.0, tune=True,
                     pool=pool)  # fmt: skip

    run()
    return median_ms(run, 20)


def _tiles_name(t) -> str:
    if t is None:
        return ""
    kind = f"tma {t.bh}x{t.bm // t.bh}" if t.tma else f"ptr {t.bm}"
    return f"{kind}·{t.bn}·{t.bk} w{t.warps}s{t.stages}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--layers-batch", type=int, default=64)
    p.add_argument("--out", type=Path)
    p.add_argument("--fp8-column", action="store_true", help="time each INT8 layer's FP8 twin alone as well (more "
                   "compiles; the FP8 network's own per-layer table is always there)")
    args = p.parse_args()
    dev = torch.device("cuda")
    env = environment(dev)
    base = Int8Backend(args.onnx, device="cuda", conf_thresh=0.3, topk=100, tune=False)
    int8 = Int8Backend(args.onnx, device="cuda", conf_thresh=0.3, topk=100, tune=True)
    fp8 = Int8Backend(args.onnx, device="cuda", conf_thresh=0.3, topk=100, tune=True, precision="fp8")
    size = int8.info.input_size
    model = build_random("sidnet", input_size=size)
    info = ArtifactInfo(path=Path("random"), backend="torch", input_size=size, class_names=["person"],
                        anchors=model.anchors.tolist(), conf_thresh=0.3, topk=100, model="sidnet")  # fmt: skip
    fp16 = TorchBackend(model, info, device="cuda", conf_thresh=0.3, topk=100)
    rows = []
    for b in args.batches:
        f = _rate(fp16, b)
        d = _rate(base, b)
        q = _rate(int8, b)
        e = _rate(fp8, b)
        rows.append({"batch": b, "fp16_img_s": f["img_s"], "fp16_p50_ms": f["p50_ms"], "int8_img_s": q["img_s"],
                     "int8_p50_ms": q["p50_ms"], "int8_vs_fp16": q["img_s"] / f["img_s"],
                     "int8_default_img_s": d["img_s"], "int8_default_p50_ms": d["p50_ms"], "fp8_img_s": e["img_s"],
                     "fp8_p50_ms": e["p50_ms"], "fp8_vs_fp16": e["img_s"] / f["img_s"]})  # fmt: skip
    layers = per_layer(int8, args.layers_batch, fp8_column=args.fp8_column)
    layers_fp8 = per_layer(fp8, args.layers_batch, fp8_column=False)
    peak = next((v for k, v in INT8_DENSE_TOPS.items() if k in env["device"]), None)
    total = sum(r["ms"] for r in layers)
    lines = [f"# INT8 tensor cores (Triton) vs FP16 torch backend — {env['device']}", "",
             f"{env['date']} · torch {env['torch']} · CUDA {env['cuda']} · Python {env['python']} · {size}² · "
             f"`{env['command']}`", "", f"INT8 plan: {int8.plan.summary()}; decode: {int8.decode}", "",
             "| batch | FP16 img/s | FP16 p50 ms | INT8 default tiles img/s | p50 ms | INT8 tuned img/s | p50 ms "
             "| tuned INT8 / FP16 | FP8 tuned img/s | p50 ms | FP8 / FP16 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['batch']} | {r['fp16_img_s']:,.0f} | {r['fp16_p50_ms']:.3f} | "
                     f"{r['int8_default_img_s']:,.0f} | {r['int8_default_p50_ms']:.3f} | {r['int8_img_s']:,.0f} | "
                     f"{r['int8_p50_ms']:.3f} | {r['int8_vs_fp16']:.2f}x | {r['fp8_img_s']:,.0f} | "
                     f"{r['fp8_p50_ms']:.3f} | {r['fp8_vs_fp16']:.2f}x |")  # fmt: skip
    lines += ["", f"## Where the INT8 time goes (batch {args.layers_batch}, each step alone, eager; sum "
              f"{total:.2f} ms)",
              "", "| step | kind | layer | ms | share | TOPS | of INT8 peak | configuration | tuning: best pointer ms "
              "| best TMA ms | FP8 (tuned) ms |", "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in layers:
        if r["ms"] < 0.002 and r["kind"] == "Layout":
            continue
        tops = f"{r['tops']:.0f}" if "tops" in r else "-"
        frac = f"{r['tops'] / peak:.0%}" if "tops" in r and peak else "-"
        ptr = f"{r['pointer_ms']:.3f}" if "pointer_ms" in r else "-"
        tma = f"{r['tma_ms']:.3f}" if "tma_ms" in r else "-"
        fp8 = f"{r['fp8_ms']:.3f}" if "fp8_ms" in r else "-"
        lines.append(f"| {r['step']} | {r['kind']} | {r.get('shape', '')} | {r['ms']:.3f} | {r['ms'] / total:.0%} | "
                     f"{tops} | {frac} | {r.get('tiles', '')} | {ptr} | {tma} | {fp8} |")  # fmt: skip
    total8 = sum(r["ms"] for r in layers_fp8)
    lines += ["", f"## Where the FP8 time goes (batch {args.layers_batch}, each step alone, eager; sum "
              f"{total8:.2f} ms)", "", "| step | kind | layer | ms | TFLOPS | of FP8 peak | configuration |",
              "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    for r in layers_fp8:
        if r["ms"] < 0.002 and r["kind"] == "Layout":
            continue
        tops = f"{r['tops']:.0f}" if "tops" in r else "-"
        frac = f"{r['tops'] / peak:.0%}" if "tops" in r and peak else "-"
        lines.append(f"| {r['step']} | {r['kind']} | {r.get('shape', '')} | {r['ms']:.3f} | {tops} | {frac} | "
                     f"{r.get('tiles', '')} |")  # fmt: skip
    publish_report(lines, out=args.out / "int8_tensorcores.md" if args.out else None,
                   payload={"env": env, "rows": rows, "layers": layers, "layers_fp8": layers_fp8,
                            "int8_peak_tops": peak})  # fmt: skip


if __name__ == "__main__":
    main()
