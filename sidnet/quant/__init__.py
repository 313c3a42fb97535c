"""INT8 quantization, shared by the export (PTQ) and training (QAT): :mod:`~sidnet.quant.calibration` (the calibration
set, streaming histograms, amax methods, TensorRT cache), :mod:`~sidnet.quant.qdq` (modelopt's Q/DQ placement with our
scales), :mod:`~sidnet.quant.ptq` (FP32 ONNX → Q/DQ ONNX + cache + gate + manifest), :mod:`~sidnet.quant.accuracy_gate`,
:mod:`~sidnet.quant.manifest` (provenance, stale-artifact checks), :mod:`~sidnet.quant.qat` (fake quantization in
PyTorch where the export puts Q/DQ). Importing this package imports none of them.
"""
