"""Frame sources for ``python -m deploy``: image folders, video files, and live streams (RTSP/HTTP URLs, webcams).

Every source yields :class:`Frame` objects (RGB uint8) from ``read()`` until it returns ``None``. Opening checks
the input at once (an empty folder, a video OpenCV cannot decode, a folder entry that is not a regular file, two
images whose annotated outputs would share a name → :class:`DeployError`), so that bad input stops the run before
anything starts. A live source that never delivered a frame fails at once (it is not retried: a wrong URL or a dead
camera is the user's to fix), and OpenCV's open/read waits are bounded by ``first_frame_timeout`` seconds (the
pipeline's watchdog bounds the whole wait for the first frame too). A live source that worked and drops reconnects
with exponential back-off and reports each attempt through ``on_event``; only after ``max_retries`` failed attempts in
a row does it give up, and then only that stream ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sidnet.runtime.errors import DeployError
from sidnet.safety import read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass
class Frame:
    stream: str
    index: int  # 0, 1, … per stream
    time: float  # seconds: stream position for files (index / fps), wall clock since open for live streams
    image: np.ndarray  # (H, W, 3) uint8 RGB (a torch CUDA tensor when decoded by NVDEC)
    name: str = ""  # file name for image folders
    capture: float = 0.0  # time.monotonic() when the frame was captured (decode start; paced: its due time)
    seq: int = -1  # position in its stream's frame ring (process/NVDEC decode), for releasing the slot


class ImageFolderSource:
    live = False

    def __init__(self, name: str, folder: Path, *, fps: float = 1.0) -> None:
        self.name, self.fps = name, fps
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DeployError(f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                              "point the source at a folder of frames, a video file or a stream URL")  # fmt: skip
        odd = next((p for p in self.files if not p.is_file()), None)
        if odd is not None:
            raise DeployError(f"{odd} in source folder {folder} is not a regular file (a folder, FIFO or device): "
                              "remove it; deploy reads only regular image files")  # fmt: skip
        stems: dict[str, Path] = {}
        for p in self.files:
            if (other := stems.setdefault(p.stem, p)) is not p:
                raise DeployError(f"{other.name} and {p.name} in source folder {folder} share the name {p.stem!r}: "
                                  f"their annotated outputs would both be {name}/{p.stem}.jpg; rename one")  # fmt: skip
        self.pos = 0
        self.num_frames = len(self.files)

    def read(self) -> Frame | None:
        if self.pos >= len(self.files):
            return None
        path, capture = self.files[self.pos], time.monotonic()
        bgr = read_image(path, what="image", fix="remove it or replace it with a readable image")
        frame = Frame(self.name, self.pos, self.pos / self.fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), path.name,
                      capture=capture)  # fmt: skip
        self.pos += 1
        return frame

    def close(self) -> None:
        pass


class VideoFileSource:
    live = False

    def __init__(self, name: str, path: Path, *, threads: int = 0) -> None:
        self.name, self.path = name, path
        # threads: FFmpeg's decoding threads (0: its default, one per core; decode workers share the cores)
        params = [cv2.CAP_PROP_N_THREADS, threads] if threads and hasattr(cv2, "CAP_PROP_N_THREADS") else []
        self.cap = cv2.VideoCapture(str(path), cv2.CAP_ANY, params)
        ok, bgr = self.cap.read() if self.cap.isOpened() else (False, None)
        if not ok:
            self.cap.release()
            raise DeployError(f"cannot read video {path}: OpenCV decodes no frame from it (corrupt, or a codec "
                              "this OpenCV lacks); re-encode it, e.g. ffmpeg -i in -c:v libx264 out.mp4")  # fmt: skip
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 25.0
        self.num_frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # the container's count: a bar's total
        self.size = (bgr.shape[1], bgr.shape[0])
        self._first, self.pos = bgr, 0

    def read(self, out: np.ndarray | None = None) -> Frame | None:
        """The next frame (RGB), converted into ``out`` when given (a shared-memory slot: no extra copy)."""
        capture = time.monotonic()
        if self._first is not None:
            bgr, self._first = self._first, None
        else:
            ok, bgr = self.cap.read()
            if not ok:
                return None
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out)
        frame = Frame(self.name, self.pos, self.pos / self.fps, rgb, capture=capture)
        self.pos += 1
        return frame

    def skip(self) -> bool:
        """Advance one frame without converting it (a paced stream that fell behind drops it)."""
        if self._first is not None:
            self._first = None
        elif not self.cap.grab():
            return False
        self.pos += 1
        return True

    def close(self) -> None:
        self.cap.release()


class LiveSource:
    """A camera or stream URL; reconnects with back-off ``min(backoff[0]·2^k, backoff[1])`` seconds.

    ``max_retries``: failed reconnect attempts in a row before the stream is given up (``None``: never).
    ``max_frames``: stop after this many frames (live streams have no end of their own).
    """

    live = True

    def __init__(self, name: str, url: str | int, *, backoff: tuple[float, float] = (0.5, 30.0),
                 max_retries: int | None = None, max_frames: int | None = None, first_frame_timeout: float = 20.0,
                 on_event: Callable[[dict], None] | None = None, opener=None) -> None:  # fmt: skip
        self.name, self.url, self.backoff, self.max_retries = name, url, backoff, max_retries
        self.max_frames, self.on_event = max_frames, on_event or (lambda e: None)
        self.first_frame_timeout = first_frame_timeout
        self.opener = opener or (lambda url: _capture(url, timeout_s=first_frame_timeout))
        self.pos, self.reconnects, self.t0 = 0, 0, time.monotonic()
        self.cap = None
        self._stop = False

    def _open(self) -> bool:
        cap = self.opener(self.url)
        if cap.isOpened():
            self.cap = cap
            return True
        cap.release()
        return False

    def stop(self) -> None:
        self._stop = True

    def never_delivered(self, why: str) -> DeployError:
        return DeployError(f"stream {self.name} ({self.url}) {why} and never delivered a frame: check the URL or "
                           "camera (a stream that never worked is not retried; --first-frame-timeout sets the "
                           f"wait, now {self.first_frame_timeout:g} s)")  # fmt: skip

    def read(self) -> Frame | None:
        if self.max_frames is not None and self.pos >= self.max_frames:
            return None
        if self.pos == 0 and self.reconnects == 0:  # the first frame: no reconnect policy for a stream never seen
            if self.cap is None and not self._open():
                raise self.never_delivered("could not be opened")
            ok, bgr = self.cap.read()
            if not ok:
                raise self.never_delivered("opened")
            self.pos, now = 1, time.monotonic()
            return Frame(self.name, 0, now - self.t0, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), capture=now)
        failures = 0
        while not self._stop:
            if self.cap is not None:
                ok, bgr = self.cap.read()
                if ok:
                    now = time.monotonic()
                    frame = Frame(self.name, self.pos, now - self.t0, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), capture=now)
                    self.pos += 1
                    return frame
                self.cap.release()
                self.cap = None
                self.on_event({"type": "stream_lost", "stream": self.name, "frame": self.pos})
            if self.max_retries is not None and failures >= self.max_retries:
                self.on_event({"type": "stream_gave_up", "stream": self.name, "attempts": failures})
                return None
            delay = min(self.backoff[0] * 2**failures, self.backoff[1])
            time.sleep(delay)
            failures += 1
            self.reconnects += 1
            ok = self._open()
            self.on_event({"type": "reconnect", "stream": self.name, "attempt": failures, "delay_s": delay,
                           "ok": ok})  # fmt: skip
            if ok:
                failures = 0
        return None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()


def _capture(url: str | int, *, timeout_s: float) -> cv2.VideoCapture:
    """``cv2.VideoCapture`` whose open and read waits (FFmpeg network streams) are bounded by ``timeout_s``."""
    ms = int(timeout_s * 1000)
    return cv2.VideoCapture(url, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])


def parse_source(spec: str, index: int) -> tuple[str, str]:
    """``name=target`` or ``target`` (named ``stream<index>``)."""
    if "=" in spec and not spec.startswith(LIVE_PREFIXES):
        name, target = spec.split("=", 1)
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise DeployError(f"source name {name!r} in {spec!r}: use letters, digits, - and _ (name=path)")
        return name, target
    return f"stream{index}", spec


def open_source(name: str, target: str, **live_options):
    """An image folder, a video file, a URL (``rtsp://``, ``http://`` …) or a webcam index (``0``)."""
    if target.startswith(LIVE_PREFIXES):
        return LiveSource(name, target, **live_options)
    if target.isdigit():
        return LiveSource(name, int(target), **live_options)
    path = Path(target)
    if path.is_dir():
        return ImageFolderSource(name, path)
    if path.is_file():
        return VideoFileSource(name, path)
    raise DeployError(f"source {target!r} is not a folder, a file, a stream URL (rtsp://, http://…) or a webcam "
                      "index: check the path")  # fmt: skip
