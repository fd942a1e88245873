//! HDF5 image datasets for ddpm-rs: the on-disk format, converters into it, and the rank-sharded
//! streaming loader that feeds training.
//!
//! - [`format`]: the documented file layout and [`Hdf5Dataset`], its validating reader.
//! - [`convert`]: Fashion-MNIST / MNIST IDX, CIFAR-10 binary, and folder-of-classes converters, all
//!   writing through the atomic [`DatasetWriter`].
//! - [`plan`]: the per-epoch permutation and the rank sharding ([`shard_plan`]), pure functions every
//!   rank evaluates on its own.
//! - [`fingerprint`]: [`DatasetFingerprint`], what identifies a dataset's content across ranks and
//!   resumptions.
//! - [`limits`]: the bounds on every size read from a file.
//! - [`probe`]: every HDF5 file is first read by a child process, so a file that crashes libhdf5
//!   is an error naming it, not a dead process.
//! - [`loader`]: [`Loader`], a background thread that turns the plan into f32 NCHW batches.
//!
//! The `ddpm-data` binary (`convert`, `inspect`, `shard-plan`) is a thin CLI over these.

pub mod cache;
pub mod convert;
pub mod decode;
pub mod error;
pub mod fingerprint;
pub mod format;
pub mod idx;
pub mod inspect;
pub mod limits;
pub mod loader;
pub mod plan;
pub mod probe;
pub mod progress;
pub mod writer;

pub use error::{DataError, Result};
pub use fingerprint::DatasetFingerprint;
pub use format::Hdf5Dataset;
pub use loader::{
    Batch, BatchAssembler, DatasetInfo, Loader, LoaderConfig, LoaderOptions, LoaderPosition,
};
pub use plan::{batches_per_epoch, epoch_permutation, flip_decision, shard_plan};
pub use writer::{DatasetMeta, DatasetWriter, WriteOptions};
