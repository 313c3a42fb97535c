"""What SIDNet trusts, as rules every entry point applies (the README's "What SIDNet trusts" states them for users).

- **Names** (``name=``, stream names) are single path components: no ``/``, ``..``, NUL or empty name.
- **Interpolations that read the environment** (``${oc.env:…}``, ``${oc.decode:…}``) are refused in composed configs and
  data YAMLs: a secret must not become a folder name, a config line or a checkpoint field.
- **Run folders** are created only when new (or empty) or when they are a run of this project (:data:`RUN_MARKER`).
- **Artifact manifests** name files inside their own folder only (resolved, so no symlink escape); a named file that
  is missing or not a regular file fails the check.
- **Outputs** are written as regular files only: an existing FIFO, device, folder or symlink at the destination is
  refused, never replaced.
- **Inputs** are opened only when they are regular files (stat, then open without blocking, then fstat) and read with
  a size bound (:data:`LIMITS`).
- **Sizes** from configs and artifact metadata are bounded before anything is allocated (:func:`check_input_size`).
- **YAML** is read with PyYAML's safe loader and at most :data:`MAX_YAML_ALIASES` aliases (no alias bombs).

Bad input raises :class:`UnsafeInputError` (a ``ValueError``): one line naming the file or key, the value and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

RUN_MARKER = ".sidnet-run"
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 4096  # the network downsamples by 32; 4096² × 3 × 4 B = 192 MiB per image
MAX_YAML_ALIASES = 64
MAX_JSON_DEPTH = 32
MiB = 1 << 20
LIMITS = {  # bytes read at most, by kind of file
    "yaml": 4 * MiB,  # zones, data YAMLs, anchors
    "json": 64 * MiB,  # manifests, sidecars (an engine's layer list runs to MBs)
    "label": 16 * MiB,  # one YOLO label file
    "image": 256 * MiB,  # one frame or calibration image (its pixel count is bounded separately)
    "onnx": 2048 * MiB,  # protobuf's own 2 GiB limit
    "metadata": 1 * MiB,  # one ONNX metadata value
}
_ENV_RESOLVER = re.compile(r"\$\{\s*(oc\.env|oc\.decode|env)\s*:")


class UnsafeInputError(ValueError):
    """A name, path, file or size SIDNet refuses; the message is one line with the file/key, the value and the fix."""


# -- names and interpolations ------------------------------------------------------------------------------------------
def check_name(value: Any, *, key: str, fix: str) -> str:
    """``value`` as a single path component (a run or stream name), else :class:`UnsafeInputError`."""
    text = str(value)
    if text in ("", ".", "..") or "/" in text or "\\" in text or "\0" in text or len(text.encode()) > 255:
        raise UnsafeInputError(f"{key}={text!r} is not a single folder name (no '/', '..', empty or over 255 bytes); "
                               f"{fix}")  # fmt: skip
    return text


def refuse_env_interpolations(node: Any, *, where: str, key: str = "") -> None:
    """Walk an unresolved config (``OmegaConf.to_container(cfg, resolve=False)``): no value may read the environment."""
    if isinstance(node, dict):
        for k, v in node.items():
            refuse_env_interpolations(v, where=where, key=f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            refuse_env_interpolations(v, where=where, key=f"{key}[{i}]")
    elif isinstance(node, str) and _ENV_RESOLVER.search(node):
        raise UnsafeInputError(f"{key}={node!r} in {where} reads the environment (oc.env/oc.decode interpolation), "
                               "which SIDNet refuses in names, paths and configs: write the value itself")  # fmt: skip


# -- run folders -------------------------------------------------------------------------------------------------------
def _legacy_run(folder: Path) -> bool:
    # Runs written before the marker existed: python -m train always wrote these two.
    return (folder / ".hydra" / "config.yaml").is_file() and (folder / "train.log").is_file()


def claim_run_dir(run_dir: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Create ``run_dir`` (or accept it: empty, or a run of this project) and mark it as a SIDNet run folder
    (``create=False``: only the check, nothing written)."""
    run_dir = Path(run_dir)
    fix = "choose a new name=... (or hydra.run.dir=...) for this run"
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise UnsafeInputError(f"run folder {run_dir} exists and is not a folder; {fix}")
        if not (run_dir / RUN_MARKER).is_file() and any(run_dir.iterdir()) and not _legacy_run(run_dir):
            raise UnsafeInputError(f"{run_dir} exists and is not a SIDNet run folder (no {RUN_MARKER} in it): training "
                                   f"writes only into new or its own folders; {fix}")  # fmt: skip
    if not create:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / RUN_MARKER
    if not marker.exists():
        check_output_file(marker)
        marker.write_text("a SIDNet training run folder (python -m train writes here)\n")
    return run_dir


