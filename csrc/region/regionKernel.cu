#include <climits>
#include <cstdint>

#include <cuda_fp16.h>

#include "regionKernel.h"

namespace {

constexpr int kSortCap = REGION_TOPK_MAX_K;  // keys one block sorts in shared memory (32 KiB of uint64)
constexpr int kTopkThreads = 512;

struct GridShape {
    int a, c, h, w, hw, m;  // m = a*h*w cells x anchors per image
    float sx, sy;
};

__device__ __forceinline__ float load(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(__ldg(p)); }

// Same formula as torch.sigmoid's CUDA kernel, so that fp32 results agree to the last bit or two.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Max and first argmax of the C class logits of one cell/anchor (`base` points at field 0, fields hw apart).
template <typename T>
__device__ __forceinline__ float classMax(const T* base, int c, int hw, int* arg) {
    float mx = load(base + 5 * hw);
    int best = 0;
    for (int k = 1; k < c; ++k) {
        const float v = load(base + (5 + k) * hw);
        if (v > mx) {
            mx = v;
            best = k;
        }
    }
    *arg = best;
    return mx;
}

// score = sigmoid(to) * max softmax = sigmoid(to) * exp(0) / sum_k exp(l_k - max).
template <typename T>
__device__ __forceinline__ float cellScore(const T* base, int c, int hw, int* cls) {
    const float obj = sigmoid(load(base + 4 * hw));
    if (c == 1) {
        *cls = 0;
        return obj;
    }
    const float mx = classMax(base, c, hw, cls);
    float sum = 0.0f;
    for (int k = 0; k < c; ++k) sum += expf(load(base + (5 + k) * hw) - mx);
    return obj * (1.0f / sum);
}

template <typename T>
__device__ __forceinline__ void cellBox(const T* base, const float* anchors, int ai, int x, int y, const GridShape& g,
                                        float box[4]) {
    box[0] = (sigmoid(load(base)) + float(x)) * g.sx;
    box[1] = (sigmoid(load(base + g.hw)) + float(y)) * g.sy;
    box[2] = expf(load(base + 2 * g.hw)) * __ldg(anchors + 2 * ai);
    box[3] = expf(load(base + 3 * g.hw)) * __ldg(anchors + 2 * ai + 1);
}

// Score in the high word (non-negative floats order like their bit patterns), ~m in the low word: sorting keys
// descending orders by score descending, then by lower m. A real key is never 0, so 0 pads a sort.
__device__ __forceinline__ uint64_t makeKey(float score, int m) {
    return (uint64_t(__float_as_uint(score)) << 32) | uint64_t(~uint32_t(m));
}

// Appends `key` (where `keep`) to buf at a slot taken from *counter, one shared atomic per warp. Every lane of the
// warp must call it (uniform loop trip counts), so the ballot sees the whole warp.
__device__ __forceinline__ void warpAppend(bool keep, uint64_t key, uint64_t* buf, int* counter) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (ballot == 0u) return;
    const int leader = __ffs(ballot) - 1;
    int base = 0;
    if (int(lane) == leader) base = atomicAdd(counter, __popc(ballot));
    base = __shfl_sync(0xffffffffu, base, leader);
    if (keep) buf[base + __popc(ballot & ((1u << lane) - 1u))] = key;
}

// Block-wide bitonic sort, descending, of p (a power of two) keys in shared memory. Pair t compares keys i and
// i + stride with i = 2t - (t mod stride); for stride <= 32 the pairs of a warp's threads (t = 32w .. 32w + 31, and
// the same t + kTopkThreads*r on later rounds) stay inside keys [64w, 64w + 64), so consecutive stages of such
// strides only need the warp to agree (__syncwarp). A stage of wider stride, before or after, needs the block:
// for p = 1024 that is 15 block barriers instead of 55.
__device__ void bitonicSortDesc(uint64_t* keys, int p) {
    for (int size = 2; size <= p; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < (p >> 1); t += kTopkThreads) {
                const int i = 2 * t - (t & (stride - 1));
                const int j = i + stride;
                const uint64_t x = keys[i], y = keys[j];
                const bool desc = (i & size) == 0;
                if ((x < y) == desc && x != y) {
                    keys[i] = y;
                    keys[j] = x;
                }
            }
            const int nextStride = stride > 1 ? stride >> 1 : size;  // first stride of size*2 is size
            const bool last = stride == 1 && size == p;
            if (stride <= 32 && nextStride <= 32 && !last) {
                __syncwarp();
            } else {
                __syncthreads();
            }
        }
    }
}

