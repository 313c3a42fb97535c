"""PyTorch → ONNX with torch's ``torch.export``-based exporter (``dynamo=True``), plus the metadata the model carries.

Why the ``torch.export`` exporter and not the TorchScript one (``dynamo=False``): with a dynamic batch axis the
TorchScript tracer records every ``x.shape`` as Shape/Gather/Concat chains (348 nodes for the tiny test model, 17 of
them Identity, most of which shape inference cannot fold), while ``torch.export`` keeps H and W static and only the
batch symbolic (111 nodes, BatchNorm already folded). It also writes each node's module path into the node's
``metadata_props`` (``pkg.torch.onnx.name_scopes``), which is how graph surgery finds the ``Reorg`` and decode
subgraphs: by the path of the module that produced them, not by guessing op patterns. It needs ``onnxscript``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import warnings

import onnx
import torch

from sidnet.graph.errors import ExportError
from sidnet.graph.wrapper import INPUT_NAME, OUTPUT_NAMES, DeployModel

log = logging.getLogger("sidnet.export")

MIN_OPSET = 17
MAX_BATCH = 4096  # upper bound of the symbolic batch in torch.export; engines narrow it with their profile

PREPROCESSING = (
    "images: float32 NCHW [N, 3, S, S], RGB, values in [0, 1] (pixel / 255); each image letterboxed to S x S "
    "(resized so the long side is S, aspect ratio kept, centred, padded with gray 114/255). Normalisation is inside "
    "the model. Boxes in `detections` are in letterboxed input pixels: undo the letterbox to map them back."
)
OUTPUTS = (
    "detections: float32 [N, K, 6] rows [x1, y1, x2, y2, score, class], score = objectness * class probability, "
    "sorted by score descending, zero rows after the valid ones; num_detections: int32 [N] valid rows "
    "(score >= conf_thresh). No NMS."
)


@contextlib.contextmanager
def quiet_exporter():
    """Silence ``torch.onnx.export(dynamo=True)``'s chatter for the block: onnx_ir/onnxscript INFO lines (one per
    deduplicated constant), progress prints and deprecation warnings; errors still raise. Loggers are restored.
    A missing onnxscript becomes a one-line :class:`ExportError`."""
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    except ImportError as e:
        raise ExportError(f"torch.onnx.export(dynamo=True) needs onnxscript ({e}): pip install onnxscript") from e
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def export_onnx(deploy: DeployModel, *, opset: int = 18, example_batch: int = 2) -> onnx.ModelProto:
    """Trace ``deploy`` to an ONNX model: input ``images`` [batch, 3, S, S] float32, outputs ``detections``
    [batch, K, 6] float32 and ``num_detections`` [batch] int32; node metadata keeps the module paths."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: use opset >= {MIN_OPSET} (default 18)")
    size = deploy.model.input_size
    images = torch.rand(example_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    deploy = deploy.eval()
    with quiet_exporter():
        program = torch.onnx.export(
            deploy,
            (images,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def module_scopes(model: onnx.ModelProto) -> dict[str, tuple[str, ...]]:
    """Node name → the module paths it was traced in, outermost first (e.g. ``("model", "model.head",
    "model.head.reorg")``). Read from ``pkg.torch.onnx.name_scopes``; TorchScript-style names
    (``/model/head/reorg/Reshape``) are understood too, so either exporter's graph can be rewritten."""
    scopes: dict[str, tuple[str, ...]] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in meta:
            names = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            # The last entry names the op itself (e.g. "relu_3"), not a module.
            scopes[node.name] = tuple(n for n in names[:-1] if n)
        elif node.name.startswith("/"):
            parts = node.name.strip("/").split("/")[:-1]
            scopes[node.name] = tuple(".".join(parts[: i + 1]) for i in range(len(parts)))
        else:
            scopes[node.name] = ()
    return scopes


def strip_node_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata (stack traces with local paths); surgery has read what it needs."""
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output]:
        del value.metadata_props[:]


def set_metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    """Write ``values`` into ``metadata_props``: strings as is, everything else as JSON (lists, numbers)."""
    del model.metadata_props[:]
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.add(key=key, value=text)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
