//! Read-tracking access to a reference JSON file.
//!
//! Every leaf (number, string, bool, numeric array) that a checker reads is recorded, so after a file is
//! checked the suite can list the fields nobody looked at: a field that is silently skipped is a failure,
//! not a pass. Arrays are also checked against the file's own `shapes` table.

use std::cell::RefCell;
use std::collections::BTreeSet;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// Records which leaf paths of one document were read.
#[derive(Default)]
pub struct Tracker {
    used: RefCell<BTreeSet<String>>,
}

impl Tracker {
    fn mark(&self, path: &str) {
        self.used.borrow_mut().insert(path.to_string());
    }

    /// Every leaf under `v` (at `path`) that was not read, as full paths.
    pub fn unconsumed(&self, v: &Value, path: &str) -> Vec<String> {
        let mut all = Vec::new();
        leaves(v, path, &mut all);
        let used = self.used.borrow();
        all.into_iter().filter(|p| !used.contains(p)).collect()
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn is_object_array(a: &[Value]) -> bool {
    !a.is_empty() && a.iter().all(Value::is_object)
}

/// Leaves are scalars and arrays that are not arrays of objects (those are walked like objects).
fn leaves(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                leaves(c, &join(path, k), out);
            }
        }
        Value::Array(a) if is_object_array(a) => {
            for (i, c) in a.iter().enumerate() {
                leaves(c, &format!("{path}[{i}]"), out);
            }
        }
        _ => out.push(path.to_string()),
    }
}

/// A dense row-major array read from nested JSON lists.
#[derive(Debug, Clone, PartialEq)]
pub struct Arr {
    pub data: Vec<f64>,
    pub shape: Vec<usize>,
}

impl Arr {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The array as usize values (timesteps), failing on anything that is not a non-negative integer.
    pub fn to_usize(&self) -> Result<Vec<usize>> {
        self.data
            .iter()
            .map(|&v| {
                if v >= 0.0 && v.fract() == 0.0 && v < 1e15 {
                    Ok(v as usize)
                } else {
                    Err(anyhow!("{v} is not a non-negative integer"))
                }
            })
            .collect()
    }

    /// Sub-array `i` along the first axis.
    pub fn row(&self, i: usize) -> Arr {
        let inner: usize = self.shape[1..].iter().product();
        Arr {
            data: self.data[i * inner..(i + 1) * inner].to_vec(),
            shape: self.shape[1..].to_vec(),
        }
    }
}

fn parse_array(v: &Value) -> Result<Arr> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(a) = cur {
        shape.push(a.len());
        match a.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    let mut data = Vec::with_capacity(shape.iter().product());
    fn walk(v: &Value, depth: usize, shape: &[usize], out: &mut Vec<f64>) -> Result<()> {
        match v {
            Value::Array(a) => {
                if depth >= shape.len() || a.len() != shape[depth] {
                    bail!("ragged array");
                }
                for c in a {
                    walk(c, depth + 1, shape, out)?;
                }
                Ok(())
            }
            Value::Number(n) => {
                if depth != shape.len() {
                    bail!("ragged array");
                }
                out.push(
                    n.as_f64()
                        .ok_or_else(|| anyhow!("number {n} is not an f64"))?,
                );
                Ok(())
            }
            other => bail!("non-numeric array element {other}"),
        }
    }
    walk(v, 0, &shape, &mut data)?;
    Ok(Arr { data, shape })
}

/// The `shapes` table of one scope (a case, or the top level for arrays outside `cases`).
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    /// Full path of the scope root (e.g. `cases[2]`, or empty for the top level).
    pub root: &'a str,
    pub shapes: Option<&'a Map<String, Value>>,
}

/// A tracked position in a document.
#[derive(Clone)]
pub struct J<'a> {
    pub v: &'a Value,
    /// Path relative to the scope root (the key format of the `shapes` tables).
    pub rel: String,
    pub scope: Scope<'a>,
    pub tr: &'a Tracker,
}

