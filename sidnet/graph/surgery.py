"""All ONNX graph surgery of the export, with onnx-graphsurgeon, in one place. Every rewrite is logged with the node
count before and after (``logging`` and the returned :class:`SurgeryLog`, which the export report includes).

Pipeline (:func:`rewrite`): ``sanitize`` (cleanup → toposort → shape inference → constant folding, until the node count
stops changing) → remove no-op nodes (Identity, eval Dropout, same-type Cast, identity Transpose, same-shape Reshape:
the Mask R-CNN report's "identity" problem) → fold any BatchNormalization left after a Conv → one of two targets:

- ``plugins``: each ``Reorg`` module's subgraph → one ``sidnet::Reorg`` node; the decode + top-K subgraph → one
  ``sidnet::RegionDecode`` node producing ``detections`` and ``num_detections`` (TensorRT plugins in
  :mod:`sidnet.export.trt_plugins`, NumPy references in :mod:`sidnet.export.reference_ops`);
- ``native``: each reorg subgraph → one standard ``SpaceToDepth`` (same channel order); the decode stays standard ops.

Mask R-CNN (:mod:`sidnet.export.maskrcnn_deploy`): each ``PyramidRoIAlign`` module's subgraph (per-level
``GridSample`` + level select) → one ``sidnet::PyramidRoIAlign`` node (plugins target; NumPy reference in
:mod:`sidnet.export.reference_ops`, TensorRT plugin in :mod:`sidnet.export.trt_plugins`), or kept as standard ops
(native). NMS is already ONNX ``NonMaxSuppression`` (or a ``Scan`` loop) as traced.

Subgraphs are found by the module path that traced them (:func:`sidnet.graph.onnx_export.module_scopes`), then
checked: exactly the expected loose ends (one input; one output, or the two graph outputs), else :class:`SurgeryError`.
The decode's input is renamed ``raw`` so that checks and the FP16 rewrite (:func:`to_fp16`) can find the head output.
Plugin nodes carry ``plugin_namespace``/``plugin_version`` string attributes: TensorRT's ONNX parser looks the
plugin creator up by op type + those two, whatever the node's ONNX domain.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sidnet.graph.errors import SurgeryError
from sidnet.graph.wrapper import RAW_NAME

log = logging.getLogger("sidnet.graph.surgery")

DOMAIN = "sidnet"
PLUGIN_VERSION = 1
MAX_SANITIZE_PASSES = 8


@dataclass
class SurgeryLog:
    """One line per rewrite, ``name: before → after nodes (detail)``, also sent to ``logging``."""

    lines: list[str] = field(default_factory=list)

    def step(self, name: str, before: int, after: int, detail: str = "") -> None:
        line = f"{name}: {before} -> {after} nodes" + (f" ({detail})" if detail else "")
        log.info("surgery %s", line)
        self.lines.append(line)


@dataclass
class Region:
    """A module's subgraph: its nodes and its loose ends (non-constant tensors crossing the boundary)."""

    path: str
    nodes: list[gs.Node]
    inputs: list[gs.Variable]
    outputs: list[gs.Variable]


# -- graph helpers, registered on gs.Graph as the TensorRT samples do --------------------------------------------------
@gs.Graph.register()
def bypass(self: gs.Graph, node: gs.Node) -> bool:
    """Remove a one-in/one-out pass-through node, rewiring its consumers to its input. A graph output keeps its name
    (the producer of the input writes it instead); False, and nothing changed, when that is impossible."""
    x, y = node.inputs[0], node.outputs[0]
    if y in self.outputs:
        if x in self.inputs or x in self.outputs or not x.inputs:
            return False
        producer = x.inputs[0]
        for consumer in list(x.outputs):
            if consumer is not node:
                consumer.inputs[consumer.inputs.index(x)] = y
        producer.outputs[producer.outputs.index(x)] = y
    else:
        for consumer in list(y.outputs):
            consumer.inputs[consumer.inputs.index(y)] = x
    node.inputs.clear()
    node.outputs.clear()
    return True


@gs.Graph.register()
def replace_subgraph(self: gs.Graph, nodes: list[gs.Node], inputs: list, outputs: list, **node_kwargs) -> gs.Node:
    """Detach ``nodes`` (the next cleanup drops them) and produce ``outputs`` from ``inputs`` with one new node."""
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
    self.layer(inputs=inputs, outputs=outputs, **node_kwargs)
    return self.nodes[-1]