struct SelectState {
    uint64_t prefix, mask;  // digits fixed so far (mask marks them)
    int kRem;               // keys still wanted among those that match prefix
    int done;
};

// Radix select (8-bit digits, most significant first) of the k largest of `count` unique keys in buf: on return
// the selected keys are exactly those with (key & st->mask) >= st->prefix. Needs 0 < k < count.
__device__ void radixSelectTopK(const uint64_t* buf, int count, int k, int* hist, SelectState* st) {
    if (threadIdx.x == 0) *st = SelectState{0, 0, k, 0};
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += kTopkThreads) hist[i] = 0;
        __syncthreads();
        const uint64_t prefix = st->prefix, mask = st->mask;
        for (int i = threadIdx.x; i < count; i += kTopkThreads) {
            const uint64_t key = buf[i];
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane l holds digits 255-8l .. 248-8l (descending); an inclusive scan over lanes gives, per lane, how
            // many matching keys have a digit at or above its lowest one.
            const int lane = threadIdx.x;
            int local[8];
            int s = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                local[j] = hist[255 - 8 * lane - j];
                s += local[j];
            }
            int incl = s;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += v;
            }
            const int kRem = st->kRem;
            __syncwarp();  // every lane has read *st before one lane rewrites it below
            const int excl = incl - s;
            if (excl < kRem && kRem <= incl) {  // exactly one lane
                int cum = excl;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (cum + local[j] >= kRem) {
                        const int digit = 255 - 8 * lane - j;
                        const int rem = kRem - cum;
                        st->prefix = prefix | (uint64_t(digit) << shift);
                        st->mask = mask | (uint64_t(0xffu) << shift);
                        st->kRem = rem;
                        st->done = local[j] == rem;  // the whole bin is wanted: no need to look further down
                        break;
                    }
                    cum += local[j];
                }
            }
        }
        __syncthreads();
        if (st->done) break;
    }
}

template <typename T>
__global__ void __launch_bounds__(kTopkThreads) regionTopKKernel(const T* __restrict__ raw,
                                                                 const float* __restrict__ anchors, GridShape g,
                                                                 float confThresh, int topk, float* __restrict__ dets,
                                                                 int* __restrict__ num, uint64_t* __restrict__ ws) {
    __shared__ uint64_t keys[kSortCap];
    __shared__ int hist[256];
    __shared__ int counter;
    __shared__ SelectState st;

    const int img = blockIdx.x;
    const int fields = 5 + g.c;
    const T* in = raw + size_t(img) * size_t(g.a) * fields * g.hw;
    // Candidates land in shared memory when the whole grid fits there, else in this image's workspace slice.
    uint64_t* buf = g.m <= kSortCap ? keys : ws + size_t(img) * g.m;

    if (threadIdx.x == 0) counter = 0;
    __syncthreads();
    for (int base = 0; base < g.m; base += kTopkThreads) {
        const int m = base + threadIdx.x;
        bool keep = false;
        uint64_t key = 0;
        if (m < g.m) {
            const int ai = m / g.hw;
            const int cell = m - ai * g.hw;
            int cls;
            const float score = cellScore(in + size_t(ai) * fields * g.hw + cell, g.c, g.hw, &cls);
            keep = score >= confThresh;
            key = makeKey(score, m);
        }
        warpAppend(keep, key, buf, &counter);
    }
    __syncthreads();
    const int count = counter;
    const int k = min(count, topk);

    int selected = 0;  // keys now in `keys`, all of them wanted
    if (k > 0 && count <= kSortCap) {
        if (buf != keys) {
            for (int i = threadIdx.x; i < count; i += kTopkThreads) keys[i] = buf[i];
        }
        selected = count;
    } else if (k > 0) {  // count > kSortCap >= topk: only reachable with the workspace
        radixSelectTopK(buf, count, k, hist, &st);
        const uint64_t prefix = st.prefix, mask = st.mask;
        if (threadIdx.x == 0) counter = 0;
        __syncthreads();
        for (int base = 0; base < count; base += kTopkThreads) {
            const int i = base + threadIdx.x;
            const uint64_t key = i < count ? buf[i] : 0;
            warpAppend(i < count && (key & mask) >= prefix, key, keys, &counter);
        }
        selected = k;
    }
    if (selected > 0) {
        int p = 1;
        while (p < selected) p <<= 1;
        for (int i = selected + threadIdx.x; i < p; i += kTopkThreads) keys[i] = 0;
        __syncthreads();
        bitonicSortDesc(keys, p);
    }

    float* out = dets + size_t(img) * topk * 6;
    for (int r = threadIdx.x; r < k; r += kTopkThreads) {
        const uint64_t key = keys[r];
        const int m = int(~uint32_t(key));
        const int ai = m / g.hw;
        const int cell = m - ai * g.hw;
        const int y = cell / g.w;
        const int x = cell - y * g.w;
        const T* base = in + size_t(ai) * fields * g.hw + cell;
        float box[4];
        cellBox(base, anchors, ai, x, y, g, box);
        int cls = 0;
        if (g.c > 1) classMax(base, g.c, g.hw, &cls);
        float* row = out + size_t(r) * 6;
        row[0] = box[0] - 0.5f * box[2];
        row[1] = box[1] - 0.5f * box[3];
        row[2] = box[0] + 0.5f * box[2];
        row[3] = box[1] + 0.5f * box[3];
        row[4] = __uint_as_float(uint32_t(key >> 32));
        row[5] = float(cls);
    }
    for (int e = k * 6 + threadIdx.x; e < topk * 6; e += kTopkThreads) out[e] = 0.0f;
    if (threadIdx.x == 0) num[img] = k;
}

