#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "stemKernel.h"

namespace {

// Tuning knobs, fixed by measurement (benchmarks/stem_variants.py builds this file with each -D and times them side by
// side; benchmarks/results/deploy/stem_variants_h100.md): channels per launch (16 beat 8 by 13%), the loop order of
// the four convolutions (channel-outer: G 27-FMA chains that ptxas interleaves, 162 registers, beat tap-outer, 128
// registers, by 4.5%), and the minimum resident blocks per SM (0: ptxas chooses; forcing 5 was 6% slower).
#ifndef SIDNET_STEM_GROUP
#define SIDNET_STEM_GROUP 16
#endif
#ifndef SIDNET_STEM_TAP_OUTER
#define SIDNET_STEM_TAP_OUTER 0
#endif
#ifndef SIDNET_STEM_MIN_BLOCKS
#define SIDNET_STEM_MIN_BLOCKS 0
#endif

constexpr int kThreads = 128;
constexpr int kTaps = 27;  // 3x3 window x 3 input channels

// Weights and bias travel by value in the kernel's parameter block (constant bank): after unrolling, every FMA reads
// its weight as a constant operand, so the inner loop is FFMAs only. One launch computes a group of G output channels
// (G = 16, or 8 when K is not a multiple of 16): 32 channels at once needed more than 255 registers (the four window
// positions' sums are interleaved for ILP) and spilled; a group of 16 fits in ~150 with no spill, and the 4x4x3
// window it re-reads is 1.4% of the FMAs' time.
template <int G>
struct StemParams {
    float w[G * kTaps];
    float b[G];
};

template <typename T>
__device__ __forceinline__ float load(const T* p);
template <>
__device__ __forceinline__ float load<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(__ldg(p)); }

template <int Act>
__device__ __forceinline__ float activate(float v, float slope) {
    if (Act == SIDNET_STEM_RELU) return fmaxf(v, 0.f);
    return fmaxf(v, slope * v);  // SIDNET_STEM_LEAKY_RELU (and identity, as slope 1)
}

template <int K>
__device__ __forceinline__ void store(float* out, const float (&v)[K]) {
#pragma unroll
    for (int k = 0; k < K; k += 4) *reinterpret_cast<float4*>(out + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
}
template <int K>
__device__ __forceinline__ void store(__half* out, const float (&v)[K]) {
#pragma unroll
    for (int k = 0; k < K; k += 8) {
        uint4 u;
        __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[k + 2 * i], v[k + 2 * i + 1]);
        *reinterpret_cast<uint4*>(out + k) = u;
    }
}

// One thread = one pooled output pixel, the launch's G (here K) channels [k0, k0 + G) of kOut: it reads the 4x4x3 input window once (neighbours share
// columns through L1), runs the four 3x3 convolutions, keeps the channel-wise max, then bias + activation. A warp
// writes 32 consecutive output pixels: one contiguous 32*K-element span.
template <typename T, int K, int Act>
__global__ void __launch_bounds__(kThreads, SIDNET_STEM_MIN_BLOCKS) stemKernel(const T* __restrict__ in, T* __restrict__ out,
                                                       const StemParams<K> p, int64_t total, int h, int w, int ho,
                                                       int wo, int kOut, int k0, float slope) {
    for (int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x; t < total; t += int64_t(gridDim.x) * kThreads) {
        const int ox = int(t % wo);
        int64_t r = t / wo;
        const int oy = int(r % ho);
        const int64_t ni = r / ho;
        const int y0 = 2 * oy - 1, x0 = 2 * ox - 1;
        float win[4][4][3];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int y = y0 + i;
            const bool yin = y >= 0 && y < h;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int x = x0 + j;
                const bool inside = yin && x >= 0 && x < w;
                const T* px = in + ((ni * h + (inside ? y : 0)) * w + (inside ? x : 0)) * 3;
#pragma unroll
                for (int c = 0; c < 3; ++c) win[i][j][c] = inside ? load(px + c) : 0.f;
            }
        }
        float best[K];
#pragma unroll
        for (int k = 0; k < K; ++k) best[k] = -INFINITY;
