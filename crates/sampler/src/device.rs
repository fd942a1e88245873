//! `--device cpu | cuda | cuda:N`.

use candle_core::Device;

use crate::error::{Result, SamplerError};

/// The device a rank computes on. `cuda` picks the rank's local index (one GPU per rank on a node,
/// or ordinal 0 when the launcher gives each rank a single visible GPU).
pub fn select_device(spec: &str, local_rank: usize) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                return Err(SamplerError::Config(format!(
                    "--device {s}: this build has no CUDA support (build with --features cuda)"
                )));
            }
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| SamplerError::Config(format!("bad device {s:?}")))?,
                None => match std::env::var("CUDA_VISIBLE_DEVICES") {
                    Ok(v) if !v.contains(',') && !v.is_empty() => 0,
                    _ => local_rank,
                },
            };
            Ok(Device::new_cuda(ordinal)?)
        }
        other => Err(SamplerError::Config(format!(
            "unknown device {other:?} (expected cpu, cuda or cuda:N)"
        ))),
    }
}
