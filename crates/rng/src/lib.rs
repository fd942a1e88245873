//! Counter-based random numbers for ddpm-rs.
//!
//! Every random draw in training and sampling (timesteps, noise, dropout masks, label dropout, flips)
//! is a pure function of `(seed, stream, step, example, index)`. Nothing carries hidden state, so:
//! - a result does not depend on how a global batch is split across ranks or threads,
//! - a resumed run draws exactly what the uninterrupted run would have drawn,
//! - the CUDA kernels (`ddpm-kernels`) reproduce the CPU values bit for bit.
//!
//! The generator is Philox4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"),
//! the same bijection cuRAND and Random123 use. One call maps a 128-bit counter and a 64-bit key to
//! 128 random bits.
//!
//! ## Exact mapping (the CUDA code mirrors this)
//! - key   = `(seed as u32, (seed >> 32) as u32)`
//! - counter = `[block, example, step as u32, stream]` where `block` numbers the 4-word blocks of one
//!   (stream, step, example) sequence, `example` is the example's position in the *global* batch and
//!   `stream` is one of the [`Stream`] tags.
//! - word `j` of draw `i` of a sequence is word `i % 4` of block `i / 4`.
//! - uniform u32 `x` -> f32 in (0, 1): `(x >> 8) as f32 * 2^-24 + 2^-25` (24 bits, never 0 nor 1).
//! - normals: Box-Muller on pairs of words of one block, `(w0, w1) -> (z0, z1)` and `(w2, w3) -> (z2, z3)`,
//!   computed by [`box_muller`] with only IEEE add/mul/div/sqrt (correctly rounded on every platform) and
//!   fixed polynomials for `ln` and `sin/cos`, so CPU and GPU agree bit for bit.

/// Independent purposes get independent streams, so e.g. adding a dropout layer never shifts the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stream {
    /// Gaussian noise of the forward process (fused noising op).
    Noise = 1,
    /// Per-example training timestep.
    Timestep = 2,
    /// Classifier-free-guidance label dropout.
    LabelDrop = 3,
    /// Random horizontal flip in the data loader (keyed by epoch instead of step).
    Flip = 4,
    /// Noise drawn by samplers (ancestral steps, initial x_T).
    Sampler = 5,
    /// Importance-sampled timesteps (loss-aware sampler).
    ImportanceTimestep = 6,
    /// Per-epoch permutation of the data loader (ddpm-data; keyed by epoch, example 0).
    Shuffle = 7,
    /// Continuous-time training: the draw of `z_0` in the reconstruction term.
    DecoderNoise = 8,
    /// Initial weights of a learned noise schedule (keyed by step 0, example 0).
    ScheduleInit = 9,
    /// Dropout masks: `Dropout as u32 + layer_index` for each dropout layer.
    Dropout = 0x1000,
}

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for r in 0..10 {
        if r > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// A position in the space of random sequences: everything but the draw index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamKey {
    pub seed: u64,
    pub stream: u32,
    pub step: u64,
    pub example: u64,
}

impl StreamKey {
    pub fn new(seed: u64, stream: Stream, step: u64, example: u64) -> Self {
        Self {
            seed,
            stream: stream as u32,
            step,
            example,
        }
    }

    /// Dropout layer `layer` gets its own stream so the masks of two layers are independent.
    pub fn dropout(seed: u64, layer: u32, step: u64, example: u64) -> Self {
        Self {
            seed,
            stream: Stream::Dropout as u32 + layer,
            step,
            example,
        }
    }

    #[inline]
    pub fn block(&self, block: u32) -> [u32; 4] {
        philox4x32_10(
            [block, self.example as u32, self.step as u32, self.stream],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }

    /// Raw 32-bit word number `i` of this sequence.
    #[inline]
    pub fn word(&self, i: u64) -> u32 {
        self.block((i / 4) as u32)[(i % 4) as usize]
    }

    /// Uniform in (0, 1), draw `i`.
    #[inline]
    pub fn uniform(&self, i: u64) -> f32 {
        u32_to_open01(self.word(i))
    }

    /// Uniform integer in `0..n` (Lemire's multiply-shift; bias below 2^-32 * n, irrelevant for T <= 4000).
    #[inline]
    pub fn below(&self, i: u64, n: u32) -> u32 {
        ((self.word(i) as u64 * n as u64) >> 32) as u32
    }

    /// Standard normal draw `i`.
    #[inline]
    pub fn normal(&self, i: u64) -> f32 {
        let b = self.block((i / 4) as u32);
        let z = box_muller4(b);
        z[(i % 4) as usize]
    }

    /// Fills `out` with draws `0..out.len()` of the normal sequence.
    pub fn fill_normal(&self, out: &mut [f32]) {
        for (blk, chunk) in out.chunks_mut(4).enumerate() {
            let z = box_muller4(self.block(blk as u32));
            chunk.copy_from_slice(&z[..chunk.len()]);
        }
    }

    /// Fills `out` with uniform (0,1) draws `0..out.len()`.
    pub fn fill_uniform(&self, out: &mut [f32]) {
        for (blk, chunk) in out.chunks_mut(4).enumerate() {
            let w = self.block(blk as u32);
            for (o, x) in chunk.iter_mut().zip(w) {
                *o = u32_to_open01(x);
            }
        }
    }
}

/// 24 random bits centred in their bin: never exactly 0 (so `ln` is finite) nor 1.
#[inline(always)]
pub fn u32_to_open01(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0) + (1.0 / 33_554_432.0)
}