# -- sanitize ----------------------------------------------------------------------------------------------------------
def _infer_shapes(graph: gs.Graph) -> gs.Graph:
    # Forget inferred shapes so a rewrite cannot leave a stale one behind; custom-op outputs keep theirs because ONNX
    # shape inference does not know those ops.
    for node in graph.nodes:
        if node.domain != DOMAIN:
            for out in node.outputs:
                if out not in graph.outputs:
                    out.shape = None
    model = onnx.shape_inference.infer_shapes(export_model(graph), data_prop=True)
    return gs.import_onnx(model)


def sanitize(graph: gs.Graph, slog: SurgeryLog, tag: str = "sanitize") -> gs.Graph:
    """cleanup → toposort → shape inference → constant folding, repeated until the node count is stable."""
    start, passes = len(graph.nodes), 0
    while passes < MAX_SANITIZE_PASSES:
        before = len(graph.nodes)
        graph.cleanup().toposort()
        graph = _infer_shapes(graph)
        graph.fold_constants(fold_shapes=True).cleanup().toposort()
        passes += 1
        if len(graph.nodes) == before:
            break
    slog.step(tag, start, len(graph.nodes), f"{passes} pass(es)")
    return graph


# -- no-ops and BatchNorm ----------------------------------------------------------------------------------------------
def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _is_noop(node: gs.Node) -> bool:
    if len(node.outputs) != 1 and not (node.op == "Dropout" and not any(o.outputs for o in node.outputs[1:])):
        return False
    x, y = node.inputs[0] if node.inputs else None, node.outputs[0]
    if x is None or (isinstance(x, gs.Constant) and node.op != "Identity"):
        return False
    if node.op in ("Identity", "Dropout"):
        return True
    if node.op == "Cast":
        return x.dtype is not None and onnx.helper.np_dtype_to_tensor_dtype(np.dtype(x.dtype)) == node.attrs["to"]
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"):
        return _static(x.shape) and _static(y.shape) and list(x.shape) == list(y.shape)
    return False


def remove_noops(graph: gs.Graph, slog: SurgeryLog) -> gs.Graph:
    before = len(graph.nodes)
    removed: Counter[str] = Counter()
    for node in list(graph.nodes):
        if _is_noop(node) and graph.bypass(node):
            removed[node.op] += 1
    graph.cleanup().toposort()
    slog.step("remove no-ops", before, len(graph.nodes), ", ".join(f"{k} x{v}" for k, v in removed.items()) or "none")
    return graph


def fold_batchnorm(graph: gs.Graph, slog: SurgeryLog) -> gs.Graph:
    """Fold ``BatchNormalization(Conv(x, W, b))`` into the Conv when all parameters are constants."""
    before, folded = len(graph.nodes), 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        x = bn.inputs[0]
        conv = x.inputs[0] if len(x.inputs) == 1 else None
        params = bn.inputs[1:5]
        if conv is None or conv.op != "Conv" or len(x.outputs) != 1 or x in graph.outputs or len(bn.outputs) != 1:
            continue
        if not all(isinstance(t, gs.Constant) for t in [*params, *conv.inputs[1:]]):
            continue
        gamma, beta, mean, var = (t.values.astype(np.float64) for t in params)
        w = conv.inputs[1].values.astype(np.float64)
        b = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(w.shape[0])
        scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        dtype = conv.inputs[1].values.dtype
        new_w = gs.Constant(f"{conv.name}_bn_weight", (w * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(dtype))
        new_b = gs.Constant(f"{conv.name}_bn_bias", ((b - mean) * scale + beta).astype(dtype))
        while len(conv.inputs) > 1:  # SynchronizedList: pop keeps the tensor's consumer list in step
            conv.inputs.pop()
        conv.inputs.extend([new_w, new_b])
        y = bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        conv.outputs[0] = y
        folded += 1
    graph.cleanup().toposort()
    slog.step("fold BatchNorm", before, len(graph.nodes), f"{folded} folded into Conv")
    return graph


# -- regions and targets -----------------------------------------------------------------------------------------------
def _is_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) or (len(t.inputs) == 1 and t.inputs[0].op == "Constant")


