//! What a manifest must satisfy before any of it is used: nothing in it is trusted.
//!
//! A manifest names the files that are opened and hashed, and carries the config from which the
//! sampler builds a model, so a damaged or hand-edited one must be refused before it can point a
//! reader at another file (`../`, `/dev/zero`) or make it build a model other than the one trained.
//! Three checks, each naming the manifest and the field:
//! - every `files[i].name` is a plain file name inside the checkpoint directory;
//! - `config` hashes to `config_hash` (the same hash the trainer compares on resume);
//! - `manifest_sha256` is the sha256 of the manifest file's own text with that field's value
//!   empty, so any edit is noticed.
//!
//! Both hashes are defined on what a reader parses back, not on the writer's in-memory values:
//! serde_json's default float parser is not correctly rounded for every input (`1e30` can come back
//! one ulp off), so hashing re-parsed numbers on one side and exact ones on the other would reject
//! valid checkpoints.

use std::path::Path;

use ddpm_config::parsed_config_hash;

use crate::{sha256_hex, CheckpointError, Manifest};

/// The longest file name a manifest may list (the longest real one is an EMA file, ~30 bytes).
pub const MAX_NAME_LEN: usize = 128;
/// At most this many files per checkpoint (model, optimizer, state and one per EMA rate).
pub const MAX_FILES: usize = 64;

fn field(path: &Path, field: impl Into<String>, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Field {
        path: path.to_path_buf(),
        field: field.into(),
        msg: msg.into(),
    }
}

