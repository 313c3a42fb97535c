"""A Q/DQ ONNX (``python -m export --precision int8``) → a plan of INT8 tensor-core layers, and its executor.

The plan keeps the export's own numbers: per-output-channel weight scales and per-tensor activation scales are read
from the graph's ``QuantizeLinear``/``DequantizeLinear`` nodes (the same scales the calibration cache and a TensorRT
engine carry, PTQ or QAT), the weights are quantised exactly as ``QuantizeLinear`` does (round half to even,
saturate), and every layer the accuracy gate kept out of INT8 stays a float layer.

What becomes what:

- ``DQ(x) → Conv(DQ(w)) [→ Relu]`` → :class:`QConv`: INT8 × INT8 → INT32 with bias, ReLU and the next
  ``QuantizeLinear`` fused into the epilogue when the output's only way on is that ``Q`` (directly, or through the
  layout ops below), else a float output;
- ``DQ(x) → MaxPool → Q`` → :class:`QMaxPool` on int8 (requantised when the two scales differ);
- ``SpaceToDepth`` (the reorg) and ``Concat`` on int8 tensors of one scale (quantisation commutes with moving bytes);
- ``Q`` of a float tensor (the input images) → :class:`Quantize`; a float ``Conv`` (the kept output layer) →
  :class:`FloatConv`, reading a dequantised input when it needs one.

Activations are NHWC throughout (``(N, H, W, C)`` tensors): the layout the tensor-core kernels read. The plan ends at
the region head's raw output (the tensor ``raw``); the runtime's decode kernel takes it from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sidnet.kernels import int8 as K

LAYOUT_OPS = ("SpaceToDepth", "Concat")
RAW = "raw"  # the region head's output, named by the export's surgery


class Int8PlanError(ValueError):
    """The ONNX is not a Q/DQ graph this planner can run (one line: what and where)."""


@dataclass
class QConv:
    name: str
    x: str
    x_scale: float
    w: np.ndarray  # int8 (KH, KW, C, CO)
    w_scale: np.ndarray  # float32 (CO,)
    bias: np.ndarray  # float32 (CO,)
    stride: int
    pad: int
    relu: bool
    out: str
    out_scale: float | None  # int8 output at this scale, or None: float output

    @property
    def macs_per_pixel(self) -> int:
        kh, kw, c, co = self.w.shape
        return kh * kw * c * co


@dataclass
class QMaxPool:
    name: str
    x: str
    kernel: int
    stride: int
    pad: int
    in_scale: float
    out: str
    out_scale: float


@dataclass
class Layout:
    name: str
    op: str  # SpaceToDepth | Concat
    xs: list[str]
    out: str
    block: int = 0


@dataclass
class Quantize:
    name: str
    x: str
    scale: float
    out: str


@dataclass
class Dequantize:
    name: str
    x: str
    scale: float
    out: str


@dataclass
class FloatPool:
    name: str
    x: str
    kernel: int
    stride: int
    pad: int
    out: str


@dataclass
class FloatConv:
    name: str
    x: str
    x_scale: float | None  # the input is int8 at this scale (dequantised first), or None: a float input
    w: np.ndarray  # float32 (CO, C, KH, KW)
    bias: np.ndarray | None
    stride: int
    pad: int
    relu: bool
    out: str


@dataclass
class QStem:
    """``Quantize → QConv (few input channels, stride 1, ReLU) → QMaxPool (k = stride, no padding)`` as one step
    (:func:`fuse_stem`; :func:`sidnet.kernels.int8.stem_int8`): the same arithmetic, one kernel."""

    name: str
    x: str
    in_scale: float
    conv: QConv
    pool: QMaxPool
    out: str


@dataclass
class QConvPool:
    """``QConv (int8 out) → (Alias) → QMaxPool (k = stride, no padding)`` as one step (:func:`fuse_pools`): the max
    of each window's INT32 sums, one epilogue, only the pooled int8 tensor written."""

    name: str
    x: str
    conv: QConv
    pool: QMaxPool
    out: str


Step = QConv | QMaxPool | Layout | Quantize | Dequantize | FloatPool | FloatConv | QStem | QConvPool


