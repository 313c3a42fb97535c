// YOLOv2 region decoding, dense and fused with threshold + top-K.
//
// raw: (N, A*(5+C), H, W) contiguous, fp32 or fp16; the channel of field f of anchor a is a*(5+C) + f, fields
// tx, ty, tw, th, to, cls_0..cls_{C-1}. anchors: (A, 2) fp32 on the device, (w, h) in input pixels.
// For cell (y, x) and anchor a (flat index m = a*H*W + y*W + x), all arithmetic in fp32:
//   cx = (sigmoid(tx) + x) * strideX    cy = (sigmoid(ty) + y) * strideY
//   w  = exp(tw) * anchor_w             h  = exp(th) * anchor_h
//   score = sigmoid(to) * max_c softmax(cls)_c   (C == 1: sigmoid(to)),   class = argmax_c cls_c
#pragma once

#include <stddef.h>

#include <cuda_runtime_api.h>

#include "../common/sidnetCommon.h"

#ifdef __cplusplus
extern "C" {
#endif

// Largest number of rows regionTopK can sort per image: min(topk, A*H*W) must not exceed it.
#define REGION_TOPK_MAX_K 4096

// Dense decode. out: (N, A*H*W, 5+C) fp32 rows [cx, cy, w, h, sigmoid(to), softmax(cls)_0..C-1].
// Returns cudaErrorInvalidValue (nothing launched) for a negative size, c < 1, an unknown dtype or a null pointer
// while there is work; cudaSuccess without a launch when the output is empty.
cudaError_t regionDecode(const void* raw, int dtype, const float* anchors, int n, int a, int c, int h, int w,
                         float strideX, float strideY, float* out, cudaStream_t s);

// Bytes of device workspace regionTopK needs (0 when every image's A*H*W candidates fit in shared memory).
size_t regionTopKWorkspaceSize(int n, int a, int h, int w, int topk);

// Fused decode + (score >= confThresh) + top-K, one thread block per image; the decoded grid never reaches device
// memory. dets: (N, topk, 6) fp32 rows [x1, y1, x2, y2, score, class] ordered by score descending, ties by lower m;
// rows past the valid ones are zeros. num: (N,) int32, min(#candidates, topk). Deterministic.
// workspace: regionTopKWorkspaceSize(...) bytes, 8-byte aligned (may be null when that size is 0).
// Returns cudaErrorInvalidValue (nothing launched) for a negative size or topk, c < 1, min(topk, A*H*W) >
// REGION_TOPK_MAX_K, an unknown dtype, a null pointer where data is needed or a short/misaligned workspace;
// cudaSuccess without a launch when n == 0.
cudaError_t regionTopK(const void* raw, int dtype, const float* anchors, int n, int a, int c, int h, int w,
                       float strideX, float strideY, float confThresh, int topk, float* dets, int* num,
                       void* workspace, size_t workspaceBytes, cudaStream_t s);

#ifdef __cplusplus
}
#endif
