// Device twin of crates/rng (ddpm-rng): Philox4x32-10 and the portable Box-Muller.
//
// Every float operation is an explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn,
// __fdiv_rn, __fsqrt_rn), so nvcc can neither contract a multiply and an add into an FMA nor use an
// approximate division or square root; build.rs also passes -fmad=false -ftz=false -prec-div=true
// -prec-sqrt=true. With that the GPU reproduces the CPU's f32 results bit for bit.
//
// The constants are the bit patterns of the f32 values the Rust code uses (e.g. `1.0f32 / 9.0`), written as
// bits so that no C++ constant folding can differ; tests/cuda_source.rs checks each one against Rust.
#pragma once
#include <stdint.h>

#define DDPM_PHILOX_M0 0xD2511F53u
#define DDPM_PHILOX_M1 0xCD9E8D57u
#define DDPM_PHILOX_W0 0x9E3779B9u
#define DDPM_PHILOX_W1 0xBB67AE85u

// ddpm_rng::Stream tags used by the kernels.
#define DDPM_STREAM_NOISE 1u
#define DDPM_STREAM_SAMPLER 5u

// f32 constants as bit patterns (name = value in Rust).
#define DDPM_K_INV_2P24 0x33800000u   // 1.0f32 / 16_777_216.0
#define DDPM_K_INV_2P25 0x33000000u   // 1.0f32 / 33_554_432.0
#define DDPM_K_SQRT_2 0x3fb504f3u     // std::f32::consts::SQRT_2
#define DDPM_K_LN_2 0x3f317218u       // std::f32::consts::LN_2
#define DDPM_K_TAU 0x40c90fdbu        // std::f32::consts::TAU
#define DDPM_K_INV_9 0x3de38e39u      // 1.0f32 / 9.0
#define DDPM_K_INV_7 0x3e124925u      // 1.0f32 / 7.0
#define DDPM_K_INV_5 0x3e4ccccdu      // 1.0f32 / 5.0
#define DDPM_K_INV_3 0x3eaaaaabu      // 1.0f32 / 3.0
#define DDPM_K_INV_362880 0x3638ef1du // 1.0f32 / 362_880.0
#define DDPM_K_INV_5040 0x39500d01u   // 1.0f32 / 5040.0
#define DDPM_K_INV_120 0x3c088889u    // 1.0f32 / 120.0
#define DDPM_K_INV_6 0x3e2aaaabu      // 1.0f32 / 6.0
#define DDPM_K_INV_40320 0x37d00d01u  // 1.0f32 / 40_320.0
#define DDPM_K_INV_720 0x3ab60b61u    // 1.0f32 / 720.0
#define DDPM_K_INV_24 0x3d2aaaabu     // 1.0f32 / 24.0

#define DDPM_F(bits) __uint_as_float(bits)

// ddpm_rng::philox4x32_10: counter (c.x, c.y, c.z, c.w), key (k.x, k.y).
__device__ __forceinline__ uint4 ddpm_philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k.x += DDPM_PHILOX_W0;
            k.y += DDPM_PHILOX_W1;
        }
        const uint32_t hi0 = __umulhi(DDPM_PHILOX_M0, c.x);
        const uint32_t lo0 = DDPM_PHILOX_M0 * c.x;
        const uint32_t hi1 = __umulhi(DDPM_PHILOX_M1, c.z);
        const uint32_t lo1 = DDPM_PHILOX_M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// ddpm_rng::u32_to_open01
__device__ __forceinline__ float ddpm_open01(uint32_t x) {
    return __fadd_rn(__fmul_rn(__uint2float_rn(x >> 8), DDPM_F(DDPM_K_INV_2P24)), DDPM_F(DDPM_K_INV_2P25));
}