@dataclass
class Int8Plan:
    source: str
    input: str
    steps: list[Step]
    output: str = RAW
    kept_float: list[str] = field(default_factory=list)

    def summary(self) -> str:
        q = sum(isinstance(s, QConv) for s in self.steps)
        fused = sum(isinstance(s, QConv) and s.out_scale is not None for s in self.steps)
        return (f"{q} INT8 convs ({fused} with the next layer's requantisation fused), "
                f"{sum(isinstance(s, QMaxPool) for s in self.steps)} INT8 max-pools, "
                f"{sum(isinstance(s, QStem) for s in self.steps)} fused stem (quantise + conv + max-pool), "
                f"{sum(isinstance(s, QConvPool) for s in self.steps)} convs with their max-pool fused, "
                f"{sum(isinstance(s, Layout) and s.op != 'Alias' for s in self.steps)} layout ops, float layers kept: "
                f"{', '.join(self.kept_float) or 'none'}")  # fmt: skip


def quantize_weight(w: np.ndarray, scale: np.ndarray, *, axis: int) -> np.ndarray:
    """``QuantizeLinear`` of a float weight (zero point 0): ``clip(round_half_even(w / scale), -128, 127)`` as int8,
    ``scale`` per slice along ``axis`` (or one scalar)."""
    scale = np.asarray(scale, np.float32)
    if scale.ndim:
        shape = [1] * w.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return np.clip(np.rint(w.astype(np.float32) / scale), -128, 127).astype(np.int8)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_geometry(node, where: str) -> tuple[int, int, int]:
    a = _attrs(node)
    ks = list(a.get("kernel_shape", []))
    strides, pads = list(a.get("strides", [1, 1])), list(a.get("pads", [0, 0, 0, 0]))
    dil, group = list(a.get("dilations", [1, 1])), int(a.get("group", 1))
    if (len(set(strides)) != 1 or len(set(pads)) != 1 or set(dil) != {1} or group != 1
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or (ks and len(set(ks)) != 1)):  # fmt: skip
        raise Int8PlanError(f"{where}: {node.op_type} {node.name} has strides {strides}, pads {pads}, dilations "
                            f"{dil}, group {group}: the INT8 planner takes square, symmetric, dense (group 1) "
                            "layers only")  # fmt: skip
    return (ks[0] if ks else 0), strides[0], pads[0]


def _readers(steps: list[Step]) -> set[str]:
    return {x for s in steps for x in (s.xs if isinstance(s, Layout) else [getattr(s, "x", None)])}


def _pool_after(steps: list[Step], j: int, *, output: str) -> tuple[QMaxPool, int] | None:
    """``steps[j]``, a :class:`QConv` with an int8 output, then (an Alias and) a k×k stride-k unpadded
    :class:`QMaxPool` at the conv's scale, with nothing else reading the tensors in between: the pool and the index
    after it; else ``None``."""
    conv = steps[j]
    if not (isinstance(conv, QConv) and conv.out_scale is not None):
        return None
    inner, k = [conv.out], j + 1
    if k < len(steps) and isinstance(steps[k], Layout) and steps[k].op == "Alias" and steps[k].xs == [conv.out]:
        inner.append(steps[k].out)
        k += 1
    pool = steps[k] if k < len(steps) else None
    if not (isinstance(pool, QMaxPool) and pool.x == inner[-1] and pool.kernel == pool.stride and pool.pad == 0
            and pool.kernel > 1 and pool.in_scale == conv.out_scale):  # fmt: skip
        return None
    if _readers(steps[:j] + steps[k + 1 :]) & set(inner) or output in inner:
        return None
    return pool, k + 1


def fuse_stem(steps: list[Step], *, output: str) -> list[Step]:
    """The first ``Quantize → QConv → (Alias) → QMaxPool`` run as one :class:`QStem` where nothing else reads the
    tensors in between and the shapes suit the fused kernel (at most 4 input channels, stride 1, ReLU, a k×k
    stride-k pool); otherwise the steps unchanged."""
    for i, q in enumerate(steps[:-2]):
        if not isinstance(q, Quantize):
            continue
        conv = steps[i + 1]
        if not (isinstance(conv, QConv) and conv.x == q.out and conv.w.shape[2] <= 4 and conv.stride == 1
                and conv.relu):  # fmt: skip
            return steps
        found = _pool_after(steps, i + 1, output=output)
        if found is None or q.out in _readers(steps[: i + 1] + steps[i + 2 :]) or q.out == output:
            return steps
        pool, end = found
        stem = QStem(name=f"{conv.name}+{pool.name}", x=q.x, in_scale=q.scale, conv=conv, pool=pool, out=pool.out)
        return [*steps[:i], stem, *steps[end:]]
    return steps


