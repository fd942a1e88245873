//! Integration tests spanning crates, including the reference-vector conformance suite.
//!
//! [`check_dir`] checks every reference file in a directory against `ddpm-diffusion` and returns a
//! [`Report`]; the `conformance` test target prints its summary line and fails unless nothing failed.
//! The checker is a library function so that other tests can run it on deliberately broken copies of
//! the files and see it fail.

pub mod check;
pub mod files;
pub mod refjson;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use check::FileTally;
use files::{KnownFile, KNOWN};
use refjson::{Scope, Tracker, J};

/// A cross-check table that is not a case file: diffusers/torch comparisons made by the generator.
pub const CROSSCHECKS: &str = "crosschecks.json";

/// The environment variable naming the reference directory.
pub const REFS_DIR_ENV: &str = "DDPM_REFS_DIR";

/// The directory named by `DDPM_REFS_DIR`, or the repository's copy.
pub fn refs_dir() -> PathBuf {
    match std::env::var_os(REFS_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data")
            .join("refs"),
    }
}

/// The outcome of a conformance run.
#[derive(Debug, Default)]
pub struct Report {
    /// Case files checked (known names; crosschecks.json is not a case file).
    pub files: usize,
    /// Entries of `cases` checked, over all files.
    pub cases: usize,
    /// Values compared (f64 and f32 paths, plus settings and consistency checks).
    pub values: usize,
    /// Values out of tolerance plus structural failures (unknown file, missing or unread field, ...).
    pub failed: usize,
    /// One line per failure.
    pub failures: Vec<String>,
    /// One summary line per file.
    pub summaries: Vec<String>,
}

impl Report {
    pub fn line(&self) -> String {
        format!(
            "conformance: {} files, {} cases, {} values checked, {} failed",
            self.files, self.cases, self.values, self.failed
        )
    }

    fn fail(&mut self, msg: String) {
        self.failed += 1;
        self.failures.push(msg);
    }
}

/// Checks every `*.json` file in `dir` and its subdirectories (so a folder holding split
/// subdirectories such as `public/` works too). Other files (the README) are ignored; a JSON file that
/// is not a known reference file is a failure, and so is a directory without any reference file.
pub fn check_dir(dir: &Path) -> Report {
    let mut report = Report::default();
    let mut paths = Vec::new();
    if let Err(e) = collect_json(dir, &mut paths) {
        report.fail(format!(
            "cannot read reference directory {}: {e}",
            dir.display()
        ));
        return report;
    }
    paths.sort();
    for path in &paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shown = path.strip_prefix(dir).unwrap_or(path).display().to_string();
        if name == CROSSCHECKS {
            match check_crosschecks(path) {
                Ok(n) => report.summaries.push(format!(
                    "{shown}: {n} diffusers/torch cross-check records read (the generator's own comparisons; informational)"
                )),
                Err(e) => report.fail(format!("{shown}: {e:#}")),
            }
            continue;
        }
        let Some(known) = KNOWN.iter().find(|k| k.name == name) else {
            report.fail(format!(
                "{shown}: unknown reference file (no checker for it)"
            ));
            continue;
        };
        report.files += 1;
        let tally = check_file(path, known);
        report.cases += tally.cases;
        report.values += tally.values + tally.values_f32;
        report.failed += tally.failed;
        report.summaries.push(format!(
            "{shown}: {} cases, {} f64 values (max err {:.1e}), {} f32 values (max err {:.1e}), {} failed",
            tally.cases, tally.values, tally.max_err_f64, tally.values_f32, tally.max_err_f32, tally.failed
        ));
        if std::env::var_os("DDPM_CONFORMANCE_VERBOSE").is_some_and(|v| v == "1") {
            for (what, err, n) in &tally.per_check {
                report
                    .summaries
                    .push(format!("    {what}: {n} values, max err {err:.2e}"));
            }
        }
        report
            .summaries
            .extend(tally.notes.iter().map(|n| format!("    note: {n}")));
        report
            .failures
            .extend(tally.failures.into_iter().map(|f| format!("{shown}: {f}")));
    }
    if report.files == 0 {
        report.fail(format!("no reference files found in {}", dir.display()));
    }
    report
}