/// A plain name: ASCII letters, digits, `.`, `_`, `-`, not starting with `.` (so neither `..`,
/// nor a hidden staging name), no separator, not absolute.
pub fn check_file_name(
    manifest_path: &Path,
    index: usize,
    name: &str,
) -> Result<(), CheckpointError> {
    let bad = |why: &str| {
        field(
            manifest_path,
            format!("files[{index}].name"),
            format!("{name:?} {why}"),
        )
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("is longer than {MAX_NAME_LEN} bytes")));
    }
    if name.contains(['/', '\\']) {
        return Err(bad(
            "contains a path separator; only plain file names inside the checkpoint directory are allowed",
        ));
    }
    if name.starts_with('.') {
        return Err(bad(
            "starts with '.' (hidden names and '..' are not allowed)",
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(bad(
            "has characters other than ASCII letters, digits, '.', '_', '-'",
        ));
    }
    Ok(())
}

const SEAL_KEY: &str = "\"manifest_sha256\": \"";

/// The manifest as written to disk: pretty JSON whose `manifest_sha256` is the sha256 of the same
/// text with that value empty ([`text_hash`]).
pub fn sealed_json(manifest: &Manifest) -> String {
    let mut m = manifest.clone();
    m.manifest_sha256 = String::new();
    let text = serde_json::to_string_pretty(&m).expect("a manifest serialises");
    let at = text.rfind(SEAL_KEY).expect("manifest_sha256 is serialised") + SEAL_KEY.len();
    let h = sha256_hex(text.as_bytes());
    format!("{}{h}{}", &text[..at], &text[at..])
}

/// `(stored, computed)`: the `manifest_sha256` value in `text` and the sha256 of `text` with that
/// value removed. The field is the last one written, so its last occurrence is the real key (a
/// string value holding the same characters would have its quotes escaped).
pub fn text_hash(text: &str) -> Option<(String, String)> {
    let at = text.rfind(SEAL_KEY)? + SEAL_KEY.len();
    let len = text[at..].find('"')?;
    let stored = text[at..at + len].to_string();
    let blank = format!("{}{}", &text[..at], &text[at + len..]);
    Some((stored, sha256_hex(blank.as_bytes())))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Every check of the module on a manifest `m` parsed from `text`; `mp` is its path, for the errors.
pub fn check_manifest(mp: &Path, text: &str, m: &Manifest) -> Result<(), CheckpointError> {
    if m.files.len() > MAX_FILES {
        return Err(field(
            mp,
            "files",
            format!("lists {} files, at most {MAX_FILES} allowed", m.files.len()),
        ));
    }
    for (i, f) in m.files.iter().enumerate() {
        check_file_name(mp, i, &f.name)?;
        if !is_sha256_hex(&f.sha256) {
            return Err(field(
                mp,
                format!("files[{i}].sha256"),
                "is not 64 lowercase hex digits",
            ));
        }
        if m.files[..i].iter().any(|g| g.name == f.name) {
            return Err(field(
                mp,
                format!("files[{i}].name"),
                format!("{:?} is listed twice", f.name),
            ));
        }
    }
    for (k, h) in [
        ("config_hash", &m.config_hash),
        ("manifest_sha256", &m.manifest_sha256),
    ] {
        if !is_sha256_hex(h) {
            return Err(field(mp, k, "is not 64 lowercase hex digits"));
        }
    }
    match text_hash(text) {
        Some((stored, computed)) if stored == m.manifest_sha256 && computed == stored => {}
        _ => {
            return Err(field(
                mp,
                "manifest_sha256",
                "does not match the manifest's text (the manifest was edited or damaged)",
            ))
        }
    }
    let h = parsed_config_hash(&m.config, &m.hash_excluded_keys);
    if h != m.config_hash {
        return Err(field(
            mp,
            "config_hash",
            format!(
                "does not match `config` (which hashes to {}): the stored config was edited",
                &h[..12]
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture_manifest;
    use ddpm_config::config_hash;
    use std::path::PathBuf;

    fn mp() -> PathBuf {
        PathBuf::from("/r/checkpoints/step_000000001/manifest.json")
    }

    /// Seals `m` as the writer does and checks the text as a reader would.
    fn check(m: &Manifest) -> Result<(), CheckpointError> {
        let text = sealed_json(m);
        let parsed: Manifest = serde_json::from_str(&text).unwrap();
        check_manifest(&mp(), &text, &parsed)
    }

    #[test]
    fn plain_names_only() {
        for ok in ["model.safetensors", "ema_0.9999.safetensors", "a-b_c"] {
            check_file_name(&mp(), 0, ok).unwrap();
        }
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "/dev/zero",
            "a/b",
            "a\\b",
            ".tmp-x",
            "é",
            "a\0b",
        ] {
            let e = check_file_name(&mp(), 3, bad).unwrap_err().to_string();
            assert!(
                e.contains("manifest.json") && e.contains("files[3].name"),
                "{e}"
            );
        }
    }

    /// Floats that serde_json's default parser does not read back exactly (large exponents) must
    /// still verify: the writer hashes what the reader will parse.
    #[test]
    fn floats_that_do_not_round_trip_still_verify() {
        let mut m = fixture_manifest(2);
        m.config = serde_json::json!({"optim": {"lr": 1e30, "eps": 1.234_567_890_123_456_7e-300}});
        m.config_hash = config_hash(&m.config, &m.hash_excluded_keys);
        m.optimizer.lr = 5e29;
        check(&m).unwrap();
    }

    #[test]
    fn sealed_fixture_passes_and_every_edit_is_refused() {
        let m = fixture_manifest(4);
        check(&m).unwrap();

        // an edit of the text, not resealed
        let text = sealed_json(&m).replace("\"eps\"", "\"v\"");
        let parsed: Manifest = serde_json::from_str(&text).unwrap();
        let s = check_manifest(&mp(), &text, &parsed)
            .unwrap_err()
            .to_string();
        assert!(s.contains("manifest_sha256"), "{s}");
        // resealed but config edited: the config hash still tells
        let mut e = m.clone();
        e.config["diffusion"]["prediction"] = "v".into();
        let s = check(&e).unwrap_err().to_string();
        assert!(
            s.contains("manifest.json") && s.contains("config_hash"),
            "{s}"
        );

        let mut e = m.clone();
        e.config_hash = format!("a{}", "é".repeat(32));
        let s = check(&e).unwrap_err().to_string();
        assert!(s.contains("config_hash") && s.contains("hex"), "{s}");

        let mut e = m.clone();
        e.files.push(crate::FileEntry {
            name: "../../etc/passwd".into(),
            bytes: 1,
            sha256: "0".repeat(64),
        });
        let s = check(&e).unwrap_err().to_string();
        assert!(s.contains("files[0].name"), "{s}");
    }
}