/// Four normals from one Philox block.
#[inline]
pub fn box_muller4(w: [u32; 4]) -> [f32; 4] {
    let (a, b) = box_muller(u32_to_open01(w[0]), u32_to_open01(w[1]));
    let (c, d) = box_muller(u32_to_open01(w[2]), u32_to_open01(w[3]));
    [a, b, c, d]
}

/// Box-Muller with platform-independent arithmetic: `r = sqrt(-2 ln u1)`, `theta = 2 pi u2`.
///
/// `ln` and `sincos` are our own f32 polynomials evaluated with separate multiplies and adds (the CUDA
/// twin uses `__fmul_rn`/`__fadd_rn` so nvcc cannot contract them into FMAs). Accuracy is a few ulp, far
/// below what matters for noise, and in exchange both devices produce identical bits.
#[inline]
pub fn box_muller(u1: f32, u2: f32) -> (f32, f32) {
    let r = (-2.0 * portable_ln(u1)).sqrt();
    let (s, c) = portable_sincos_2pi(u2);
    (r * c, r * s)
}

/// Natural log for x in (0, 1]: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), ln m from the atanh series
/// in s = (m-1)/(m+1).
#[inline]
pub fn portable_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // 2 * (s + s^3/3 + s^5/5 + s^7/7 + s^9/9); |s| <= 0.1716 so the next term is below 2^-26.
    let p = 1.0 / 9.0;
    let p = p * s2 + 1.0 / 7.0;
    let p = p * s2 + 1.0 / 5.0;
    let p = p * s2 + 1.0 / 3.0;
    let p = p * s2 + 1.0;
    let ln_m = 2.0 * s * p;
    e as f32 * std::f32::consts::LN_2 + ln_m
}

/// sin and cos of 2*pi*u for u in [0, 1): reduce to an octant-free quarter turn, then Taylor polynomials
/// on [-pi/4, pi/4].
#[inline]
pub fn portable_sincos_2pi(u: f32) -> (f32, f32) {
    // quadrant q = round(4u), remainder f in [-1/8, 1/8] turns -> angle in [-pi/4, pi/4]
    let q = (u * 4.0 + 0.5) as i32; // u >= 0, so truncation is floor
    let f = u - q as f32 * 0.25;
    let a = f * std::f32::consts::TAU;
    let a2 = a * a;
    // sin a = a(1 - a^2/6 + a^4/120 - a^6/5040 + a^8/362880)
    let ps = 1.0 / 362_880.0;
    let ps = ps * a2 - 1.0 / 5040.0;
    let ps = ps * a2 + 1.0 / 120.0;
    let ps = ps * a2 - 1.0 / 6.0;
    let ps = ps * a2 + 1.0;
    let s = a * ps;
    // cos a = 1 - a^2/2 + a^4/24 - a^6/720 + a^8/40320
    let pc = 1.0 / 40_320.0;
    let pc = pc * a2 - 1.0 / 720.0;
    let pc = pc * a2 + 1.0 / 24.0;
    let pc = pc * a2 - 0.5;
    let c = pc * a2 + 1.0;
    match q & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Random123 kat_vectors: philox4x32 10 rounds.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn portable_math_is_accurate() {
        for i in 1..10_000 {
            let x = i as f32 / 10_000.0;
            assert!(
                (portable_ln(x) - x.ln()).abs() <= 4e-7 * (1.0 + x.ln().abs()),
                "ln {x}"
            );
            let (s, c) = portable_sincos_2pi(x);
            let a = x as f64 * std::f64::consts::TAU;
            assert!((s as f64 - a.sin()).abs() < 2e-6, "sin {x}");
            assert!((c as f64 - a.cos()).abs() < 2e-6, "cos {x}");
        }
        assert!(portable_ln(u32_to_open01(0)).is_finite());
    }

    #[test]
    fn normals_have_unit_moments() {
        let k = StreamKey::new(42, Stream::Noise, 7, 3);
        let mut v = vec![0f32; 200_000];
        k.fill_normal(&mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // 5 sigma bounds: sd(mean) = 1/sqrt(n) ~ 2.2e-3, sd(var) ~ sqrt(2/n) ~ 3.2e-3
        assert!(mean.abs() < 0.011, "mean {mean}");
        assert!((var - 1.0).abs() < 0.016, "var {var}");
        assert_eq!(v[5], k.normal(5));
    }

    #[test]
    fn streams_are_independent_of_each_other() {
        let a = StreamKey::new(1, Stream::Noise, 0, 0);
        let b = StreamKey::new(1, Stream::Noise, 1, 0);
        let c = StreamKey::new(1, Stream::Noise, 0, 1);
        let d = StreamKey::new(1, Stream::Timestep, 0, 0);
        assert_ne!(a.block(0), b.block(0));
        assert_ne!(a.block(0), c.block(0));
        assert_ne!(a.block(0), d.block(0));
        for i in 0..1000 {
            assert!(a.below(i, 1000) < 1000);
        }
    }
}
