// Stand-alone driver of every launcher, for compute-sanitizer (memcheck, racecheck, synccheck, initcheck).
// Correctness against the PyTorch references lives in tests/test_kernels.py; this only exercises each code path
// (reorg vector/scalar/generic stride; region decode staged/in place; region top-K shared, workspace copy and
// radix-select paths, no candidates, n == 0; max-pool vector/scalar; stem conv+act+pool, both channel groups, odd
// sizes, checked against a CPU reference) on random data and checks the cheap invariants.
// Build (benchmarks/run_gpu.sh sanitize): nvcc -std=c++17 -lineinfo csrc/tests/kernelsSmoke.cpp csrc/*/*.cu
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <cuda_fp16.h>
#include <cuda_runtime.h>  // typed cudaMalloc overloads

#include "../maxpool/maxpoolKernel.h"
#include "../region/regionKernel.h"
#include "../reorg/reorgKernel.h"
#include "../stem/stemKernel.h"

#define CHECK(expr)                                                                                 \
    do {                                                                                            \
        cudaError_t e_ = (expr);                                                                    \
        if (e_ != cudaSuccess) {                                                                    \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
            std::exit(1);                                                                           \
        }                                                                                           \
    } while (0)

static std::mt19937 rng(1234);

template <typename T>
static T* deviceRandom(size_t count, float scale, bool half) {
    std::normal_distribution<float> dist(0.0f, scale);
    void* d = nullptr;
    if (half) {
        std::vector<__half> h(count);
        for (auto& v : h) v = __float2half(dist(rng));
        CHECK(cudaMalloc(&d, count * sizeof(__half) + 16));
        CHECK(cudaMemcpy(d, h.data(), count * sizeof(__half), cudaMemcpyHostToDevice));
    } else {
        std::vector<float> h(count);
        for (auto& v : h) v = dist(rng);
        CHECK(cudaMalloc(&d, count * sizeof(float) + 16));
        CHECK(cudaMemcpy(d, h.data(), count * sizeof(float), cudaMemcpyHostToDevice));
    }
    return static_cast<T*>(d);
}

static void reorgCase(int dtype, int n, int c, int h, int w, int s, size_t offsetElems) {
    const size_t count = size_t(n) * c * h * w;
    const size_t esize = dtype == SIDNET_DTYPE_FLOAT32 ? 4 : 2;
    char* in = deviceRandom<char>(count + offsetElems, 1.0f, dtype == SIDNET_DTYPE_FLOAT16);
    void* out = nullptr;
    CHECK(cudaMalloc(&out, count * esize + 16));
    CHECK(reorgForward(in + offsetElems * esize, out, dtype, n, c, h, w, s, nullptr));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaFree(in));
    CHECK(cudaFree(out));
}

