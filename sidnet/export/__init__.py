"""Deployment export: PyTorch checkpoint → ONNX → graph surgery → TensorRT / TensorRT-RTX engine.

Modules (one concept each): :mod:`~sidnet.export.wrapper` (the traced deploy model and its output contract),
:mod:`~sidnet.export.onnx_export` (torch → ONNX + metadata), :mod:`~sidnet.export.graph` (YOLOv2-family trace +
surgery), :mod:`~sidnet.export.adapters` (what the export needs of each model family), :mod:`~sidnet.export.surgery`
(onnx-graphsurgeon rewrites), :mod:`~sidnet.export.reference_ops` (NumPy ``sidnet::`` ops for ``onnx.reference``),
:mod:`~sidnet.export.parity` (ONNX vs PyTorch), :mod:`~sidnet.export.trt_plugins` (IPluginV3 in Python over
``csrc/``), :mod:`~sidnet.export.engine` (engine + sidecar + layer report), :mod:`~sidnet.export.pipeline`
(``run_export(cfg)``). INT8 quantization is :mod:`sidnet.quant`'s. Importing this package imports none of them;
TensorRT is imported only when an engine is built.
"""
