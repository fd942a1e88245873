// CUDA kernels of ddpm-kernels, compiled by build.rs to a fatbin (sm_80/86/89/90 + compute_90 PTX) embedded in the binary.
//
// Work split: grid.y walks the examples of the batch, grid.x the 4-element Philox blocks of one example.
// One thread owns one Philox block (4 consecutive elements of one example), so which thread computes an
// element never changes the value drawn for it: the noise depends only on (seed, stream, step, global example
// index, element index), exactly as crates/rng defines it. Per-element arithmetic uses explicit
// round-to-nearest intrinsics in the same order as the CPU code in src/noising.rs and src/sampler.rs, so
// the CPU and GPU outputs are bit-identical (tests on a GPU: the ddpm-gpu-selftest binary).
#include "philox.cuh"

#define DDPM_PRED_EPS 0u
#define DDPM_PRED_V 1u
#define DDPM_PRED_X0 2u

#define DDPM_NOISE_NONE 0u
#define DDPM_NOISE_PHILOX 1u
#define DDPM_NOISE_GIVEN 2u

__device__ __forceinline__ bool ddpm_aligned16(const void* p) { return (((uintptr_t)p) & 15u) == 0u; }

__device__ __forceinline__ float ddpm_get(const float4& v, int j) {
    return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// One element of the forward process: x_t = a x0 + b z and the training target.
__device__ __forceinline__ void ddpm_noise_elem(float x, float z, float a, float b, uint32_t pred, float* xt,
                                                float* tgt) {
    *xt = __fadd_rn(__fmul_rn(a, x), __fmul_rn(b, z));
    if (pred == DDPM_PRED_EPS) {
        *tgt = z;
    } else if (pred == DDPM_PRED_V) {
        *tgt = __fsub_rn(__fmul_rn(a, z), __fmul_rn(b, x));
    } else {
        *tgt = x;
    }
}

// out = [x_t | noise | target], each plane batch*n floats. coef = [batch, 2]: (sqrt_ac[t_i], sqrt_1m_ac[t_i]).
extern "C" __global__ void ddpm_fused_noising_f32(const float* __restrict__ x0, float* __restrict__ out,
                                                  const float* __restrict__ coef, uint32_t batch, uint32_t n,
                                                  uint32_t seed_lo, uint32_t seed_hi, uint32_t step,
                                                  uint32_t first_example, uint32_t pred) {
    const uint32_t nb = (n + 3u) / 4u;
    const size_t plane = (size_t)batch * n;
    const bool vec = ((n & 3u) == 0u) && ddpm_aligned16(x0) && ddpm_aligned16(out);
    for (uint32_t i = blockIdx.y; i < batch; i += gridDim.y) {
        const float a = coef[2 * (size_t)i];
        const float b = coef[2 * (size_t)i + 1];
        const uint32_t example = first_example + i;  // wraps like `(first_example + i) as u32` on the CPU
        const size_t base = (size_t)i * n;
        for (uint32_t blk = blockIdx.x * blockDim.x + threadIdx.x; blk < nb; blk += gridDim.x * blockDim.x) {
            const size_t e = base + 4 * (size_t)blk;
            if (vec) {
                // The load is issued before the Philox/Box-Muller arithmetic so its latency hides behind it.
                const float4 x = *reinterpret_cast<const float4*>(x0 + e);
                const float4 z = ddpm_normal4(seed_lo, seed_hi, DDPM_STREAM_NOISE, step, example, blk);
                float4 xt, tg;
                ddpm_noise_elem(x.x, z.x, a, b, pred, &xt.x, &tg.x);
                ddpm_noise_elem(x.y, z.y, a, b, pred, &xt.y, &tg.y);
                ddpm_noise_elem(x.z, z.z, a, b, pred, &xt.z, &tg.z);
                ddpm_noise_elem(x.w, z.w, a, b, pred, &xt.w, &tg.w);
                *reinterpret_cast<float4*>(out + e) = xt;
                *reinterpret_cast<float4*>(out + plane + e) = z;
                *reinterpret_cast<float4*>(out + 2 * plane + e) = tg;
            } else {
                const float4 z = ddpm_normal4(seed_lo, seed_hi, DDPM_STREAM_NOISE, step, example, blk);
                const uint32_t left = n - 4u * blk;
                const int cnt = left < 4u ? (int)left : 4;
                for (int j = 0; j < cnt; ++j) {
                    const float zj = ddpm_get(z, j);
                    float xt, tg;
                    ddpm_noise_elem(x0[e + j], zj, a, b, pred, &xt, &tg);
                    out[e + j] = xt;
                    out[plane + e + j] = zj;
                    out[2 * plane + e + j] = tg;
                }
            }
        }
    }
}

// One element of a sampler step: x0 = clip(a_xt x_t + a_m m); x_prev = c_x0 x0 + c_xt x_t (+ sigma z).
__device__ __forceinline__ void ddpm_step_elem(float x, float m, float z, const float* c, bool noisy, uint32_t clip,
                                               float lo, float hi, float* x_prev, float* x0_out) {
    float x0 = __fadd_rn(__fmul_rn(c[0], x), __fmul_rn(c[1], m));
    if (clip) {
        x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);
    }
    float y = __fadd_rn(__fmul_rn(c[2], x0), __fmul_rn(c[3], x));
    if (noisy) {
        y = __fadd_rn(y, __fmul_rn(c[4], z));
    }
    *x_prev = y;
    *x0_out = x0;
}