def find_region(graph: gs.Graph, scopes: dict[str, tuple[str, ...]], path: str) -> Region:
    """The nodes traced inside module ``path`` and the non-constant tensors crossing their boundary."""
    nodes = [n for n in graph.nodes if path in scopes.get(n.name, ())]
    if not nodes:
        raise SurgeryError(
            f"no ONNX node was traced in module '{path}': export with sidnet.export.export_onnx "
            "(torch.onnx.export dynamo=True keeps module paths in node metadata)"
        )
    ids = {id(n) for n in nodes}
    produced = {id(t) for n in nodes for t in n.outputs}
    inputs, outputs, seen = [], [], set()
    for n in nodes:
        for t in n.inputs:
            if id(t) not in produced and not _is_constant(t) and id(t) not in seen:
                seen.add(id(t))
                inputs.append(t)
        for t in n.outputs:
            if t in graph.outputs or any(id(c) not in ids for c in t.outputs):
                outputs.append(t)
    return Region(path, nodes, inputs, outputs)


def _expect(region: Region, n_in: int, n_out: int) -> None:
    if len(region.inputs) != n_in or len(region.outputs) != n_out:
        names = lambda ts: [t.name for t in ts]  # noqa: E731
        raise SurgeryError(
            f"module '{region.path}' has loose ends inputs={names(region.inputs)} "
            f"outputs={names(region.outputs)}, expected {n_in} input(s) and {n_out} output(s): the "
            "exporter split or merged it; export again with the default exporter settings"
        )


def _plugin_attrs(**attrs) -> dict:
    return {**attrs, "version": PLUGIN_VERSION, "plugin_namespace": DOMAIN, "plugin_version": str(PLUGIN_VERSION)}


def rewrite_reorgs(graph: gs.Graph, scopes, reorgs: dict[str, int], target: str, slog: SurgeryLog) -> gs.Graph:
    """Each reorg module path (→ its stride) becomes one ``sidnet::Reorg`` (plugins) or ``SpaceToDepth`` (native)."""
    before = len(graph.nodes)
    for path, stride in reorgs.items():
        region = find_region(graph, scopes, path)
        _expect(region, 1, 1)
        (x,), (y,) = region.inputs, region.outputs
        ops = ",".join(sorted({n.op for n in region.nodes}))
        if target == "plugins":
            node = graph.replace_subgraph(
                region.nodes,
                [x],
                [y],
                op="Reorg",
                domain=DOMAIN,
                name=f"{path}.Reorg",
                attrs=_plugin_attrs(stride=int(stride)),
            )
        else:
            node = graph.replace_subgraph(
                region.nodes, [x], [y], op="SpaceToDepth", name=f"{path}.SpaceToDepth", attrs={"blocksize": int(stride)}
            )
        y.dtype = x.dtype
        if x.shape and _static(x.shape[1:]):
            n, c, h, w = x.shape
            y.shape = [n, c * stride * stride, h // stride, w // stride]
        slog.lines.append(f"  {path}: {len(region.nodes)} nodes ({ops}) -> 1 {node.op}")
        graph.cleanup().toposort()
    slog.step(
        f"reorg -> {'sidnet::Reorg' if target == 'plugins' else 'SpaceToDepth'}",
        before,
        len(graph.nodes),
        f"{len(reorgs)} reorg(s)",
    )
    return graph


def rewrite_decode(graph: gs.Graph, scopes, path: str, attrs: dict | None, target: str, slog: SurgeryLog) -> gs.Graph:
    """Name the decode's input ``raw``; plugins target: the whole decode + top-K → one ``sidnet::RegionDecode``.

    ``attrs`` (plugins): anchors (flat floats, input pixels), num_anchors, num_classes, stride_x, stride_y,
    conf_thresh, topk.
    """
    before = len(graph.nodes)
    region = find_region(graph, scopes, path)
    _expect(region, 1, 2)
    raw = region.inputs[0]
    if graph.tensors().get(RAW_NAME, raw) is not raw:
        raise SurgeryError(f"the graph already has a tensor named '{RAW_NAME}': rename it before the surgery")
    raw.name = RAW_NAME
    if sorted(t.name for t in region.outputs) != sorted(t.name for t in graph.outputs):
        raise SurgeryError(
            f"module '{path}' does not produce the graph outputs {[t.name for t in graph.outputs]}: "
            f"it produces {[t.name for t in region.outputs]}; export the DeployModel wrapper"
        )
    if target == "plugins":
        ops = Counter(n.op for n in region.nodes)
        graph.replace_subgraph(
            region.nodes,
            [raw],
            list(graph.outputs),
            op="RegionDecode",
            domain=DOMAIN,
            name=f"{path}.RegionDecode",
            attrs=_plugin_attrs(**attrs),
        )
        graph.cleanup().toposort()
        slog.lines.append(f"  {path}: {len(region.nodes)} nodes ({', '.join(sorted(ops))}) -> 1 RegionDecode")
        slog.step("decode + top-K -> sidnet::RegionDecode", before, len(graph.nodes))
    else:
        slog.step("decode + top-K kept as standard ops", before, len(graph.nodes), f"input renamed '{RAW_NAME}'")
    return graph


def rewrite_roi_aligns(graph: gs.Graph, scopes, roi_aligns: dict[str, dict], target: str, slog: SurgeryLog) -> gs.Graph:
    """Each PyramidRoIAlign module path (→ its attributes) becomes one ``sidnet::PyramidRoIAlign`` node (plugins)
    taking ``(features finest first..., rois)``; the native target keeps the standard ops and logs what they are."""
    before = len(graph.nodes)
    for path, attrs in roi_aligns.items():
        region = find_region(graph, scopes, path)
        levels = len(attrs["scales"])
        _expect(region, levels + 1, 1)
        ops = Counter(n.op for n in region.nodes)
        detail = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))
        if target != "plugins":
            slog.lines.append(f"  {path}: {len(region.nodes)} standard nodes kept ({detail})")
            continue
        rois = [t for t in region.inputs if t.shape is not None and len(t.shape) == 3 and t.shape[-1] == 4]
        feats = [t for t in region.inputs if t not in rois]
        if len(rois) != 1 or any(t.shape is None or len(t.shape) != 4 for t in feats):
            raise SurgeryError(f"module '{path}': cannot tell the RoIs (N, R, 4) from the {levels} feature maps among "
                               f"its inputs {[(t.name, t.shape) for t in region.inputs]}")  # fmt: skip
        feats.sort(key=lambda t: -int(t.shape[-1]))  # finest (largest) map first, as the scales
        (y,) = region.outputs
        graph.replace_subgraph(region.nodes, [*feats, rois[0]], [y], op="PyramidRoIAlign", domain=DOMAIN,
                               name=f"{path}.PyramidRoIAlign", attrs=_plugin_attrs(**attrs))  # fmt: skip
        y.dtype = feats[0].dtype
        slog.lines.append(f"  {path}: {len(region.nodes)} nodes ({detail}) -> 1 PyramidRoIAlign")
        graph.cleanup().toposort()
    name = "multi-level RoIAlign -> sidnet::PyramidRoIAlign" if target == "plugins" else "multi-level RoIAlign kept"
    slog.step(name, before, len(graph.nodes), f"{len(roi_aligns)} pooler(s)")
    return graph


