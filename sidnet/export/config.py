"""Dataclass schema of ``conf/export.yaml``. Only ``export/__main__.py`` composes it with Hydra; the library reads the
plain attributes, so ``run_export(ExportConfig(...))`` works without Hydra (tests do that)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidnet.config import ModelConfig

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnx", "tensorrt", "tensorrt-rtx", "compiled", "triton")
TARGETS = ("plugins", "native")


@dataclass
class BatchConfig:
    """Optimisation profile of the engine's dynamic batch axis (the ONNX itself accepts any batch)."""

    min: int = 1
    opt: int = 16
    max: int = 64


@dataclass
class ParityConfig:
    """Random-image check of the exported graph against PyTorch, run on every export.

    Tolerances are absolute, per precision: raw head values, boxes in input pixels, scores. Classes and
    ``num_detections`` must match exactly (rows whose score is within ``score`` of ``conf_thresh`` excepted).
    """

    batches: list[int] = field(default_factory=lambda: [1, 3])  # two sizes prove the batch axis is dynamic
    seed: int = 0
    # Measured on random-init SIDNet 416 (BatchNorm calibrated): fp32 raw 1e-4, boxes 1.3e-2 px; fp16 (weights and
    # activations in half, vs PyTorch fp32) raw 0.13, boxes up to 9 px on large boxes (exp(tw) amplifies), score 2e-3.
    fp32: dict[str, float] = field(default_factory=lambda: {"raw": 5e-3, "boxes": 0.1, "score": 1e-4})
    fp16: dict[str, float] = field(default_factory=lambda: {"raw": 0.25, "boxes": 16.0, "score": 0.01})


@dataclass
class Int8Config:
    """``--precision int8``: calibration set, method, accuracy gate (see :mod:`sidnet.quant.ptq`)."""

    images: str | None = None  # a folder of calibration images (deployment-like frames)
    data: str | None = None  # or a data YAML (conf/data/*.yaml) ...
    split: str = "train"  # ... and its split to calibrate on
    batches: int = 1000  # at most this many full batches (fewer when fewer images are available)
    batch_size: int = 8
    method: str = "entropy"  # entropy (TensorRT EntropyCalibration2) | minmax | percentile
    percentile: float = 99.99
    high_precision: str = "fp32"  # dtype outside Q/DQ: fp32, or fp16
    exclude: list[str] = field(default_factory=list)  # ONNX node names to keep out of INT8 by hand
    gate_data: str | None = None  # held-out labelled data YAML for the accuracy gate (default: `data`)
    gate_split: str = "val:0/2"  # part K of N by image id: gate on val:0/2, report test figures on val:1/2
    budget: float = 1.0  # allowed AP50 drop, in points (1.0 = 0.01 AP50)
    max_fallback: int = 8  # most layers the gate may move back to high precision


@dataclass
class TritonConfig:
    """``--backend triton``: a Triton Inference Server model repository (:mod:`sidnet.export.triton`)."""

    name: str | None = None  # model name (folder) in the repository; null: the model's registry name
    format: str = "onnx"  # onnx (Triton's onnxruntime backend) | plan (TensorRT backend; built with full TensorRT)
    instances: int = 1  # instance_group count
    kind: str = "gpu"  # instance_group kind: gpu | cpu
    queue_delay_us: int = 100  # dynamic_batching max_queue_delay_microseconds


@dataclass
class ExportConfig:
    checkpoint: str | None = None  # a .pt written by `python -m train`
    random_init: bool = False  # export `model` with random weights instead (smoke tests; never for deployment)
    model: ModelConfig = field(default_factory=ModelConfig)  # only read with random_init; a checkpoint has its own
    ema: bool = True  # export the EMA weights when the checkpoint has them
    input_size: int | None = None  # --checkpoint: export at this input side instead of the trained one (multiple of 32)
    precision: str = "fp32"  # fp32 | fp16 (int8: the INT8 issue)
    backend: str = "onnx"  # onnx | tensorrt | tensorrt-rtx | compiled (AOTInductor package) | triton
    target: str | None = None  # plugins | native; null: plugins for tensorrt, native otherwise
    out: str | None = None  # null: <checkpoint dir>/export/<precision> (<backend>_<precision> for engines)
    opset: int = 18
    conf_thresh: float = 0.001
    topk: int = 100
    class_names: list[str] | None = None  # null: the checkpoint's data.class_names, else person / class<i>
    batch: BatchConfig = field(default_factory=BatchConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    plugin_library: str | None = None  # libsidnet_kernels.so for the plugins; null: sidnet.kernels lookup order
    timing_cache: str | None = None  # null: <out>/timing.cache (full TensorRT only; a no-op in TensorRT-RTX)
    workspace_mib: int | None = None  # builder workspace limit; null: TensorRT's default (the device's memory)
    seed: int = 0  # random_init weights and parity images
    int8: Int8Config = field(default_factory=Int8Config)
    force: bool = False  # overwrite INT8 artifacts already in `out`
    compiled_device: str = "auto"  # --backend compiled: cuda | cpu | auto (cuda when torch sees a GPU)
    triton: TritonConfig = field(default_factory=TritonConfig)
    compiled_mode: str = "default"  # --backend compiled: default | max-autotune (minutes longer)
