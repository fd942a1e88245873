//! Atomic file replacement: write `NAME.tmp` next to the target, fsync it, rename it over the target,
//! fsync the directory.
//!
//! A crash (or Ctrl-C) mid-conversion therefore leaves either the old file or no file, never a
//! half-written one that a later training run would open and misread.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// `out.h5` -> `out.h5.tmp` in the same directory (same filesystem, so the rename is atomic).
pub fn temp_path(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    target.with_file_name(name)
}

/// Flushes `tmp` to stable storage and renames it to `target`.
pub fn commit(tmp: &Path, target: &Path) -> Result<()> {
    let f =
        std::fs::File::open(tmp).map_err(|e| DataError::io(tmp, "cannot reopen for fsync", e))?;
    f.sync_all()
        .map_err(|e| DataError::io(tmp, "fsync failed", e))?;
    drop(f);
    std::fs::rename(tmp, target).map_err(|e| {
        DataError::io(
            target,
            format!("cannot rename {} into place", tmp.display()),
            e,
        )
    })?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Makes the rename itself durable. Some filesystems refuse to open directories; the data is
    // already safe at that point, so that is not an error.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `target` atomically.
pub fn write_bytes(target: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(target);
    std::fs::write(&tmp, bytes).map_err(|e| DataError::io(&tmp, "write failed", e))?;
    commit(&tmp, target).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