// Dense decode, one thread per (image, m) row. kStaged: the block's rows are assembled in shared memory and
// written back as one contiguous, coalesced span (rows are 5+C floats, so direct per-thread stores would stride).
template <typename T, bool kStaged>
__global__ void regionDecodeKernel(const T* __restrict__ raw, const float* __restrict__ anchors, GridShape g,
                                   int64_t rows, float* __restrict__ out) {
    extern __shared__ float tile[];
    const int fields = 5 + g.c;
    const int64_t row0 = int64_t(blockIdx.x) * blockDim.x;
    const int64_t row = row0 + threadIdx.x;
    float* dst = kStaged ? tile + size_t(threadIdx.x) * fields : out + row * fields;
    if (row < rows) {
        const int64_t img = row / g.m;
        const int m = int(row - img * g.m);
        const int ai = m / g.hw;
        const int cell = m - ai * g.hw;
        const int y = cell / g.w;
        const int x = cell - y * g.w;
        const T* base = raw + (size_t(img) * g.a + ai) * fields * g.hw + cell;
        float box[4];
        cellBox(base, anchors, ai, x, y, g, box);
        dst[0] = box[0];
        dst[1] = box[1];
        dst[2] = box[2];
        dst[3] = box[3];
        dst[4] = sigmoid(load(base + 4 * g.hw));
        int cls;
        const float mx = classMax(base, g.c, g.hw, &cls);
        float sum = 0.0f;
        for (int k = 0; k < g.c; ++k) {
            const float e = expf(load(base + (5 + k) * g.hw) - mx);
            dst[5 + k] = e;
            sum += e;
        }
        for (int k = 0; k < g.c; ++k) dst[5 + k] = dst[5 + k] / sum;  // division, as torch.softmax does
    }
    if (kStaged) {
        __syncthreads();
        const int64_t valid = rows - row0 < blockDim.x ? rows - row0 : blockDim.x;
        const int64_t span = valid * fields;
        float* o = out + row0 * fields;
        for (int64_t e = threadIdx.x; e < span; e += blockDim.x) o[e] = tile[e];
    }
}

bool badShape(int n, int a, int c, int h, int w) {
    if (n < 0 || a < 0 || c < 1 || h < 0 || w < 0) return true;
    return int64_t(a) * h * w > INT_MAX || int64_t(a) * (5 + c) * h * w > INT_MAX;
}

GridShape makeGrid(int a, int c, int h, int w, float sx, float sy) {
    return GridShape{a, c, h, w, h * w, a * h * w, sx, sy};
}

