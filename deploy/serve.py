"""``python -m deploy.serve``: serve an exported model from a Triton Inference Server, and talk to it.

    python -m deploy.serve --make-env .venv-serve                       # once: the server's own environment
    .venv-serve/bin/python -m deploy.serve runs/sidnet_mobilenetv2/export/fp32/model.onnx --http-port 8000
    python -m deploy triton://localhost:8000/sidnet cam0=../shared/data/video/pedestrians_200.mp4   # a client
    .venv-serve/bin/python -m deploy.serve --load-test triton://localhost:8000/sidnet \\
        --compare runs/sidnet_mobilenetv2/export/fp32/model.onnx --images ../shared/data/coco128/images/val2017

Serving: ``tritonserver`` (shipped in the ``nvidia-pytriton`` wheel, with its Python backend) runs the model's network
with Triton's dynamic batching, HTTP/gRPC endpoints and metrics (:mod:`sidnet.runtime.serving`). pytriton needs
``numpy<2`` and a Python whose stdlib matches its backend stub: ``--make-env`` builds a venv from the system
``/usr/bin/python3.11``
(the system interpreter; a pyenv 3.11.7 fails in the stub) with only what serving needs (no torch).
``--load-test``: N concurrent clients, a fixed number of requests, img/s and p50/p99 beside in-process inference, and
the server's detections compared with an in-process Detector's (``--compare``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = "/usr/bin/python3.11"
STOPPED = "deploy.serve interrupted: the server (or the load test) stopped; nothing else was changed"
# What the server (and a client) environment needs besides the `serve` extra: the torch-free runtime path.
RUNTIME_PACKAGES = ["onnx", "onnxruntime", "opencv-python-headless", "pillow", "pyyaml", "tqdm", "rich"]


def serve_requirements() -> list[str]:
    """pyproject's ``serve`` extra (nvidia-pytriton, tritonclient) + :data:`RUNTIME_PACKAGES`."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [*extras["serve"], *RUNTIME_PACKAGES]


def make_env(folder: Path, *, python: str) -> Path:
    """A venv at ``folder`` from ``python`` with :func:`serve_requirements`; returns its interpreter."""
    if not Path(python).is_file():
        raise FileNotFoundError(f"--python {python} not found: pass a CPython 3.10-3.12 whose stdlib matches "
                                "pytriton's stub (the system /usr/bin/python3.x, not a pyenv build)")  # fmt: skip
    subprocess.run([python, "-m", "venv", str(folder)], check=True)
    exe = folder / "bin" / "python"
    subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check", *serve_requirements()],
                   check=True)  # fmt: skip
    return exe


def _frames(folder: Path, limit: int) -> list:
    from sidnet.runtime.sources import ImageFolderSource

    src = ImageFolderSource("images", folder)
    frames = []
    while len(frames) < limit and (frame := src.read()) is not None:
        frames.append(frame.image)
    src.close()
    return frames


def _parser():
    from sidnet.cli import OneLineParser

    p = OneLineParser(prog="python -m deploy.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", nargs="?", help="serve this .onnx (or .pt / .engine / .pt2) through Triton")
    p.add_argument("--name", default="sidnet", help="model name on the server (default sidnet)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size (default 64)")
    p.add_argument("--queue-delay-us", type=int, default=100, help="dynamic batching max queue delay (default 100)")
    p.add_argument("--instances", type=int, default=1, help="model instances (backend copies) (default 1)")
    p.add_argument("--device", help="backend device (onnxruntime/torch): cpu | cuda")
    p.add_argument("--make-env", type=Path, metavar="DIR", help="create the serving venv in DIR and exit")
    p.add_argument("--python", default=DEFAULT_PYTHON, help=f"interpreter for --make-env (default {DEFAULT_PYTHON})")
    p.add_argument("--load-test", metavar="URL", help="triton://HOST:PORT/MODEL: run the bounded load test against it")
    p.add_argument("--compare", type=Path, help="load test: the same artifact, run in process, as the baseline")
    p.add_argument("--images", type=Path, help="load test: a folder of images to send")
    p.add_argument("--clients", type=int, default=8, help="load test: concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=200, help="load test: requests in total (default 200)")
    p.add_argument("--conf", type=float, default=0.3, help="load test --compare: score threshold (default 0.3)")
    p.add_argument("--json", action="store_true", help="load test: print the result as JSON only")
    return p.add_verbose()


def run_load_test(args) -> dict:
    import numpy as np

    from sidnet.runtime import serving
    from sidnet.runtime.backends import load_backend
    from sidnet.runtime.detector import Detector

    if args.images is None or not args.images.is_dir():
        raise FileNotFoundError(f"--images {args.images}: pass a folder of images to send")
    frames = _frames(args.images, 32)
    result: dict = {"url": args.load_test, "images": str(args.images)}
    with Detector(args.load_test) as remote:
        images = np.stack([remote.prepare(f).image for f in frames])
    if args.compare is not None:
        result["compare"] = serving.compare(args.load_test, args.compare, frames, conf_thresh=args.conf)
    result["triton"] = serving.load_test(args.load_test, images, clients=args.clients, requests=args.requests)
    if args.compare is not None:
        backend = load_backend("onnxruntime" if args.compare.suffix == ".onnx" else "torch", args.compare)
        result["in_process"] = serving.in_process(backend, images, requests=min(args.requests, 100))
        backend.close()
    return result


def _table(result: dict) -> str:
    rows = [("triton", result["triton"])] + ([("in-process", result["in_process"])] if "in_process" in result else [])
    lines = [f"{'':<11} {'clients':>7} {'requests':>8} {'dropped':>7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8}"]
    for name, r in rows:
        lines.append(f"{name:<11} {r.get('clients', 1):>7} {r['requests']:>8} {r.get('dropped', 0):>7} "
                     f"{r['img_per_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")  # fmt: skip
    if "compare" in result:
        c = result["compare"]
        lines.append(f"detections on {c['frames']} frames: {c['detections']}, counts equal {c['counts_equal']}, "
                     f"max |server - in-process| {c['max_abs_diff']:.2e}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from sidnet.cli import run_guarded

    if args.make_env is not None:
        exe = run_guarded(lambda: make_env(args.make_env, python=args.python), verbose=args.verbose,
                          interrupted=STOPPED)  # fmt: skip
        print(f"serving environment ready: {exe} -m deploy.serve ARTIFACT")
        return None
    if args.load_test:
        result = run_guarded(lambda: run_load_test(args), verbose=args.verbose, interrupted=STOPPED)
        print(json.dumps({k: v for k, v in result.items() if k != "compare"} | (
            {"compare": {k: v for k, v in result["compare"].items() if k not in ("server", "in_process")}}
            if "compare" in result else {})) if not args.json else json.dumps(result))  # fmt: skip
        if not args.json:
            print(_table(result), file=sys.stderr)
        return result
    if not args.artifact:
        raise SystemExit("error: pass an ARTIFACT to serve, --load-test URL or --make-env DIR (see --help)")
    from sidnet.runtime.serving import serve

    opts = {"device": args.device} if args.device else {}

    def ready(url: str) -> None:
        print(f"serving {url} (HTTP {args.http_port}, gRPC {args.grpc_port}, metrics {args.metrics_port}); "
              "Ctrl-C stops", flush=True)  # fmt: skip

    run_guarded(lambda: serve(args.artifact, name=args.name, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, max_batch=args.max_batch,
                              queue_delay_us=args.queue_delay_us, instances=args.instances, backend_options=opts,
                              on_ready=ready), verbose=args.verbose, interrupted=STOPPED)  # fmt: skip
    return None


if __name__ == "__main__":
    main()
