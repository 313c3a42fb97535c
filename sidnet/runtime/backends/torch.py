"""``torch`` backend: a checkpoint run the fastest way this project knows on an NVIDIA GPU.

- BatchNorm folded into the convs, conv + bias + ReLU as one cuDNN call (:mod:`sidnet.models.fuse`);
- 2x2 max pooling by the ``csrc/maxpool`` NHWC kernel (PyTorch's NHWC half pooling was 39% of the batch-64 time);
- the first conv (3 input channels) + ReLU + max-pool as one ``csrc/stem`` kernel (cuDNN ran that conv with a generic
  kernel, and its 416x416x32 output went to memory only to be pooled);
- FP16 weights and activations, channels_last (NHWC: the layout the tensor-core conv kernels read natively);
- one CUDA graph per batch size (captured on first use), holding the network *and* the decode tail: the fused
  ``csrc/`` region decode + threshold + top-K kernel (:func:`sidnet.kernels.region_topk`) when the kernels library
  is built, else the same computation in PyTorch (:class:`sidnet.graph.wrapper.TopKDecode`; ``decode`` says which);
- letterbox and normalisation on the GPU (:class:`GpuLetterbox`): uint8 frames go up as they were decoded (a third
  of the bytes of float, and no CPU resize), through pinned host buffers on a copy stream, while the compute stream
  works; results come back through pinned buffers too.

:class:`GraphRunner` is the part shared with the ``compiled`` backend, which passes its AOTInductor module instead.
On a CPU (CI) the same code runs eagerly in FP32 without graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sidnet.letterbox import LETTERBOX_FILL, LetterboxInfo
from sidnet.runtime.artifact import ArtifactInfo
from sidnet.runtime.errors import DeployError

log = logging.getLogger("sidnet.runtime")
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # (dets (N, K, 6), num (N,), *extra per-image outputs)


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; an explicit cuda without one is a one-line DeployError."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeployError("--device cuda but torch sees no CUDA GPU: use --device cpu")
    return dev


def letterbox_geometry(h: int, w: int, size: int) -> LetterboxInfo:
    """The placement :func:`sidnet.letterbox.letterbox` uses (same rounding), without touching pixels."""
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return LetterboxInfo(scale=scale, pad_x=(size - new_w) // 2, pad_y=(size - new_h) // 2, orig_h=h, orig_w=w)


class GpuLetterbox:
    """RGB uint8 frames (any sizes) → the network input ``out`` (N, 3, S, S), [0, 1], grey-114 padded.

    Frames of one size are resized in one ``F.interpolate`` call (bilinear, half-pixel centres like
    ``cv2.INTER_LINEAR``; cv2 rounds to uint8 in between, this does not: values differ by at most ~1/255).
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self._pinned: dict[tuple, torch.Tensor] = {}
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _staging(self, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._pinned.get(shape)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._pinned[shape] = buf
        return buf

    def upload(self, frames: Sequence[np.ndarray]) -> list[tuple[list[int], torch.Tensor]]:
        """Copy frames to the device grouped by size (on the copy stream); returns [(indices, (k, H, W, 3) uint8)]."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(frames):
            if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
                raise DeployError(f"frame {i}: expected (H, W, 3) uint8 RGB, got {f.dtype} {f.shape}")
            groups.setdefault(f.shape, []).append(i)
        out = []
        ctx = torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else _null()
        with ctx:
            for shape, idx in groups.items():
                host = self._staging((len(idx), *shape))
                for j, i in enumerate(idx):
                    host[j].numpy()[...] = frames[i]
                out.append((idx, host.to(self.device, non_blocking=True)))
        return out

    def __call__(self, uploaded: list[tuple[list[int], torch.Tensor]], out: torch.Tensor) -> list[LetterboxInfo]:
        """Letterbox into ``out`` (on the current stream, after the uploads); returns one info per frame."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        n = sum(len(idx) for idx, _ in uploaded)
        infos: list[LetterboxInfo | None] = [None] * n
        out[:n].fill_(LETTERBOX_FILL / 255.0)
        for idx, x in uploaded:
            rows = torch.as_tensor(idx, device=out.device)
            info = letterbox_into(x, out, rows=rows, size=self.size, fill=False)
            for i in idx:
                infos[i] = info
        return infos  # type: ignore[return-value]


def letterbox_into(x: torch.Tensor, out: torch.Tensor, *, rows: torch.Tensor | slice = slice(None), size: int,
                   fill: bool = True) -> LetterboxInfo:  # fmt: skip
    """(k, H, W, 3) uint8 frames of one size → ``out[rows]`` (k, 3, S, S) in [0, 1], grey-padded: one resize of the
    whole group, in ``out``'s dtype on a GPU (half the bytes). Static shapes only: it is captured in CUDA graphs."""
    h, w = x.shape[1:3]
    info = letterbox_geometry(h, w, size)
    nh, nw = max(1, round(h * info.scale)), max(1, round(w * info.scale))
    work = out.dtype if out.is_cuda else torch.float32
    if fill:  # (a slice of rows: indexing with a tensor would fill a copy)
        out[rows].fill_(LETTERBOX_FILL / 255.0)
    y = x.permute(0, 3, 1, 2).to(work)
    if (nh, nw) != (h, w):
        y = F.interpolate(y, size=(nh, nw), mode="bilinear", align_corners=False)
    out[rows, :, info.pad_y : info.pad_y + nh, info.pad_x : info.pad_x + nw] = (y * (1 / 255.0)).to(out.dtype)
    return info


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _numpy(outs: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """Device outputs → host arrays (floating ones as float32)."""
    return tuple(o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs)


class GraphRunner:
    """``forward`` (static-shape friendly: (N, 3, S, S) → (dets (N, K, 6) fp32, num (N,), *extra outputs such as
    Mask R-CNN's masks)) captured in one CUDA graph per batch size, plus GPU letterbox and pinned output buffers. On
    CPU: eager, no graphs. The frames path (:meth:`submit_frames`) carries dets and num only."""

    def __init__(self, forward: Forward, *, info: ArtifactInfo, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, graphs: bool = True, max_batch: int | None = None) -> None:  # fmt: skip
        self.forward, self.info, self.device, self.dtype = forward, info, device, dtype
        self.channels_last = channels_last
        self.graphs = graphs and device.type == "cuda"
        # On a CPU the Detector letterboxes with OpenCV (the training/evaluation code path) and calls ``infer``.
        self.gpu_preprocess = device.type == "cuda"
        self.max_batch = max_batch
        self.letterbox = GpuLetterbox(info.input_size, device)
        self._static: dict[int, dict] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._fused: dict[tuple, dict] = {}
        self._parity = 0
        self._registered: dict[int, int] = {}  # page-locked host ranges: address → bytes

    def new_input(self, n: int) -> torch.Tensor:
        s = self.info.input_size
        x = torch.empty((n, 3, s, s), dtype=self.dtype, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def bucket(self, n: int) -> int:
        """The batch size actually run for ``n`` frames: the next power of two (capped at ``max_batch``), so a
        multi-stream batcher that hands over 5, 7, 12 … frames reuses a few captured graphs instead of capturing
        (and cuDNN-autotuning) one per size. The extra rows compute on stale input and are dropped."""
        if not self.graphs:
            return n
        b = 1 << max(0, n - 1).bit_length()
        return min(b, self.max_batch) if self.max_batch is not None and n <= self.max_batch else b

    def warmup(self, max_batch: int) -> None:
        """Capture every bucket up to ``max_batch`` now, so the first frames do not pay for it."""
        b = 1
        while b < max_batch:
            self.slot(b)
            b *= 2
        self.slot(self.bucket(max_batch))

    def slot(self, n: int) -> dict:
        """The static buffers (and graph) for batch ``n``; captured on first use."""
        if self.max_batch is not None and n > self.max_batch:
            raise DeployError(f"batch {n} is larger than this artifact's maximum {self.max_batch}: lower --batch")
        slot = self._static.get(n)
        if slot is not None:
            return slot
        x = self.new_input(n)
        x.copy_(torch.rand(x.shape, generator=torch.Generator().manual_seed(n)).to(x))
        slot = {"input": x}
        if not self.graphs:
            self._static[n] = slot
            return slot
        with torch.cuda.stream(self.stream):
            for _ in range(3):  # warm-up outside the graph: cuDNN algorithm choice, lazy inits
                self.forward(x)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self.stream):
            outs = tuple(self.forward(x))
        slot.update(graph=graph, outs=outs, dets=outs[0], num=outs[1],
                    host=tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs),
                    done=torch.cuda.Event())  # fmt: skip
        self._static[n] = slot
        log.debug("captured a CUDA graph for batch %d", n)
        return slot

    def run(self, n: int) -> tuple[torch.Tensor, ...]:
        """Run the network on ``slot(n)['input']`` (already filled); device tensors (dets, num, *extra)."""
        slot = self.slot(n)
        if not self.graphs:
            with torch.no_grad():
                return tuple(self.forward(slot["input"]))
        slot["graph"].replay()
        return slot["outs"]

    def _to_host(self, n: int, outs: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
        slot = self._static[n]
        if "host" not in slot:  # eager (CPU, or a forward that cannot be captured)
            return _numpy(outs)
        for h, o in zip(slot["host"], outs, strict=True):
            h.copy_(o, non_blocking=True)
        slot["done"].record()
        slot["done"].synchronize()
        return tuple(h.numpy().copy() for h in slot["host"])

    def _stream_ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else _null()

    @torch.no_grad()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        n = images.shape[0]
        b = self.bucket(n)
        slot = self.slot(b)
        with self._stream_ctx():
            images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
            slot["input"][:n].copy_(images)
            outs = self._to_host(b, self.run(b))
        return tuple(o[:n] for o in outs)

    @torch.no_grad()
    def infer_frames(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[LetterboxInfo]]:
        n = len(frames)
        b = self.bucket(n)
        slot = self.slot(b)
        uploaded = self.letterbox.upload(frames)
        with self._stream_ctx():
            infos = self.letterbox(uploaded, slot["input"])
            d, k = self._to_host(b, self.run(b))[:2]
        return d[:n], k[:n], infos

    # ---------------------------------------------------------------- frames → detections, one graph per batch
    def frames_slot(self, b: int, h: int, w: int, parity: int) -> dict:
        """Device (b, H, W, 3) uint8 input and pinned result buffers for batches of frames of one size; two per shape
        (``parity``) so that batch k+1 uploads while batch k computes and k's results wait to be collected."""
        key = (b, h, w, parity)
        fs = self._fused.get(key)
        if fs is None:
            reg = self.slot(b)  # the network graph for this batch size (captured on first use)
            dets = reg.get("dets")
            fs = {"u8": torch.zeros((b, h, w, 3), dtype=torch.uint8, device=self.device),
                  "staging": torch.empty((b, h, w, 3), dtype=torch.uint8, pin_memory=True),
                  "uploaded": torch.cuda.Event(), "free": torch.cuda.Event(), "done": torch.cuda.Event()}  # fmt: skip
            if dets is not None:  # (the frames path carries dets and num; extra outputs stay on the device)
                fs["host_dets"] = torch.empty(dets.shape, dtype=dets.dtype, pin_memory=True)
                fs["host_num"] = torch.empty(reg["num"].shape, dtype=reg["num"].dtype, pin_memory=True)
            fs["free"].record(self.stream)
            self._fused[key] = fs
        return fs

    def warmup_frames(self, max_batch: int, sizes: Sequence[tuple[int, int]]) -> None:
        """Allocate the frame buffers for every bucket up to ``max_batch`` and every (width, height) up front."""
        if self.device.type != "cuda":
            return
        for w, h in sizes:
            for b in sorted({self.bucket(b) for b in range(1, max_batch + 1)}):
                for parity in (0, 1):
                    self.frames_slot(b, h, w, parity)

    def register_host(self, address: int, nbytes: int) -> bool:
        """Page-lock host memory the frames live in (shared-memory rings), so uploads from it are true async DMA."""
        if self.device.type != "cuda":
            return False
        try:
            err = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)
            ok = int(err[0] if isinstance(err, tuple) else err) == 0
        except (AttributeError, RuntimeError, TypeError) as e:
            err, ok = e, False
        if ok:
            self._registered[address] = nbytes
        else:
            log.warning("cudaHostRegister(%d bytes) failed (%s): uploads from the frame rings are staged", nbytes, err)
        return ok

    def _is_registered(self, frame) -> bool:
        a = frame.ctypes.data
        return any(lo <= a and a + frame.nbytes <= lo + size for lo, size in self._registered.items())

    def unregister_host(self, address: int) -> None:
        """Undo :meth:`register_host` (before the memory is unmapped); waits for uploads still reading it."""
        if address in self._registered:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(address)
            del self._registered[address]

    @torch.no_grad()
    def submit_frames(self, frames: Sequence) -> dict:
        """Start a batch (RGB uint8 host arrays or CUDA tensors of one size): upload on the copy stream (from
        page-locked rings: DMA while the previous batch computes), then on the compute stream letterbox + normalise
        the whole batch from uint8 (:func:`letterbox_into`, a few kernels), one replay of the network + top-K graph,
        results copied back asynchronously; :meth:`collect` waits for them. Mixed sizes take :meth:`infer_frames`."""
        n = len(frames)
        shapes = {tuple(f.shape) for f in frames}
        if self.device.type != "cuda" or len(shapes) != 1:
            host = [f.cpu().numpy() if isinstance(f, torch.Tensor) else f for f in frames]
            return {"result": self.infer_frames(host), "n": n}
        h, w, _ = shapes.pop()
        self._parity ^= 1
        b = self.bucket(n)
        fs = self.frames_slot(b, h, w, self._parity)
        copy = self.letterbox.copy_stream
        copy.wait_event(fs["free"])  # the previous batch in these buffers has been letterboxed
        on_device = [f for f in frames if isinstance(f, torch.Tensor)]
        if on_device:  # decoded on the GPU (NVDEC) by another stream
            copy.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(copy):
            u8 = fs["u8"]
            if len(on_device) == n:  # one gather of every stream's ring slot (a batched copy kernel)
                torch.stack(frames, out=u8[:n])
            elif on_device or all(self._is_registered(f) for f in frames):  # DMA straight from the frames
                for j, f in enumerate(frames):
                    u8[j].copy_(f if isinstance(f, torch.Tensor) else torch.from_numpy(f), non_blocking=True)
            else:  # pageable frames: gather them into a pinned buffer, then one DMA
                fs["uploaded"].synchronize()  # the previous upload from this buffer has finished reading it
                host = fs["staging"].numpy()
                for j, f in enumerate(frames):
                    host[j] = f
                u8[:n].copy_(fs["staging"][:n], non_blocking=True)
            fs["uploaded"].record(copy)
        self.stream.wait_event(fs["uploaded"])
        with torch.cuda.stream(self.stream):
            info = letterbox_into(fs["u8"], self.slot(b)["input"], size=self.info.input_size)
            fs["free"].record(self.stream)
            dets, num = self.run(b)[:2]
            if "host_dets" in fs:
                fs["host_dets"].copy_(dets, non_blocking=True)
                fs["host_num"].copy_(num, non_blocking=True)
            else:  # an uncaptured forward: its outputs are fresh tensors
                fs["out"] = (dets.float().to("cpu", non_blocking=True), num.to("cpu", non_blocking=True))
            fs["done"].record(self.stream)
        return {"slot": fs, "n": n, "info": info}

    def ready(self, pending: dict) -> bool:
        return "result" in pending or pending["slot"]["done"].query()

    def collect(self, pending: dict) -> tuple[np.ndarray, np.ndarray, list[LetterboxInfo]]:
        if "result" in pending:
            return pending["result"]
        fs, n = pending["slot"], pending["n"]
        fs["done"].synchronize()
        d, k = (fs["host_dets"], fs["host_num"]) if "host_dets" in fs else fs.pop("out")
        return d.numpy()[:n].copy(), k.numpy()[:n].copy(), [pending["info"]] * n

    def close(self) -> None:
        self._static.clear()
        self._fused.clear()
        for address in list(self._registered):
            self.unregister_host(address)


def decode_tail(model, *, conf_thresh: float, topk: int, use_kernel: bool | None) -> tuple[Callable, str]:
    """raw (N, A·(5+C), H, W) → (dets, num): the fused csrc kernel, or TopKDecode in PyTorch. ``use_kernel=None``:
    the kernel when its library loads. Returns (callable, description)."""
    from sidnet.graph.wrapper import TopKDecode

    s = model.input_size
    if use_kernel is not False:
        try:
            import sidnet.kernels as K

            K.load_library()
            anchors = model.anchors.detach().float().cuda()

            def kernel(raw):
                h, w = raw.shape[-2:]
                return K.region_topk(raw, anchors, stride=(s / w, s / h), conf_thresh=conf_thresh, topk=topk)

            return kernel, "csrc regionTopK (fused decode + threshold + top-K)"
        except (OSError, FileNotFoundError, RuntimeError) as e:
            if use_kernel:
                raise DeployError(f"the fused region kernel was asked for but cannot load: {e}") from e
            log.info("decode: kernels library not available (%s); using TopKDecode in PyTorch", e)
    dec = TopKDecode(model.anchors, input_size=s, conf_thresh=conf_thresh, topk=topk).to(model.anchors.device)
    return dec, "TopKDecode (PyTorch)"


def _kernels_available() -> bool:
    try:
        import sidnet.kernels as K

        K.load_library()
        return True
    except (OSError, FileNotFoundError, RuntimeError) as e:
        log.info("pooling: kernels library not available (%s); using PyTorch's max_pool2d", e)
        return False


def load_checkpoint_model(path: Path):
    """(the model in eval mode, ArtifactInfo) from a training checkpoint."""
    from sidnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    try:
        state = load_checkpoint(path)
        model = model_from_checkpoint(state)
    except CheckpointError as e:
        raise DeployError(str(e)) from e
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise DeployError(f"{path}: cannot rebuild the model ({type(e).__name__}); use a checkpoint written by "
                          "python -m train with this sidnet version") from e  # fmt: skip
    names = (state.get("config") or {}).get("data", {}).get("class_names") or None
    num_classes = model.num_classes
    names = names or (["person"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)])
    anchors = model.anchors.tolist() if isinstance(getattr(model, "anchors", None), torch.Tensor) else []
    info = ArtifactInfo(path=path, backend="torch", input_size=model.input_size, class_names=list(names),
                        anchors=anchors, conf_thresh=0.0, topk=100, model=state["model"]["name"])  # fmt: skip
    return model, info


