"""Intrusion zones: polygons per stream, alarms with debounce, cooldown and per-zone counts.

Zones YAML::

    debounce_frames: 3        # a zone alarms after this many consecutive frames with someone inside
    cooldown_s: 10.0          # then stays quiet this long (stream time) before it may alarm again
    classes: [person]         # optional: class names that count (default: all)
    inside: foot              # foot (default) | mask: what must be inside the polygon (mask: Mask R-CNN artifacts)
    streams:
      cam0:                   # the stream name given as name=source on the command line (or stream0, …)
        - name: gate
          polygon: [[100, 200], [400, 200], [400, 570], [100, 570]]   # frame pixels, >= 3 points

A detection is inside a zone when its foot point (bottom centre of the box: where a person stands) is inside the
polygon, or, with ``inside: mask`` (instance masks from a Mask R-CNN artifact), when any pixel of its mask is: a
person leaning over a fence into the zone enters it although their feet stay outside.

Every frame gets a count per zone; an alarm event carries the zone, the frame, the time and the count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from sidnet.runtime.errors import DeployError
from sidnet.runtime.nms import Detections


@dataclass
class Zone:
    name: str
    polygon: np.ndarray  # (P, 2) float32 frame pixels
    # state
    streak: int = 0
    last_alarm: float | None = None
    alarms: int = 0
    _raster: np.ndarray | None = None  # the polygon filled at the frame size, for inside: mask

    def raster(self, height: int, width: int) -> np.ndarray:
        if self._raster is None or self._raster.shape != (height, width):
            self._raster = np.zeros((height, width), np.uint8)
            cv2.fillPoly(self._raster, [np.round(self.polygon).astype(np.int32).reshape(-1, 1, 2)], 1)
        return self._raster.astype(bool)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(P, 2) points → (P,) inside or on the edge (``cv2.pointPolygonTest(…) >= 0``), vectorised."""
        return points_in_polygon(points, self.polygon)


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule over all points and edges at once; points on an edge or a vertex count as inside."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if not len(pts):
        return np.zeros(0, bool)
    a = np.asarray(polygon, np.float64)
    b = np.roll(a, -1, axis=0)
    px, py = pts[:, 0, None], pts[:, 1, None]  # (P, 1) against (E,) edges
    ax, ay, bx, by = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    on_edge = (cross == 0) & (px >= np.minimum(ax, bx)) & (px <= np.maximum(ax, bx)) & (py >= np.minimum(ay, by)) & (
        py <= np.maximum(ay, by))  # fmt: skip
    straddles = (ay > py) != (by > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = ax + (py - ay) * (bx - ax) / (by - ay)
    crossings = (straddles & (px < x_cross)).sum(1)
    return on_edge.any(1) | (crossings % 2 == 1)


@dataclass
class ZoneConfig:
    debounce_frames: int = 3
    cooldown_s: float = 10.0
    classes: list[str] | None = None
    inside: str = "foot"  # foot | mask
    streams: dict[str, list[Zone]] = field(default_factory=dict)


def load_zones(path: str | Path, *, streams: list[str]) -> ZoneConfig:
    """Parse and check a zones YAML against the stream names of this run (an unknown stream is an error)."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"zones file not found: {path}; pass a YAML as documented in sidnet/runtime/zones.py")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DeployError(f"zones file {path} is not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("streams"), dict):
        raise DeployError(f"zones file {path} needs a `streams:` mapping of stream name → list of zones")
    unknown = set(raw) - {"debounce_frames", "cooldown_s", "classes", "inside", "streams"}
    if unknown:
        raise DeployError(f"zones file {path}: unknown key(s) {sorted(unknown)}; allowed: debounce_frames, "
                          "cooldown_s, classes, inside, streams")  # fmt: skip
    cfg = ZoneConfig(debounce_frames=int(raw.get("debounce_frames", 3)), cooldown_s=float(raw.get("cooldown_s", 10.0)),
                     classes=raw.get("classes"), inside=str(raw.get("inside", "foot")))  # fmt: skip
    if cfg.inside not in ("foot", "mask"):
        raise DeployError(f"zones file {path}: inside: {cfg.inside!r}; use foot (the box's bottom centre) or mask")
    if cfg.debounce_frames < 1 or cfg.cooldown_s < 0:
        raise DeployError(f"zones file {path}: debounce_frames must be >= 1 and cooldown_s >= 0")
    for stream, zones in raw["streams"].items():
        if stream not in streams:
            raise DeployError(f"zones file {path} names stream {stream!r}, which is not a source of this run "
                              f"({', '.join(streams)}): name sources as {stream}=PATH")  # fmt: skip
        parsed = []
        for i, z in enumerate(zones or []):
            name = str(z.get("name", f"zone{i}")) if isinstance(z, dict) else f"zone{i}"
            pts = np.asarray(z.get("polygon") if isinstance(z, dict) else None, dtype=np.float32)
            if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
                raise DeployError(f"zones file {path}: zone {name!r} of stream {stream!r} needs a polygon of >= 3 "
                                  "[x, y] points")  # fmt: skip
            parsed.append(Zone(name, pts))
        cfg.streams[str(stream)] = parsed
    return cfg


def check_zones_fit(zones: list[Zone], *, stream: str, width: int, height: int) -> None:
    """Every polygon point must lie inside the frame (a zone drawn for another resolution is caught here)."""
    for z in zones:
        bad = [(float(x), float(y)) for x, y in z.polygon if not (0 <= x <= width and 0 <= y <= height)]
        if bad:
            raise DeployError(f"zone {z.name!r} of stream {stream!r} has point {bad[0]} outside the {width}x{height} "
                              "frame: redraw it in this stream's pixel coordinates")  # fmt: skip


def update_zones(zones: list[Zone], dets: Detections, *, time: float, frame: int, stream: str, cfg: ZoneConfig,
                 class_names: list[str]) -> tuple[dict[str, int], list[dict]]:  # fmt: skip
    """Count detections per zone for one frame and advance each zone's alarm state; returns (counts, alarm events)."""
    counts, events = update_zones_batch(zones, [dets], times=[time], frames=[frame], stream=stream, cfg=cfg,
                                        class_names=class_names)  # fmt: skip
    return counts[0], events


def _mask_inside(masks: np.ndarray, zone: Zone) -> np.ndarray:
    """(P, H, W) bool masks → (P,) whether each has a pixel inside the zone's polygon."""
    if not len(masks):
        return np.zeros(0, bool)
    return (masks & zone.raster(*masks.shape[1:])).any(axis=(1, 2))


def update_zones_batch(zones: list[Zone], dets: list[Detections], *, times: list[float], frames: list[int],
                       stream: str, cfg: ZoneConfig,
                       class_names: list[str]) -> tuple[list[dict[str, int]], list[dict]]:  # fmt: skip
    """:func:`update_zones` for consecutive frames of one stream: one point-in-polygon call per zone for all of
    them, then the (sequential) debounce/cooldown state per frame. Returns (counts per frame, alarm events)."""
    allowed = None if cfg.classes is None else np.array([n in cfg.classes for n in class_names], bool)
    rows = [np.arange(len(d)) if allowed is None else np.nonzero(allowed[d.classes])[0] for d in dets]
    kept = [d.boxes[r] for d, r in zip(dets, rows, strict=True)]
    sizes = np.array([len(b) for b in kept])
    boxes = np.concatenate(kept) if sizes.sum() else np.zeros((0, 4), np.float32)
    feet = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, boxes[:, 3]], 1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    counts: list[dict[str, int]] = [{} for _ in dets]
    events: list[dict] = []
    if cfg.inside == "mask":
        if any(d.masks is None for d in dets):
            raise DeployError(
                "zones inside: mask needs instance masks: deploy a Mask R-CNN artifact, or set inside: foot"
            )
        inside = {z.name: np.concatenate([_mask_inside(d.masks[r], z) for d, r in zip(dets, rows, strict=True)])
                  for z in zones}  # fmt: skip
    else:
        inside = {z.name: z.contains(feet) for z in zones}
    for j, (t, f) in enumerate(zip(times, frames, strict=True)):
        lo, hi = starts[j], starts[j + 1]
        for z in zones:
            mask = inside[z.name][lo:hi]
            n = int(mask.sum())
            counts[j][z.name] = n
            z.streak = z.streak + 1 if n else 0
            cooled = z.last_alarm is None or t - z.last_alarm >= cfg.cooldown_s
            if z.streak >= cfg.debounce_frames and cooled:
                z.last_alarm, z.alarms = t, z.alarms + 1
                events.append({"type": "alarm", "stream": stream, "zone": z.name, "frame": f, "time": round(t, 3),
                               "count": n, "alarm_index": z.alarms,
                               "boxes": np.round(boxes[lo:hi][mask].astype(np.float64), 1).tolist()})  # fmt: skip
    return counts, events
