//! Results of the self-test: pass/fail checks and performance rows, printed as they come and as a
//! markdown summary at the end.

use std::time::Duration;

pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

pub struct Perf {
    pub what: String,
    pub value: String,
    pub note: String,
}

pub struct Report {
    pub device: String,
    pub checks: Vec<Check>,
    pub perf: Vec<Perf>,
}

impl Report {
    pub fn new(device: String) -> Self {
        Self {
            device,
            checks: Vec::new(),
            perf: Vec::new(),
        }
    }

    pub fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let c = Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        };
        println!(
            "[{}] {}: {}",
            if c.ok { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
        self.checks.push(c);
    }

    pub fn perf(
        &mut self,
        what: impl Into<String>,
        value: impl Into<String>,
        note: impl Into<String>,
    ) {
        let p = Perf {
            what: what.into(),
            value: value.into(),
            note: note.into(),
        };
        println!("{}: {} {}", p.what, p.value, p.note);
        self.perf.push(p);
    }

    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn markdown(&self, elapsed: Duration) -> String {
        let passed = self.checks.iter().filter(|c| c.ok).count();
        let mut s = format!(
            "### ddpm-gpu-selftest\n\ndevice: {}\n\nchecks: {passed}/{} passed ({:.1} s)\n\n",
            self.device,
            self.checks.len(),
            elapsed.as_secs_f64()
        );
        let failed: Vec<&Check> = self.checks.iter().filter(|c| !c.ok).collect();
        if !failed.is_empty() {
            s.push_str("failed:\n\n");
            for c in failed {
                s.push_str(&format!("- {}: {}\n", c.name, c.detail));
            }
            s.push('\n');
        }
        s.push_str("| measurement | value | note |\n|---|---|---|\n");
        for p in &self.perf {
            s.push_str(&format!("| {} | {} | {} |\n", p.what, p.value, p.note));
        }
        s
    }
}

/// How two f32 arrays differ.
pub struct Diff {
    pub len: usize,
    pub identical: usize,
    pub max_abs: f32,
    /// Elements whose difference exceeds float rounding: `|a - b| > 8 eps max(1, |a|)`, or NaN on one
    /// side only.
    pub beyond_rounding: usize,
}

impl Diff {
    pub fn new(a: &[f32], b: &[f32]) -> Self {
        assert_eq!(a.len(), b.len());
        let mut d = Diff {
            len: a.len(),
            identical: 0,
            max_abs: 0.0,
            beyond_rounding: 0,
        };
        for (&x, &y) in a.iter().zip(b) {
            if x.to_bits() == y.to_bits() {
                d.identical += 1;
                continue;
            }
            let e = (x - y).abs();
            if e.is_nan() {
                d.beyond_rounding += 1;
                continue;
            }
            d.max_abs = d.max_abs.max(e);
            if e > 8.0 * f32::EPSILON * x.abs().max(1.0) {
                d.beyond_rounding += 1;
            }
        }
        d
    }

    pub fn bit_identical(&self) -> bool {
        self.identical == self.len
    }

    pub fn within_rounding(&self) -> bool {
        self.beyond_rounding == 0
    }

    pub fn describe(&self) -> String {
        format!(
            "{}/{} bit-identical, max |diff| {:.3e}, {} beyond rounding",
            self.identical, self.len, self.max_abs, self.beyond_rounding
        )
    }
}
