"""ctypes binding of ``libsidnet_kernels.so`` (``csrc/``) and PyTorch wrappers around its launchers.

The library is optional and built by hand: ``python -m sidnet.kernels.build`` (needs nvcc). Lookup order:
``$SIDNET_KERNELS_LIB``, then ``build/kernels/libsidnet_kernels.so`` in the repository root.

Wrappers (CUDA tensors in, outputs allocated on the same device, launched on the current stream):

- :func:`reorg` — same contract as :func:`sidnet.models.layers.reorg`.
- :func:`region_decode` — same contract as :func:`sidnet.models.region.region_decode`.
- :func:`region_topk` — same contract as :func:`sidnet.models.region.region_topk`, fused in one kernel.
- :func:`pyramid_roi_align` — torchvision ``MultiScaleRoIAlign`` (level choice + ``roi_align``) in one kernel.
- :func:`maxpool2x2_nhwc` — ``nn.MaxPool2d(2, 2)`` on channels-last tensors, one coalesced pass.
- :func:`stem_conv_act_pool` — the first 3x3 conv (3 input channels) + bias + activation + 2x2 max-pool in one pass.

Importing this module imports neither torch nor the library; both are loaded on first use.
"""

from sidnet.kernels.library import ABI_VERSION, LIB_ENV, LIB_NAME, REGION_TOPK_MAX_K, library_path, load_library
from sidnet.kernels.ops import maxpool2x2_nhwc, pyramid_roi_align, region_decode, region_topk, reorg, stem_conv_act_pool

__all__ = [
    "ABI_VERSION",
    "LIB_ENV",
    "LIB_NAME",
    "REGION_TOPK_MAX_K",
    "pyramid_roi_align",
    "library_path",
    "load_library",
    "maxpool2x2_nhwc",
    "region_decode",
    "region_topk",
    "reorg",
    "stem_conv_act_pool",
]
