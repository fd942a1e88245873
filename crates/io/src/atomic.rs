//! Temporary sibling, fsync, rename, fsync of the directory (see the crate docs).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Adds context (the path) to an I/O error so messages name the file.
fn ctx(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// A temporary name in the same directory (same file system, so `rename` is atomic). The pid keeps
/// two processes writing the same target from clobbering each other's temporaries.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Flushes a directory's entries (new names, renames) to disk.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| ctx(e, "fsync directory", dir))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`] but lets the caller stream into the file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| ctx(e, "create", &tmp))?;
        fill(&mut f).map_err(|e| ctx(e, "write", &tmp))?;
        drop(f);
        commit(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Flushes a complete temporary file `tmp` (written by someone else, e.g. the HDF5 library) and
/// renames it over `target`, then flushes the directory. `tmp` should be [`temp_sibling`]`(target)`.
pub fn commit(tmp: &Path, target: &Path) -> io::Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| ctx(e, "fsync", tmp))?;
    fs::rename(tmp, target).map_err(|e| ctx(e, "rename to", target))?;
    fsync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Writes a file without the rename step, for files inside a staging directory that is itself
/// renamed into place atomically (see `checkpoint`). Still fsyncs so the later directory rename
/// publishes complete data.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path).map_err(|e| ctx(e, "create", path))?;
    f.write_all(bytes).map_err(|e| ctx(e, "write", path))?;
    f.sync_all().map_err(|e| ctx(e, "fsync", path))
}

/// Renames a fully written staging directory to its final name and flushes the parent, so the
/// directory appears complete or not at all.
pub fn publish_dir(staging: &Path, final_path: &Path) -> io::Result<()> {
    fsync_dir(staging)?;
    if final_path.exists() {
        // Rewriting the checkpoint of the same step (e.g. a resumed run that ends where it began):
        // move the old one aside first; `rename` cannot replace a non-empty directory.
        let old = final_path.with_file_name(format!(
            ".{}.old.{}",
            final_path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        fs::rename(final_path, &old).map_err(|e| ctx(e, "rename aside", final_path))?;
        fs::rename(staging, final_path).map_err(|e| ctx(e, "rename to", final_path))?;
        fs::remove_dir_all(&old).map_err(|e| ctx(e, "remove", &old))?;
    } else {
        fs::rename(staging, final_path).map_err(|e| ctx(e, "rename to", final_path))?;
    }
    fsync_dir(final_path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "left-over files: {names:?}");
    }

    #[test]
    fn failed_write_keeps_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"good").unwrap();
        let err = write_atomic_with(&p, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("simulated crash mid-write"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("simulated crash"), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"good");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
    }

    #[test]
    fn error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("x");
        let err = write_atomic(&p, b"x").unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");
    }

    #[test]
    fn publish_dir_replaces_existing() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("step_1");
        for content in [&b"one"[..], b"two"] {
            let st = dir.path().join(".staging");
            fs::create_dir(&st).unwrap();
            write_synced(&st.join("f"), content).unwrap();
            publish_dir(&st, &fin).unwrap();
        }
        assert_eq!(fs::read(fin.join("f")).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
