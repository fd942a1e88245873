//! Running the elementwise kernels with AVX2 + FMA where the CPU has them.
//!
//! The crate is compiled for the baseline x86-64 target (SSE2), so plain loops vectorise only 4
//! floats wide. [`avx2_variant!`] wraps an `#[inline(always)]` kernel in a function compiled with
//! AVX2 and FMA enabled (the kernel is inlined into it, so its loops get 8-wide vectors) and
//! picks that at run time when the CPU supports it. No FMA contraction happens implicitly, so
//! results are bitwise the same on either path.

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

/// `avx2_variant!(fn name<T>(args) -> R = kernel);` defines `name`, which calls
/// `kernel::<T>(args)` compiled with AVX2 + FMA when available.
macro_rules! avx2_variant {
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
                if $crate::simd::has_avx2_fma() {
                    // SAFETY: the CPU features were just checked.
                    return unsafe { imp::<$t>($($a),*) };
                }
            }
            $inner::<$t>($($a),*)
        }
    };
}
pub(crate) use avx2_variant;
