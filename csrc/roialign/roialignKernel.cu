#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "roialignKernel.h"

namespace {

constexpr int kThreads = 256;

struct Levels {  // passed by value: the launcher's host arrays become kernel parameters, no device copy needed
    const void* ptr[PYRAMID_ROIALIGN_MAX_LEVELS];
    int h[PYRAMID_ROIALIGN_MAX_LEVELS];
    int w[PYRAMID_ROIALIGN_MAX_LEVELS];
    float scale[PYRAMID_ROIALIGN_MAX_LEVELS];
    int count;
};

__device__ __forceinline__ float load(const float* p, int64_t i) { return __ldg(p + i); }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half(v); }

// torchvision's bilinear_interpolate (roi_align_kernel.cu), aligned=false.
template <typename T>
__device__ float bilinear(const T* plane, int h, int w, float y, float x) {
    if (y < -1.0f || y > h || x < -1.0f || x > w) return 0.0f;
    y = fmaxf(y, 0.0f);
    x = fmaxf(x, 0.0f);
    int yl = static_cast<int>(y), xl = static_cast<int>(x), yh, xh;
    if (yl >= h - 1) {
        yh = yl = h - 1;
        y = static_cast<float>(yl);
    } else {
        yh = yl + 1;
    }
    if (xl >= w - 1) {
        xh = xl = w - 1;
        x = static_cast<float>(xl);
    } else {
        xh = xl + 1;
    }
    const float ly = y - yl, lx = x - xl, hy = 1.0f - ly, hx = 1.0f - lx;
    return hy * hx * load(plane, int64_t(yl) * w + xl) + hy * lx * load(plane, int64_t(yl) * w + xh) +
           ly * hx * load(plane, int64_t(yh) * w + xl) + ly * lx * load(plane, int64_t(yh) * w + xh);
}

// One thread per output element (n, r, c, ph, pw); consecutive threads take consecutive pw, so a warp reads
// neighbouring samples of one feature plane and writes one contiguous span.
template <typename T>
__global__ void __launch_bounds__(kThreads) pyramidRoiAlignKernel(Levels lv, const float* __restrict__ rois,
                                                                  T* __restrict__ out, int64_t total, int c, int r,
                                                                  int ph, int pw, int sampling, int minLevel,
                                                                  float canonicalLevel, float canonicalSize) {
    for (int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x; t < total; t += int64_t(gridDim.x) * kThreads) {
        const int x = static_cast<int>(t % pw);
        const int y = static_cast<int>((t / pw) % ph);
        const int ci = static_cast<int>((t / (int64_t(pw) * ph)) % c);
        const int64_t nr = t / (int64_t(pw) * ph * c);  // n * R + r
        const int ni = static_cast<int>(nr / r);
        const float* box = rois + nr * 4;
        const float x1 = box[0], y1 = box[1], x2 = box[2], y2 = box[3];
        const float size = sqrtf((x2 - x1) * (y2 - y1));
        int level = static_cast<int>(floorf(canonicalLevel + log2f(size / canonicalSize) + 1e-6f)) - minLevel;
        level = level < 0 ? 0 : (level >= lv.count ? lv.count - 1 : level);
        const int h = lv.h[level], w = lv.w[level];
        const float scale = lv.scale[level];
        const float sx = x1 * scale, sy = y1 * scale;
        const float rw = fmaxf(x2 * scale - sx, 1.0f), rh = fmaxf(y2 * scale - sy, 1.0f);
        const float bw = rw / pw, bh = rh / ph;
        const T* plane = static_cast<const T*>(lv.ptr[level]) + (int64_t(ni) * c + ci) * int64_t(h) * w;
        float acc = 0.0f;
        for (int iy = 0; iy < sampling; ++iy) {
            const float yy = sy + y * bh + (iy + 0.5f) * bh / sampling;
            for (int ix = 0; ix < sampling; ++ix) {
                acc += bilinear(plane, h, w, yy, sx + x * bw + (ix + 0.5f) * bw / sampling);
            }
        }
        store(out, t, acc / (sampling * sampling));
    }
}

}  // namespace

extern "C" cudaError_t pyramidRoiAlign(const void* const* features, int numLevels, const int* levelH,
                                       const int* levelW, const float* levelScale, int dtype, int n, int c,
                                       const float* rois, int r, int pooledH, int pooledW, int samplingRatio,
                                       int minLevel, float canonicalLevel, float canonicalSize, void* out,
                                       cudaStream_t s) {
    if (n < 0 || c < 0 || r < 0 || numLevels < 1 || numLevels > PYRAMID_ROIALIGN_MAX_LEVELS || samplingRatio < 1 ||
        pooledH < 1 || pooledW < 1 || canonicalSize <= 0.0f ||
        (dtype != SIDNET_DTYPE_FLOAT32 && dtype != SIDNET_DTYPE_FLOAT16)) {
        return cudaErrorInvalidValue;
    }
    const int64_t total = int64_t(n) * r * c * pooledH * pooledW;
    if (total == 0) return cudaSuccess;
    if (features == nullptr || levelH == nullptr || levelW == nullptr || levelScale == nullptr || rois == nullptr ||
        out == nullptr) {
        return cudaErrorInvalidValue;
    }
    Levels lv{};
    lv.count = numLevels;
    for (int l = 0; l < numLevels; ++l) {
        if (features[l] == nullptr || levelH[l] < 1 || levelW[l] < 1 || !(levelScale[l] > 0.0f)) {
            return cudaErrorInvalidValue;
        }
        lv.ptr[l] = features[l];
        lv.h[l] = levelH[l];
        lv.w[l] = levelW[l];
        lv.scale[l] = levelScale[l];
    }
    const int64_t blocks64 = (total + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 32 ? blocks64 : 65535 * 32);
    if (dtype == SIDNET_DTYPE_FLOAT32) {
        pyramidRoiAlignKernel<float><<<blocks, kThreads, 0, s>>>(lv, rois, static_cast<float*>(out), total, c, r,
                                                                 pooledH, pooledW, samplingRatio, minLevel,
                                                                 canonicalLevel, canonicalSize);
    } else {
        pyramidRoiAlignKernel<__half><<<blocks, kThreads, 0, s>>>(lv, rois, static_cast<__half*>(out), total, c, r,
                                                                  pooledH, pooledW, samplingRatio, minLevel,
                                                                  canonicalLevel, canonicalSize);
    }
    return cudaGetLastError();
}
