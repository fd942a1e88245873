//! Running the elementwise kernels with AVX-512 or AVX2 + FMA where the CPU has them.
//!
//! The crate is compiled for the baseline x86-64 target (SSE2), so plain loops vectorise only 4
//! floats wide. [`simd_variant!`] wraps an `#[inline(always)]` kernel in functions compiled with
//! AVX-512F and with AVX2 + FMA enabled (the kernel is inlined into them, so its loops get 16- or
//! 8-wide vectors) and picks the widest the CPU supports at run time (`DDPM_OPS_AVX512=0`: at
//! most AVX2). No FMA contraction happens implicitly and the kernels fix their summation order
//! themselves, so results are bitwise the same on every path (`tests/vector_width.rs`). The
//! AVX-512 builds took 2-4% off the quickstart step on the development machine's Xeon
//! (bench/RESULTS.md, session 11).

/// Whether the CPU has AVX2 and FMA (cached by `std`).
#[inline(always)]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512F (with AVX2 and FMA) and the crate's AVX-512 code is not switched
/// off (`DDPM_OPS_AVX512=0`).
#[inline(always)]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && has_avx2_fma()
            && crate::runtime::sgemm512_enabled()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `simd_variant!(fn name<T>(args) -> R = kernel);` defines `name`, which calls
/// `kernel::<T>(args)` compiled with AVX-512F (16-wide vectors) or AVX2 + FMA when available.
macro_rules! simd_variant {
    (fn $name:ident<$t:ident>($($a:ident: $ty:ty),* $(,)?) -> $r:ty = $inner:ident) => {
        #[allow(clippy::too_many_arguments)]
        fn $name<$t: $crate::elem::Elem>($($a: $ty),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn imp<$t: $crate::elem::Elem>($($a: $ty),*) -> $r {
                    $inner::<$t>($($a),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn imp512<$t: $crate::elem::Elem>($($a: $ty),*) -> $r {
                    $inner::<$t>($($a),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU features were just checked.
                    return unsafe { imp512::<$t>($($a),*) };
                }
                if $crate::simd::has_avx2_fma() {
                    // SAFETY: the CPU features were just checked.
                    return unsafe { imp::<$t>($($a),*) };
                }
            }
            $inner::<$t>($($a),*)
        }
    };
}
pub(crate) use simd_variant;
