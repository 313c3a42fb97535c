"""Dataclass schemas for the Hydra configs in ``conf/``. Only the entry points see these; the library takes
plain keyword arguments. Registering them with Hydra's ConfigStore makes a typo in a YAML or an override an
error at composition time instead of a silently ignored key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sidnet.safety import check_input_size, check_name


@dataclass
class ModelConfig:
    name: str = "sidnet"
    # null for models without an anchor list (maskrcnn). Otherwise a list of [w, h] in input pixels, or a path
    # (relative to the project root) to a YAML written by `python -m train.anchors` holding `anchors:`.
    anchors: Any = "conf/anchors/coco128_person.yaml"
    num_classes: int = 1
    input_size: int = 416
    num_anchors: int = 0  # the count the architecture is defined with (SIDNet 3, YOLOv2 5); 0: any
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder-specific: width, pretrained, head_channels


@dataclass
class DataConfig:
    root: str | None = None  # null: the bundled sample shipped in sidnet/sample
    # One source or a list of sources, each a mapping with the keys of sidnet.data.sources.SOURCE_KEYS (format, root,
    # images, annotations | labels, class_map, ...). Typed Any because OmegaConf cannot type a "mapping or list" field;
    # sidnet.data.sources.split_sources checks the keys, one line per mistake, before anything is written.
    train: Any = None
    val: Any = None
    class_names: list[str] = field(default_factory=lambda: ["person"])
    class_map: dict[int, int] = field(default_factory=lambda: {0: 0})
    num_label_classes: int = 80
    negative_ratio: float = 0.25
    lenient: bool = False


@dataclass
class AugConfig:
    """Train augmentation (``conf/aug/*.yaml``): the keyword arguments of :func:`sidnet.data.build_train_transform`
    plus the two dataset/batch-level ones, ``mosaic`` and ``multiscale``."""

    enabled: bool = True
    flip_p: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    translate: float = 0.1
    brightness: float = 0.3
    contrast: float = 0.3
    hue: float = 0.015
    saturation: float = 0.25
    value: float = 0.1
    blur_p: float = 0.1
    noise_p: float = 0.1
    gray_p: float = 0.05
    lowlight_p: float = 0.1
    min_visibility: float = 0.3
    mosaic: float = 0.0  # probability of a 4-image mosaic per sample
    # [min, max] input size in pixels: each batch is resized to a multiple of 32 drawn from it (null: off).
    multiscale: list[int] | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD momentum, AdamW beta1
    warmup_epochs: float = 3.0
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    grad_clip: float = 10.0  # max global grad norm; 0 disables
    # One fused kernel per parameter group (AdamW/SGD fused=True). null (auto): fused on CUDA, foreach elsewhere. Under
    # AMP the GradScaler then hands the overflow flag to the kernel instead of reading it back: no host sync per step.
    fused: bool | None = None
    ema_halflife_epochs: float = 2.0  # EMA weights half-life; 0 disables EMA
    ema_warmup: int = 100  # steps over which the EMA decay ramps up (YOLOv5)


BOX_LOSSES = ("mse", "ciou")  # loss.box_loss (sidnet.models.loss.RegionLoss)
ASSIGNERS = ("best", "free")  # loss.assign


@dataclass
class LossConfig:
    coord_scale: float = 1.0
    obj_scale: float = 5.0
    noobj_scale: float = 1.0
    class_scale: float = 1.0
    ignore_thresh: float = 0.6
    # The defaults below are the measured best (benchmarks/results/persons_loss: all-val AP50 0.48 -> 0.63 on persons,
    # 40 epochs); YOLOv2's own loss is loss.box_loss=mse loss.rescore=false loss.assign=best.
    rescore: bool = True  # objectness target = IoU of the decoded box with its truth (Darknet rescore=1)
    box_loss: str = "ciou"  # ciou (complete-IoU on the decoded box) | mse (YOLOv2: squared error on tx, ty, tw, th)
    assign: str = "free"  # free: crowded truths on a taken anchor slot take the cell's next free one | best (YOLOv2)


@dataclass
class EvalConfig:
    every: int = 5  # epochs; the last epoch is always evaluated
    conf_thresh: float = 0.001  # for AP: keep low-confidence boxes
    operating_conf: float = 0.3  # recall/precision/FP reported here (the SIDNet paper's threshold)
    nms_iou: float = 0.45
    max_det: int = 100


@dataclass
class QuantConfig:
    """Quantization-aware fine-tuning (``quant=qat``, :mod:`sidnet.quant.qat`): fake INT8 where the Q/DQ export puts
    it, starting from ``init_from`` calibrated exactly as ``python -m export --precision int8`` would."""

    enabled: bool = False
    init_from: str | None = None  # the trained FP32 checkpoint to fine-tune (its EMA weights when present)
    calib_data: str | None = None  # a data YAML to calibrate on (null: this run's data) ...
    calib_split: str = "train"  # ... and its split (NAME or NAME:K/N)
    calib_images: str | None = None  # or a folder of images (deployment-like frames)
    calib_method: str = "entropy"  # entropy | minmax | percentile, as in python -m export --calib-method
    percentile: float = 99.99
    calib_batches: int = 1000
    calib_batch_size: int = 8
    freeze_bn: bool = True  # BatchNorm statistics stay those of init_from (small fine-tuning batches)


@dataclass
class LoaderConfig:
    """How training batches are produced (:mod:`sidnet.engine.loader`); none of it changes what a batch holds
    except ``gpu_aug``, which runs the same augmentation on the device with float arithmetic."""

    cache: str = "none"  # none | ram | disk | device: decoded + letterboxed uint8 images, built once (Ultralytics
    # cache=); device: kept on the training device, batches gathered, mosaicked and augmented there (needs gpu_aug)
    cache_dir: str = "runs/.cache"  # loader.cache=disk: where the .npy lives (relative: to the working directory)
    pin_memory: bool = True  # CUDA only: page-locked batches, asynchronous host-to-device copies
    prefetch_factor: int = 4  # batches each worker keeps ready
    persistent_workers: bool = True
    gpu_aug: bool = False  # flip, scale/translate and photometric ops as batch ops on the device
    channels_last: bool = False  # NHWC batches and weights on CUDA (faster convolutions under AMP)
    # The next batches' device work (to_device, gpu_aug, multiscale) on a background thread and a CUDA stream of its
    # own, overlapping the step (sidnet.engine.prefetch); the same batches. null (auto): on CUDA, off on the CPU.
    device_prefetch: bool | None = None


@dataclass
class DDPConfig:
    """Multi-process training, launched by ``torchrun --nproc_per_node=N -m train ...``
    (:mod:`sidnet.engine.distributed`); ``batch_size`` stays the global batch, split evenly over the processes."""

    sync_bn: bool = False  # SyncBatchNorm: batch statistics over all processes (small per-GPU batches)
    timeout_s: int = 1800  # collective timeout (rank 0 evaluates while the others wait at a barrier)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    name: str = "sidnet"
    epochs: int = 100
    batch_size: int = 16
    workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # float16 autocast + GradScaler, CUDA only
    seed: int = 0
    resume: bool = False
    max_steps_per_epoch: int = 0  # 0: the whole epoch; >0 caps it (smoke runs, benchmarks)
    tensorboard: bool = True
    cuda_graph: bool = False  # one CUDA process: the network's training forward/backward replayed as CUDA graphs


class ConfigError(ValueError):
    """A configuration value is out of range; the message is one line naming the key, the value and the fix."""


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {need}")


def validate_train_config(cfg: TrainConfig) -> None:
    """Range checks the dataclass types cannot express (Hydra already refused unknown keys and wrong types)."""
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    m, o, e, loss = cfg.model, cfg.optim, cfg.eval, cfg.loss
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "use a positive number of epochs")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "use a positive batch size, e.g. batch_size=16")
    _check(cfg.workers >= 0, "workers", cfg.workers, "use 0 (load in the main process) or more")
    _check(cfg.loader.cache in ("none", "ram", "disk", "device"), "loader.cache", cfg.loader.cache,
           "use none, ram, disk or device")
    _check(cfg.loader.prefetch_factor >= 1, "loader.prefetch_factor", cfg.loader.prefetch_factor, "use 1 or more")
    _check(cfg.ddp.timeout_s >= 1, "ddp.timeout_s", cfg.ddp.timeout_s, "use a positive number of seconds")
    _check(cfg.max_steps_per_epoch >= 0, "max_steps_per_epoch", cfg.max_steps_per_epoch, "use 0 (whole epoch) or more")
    check_name(cfg.name, key="name", fix="name the run with one folder name, e.g. name=sidnet-coco (runs/<name>)")
    check_input_size(m.input_size, where="model.input_size",
                     fix="the network downsamples by 32, use e.g. model.input_size=416")  # fmt: skip
    _check(m.num_classes >= 1, "model.num_classes", m.num_classes, "use 1 or more")
    _check(finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "use a positive learning rate, e.g. optim.lr=0.001")
    _check(finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "use 0 or more")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "use a value in [0, 1)")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "use 0 or more")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "use a value in [0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "use 0 (off) or a positive norm")
    _check(o.ema_halflife_epochs >= 0, "optim.ema_halflife_epochs", o.ema_halflife_epochs, "use 0 (off) or more")
    _check(e.every >= 1, "eval.every", e.every, "use 1 or more epochs")
    _check(0 <= e.conf_thresh <= 1, "eval.conf_thresh", e.conf_thresh, "use a value in [0, 1]")
    _check(0 <= e.operating_conf <= 1, "eval.operating_conf", e.operating_conf, "use a value in [0, 1]")
    _check(0 < e.nms_iou <= 1, "eval.nms_iou", e.nms_iou, "use a value in (0, 1]")
    _check(e.max_det >= 1, "eval.max_det", e.max_det, "use 1 or more")
    for k in ("coord_scale", "obj_scale", "noobj_scale", "class_scale"):
        _check(getattr(loss, k) >= 0, f"loss.{k}", getattr(loss, k), "use 0 or more")
    _check(0 <= loss.ignore_thresh <= 1, "loss.ignore_thresh", loss.ignore_thresh, "use a value in [0, 1]")
    _check(loss.box_loss in BOX_LOSSES, "loss.box_loss", loss.box_loss, f"use one of {', '.join(BOX_LOSSES)}")
    _check(loss.assign in ASSIGNERS, "loss.assign", loss.assign, f"use one of {', '.join(ASSIGNERS)}")
    validate_aug(cfg.aug, input_size=m.input_size)
    q = cfg.quant
    if q.enabled:
        _check(bool(q.init_from), "quant.init_from", q.init_from,
               "QAT fine-tunes a trained checkpoint: pass quant.init_from=runs/<name>/best.pt")  # fmt: skip
        _check(q.calib_method in ("entropy", "minmax", "percentile"), "quant.calib_method", q.calib_method,
               "use entropy, minmax or percentile")  # fmt: skip
        _check(0 < q.percentile <= 100, "quant.percentile", q.percentile, "use a value in (0, 100], e.g. 99.99")
        _check(q.calib_batches >= 1 and q.calib_batch_size >= 1, "quant.calib_batches/calib_batch_size",
               (q.calib_batches, q.calib_batch_size), "use 1 or more")  # fmt: skip
        _check(not (q.calib_data and q.calib_images), "quant.calib_images", q.calib_images,
               "pass quant.calib_data or quant.calib_images, not both")  # fmt: skip


def validate_aug(a: AugConfig, *, input_size: int) -> None:
    probs = ("flip_p", "blur_p", "noise_p", "gray_p", "lowlight_p", "min_visibility", "mosaic")
    for k in probs:
        _check(0 <= getattr(a, k) <= 1, f"aug.{k}", getattr(a, k), "use a probability in [0, 1]")
    _check(len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1], "aug.scale", a.scale,
           "use [min, max] with 0 < min <= max")  # fmt: skip
    if a.multiscale is not None:
        lo, hi = (list(a.multiscale) + [0, 0])[:2]
        _check(len(a.multiscale) == 2 and 32 <= lo <= hi and math.ceil(lo / 32) * 32 <= hi, "aug.multiscale",
               a.multiscale, f"use [min, max] input sizes in pixels holding a multiple of 32, e.g. [320, 512] "
               f"around model.input_size={input_size}, or null (off)")  # fmt: skip


def validate_anchors(anchors: list[list[float]], *, num_anchors: int, source: Any) -> None:
    """``anchors`` are [w, h] pairs in input pixels, positive and finite, ``num_anchors`` of them when it is set."""
    bad = [a for a in anchors if len(a) != 2 or not all(math.isfinite(v) and v > 0 for v in a)]
    if not anchors or bad:
        raise ConfigError(f"anchors from {source} must be a non-empty list of positive [w, h] pairs in input pixels, "
                          f"got {bad[:2] or anchors}; regenerate them with `python -m train.anchors`")  # fmt: skip
    if num_anchors and len(anchors) != num_anchors:
        raise ConfigError(f"anchors from {source} has {len(anchors)} anchors but this model is defined with "
                          f"{num_anchors}; run `python -m train.anchors -k {num_anchors}` or pick the matching "
                          "model")  # fmt: skip


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
