//! The config hash: sha256 of the canonical JSON (keys sorted at every level) of a config without
//! the keys that do not change the training trajectory. Checkpoints carry it; a resumed run and a
//! checkpoint reader recompute it.
//!
//! It is taken over the config as a reader parses it back from JSON text: serde_json's default
//! float parser is not correctly rounded for every input (`1e30` can come back one ulp off), so
//! hashing exact values on the writer's side and re-parsed ones on the reader's would reject valid
//! checkpoints.

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// JSON with object keys sorted at every level: the form every hash in the format is taken over,
/// independent of key order and white space in the file.
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let sorted: BTreeMap<&String, &Value> = o.iter().collect();
            let items: Vec<String> = sorted
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

fn remove_dotted(v: &mut Value, dotted: &str) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut cur = v;
    for p in parts {
        match cur.get_mut(p) {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(o) = cur.as_object_mut() {
        o.remove(last);
    }
}

/// sha256 of the canonical JSON of `config` without the dotted `excluded` keys: the config hash a
/// manifest carries and a resumed run compares. Taken over `config` as a reader parses it back from
/// its JSON text (see the module doc), so a checkpoint reader can recompute it.
pub fn config_hash(config: &Value, excluded: &[impl AsRef<str>]) -> String {
    let reparsed = serde_json::from_str(&config.to_string()).unwrap_or_else(|_| config.clone());
    parsed_config_hash(&reparsed, excluded)
}

/// [`config_hash`] of a config already parsed back from JSON text (a manifest's).
pub fn parsed_config_hash(config: &Value, excluded: &[impl AsRef<str>]) -> String {
    let mut v = config.clone();
    for k in excluded {
        remove_dotted(&mut v, k.as_ref());
    }
    sha256_hex(canonical(&v).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hash_ignores_key_order_and_excluded_keys() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":2.5,"x":[1,2]},"s":{"k":1}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":[1,2],"y":2.5},"b":1}"#).unwrap();
        assert_eq!(config_hash(&a, &["s"]), config_hash(&b, &[] as &[&str]));
        assert_ne!(config_hash(&a, &["a.y"]), config_hash(&b, &[] as &[&str]));
    }
}