template <typename T>
cudaError_t launchDecode(const void* raw, const float* anchors, const GridShape& g, int64_t rows, float* out,
                         cudaStream_t s) {
    constexpr size_t kSharedLimit = 48 * 1024;  // no opt-in needed below this on any target
    const size_t rowBytes = size_t(5 + g.c) * sizeof(float);
    const T* in = static_cast<const T*>(raw);
    int threads = 128;
    while (threads > 32 && threads * rowBytes > kSharedLimit) threads >>= 1;
    const int64_t blocks = (rows + threads - 1) / threads;
    if (blocks > INT_MAX) return cudaErrorInvalidValue;
    if (threads * rowBytes <= kSharedLimit) {
        regionDecodeKernel<T, true><<<unsigned(blocks), threads, threads * rowBytes, s>>>(in, anchors, g, rows, out);
    } else {  // thousands of classes: rows written in place
        regionDecodeKernel<T, false><<<unsigned(blocks), threads, 0, s>>>(in, anchors, g, rows, out);
    }
    return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t regionDecode(const void* raw, int dtype, const float* anchors, int n, int a, int c, int h,
                                    int w, float strideX, float strideY, float* out, cudaStream_t s) {
    if (badShape(n, a, c, h, w)) return cudaErrorInvalidValue;
    if (dtype != SIDNET_DTYPE_FLOAT32 && dtype != SIDNET_DTYPE_FLOAT16) return cudaErrorInvalidValue;
    const GridShape g = makeGrid(a, c, h, w, strideX, strideY);
    const int64_t rows = int64_t(n) * g.m;
    if (rows == 0) return cudaSuccess;
    if (raw == nullptr || anchors == nullptr || out == nullptr) return cudaErrorInvalidValue;
    return dtype == SIDNET_DTYPE_FLOAT32 ? launchDecode<float>(raw, anchors, g, rows, out, s)
                                         : launchDecode<__half>(raw, anchors, g, rows, out, s);
}

extern "C" size_t regionTopKWorkspaceSize(int n, int a, int h, int w, int /*topk*/) {
    if (n <= 0 || a <= 0 || h <= 0 || w <= 0) return 0;
    const int64_t m = int64_t(a) * h * w;
    return m <= kSortCap ? 0 : size_t(n) * size_t(m) * sizeof(uint64_t);
}

extern "C" cudaError_t regionTopK(const void* raw, int dtype, const float* anchors, int n, int a, int c, int h,
                                  int w, float strideX, float strideY, float confThresh, int topk, float* dets,
                                  int* num, void* workspace, size_t workspaceBytes, cudaStream_t s) {
    if (badShape(n, a, c, h, w) || topk < 0) return cudaErrorInvalidValue;
    if (dtype != SIDNET_DTYPE_FLOAT32 && dtype != SIDNET_DTYPE_FLOAT16) return cudaErrorInvalidValue;
    const GridShape g = makeGrid(a, c, h, w, strideX, strideY);
    if (topk > kSortCap && g.m > kSortCap) return cudaErrorInvalidValue;
    if (int64_t(n) * topk * 6 > INT_MAX) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    if (num == nullptr || (topk > 0 && dets == nullptr) || (g.m > 0 && (raw == nullptr || anchors == nullptr))) {
        return cudaErrorInvalidValue;
    }
    const size_t need = regionTopKWorkspaceSize(n, a, h, w, topk);
    if (need > 0 && (workspace == nullptr || workspaceBytes < need ||
                     reinterpret_cast<uintptr_t>(workspace) % alignof(uint64_t) != 0)) {
        return cudaErrorInvalidValue;
    }
    uint64_t* ws = static_cast<uint64_t*>(workspace);
    if (dtype == SIDNET_DTYPE_FLOAT32) {
        regionTopKKernel<float><<<n, kTopkThreads, 0, s>>>(static_cast<const float*>(raw), anchors, g, confThresh,
                                                           topk, dets, num, ws);
    } else {
        regionTopKKernel<__half><<<n, kTopkThreads, 0, s>>>(static_cast<const __half*>(raw), anchors, g, confThresh,
                                                            topk, dets, num, ws);
    }
    return cudaGetLastError();
}
