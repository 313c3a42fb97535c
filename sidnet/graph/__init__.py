"""The deploy graph, shared by the export and by quantization (QAT must fake-quantize the very graph the INT8 export
quantizes): :mod:`~sidnet.graph.wrapper` (the traced deploy model and its input/output names),
:mod:`~sidnet.graph.onnx_export` (torch → ONNX + metadata, module scopes), :mod:`~sidnet.graph.surgery`
(onnx-graphsurgeon rewrites), :mod:`~sidnet.graph.build` (YOLOv2 family: trace + surgery), :mod:`~sidnet.graph.errors`
(the export's typed errors). Importing this package imports none of them.
"""
