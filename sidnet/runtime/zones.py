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

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sidnet.runtime.errors import DeployError
from sidnet.runtime.nms import Detections
from sidnet.safety import load_yaml


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


MAX_POINTS = 256  # per polygon: the self-intersection check is O(P²)
MAX_DEBOUNCE = 1_000_000
FIX = "see the format in sidnet/runtime/zones.py"


def load_zones(path: str | Path, *, streams: list[str]) -> ZoneConfig:
    """Parse and check a zones YAML against the stream names of this run (an unknown stream is an error).

    Every value is checked before use, each error one line naming the file, the stream/zone and the value: integer
    ``debounce_frames`` >= 1, finite ``cooldown_s`` >= 0, ``classes`` a list of names, polygons of 3..256 finite
    ``[x, y]`` points that do not cross themselves. The file is read as data (bounded, few YAML aliases)."""
    path = Path(path)
    if not path.exists():
        raise DeployError(f"zones file not found: {path}; pass a YAML as documented in sidnet/runtime/zones.py")
    raw = load_yaml(path, what="zones file", fix=FIX) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("streams"), dict):
        raise DeployError(f"zones file {path} needs a `streams:` mapping of stream name → list of zones")
    unknown = set(raw) - {"debounce_frames", "cooldown_s", "classes", "inside", "streams"}
    if unknown:
        raise DeployError(f"zones file {path}: unknown key(s) {sorted(map(str, unknown))}; allowed: debounce_frames, "
                          "cooldown_s, classes, inside, streams")  # fmt: skip
    debounce, cooldown, classes = raw.get("debounce_frames", 3), raw.get("cooldown_s", 10.0), raw.get("classes")
    inside = raw.get("inside", "foot")
    if inside not in ("foot", "mask"):
        raise DeployError(f"zones file {path}: inside: {inside!r}; use foot (the box's bottom centre) or mask")
    if not _is_int(debounce) or not 1 <= debounce <= MAX_DEBOUNCE:
        raise DeployError(f"zones file {path}: debounce_frames: {debounce!r} must be a whole number of frames in "
                          f"1..{MAX_DEBOUNCE}, e.g. 3")  # fmt: skip
    if not _is_number(cooldown) or cooldown < 0:
        raise DeployError(f"zones file {path}: cooldown_s: {cooldown!r} must be a finite number of seconds >= 0")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DeployError(f"zones file {path}: classes: {classes!r} must be a list of class names, e.g. [person]")
    cfg = ZoneConfig(debounce_frames=int(debounce), cooldown_s=float(cooldown), classes=classes, inside=inside)
    for stream, zones in raw["streams"].items():
        if stream not in streams:
            raise DeployError(f"zones file {path} names stream {stream!r}, which is not a source of this run "
                              f"({', '.join(streams)}): name sources as {stream}=PATH")  # fmt: skip
        if zones is not None and not isinstance(zones, list):
            raise DeployError(f"zones file {path}: stream {stream!r} must hold a list of zones (- name: …), "
                              f"got {type(zones).__name__}")  # fmt: skip
        parsed = [_zone(z, i, stream=stream, path=path) for i, z in enumerate(zones or [])]
        names = [z.name for z in parsed]
        if len(set(names)) != len(names):
            raise DeployError(f"zones file {path}: stream {stream!r} has two zones named alike ({', '.join(names)}): "
                              "give each zone its own name")  # fmt: skip
        cfg.streams[str(stream)] = parsed
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _zone(z, i: int, *, stream: str, path: Path) -> Zone:
    name = z.get("name", f"zone{i}") if isinstance(z, dict) else f"zone{i}"
    where = f"zones file {path}: zone {name!r} of stream {stream!r}"
    if not isinstance(z, dict) or not isinstance(name, (str, int)) or set(z) - {"name", "polygon"}:
        raise DeployError(f"{where}: a zone is a mapping with name: and polygon: only; {FIX}")
    pts = z.get("polygon")
    if not isinstance(pts, list) or not 3 <= len(pts) <= MAX_POINTS:
        raise DeployError(f"{where} needs a polygon of 3..{MAX_POINTS} [x, y] points, got "
                          f"{len(pts) if isinstance(pts, list) else repr(pts)[:40]}")  # fmt: skip
    for k, p in enumerate(pts):
        if not (isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p)):
            raise DeployError(f"{where}: point {k} is {p!r}; each point is [x, y], two finite numbers in frame pixels")
    poly = np.asarray(pts, dtype=np.float64)
    crossing = self_intersection(poly)
    if crossing is not None:
        a, b = crossing
        raise DeployError(f"{where}: its polygon crosses itself (edge {a}-{(a + 1) % len(poly)} meets edge "
                          f"{b}-{(b + 1) % len(poly)}); list the points in order around the zone")  # fmt: skip
    return Zone(str(name), poly.astype(np.float32))


def _orient(p, q, r) -> float:
    return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])


def _on_segment(p, q, r) -> bool:  # r on segment pq, given the three are collinear
    return min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1])


def segments_intersect(p1, p2, q1, q2) -> bool:
    """Whether closed segments p1p2 and q1q2 share a point (crossing, touching or collinear overlap)."""
    d1, d2, d3, d4 = _orient(q1, q2, p1), _orient(q1, q2, p2), _orient(p1, p2, q1), _orient(p1, p2, q2)
    if ((d1 > 0) != (d2 > 0)) and d1 != 0 and d2 != 0 and ((d3 > 0) != (d4 > 0)) and d3 != 0 and d4 != 0:
        return True
    return ((d1 == 0 and _on_segment(q1, q2, p1)) or (d2 == 0 and _on_segment(q1, q2, p2))
            or (d3 == 0 and _on_segment(p1, p2, q1)) or (d4 == 0 and _on_segment(p1, p2, q2)))  # fmt: skip


def self_intersection(poly: np.ndarray) -> tuple[int, int] | None:
    """The first pair of edges (i, j) of the closed polygon that meet other than at their shared corner, or None.

    Adjacent edges share a corner and meet only there unless one folds back over the other; non-adjacent edges must
    not meet at all. A polygon with no area (all points on one line) folds back and is caught too."""
    n = len(poly)
    edges = [(poly[i], poly[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            (a, b), (c, d) = edges[i], edges[j]
            if j == i + 1 or (i == 0 and j == n - 1):  # adjacent: shared corner; folding back is collinear overlap
                shared, far_i, far_j = (b, a, d) if j == i + 1 else (a, b, c)
                if _orient(far_i, shared, far_j) == 0 and np.dot(far_i - shared, far_j - shared) > 0:
                    return i, j
                continue
            if segments_intersect(a, b, c, d):
                return i, j
    return None


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
