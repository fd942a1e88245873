//! `metrics.jsonl`: one JSON object per logged step, written by rank 0.
//!
//! Values are means over the steps since the previous log line (the *window*) and over the whole
//! global batch (all ranks), so a line does not depend on the rank layout. The window's running sums
//! are part of the checkpoint, so a resumed run writes exactly the lines the uninterrupted run would
//! have written (apart from wall-clock fields).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use ddpm_io::write_atomic;

/// Number of per-step statistics all-reduced across ranks (see [`StepStats::to_vec`]).
pub const STEP_STATS_LEN: usize = 14;

/// Sums over the local examples of one step; summed over ranks by an f64 all-reduce.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    pub examples: f64,
    pub loss: f64,
    pub mse: f64,
    pub vb: f64,
    /// Classifier task: number of correct predictions.
    pub correct: f64,
    pub q_loss: [f64; 4],
    pub q_count: [f64; 4],
    /// 1 if the local loss was non-finite (the sum says how many ranks saw one).
    pub nonfinite: f64,
}

impl StepStats {
    /// Adds one example with timestep `t` out of `num_timesteps`.
    pub fn add(
        &mut self,
        t: usize,
        num_timesteps: usize,
        loss: f64,
        mse: Option<f64>,
        vb: Option<f64>,
    ) {
        self.examples += 1.0;
        self.loss += loss;
        self.mse += mse.unwrap_or(0.0);
        self.vb += vb.unwrap_or(0.0);
        let q = (t * 4 / num_timesteps.max(1)).min(3);
        self.q_loss[q] += loss;
        self.q_count[q] += 1.0;
    }

    pub fn to_vec(&self) -> Vec<f64> {
        let mut v = vec![self.examples, self.loss, self.mse, self.vb, self.correct];
        v.extend_from_slice(&self.q_loss);
        v.extend_from_slice(&self.q_count);
        v.push(self.nonfinite);
        debug_assert_eq!(v.len(), STEP_STATS_LEN);
        v
    }

    pub fn from_slice(v: &[f64]) -> Self {
        assert_eq!(v.len(), STEP_STATS_LEN);
        Self {
            examples: v[0],
            loss: v[1],
            mse: v[2],
            vb: v[3],
            correct: v[4],
            q_loss: [v[5], v[6], v[7], v[8]],
            q_count: [v[9], v[10], v[11], v[12]],
            nonfinite: v[13],
        }
    }
}

/// Running sums since the last log line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub steps: f64,
    pub applied_steps: f64,
    pub stats: Vec<f64>,
    pub grad_norm: f64,
}

impl Window {
    pub fn add(&mut self, s: &StepStats, grad_norm: Option<f64>) {
        if self.stats.is_empty() {
            self.stats = vec![0.0; STEP_STATS_LEN];
        }
        for (a, b) in self.stats.iter_mut().zip(s.to_vec()) {
            *a += b;
        }
        self.steps += 1.0;
        if let Some(g) = grad_norm {
            self.applied_steps += 1.0;
            self.grad_norm += g;
        }
    }

    /// Flat f64 form for the checkpoint (stored bit-exactly in safetensors).
    pub fn to_vec(&self) -> Vec<f64> {
        let mut v = vec![self.steps, self.applied_steps, self.grad_norm];
        if self.stats.is_empty() {
            v.extend(std::iter::repeat_n(0.0, STEP_STATS_LEN));
        } else {
            v.extend_from_slice(&self.stats);
        }
        v
    }

    pub fn from_slice(v: &[f64]) -> Option<Self> {
        if v.len() != 3 + STEP_STATS_LEN {
            return None;
        }
        Some(Self {
            steps: v[0],
            applied_steps: v[1],
            grad_norm: v[2],
            stats: v[3..].to_vec(),
        })
    }

    /// The JSON line for this window, ending at `step`.
    pub fn line(
        &self,
        step: u64,
        lr: f64,
        images_per_sec: f64,
        skipped_steps: u64,
        extra: &Map<String, Value>,
    ) -> Value {
        let s = StepStats::from_slice(if self.stats.is_empty() {
            &[0.0; STEP_STATS_LEN]
        } else {
            &self.stats
        });
        let n = s.examples.max(1.0);
        let mut o = Map::new();
        o.insert("step".into(), json!(step));
        o.insert("loss".into(), num(s.loss / n));
        for q in 0..4 {
            o.insert(
                format!("loss_q{q}"),
                if s.q_count[q] > 0.0 {
                    num(s.q_loss[q] / s.q_count[q])
                } else {
                    Value::Null
                },
            );
        }
        o.insert(
            "grad_norm".into(),
            if self.applied_steps > 0.0 {
                num(self.grad_norm / self.applied_steps)
            } else {
                Value::Null
            },
        );
        o.insert("lr".into(), num(lr));
        o.insert("images_per_sec".into(), num(images_per_sec));
        o.insert("skipped_steps".into(), json!(skipped_steps));
        for (k, v) in extra {
            o.insert(k.clone(), v.clone());
        }
        Value::Object(o)
    }

