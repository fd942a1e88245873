//! Frechet distance in the feature space of a classifier trained on the dataset (not Inception),
//! and that classifier's accuracy on class-conditional samples.
//!
//! The features are the classifier's pooled representation evaluated at t = 0 (clean images); the
//! distance is computed between Gaussians fitted to the features of real and generated images
//! ([`crate::linalg::frechet_distance`]). Because the feature net is ours and small, numbers are only
//! comparable between runs that use the same classifier checkpoint; the metric name carries the
//! dataset ("FD-<dataset>-classifier") so it is never mistaken for Inception FID.

use candle_core::{DType, Device, Tensor};

use crate::denoiser::EncoderClassifier;
use crate::error::{Result, SamplerError};
use crate::images::from_uint8_nhwc;

/// A network giving features and class logits for clean images.
pub trait FeatureExtractor {
    /// `x` f32 `[B, C, H, W]` in [-1, 1] -> (`[B, D]` features, `[B, K]` logits).
    fn features(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;
    /// What the features are, for reports.
    fn describe(&self) -> String;
}

impl FeatureExtractor for EncoderClassifier {
    fn features(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = x.dim(0)?;
        let t = Tensor::zeros(b, DType::F32, x.device())?;
        let (f, logits) = self
            .net
            .forward_features(x, &t, &ddpm_unet::ForwardCtx::eval())?;
        Ok((f.flatten_from(1)?, logits))
    }

    fn describe(&self) -> String {
        "pooled features of the noise-aware classifier (EncoderUNet) at t = 0".into()
    }
}

/// Features (row-major `[N, D]` f32) and argmax predictions of uint8 NHWC images, in batches.
pub fn extract(
    net: &dyn FeatureExtractor,
    images: &[u8],
    n: usize,
    hwc: [usize; 3],
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, usize, Vec<u32>)> {
    let per = hwc.iter().product::<usize>();
    let mut feats = Vec::new();
    let mut preds = Vec::with_capacity(n);
    let mut dim = 0;
    for start in (0..n).step_by(batch.max(1)) {
        let m = batch.min(n - start);
        let x = from_uint8_nhwc(&images[start * per..(start + m) * per], m, hwc, device)?;
        let (f, logits) = net.features(&x)?;
        let (fb, d) = f.dims2()?;
        if fb != m {
            return Err(SamplerError::Model(format!(
                "feature net returned {fb} rows for {m} images"
            )));
        }
        dim = d;
        feats.extend(f.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        preds.extend(logits.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?);
    }
    Ok((feats, dim, preds))
}

/// Fraction of `preds` equal to `labels`, and per class `(correct, total)`.
pub fn accuracy(preds: &[u32], labels: &[u32], num_classes: usize) -> (f64, Vec<(usize, usize)>) {
    let mut per = vec![(0usize, 0usize); num_classes];
    let mut correct = 0;
    for (&p, &y) in preds.iter().zip(labels) {
        if let Some(e) = per.get_mut(y as usize) {
            e.1 += 1;
            if p == y {
                e.0 += 1;
            }
        }
        correct += usize::from(p == y);
    }
    (correct as f64 / preds.len().max(1) as f64, per)
}
