"""Deployment runtime: one :class:`~sidnet.runtime.detector.Detector` over four backends, video sources, intrusion
zones and the multi-stream pipeline behind ``python -m deploy``.

Modules: ``artifact`` (what an artifact is and which backend runs it), ``backends`` (``tensorrt``, ``onnxruntime``,
``torch``, ``compiled``; one module each, imported only when chosen), ``nms`` (NumPy NMS + un-letterbox),
``detector``, ``sources``, ``zones``, ``pipeline``, ``benchmark``. Importing this package imports none of them (and
never torch): the TensorRT path must run without torch installed.
"""