# -- FP16 --------------------------------------------------------------------------------------------------------------
_FP32_INPUTS = {"Resize": {1, 2}}  # inputs that must stay float32 whatever the data type (roi, scales)


def _reachable(tensor: gs.Tensor, *, downstream: bool) -> list[gs.Node]:
    """Every node that produces ``tensor`` (transitively), or with ``downstream`` every node that consumes it."""
    step = (lambda n: (c for t in n.outputs for c in t.outputs)) if downstream else (
        lambda n: (p for t in n.inputs for p in t.inputs))  # fmt: skip
    seen, stack, out = set(), list(tensor.outputs if downstream else tensor.inputs), []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        stack.extend(step(node))
    return out


def to_fp16(graph: gs.Graph, slog: SurgeryLog) -> gs.Graph:
    """Run the network body (everything upstream of ``raw``) in float16; the I/O contract does not change.

    ``images`` stays float32 and is cast once on entry; ``raw`` is cast back to float32 so the decode (native ops or
    the RegionDecode plugin) computes boxes in float32. TensorRT-RTX has no FP16 builder flag: its networks are
    strongly typed, so the precision must be in the ONNX itself; full TensorRT builds this same file strongly typed.
    """
    before = len(graph.nodes)
    raw = graph.tensors().get(RAW_NAME)
    if raw is None or not raw.inputs:
        raise SurgeryError(f"to_fp16: no tensor '{RAW_NAME}' with a producer; run rewrite_decode first")
    body = _reachable(raw, downstream=False)
    halves: dict[str, gs.Constant] = {}
    converted = 0
    for node in body:
        keep = _FP32_INPUTS.get(node.op, set())
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and i not in keep:
                if t.name not in halves:
                    halves[t.name] = gs.Constant(f"{t.name}_fp16", t.values.astype(np.float16))
                    converted += 1
                node.inputs[i] = halves[t.name]
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        for out in node.outputs:
            if out.dtype == np.float32:
                out.dtype = np.float16
    images = graph.inputs[0]
    images_h = gs.Variable(f"{images.name}_fp16", dtype=np.float16, shape=images.shape)
    for consumer in list(images.outputs):
        consumer.inputs[consumer.inputs.index(images)] = images_h
    graph.layer(
        op="Cast", name="images_to_fp16", inputs=[images], outputs=[images_h], attrs={"to": onnx.TensorProto.FLOAT16}
    )
    raw_h = gs.Variable(f"{RAW_NAME}_fp16", dtype=np.float16, shape=raw.shape)
    producer = raw.inputs[0]
    producer.outputs[producer.outputs.index(raw)] = raw_h
    graph.layer(op="Cast", name="raw_to_fp32", inputs=[raw_h], outputs=[raw], attrs={"to": onnx.TensorProto.FLOAT})
    raw.dtype = np.float32
    graph.cleanup().toposort()
    slog.step(
        "fp16 body",
        before,
        len(graph.nodes),
        f"{len(body)} body nodes, {converted} float constants to float16, 2 boundary Casts",
    )
    return graph