fn collect_json(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_json(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

fn load(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Checks one case file; every problem ends up in the tally.
pub fn check_file(path: &Path, known: &KnownFile) -> FileTally {
    let mut tally = FileTally::default();
    let doc = match load(path) {
        Ok(d) => d,
        Err(e) => {
            tally.fail(format!("{e:#}"));
            return tally;
        }
    };
    if let Err(e) = check_doc(&doc, known, &mut tally) {
        tally.fail(format!("{e:#}"));
    }
    tally
}

fn check_doc(doc: &Value, known: &KnownFile, tally: &mut FileTally) -> Result<()> {
    let tr = Tracker::default();
    let top_shapes = doc
        .get("shapes")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("missing top-level shapes object"))?;
    let top = J::root(
        doc,
        Scope {
            root: "",
            shapes: Some(top_shapes),
        },
        &tr,
    );

    // Header shared by all files.
    tally.expect_eq("file", top.get("file")?.str()?, known.name);
    tally.expect_eq("dtype", top.get("dtype")?.str()?, "float64");
    for meta in ["generator", "split", "description"] {
        top.get(meta)?.str()?;
    }
    top.get("rng_seed")?.i64()?;

    // Extra top-level sections.
    for section in known.top_sections {
        if !top.has(section) {
            bail!("missing top-level section {section}");
        }
    }
    if let Err(e) = (known.top)(&top, tally) {
        tally.fail(format!("top-level sections: {e:#}"));
    }

    let cases = doc
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("missing cases array"))?;
    if cases.is_empty() {
        bail!("cases is empty");
    }
    let mut case_ok = vec![true; cases.len()];
    for (i, case) in cases.iter().enumerate() {
        let root = format!("cases[{i}]");
        let shapes = case.get("shapes").and_then(Value::as_object);
        let j = J::root(
            case,
            Scope {
                root: &root,
                shapes,
            },
            &tr,
        );
        tally.cases += 1;
        if let Err(e) = (known.case)(&j, tally) {
            let label = case.get("name").and_then(Value::as_str).unwrap_or("?");
            tally.fail(format!("{root} ({label}): {e:#}"));
            case_ok[i] = false;
        }
    }

    // Every field must have been read by some check.
    let mut unread = Vec::new();
    for (k, v) in doc
        .as_object()
        .ok_or_else(|| anyhow!("not a JSON object"))?
    {
        if k == "cases" {
            for (i, c) in cases.iter().enumerate() {
                if case_ok[i] {
                    unread.extend(tr.unconsumed(c, &format!("cases[{i}]")));
                }
            }
        } else {
            unread.extend(tr.unconsumed(v, k));
        }
    }
    for u in unread {
        tally.fail(format!("field {u} was not checked"));
    }
    Ok(())
}

/// Validates `crosschecks.json`: its records must be well formed and name known files. Its numbers
/// compare the generator with diffusers, not this implementation, so they are not counted as values.
fn check_crosschecks(path: &Path) -> Result<usize> {
    let doc = load(path)?;
    let versions = doc
        .get("versions")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("missing versions object"))?;
    if versions.values().any(|v| !v.is_string()) {
        bail!("versions must map names to strings");
    }
    let checks = doc
        .get("checks")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("missing checks array"))?;
    for (i, c) in checks.iter().enumerate() {
        let obj = c
            .as_object()
            .ok_or_else(|| anyhow!("checks[{i}] is not an object"))?;
        for key in ["file", "case", "what", "note", "split"] {
            if !obj.get(key).is_some_and(Value::is_string) {
                bail!("checks[{i}].{key} is missing or not a string");
            }
        }
        for key in ["max_abs_diff", "max_mixed_diff", "max_abs_ref"] {
            if !obj.get(key).is_some_and(Value::is_number) {
                bail!("checks[{i}].{key} is missing or not a number");
            }
        }
        if obj.get("equal").is_some_and(|v| !v.is_boolean()) {
            bail!("checks[{i}].equal is not a bool");
        }
        let file = obj["file"].as_str().unwrap_or_default();
        if !KNOWN.iter().any(|k| k.name == file) {
            bail!("checks[{i}] refers to unknown file {file:?}");
        }
        let known_keys = [
            "file",
            "case",
            "what",
            "note",
            "split",
            "max_abs_diff",
            "max_mixed_diff",
            "max_abs_ref",
            "equal",
        ];
        if let Some(k) = obj.keys().find(|k| !known_keys.contains(&k.as_str())) {
            bail!("checks[{i}] has an unexpected field {k:?}");
        }
    }
    Ok(checks.len())
}
