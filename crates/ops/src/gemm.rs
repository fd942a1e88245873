//! A strided matrix view and the one GEMM call every kernel goes through.

use gemm::Parallelism;

use crate::elem::Elem;

/// A read-only matrix: element `(i, j)` at `ptr + i * rs + j * cs`. Transposing is swapping the
/// strides, so `A^T` costs nothing.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a Mat is only read through, and only while the slice it was made from is borrowed.
unsafe impl<T: Sync> Send for Mat<T> {}
unsafe impl<T: Sync> Sync for Mat<T> {}

impl<T> Mat<T> {
    /// Row-major `rows x cols` starting at `data[0]`.
    pub fn rows(data: &[T], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `C[m, n] = (accumulate ? C : 0) + A[m, k] . B[k, n]`, with `C` row-major at `c` with row
/// stride `ldc`. Without `accumulate`, `C` is only written, so it may start uninitialised.
///
/// # Safety
/// `a`, `b` must address `m x k` and `k x n` valid elements; `c` must be valid for writes (and
/// reads when accumulating) of the `m x n` block and not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    c: *mut T,
    ldc: usize,
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    threads: usize,
) {
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: forwarded to the caller; gemm's dst = alpha * dst + beta * a . b, and with
    // read_dst = false it never reads dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}