# -- INT8 --------------------------------------------------------------------------------------------------------------

def native_to_plugins(model: onnx.ModelProto, *, decode_attrs: dict) -> tuple[onnx.ModelProto, list[str]]:
    """The plugins target of an already quantized native graph (INT8 quantizes the native graph, which onnxruntime
    can run): each ``SpaceToDepth`` → ``sidnet::Reorg`` (same channel order, Q/DQ around it untouched), everything
    downstream of ``raw`` (the FP32 decode + top-K) → one ``sidnet::RegionDecode``."""
    slog = SurgeryLog()
    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    reorgs = [n for n in graph.nodes if n.op == "SpaceToDepth"]
    for node in reorgs:
        stride = int(node.attrs["blocksize"])
        node.op, node.domain, node.name = "Reorg", DOMAIN, node.name.replace("SpaceToDepth", "Reorg")
        node.attrs = _plugin_attrs(stride=stride)
    slog.step("int8 plugins: SpaceToDepth -> sidnet::Reorg", before, len(graph.nodes), f"{len(reorgs)} reorg(s)")
    raw = graph.tensors().get(RAW_NAME)
    if raw is None:
        raise SurgeryError(f"native_to_plugins: no tensor '{RAW_NAME}' (the decode input) in the graph")
    before, decode = len(graph.nodes), _reachable(raw, downstream=True)
    graph.replace_subgraph(decode, [raw], list(graph.outputs), op="RegionDecode", domain=DOMAIN,
                           name="decode.RegionDecode", attrs=_plugin_attrs(**decode_attrs))  # fmt: skip
    graph.cleanup().toposort()
    slog.step("int8 plugins: decode + top-K -> sidnet::RegionDecode", before, len(graph.nodes))
    return export_model(graph), slog.lines


# -- entry points ------------------------------------------------------------------------------------------------------
def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """gs → ONNX, declaring the ``sidnet`` domain when a plugin node uses it."""
    model = gs.export_onnx(graph)
    if any(n.domain == DOMAIN for n in model.graph.node) and DOMAIN not in {o.domain for o in model.opset_import}:
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, PLUGIN_VERSION))
    return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(
        sorted(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node).items())
    )


def rewrite(
    model: onnx.ModelProto,
    scopes: dict[str, tuple[str, ...]],
    *,
    target: str,
    reorgs: dict[str, int] | None = None,
    decode_path: str | None = None,
    decode_attrs: dict | None = None,
    roi_aligns: dict[str, dict] | None = None,
    fp16: bool = False,
) -> tuple[onnx.ModelProto, SurgeryLog]:
    """The whole surgery. ``scopes``: node name → module paths (read before anything renames nodes); ``reorgs``:
    reorg module path → stride; ``decode_path``: the top-K decode module's path (``decode``; YOLOv2 family);
    ``roi_aligns``: PyramidRoIAlign module path → its attributes (Mask R-CNN)."""
    if target not in ("plugins", "native"):
        raise SurgeryError(f"unknown target {target!r}: use plugins or native")
    slog = SurgeryLog()
    graph = gs.import_onnx(model)
    graph = sanitize(graph, slog)
    graph = remove_noops(graph, slog)
    graph = fold_batchnorm(graph, slog)
    if reorgs:
        graph = rewrite_reorgs(graph, scopes, reorgs, target, slog)
    if decode_path:
        graph = rewrite_decode(graph, scopes, decode_path, decode_attrs, target, slog)
    if roi_aligns:
        graph = rewrite_roi_aligns(graph, scopes, roi_aligns, target, slog)
    if fp16:
        graph = to_fp16(graph, slog)
    graph = sanitize(graph, slog, "final sanitize")
    return export_model(graph), slog
