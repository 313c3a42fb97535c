// The network's stem in one pass: 3x3 convolution (stride 1, zero padding 1) of a 3-channel NHWC image, + bias,
// activation, 2x2 / stride-2 max pooling. Darknet-19 opens with exactly this (3 -> 32 channels, then a pool): cuDNN
// ran that first conv with a generic kernel (C = 3 does not fit the tensor-core tiles) at 11% of SIDNet's batch-64
// time, and wrote a 416x416x32 map only for the pool to read it back.
//
//   out[n, oy, ox, k] = act(b[k] + max_{dy,dx in {0,1}} sum_{ky,kx,c} w[k, ky, kx, c] * in[n, 2oy+dy+ky-1, 2ox+dx+kx-1, c])
//
// Pooling is taken before bias and activation: both are monotone non-decreasing, so the result equals
// maxpool(act(conv + b)) exactly (up to the accumulation order of the sums, done in fp32).
// in: (N, H, W, 3) contiguous; out: (N, H/2, W/2, K) contiguous (floor, as nn.MaxPool2d(2, 2)); same element type.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/sidnetCommon.h"

#ifdef __cplusplus
extern "C" {
#endif

enum SidnetStemAct {
    SIDNET_STEM_IDENTITY = 0,
    SIDNET_STEM_RELU = 1,
    SIDNET_STEM_LEAKY_RELU = 2,  // max(x, slope * x), 0 <= slope <= 1
};

// K (output channels) must be a multiple of 8: one launch per 16 (or 8) channels, whose weights ride by value in the
// launch's parameter block, so a CUDA graph captures them. weight: host pointer to K*27 floats in (k, ky, kx, c)
// order; bias: host pointer to K floats (or null = zeros); both are read before the call returns. dtype:
// SIDNET_DTYPE_FLOAT32 or SIDNET_DTYPE_FLOAT16 (fp32 accumulation either way). Returns cudaErrorNotSupported for K not
// a multiple of 8 (the caller runs the unfused layers); cudaErrorInvalidValue, launching nothing, for a negative size,
// an unknown dtype or activation, a null pointer while there is work, or an out pointer off 16-byte alignment;
// cudaSuccess without a launch for an empty output. Otherwise the status of the launches. Asynchronous on stream s.
cudaError_t stemConvActPool(const void* in, void* out, int dtype, int n, int h, int w, int k, const float* weight,
                            const float* bias, int act, float slope, cudaStream_t s);

#ifdef __cplusplus
}
#endif
