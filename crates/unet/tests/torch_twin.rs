//! The candle U-Net against an independent PyTorch implementation of the same architecture
//! (`bench/pytorch/unet_bench.py`). `tests/data/torch_tiny.safetensors` was written by
//! `unet_bench.py --export FILE --export-model tiny`: random non-zero weights under improved-diffusion's
//! parameter names, an input batch (`io.x`, `io.t`, `io.y`) and PyTorch's eval-mode output
//! (`io.out`); its metadata holds the config.

use candle_core::{DType, Device, Tensor};
use ddpm_unet::{load_checked, ForwardCtx, UNet, UNetConfig};
use std::path::Path;

#[test]
fn matches_pytorch_twin_with_the_same_parameter_names() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch_tiny.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cfg: UNetConfig =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["config"]).unwrap();
    assert_eq!(cfg.num_classes, Some(3));
    assert!(cfg.learn_sigma && cfg.use_scale_shift_norm && cfg.num_head_channels.is_some());
    let (model, varmap) = UNet::init(&cfg, 0, DType::F64, &Device::Cpu).unwrap();
    // Every parameter name and shape must match exactly; the io.* entries are taken as they are.
    let file = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let mut expected: Vec<(String, Vec<usize>)> = model
        .named_parameters()
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    for io in ["io.x", "io.t", "io.y", "io.out"] {
        expected.push((io.to_string(), file[io].dims().to_vec()));
    }
    let data = load_checked(&path, &expected, &Device::Cpu).unwrap();
    for (n, _) in model.named_parameters() {
        varmap.data().lock().unwrap()[n]
            .set(&data[n].to_dtype(DType::F64).unwrap())
            .unwrap();
    }
    let x = data["io.x"].to_dtype(DType::F64).unwrap();
    let y = data["io.y"].to_dtype(DType::U32).unwrap();
    let out = model
        .forward(&x, &data["io.t"], Some(&y), &ForwardCtx::eval())
        .unwrap();
    let want = data["io.out"].to_dtype(DType::F64).unwrap();
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let err = max(&(&out - &want).unwrap());
    let scale = max(&want);
    eprintln!("candle (f64) vs PyTorch (f32): max abs diff {err:.2e}, output scale {scale:.2}");
    assert!(scale > 0.1, "the reference output is trivially small");
    // PyTorch ran in f32: agreement to f32 rounding of a ~20-layer network.
    assert!(err < 2e-5 * scale, "max abs diff {err}");
}
