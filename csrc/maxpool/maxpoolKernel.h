// 2x2 / stride-2 max pooling over channels-last (NHWC) tensors, the layout the FP16 inference path keeps
// activations in: PyTorch's NHWC half max_pool2d was 39% of SIDNet's batch-64 time on the H100 (4x its memory floor).
//   out[n, oy, ox, c] = max(in[n, 2oy, 2ox, c], in[n, 2oy, 2ox+1, c], in[n, 2oy+1, 2ox, c], in[n, 2oy+1, 2ox+1, c])
// in: (N, H, W, C) contiguous; out: (N, H/2, W/2, C) contiguous (floor, as nn.MaxPool2d(2, 2)); same element type.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/sidnetCommon.h"

#ifdef __cplusplus
extern "C" {
#endif

// dtype: SIDNET_DTYPE_FLOAT32 or SIDNET_DTYPE_FLOAT16. 16-byte vector loads when C is a multiple of 8 (fp16) or 4
// (fp32) and both pointers are 16-byte aligned, else one element per thread. NaN: fp16 follows __hmax2 (a NaN loses
// to a number), unlike torch.max_pool2d; inference activations after ReLU hold no NaN. Returns cudaErrorInvalidValue,
// launching nothing, for a negative size, an unknown dtype or a null pointer while there is work; cudaSuccess without
// a launch for an empty output. Otherwise the status of the launch. Asynchronous on stream s.
cudaError_t maxPool2x2Nhwc(const void* in, void* out, int dtype, int n, int h, int w, int c, cudaStream_t s);

#ifdef __cplusplus
}
#endif
