//! One line of checkpoints per run directory.
//!
//! `--resume auto` (what a SLURM requeue runs) takes the newest valid checkpoint. When a run is
//! resumed from an older step S (an explicit checkpoint, or the newest *valid* one behind a damaged
//! newer one), the checkpoints newer than S belong to a line the user left; if they stayed in
//! `checkpoints/`, the next `--resume auto` would jump back to them. So the resume moves them to
//! `checkpoints/abandoned/after_step_<S>.<unix>.<pid>/` (kept, never deleted: the user may want them
//! back) before training starts, and `checkpoints/` again holds exactly the line being continued.
//!
//! The moves are journalled: `checkpoints/abandon.json` (written atomically first) records S and the
//! destination; [`list_checkpoints`](crate::list_checkpoints) ignores every step above a pending
//! journal's S, and [`recover`] finishes the moves, so a crash between two renames cannot make an
//! abandoned checkpoint "newest" again.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{step_dir_name, CheckpointError, CHECKPOINTS_DIR};

pub const ABANDONED_DIR: &str = "abandoned";
pub const JOURNAL: &str = "abandon.json";
/// A journal is a few dozen bytes; anything much larger is not one.
const MAX_JOURNAL_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Journal {
    /// Checkpoints with a step above this one leave the line.
    after_step: u64,
    /// Directory name under `checkpoints/abandoned/`.
    dest: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    CheckpointError::io(path)
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

fn read_journal(root: &Path) -> Result<Option<Journal>, CheckpointError> {
    let p = root.join(JOURNAL);
    let f = match fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::io(&p)(e)),
    };
    let mut text = String::new();
    f.take(MAX_JOURNAL_BYTES)
        .read_to_string(&mut text)
        .map_err(io(&p))?;
    let j: Journal = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::invalid(&p, format!("not an abandon journal: {e}")))?;
    crate::validate::check_file_name(&p, 0, &j.dest).map_err(|_| CheckpointError::Field {
        path: p.clone(),
        field: "dest".into(),
        msg: format!("{:?} is not a plain directory name", j.dest),
    })?;
    Ok(Some(j))
}

/// The step above which checkpoints are being abandoned, when a journal is pending. A damaged
/// journal counts as none here (listing must not fail); [`recover`] reports it.
pub(crate) fn pending_cutoff(root: &Path) -> Option<u64> {
    read_journal(root).ok().flatten().map(|j| j.after_step)
}

fn finish(root: &Path, j: &Journal) -> Result<Vec<PathBuf>, CheckpointError> {
    let dest = root.join(ABANDONED_DIR).join(&j.dest);
    fs::create_dir_all(&dest).map_err(io(&dest))?;
    let mut moved = Vec::new();
    for e in fs::read_dir(root).map_err(io(root))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step_")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if step > j.after_step {
            let to = dest.join(&name);
            fs::rename(e.path(), &to).map_err(io(&to))?;
            moved.push(to);
        }
    }
    fsync_dir(&dest)?;
    fsync_dir(root)?;
    let jp = root.join(JOURNAL);
    fs::remove_file(&jp).map_err(io(&jp))?;
    fsync_dir(root)?;
    Ok(moved)
}

/// Finishes an interrupted [`abandon_newer`]. Call on the writer (rank 0) before choosing a
/// checkpoint to resume from.
pub fn recover(run_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    match read_journal(&root)? {
        Some(j) => finish(&root, &j),
        None => Ok(Vec::new()),
    }
}

/// Moves every checkpoint of `run_dir` newer than `step` out of the line (see the module doc);
/// returns their new paths. Nothing to move: nothing written.
pub fn abandon_newer(run_dir: &Path, step: u64) -> Result<Vec<PathBuf>, CheckpointError> {
    recover(run_dir)?;
    let root = run_dir.join(CHECKPOINTS_DIR);
    let newer = fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("step_")?.parse::<u64>().ok()
        })
        .any(|s| s > step);
    if !newer {
        return Ok(Vec::new());
    }
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let j = Journal {
        after_step: step,
        dest: format!(
            "after_{}.{unix}.{}",
            step_dir_name(step),
            std::process::id()
        ),
    };
    let jp = root.join(JOURNAL);
    let tmp = root.join(format!(".{JOURNAL}.tmp.{}", std::process::id()));
    let text = serde_json::to_string(&j).expect("journal serialises");
    (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &jp)
    })()
    .map_err(io(&jp))?;
    fsync_dir(&root)?;
    finish(&root, &j)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::list_checkpoints;

    fn mk(run: &Path, steps: &[u64]) {
        for s in steps {
            fs::create_dir_all(run.join(CHECKPOINTS_DIR).join(step_dir_name(*s))).unwrap();
        }
    }

    fn steps(run: &Path) -> Vec<u64> {
        list_checkpoints(run).iter().map(|c| c.0).collect()
    }

    #[test]
    fn newer_checkpoints_leave_the_line_and_are_kept() {
        let run = tempfile::tempdir().unwrap();
        mk(run.path(), &[5, 10, 15]);
        let moved = abandon_newer(run.path(), 5).unwrap();
        assert_eq!(moved.len(), 2);
        assert_eq!(steps(run.path()), vec![5]);
        for m in &moved {
            assert!(m.is_dir(), "{m:?}");
            assert!(m.starts_with(run.path().join(CHECKPOINTS_DIR).join(ABANDONED_DIR)));
        }
        assert!(!run.path().join(CHECKPOINTS_DIR).join(JOURNAL).exists());
        // nothing newer: nothing written
        assert!(abandon_newer(run.path(), 5).unwrap().is_empty());
    }

    #[test]
    fn a_crash_between_the_moves_is_finished_and_never_listed() {
        let run = tempfile::tempdir().unwrap();
        mk(run.path(), &[5, 10, 15]);
        let root = run.path().join(CHECKPOINTS_DIR);
        // the journal is written, no move done yet (the crash)
        fs::write(
            root.join(JOURNAL),
            r#"{"after_step": 5, "dest": "after_step_000000005.1.2"}"#,
        )
        .unwrap();
        assert_eq!(steps(run.path()), vec![5]);
        let moved = recover(run.path()).unwrap();
        assert_eq!(moved.len(), 2);
        assert_eq!(steps(run.path()), vec![5]);
        assert!(root
            .join(ABANDONED_DIR)
            .join("after_step_000000005.1.2/step_000000015")
            .is_dir());
    }

    #[test]
    fn a_journal_with_a_path_is_refused() {
        let run = tempfile::tempdir().unwrap();
        mk(run.path(), &[1]);
        let root = run.path().join(CHECKPOINTS_DIR);
        fs::write(
            root.join(JOURNAL),
            r#"{"after_step": 0, "dest": "../../x"}"#,
        )
        .unwrap();
        let e = recover(run.path()).unwrap_err().to_string();
        assert!(e.contains(JOURNAL) && e.contains("dest"), "{e}");
    }
}