impl<'a> J<'a> {
    pub fn root(v: &'a Value, scope: Scope<'a>, tr: &'a Tracker) -> Self {
        J {
            v,
            rel: String::new(),
            scope,
            tr,
        }
    }

    /// Full path from the document root.
    pub fn full(&self) -> String {
        match (self.scope.root.is_empty(), self.rel.is_empty()) {
            (true, _) => self.rel.clone(),
            (false, true) => self.scope.root.to_string(),
            (false, false) => format!("{}.{}", self.scope.root, self.rel),
        }
    }

    fn mark(&self) {
        self.tr.mark(&self.full());
    }

    pub fn has(&self, key: &str) -> bool {
        self.v.get(key).is_some()
    }

    pub fn get(&self, key: &str) -> Result<J<'a>> {
        let v = self
            .v
            .as_object()
            .ok_or_else(|| anyhow!("{} is not an object", self.full()))?
            .get(key)
            .ok_or_else(|| anyhow!("missing field {}", join(&self.full(), key)))?;
        Ok(J {
            v,
            rel: join(&self.rel, key),
            scope: self.scope,
            tr: self.tr,
        })
    }

    pub fn keys(&self) -> Result<Vec<String>> {
        Ok(self
            .v
            .as_object()
            .ok_or_else(|| anyhow!("{} is not an object", self.full()))?
            .keys()
            .cloned()
            .collect())
    }

    /// Elements of an array of objects.
    pub fn items(&self) -> Result<Vec<J<'a>>> {
        let a = self
            .v
            .as_array()
            .ok_or_else(|| anyhow!("{} is not an array", self.full()))?;
        Ok(a.iter()
            .enumerate()
            .map(|(i, v)| J {
                v,
                rel: format!("{}[{i}]", self.rel),
                scope: self.scope,
                tr: self.tr,
            })
            .collect())
    }

    pub fn f64(&self) -> Result<f64> {
        let x = self
            .v
            .as_f64()
            .ok_or_else(|| anyhow!("{} is not a number", self.full()))?;
        self.mark();
        Ok(x)
    }

    pub fn i64(&self) -> Result<i64> {
        let x = self
            .v
            .as_i64()
            .ok_or_else(|| anyhow!("{} is not an integer", self.full()))?;
        self.mark();
        Ok(x)
    }

    pub fn usize(&self) -> Result<usize> {
        let x = self
            .v
            .as_u64()
            .ok_or_else(|| anyhow!("{} is not a non-negative integer", self.full()))?;
        self.mark();
        Ok(x as usize)
    }

    pub fn bool(&self) -> Result<bool> {
        let x = self
            .v
            .as_bool()
            .ok_or_else(|| anyhow!("{} is not a bool", self.full()))?;
        self.mark();
        Ok(x)
    }

    pub fn str(&self) -> Result<&'a str> {
        let x = self
            .v
            .as_str()
            .ok_or_else(|| anyhow!("{} is not a string", self.full()))?;
        self.mark();
        Ok(x)
    }

    /// Marks a leaf as read without interpreting it (only for descriptive metadata).
    pub fn note(&self) {
        self.mark();
    }

    /// A numeric array, checked against the scope's `shapes` entry (which must exist).
    pub fn arr(&self) -> Result<Arr> {
        let a = parse_array(self.v).with_context(|| format!("reading {}", self.full()))?;
        let shapes = self
            .scope
            .shapes
            .ok_or_else(|| anyhow!("no shapes table for {}", self.full()))?;
        let declared = shapes
            .get(&self.rel)
            .ok_or_else(|| anyhow!("shapes has no entry for {}", self.full()))?;
        let declared = parse_array(declared)
            .and_then(|d| d.to_usize())
            .with_context(|| format!("shapes entry of {}", self.full()))?;
        if declared != a.shape {
            bail!(
                "{} has shape {:?} but shapes declares {:?}",
                self.full(),
                a.shape,
                declared
            );
        }
        self.tr
            .mark(&join(&join(self.scope.root, "shapes"), &self.rel));
        self.mark();
        Ok(a)
    }
}