def fuse_pools(steps: list[Step], *, output: str) -> list[Step]:
    """Every ``QConv (int8 out) → (Alias) → QMaxPool`` (k×k, stride k, unpadded, nothing else reading the conv's
    output) as one :class:`QConvPool`: the pooled tensor is the only one written."""
    out, j = [], 0
    while j < len(steps):
        found = _pool_after(steps, j, output=output)
        if found is None:
            out.append(steps[j])
            j += 1
            continue
        conv, (pool, end) = steps[j], found
        out.append(QConvPool(name=f"{conv.name}+{pool.name}", x=conv.x, conv=conv, pool=pool, out=pool.out))
        j = end
    return out


def plan_from_onnx(path: str | Path) -> Int8Plan:
    """Read a Q/DQ ONNX export and plan it. Raises :class:`Int8PlanError` for graphs outside the supported set."""
    from onnx import numpy_helper

    from sidnet.safety import load_onnx

    path = Path(path)
    model = load_onnx(path, what="INT8 ONNX", fix="pass the model.onnx of a python -m export --precision int8 run")
    g = model.graph
    where = str(path)
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    if RAW not in prod:
        raise Int8PlanError(f"{where} has no tensor {RAW!r} (the region head's output): the INT8 torch backend runs "
                            "SIDNet/YOLOv2 Q/DQ exports; use --backend onnxruntime for this file")  # fmt: skip
    if not any(n.op_type == "QuantizeLinear" for n in g.node):
        raise Int8PlanError(f"{where} has no QuantizeLinear nodes: it is not an INT8 Q/DQ export; export with "
                            "--precision int8, or run it with --backend onnxruntime")  # fmt: skip
    # The nodes that lead to raw, in graph (topological) order.
    needed, todo = set(), [RAW]
    while todo:
        t = todo.pop()
        n = prod.get(t)
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            todo += list(n.input)
    nodes = [n for n in g.node if id(n) in needed]
    inputs = [i.name for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise Int8PlanError(f"{where} has inputs {inputs}; one image input is expected")

    def scale_of(node) -> float:
        s, zp = inits[node.input[1]], inits.get(node.input[2]) if len(node.input) > 2 else None
        if zp is not None and (np.any(zp != 0) or zp.dtype != np.int8):
            raise Int8PlanError(f"{where}: {node.op_type} {node.name} has zero point {zp.ravel()[:4]} ({zp.dtype}); "
                                "only symmetric int8 (zero point 0) runs on the INT8 tensor cores")  # fmt: skip
        return s

    # Which float tensors can be produced directly as int8 at one scale (their only way on is one Q, possibly
    # through layout ops): reverse order, so a layout op's output is known before its inputs.
    target: dict[str, float] = {}
    for n in reversed(nodes):
        for t in n.output:
            users = [u for u in cons.get(t, []) if id(u) in needed]
            if not users:
                continue
            if all(u.op_type == "QuantizeLinear" for u in users):
                scales = {float(scale_of(u)) for u in users}
                if len(scales) == 1 and all(np.ndim(inits[u.input[1]]) == 0 for u in users):
                    target[t] = scales.pop()
            elif all(u.op_type in LAYOUT_OPS for u in users):
                outs = {target.get(u.output[0]) for u in users}
                if len(outs) == 1 and None not in outs:
                    target[t] = outs.pop()

    steps: list[Step] = []
    kept_float: list[str] = []
    q8: dict[str, float] = {inputs[0]: None}  # tensor → scale of its int8 realisation (None: it is float)
    dq: dict[str, tuple[str, float]] = {}  # DequantizeLinear output → (int8 tensor, scale)
    wq: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # quantised weight (DQ output) → (int8 OIHW, per-channel scale)
    fused: set[int] = set()

    def realise(t: str) -> tuple[str, float | None]:
        if t in dq:
            return dq[t]
        if t not in q8:
            raise Int8PlanError(f"{where}: tensor {t!r} is produced by an op the INT8 planner does not run")
        return t, q8[t]

    for n in nodes:
        if id(n) in fused:
            continue
        op = n.op_type
        if op == "QuantizeLinear":
            x, s = n.input[0], scale_of(n)
            if x in inits:  # a weight: its int8 values, read by the DequantizeLinear after it like an int8 initializer
                inits[n.output[0]] = quantize_weight(inits[x], s, axis=int(_attrs(n).get("axis", 1)))
                continue
            src, src_scale = realise(x)
            if src_scale is not None:  # already int8 (produced at this Q's scale by the layer before)
                if not np.isclose(src_scale, float(s), rtol=0, atol=0):
                    raise Int8PlanError(f"{where}: {n.name} requantises {x!r} from {src_scale} to {float(s)}")
                q8[n.output[0]] = src_scale
                steps.append(Layout(n.name, "Alias", [src], n.output[0]))
            else:
                steps.append(Quantize(n.name, src, float(s), n.output[0]))
                q8[n.output[0]] = float(s)
        elif op == "DequantizeLinear":
            x = n.input[0]
            if x in inits and inits[x].dtype == np.int8:  # a weight (quantised above, or by fold_weight_quantize)
                s_w = np.asarray(scale_of(n), np.float32)
                wq[n.output[0]] = (inits[x], np.broadcast_to(s_w, (inits[x].shape[0],)).copy())
            else:
                src, src_scale = realise(x)
                dq[n.output[0]] = (src, float(scale_of(n)) if src_scale is None else src_scale)
        elif op == "Conv":
            k, stride, pad = _conv_geometry(n, where)
            out, relu = n.output[0], False
            users = [u for u in cons.get(out, []) if id(u) in needed]
            if len(users) == 1 and users[0].op_type == "Relu":
                fused.add(id(users[0]))
                out, relu = users[0].output[0], True
            bias = inits[n.input[2]].astype(np.float32) if len(n.input) > 2 and n.input[2] else None
            x_int8 = n.input[0] in dq
            if x_int8 and n.input[1] in wq:  # the INT8 layer
                src, x_scale = dq[n.input[0]]
                w_q, w_s = wq[n.input[1]]
                co = w_q.shape[0]
                steps.append(QConv(n.name, src, float(x_scale), np.ascontiguousarray(w_q.transpose(2, 3, 1, 0)),
                                   w_s.astype(np.float32), bias if bias is not None else np.zeros(co, np.float32),
                                   stride, pad, relu, out, target.get(out)))  # fmt: skip
                q8[out] = target.get(out)
            elif n.input[1] in inits:  # a layer kept in float
                src, x_scale = dq[n.input[0]] if x_int8 else realise(n.input[0])
                steps.append(FloatConv(n.name, src, x_scale, inits[n.input[1]].astype(np.float32), bias, stride, pad,
                                       relu, out))  # fmt: skip
                kept_float.append(n.name)
                q8[out] = None
            else:
                raise Int8PlanError(f"{where}: Conv {n.name} has a quantised input but float weights (or the reverse "
                                    "through an op the planner does not know)")  # fmt: skip
        elif op == "MaxPool":
            a = _attrs(n)
            ks, strides, pads = a.get("kernel_shape"), a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0])
            if n.input[0] not in dq:  # a float pool between float layers
                src, x_scale = realise(n.input[0])
                if x_scale is not None:
                    raise Int8PlanError(f"{where}: MaxPool {n.name} reads an int8 tensor without a DequantizeLinear")
                steps.append(FloatPool(n.name, src, ks[0], strides[0], pads[0], n.output[0]))
                q8[n.output[0]] = None
                continue
            if len(set(ks)) != 1 or len(set(strides)) != 1 or len(set(pads)) != 1:
                raise Int8PlanError(f"{where}: MaxPool {n.name} is not a square int8 pool (input quantised: "
                                    f"{n.input[0] in dq}, kernel {ks}, strides {strides}, pads {pads})")  # fmt: skip
            src, s_in = dq[n.input[0]]
            s_out = target.get(n.output[0])
            if s_out is None:  # a float consumer next (a layer kept out of INT8): pool, then dequantise
                steps.append(QMaxPool(n.name, src, ks[0], strides[0], pads[0], s_in, n.output[0] + "@int8", s_in))
                steps.append(Dequantize(n.name + "@dq", n.output[0] + "@int8", s_in, n.output[0]))
                q8[n.output[0]] = None
            else:
                steps.append(QMaxPool(n.name, src, ks[0], strides[0], pads[0], s_in, n.output[0], s_out))
                q8[n.output[0]] = s_out
        elif op in LAYOUT_OPS:
            xs = [realise(i) for i in n.input]
            scales = {s for _, s in xs}
            if len(scales) != 1:  # int8 at several scales, or int8 beside float: join in float
                for k, (t, sc) in enumerate(xs):
                    if sc is not None:
                        steps.append(Dequantize(f"{n.name}@dq{k}", t, sc, f"{t}@float"))
                        xs[k] = (f"{t}@float", None)
                scales = {None}
            if op == "Concat" and int(_attrs(n).get("axis", 1)) != 1:
                raise Int8PlanError(f"{where}: Concat {n.name} is not along channels")
            block = int(_attrs(n).get("blocksize", 0)) if op == "SpaceToDepth" else 0
            steps.append(Layout(n.name, op, [t for t, _ in xs], n.output[0], block))
            q8[n.output[0]] = scales.pop()
        elif op == "Relu":
            raise Int8PlanError(f"{where}: Relu {n.name} does not follow a Conv; the INT8 planner fuses ReLU only")
        else:
            raise Int8PlanError(f"{where}: op {op} ({n.name}) before {RAW!r} is outside the INT8 planner's set "
                                "(Q/DQ, Conv, Relu, MaxPool, SpaceToDepth, Concat)")  # fmt: skip
    if q8.get(RAW, 0.0) is not None:
        raise Int8PlanError(f"{where}: {RAW!r} is not a float output")
    return Int8Plan(source=where, input=inputs[0], steps=steps, kept_float=kept_float)


