"""``triton`` backend: the network runs in a Triton Inference Server, reached with ``tritonclient`` over HTTP.

    Detector("triton://localhost:8000/sidnet")        # python -m deploy triton://host:8000/sidnet cam0=clip.mp4

Letterbox, threshold, NMS and un-letterbox stay in the client (:class:`sidnet.runtime.detector.Detector`), exactly as
for the in-process backends; the server gets the exported input contract (``images`` float32 [N, 3, S, S]) and
returns ``detections`` / ``num_detections``. What the model is (input size, anchors, class names, export threshold)
comes from the server: the ``sidnet_info`` parameter of the model's config (a repository from
``python -m export --backend triton``), else the ``<name>_info`` model that ``python -m deploy.serve`` binds beside
it. Needs ``pip install 'tritonclient[http]'`` (the ``serve`` environment has it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from sidnet.runtime.artifact import ArtifactInfo, info_from_fields
from sidnet.runtime.errors import DeployError

SCHEME = "triton://"
INFO_SUFFIX = "_info"


def parse_url(url: str) -> tuple[str, str]:
    """``triton://host:port/model`` → (``host:port``, ``model``)."""
    parsed = urlparse(url)
    name = parsed.path.strip("/")
    if parsed.scheme != "triton" or not parsed.netloc or not name or "/" in name:
        raise DeployError(f"Triton address {url!r}: use triton://HOST:HTTP_PORT/MODEL, e.g. triton://localhost:8000/sidnet")
    return parsed.netloc, name


class TritonBackend:
    name = "triton"

    def __init__(self, url: str, *, timeout_s: float = 60.0, max_batch: int | None = None) -> None:
        try:
            import tritonclient.http as httpclient
        except ImportError as e:
            raise DeployError("the triton backend needs tritonclient: pip install 'tritonclient[http]' (or run in the "
                              "serve environment, python -m deploy.serve --make-env)") from e  # fmt: skip
        self._http = httpclient
        self.url, (self.address, self.model) = url, parse_url(url)
        self.client = httpclient.InferenceServerClient(self.address, connection_timeout=timeout_s,
                                                       network_timeout=timeout_s)  # fmt: skip
        self.timeout_s = timeout_s
        self._wait_ready(self.model)
        config = self.client.get_model_config(self.model)
        self.max_batch = max_batch or int(config.get("max_batch_size") or 0) or None
        self.info: ArtifactInfo = info_from_fields(Path(url), "triton", self._info_fields(config),
                                                   f"Triton model {self.model}")  # fmt: skip
        self.dtype = np.float16 if config["input"][0]["data_type"] == "TYPE_FP16" else np.float32

    def _wait_ready(self, model: str) -> None:
        timeout_s = self.timeout_s
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                if self.client.is_model_ready(model):
                    return
            except Exception as e:  # noqa: BLE001  (connection refused while the server starts)
                last = e
            time.sleep(0.25)
        why = f" ({type(last).__name__}: {last})" if last else ""
        raise DeployError(f"Triton model {model} at {self.address} is not ready after {timeout_s:.0f} s{why}: "
                          "start it with python -m deploy.serve ARTIFACT, or check the address")  # fmt: skip

    def _info_fields(self, config: dict) -> dict:
        param = (config.get("parameters") or {}).get("sidnet_info")
        if param:
            return json.loads(param["string_value"])
        info_model = self.model + INFO_SUFFIX
        try:
            self._wait_ready(info_model)  # python -m deploy.serve binds it right after the model itself
        except DeployError as e:
            raise DeployError(f"Triton model {self.model} carries no sidnet_info parameter and {info_model} is not "
                              "served: serve the model with python -m deploy.serve, or a repository written by "
                              "python -m export --backend triton") from e  # fmt: skip
        request = self._http.InferInput("request", [1, 1], "UINT8")
        request.set_data_from_numpy(np.zeros((1, 1), np.uint8))
        reply = self.client.infer(info_model, [request]).as_numpy("info")
        return json.loads(bytes(reply.reshape(-1)[0]).decode("utf-8"))

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(images, dtype=self.dtype)
        inp = self._http.InferInput("images", list(batch.shape), "FP16" if self.dtype == np.float16 else "FP32")
        inp.set_data_from_numpy(batch, binary_data=True)
        outputs = [self._http.InferRequestedOutput(n, binary_data=True) for n in ("detections", "num_detections")]
        result = self.client.infer(self.model, [inp], outputs=outputs)
        dets, num = result.as_numpy("detections"), result.as_numpy("num_detections")
        return dets.astype(np.float32, copy=False), num.reshape(len(batch)).astype(np.int32, copy=False)

    def close(self) -> None:
        self.client.close()


def open_backend(path, **options) -> TritonBackend:
    return TritonBackend(str(path), **options)
