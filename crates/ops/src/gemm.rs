//! A strided matrix view and the one GEMM call every kernel goes through.

use gemm::Parallelism;

use crate::elem::Elem;

/// A read-only matrix: element `(i, j)` at `ptr + i * rs + j * cs`, within the `len` elements the
/// view was made from. Transposing is swapping the strides, so `A^T` costs nothing. [`gemm`]
/// checks that the shape it reads fits in `len`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
    len: usize,
}

// SAFETY: a Mat is only read through, and only while the slice it was made from is borrowed.
unsafe impl<T: Sync> Send for Mat<T> {}
unsafe impl<T: Sync> Sync for Mat<T> {}

impl<T> Mat<T> {
    /// Row-major with row stride `ld` (the number of columns when the rows are packed), starting
    /// at `data[0]`.
    pub fn rows(data: &[T], ld: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: ld,
            cs: 1,
            len: data.len(),
        }
    }

    pub fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element of a `rows x cols` matrix lies inside the view.
    pub fn covers(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let last = (rows - 1).checked_mul(self.rs).and_then(|a| {
            (cols - 1)
                .checked_mul(self.cs)
                .and_then(|b| a.checked_add(b))
        });
        last.is_some_and(|l| l < self.len)
    }
}

/// `C[m, n] = (accumulate ? C : 0) + A[m, k] . B[k, n]`, with `C` row-major at `c` with row
/// stride `ldc`. Without `accumulate`, `C` is only written, so it may start uninitialised.
///
/// Panics (before reading anything) if `a` or `b` does not hold an `m x k` or `k x n` matrix:
/// the public ops validate shapes first, so this only fires on an internal bug.
///
/// # Safety
/// `c` must be valid for writes (and reads when accumulating) of the `m x n` block with row
/// stride `ldc`, and not overlap `a` or `b`.
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
    assert!(
        a.covers(m, k) && b.covers(k, n),
        "gemm: operands of {} and {} elements cannot hold [{m}, {k}] . [{k}, {n}]",
        a.len,
        b.len
    );
    if threads == 1
        && b.cs == 1
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && crate::sgemm512::available()
    {
        // SAFETY: T is f32 (checked), the operands lie within their views (checked above), the
        // CPU has AVX-512F (checked) and `c` is the caller's promise.
        unsafe {
            crate::sgemm512::sgemm(
                m,
                n,
                k,
                c as *mut f32,
                ldc,
                accumulate,
                a.ptr as *const f32,
                (a.rs, a.cs),
                b.ptr as *const f32,
                b.rs,
            )
        };
        return;
    }
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: `a` and `b` were checked above to lie within their views; `c` is the caller's
    // promise. gemm's dst = alpha * dst + beta * a . b, and with
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
            a.cs as isize,
            a.rs as isize,
            b.ptr,
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_know_their_length() {
        let v = [0f32; 12];
        let m = Mat::rows(&v, 4);
        assert!(m.covers(3, 4));
        assert!(!m.covers(4, 4));
        assert!(m.t().covers(4, 3));
        assert!(!m.t().covers(4, 4));
        assert!(Mat::rows(&v[5..], 4).covers(1, 7));
        assert!(!Mat::rows(&v[5..], 4).covers(2, 4));
        assert!(m.covers(0, 100));
    }

    #[test]
    #[should_panic(expected = "cannot hold")]
    fn gemm_refuses_a_short_operand() {
        let (a, b) = ([1f32; 6], [1f32; 5]);
        let mut c = [0f32; 4];
        // SAFETY: c holds the 2 x 2 output; the short `b` must be refused before any read.
        unsafe {
            gemm(
                2,
                2,
                3,
                c.as_mut_ptr(),
                2,
                false,
                Mat::rows(&a, 3),
                Mat::rows(&b, 2),
                1,
            )
        };
    }
}