def fold_weight_quantize(path: str | Path, out: str | Path) -> Path:
    """Write ``path``'s Q/DQ graph with each weight stored as its int8 values (``QuantizeLinear`` of a float
    initializer replaced by the int8 initializer it computes, rounding half to even like the op): the same network,
    a quarter of the bytes (a 416² SIDNet: 202 MB → 51 MB), still a standard Q/DQ ONNX that onnxruntime and TensorRT
    read."""
    import onnx
    from onnx import numpy_helper

    from sidnet.safety import load_onnx

    model = load_onnx(path, what="INT8 ONNX", fix="pass the model.onnx of a python -m export --precision int8 run")
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep, new_inits, dropped = [], [], set()
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == 1:
            q = quantize_weight(numpy_helper.to_array(inits[n.input[0]]), numpy_helper.to_array(inits[n.input[1]]),
                                axis=int(_attrs(n).get("axis", 1)))  # fmt: skip
            new_inits.append(numpy_helper.from_array(q, n.output[0]))
            dropped.add(n.input[0])
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    remaining = [i for i in g.initializer if i.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(remaining + new_inits)
    onnx.checker.check_model(model)
    out = Path(out)
    onnx.save(model, str(out))
    return out


FP8_PER_INT8 = 127.0 / 448.0  # an e4m3 scale per int8 scale: the same calibrated range, |x| <= 448 instead of 127


def to_fp8(plan: Int8Plan) -> Int8Plan:
    """The plan in FP8 (e4m3) terms: every activation and weight scale times 127/448, so each calibrated range
    (``amax = 127 · s``) maps onto e4m3's ±448; the steps, weights (still int8, re-coded by :func:`conv_operands`)
    and the layers kept in float are the same. Run it with ``Int8Network(..., precision="fp8")``."""
    f = FP8_PER_INT8

    def conv(s: QConv) -> QConv:
        return replace(s, x_scale=s.x_scale * f, w_scale=(s.w_scale * f).astype(np.float32),
                       out_scale=None if s.out_scale is None else s.out_scale * f)  # fmt: skip

    steps: list[Step] = []
    for s in plan.steps:
        if isinstance(s, QConv):
            s = conv(s)
        elif isinstance(s, QMaxPool):
            s = replace(s, in_scale=s.in_scale * f, out_scale=s.out_scale * f)
        elif isinstance(s, (Quantize, Dequantize)):
            s = replace(s, scale=s.scale * f)
        elif isinstance(s, FloatConv) and s.x_scale is not None:
            s = replace(s, x_scale=s.x_scale * f)
        elif isinstance(s, (QStem, QConvPool)):
            raise Int8PlanError("to_fp8 takes an unfused plan (plan_from_onnx's); Int8Network fuses afterwards")
        steps.append(s)
    return replace(plan, steps=steps)


def conv_operands(s: QConv, dev: torch.device, *, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A QConv's kernel operands on ``dev``: int8 weights (CO, KH, KW, C), the float32 epilogue scale
    ``s_x · s_w[co]`` and the bias. ``fp8``: the weights as e4m3 (``w_q · 448/127``: a :func:`to_fp8` plan's
    per-channel scales make that the same float weight)."""
    w = torch.from_numpy(np.ascontiguousarray(s.w.transpose(3, 0, 1, 2))).to(dev)
    if fp8:
        w = (w.float() / FP8_PER_INT8).to(torch.float8_e4m3fn)
    scale = torch.from_numpy((s.x_scale * s.w_scale.astype(np.float64)).astype(np.float32)).to(dev)
    return w, scale, torch.from_numpy(s.bias).to(dev)


class Int8Network(torch.nn.Module):
    """Runs an :class:`Int8Plan`: (N, 3, S, S) float images → raw head (N, A·(5+C), H, W) in ``dtype``.

    Weights go to ``device`` once; each forward is a fixed sequence of kernel launches (no host sync), so it can be
    captured in a CUDA graph. Where Triton cannot launch (a CPU without ``TRITON_INTERPRET=1``) the INT8 layers run
    :func:`sidnet.kernels.int8.reference_conv2d_int8`, the same arithmetic. ``fuse`` (default: on CUDA) runs the
    first layer as one :class:`QStem` kernel (:func:`fuse_stem`) and each conv with the max-pool after it as one
    :class:`QConvPool` kernel (:func:`fuse_pools`); ``self.plan`` is the plan that runs. ``tune=True``
    times the convolution kernels' configurations (the TMA kernel's and split-K among them) on each layer's first
    eager call and keeps the fastest (:func:`sidnet.kernels.int8.conv2d_int8`): warm up before capturing a CUDA graph;
    the output does not change. Off by default until it is measured on a GPU (``SIDNET_INT8_TUNE=1`` turns it on
    where ``tune`` is not given).
    """

    def __init__(self, plan: Int8Plan, *, device: torch.device, dtype: torch.dtype = torch.float16,
                 fuse: bool | None = None, tune: bool | None = None, precision: str = "int8") -> None:  # fmt: skip
        super().__init__()
        if precision not in ("int8", "fp8"):
            raise ValueError(f"Int8Network: precision 'int8' or 'fp8', not {precision!r}")
        self.fp8 = precision == "fp8"
        if self.fp8:
            if device.type != "cuda":
                raise ValueError(f"Int8Network: FP8 (e4m3) runs on a CUDA GPU (sm_89 or newer), not {device}")
            plan = to_fp8(plan)
        if fuse if fuse is not None else device.type == "cuda":
            steps = plan.steps if self.fp8 else fuse_stem(plan.steps, output=plan.output)  # the stem kernel is INT8
            plan = replace(plan, steps=fuse_pools(steps, output=plan.output))
        self.plan, self.device, self.dtype, self.precision = plan, device, dtype, precision
        self.tune = tune if tune is not None else os.environ.get("SIDNET_INT8_TUNE", "0") == "1"
        self.layers: list[Callable[[dict], None]] = [self._compile(s) for s in plan.steps]

    def _compile(self, s: Step) -> Callable[[dict], None]:
        dev = self.device
        quantize = K.quantize_fp8 if self.fp8 else K.quantize
        conv2d = K.conv2d_fp8 if self.fp8 else K.conv2d_int8
        if isinstance(s, Quantize):

            def run(env, s=s):
                env[s.out] = quantize(env[s.x], s.scale).contiguous()

            return run
        if isinstance(s, QConv):
            w, scale, bias = conv_operands(s, dev, fp8=self.fp8)

            def run(env, s=s, w=w, scale=scale, bias=bias):
                env[s.out] = conv2d(env[s.x], w, scale, bias, stride=s.stride, pad=s.pad, relu=s.relu,
                                    out_scale=s.out_scale, out_dtype=self.dtype, tune=self.tune)  # fmt: skip

            return run
        if isinstance(s, QStem):
            w, scale, bias = conv_operands(s.conv, dev)
            window = K.stem_window_weights(w, pool=s.pool.kernel, packed=True)

            def run(env, s=s, w=w, scale=scale, bias=bias, window=window):
                x = env[s.x].permute(0, 3, 1, 2).contiguous()  # the NCHW images (a view of them: no copy)
                env[s.out] = K.stem_int8(x, w, scale, bias, in_scale=s.in_scale, pad=s.conv.pad,
                                         conv_scale=s.conv.out_scale, pool=s.pool.kernel,
                                         pool_scale=s.pool.out_scale, packed=True, window=window)  # fmt: skip

            return run
        if isinstance(s, QConvPool):
            w, scale, bias = conv_operands(s.conv, dev, fp8=self.fp8)

            def run(env, s=s, w=w, scale=scale, bias=bias):
                c = s.conv
                if self.fp8:  # the window's maximum quantised once, at the pool's scale
                    env[s.out] = K.conv2d_fp8(env[s.x], w, scale, bias, stride=c.stride, pad=c.pad, relu=c.relu,
                                              out_scale=s.pool.out_scale, pool=s.pool.kernel,
                                              tune=self.tune)  # fmt: skip
                    return
                env[s.out] = K.conv2d_int8(env[s.x], w, scale, bias, stride=c.stride, pad=c.pad, relu=c.relu,
                                           out_scale=c.out_scale, pool=s.pool.kernel,
                                           pool_scale=s.pool.out_scale, tune=self.tune)  # fmt: skip

            return run
        if isinstance(s, QMaxPool):
            pool = K.maxpool2d_fp8 if self.fp8 else K.maxpool2d_int8

            def run(env, s=s):
                env[s.out] = pool(env[s.x], kernel=s.kernel, stride=s.stride, pad=s.pad, in_scale=s.in_scale,
                                  out_scale=s.out_scale)  # fmt: skip

            return run
        if isinstance(s, Layout):
            return self._layout(s)
        if isinstance(s, Dequantize):

            def run(env, s=s):
                env[s.out] = env[s.x].to(self.dtype) * s.scale

            return run
        if isinstance(s, FloatPool):

            def run(env, s=s):
                y = F.max_pool2d(env[s.x].permute(0, 3, 1, 2), s.kernel, s.stride, s.pad)
                env[s.out] = y.permute(0, 2, 3, 1)

            return run
        if isinstance(s, FloatConv):
            w = torch.from_numpy(s.w).to(dev, self.dtype).contiguous(memory_format=torch.channels_last)
            bias = torch.from_numpy(s.bias).to(dev, self.dtype) if s.bias is not None else None

            def run(env, s=s, w=w, bias=bias):
                x = env[s.x]
                x = (x.to(self.dtype) * s.x_scale if s.x_scale is not None else x.to(self.dtype)).permute(0, 3, 1, 2)
                y = F.conv2d(x, w, bias, stride=s.stride, padding=s.pad)
                env[s.out] = (y.clamp_min(0) if s.relu else y).permute(0, 2, 3, 1)

            return run
        raise TypeError(f"unknown plan step {type(s).__name__}")

    @staticmethod
    def _layout(s: Layout) -> Callable[[dict], None]:
        if s.op == "Alias":

            def run(env, s=s):
                env[s.out] = env[s.xs[0]]

        elif s.op == "Concat":  # on the bytes (e4m3 included: moving bytes commutes with any 8-bit code)

            def run(env, s=s):
                xs = [env[x] for x in s.xs]
                env[s.out] = torch.cat([x.view(torch.int8) for x in xs], dim=-1).view(xs[0].dtype)

        else:  # SpaceToDepth (ONNX order): out[..., (by·b + bx)·C + c] = x[h·b + by, w·b + bx, c]

            def run(env, s=s):
                x = env[s.xs[0]]
                n, h, w, c = x.shape
                b = s.block
                y = x.view(torch.int8).reshape(n, h // b, b, w // b, b, c).permute(0, 1, 3, 2, 4, 5)
                env[s.out] = y.reshape(n, h // b, w // b, b * b * c).view(x.dtype)

        return run

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        env = {self.plan.input: images.permute(0, 2, 3, 1)}  # NHWC views throughout
        for layer in self.layers:
            layer(env)
        return env[self.plan.output].permute(0, 3, 1, 2).contiguous()
