//! Whether the gathered tile transforms pay on this CPU: measured once per process.
//!
//! Gathers are fast on recent Intel cores (on the development machine's Xeon the quickstart step
//! took 20% less time with them on the AVX2 paths, bench/RESULTS.md) but slow on others: AMD Zen 2
//! splits a ymm gather into tens of micro-ops, and Intel cores from Skylake to Ice / Tiger Lake run
//! gathers several times slower under the Gather Data Sampling ("Downfall") microcode mitigation.
//! Both kinds of transform give bitwise the same values, so the choice is a plain measurement: a
//! quickstart-sized block (32 channels, 28x28, F(4x4)) through the input, output-gradient and
//! output transforms both ways, alternated, median of several rounds each; a few milliseconds at
//! the first Winograd conv.

use std::sync::OnceLock;
use std::time::Instant;

use super::lanes::Isa;
use super::{SharedOut, Tiles, Variant, F4};

static GATHER_PAYS: OnceLock<bool> = OnceLock::new();

/// Timed rounds of each kind (after one warm-up round of each).
const ROUNDS: usize = 7;

/// Whether the gathered transforms beat the scalar loops here (false without AVX2 / AVX-512).
pub(crate) fn gather_pays() -> bool {
    *GATHER_PAYS.get_or_init(|| match Isa::cpu() {
        Some(isa) => measure(isa),
        None => false,
    })
}

fn measure(isa: Isa) -> bool {
    let (b, c, h, w) = (4, 32, 28, 28);
    let tl = Tiles::new(b, h, w, F4::M);
    let blk = (0, tl.total);
    let x: Vec<f32> = (0..b * c * h * w)
        .map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut planes = vec![0f32; F4::PLANES * c * tl.total];
    let mut y = vec![0f32; x.len()];
    faster_first(ROUNDS, |gathered| {
        let isa = gathered.then_some(isa);
        F4::input_transform(isa, &x, c, &tl, blk, &mut planes);
        F4::grad_output_transform(isa, &x, c, &tl, blk, &mut planes);
        F4::output_transform(isa, &planes, c, &tl, blk, SharedOut(y.as_mut_ptr()), None);
    })
}

/// Whether `f(true)` runs faster than `f(false)`: one warm-up of each, then `rounds` timed runs
/// of each, alternating which goes first; compares the medians.
pub(crate) fn faster_first(rounds: usize, mut f: impl FnMut(bool)) -> bool {
    let mut time = |first: bool| {
        let t = Instant::now();
        f(first);
        t.elapsed().as_secs_f64()
    };
    time(true);
    time(false);
    let (mut a, mut b) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for r in 0..rounds {
        if r % 2 == 0 {
            a.push(time(true));
            b.push(time(false));
        } else {
            b.push(time(false));
            a.push(time(true));
        }
    }
    median(&mut a) < median(&mut b)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_faster_of_two_workloads() {
        let spin = |us: u64| {
            let t = Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(us) {}
        };
        assert!(faster_first(5, |first| spin(if first {
            200
        } else {
            2000
        })));
        assert!(!faster_first(5, |first| spin(if first {
            2000
        } else {
            200
        })));
    }

    #[test]
    fn the_measurement_runs_and_is_kept() {
        let first = gather_pays();
        assert_eq!(gather_pays(), first);
        assert!(!first || Isa::cpu().is_some());
    }
}
