//! Dense symmetric linear algebra in f64 for the Frechet distance: a cyclic Jacobi eigensolver, the
//! square root of a symmetric positive semi-definite matrix, feature statistics, and the distance itself.
//!
//! Why our own: the Frechet distance needs `tr sqrt(S1 S2)`, and nothing in the workspace offers an
//! eigensolver. Jacobi is slow (O(n^3) per sweep) but unconditionally stable and accurate to a few ulp
//! of the matrix norm, and feature dimensions here are a few hundred, so a covariance takes seconds.
//!
//! Matrices are row-major `Vec<f64>` of `n * n`.

use crate::SamplerError;

/// Eigen-decomposition of a symmetric matrix: `a = V diag(values) V^T`.
#[derive(Debug, Clone)]
pub struct SymEigen {
    pub n: usize,
    /// Eigenvalues in ascending order.
    pub values: Vec<f64>,
    /// Row-major `n x n`; column `j` is the unit eigenvector of `values[j]`.
    pub vectors: Vec<f64>,
}

const MAX_SWEEPS: usize = 100;

fn check_square(a: &[f64], n: usize, what: &str) -> Result<(), SamplerError> {
    if a.len() != n * n {
        return Err(SamplerError::Linalg(format!(
            "{what}: expected {n}x{n} = {} values, got {}",
            n * n,
            a.len()
        )));
    }
    if let Some(i) = a.iter().position(|v| !v.is_finite()) {
        return Err(SamplerError::Linalg(format!(
            "{what}: non-finite entry at ({}, {})",
            i / n,
            i % n
        )));
    }
    Ok(())
}

/// Cyclic-by-row Jacobi (Golub & Van Loan 8.5): sweep over all (p, q) pairs, each time applying the plane
/// rotation that zeroes `a[p][q]`, until the off-diagonal mass is negligible against the whole matrix.
/// The input is symmetrised first (`(a + a^T) / 2`) so rounding asymmetry in a covariance cannot matter.
pub fn sym_eigen(a: &[f64], n: usize) -> Result<SymEigen, SamplerError> {
    check_square(a, n, "sym_eigen")?;
    let mut m = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    }
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = m.iter().map(|x| x * x).sum();
    let mut converged = n <= 1 || total == 0.0;
    for _ in 0..MAX_SWEEPS {
        if converged {
            break;
        }
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum();
        if off <= 1e-30 * total {
            converged = true;
            break;
        }
        let mut rotated = false;
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = m[p * n + q];
                let app = m[p * n + p];
                let aqq = m[q * n + q];
                if apq == 0.0 {
                    continue;
                }
                // An entry below rounding against both diagonal entries changes nothing representable
                // when rotated away: drop it instead (otherwise the sweep could never finish).
                let g = 100.0 * apq.abs();
                if app.abs() + g == app.abs() && aqq.abs() + g == aqq.abs() {
                    m[p * n + q] = 0.0;
                    m[q * n + p] = 0.0;
                    continue;
                }
                rotated = true;
                let tau = (aqq - app) / (2.0 * apq);
                let t = if tau >= 0.0 {
                    1.0 / (tau + (1.0 + tau * tau).sqrt())
                } else {
                    -1.0 / (-tau + (1.0 + tau * tau).sqrt())
                };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = t * c;
                // A <- A J (columns p, q)
                for k in 0..n {
                    let akp = m[k * n + p];
                    let akq = m[k * n + q];
                    m[k * n + p] = c * akp - s * akq;
                    m[k * n + q] = s * akp + c * akq;
                }
                // A <- J^T A (rows p, q)
                for k in 0..n {
                    let apk = m[p * n + k];
                    let aqk = m[q * n + k];
                    m[p * n + k] = c * apk - s * aqk;
                    m[q * n + k] = s * apk + c * aqk;
                }
                m[p * n + q] = 0.0;
                m[q * n + p] = 0.0;
                // V <- V J
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
        if !rotated {
            converged = true;
        }
    }
    if !converged {
        return Err(SamplerError::Linalg(format!(
            "Jacobi eigensolver did not converge in {MAX_SWEEPS} sweeps (n = {n})"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| m[a * n + a].total_cmp(&m[b * n + b]));
    let values = order.iter().map(|&j| m[j * n + j]).collect();
    let mut vectors = vec![0.0; n * n];
    for (new_j, &j) in order.iter().enumerate() {
        for i in 0..n {
            vectors[i * n + new_j] = v[i * n + j];
        }
    }
    Ok(SymEigen { n, values, vectors })
}

/// Square root of a symmetric positive semi-definite matrix, `V diag(sqrt(l)) V^T`. Eigenvalues that
/// rounding pushed slightly below zero are treated as zero; clearly negative ones are an error, because
/// then the input was not a covariance.
pub fn sqrtm_psd(a: &[f64], n: usize) -> Result<Vec<f64>, SamplerError> {
    let e = sym_eigen(a, n)?;
    let scale = e.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut roots = Vec::with_capacity(n);
    for &l in &e.values {
        if l < -1e-9 * scale.max(f64::MIN_POSITIVE) {
            return Err(SamplerError::Linalg(format!(
                "sqrtm_psd: matrix is not positive semi-definite (eigenvalue {l:e}, largest magnitude {scale:e})"
            )));
        }
        roots.push(l.max(0.0).sqrt());
    }
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let (vi, vj) = (
                &e.vectors[i * n..(i + 1) * n],
                &e.vectors[j * n..(j + 1) * n],
            );
            out[i * n + j] = roots
                .iter()
                .zip(vi)
                .zip(vj)
                .map(|((r, a), b)| a * r * b)
                .sum();
        }
    }
    Ok(out)
}