class DeployModuleBackend(GraphRunner):
    """Any model with an export adapter (:mod:`sidnet.export.adapters`) run through the very module its export traces
    (``adapter.deploy``): for Mask R-CNN the static-shape :class:`~sidnet.export.maskrcnn_deploy.MaskRCNNDeploy`, so
    the torch and onnxruntime backends return the same ``(dets, num[, masks])`` contract. The YOLOv2 family takes the
    tuned :class:`TorchBackend` instead.

    On a CUDA GPU (default FP16, channels_last): one CUDA graph per batch bucket holding the whole module, with the
    module's capturable NMS and the csrc pyramid RoIAlign when the kernels library is built (``kernels``). The graph
    NMS runs a fixed number of matrix steps; when a batch's steps did not reach greedy NMS's answer (the module's
    ``nms_converged`` flag, read with the outputs), that batch is run again eagerly with torchvision's NMS, so results
    never depend on the step count (``nms_reruns`` counts them). On a CPU: FP32, eager."""

    name = "torch"

    def __init__(self, model, info: ArtifactInfo, *, device: str = "auto", conf_thresh: float = 0.001,
                 topk: int = 100, precision: str | None = None, graphs: bool = True,
                 kernels: bool | None = None) -> None:  # fmt: skip
        from sidnet.export.adapters import adapter_for

        dev = resolve_device(device)
        cuda = dev.type == "cuda"
        adapter = adapter_for(model, source=str(info.path))
        precision = precision or ("fp16" if cuda else "fp32")
        if precision not in ("fp32", "fp16") or (precision == "fp16" and not cuda):
            raise DeployError(f"the torch backend runs a {adapter.family} checkpoint in fp32 (or fp16 on a CUDA GPU), "
                              f"not {precision!r} on {dev.type}")  # fmt: skip
        dtype = torch.float16 if precision == "fp16" else torch.float32
        info.precision, info.topk, info.conf_thresh = precision, topk, conf_thresh
        net = adapter.deploy(model.float(), conf_thresh=conf_thresh, topk=topk, backend="onnx").eval()
        graphs = graphs and cuda and hasattr(net, "for_cuda_graphs")
        if graphs:
            torch.backends.cudnn.benchmark = True
            self.kernels = bool(_kernels_available() if kernels is None else kernels)
            net.for_cuda_graphs(kernels=self.kernels)
        else:
            self.kernels = False
        net = net.to(dev, dtype)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        self.net, self.nms_reruns = net, 0
        super().__init__(net, info=info, device=dev, dtype=dtype, channels_last=cuda, graphs=graphs)
        self.gpu_preprocess = False  # the Detector letterboxes (the frames path carries boxes only)

    @torch.no_grad()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        outs = super().infer(images)
        if self.graphs and not bool(self.net.nms_converged):
            self.nms_reruns += 1
            log.info("graph NMS did not converge for a batch of %d: re-run with torchvision's NMS", len(images))
            mode, self.net.nms = self.net.nms, "onnx"
            try:
                x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, self.dtype)
                outs = _numpy(self.net(x.contiguous(memory_format=torch.channels_last)))
            finally:
                self.net.nms = mode
        return outs

    def close(self) -> None:
        super().close()
        self.net = None


