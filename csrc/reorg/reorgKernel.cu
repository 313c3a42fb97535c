#include <cstdint>

#include "reorgKernel.h"

namespace {

constexpr int kThreads = 256;

// Element-size-only types: reorg never interprets values, so fp32 moves as uint32_t and fp16 as uint16_t.
template <typename T>
struct Pair;
template <>
struct Pair<uint32_t> {
    using type = uint2;
};
template <>
struct Pair<uint16_t> {
    using type = ushort2;
};

// Thread t owns the s consecutive input elements in[t*s, t*s + s) (one row segment of width s), so the reads of a
// warp are one contiguous span. It writes them to s output planes (bx = 0..s-1); within each plane consecutive threads
// write consecutive w, so every store is coalesced too. S > 0 fixes the stride at compile time (vector load for 2).
template <typename T, int S, typename Index>
__global__ void __launch_bounds__(kThreads) reorgKernel(const T* __restrict__ in, T* __restrict__ out, Index total,
                                                        Index chunksPerPlane, Index c, Index wo, Index ho,
                                                        Index planeOut, int strideRt, bool vectorized) {
    const Index s = S > 0 ? Index(S) : Index(strideRt);
    for (Index t = Index(blockIdx.x) * kThreads + threadIdx.x; t < total; t += Index(gridDim.x) * kThreads) {
        const Index plane = t / chunksPerPlane;  // n*C + c of the input
        const Index q = t - plane * chunksPerPlane;
        const Index r = q / wo;  // input row h*s + by
        const Index ow = q - r * wo;
        const Index oh = r / s;
        const Index by = r - oh * s;
        const Index ni = plane / c;
        const Index ci = plane - ni * c;
        const Index dst = ((ni * c * s * s + by * s * c + ci) * ho + oh) * wo + ow;
        if constexpr (S == 2) {
            if (vectorized) {
                const typename Pair<T>::type v = reinterpret_cast<const typename Pair<T>::type*>(in)[t];
                out[dst] = v.x;
                out[dst + planeOut] = v.y;
                continue;
            }
        }
        const T* src = in + t * s;
        if constexpr (S > 0) {
#pragma unroll
            for (int bx = 0; bx < S; ++bx) out[dst + Index(bx) * planeOut] = src[bx];
        } else {
            for (Index bx = 0; bx < s; ++bx) out[dst + bx * planeOut] = src[bx];
        }
    }
}

template <typename T, typename Index>
cudaError_t launch(const void* inRaw, void* outRaw, int64_t n, int64_t c, int64_t h, int64_t w, int stride,
                   cudaStream_t st) {
    const T* in = static_cast<const T*>(inRaw);
    T* out = static_cast<T*>(outRaw);
    const int64_t wo = w / stride, ho = h / stride;
    const int64_t chunksPerPlane = h * wo;  // one chunk = s input elements of a row
    const int64_t total = n * c * chunksPerPlane;
    const int64_t planeOut = c * ho * wo;  // distance between output channel groups (by*s + bx)
    const int64_t blocks64 = (total + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(blocks64 < (int64_t(1) << 20) ? blocks64 : (int64_t(1) << 20));
    const bool vec = (reinterpret_cast<uintptr_t>(in) % (2 * sizeof(T))) == 0;
    if (stride == 2) {
        reorgKernel<T, 2, Index><<<blocks, kThreads, 0, st>>>(in, out, total, chunksPerPlane, c, wo, ho, planeOut,
                                                              stride, vec);
    } else {
        reorgKernel<T, 0, Index><<<blocks, kThreads, 0, st>>>(in, out, total, chunksPerPlane, c, wo, ho, planeOut,
                                                              stride, false);
    }
    return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t reorgForward(const void* in, void* out, int dtype, int n, int c, int h, int w, int stride,
                                    cudaStream_t s) {
    if (n < 0 || c < 0 || h < 0 || w < 0 || stride < 1 || h % stride != 0 || w % stride != 0) {
        return cudaErrorInvalidValue;
    }
    if (dtype != SIDNET_DTYPE_FLOAT32 && dtype != SIDNET_DTYPE_FLOAT16) return cudaErrorInvalidValue;
    const int64_t elements = int64_t(n) * c * h * w;
    if (elements == 0) return cudaSuccess;
    if (in == nullptr || out == nullptr) return cudaErrorInvalidValue;
    // 32-bit index arithmetic whenever every output offset fits (it does for any detector-sized tensor).
    const bool small = elements < (int64_t(1) << 31);
    if (dtype == SIDNET_DTYPE_FLOAT32) {
        return small ? launch<uint32_t, uint32_t>(in, out, n, c, h, w, stride, s)
                     : launch<uint32_t, uint64_t>(in, out, n, c, h, w, stride, s);
    }
    return small ? launch<uint16_t, uint32_t>(in, out, n, c, h, w, stride, s)
                 : launch<uint16_t, uint64_t>(in, out, n, c, h, w, stride, s);
}