/// `a * b` for row-major square matrices.
pub fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// Mean and unbiased covariance (divisor N - 1, as numpy's `cov` used by pytorch-fid) of `rows` feature
/// vectors of dimension `dim`, accumulated in f64.
#[derive(Debug, Clone)]
pub struct GaussianStats {
    pub dim: usize,
    pub count: usize,
    pub mean: Vec<f64>,
    /// Row-major `dim x dim`.
    pub cov: Vec<f64>,
}

impl GaussianStats {
    pub fn from_features(features: &[f32], dim: usize) -> Result<Self, SamplerError> {
        if features.len().checked_rem(dim) != Some(0) {
            return Err(SamplerError::Linalg(format!(
                "feature buffer of {} values is not a whole number of {dim}-dimensional vectors",
                features.len()
            )));
        }
        let count = features.len() / dim;
        if count < 2 {
            return Err(SamplerError::Linalg(format!(
                "need at least 2 feature vectors for a covariance, got {count}"
            )));
        }
        let mut mean = vec![0.0f64; dim];
        for row in features.chunks(dim) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        for m in &mut mean {
            *m /= count as f64;
        }
        let mut cov = vec![0.0f64; dim * dim];
        let mut centred = vec![0.0f64; dim];
        for row in features.chunks(dim) {
            for ((c, &x), m) in centred.iter_mut().zip(row).zip(&mean) {
                *c = x as f64 - m;
            }
            for i in 0..dim {
                let ci = centred[i];
                // upper triangle only; mirrored below
                for j in i..dim {
                    cov[i * dim + j] += ci * centred[j];
                }
            }
        }
        let denom = (count - 1) as f64;
        for i in 0..dim {
            for j in i..dim {
                let v = cov[i * dim + j] / denom;
                cov[i * dim + j] = v;
                cov[j * dim + i] = v;
            }
        }
        Ok(Self {
            dim,
            count,
            mean,
            cov,
        })
    }
}

