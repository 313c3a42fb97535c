// Pyramid (multi-level) RoIAlign, the Mask R-CNN / FPN pooler: each RoI is pooled from one level chosen by its size,
// exactly as torchvision.ops.MultiScaleRoIAlign (LevelMapper + roi_align, average of sampling x sampling bilinear
// samples per bin, aligned=false: the legacy half-pixel-free coordinates, RoI size floored at one feature pixel).
//
//   level(roi) = clamp(floor(canonicalLevel + log2(sqrt(area) / canonicalSize) + 1e-6), minLevel, minLevel+L-1)
//                - minLevel, area = (x2 - x1) * (y2 - y1) in input pixels
//   out[n, r, c, ph, pw] = mean over the bin's samples of bilinear(features[level][n, c], y * scale, x * scale)
//
// features[l]: (N, C, H_l, W_l) contiguous, all levels the same dtype; rois: (N, R, 4) float32 xyxy in input
// pixels (per image: R boxes for image n); out: (N, R, C, PH, PW) contiguous, the features' dtype (math in fp32).
#pragma once

#include <cuda_runtime_api.h>

#include "../common/sidnetCommon.h"

#define PYRAMID_ROIALIGN_MAX_LEVELS 8

#ifdef __cplusplus
extern "C" {
#endif

// levelScale[l] = 1 / stride of level l (e.g. 1/8, 1/16, 1/32). dtype: SIDNET_DTYPE_FLOAT32 or FLOAT16.
// Returns cudaErrorInvalidValue, launching nothing, for a negative size, numLevels outside 1..8, samplingRatio < 1,
// pooled sizes < 1, an unknown dtype or a null pointer while there is work; cudaSuccess without a launch when
// n, r or c is 0. Asynchronous on stream s.
cudaError_t pyramidRoiAlign(const void* const* features, int numLevels, const int* levelH, const int* levelW,
                            const float* levelScale, int dtype, int n, int c, const float* rois, int r,
                            int pooledH, int pooledW, int samplingRatio, int minLevel, float canonicalLevel,
                            float canonicalSize, void* out, cudaStream_t s);

#ifdef __cplusplus
}
#endif
