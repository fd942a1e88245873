//! Deleting old checkpoints, and tidying up after interrupted writes, without ever losing the
//! checkpoint a run would resume from.
//!
//! Pruning by step number alone keeps the K highest steps whether they are valid or not: a damaged
//! newest checkpoint then survives while the good ones behind it, including the one just written,
//! are deleted. [`prune`] keeps the K newest *valid* ones (the writer's checkpoint counts as valid)
//! and deletes only what is older than all of them; a damaged checkpoint newer than the oldest kept
//! one is left alone (readers skip it with a warning).
//!
//! Replacing an existing `step_X` moves it aside to `.step_X.old.<pid>` before the new one is
//! renamed in; a crash between the two renames leaves no `step_X` at all, and the old copy is then
//! the only one. [`clean_staging`] restores it instead of deleting it.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{list_checkpoints, CheckpointError, CHECKPOINTS_DIR};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    CheckpointError::io(path)
}

/// Deletes every checkpoint older than the `keep` newest valid ones. `just_written` (when given)
/// counts as valid without being re-read; `is_valid` decides for the others. Returns the deleted
/// directories.
pub fn prune(
    run_dir: &Path,
    keep: usize,
    just_written: Option<&Path>,
    mut is_valid: impl FnMut(&Path) -> bool,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let keep = keep.max(1);
    let mut valid = 0usize;
    let mut removed = Vec::new();
    for (_, dir) in list_checkpoints(run_dir) {
        if valid >= keep && Some(dir.as_path()) != just_written {
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
            removed.push(dir);
            continue;
        }
        if Some(dir.as_path()) == just_written || is_valid(&dir) {
            valid += 1;
        }
    }
    if !removed.is_empty() {
        let root = run_dir.join(CHECKPOINTS_DIR);
        fs::File::open(&root)
            .and_then(|f| f.sync_all())
            .map_err(io(&root))?;
    }
    Ok(removed)
}

/// `.step_X.old.<pid>` -> `step_X`.
fn old_target(name: &str) -> Option<&str> {
    let rest = name.strip_prefix('.')?;
    let (target, _) = rest.split_once(".old.")?;
    target.starts_with("step_").then_some(target)
}

/// Removes staging directories (`.tmp-*`) of interrupted writes and the moved-aside copies of
/// replaced checkpoints, except that a moved-aside copy whose `step_X` is missing (the crash
/// between the two renames) is renamed back. Call on the writer (rank 0) before training starts.
/// Returns the restored checkpoints.
pub fn clean_staging(run_dir: &Path) -> Vec<PathBuf> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let mut restored = Vec::new();
    for e in fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(target) = old_target(&name) {
            let to = root.join(target);
            if !to.exists() && fs::rename(e.path(), &to).is_ok() {
                restored.push(to);
                continue;
            }
            let _ = fs::remove_dir_all(e.path());
        } else if name.starts_with(".tmp-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    if !restored.is_empty() {
        let _ = fs::File::open(&root).and_then(|f| f.sync_all());
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step_dir_name;

    fn mk(run: &Path, steps: &[u64]) -> Vec<PathBuf> {
        steps
            .iter()
            .map(|s| {
                let d = run.join(CHECKPOINTS_DIR).join(step_dir_name(*s));
                fs::create_dir_all(&d).unwrap();
                d
            })
            .collect()
    }

    fn steps(run: &Path) -> Vec<u64> {
        list_checkpoints(run).iter().map(|c| c.0).collect()
    }

    /// The repro at the directory level: damaged step 10, then a resumed run writes step 8
    /// with keep = 1. Pruning by step number deleted 8 (the one just written) and kept damaged 10.
    #[test]
    fn keeps_the_just_written_and_newest_valid_not_a_damaged_newer_one() {
        let run = tempfile::tempdir().unwrap();
        let d = mk(run.path(), &[5, 8, 10]);
        let damaged = d[2].clone();
        let removed = prune(run.path(), 1, Some(&d[1]), |p| p != damaged).unwrap();
        assert_eq!(removed, vec![d[0].clone()]);
        assert_eq!(steps(run.path()), vec![10, 8]);
    }

    #[test]
    fn keeps_k_valid_ones_and_skips_damaged_ones_when_counting() {
        let run = tempfile::tempdir().unwrap();
        let d = mk(run.path(), &[1, 2, 3, 4, 5]);
        let damaged = [d[4].clone(), d[2].clone()];
        let removed = prune(run.path(), 2, None, |p| !damaged.iter().any(|x| x == p)).unwrap();
        // valid newest-first: 4, 2 -> keep 5 (damaged, newer), 4, 3 (damaged, between), 2
        assert_eq!(removed, vec![d[0].clone()]);
        assert_eq!(steps(run.path()), vec![5, 4, 3, 2]);
    }

    #[test]
    fn a_crash_between_the_renames_of_a_replacement_restores_the_old_copy() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS_DIR);
        // state after `rename(step_7 -> .step_7.old.PID)`, before `rename(staging -> step_7)`
        let old = root.join(".step_000000007.old.4242");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("manifest.json"), b"old").unwrap();
        fs::create_dir_all(root.join(".tmp-step_000000007.4242")).unwrap();
        // a replaced checkpoint that did get its new copy: the old one goes
        mk(run.path(), &[9]);
        fs::create_dir_all(root.join(".step_000000009.old.4242")).unwrap();

        let restored = clean_staging(run.path());
        assert_eq!(restored, vec![root.join("step_000000007")]);
        assert_eq!(
            fs::read(root.join("step_000000007/manifest.json")).unwrap(),
            b"old"
        );
        let mut names: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["step_000000007", "step_000000009"]);
    }
}
