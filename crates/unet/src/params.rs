//! Parameters: creation with reproducible initial values, recording of names, and safetensors
//! save/load that refuses mismatching files.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

use crate::error::{Result, UNetError};

/// Stream tag for parameter initialisation. Kept clear of `ddpm_rng::Stream` values (1..=6 and
/// `0x1000 + layer` for dropout) so initial weights never correlate with training noise.
pub const INIT_STREAM: u32 = 0x2000_0000;

/// Wraps a `VarBuilder` and remembers every parameter it hands out, in creation order, so a model
/// can list its own parameters (for counting, summaries, optimisers) without owning the `VarMap`.
#[derive(Clone)]
pub struct ParamBuilder<'a> {
    vb: VarBuilder<'a>,
    record: Rc<RefCell<Vec<(String, Tensor)>>>,
}

impl<'a> ParamBuilder<'a> {
    pub fn new(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            record: Rc::new(RefCell::new(Vec::new())),
        }
    }

    /// A builder whose names are prefixed with `name.`.
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            record: self.record.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let t = self.vb.get_with_hints(shape, name, init)?;
        let prefix = self.vb.prefix();
        let full = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        self.record.borrow_mut().push((full, t.clone()));
        Ok(t)
    }

    /// The parameters recorded so far by this builder and all its prefixed copies.
    pub fn recorded(&self) -> Vec<(String, Tensor)> {
        self.record.borrow().clone()
    }
}

/// A `VarBuilder` backend that creates missing variables in a `VarMap` with values drawn from
/// ddpm-rng, keyed by `(seed, parameter name)`. Unlike candle's thread-RNG initialisers, the same
/// seed gives the same model on every rank and device, and adding a layer does not change the
/// initial values of the others.
pub struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

impl SeededInit {
    pub fn var_builder(
        varmap: &VarMap,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Self {
                varmap: varmap.clone(),
                seed,
            }),
            dtype,
            device.clone(),
        )
    }
}

/// FNV-1a: a stable 64-bit hash of a parameter name (std's hasher is not stable across releases).
pub fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Draws the initial values of one parameter.
pub fn seeded_values(seed: u64, name: &str, shape: &Shape, init: Init) -> Vec<f64> {
    let n = shape.elem_count();
    let key = ddpm_rng::StreamKey {
        seed,
        stream: INIT_STREAM,
        step: 0,
        example: name_hash(name),
    };
    let uniform = |lo: f64, up: f64| {
        let mut u = vec![0f32; n];
        key.fill_uniform(&mut u);
        u.into_iter()
            .map(|u| lo + (up - lo) * u as f64)
            .collect::<Vec<_>>()
    };
    let normal = |mean: f64, std: f64| {
        let mut z = vec![0f32; n];
        key.fill_normal(&mut z);
        z.into_iter()
            .map(|z| mean + std * z as f64)
            .collect::<Vec<_>>()
    };
    match init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(lo, up),
        Init::Randn { mean, stdev } => normal(mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(-b, b)
                }
                candle_nn::init::NormalOrUniform::Normal => normal(0.0, std),
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("VarMap lock poisoned");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let values = seeded_values(self.seed, name, &s, h);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .contains_key(name)
    }
}

/// Serialises named tensors, sorted by name so identical models give identical bytes; `path` is
/// only named in the error.
pub fn safetensors_bytes(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let sorted: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::tensor::serialize(sorted, metadata).map_err(|e| UNetError::SafeTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes named tensors ([`safetensors_bytes`]) to a file atomically (ddpm-io), so a crash never
/// leaves a truncated file under the final name.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors_bytes(path, tensors, metadata)?;
    ddpm_io::write_atomic(path, &bytes).map_err(|source| UNetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Saves every variable of `varmap`.
pub fn save_varmap(
    path: &Path,
    varmap: &VarMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let tensors: Vec<(String, Tensor)> = data
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    save_safetensors(path, &tensors, metadata)
}

/// Reads a safetensors file into memory, checks it against `expected` names and shapes, and
/// returns the tensors (in their file dtype) on `device`. Every missing, extra, or mis-shaped
/// tensor is reported in one error.
pub fn load_checked(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    let bytes = std::fs::read(path).map_err(|source| UNetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| UNetError::SafeTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let in_file: HashMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, shape) in expected {
        match in_file.get(name) {
            None => missing.push(name.clone()),
            Some(s) if s != shape => mismatched.push((name.clone(), shape.clone(), s.clone())),
            Some(_) => {}
        }
    }
    let want: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<String> = in_file
        .keys()
        .filter(|n| !want.contains(n.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    if !missing.is_empty() || !mismatched.is_empty() || !unexpected.is_empty() {
        return Err(UNetError::Checkpoint {
            path: path.to_path_buf(),
            missing,
            mismatched,
            unexpected,
        });
    }
    let mut out = HashMap::new();
    for (name, _) in expected {
        let view = st.tensor(name).map_err(|e| UNetError::SafeTensors {
            path: path.to_path_buf(),
            message: format!("{name}: {e}"),
        })?;
        out.insert(name.clone(), view.load(device)?);
    }
    Ok(out)
}

/// Loads a checkpoint into the variables of `varmap` (converting dtype as needed). The file must
/// hold exactly the variables of the map with the same shapes; otherwise nothing is changed and
/// the error lists every problem by name.
pub fn load_varmap(path: &Path, varmap: &VarMap) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut expected: Vec<(String, Vec<usize>)> = data
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    expected.sort();
    let device = data
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let loaded = load_checked(path, &expected, &device)?;
    for (name, var) in data.iter() {
        let t = loaded[name].to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