// ddpm_rng::portable_ln (x in (0, 1])
__device__ __forceinline__ float ddpm_ln(float x) {
    const uint32_t bits = __float_as_uint(x);
    int e = (int)((bits >> 23) & 0xffu) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (m > DDPM_F(DDPM_K_SQRT_2)) {
        m = __fmul_rn(m, 0.5f);
        e += 1;
    }
    const float s = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
    const float s2 = __fmul_rn(s, s);
    float p = DDPM_F(DDPM_K_INV_9);
    p = __fadd_rn(__fmul_rn(p, s2), DDPM_F(DDPM_K_INV_7));
    p = __fadd_rn(__fmul_rn(p, s2), DDPM_F(DDPM_K_INV_5));
    p = __fadd_rn(__fmul_rn(p, s2), DDPM_F(DDPM_K_INV_3));
    p = __fadd_rn(__fmul_rn(p, s2), 1.0f);
    const float ln_m = __fmul_rn(__fmul_rn(2.0f, s), p);
    return __fadd_rn(__fmul_rn(__int2float_rn(e), DDPM_F(DDPM_K_LN_2)), ln_m);
}

// ddpm_rng::portable_sincos_2pi (u in [0, 1)): returns (sin, cos) of 2*pi*u.
__device__ __forceinline__ void ddpm_sincos_2pi(float u, float* s_out, float* c_out) {
    const int q = __float2int_rz(__fadd_rn(__fmul_rn(u, 4.0f), 0.5f));
    const float f = __fsub_rn(u, __fmul_rn(__int2float_rn(q), 0.25f));
    const float a = __fmul_rn(f, DDPM_F(DDPM_K_TAU));
    const float a2 = __fmul_rn(a, a);
    float ps = DDPM_F(DDPM_K_INV_362880);
    ps = __fsub_rn(__fmul_rn(ps, a2), DDPM_F(DDPM_K_INV_5040));
    ps = __fadd_rn(__fmul_rn(ps, a2), DDPM_F(DDPM_K_INV_120));
    ps = __fsub_rn(__fmul_rn(ps, a2), DDPM_F(DDPM_K_INV_6));
    ps = __fadd_rn(__fmul_rn(ps, a2), 1.0f);
    const float s = __fmul_rn(a, ps);
    float pc = DDPM_F(DDPM_K_INV_40320);
    pc = __fsub_rn(__fmul_rn(pc, a2), DDPM_F(DDPM_K_INV_720));
    pc = __fadd_rn(__fmul_rn(pc, a2), DDPM_F(DDPM_K_INV_24));
    pc = __fsub_rn(__fmul_rn(pc, a2), 0.5f);
    const float c = __fadd_rn(__fmul_rn(pc, a2), 1.0f);
    switch (q & 3) {
        case 0: *s_out = s; *c_out = c; break;
        case 1: *s_out = c; *c_out = -s; break;
        case 2: *s_out = -s; *c_out = -c; break;
        default: *s_out = -c; *c_out = s; break;
    }
}

// ddpm_rng::box_muller: (u1, u2) -> (r cos, r sin)
__device__ __forceinline__ void ddpm_box_muller(float u1, float u2, float* z0, float* z1) {
    const float r = __fsqrt_rn(__fmul_rn(-2.0f, ddpm_ln(u1)));
    float s, c;
    ddpm_sincos_2pi(u2, &s, &c);
    *z0 = __fmul_rn(r, c);
    *z1 = __fmul_rn(r, s);
}

// ddpm_rng::box_muller4: the four normals of Philox block `blk` of sequence (seed, stream, step, example).
__device__ __forceinline__ float4 ddpm_normal4(uint32_t seed_lo, uint32_t seed_hi, uint32_t stream, uint32_t step,
                                               uint32_t example, uint32_t blk) {
    const uint4 w = ddpm_philox4x32_10(make_uint4(blk, example, step, stream), make_uint2(seed_lo, seed_hi));
    float4 z;
    ddpm_box_muller(ddpm_open01(w.x), ddpm_open01(w.y), &z.x, &z.y);
    ddpm_box_muller(ddpm_open01(w.z), ddpm_open01(w.w), &z.z, &z.w);
    return z;
}
