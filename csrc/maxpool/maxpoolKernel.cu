#include <cuda_fp16.h>

#include <cstdint>

#include "maxpoolKernel.h"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float max4(float a, float b, float c, float d) { return fmaxf(fmaxf(a, b), fmaxf(c, d)); }
__device__ __forceinline__ __half max4(__half a, __half b, __half c, __half d) {
    return __hmax(__hmax(a, b), __hmax(c, d));
}
__device__ __forceinline__ float4 max4(float4 a, float4 b, float4 c, float4 d) {
    return make_float4(max4(a.x, b.x, c.x, d.x), max4(a.y, b.y, c.y, d.y), max4(a.z, b.z, c.z, d.z),
                       max4(a.w, b.w, c.w, d.w));
}
// 8 halves in one 16-byte word, compared as four half2 pairs.
__device__ __forceinline__ uint4 max4(uint4 a, uint4 b, uint4 c, uint4 d) {
    uint4 r;
    const __half2* pa = reinterpret_cast<const __half2*>(&a);
    const __half2* pb = reinterpret_cast<const __half2*>(&b);
    const __half2* pc = reinterpret_cast<const __half2*>(&c);
    const __half2* pd = reinterpret_cast<const __half2*>(&d);
    __half2* pr = reinterpret_cast<__half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) pr[i] = __hmax2(__hmax2(pa[i], pb[i]), __hmax2(pc[i], pd[i]));
    return r;
}

// Thread t writes output vector t (channel-vector fastest, then x, y, n): a warp reads 4 contiguous input spans and
// writes one contiguous output span, so every access is coalesced.
template <typename V, typename Index>
__global__ void __launch_bounds__(kThreads) maxPoolKernel(const V* __restrict__ in, V* __restrict__ out, Index total,
                                                          Index cv, Index wo, Index ho, Index w, Index h) {
    for (Index t = Index(blockIdx.x) * kThreads + threadIdx.x; t < total; t += Index(gridDim.x) * kThreads) {
        const Index ci = t % cv;
        Index r = t / cv;
        const Index ox = r % wo;
        r /= wo;
        const Index oy = r % ho;
        const Index ni = r / ho;
        const Index base = ((ni * h + 2 * oy) * w + 2 * ox) * cv + ci;
        const Index row = w * cv;
        out[t] = max4(__ldg(in + base), __ldg(in + base + cv), __ldg(in + base + row), __ldg(in + base + row + cv));
    }
}

template <typename V, typename Index>
cudaError_t launch(const void* in, void* out, int64_t n, int64_t h, int64_t w, int64_t cv, cudaStream_t st) {
    const int64_t ho = h / 2, wo = w / 2;
    const int64_t total = n * ho * wo * cv;
    const int64_t blocks64 = (total + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(blocks64 < (int64_t(1) << 20) ? blocks64 : (int64_t(1) << 20));
    maxPoolKernel<V, Index><<<blocks, kThreads, 0, st>>>(static_cast<const V*>(in), static_cast<V*>(out), total, cv,
                                                         wo, ho, w, h);
    return cudaGetLastError();
}

template <typename V>
cudaError_t dispatchIndex(const void* in, void* out, int64_t n, int64_t h, int64_t w, int64_t cv, cudaStream_t st) {
    const bool small = n * h * w * cv < (int64_t(1) << 31);
    return small ? launch<V, uint32_t>(in, out, n, h, w, cv, st) : launch<V, uint64_t>(in, out, n, h, w, cv, st);
}

}  // namespace

extern "C" cudaError_t maxPool2x2Nhwc(const void* in, void* out, int dtype, int n, int h, int w, int c,
                                      cudaStream_t s) {
    if (n < 0 || h < 0 || w < 0 || c < 0) return cudaErrorInvalidValue;
    if (dtype != SIDNET_DTYPE_FLOAT32 && dtype != SIDNET_DTYPE_FLOAT16) return cudaErrorInvalidValue;
    if (int64_t(n) * (h / 2) * (w / 2) * c == 0) return cudaSuccess;
    if (in == nullptr || out == nullptr) return cudaErrorInvalidValue;
    const bool aligned = (reinterpret_cast<uintptr_t>(in) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
    if (dtype == SIDNET_DTYPE_FLOAT16) {
        if (aligned && c % 8 == 0) return dispatchIndex<uint4>(in, out, n, h, w, c / 8, s);
        return dispatchIndex<__half>(in, out, n, h, w, c, s);
    }
    if (aligned && c % 4 == 0) return dispatchIndex<float4>(in, out, n, h, w, c / 4, s);
    return dispatchIndex<float>(in, out, n, h, w, c, s);
}
