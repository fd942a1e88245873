//! Counter-based normals as a tensor on any device.

use crate::noising::NoiseKey;
use crate::util::for_each_chunk;
use crate::KernelError;
use candle_core::{Device, Shape, Tensor};
use ddpm_rng::{box_muller4, StreamKey};

const OP: &str = "philox_normal";

/// A `[B, ...]` f32 tensor whose element `e` of example `i` is
/// `StreamKey { seed, stream, step, example: first_example + i }.normal(e)`; `stream` is a
/// `ddpm_rng::Stream` tag (`Stream::Sampler as u32` for a sampler's `x_T`). Drawn on the device itself
/// (no host round trip on a GPU), bit-identical across devices.
pub fn philox_normal(
    shape: impl Into<Shape>,
    stream: u32,
    key: NoiseKey,
    device: &Device,
) -> Result<Tensor, KernelError> {
    let shape: Shape = shape.into();
    let dims = shape.dims();
    if dims.is_empty() {
        return Err(KernelError::bad(OP, "shape needs a batch dimension"));
    }
    let b = dims[0];
    let n: usize = dims[1..].iter().product();
    if n >= 1 << 31 || b > u32::MAX as usize {
        return Err(KernelError::bad(OP, format!("shape {dims:?} is too large")));
    }
    match device {
        Device::Cpu => {
            let mut out = vec![0f32; b * n];
            for_each_chunk::<1, _>(&mut out, b, n, |i, e0, [o]| {
                let sk = StreamKey {
                    seed: key.seed,
                    stream,
                    step: key.step,
                    example: key.first_example.wrapping_add(i as u64),
                };
                for (k, o4) in o.chunks_mut(4).enumerate() {
                    let z = box_muller4(sk.block(((e0 / 4) + k) as u32));
                    o4.copy_from_slice(&z[..o4.len()]);
                }
            });
            Ok(Tensor::from_vec(out, shape, device)?)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => Ok(crate::cuda::philox_normal(dev, shape, stream, key)?),
        #[allow(unreachable_patterns)]
        other => Err(KernelError::bad(
            OP,
            format!(
                "no implementation for device {:?} in this build (feature `cuda` enables CUDA)",
                other.location()
            ),
        )),
    }
}
