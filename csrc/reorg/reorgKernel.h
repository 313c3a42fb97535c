// Reorg (space-to-depth) with ONNX SpaceToDepth channel order:
//   out[n, (by*s + bx)*C + c, h, w] = in[n, c, h*s + by, w*s + bx]
// in: (N, C, H, W) contiguous; out: (N, C*s*s, H/s, W/s) contiguous; same element type.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/sidnetCommon.h"

#ifdef __cplusplus
extern "C" {
#endif

// dtype: SIDNET_DTYPE_FLOAT32 or SIDNET_DTYPE_FLOAT16 (the kernel only moves elements, so the two differ only in
// element size). Returns cudaErrorInvalidValue, launching nothing, when a size is negative, stride < 1, h or w is not
// a multiple of stride, dtype is unknown or a pointer is null while there is work; cudaSuccess without a launch when
// the tensor is empty (n, c, h or w == 0). Otherwise the status of the launch. Asynchronous on stream s.
cudaError_t reorgForward(const void* in, void* out, int dtype, int n, int c, int h, int w, int stride,
                         cudaStream_t s);

#ifdef __cplusplus
}
#endif