class TorchBackend(GraphRunner):
    name = "torch"

    def __init__(self, model, info: ArtifactInfo, *, device: str = "auto", conf_thresh: float = 0.001,
                 topk: int = 100, precision: str | None = None, cudnn_relu: bool = True, graphs: bool = True,
                 use_kernel: bool | None = None, kernel_pool: bool | None = None,
                 kernel_stem: bool | None = None) -> None:  # fmt: skip
        from sidnet.models.fuse import fuse_for_inference

        dev = resolve_device(device)
        precision = precision or ("fp16" if dev.type == "cuda" else "fp32")
        if precision not in ("fp16", "fp32"):
            raise DeployError(f"torch backend precision {precision!r}: use fp16 or fp32")
        dtype = torch.float16 if precision == "fp16" else torch.float32
        info.precision, info.topk, info.conf_thresh = precision, topk, conf_thresh
        cuda = dev.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
        if kernel_pool is None:
            kernel_pool = cuda and _kernels_available()
        if kernel_stem is None:
            kernel_stem = bool(kernel_pool)
        net = fuse_for_inference(model, cudnn_relu=cudnn_relu and cuda, kernel_pool=kernel_pool and cuda,
                                 kernel_stem=kernel_stem and cuda)  # fmt: skip
        net = net.to(dev, dtype)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        self.kernel_pool = bool(kernel_pool and cuda)
        self.kernel_stem = bool(kernel_stem and cuda)
        use_kernel = use_kernel if cuda else False
        tail, self.decode = decode_tail(net, conf_thresh=conf_thresh, topk=topk, use_kernel=use_kernel)
        self.net = net

        def forward(x):
            return tail(net(x))

        super().__init__(forward, info=info, device=dev, dtype=dtype, channels_last=cuda, graphs=graphs)


def open_backend(path: Path, **options) -> TorchBackend | DeployModuleBackend:
    """The tuned :class:`TorchBackend` for the YOLOv2 family, the exported module run eagerly for other families."""
    from sidnet.models.yolo import YOLOv2

    model, info = load_checkpoint_model(Path(path))
    if isinstance(model, YOLOv2):
        return TorchBackend(model, info, **options)
    unknown = set(options) - {"device", "conf_thresh", "topk", "precision", "graphs", "kernels"}
    if unknown:
        raise DeployError(f"torch backend options {sorted(unknown)} apply to the YOLOv2 family only, not {info.model}")
    return DeployModuleBackend(model, info, **options)
