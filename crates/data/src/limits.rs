//! Upper bounds on every size this crate reads from a file, checked before anything is allocated
//! from it.
//!
//! A size field in a file is a claim, not a fact: an 8 KB HDF5 file can declare `N = 2^40` images
//! (chunks that were never written read as zeros), a 10 MB gzip can inflate to 20 GB, a PNG header can
//! say 1 x 65535. Each reader compares such a claim with the bound here (and, where it can, with the
//! bytes actually present) and rejects the file with an error naming it and the field. The values are
//! far above every dataset DDPM work uses, and low enough that the allocation each one permits fits in
//! the memory of a training node. crates/data/README.md lists them with the same reasons.

/// Examples in one dataset file (N). 2^31 is 1600x ImageNet-1k (1.28M) and 700x LSUN bedroom (3M).
/// The loader keeps an 8-byte permutation entry and a 4-byte label per example, so a file at the bound
/// costs 24 GiB per rank; the HDF5 check that every chunk of `images` is actually stored ties N to the
/// file's size long before that.
pub const MAX_EXAMPLES: u64 = 1 << 31;

/// Image height and width in the dataset format and of converter output. DDPM-family models train at
/// 1024 px or less; one 4096 x 4096 x 3 image is 48 MiB of uint8 and 192 MiB as f32 in a batch.
pub const MAX_SIDE: u64 = 4096;

/// Channels allowed in the dataset format: grey or RGB.
pub const CHANNELS: [u64; 2] = [1, 3];

/// Bytes of one uncompressed HDF5 chunk of `images` (K * H * W * C). The converters write 64 KiB
/// chunks; 64 MiB still holds one image at [`MAX_SIDE`] (48 MiB). The loader and `inspect` hold one
/// chunk at a time outside the loader's byte-budgeted cache.
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;

/// Classes (`num_classes`, `class_names`). ImageNet-21k has 21841.
pub const MAX_CLASSES: u64 = 1 << 20;

/// Bytes of one class name or of the `source` attribute.
pub const MAX_STRING_BYTES: u64 = 64 << 10;

/// Bytes of the element data of one IDX file (after decompression). The converter holds it in memory;
/// the largest IDX data sets (EMNIST, ~0.7 GB) are far below.
pub const MAX_IDX_BYTES: u64 = 4 << 30;

/// Pixels of one input image of the folder converter, from its header, checked before decoding
/// (64 Mpx, e.g. 8192 x 8192; decoded RGBA16 that is 512 MiB).
pub const MAX_INPUT_PIXELS: u64 = 1 << 26;

/// Longer side / shorter side of an input image of the folder converter. Resizing the shorter side to
/// R makes the longer one ratio * R, so the ratio bounds the resize buffers: 1 x 65535 at R = 256 would
/// need a 256 x 16.7M image (13 GB). Photographs and 3:1 panoramas are well inside.
pub const MAX_ASPECT_RATIO: u64 = 8;

/// Bytes the folder converter may hold for one image at once (decode, resize buffers, crop), from
/// the header before decoding.
pub const MAX_IMAGE_WORK_BYTES: u64 = 1 << 30;

/// Bytes of images the folder converter decodes in parallel at once (the sum of the per-image
/// work estimates of one block); the block is never smaller than one image.
pub const MAX_DECODE_BLOCK_BYTES: u64 = 2 << 30;

/// Bytes of the preview grid canvas of `ddpm-data inspect --grid` (RGB).
pub const MAX_GRID_BYTES: u64 = 256 << 20;

/// Bytes of a small text side file (CIFAR-10 `batches.meta.txt`).
pub const MAX_TEXT_FILE_BYTES: u64 = 1 << 20;
