"""Dataclass schemas for the Hydra configs in ``conf/``. Only the entry points see these; the library takes
plain keyword arguments. Registering them with Hydra's ConfigStore makes a typo in a YAML or an override an
error at composition time instead of a silently ignored key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = "sidnet"
    # null for models without anchors (maskrcnn). Otherwise a list of [w, h] in input pixels, or a path (relative to the project root) to a YAML written by
    # `python -m train.anchors` holding `anchors:`.
    anchors: Any = "conf/anchors/coco128_person.yaml"
    num_classes: int = 1
    input_size: int = 416
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder-specific: width, pretrained, head_channels


@dataclass
class SplitConfig:
    format: str = "yolo"
    images: str = "images"
    annotations: str | None = None
    labels: str | None = None
    polygons: bool = False  # yolo: labels are 'cls x1 y1 x2 y2 ...' polygons (YOLO-seg)
    skip_unlabeled: bool = False  # yolo: images without a label file are dropped, not negatives


@dataclass
class DataConfig:
    root: str | None = None  # null: the bundled sample shipped in sidnet/sample
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    class_names: list[str] = field(default_factory=lambda: ["person"])
    class_map: dict[int, int] = field(default_factory=lambda: {0: 0})
    num_label_classes: int = 80
    negative_ratio: float = 0.25
    lenient: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD momentum, AdamW beta1
    warmup_epochs: float = 3.0
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    grad_clip: float = 10.0  # max global grad norm; 0 disables
    ema_halflife_epochs: float = 2.0  # EMA weights half-life; 0 disables EMA
    ema_warmup: int = 100  # steps over which the EMA decay ramps up (YOLOv5)


@dataclass
class LossConfig:
    coord_scale: float = 1.0
    obj_scale: float = 5.0
    noobj_scale: float = 1.0
    class_scale: float = 1.0
    ignore_thresh: float = 0.6


@dataclass
class EvalConfig:
    every: int = 5  # epochs; the last epoch is always evaluated
    conf_thresh: float = 0.001  # for AP: keep low-confidence boxes
    operating_conf: float = 0.3  # recall/precision/FP reported here (the SIDNet paper's threshold)
    nms_iou: float = 0.45
    max_det: int = 100


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: dict[str, Any] = field(default_factory=dict)  # keyword arguments of build_train_transform
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
