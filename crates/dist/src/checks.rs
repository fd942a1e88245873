//! Start-up agreement between ranks, and the per-step flags they must agree on.

use candle_core::{DType, Tensor};

use crate::error::{DistError, Result};
use crate::Communicator;

/// A short, readable stand-in for a value: in full when small (a hash), else its length and an FNV-1a
/// digest.
fn describe_value(b: &[u8]) -> String {
    if b.is_empty() {
        return "<empty>".into();
    }
    if b.len() <= 32 {
        return b.iter().map(|x| format!("{x:02x}")).collect();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h = (h ^ x as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{} bytes, digest {h:016x}", b.len())
}

fn rank_list(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Errors, identically on every rank, unless every rank passes the same bytes. Collective.
///
/// The error names the groups of ranks that agree with each other and the ranks that differ from
/// rank 0, so a job started with a stale config on one node says which.
pub fn check_same_fingerprint(comm: &dyn Communicator, what: &str, mine: &[u8]) -> Result<()> {
    let all = comm.all_gather_bytes(mine)?;
    if all.iter().all(|x| *x == all[0]) {
        return Ok(());
    }
    let mut groups: Vec<(&[u8], Vec<usize>)> = Vec::new();
    for (r, v) in all.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| *g == v.as_slice()) {
            Some((_, ranks)) => ranks.push(r),
            None => groups.push((v.as_slice(), vec![r])),
        }
    }
    let differing: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
    let detail = groups
        .iter()
        .map(|(v, ranks)| format!("rank(s) {}: {}", rank_list(ranks), describe_value(v)))
        .collect::<Vec<_>>()
        .join("; ");
    Err(DistError::Mismatch(format!(
        "ranks disagree on the {what}: rank(s) {} differ from rank 0 ({detail})",
        rank_list(&differing)
    )))
}

/// All ranks must train the same configuration: pass the hash of the resolved config (a sha256 as
/// `[u8; 32]`, or a `u64` as `&h.to_le_bytes()`). Collective; a mismatch is an error on every rank.
pub fn check_same_config(comm: &dyn Communicator, hash: &[u8]) -> Result<()> {
    check_same_fingerprint(comm, "config hash", hash).map_err(|e| match e {
        DistError::Mismatch(m) => DistError::Mismatch(format!(
            "{m}. Every rank must run the same config file with the same --set overrides"
        )),
        other => other,
    })
}

/// True on every rank when `local` is true on any rank. Collective; one small all-reduce.
pub fn any_true(comm: &dyn Communicator, local: bool) -> Result<bool> {
    let mut flag = [local as u64];
    comm.all_reduce_max_u64(&mut flag)?;
    Ok(flag[0] != 0)
}

/// Whether any rank saw a non-finite loss or gradient this step, so every rank skips the same steps
/// and the replicas stay identical. Collective.
pub fn any_non_finite(comm: &dyn Communicator, local_non_finite: bool) -> Result<bool> {
    any_true(comm, local_non_finite)
}

fn tensor_line(t: &Tensor) -> String {
    format!("{:?}{:?}", t.dtype(), t.dims())
}

/// Errors on every rank unless all ranks hold tensors of the same dtypes and shapes, naming the first
/// tensor that differs. Collective.
pub fn check_same_tensor_shapes(comm: &dyn Communicator, tensors: &[Tensor]) -> Result<()> {
    let mine: Vec<String> = tensors.iter().map(tensor_line).collect();
    let all = comm.all_gather_bytes(mine.join("\n").as_bytes())?;
    if all.iter().all(|x| *x == all[0]) {
        return Ok(());
    }
    let lines: Vec<Vec<String>> = all
        .iter()
        .map(|b| {
            String::from_utf8_lossy(b)
                .split('\n')
                .map(str::to_string)
                .collect()
        })
        .collect();
    let mut parts = Vec::new();
    for (r, l) in lines.iter().enumerate().skip(1) {
        if all[r] == all[0] {
            continue;
        }
        let (a, b) = (&lines[0], l);
        let i = (0..a.len().max(b.len()))
            .find(|&i| a.get(i) != b.get(i))
            .unwrap_or(0);
        let show = |x: Option<&String>| x.cloned().unwrap_or_else(|| "<none>".into());
        parts.push(format!(
            "rank {r} has {} tensors vs {} on rank 0; first difference at tensor {i}: rank 0 {}, rank {r} {}",
            b.len(),
            a.len(),
            show(a.get(i)),
            show(b.get(i))
        ));
    }
    Err(DistError::Mismatch(format!(
        "ranks disagree on the parameter shapes and dtypes: {}",
        parts.join("; ")
    )))
}

/// Copies `root`'s tensors to every rank (the initial parameters, so all replicas start identical).
/// Returns tensors on the devices the inputs were on; `root` gets its own tensors back. Collective.
///
/// Shapes and dtypes are checked first, so ranks built with different models get a clear error on
/// every rank. f32 and f64 tensors only. Data travels through host memory.
pub fn broadcast_tensors(
    comm: &dyn Communicator,
    tensors: &[Tensor],
    root: usize,
) -> Result<Vec<Tensor>> {
    check_same_tensor_shapes(comm, tensors)?;
    if comm.world_size() == 1 {
        return Ok(tensors.to_vec());
    }
    let is_root = comm.rank() == root;
    let mut out = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        match t.dtype() {
            DType::F32 => {
                let mut v = if is_root {
                    t.flatten_all()?.to_vec1::<f32>()?
                } else {
                    vec![0f32; t.elem_count()]
                };
                comm.broadcast_f32(&mut v, root)?;
                out.push(if is_root {
                    t.clone()
                } else {
                    Tensor::from_vec(v, t.shape(), t.device())?
                });
            }
            DType::F64 => {
                let mut bytes: Vec<u8> = if is_root {
                    t.flatten_all()?
                        .to_vec1::<f64>()?
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect()
                } else {
                    Vec::new()
                };
                comm.broadcast_bytes(&mut bytes, root)?;
                let v: Vec<f64> = bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                out.push(if is_root {
                    t.clone()
                } else {
                    Tensor::from_vec(v, t.shape(), t.device())?
                });
            }
            other => {
                return Err(DistError::Gradient {
                    index: i,
                    message: format!("broadcast_tensors: dtype {other:?} is not supported"),
                })
            }
        }
    }
    Ok(out)
}
