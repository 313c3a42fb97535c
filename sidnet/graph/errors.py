"""Typed export errors. Every message is one line that names the bad value and what to do about it."""

from __future__ import annotations


class ExportError(ValueError):
    """The export cannot go on; ``python -m export`` prints the message as ``error: ...`` without a traceback."""


class SurgeryError(ExportError):
    """The exported graph is not shaped as the graph surgery expects (a subgraph was not found or has loose ends)."""


class ParityError(ExportError):
    """An exported graph gives numbers that differ from PyTorch beyond the tolerance."""


class BackendUnavailable(ExportError):
    """The engine backend (``tensorrt`` or ``tensorrt_rtx``) cannot be imported here."""


class PluginError(ExportError):
    """The TensorRT plugins cannot be registered or run (no kernels library, no full TensorRT, a failed launch)."""


class EngineBuildError(ExportError):
    """The ONNX parser rejected a node, or the builder produced no engine."""
