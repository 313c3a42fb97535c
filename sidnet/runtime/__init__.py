"""Deployment runtime: one :class:`~sidnet.runtime.detector.Detector` over four backends, video sources, intrusion
zones and the multi-stream pipeline behind ``python -m deploy``.

Modules: ``artifact`` (what an artifact is and which backend runs it), ``backends`` (``tensorrt``, ``onnxruntime``,
``torch``, ``compiled``; one module each, imported only when chosen), ``nms`` (NumPy NMS + un-letterbox),
``detector``, ``sources``, ``zones``, the pipeline's stages (``rings``: shared-memory frame rings, ``decode``: decode
processes and reader threads, ``nvdec``: GPU decoding, ``writer``: outputs off the hot path, ``pipeline``: the loop),
``benchmark`` and ``bench_pipeline`` (end-to-end rows). Importing this package imports none of them (and never
torch): the TensorRT path must run without torch installed.
"""