# -- files named by artifacts ------------------------------------------------------------------------------------------
def contained_file(folder: str | os.PathLike[str], name: Any, *, what: str, fix: str) -> Path:
    """``folder/name`` when it resolves inside ``folder`` and is an existing regular file."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise UnsafeInputError(f"{what} names no file ({name!r}); {fix}")
    path = folder / name
    root = folder.resolve()
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
        raise UnsafeInputError(f"{what} names {name!r}, outside its folder {folder} (an artifact may only name files "
                               f"beside it); {fix}")  # fmt: skip
    try:
        st = os.stat(path)
    except OSError as e:
        raise UnsafeInputError(f"{what} names {name!r}, which is missing from {folder} ({e.strerror}); {fix}") from e
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeInputError(f"{what} names {name!r} in {folder}, which is not a regular file; {fix}")
    return path


# -- outputs -----------------------------------------------------------------------------------------------------------
def check_output_file(path: str | os.PathLike[str]) -> Path:
    """``path`` may be (over)written: it does not exist or is a regular file (never a FIFO, device, folder, symlink)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(st.st_mode):
        kind = "symlink" if stat.S_ISLNK(st.st_mode) else "folder" if stat.S_ISDIR(st.st_mode) else "special file"
        raise UnsafeInputError(f"output {path} exists and is a {kind}, not a regular file: SIDNet never replaces one; "
                               "remove it or write elsewhere")  # fmt: skip
    return path


def open_output(path: str | os.PathLike[str], mode: str = "w"):
    """``open(path, mode)`` for a streamed output (JSON-lines) after :func:`check_output_file`."""
    return open(check_output_file(path), mode)  # noqa: SIM115  (the caller closes it)


