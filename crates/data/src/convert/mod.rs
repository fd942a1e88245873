//! Converters from common distribution formats into the dataset format of [`crate::format`].
//!
//! Each converter streams images into a [`DatasetWriter`] in a fixed, documented order, so converting
//! the same input twice gives the same file contents, and example `i` of the output can be traced back
//! to its source record.

mod cifar10;
mod folder;
mod idx_pair;

pub use cifar10::{
    cifar10_files, cifar10_records, convert_cifar10, read_cifar10_batch, CIFAR10_CLASSES,
};
pub use folder::{center_crop_resize, convert_folder, load_image, probe_image, FolderOptions};
pub use idx_pair::{
    convert_fashion_mnist, convert_idx, fashion_mnist_files, IdxInput, FASHION_MNIST_CLASSES,
};

use std::path::PathBuf;

/// Which half of a dataset with an official train/test split to convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split {other:?}, expected train or test")),
        }
    }
}

/// What a converter wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertSummary {
    pub out: PathBuf,
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub num_classes: Option<usize>,
    pub chunk_images: usize,
}

impl std::fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {}: {} images of {}x{}x{} (HxWxC), {}, {} images per chunk",
            self.out.display(),
            self.n,
            self.height,
            self.width,
            self.channels,
            match self.num_classes {
                Some(k) => format!("{k} classes"),
                None => "unlabelled".to_string(),
            },
            self.chunk_images
        )
    }
}