    pub fn mean(&self, idx: usize) -> f64 {
        let ex = self.stats.first().copied().unwrap_or(0.0).max(1.0);
        self.stats.get(idx).copied().unwrap_or(0.0) / ex
    }
}

/// JSON has no NaN/inf: non-finite values are written as strings so the line still parses.
pub fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`. A fresh run (`resume_step == None`) starts an empty file; a
    /// resumed run first drops lines past the checkpoint step (written after the checkpoint by the
    /// interrupted run), so the file reads as one uninterrupted run.
    pub fn open(dir: &Path, resume_step: Option<u64>) -> io::Result<Self> {
        let path = dir.join("metrics.jsonl");
        match resume_step {
            None => write_atomic(&path, b"")?,
            Some(step) => {
                // The kept lines are copied as written: re-serialising parsed values could change
                // the last digits of floats.
                let kept = read_raw_lines(&path)?
                    .into_iter()
                    .filter(|(_, v)| {
                        v.get("step")
                            .and_then(Value::as_u64)
                            .is_some_and(|s| s <= step)
                    })
                    .map(|(raw, _)| raw + "\n")
                    .collect::<String>();
                write_atomic(&path, kept.as_bytes())?;
            }
        }
        let file = OpenOptions::new().append(true).create(true).open(&path)?;
        Ok(Self { path, file })
    }

    pub fn write(&mut self, line: &Value) -> io::Result<()> {
        writeln!(self.file, "{line}")?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (step, loss) pairs for the loss plot.
    pub fn loss_points(&self) -> io::Result<Vec<(u64, f64)>> {
        Ok(read_lines(&self.path)?
            .iter()
            .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
            .collect())
    }
}

/// Parses a metrics file; a missing file is empty, a torn last line (crash mid-write) is ignored.
pub fn read_lines(path: &Path) -> io::Result<Vec<Value>> {
    Ok(read_raw_lines(path)?.into_iter().map(|(_, v)| v).collect())
}

/// [`read_lines`], each parsed line with its text as written.
fn read_raw_lines(path: &Path) -> io::Result<Vec<(String, Value)>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            out.push((line, v));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_means_and_quartiles() {
        let mut w = Window::default();
        let mut s = StepStats::default();
        s.add(0, 1000, 1.0, Some(1.0), None);
        s.add(999, 1000, 3.0, Some(3.0), None);
        w.add(&s, Some(2.0));
        w.add(
            &StepStats {
                nonfinite: 1.0,
                ..Default::default()
            },
            None,
        );
        let line = w.line(2, 1e-4, 10.0, 1, &Map::new());
        assert_eq!(line["loss"], json!(2.0));
        assert_eq!(line["loss_q0"], json!(1.0));
        assert_eq!(line["loss_q3"], json!(3.0));
        assert_eq!(line["loss_q1"], Value::Null);
        assert_eq!(line["grad_norm"], json!(2.0));
        assert_eq!(line["skipped_steps"], json!(1));
        assert_eq!(Window::from_slice(&w.to_vec()).unwrap(), w);
    }

    #[test]
    fn resume_truncates_lines_past_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetricsLog::open(dir.path(), None).unwrap();
        for s in 1..=5 {
            m.write(&json!({"step": s, "loss": 1.0 / s as f64}))
                .unwrap();
        }
        drop(m);
        // a torn line at the end
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("metrics.jsonl"))
            .unwrap()
            .write_all(b"{\"step\": 6, \"lo")
            .unwrap();
        let m = MetricsLog::open(dir.path(), Some(3)).unwrap();
        let pts = m.loss_points().unwrap();
        assert_eq!(pts.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn resume_keeps_lines_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        // a float whose shortest form serde_json's default (not round-trip) parser rounds
        let lr: f64 = "0.00014000000000000001".parse().unwrap();
        let mut m = MetricsLog::open(dir.path(), None).unwrap();
        for s in 1..=3 {
            m.write(&json!({"step": s, "lr": lr, "loss": 0.1 * s as f64}))
                .unwrap();
        }
        drop(m);
        let before = std::fs::read_to_string(&path).unwrap();
        assert!(before.contains("0.00014000000000000001"), "{before}");
        let m = MetricsLog::open(dir.path(), Some(2)).unwrap();
        drop(m);
        let after = std::fs::read_to_string(&path).unwrap();
        let first_two: String = before.lines().take(2).map(|l| format!("{l}\n")).collect();
        assert_eq!(after, first_two);
    }
}