# -- inputs ------------------------------------------------------------------------------------------------------------
def read_bytes(path: str | os.PathLike[str], *, kind: str, what: str = "file", fix: str = "") -> bytes:
    """The bytes of a regular file of at most ``LIMITS[kind]`` bytes. Opens without blocking (a FIFO or a device
    that slipped in after the stat never hangs the read), then checks again on the open descriptor."""
    path, limit = Path(path), LIMITS[kind]
    fix = f"; {fix}" if fix else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise UnsafeInputError(f"{what} {path} cannot be opened ({e.strerror}){fix}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind_of = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO, device or socket"
            raise UnsafeInputError(f"{what} {path} is a {kind_of}, not a regular file: SIDNet reads only regular "
                                   f"files{fix}")  # fmt: skip
        if st.st_size > limit:
            raise UnsafeInputError(f"{what} {path} is {st.st_size / MiB:.1f} MiB, over the {limit / MiB:.0f} MiB "
                                   f"bound for a {kind} file{fix}")  # fmt: skip
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew after the stat
        raise UnsafeInputError(f"{what} {path} is over the {limit / MiB:.0f} MiB bound for a {kind} file{fix}")
    return data


def read_text(path: str | os.PathLike[str], *, kind: str, what: str = "file", fix: str = "") -> str:
    data = read_bytes(path, kind=kind, what=what, fix=fix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeInputError(f"{what} {path} is not UTF-8 text (byte {e.start}){'; ' + fix if fix else ''}") from e


def require_regular(path: str | os.PathLike[str], *, what: str, fix: str) -> Path:
    """``path`` exists and is a regular file (for readers that open it themselves: ONNX, TensorRT, video)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsafeInputError(f"{what} not found: {path}; {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeInputError(f"{what} {path} is not a regular file (a folder, FIFO or device); {fix}")
    return path


def _depth(node: Any) -> int:
    depth, level = 0, [node]
    while level:  # breadth-first: no recursion on hostile nesting
        depth += 1
        level = [v for n in level for v in (n.values() if isinstance(n, dict) else n if isinstance(n, list) else ())]
        level = [v for v in level if isinstance(v, (dict, list))]
    return depth


def parse_json(text: str | bytes, *, what: str, fix: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with one-line errors, nesting bounded at ``max_depth`` levels."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting past the interpreter's stack
        raise UnsafeInputError(f"{what} is not valid JSON ({one_line(e)[:120] or 'nested too deep'}); {fix}") from e
    if _depth(data) > max_depth:
        raise UnsafeInputError(f"{what} nests JSON deeper than {max_depth} levels; {fix}")
    return data


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


# -- YAML --------------------------------------------------------------------------------------------------------------
def load_yaml(path: str | os.PathLike[str], *, what: str, fix: str, max_aliases: int = MAX_YAML_ALIASES) -> Any:
    """A YAML file (regular, bounded) through the safe loader, refusing more than ``max_aliases`` aliases."""
    import yaml

    text = read_text(path, kind="yaml", what=what, fix=fix)

    class _Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):  # noqa: ANN001  (PyYAML's signature)
            if self.check_event(yaml.AliasEvent):
                _Loader.aliases += 1
                if _Loader.aliases > max_aliases:
                    raise UnsafeInputError(f"{what} {path} uses more than {max_aliases} YAML aliases (*name): refused "
                                           f"as an alias bomb; write the values out; {fix}")  # fmt: skip
            return super().compose_node(parent, index)

    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise UnsafeInputError(f"{what} {path} is not valid YAML ({one_line(str(e).splitlines()[0])}); {fix}") from e
    if _depth(data) > MAX_JSON_DEPTH:
        raise UnsafeInputError(f"{what} {path} nests deeper than {MAX_JSON_DEPTH} levels; {fix}")
    return data


# -- sizes -------------------------------------------------------------------------------------------------------------
def check_input_size(value: Any, *, where: str, fix: str = "use a multiple of 32 such as 320, 416 or 608") -> int:
    """A network input size: an integer in [:data:`MIN_INPUT_SIZE`, :data:`MAX_INPUT_SIZE`], a multiple of 32."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value, ok = int(value), True
    if not ok or not MIN_INPUT_SIZE <= value <= MAX_INPUT_SIZE or value % 32:
        raise UnsafeInputError(f"input size {value!r} ({where}) must be a multiple of 32 in {MIN_INPUT_SIZE}.."
                               f"{MAX_INPUT_SIZE} (bounded before any allocation); {fix}")  # fmt: skip
    return int(value)


def load_onnx(path: str | os.PathLike[str], *, what: str = "ONNX model", fix: str = "re-export with python -m export"):
    """An ONNX file as a ModelProto: regular, under 2 GiB, parsed with one-line errors, self-contained (SIDNet exports
    never use external data, so an external-data reference, which could name any file, is refused), metadata values
    bounded."""
    import onnx

    data = read_bytes(path, kind="onnx", what=what, fix=fix)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001  (protobuf raises several types for a corrupt file)
        raise UnsafeInputError(f"{path} is not a readable ONNX model ({type(e).__name__}); {fix}") from e
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsafeInputError(f"{path} keeps tensor {t.name!r} in external data files: SIDNet artifacts are "
                                   f"self-contained and never read files an ONNX names; {fix}")  # fmt: skip
    for p in model.metadata_props:
        if len(p.value) > LIMITS["metadata"]:
            raise UnsafeInputError(f"{path}: ONNX metadata {p.key!r} is over {LIMITS['metadata'] // MiB} MiB; {fix}")
    return model


# -- images ------------------------------------------------------------------------------------------------------------
MAX_IMAGE_PIXELS = 64_000_000  # 64 MP: one decoded frame stays under 200 MiB


def read_image(path: str | os.PathLike[str], *, what: str = "image", fix: str = "remove or replace it",
               exif_orientation: bool = True):  # fmt: skip
    """A regular image file (bounded read) decoded to BGR uint8 (H, W, 3), its pixel count checked from the header
    before decoding (a 30,000² PNG is refused, not decoded); undecodable → :class:`UnsafeInputError`."""
    import io
    import warnings

    import cv2
    import numpy as np
    from PIL import Image

    data = read_bytes(path, kind="image", what=what, fix=fix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our bound below is the policy
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:  # over PIL's own limit, which is far above ours
        raise UnsafeInputError(f"{what} {path} is over the {MAX_IMAGE_PIXELS // 10**6} MP bound on a decoded frame "
                               f"({one_line(e)[:60]}); downscale it or {fix}") from None
    except Exception:  # noqa: BLE001  (PIL raises a zoo of types; OpenCV may still read what PIL cannot)
        w = h = 0
    if w * h > MAX_IMAGE_PIXELS:
        raise UnsafeInputError(f"{what} {path} is {w}x{h}, over the {MAX_IMAGE_PIXELS // 10**6} MP bound on a decoded "
                               f"frame; downscale it or {fix}")  # fmt: skip
    flags = cv2.IMREAD_COLOR | (0 if exif_orientation else cv2.IMREAD_IGNORE_ORIENTATION)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None:
        raise UnsafeInputError(f"cannot decode {what} {path}: {fix}")
    return bgr
