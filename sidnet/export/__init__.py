"""Deployment export: PyTorch checkpoint → ONNX → graph surgery → TensorRT / TensorRT-RTX engine.

Modules (one concept each): :mod:`~sidnet.export.adapters` (what the export needs of each model family),
:mod:`~sidnet.export.reference_ops` (NumPy ``sidnet::`` ops for ``onnx.reference``), :mod:`~sidnet.export.parity`
(ONNX vs PyTorch), :mod:`~sidnet.export.maskrcnn` (Mask R-CNN's static deploy graph and parity),
:mod:`~sidnet.export.trt_plugins` (IPluginV3 in Python over ``csrc/``), :mod:`~sidnet.export.engine` (engine + sidecar
+ layer report), :mod:`~sidnet.export.compiled` (AOTInductor package), :mod:`~sidnet.export.pipeline`
(``run_export(cfg)``). The graph itself (wrapper, torch → ONNX, surgery) is :mod:`sidnet.graph`'s, INT8 quantization
:mod:`sidnet.quant`'s. Importing this package imports none of them; TensorRT is imported only when an engine is built.
"""