/// Frechet distance between two Gaussians:
/// `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`.
///
/// `S1 S2` is not symmetric, so instead of a general matrix square root we use the similar symmetric
/// matrix: `(S1 S2)^{1/2}` has the same trace as `(S1^{1/2} S2 S1^{1/2})^{1/2}`, whose eigenvalues are
/// real and non-negative; that trace is the sum of their square roots.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64, SamplerError> {
    if a.dim != b.dim {
        return Err(SamplerError::Linalg(format!(
            "feature dimensions differ: {} vs {}",
            a.dim, b.dim
        )));
    }
    let n = a.dim;
    let diff: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let tr_a: f64 = (0..n).map(|i| a.cov[i * n + i]).sum();
    let tr_b: f64 = (0..n).map(|i| b.cov[i * n + i]).sum();
    let sa = sqrtm_psd(&a.cov, n)?;
    let m = matmul(&matmul(&sa, &b.cov, n), &sa, n);
    let e = sym_eigen(&m, n)?;
    let tr_sqrt: f64 = e.values.iter().map(|l| l.max(0.0).sqrt()).sum();
    Ok(diff + tr_a + tr_b - 2.0 * tr_sqrt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_rng::{Stream, StreamKey};

    fn random_matrix(n: usize, seed: u64) -> Vec<f64> {
        let k = StreamKey::new(seed, Stream::Sampler, 0, 0);
        (0..n * n).map(|i| k.normal(i as u64) as f64).collect()
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        let mut t = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                t[j * n + i] = a[i * n + j];
            }
        }
        t
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn eigen_of_known_2x2() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3 with eigenvectors (1,-1)/sqrt2 and (1,1)/sqrt2.
        let e = sym_eigen(&[2.0, 1.0, 1.0, 2.0], 2).unwrap();
        assert!((e.values[0] - 1.0).abs() < 1e-15 && (e.values[1] - 3.0).abs() < 1e-15);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!((e.vectors[0].abs() - h).abs() < 1e-15);
        assert!((e.vectors[1] - e.vectors[3]).abs() < 1e-15); // eigenvector of 3 is (h, h) up to sign
        assert!((e.vectors[0] + e.vectors[2]).abs() < 1e-15); // eigenvector of 1 is (h, -h) up to sign
    }

    #[test]
    fn eigen_reconstructs_random_symmetric_matrices() {
        for (n, seed) in [(1, 1), (3, 2), (10, 3), (40, 4)] {
            let r = random_matrix(n, seed);
            let a: Vec<f64> = r.iter().zip(transpose(&r, n)).map(|(x, y)| x + y).collect();
            let e = sym_eigen(&a, n).unwrap();
            // V orthonormal
            let vtv = matmul(&transpose(&e.vectors, n), &e.vectors, n);
            let mut eye = vec![0.0; n * n];
            for i in 0..n {
                eye[i * n + i] = 1.0;
            }
            assert!(max_abs_diff(&vtv, &eye) < 1e-13, "n={n}");
            // A V = V diag(l)
            let av = matmul(&a, &e.vectors, n);
            let mut vl = e.vectors.clone();
            for i in 0..n {
                for j in 0..n {
                    vl[i * n + j] *= e.values[j];
                }
            }
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(max_abs_diff(&av, &vl) < 1e-12 * scale.max(1.0), "n={n}");
            assert!(e.values.windows(2).all(|w| w[0] <= w[1]));
            // trace is preserved
            let tr: f64 = (0..n).map(|i| a[i * n + i]).sum();
            assert!((tr - e.values.iter().sum::<f64>()).abs() < 1e-11 * scale.max(1.0));
        }
    }

    #[test]
    fn sqrtm_squares_back_to_the_matrix() {
        for (n, seed) in [(2, 5), (17, 6), (64, 7)] {
            let r = random_matrix(n, seed);
            // R R^T is positive semi-definite (and singular when we drop rank below)
            let a = matmul(&r, &transpose(&r, n), n);
            let s = sqrtm_psd(&a, n).unwrap();
            let ss = matmul(&s, &s, n);
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(max_abs_diff(&ss, &a) < 1e-11 * scale, "n={n}");
            assert!(max_abs_diff(&s, &transpose(&s, n)) < 1e-12 * scale.sqrt());
        }
        // rank-deficient PSD matrix: outer product of one vector
        let n = 5;
        let v: Vec<f64> = (0..n).map(|i| i as f64 - 1.5).collect();
        let a: Vec<f64> = (0..n * n).map(|k| v[k / n] * v[k % n]).collect();
        let s = sqrtm_psd(&a, n).unwrap();
        assert!(max_abs_diff(&matmul(&s, &s, n), &a) < 1e-12);
        // a clearly indefinite matrix is rejected
        assert!(sqrtm_psd(&[1.0, 0.0, 0.0, -1.0], 2).is_err());
        assert!(sym_eigen(&[1.0, f64::NAN, f64::NAN, 1.0], 2).is_err());
    }

    #[test]
    fn frechet_distance_closed_forms() {
        // Diagonal (commuting) covariances: FD = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
        let n = 3;
        let da = [1.0, 4.0, 0.25];
        let db = [9.0, 1.0, 0.25];
        let mut ca = vec![0.0; n * n];
        let mut cb = vec![0.0; n * n];
        for i in 0..n {
            ca[i * n + i] = da[i];
            cb[i * n + i] = db[i];
        }
        let a = GaussianStats {
            dim: n,
            count: 10,
            mean: vec![0.0, 1.0, 2.0],
            cov: ca,
        };
        let b = GaussianStats {
            dim: n,
            count: 10,
            mean: vec![1.0, 1.0, 0.0],
            cov: cb,
        };
        let expected = 1.0 + 4.0 + (1.0f64 - 3.0).powi(2) + (2.0f64 - 1.0).powi(2);
        assert!((frechet_distance(&a, &b).unwrap() - expected).abs() < 1e-12);
        // Non-commuting case against the scalar identity tr sqrt(S S) = tr S when both are equal, and the
        // symmetry FD(a, b) == FD(b, a).
        let r1 = random_matrix(6, 8);
        let r2 = random_matrix(6, 9);
        let s1 = matmul(&r1, &transpose(&r1, 6), 6);
        let s2 = matmul(&r2, &transpose(&r2, 6), 6);
        let g1 = GaussianStats {
            dim: 6,
            count: 10,
            mean: vec![0.0; 6],
            cov: s1,
        };
        let g2 = GaussianStats {
            dim: 6,
            count: 10,
            mean: vec![0.5; 6],
            cov: s2,
        };
        let d12 = frechet_distance(&g1, &g2).unwrap();
        let d21 = frechet_distance(&g2, &g1).unwrap();
        assert!(d12 > 0.0 && (d12 - d21).abs() < 1e-9 * d12, "{d12} {d21}");
        assert!(frechet_distance(&g1, &g1).unwrap().abs() < 1e-9);
    }

    #[test]
    fn fd_of_a_feature_set_with_itself_is_zero() {
        let dim = 32;
        let k = StreamKey::new(3, Stream::Sampler, 1, 0);
        let feats: Vec<f32> = (0..500 * dim)
            .map(|i| k.normal(i as u64) * (1.0 + (i % dim) as f32 * 0.1))
            .collect();
        let s = GaussianStats::from_features(&feats, dim).unwrap();
        let fd = frechet_distance(&s, &s).unwrap();
        assert!(fd.abs() < 1e-9, "FD(self) = {fd}");
        // A shifted copy: FD equals the squared shift exactly (the covariances are identical).
        let shifted: Vec<f32> = feats
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % dim == 0 { x + 2.0 } else { x })
            .collect();
        let t = GaussianStats::from_features(&shifted, dim).unwrap();
        let fd = frechet_distance(&s, &t).unwrap();
        assert!((fd - 4.0).abs() < 1e-5, "FD(shift 2) = {fd}");
    }

    #[test]
    fn covariance_matches_two_pass_formula() {
        let feats = [1.0f32, 2.0, 3.0, 5.0, 5.0, 9.0];
        let s = GaussianStats::from_features(&feats, 2).unwrap();
        assert_eq!(s.mean, vec![3.0, 16.0 / 3.0]);
        // x = 1,3,5 var 4; y = 2,5,9 var = ((-10/3)^2 + (-1/3)^2 + (11/3)^2)/2 = 37/3; cov = 7
        assert!((s.cov[0] - 4.0).abs() < 1e-12);
        assert!((s.cov[3] - 37.0 / 3.0).abs() < 1e-12);
        assert!((s.cov[1] - 7.0).abs() < 1e-12 && s.cov[1] == s.cov[2]);
        assert!(GaussianStats::from_features(&feats[..2], 2).is_err());
    }
}