static void regionCase(int dtype, int n, int a, int c, int h, int w, float thresh, int topk) {
    const size_t count = size_t(n) * a * (5 + c) * h * w;
    void* raw = deviceRandom<void>(count, 2.0f, dtype == SIDNET_DTYPE_FLOAT16);
    std::vector<float> anchorsH(2 * a);
    for (int i = 0; i < 2 * a; ++i) anchorsH[i] = 10.0f + 7.0f * i;
    float* anchors = nullptr;
    CHECK(cudaMalloc(&anchors, anchorsH.size() * sizeof(float)));
    CHECK(cudaMemcpy(anchors, anchorsH.data(), anchorsH.size() * sizeof(float), cudaMemcpyHostToDevice));
    const size_t m = size_t(a) * h * w;

    float* dense = nullptr;
    CHECK(cudaMalloc(&dense, n * m * (5 + c) * sizeof(float) + 16));
    CHECK(regionDecode(raw, dtype, anchors, n, a, c, h, w, 416.0f / w, 416.0f / h, dense, nullptr));

    float* dets = nullptr;
    int* num = nullptr;
    void* ws = nullptr;
    const size_t wsBytes = regionTopKWorkspaceSize(n, a, h, w, topk);
    CHECK(cudaMalloc(&dets, size_t(n) * topk * 6 * sizeof(float) + 16));
    CHECK(cudaMalloc(&num, n * sizeof(int) + 16));
    if (wsBytes) CHECK(cudaMalloc(&ws, wsBytes));
    CHECK(regionTopK(raw, dtype, anchors, n, a, c, h, w, 416.0f / w, 416.0f / h, thresh, topk, dets, num, ws, wsBytes,
                     nullptr));
    CHECK(cudaDeviceSynchronize());

    std::vector<float> d(size_t(n) * topk * 6);
    std::vector<int> k(n);
    CHECK(cudaMemcpy(d.data(), dets, d.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(k.data(), num, n * sizeof(int), cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; ++i) {
        if (k[i] < 0 || k[i] > topk || size_t(k[i]) > m) {
            std::fprintf(stderr, "bad num %d\n", k[i]);
            std::exit(1);
        }
        for (int r = 0; r < topk; ++r) {
            const float* row = &d[(size_t(i) * topk + r) * 6];
            const bool ok = r < k[i] ? (row[4] >= thresh && (r == 0 || row[4] <= (row - 6)[4]))
                                     : (row[0] == 0 && row[4] == 0 && row[5] == 0);
            if (!ok || std::isnan(row[0])) {
                std::fprintf(stderr, "bad row %d of image %d (num %d, score %g)\n", r, i, k[i], row[4]);
                std::exit(1);
            }
        }
    }
    std::printf("regionTopK dtype=%d n=%d a=%d c=%d %dx%d thresh=%.2f topk=%d: num[0]=%d\n", dtype, n, a, c, h, w,
                thresh, topk, n ? k[0] : -1);
    CHECK(cudaFree(raw));
    CHECK(cudaFree(anchors));
    CHECK(cudaFree(dense));
    CHECK(cudaFree(dets));
    CHECK(cudaFree(num));
    if (ws) CHECK(cudaFree(ws));
}

static void maxpoolCase(int dtype, int n, int h, int w, int c) {
    const size_t esize = dtype == SIDNET_DTYPE_FLOAT32 ? 4 : 2;
    void* in = deviceRandom<void>(size_t(n) * h * w * c, 1.0f, dtype == SIDNET_DTYPE_FLOAT16);
    void* out = nullptr;
    CHECK(cudaMalloc(&out, size_t(n) * (h / 2) * (w / 2) * c * esize + 16));
    CHECK(maxPool2x2Nhwc(in, out, dtype, n, h, w, c, nullptr));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaFree(in));
    CHECK(cudaFree(out));
}

// fp32 only (exact host reference): random NHWC image, K channels, ReLU / leaky; worst |diff| must stay at rounding.
static void stemCase(int n, int h, int w, int k, int act) {
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> x(size_t(n) * h * w * 3), wt(size_t(k) * 27), b(k);
    for (auto& v : x) v = dist(rng);
    for (auto& v : wt) v = 0.3f * dist(rng);
    for (auto& v : b) v = 0.1f * dist(rng);
    const int ho = h / 2, wo = w / 2;
    float *din = nullptr, *dout = nullptr;
    CHECK(cudaMalloc(&din, x.size() * sizeof(float) + 16));
    CHECK(cudaMalloc(&dout, size_t(n) * ho * wo * k * sizeof(float) + 16));
    CHECK(cudaMemcpy(din, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(stemConvActPool(din, dout, SIDNET_DTYPE_FLOAT32, n, h, w, k, wt.data(), b.data(), act, 0.1f, nullptr));
    CHECK(cudaDeviceSynchronize());
    std::vector<float> got(size_t(n) * ho * wo * k);
    CHECK(cudaMemcpy(got.data(), dout, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    double worst = 0;
    for (int ni = 0; ni < n; ++ni)
        for (int oy = 0; oy < ho; ++oy)
            for (int ox = 0; ox < wo; ++ox)
                for (int kk = 0; kk < k; ++kk) {
                    float best = -INFINITY;
                    for (int p = 0; p < 4; ++p) {
                        const int y = 2 * oy + p / 2, xx = 2 * ox + p % 2;
                        float a = 0;
                        for (int ky = 0; ky < 3; ++ky)
                            for (int kx = 0; kx < 3; ++kx)
                                for (int c = 0; c < 3; ++c) {
                                    const int iy = y + ky - 1, ix = xx + kx - 1;
                                    if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                                    a += wt[kk * 27 + (ky * 3 + kx) * 3 + c] * x[((size_t(ni) * h + iy) * w + ix) * 3 + c];
                                }
                        best = std::max(best, a);
                    }
                    float v = best + b[kk];
                    v = act == SIDNET_STEM_RELU ? std::max(v, 0.f) : act == SIDNET_STEM_LEAKY_RELU ? std::max(v, 0.1f * v) : v;
                    worst = std::max(worst, double(std::fabs(v - got[((size_t(ni) * ho + oy) * wo + ox) * k + kk])));
                }
    if (worst > 1e-4) {
        std::fprintf(stderr, "stem n=%d %dx%d k=%d act=%d: max |diff| %g\n", n, h, w, k, act, worst);
        std::exit(1);
    }
    std::printf("stemConvActPool n=%d %dx%d k=%d act=%d: max |diff| %.2g\n", n, h, w, k, act, worst);
    CHECK(cudaFree(din));
    CHECK(cudaFree(dout));
}

int main() {
    for (int dtype : {SIDNET_DTYPE_FLOAT32, SIDNET_DTYPE_FLOAT16}) {
        reorgCase(dtype, 2, 64, 26, 26, 2, 0);  // vector loads
        reorgCase(dtype, 2, 3, 10, 6, 2, 1);    // misaligned: scalar path
        reorgCase(dtype, 2, 5, 21, 21, 3, 0);   // runtime stride
        reorgCase(dtype, 0, 5, 4, 4, 2, 0);     // empty
        regionCase(dtype, 2, 5, 1, 13, 13, 0.25f, 100);   // shared-memory path, count > topk
        regionCase(dtype, 3, 3, 3, 7, 13, 0.05f, 1000);   // topk > A*H*W
        regionCase(dtype, 2, 5, 1, 32, 32, 0.05f, 300);   // workspace + radix select
        regionCase(dtype, 1, 5, 1, 32, 32, 0.05f, 4096);  // radix select, largest k
        regionCase(dtype, 2, 5, 3, 32, 32, 0.6f, 50);     // workspace, count <= 4096
        regionCase(dtype, 2, 5, 1, 13, 13, 1.5f, 100);    // no candidates
        regionCase(dtype, 1, 1, 400, 3, 5, 0.0f, 10);     // wide rows: in-place decode
        maxpoolCase(dtype, 2, 26, 26, 64);                // vector path
        maxpoolCase(dtype, 2, 9, 7, 3);                   // scalar path, odd sizes
    }
    stemCase(2, 32, 32, 32, SIDNET_STEM_RELU);            // two 16-channel launches
    stemCase(1, 9, 7, 24, SIDNET_STEM_LEAKY_RELU);        // 8-channel groups, odd sizes (floor)
    stemCase(1, 1, 5, 8, SIDNET_STEM_IDENTITY);           // empty output
    if (stemConvActPool(nullptr, nullptr, SIDNET_DTYPE_FLOAT32, 1, 4, 4, 12, nullptr, nullptr, 1, 0.f, nullptr) !=
        cudaErrorNotSupported) {
        std::fprintf(stderr, "stem: K = 12 must be refused as not supported\n");
        std::exit(1);
    }
    CHECK(regionTopK(nullptr, 0, nullptr, 0, 5, 1, 13, 13, 32.0f, 32.0f, 0.5f, 100, nullptr, nullptr, nullptr, 0,
                     nullptr));
    std::printf("kernelsSmoke: all launches OK\n");
    return 0;
}
