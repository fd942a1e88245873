//! A strided matrix view and the one GEMM call every kernel goes through.

use gemm::Parallelism;
use rayon::prelude::*;

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
/// f32 products with a row-major or transposed `B` run [`crate::sgemm512`] on AVX-512 CPUs
/// (`threads` tasks over column ranges of whole register blocks); the rest run the `gemm`
/// crate with `threads`.
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
    if (b.cs == 1 || b.rs == 1)
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && crate::sgemm512::available()
    {
        let b_t = b.cs != 1;
        // Addresses as integers, so that the column tasks can share them.
        let (a_p, b_p, c_p) = (a.ptr as usize, b.ptr as usize, c as usize);
        let ldb = if b_t { b.cs } else { b.rs };
        // Columns j0..j0 + w of C and B (a transposed B's columns are its rows).
        let part = |j0: usize, w: usize| {
            let b0 = b_p as *const f32;
            let bj = if b_t { b0.add(j0 * ldb) } else { b0.add(j0) };
            // SAFETY: T is f32 (checked), the operands lie within their views (checked above),
            // the CPU has AVX-512F (checked); the column ranges are disjoint and `c` is the
            // caller's promise.
            unsafe {
                crate::sgemm512::sgemm(
                    m,
                    w,
                    k,
                    (c_p as *mut f32).add(j0),
                    ldc,
                    accumulate,
                    a_p as *const f32,
                    (a.rs, a.cs),
                    (bj, ldb, b_t),
                )
            };
        };
        // Threads split the columns in whole 32-column register blocks.
        let chunk = n.div_ceil(threads.max(1)).next_multiple_of(32);
        if threads <= 1 || n <= chunk {
            part(0, n);
        } else {
            (0..n.div_ceil(chunk))
                .into_par_iter()
                .for_each(|t| part(t * chunk, chunk.min(n - t * chunk)));
        }
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

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    /// The f32 GEMM this CPU dispatches to (`sgemm512` where AVX-512F is present, else `gemm`'s)
    /// against an f64 reference: every edge of sgemm512's register blocking (rows not a multiple
    /// of 12, columns not a multiple of 32 or 16, k = 0 and k not a multiple of 16), a strided
    /// and a transposed `A` and `B`, accumulation, columns split over threads, and nothing
    /// written outside the `m x n` block of `C`.
    #[test]
    fn f32_gemm_matches_a_reference_on_every_edge() {
        eprintln!(
            "f32 kernel on this CPU: {}",
            if crate::sgemm512::available() {
                "sgemm512 (AVX-512)"
            } else {
                "gemm crate"
            }
        );
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 7),
            (13, 33, 5),
            (25, 17, 64),
            (11, 47, 0),
            (64, 100, 36),
            (7, 16, 3),
            (5, 40, 17),
            (9, 100, 20),
        ] {
            let ldc = n + 2;
            // A row-major or transposed; B row-major (row stride ldb) or transposed (a column
            // of B at every ldb values).
            for (a_s, ldb, b_t) in [
                ((k + 3, 1), n + 5, false),
                ((1, m + 2), n + 3, false),
                ((k + 3, 1), k + 4, true),
                ((1, m + 2), k + 1, true),
            ] {
                let a = values(m.max(1) * (k + 3) + k.max(1) * (m + 2), 1);
                let b = values(k.max(1) * ldb + n * ldb, 2);
                let at = |i: usize, p: usize| a[i * a_s.0 + p * a_s.1] as f64;
                let bt = |p: usize, j: usize| match b_t {
                    false => b[p * ldb + j] as f64,
                    true => b[j * ldb + p] as f64,
                };
                for (accumulate, threads) in [(false, 1), (true, 1), (false, 3), (true, 2)] {
                    let init = values((m + 1) * ldc, 3);
                    let mut c = init.clone();
                    let av = if a_s.1 == 1 {
                        Mat::rows(&a, a_s.0)
                    } else {
                        Mat::rows(&a, a_s.1).t()
                    };
                    let bv = if b_t {
                        Mat::rows(&b, ldb).t()
                    } else {
                        Mat::rows(&b, ldb)
                    };
                    // SAFETY: c holds (m + 1) rows of ldc >= n values; the views hold A and B.
                    unsafe { gemm(m, n, k, c.as_mut_ptr(), ldc, accumulate, av, bv, threads) };
                    for i in 0..m + 1 {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if i >= m || j >= n {
                                assert_eq!(got, init[i * ldc + j], "({i}, {j}) outside C written");
                                continue;
                            }
                            let mut want: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                            if accumulate {
                                want += init[i * ldc + j] as f64;
                            }
                            let tol = 1e-5 * (1.0 + k as f64);
                            assert!(
                                (got as f64 - want).abs() <= tol,
                                "m {m} n {n} k {k} {a_s:?} B^T {b_t} acc {accumulate} \
                                 threads {threads}: ({i}, {j}) {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
