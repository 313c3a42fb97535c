"""INT8 tensor-core kernels (Triton): implicit-GEMM convolution and max pooling on NHWC int8 activations.

:func:`conv2d_int8` computes ``acc[m, co] = Σ x_q · w_q`` as INT8 × INT8 → INT32 on the tensor cores (``tl.dot`` on
int8 tiles), then, in the same kernel, the epilogue of a Q/DQ graph's ``DQ → Conv → (Relu) → Q``:
``y = acc · (s_x · s_w[co]) + bias[co]``, ReLU, and either requantisation to the next layer's scale
(``clamp(round_half_even(y / s_out), -128, 127)``, the ``QuantizeLinear`` rounding) or a float16/float32 store for a
layer that the accuracy gate kept out of INT8. :func:`maxpool2d_int8` pools int8 directly (max commutes with a
positive scale) and requantises when the next ``QuantizeLinear`` has another scale.

Launchers take plain tensors and numbers (no graph knowledge); :mod:`sidnet.quant.int8_plan` decides what runs.
``reference_conv2d_int8`` is the exact integer reference the tests hold the kernel to (float64 convolution of the
int8 values: every partial sum is an integer below 2^53, so it is exact), with the same epilogue in PyTorch; it is
also what runs where Triton cannot (a CPU without ``TRITON_INTERPRET=1``).
"""


from .launch import Tiles, candidate_tiles, conv_output_size, default_tiles, last_launch, tma_unsupported
from .ops import (
    conv2d_fp8,
    conv2d_int8,
    maxpool2d_fp8,
    maxpool2d_int8,
    quantize,
    quantize_fp8,
    reference_conv2d_int8,
    stem_int8,
    stem_window_weights,
)
from .triton_kernels import available, interpreting

__all__ = [
    "Tiles",
    "available",
    "candidate_tiles",
    "conv2d_fp8",
    "conv2d_int8",
    "conv_output_size",
    "default_tiles",
    "interpreting",
    "last_launch",
    "maxpool2d_fp8",
    "maxpool2d_int8",
    "quantize",
    "quantize_fp8",
    "reference_conv2d_int8",
    "stem_int8",
    "stem_window_weights",
    "tma_unsupported",
]
