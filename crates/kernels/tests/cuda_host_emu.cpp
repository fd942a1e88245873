// Runs the CUDA kernels of src/ddpm_kernels.cu on the host, one simulated thread after another, so the
// kernels' index math, vector/tail paths and arithmetic order can be checked against the Rust CPU ops on a
// machine without a GPU (tests/cuda_emulation.rs builds and drives this file).
//
// The shims map each CUDA intrinsic to the host operation with the same IEEE semantics (x86-64 SSE f32:
// correctly rounded add/sub/mul/div/sqrt; built with -ffp-contract=off so no FMA appears). What this cannot
// check is nvcc itself; the GPU self-test (ddpm-gpu-selftest) does that on real hardware.
//
//   usage: cuda_host_emu noise  B N SEED STEP EX0 PRED GX GY            < x0 coef(2B)        > out(3BN)
//          cuda_host_emu step   B N MODE SEED STEP EX0 CLIP LO HI GX GY (LO, HI: f32 bits)  < xt m [z] coef(5B) > out(2BN)
//          cuda_host_emu normal B N SEED STREAM STEP EX0 GX GY                               > out(BN)
//   MISALIGN=1 in the environment offsets every buffer by one float (forces the scalar path).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __restrict__ __restrict

struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct dim3 { uint32_t x, y, z; };

static dim3 blockIdx, threadIdx, gridDim, blockDim;

inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return uint2{a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint2float_rn(uint32_t x) { return (float)x; }   // exact for x < 2^24, the only use
inline float __int2float_rn(int x) { return (float)x; }         // exact for the small ints used
inline int __float2int_rz(float x) { return (int)x; }           // C truncation = round toward zero
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

#include "../src/ddpm_kernels.cu"

static std::vector<float> read_f32(size_t n) {
    std::vector<float> v(n);
    if (n && fread(v.data(), 4, n, stdin) != n) { fprintf(stderr, "short read\n"); exit(2); }
    return v;
}

// A 16-byte aligned copy, or one float past alignment when MISALIGN=1.
static float* place(const std::vector<float>& v, size_t cap, bool mis) {
    float* base = (float*)aligned_alloc(16, ((cap + 8) * 4 + 15) / 16 * 16);
    float* p = base + (mis ? 1 : 0);
    if (!v.empty()) std::memcpy(p, v.data(), v.size() * 4);
    return p;
}

template <class F> static void launch(uint32_t gx, uint32_t gy, F f) {
    gridDim = dim3{gx, gy, 1};
    blockDim = dim3{256, 1, 1};
    for (uint32_t by = 0; by < gy; ++by)
        for (uint32_t bx = 0; bx < gx; ++bx)
            for (uint32_t t = 0; t < 256; ++t) {
                blockIdx = dim3{bx, by, 0};
                threadIdx = dim3{t, 0, 0};
                f();
            }
}

static uint32_t u(const char* s) { return (uint32_t)strtoul(s, nullptr, 0); }
static uint64_t u64(const char* s) { return (uint64_t)strtoull(s, nullptr, 0); }

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    const std::string mode = argv[1];
    const bool mis = getenv("MISALIGN") && std::string(getenv("MISALIGN")) == "1";
    if (mode == "noise" && argc == 10) {
        uint32_t B = u(argv[2]), N = u(argv[3]);
        uint64_t seed = u64(argv[4]);
        uint32_t step = u(argv[5]), ex0 = u(argv[6]), pred = u(argv[7]), gx = u(argv[8]), gy = u(argv[9]);
        size_t bn = (size_t)B * N;
        auto x0 = read_f32(bn);
        auto coef = read_f32(2 * (size_t)B);
        float* px = place(x0, bn, mis);
        float* po = place({}, 3 * bn, mis);
        float* pc = place(coef, coef.size(), false);
        launch(gx, gy, [&] {
            ddpm_fused_noising_f32(px, po, pc, B, N, (uint32_t)seed, (uint32_t)(seed >> 32), step, ex0, pred);
        });
        fwrite(po, 4, 3 * bn, stdout);
    } else if (mode == "step" && argc == 13) {
        uint32_t B = u(argv[2]), N = u(argv[3]), nm = u(argv[4]);
        uint64_t seed = u64(argv[5]);
        uint32_t step = u(argv[6]), ex0 = u(argv[7]), clip = u(argv[8]);
        float lo = __uint_as_float(u(argv[9])), hi = __uint_as_float(u(argv[10]));
        uint32_t gx = u(argv[11]), gy = u(argv[12]);
        size_t bn = (size_t)B * N;
        auto xt = read_f32(bn);
        auto m = read_f32(bn);
        std::vector<float> z;
        if (nm == 2) z = read_f32(bn);
        auto coef = read_f32(5 * (size_t)B);
        float* pxt = place(xt, bn, mis);
        float* pm = place(m, bn, mis);
        float* pz = nm == 2 ? place(z, bn, mis) : pxt;
        float* po = place({}, 2 * bn, mis);
        float* pc = place(coef, coef.size(), false);
        launch(gx, gy, [&] {
            ddpm_sampler_step_f32(pxt, pm, pz, po, pc, B, N, nm, (uint32_t)seed, (uint32_t)(seed >> 32), step, ex0,
                                  clip, lo, hi);
        });
        fwrite(po, 4, 2 * bn, stdout);
    } else if (mode == "normal" && argc == 10) {
        uint32_t B = u(argv[2]), N = u(argv[3]);
        uint64_t seed = u64(argv[4]);
        uint32_t stream = u(argv[5]), step = u(argv[6]), ex0 = u(argv[7]), gx = u(argv[8]), gy = u(argv[9]);
        size_t bn = (size_t)B * N;
        float* po = place({}, bn, mis);
        launch(gx, gy, [&] {
            ddpm_philox_normal_f32(po, B, N, (uint32_t)seed, (uint32_t)(seed >> 32), stream, step, ex0);
        });
        fwrite(po, 4, bn, stdout);
    } else {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    return 0;
}