#pragma unroll
        for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
            for (int dx = 0; dx < 2; ++dx) {
#if SIDNET_STEM_TAP_OUTER
                float acc[K];
#pragma unroll
                for (int k = 0; k < K; ++k) acc[k] = 0.f;
#pragma unroll
                for (int ky = 0; ky < 3; ++ky)
#pragma unroll
                    for (int kx = 0; kx < 3; ++kx)
#pragma unroll
                        for (int c = 0; c < 3; ++c) {
                            const float v = win[dy + ky][dx + kx][c];
#pragma unroll
                            for (int k = 0; k < K; ++k) acc[k] = fmaf(p.w[k * kTaps + (ky * 3 + kx) * 3 + c], v, acc[k]);
                        }
#pragma unroll
                for (int k = 0; k < K; ++k) best[k] = fmaxf(best[k], acc[k]);
#else
#pragma unroll
                for (int k = 0; k < K; ++k) {
                    float a = 0.f;
#pragma unroll
                    for (int ky = 0; ky < 3; ++ky)
#pragma unroll
                        for (int kx = 0; kx < 3; ++kx)
#pragma unroll
                            for (int c = 0; c < 3; ++c) a = fmaf(p.w[k * kTaps + (ky * 3 + kx) * 3 + c], win[dy + ky][dx + kx][c], a);
                    best[k] = fmaxf(best[k], a);
                }
#endif
            }
        }
#pragma unroll
        for (int k = 0; k < K; ++k) best[k] = activate<Act>(best[k] + p.b[k], slope);
        store<K>(out + t * kOut + k0, best);
    }
}

template <typename T, int G, int Act>
cudaError_t launch(const void* in, void* out, int n, int h, int w, int k, const float* weight, const float* bias,
                   float slope, cudaStream_t s) {
    const int ho = h / 2, wo = w / 2;
    const int64_t total = int64_t(n) * ho * wo;
    const int64_t blocks64 = (total + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(blocks64 < (int64_t(1) << 20) ? blocks64 : (int64_t(1) << 20));
    for (int k0 = 0; k0 < k; k0 += G) {
        StemParams<G> p;
        std::memcpy(p.w, weight + k0 * kTaps, sizeof(p.w));
        for (int g = 0; g < G; ++g) p.b[g] = bias != nullptr ? bias[k0 + g] : 0.f;
        stemKernel<T, G, Act><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(in), static_cast<T*>(out), p, total,
                                                          h, w, ho, wo, k, k0, slope);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

template <typename T, int G>
cudaError_t dispatchAct(const void* in, void* out, int n, int h, int w, int k, const float* weight, const float* bias,
                        int act, float slope, cudaStream_t s) {
    // Identity runs as leaky ReLU with slope 1 (max(x, x) = x): one instantiation fewer to compile.
    if (act == SIDNET_STEM_RELU) return launch<T, G, SIDNET_STEM_RELU>(in, out, n, h, w, k, weight, bias, slope, s);
    if (act == SIDNET_STEM_IDENTITY) slope = 1.f;
    return launch<T, G, SIDNET_STEM_LEAKY_RELU>(in, out, n, h, w, k, weight, bias, slope, s);
}

template <typename T>
cudaError_t dispatchGroup(const void* in, void* out, int n, int h, int w, int k, const float* weight,
                          const float* bias, int act, float slope, cudaStream_t s) {
#if SIDNET_STEM_GROUP == 16
    if (k % 16 == 0) return dispatchAct<T, 16>(in, out, n, h, w, k, weight, bias, act, slope, s);
#endif
    return dispatchAct<T, 8>(in, out, n, h, w, k, weight, bias, act, slope, s);
}

}  // namespace

extern "C" cudaError_t stemConvActPool(const void* in, void* out, int dtype, int n, int h, int w, int k,
                                       const float* weight, const float* bias, int act, float slope, cudaStream_t s) {
    if (n < 0 || h < 0 || w < 0 || k < 0) return cudaErrorInvalidValue;
    if (dtype != SIDNET_DTYPE_FLOAT32 && dtype != SIDNET_DTYPE_FLOAT16) return cudaErrorInvalidValue;
    if (act != SIDNET_STEM_IDENTITY && act != SIDNET_STEM_RELU && act != SIDNET_STEM_LEAKY_RELU) {
        return cudaErrorInvalidValue;
    }
    if (int64_t(n) * (h / 2) * (w / 2) * k == 0) return cudaSuccess;
    if (k % 8 != 0) return cudaErrorNotSupported;
    if (in == nullptr || out == nullptr || weight == nullptr) return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(out) % 16 != 0) return cudaErrorInvalidValue;
    if (dtype == SIDNET_DTYPE_FLOAT16) return dispatchGroup<__half>(in, out, n, h, w, k, weight, bias, act, slope, s);
    return dispatchGroup<float>(in, out, n, h, w, k, weight, bias, act, slope, s);
}
