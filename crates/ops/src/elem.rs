//! The float types the kernels are written for, and per-thread scratch buffers.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

use candle_core::WithDType;

/// f32 or f64. The kernels are generic so that the f64 instance, which the finite-difference
/// gradient tests run, is the same code as the f32 one that trains.
pub(crate) trait Elem:
    WithDType
    + gemm_sealed::GemmElem
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    fn maximum(self, other: Self) -> Self;
    /// Runs `f` on this thread's scratch buffer of at least `len` elements (contents
    /// unspecified). Buffers grow and are kept, so steady-state training allocates no scratch.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

pub(crate) mod gemm_sealed {
    /// Types `gemm::gemm` implements a kernel for.
    pub trait GemmElem: 'static {}
    impl GemmElem for f32 {}
    impl GemmElem for f64 {}
}

macro_rules! impl_elem {
    ($t:ty, $key:ident) => {
        thread_local! {
            static $key: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn maximum(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                $key.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut buf) => {
                        if buf.len() < len {
                            buf.resize(len, 0.0);
                        }
                        f(&mut buf[..len])
                    }
                    // Re-entered on this thread (a work-stealing rayon wait inside `f`): use a
                    // private buffer rather than fail.
                    Err(_) => f(&mut vec![0.0; len]),
                })
            }
        }
    };
}

impl_elem!(f32, SCRATCH_F32);
impl_elem!(f64, SCRATCH_F64);

/// A vector whose elements are all written before they are read. Avoids zero-filling large
/// outputs that a GEMM overwrites anyway; [`Uninit::assume_init`] is the caller's promise that
/// every element was written.
pub(crate) struct Uninit<T>(Vec<MaybeUninit<T>>);

impl<T: Copy> Uninit<T> {
    pub(crate) fn new(len: usize) -> Self {
        let mut v = Vec::with_capacity(len);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { v.set_len(len) };
        Self(v)
    }

    pub(crate) fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        &mut self.0
    }

    /// # Safety
    /// Every element must have been written.
    pub(crate) unsafe fn assume_init(self) -> Vec<T> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: MaybeUninit<T> has T's layout; the caller guarantees initialisation.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
    }
}

/// Writes `value` into every slot.
pub(crate) fn fill_uninit<T: Copy>(slots: &mut [MaybeUninit<T>], value: T) {
    for s in slots {
        s.write(value);
    }
}