// out = [x_prev | x0_pred], each plane batch*n floats. coef = [batch, 5]: (a_xt, a_m, c_x0, c_xt, sigma).
// noise_mode: 0 none, 1 Philox Stream::Sampler keyed (seed, step, first_example + i), 2 read from zin.
extern "C" __global__ void ddpm_sampler_step_f32(const float* __restrict__ xt, const float* __restrict__ m,
                                                 const float* __restrict__ zin, float* __restrict__ out,
                                                 const float* __restrict__ coef, uint32_t batch, uint32_t n,
                                                 uint32_t noise_mode, uint32_t seed_lo, uint32_t seed_hi,
                                                 uint32_t step, uint32_t first_example, uint32_t clip, float clip_lo,
                                                 float clip_hi) {
    const uint32_t nb = (n + 3u) / 4u;
    const size_t plane = (size_t)batch * n;
    const bool noisy = noise_mode != DDPM_NOISE_NONE;
    const bool vec = ((n & 3u) == 0u) && ddpm_aligned16(xt) && ddpm_aligned16(m) && ddpm_aligned16(out) &&
                     (noise_mode != DDPM_NOISE_GIVEN || ddpm_aligned16(zin));
    for (uint32_t i = blockIdx.y; i < batch; i += gridDim.y) {
        float c[5];
#pragma unroll
        for (int k = 0; k < 5; ++k) c[k] = coef[5 * (size_t)i + k];
        const uint32_t example = first_example + i;
        const size_t base = (size_t)i * n;
        for (uint32_t blk = blockIdx.x * blockDim.x + threadIdx.x; blk < nb; blk += gridDim.x * blockDim.x) {
            const size_t e = base + 4 * (size_t)blk;
            float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
            if (vec) {
                // Loads first, so their latency hides behind the Philox/Box-Muller arithmetic.
                const float4 x = *reinterpret_cast<const float4*>(xt + e);
                const float4 mv = *reinterpret_cast<const float4*>(m + e);
                if (noise_mode == DDPM_NOISE_GIVEN) z = *reinterpret_cast<const float4*>(zin + e);
                if (noise_mode == DDPM_NOISE_PHILOX) {
                    z = ddpm_normal4(seed_lo, seed_hi, DDPM_STREAM_SAMPLER, step, example, blk);
                }
                float4 y, x0;
                ddpm_step_elem(x.x, mv.x, z.x, c, noisy, clip, clip_lo, clip_hi, &y.x, &x0.x);
                ddpm_step_elem(x.y, mv.y, z.y, c, noisy, clip, clip_lo, clip_hi, &y.y, &x0.y);
                ddpm_step_elem(x.z, mv.z, z.z, c, noisy, clip, clip_lo, clip_hi, &y.z, &x0.z);
                ddpm_step_elem(x.w, mv.w, z.w, c, noisy, clip, clip_lo, clip_hi, &y.w, &x0.w);
                *reinterpret_cast<float4*>(out + e) = y;
                *reinterpret_cast<float4*>(out + plane + e) = x0;
            } else {
                if (noise_mode == DDPM_NOISE_PHILOX) {
                    z = ddpm_normal4(seed_lo, seed_hi, DDPM_STREAM_SAMPLER, step, example, blk);
                }
                const uint32_t left = n - 4u * blk;
                const int cnt = left < 4u ? (int)left : 4;
                for (int j = 0; j < cnt; ++j) {
                    const float zj = noise_mode == DDPM_NOISE_GIVEN ? zin[e + j] : ddpm_get(z, j);
                    float y, x0;
                    ddpm_step_elem(xt[e + j], m[e + j], zj, c, noisy, clip, clip_lo, clip_hi, &y, &x0);
                    out[e + j] = y;
                    out[plane + e + j] = x0;
                }
            }
        }
    }
}

// out[i * n + e] = normal draw e of StreamKey(seed, stream, step, first_example + i).
extern "C" __global__ void ddpm_philox_normal_f32(float* __restrict__ out, uint32_t batch, uint32_t n,
                                                  uint32_t seed_lo, uint32_t seed_hi, uint32_t stream,
                                                  uint32_t step, uint32_t first_example) {
    const uint32_t nb = (n + 3u) / 4u;
    const bool vec = ((n & 3u) == 0u) && ddpm_aligned16(out);
    for (uint32_t i = blockIdx.y; i < batch; i += gridDim.y) {
        const uint32_t example = first_example + i;
        const size_t base = (size_t)i * n;
        for (uint32_t blk = blockIdx.x * blockDim.x + threadIdx.x; blk < nb; blk += gridDim.x * blockDim.x) {
            const float4 z = ddpm_normal4(seed_lo, seed_hi, stream, step, example, blk);
            const size_t e = base + 4 * (size_t)blk;
            if (vec) {
                *reinterpret_cast<float4*>(out + e) = z;
            } else {
                const uint32_t left = n - 4u * blk;
                const int cnt = left < 4u ? (int)left : 4;
                for (int j = 0; j < cnt; ++j) out[e + j] = ddpm_get(z, j);
            }
        }
    }
}
