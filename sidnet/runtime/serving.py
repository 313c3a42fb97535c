"""Serve a Detector's network from a real Triton Inference Server (``nvidia-pytriton``), and measure it.

:func:`serve` binds the artifact's backend (onnxruntime for ``.onnx``, any in-process backend) to a ``tritonserver``
process that pytriton starts: HTTP/gRPC endpoints, dynamic batching, instance groups and Prometheus metrics are
Triton's own; each request's rows go through the bound function, which runs the backend. Two models are bound:
``<name>`` (input ``images`` float32 [N, 3, S, S] → ``detections`` [N, K, 6], ``num_detections`` [N, 1]) and
``<name>_info`` (the artifact's metadata as JSON, read once by the client backend
:mod:`sidnet.runtime.backends.triton`).

:func:`load_test` is the bounded load test: ``clients`` threads, each with its own connection, send a fixed number of
requests in total; every reply is checked (shape, row count) and counted, so a dropped or failed request shows.
:func:`compare` runs the same frames through the server and through an in-process Detector.

pytriton declares ``numpy<2`` and its Python-backend stub needs the interpreter it was built against, so it runs in its
own environment (``python -m deploy.serve --make-env``); nothing here imports torch.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sidnet.runtime.artifact import backend_for
from sidnet.runtime.backends import load_backend
from sidnet.runtime.backends.triton import INFO_SUFFIX
from sidnet.runtime.errors import DeployError

INFO_KEYS = ("model", "input_size", "anchors", "class_names", "conf_thresh", "topk", "precision")


def serve(artifact: str | Path, *, name: str = "sidnet", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, max_batch: int = 64, queue_delay_us: int = 100, instances: int = 1,
          backend_options: dict | None = None, on_ready=None) -> None:  # fmt: skip
    """Serve ``artifact`` until interrupted (Ctrl-C / SIGTERM); ``on_ready(url)`` is called once it answers."""
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise DeployError("python -m deploy.serve needs nvidia-pytriton: make its environment with python -m "
                          "deploy.serve --make-env .venv-serve, then run .venv-serve/bin/python -m deploy.serve") from e
    if instances < 1 or max_batch < 1:
        raise DeployError(f"--instances {instances} and --max-batch {max_batch} must be >= 1")
    kind = backend_for(artifact)
    backends = [load_backend(kind, artifact, **(backend_options or {})) for _ in range(instances)]
    info = backends[0].info
    size = info.input_size
    info_json = json.dumps({k: v for k, v in asdict(info).items() if k in INFO_KEYS} | {
        "num_classes": len(info.class_names)}, default=str).encode("utf-8")  # fmt: skip

    def bound(backend):
        @batch
        def infer(images: np.ndarray) -> dict[str, np.ndarray]:
            dets, num = backend.infer(images)
            return {"detections": dets, "num_detections": np.asarray(num, np.int32).reshape(-1, 1)}

        return infer

    def describe(requests):
        return [{"info": np.array([info_json], dtype=np.object_)} for _ in requests]

    config = TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, exit_on_error=True)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=[bound(b) for b in backends],  # one instance per backend copy (Triton's instance group)
            inputs=[Tensor(name="images", dtype=np.float32, shape=(3, size, size))],
            outputs=[Tensor(name="detections", dtype=np.float32, shape=(info.topk, 6)),
                     Tensor(name="num_detections", dtype=np.int32, shape=(1,))],  # fmt: skip
            config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(
                max_queue_delay_microseconds=queue_delay_us)),  # fmt: skip
            strict=True,
        )
        triton.bind(
            model_name=name + INFO_SUFFIX,
            infer_func=describe,
            inputs=[Tensor(name="request", dtype=np.uint8, shape=(1, 1))],
            outputs=[Tensor(name="info", dtype=bytes, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        if on_ready is not None:
            on_ready(f"triton://localhost:{http_port}/{name}")
        try:
            triton.serve()
        finally:
            for b in backends:
                b.close()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_test(url: str, images: np.ndarray, *, clients: int, requests: int, batch: int = 1) -> dict:
    """``clients`` concurrent connections send ``requests`` requests of ``batch`` letterboxed images in total
    (``images`` float32 (M, 3, S, S), cycled). Returns counts, img/s, p50/p99 latency in ms; ``dropped`` counts
    requests that failed or came back malformed (it must be 0)."""
    from sidnet.runtime.backends.triton import TritonBackend

    if clients < 1 or requests < clients:
        raise DeployError(f"--clients {clients} and --requests {requests}: need 1 <= clients <= requests")
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    lock = threading.Lock()
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    ready = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        # One connection per client, made in its own thread: tritonclient.http's is gevent-based and thread-bound.
        try:
            conn = TritonBackend(url)
        finally:
            ready.wait()
        for j in range(shares[i]):
            start = (i * 7919 + j * batch) % len(images)
            x = np.take(images, range(start, start + batch), axis=0, mode="wrap")
            t0 = time.perf_counter()
            try:
                dets, num = conn.infer(x)
                ok = dets.shape[0] == batch and num.shape == (batch,)
            except Exception as e:  # noqa: BLE001  (counted, reported, never hidden)
                ok, why = False, f"{type(e).__name__}: {e}"
            else:
                why = f"malformed reply {dets.shape} {num.shape}"
            latencies[i].append((time.perf_counter() - t0) * 1e3)
            if not ok:
                with lock:
                    failures.append(why)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()  # connected: the clock starts at the first request
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    flat = [v for lat in latencies for v in lat]
    done = len(flat) - len(failures)
    return {"clients": clients, "requests": requests, "batch": batch, "answered": done, "dropped": requests - done,
            "failures": failures[:5], "seconds": round(seconds, 3), "img_per_s": round(done * batch / seconds, 2),
            "p50_ms": round(_percentile(flat, 50), 2), "p99_ms": round(_percentile(flat, 99), 2)}  # fmt: skip


def in_process(backend, images: np.ndarray, *, requests: int, batch: int = 1) -> dict:
    """The same requests through an in-process backend, one after another: the baseline beside :func:`load_test`."""
    lat = []
    t0 = time.perf_counter()
    for j in range(requests):
        x = np.take(images, range(j * batch, (j + 1) * batch), axis=0, mode="wrap")
        s = time.perf_counter()
        backend.infer(x)
        lat.append((time.perf_counter() - s) * 1e3)
    seconds = time.perf_counter() - t0
    return {"requests": requests, "batch": batch, "seconds": round(seconds, 3),
            "img_per_s": round(requests * batch / seconds, 2), "p50_ms": round(statistics.median(lat), 2),
            "p99_ms": round(_percentile(lat, 99), 2)}  # fmt: skip


def compare(url: str, artifact: str | Path, frames: list[np.ndarray], **detector_options) -> dict:
    """Detections of ``frames`` through the server and through an in-process Detector on ``artifact``."""
    from sidnet.runtime.detector import Detector

    with Detector(url, **detector_options) as remote, Detector(artifact, **detector_options) as local:
        a, b = remote(frames), local(frames)
    counts = [(len(x), len(y)) for x, y in zip(a, b, strict=True)]
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if len(x) and len(x) == len(y)]
    diffs = [float(np.abs(x.as_array() - y.as_array()).max()) for x, y in pairs]
    return {"frames": len(frames), "detections": sum(c for c, _ in counts),
            "counts_equal": all(x == y for x, y in counts),
            "max_abs_diff": max(diffs, default=0.0), "server": [d.as_array().tolist() for d in a],
            "in_process": [d.as_array().tolist() for d in b]}  # fmt: skip
