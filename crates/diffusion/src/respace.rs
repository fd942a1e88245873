//! Timestep respacing (improved-diffusion `respace.py`): sample with a subset of the training steps.
//!
//! A respaced process keeps the marginals `alphas_cumprod` of the kept steps and recomputes betas so the
//! shorter Markov chain has exactly those marginals. The model is still called with the original
//! timestep, which `timestep_map` records.

use crate::error::{DiffusionError, Result};
use crate::schedule::NoiseSchedule;

fn respace_err(spec: &str, num_timesteps: usize, reason: impl Into<String>) -> DiffusionError {
    DiffusionError::InvalidRespacing {
        spec: spec.to_string(),
        num_timesteps,
        reason: reason.into(),
    }
}

/// The sorted original timesteps to keep, from an improved-diffusion `section_counts` string.
///
/// * `"ddimN"`: the smallest stride `i` in `1..T` with `len(range(0, T, i)) == N`, giving `{0, i, 2i, ..}`
///   (the DDIM paper's evenly strided schedule).
/// * `"trailingN"`: `N` steps ending at `T - 1` ([`crate::distill::trailing_timesteps`]), the grid
///   progressive-distillation students are trained on (each grid is every other point of the next
///   finer one).
/// * `"a,b,c"` (or a single `"N"`): split `0..T` into as many equal parts as there are counts (the first
///   `T % parts` parts get one extra step) and take `count` evenly spaced steps from each part. The
///   positions are accumulated in f64 and rounded half to even, exactly like Python's `round`;
///   `f64::round` would round 4.5 up and pick different steps.
pub fn space_timesteps(num_timesteps: usize, section_counts: &str) -> Result<Vec<usize>> {
    let spec = section_counts.trim();
    let err = |reason: String| respace_err(section_counts, num_timesteps, reason);
    if num_timesteps == 0 {
        return Err(err("the base process has no timesteps".into()));
    }
    if let Some(n) = spec.strip_prefix("trailing") {
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| err(format!("{n:?} after \"trailing\" is not a step count")))?;
        return crate::distill::trailing_timesteps(num_timesteps, n);
    }
    if let Some(n) = spec.strip_prefix("ddim") {
        let desired: usize = n
            .trim()
            .parse()
            .map_err(|_| err(format!("{n:?} after \"ddim\" is not a step count")))?;
        for stride in 1..num_timesteps {
            if num_timesteps.div_ceil(stride) == desired {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        return Err(err(format!(
            "cannot create exactly {desired} steps with an integer stride"
        )));
    }
    let counts: Vec<usize> = spec
        .split(',')
        .map(|c| {
            c.trim()
                .parse::<usize>()
                .map_err(|_| err(format!("{c:?} is not a step count")))
        })
        .collect::<Result<_>>()?;
    let parts = counts.len();
    let size_per = num_timesteps / parts;
    let extra = num_timesteps % parts;
    let mut start = 0usize;
    let mut steps = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            return Err(err(format!(
                "cannot divide section of {size} steps into {count}"
            )));
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            steps.push(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    steps.sort_unstable();
    steps.dedup();
    if steps.is_empty() {
        return Err(err("no timesteps selected".into()));
    }
    Ok(steps)
}

/// Betas of the chain that visits only `use_timesteps`: `1 - ac[t_k] / ac[t_{k-1}]` with `ac[t_{-1}] = 1`.
///
/// `use_timesteps` must be sorted, unique and in range; the result has one beta per kept step.
pub fn respaced_betas(base: &NoiseSchedule, use_timesteps: &[usize]) -> Result<Vec<f64>> {
    if use_timesteps.is_empty() {
        return Err(DiffusionError::InvalidUse(
            "respacing needs at least one timestep".into(),
        ));
    }
    base.check_timesteps(use_timesteps)?;
    if use_timesteps.windows(2).any(|w| w[1] <= w[0]) {
        return Err(DiffusionError::InvalidUse(
            "use_timesteps must be strictly increasing".into(),
        ));
    }
    let mut last = 1.0f64;
    Ok(use_timesteps
        .iter()
        .map(|&t| {
            let ac = base.alphas_cumprod[t];
            let b = 1.0 - ac / last;
            last = ac;
            b
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;

    #[test]
    fn readme_examples() {
        assert_eq!(
            space_timesteps(30, "3,3,3").unwrap(),
            vec![0, 4, 9, 10, 14, 19, 20, 24, 29]
        );
        let d = space_timesteps(1000, "ddim50").unwrap();
        assert_eq!(d.len(), 50);
        assert_eq!(d[1], 20);
        assert_eq!(d[49], 980);
        // improved-diffusion's stride for 30 of 1000 is 34 (diffusers' "leading" would use 33).
        let d = space_timesteps(1000, "ddim30").unwrap();
        assert_eq!((d.len(), d[1]), (30, 34));
        assert_eq!(
            space_timesteps(1000, "trailing4").unwrap(),
            vec![249, 499, 749, 999]
        );
        assert_eq!(
            space_timesteps(100, "ddim10").unwrap(),
            (0..100).step_by(10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn full_and_single_sections() {
        assert_eq!(
            space_timesteps(10, "10").unwrap(),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(space_timesteps(10, "1").unwrap(), vec![0]);
        assert_eq!(space_timesteps(10, "2").unwrap(), vec![0, 9]);
        assert_eq!(space_timesteps(10, " 1 , 1 ").unwrap(), vec![0, 5]);
    }

    #[test]
    fn bad_specs_are_errors() {
        assert!(space_timesteps(10, "11").is_err());
        assert!(space_timesteps(10, "ddim11").is_err());
        assert!(space_timesteps(10, "ddimx").is_err());
        assert!(space_timesteps(10, "trailing11").is_err());
        assert!(space_timesteps(10, "trailingx").is_err());
        assert!(space_timesteps(10, "a,b").is_err());
        assert!(space_timesteps(10, "0").is_err());
        assert!(space_timesteps(10, "").is_err());
        assert!(space_timesteps(0, "1").is_err());
    }

    #[test]
    fn respaced_chain_keeps_marginals() {
        let base = NoiseSchedule::new(&BetaSchedule::Cosine, 1000).unwrap();
        let keep = space_timesteps(1000, "ddim50").unwrap();
        let s = NoiseSchedule::from_betas(respaced_betas(&base, &keep).unwrap()).unwrap();
        for (k, &t) in keep.iter().enumerate() {
            let rel = (s.alphas_cumprod[k] - base.alphas_cumprod[t]).abs() / base.alphas_cumprod[t];
            assert!(rel < 1e-12, "k={k} rel={rel}");
        }
        assert!(respaced_betas(&base, &[5, 5]).is_err());
        assert!(respaced_betas(&base, &[1000]).is_err());
    }
}
