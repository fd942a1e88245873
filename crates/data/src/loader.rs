//! The rank-sharded streaming loader.
//!
//! Each rank runs one [`Loader`] over the same file. A background thread follows the plan of
//! [`crate::plan`] (identical on every rank, computed locally), reads whole HDF5 chunks through a
//! [`ChunkCache`], decodes to f32 NCHW in [-1, 1] with seeded flips, and keeps up to `prefetch` batches
//! ready in a bounded channel, so a training step finds its next batch waiting and the thread can never
//! run ahead by more than that.
//!
//! The loader never ends: after the last full global batch of an epoch it continues with batch 0 of the
//! next epoch (new permutation, new flips). [`Loader::position`] is the position of the batch the next
//! [`Loader::next_batch`] returns; a loader created from a saved position continues with exactly that
//! batch, bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvError};
use serde::{Deserialize, Serialize};

use crate::cache::ChunkCache;
use crate::decode::{decode_into, lut};
use crate::error::{DataError, Result};
use crate::format::{Hdf5Dataset, IMAGES};
use crate::plan::{
    batches_per_epoch, check_shard_args, epoch_permutation, flip_decision, rank_block,
};

/// What one rank loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    pub path: PathBuf,
    /// Number of ranks sharing the epoch.
    pub world: usize,
    /// This rank, `0..world`.
    pub rank: usize,
    /// Examples per batch on this rank (the global batch is `world * batch`).
    pub batch: usize,
    /// Seeds the epoch permutations and the flips.
    pub seed: u64,
    /// Random horizontal flips (see [`crate::plan::flip_decision`]).
    pub flip: bool,
    /// Batches kept ready ahead of the consumer (0: the thread hands over each batch as it finishes).
    pub prefetch: usize,
}

/// Tuning knobs that do not change which data a rank sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Memory for decompressed chunks, per loader.
    pub cache_bytes: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 256 << 20,
        }
    }
}

/// Where a loader is: the *next* batch to deliver. `batch_index` counts global batches within the epoch
/// (the same on every rank), so a position is only meaningful for the same `world * batch`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub batch_index: u64,
}

impl LoaderPosition {
    /// The position after this one, rolling over to the next epoch.
    pub fn advance(self, batches_per_epoch: u64) -> Self {
        if self.batch_index + 1 >= batches_per_epoch {
            Self {
                epoch: self.epoch + 1,
                batch_index: 0,
            }
        } else {
            Self {
                epoch: self.epoch,
                batch_index: self.batch_index + 1,
            }
        }
    }
}

/// One rank's batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// f32 NCHW in [-1, 1].
    pub images: Vec<f32>,
    /// `[batch, C, H, W]`.
    pub shape: [usize; 4],
    /// Class labels when the file has them.
    pub labels: Option<Vec<u32>>,
    /// Dataset index of each example.
    pub indices: Vec<u64>,
    pub epoch: u64,
    /// Global batch index within the epoch.
    pub batch_index: u64,
}

/// Shape and classes of the file a loader reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    pub path: PathBuf,
    pub len: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub num_classes: Option<usize>,
    pub class_names: Vec<String>,
}

/// Builds batches synchronously; the [`Loader`] runs one on its thread. Public so benches and tools can
/// measure or use the assembly without the thread.
pub struct BatchAssembler {
    ds: Hdf5Dataset,
    cfg: LoaderConfig,
    cache: ChunkCache,
    perm: Option<(u64, Vec<u64>)>,
    labels: Option<Vec<u32>>,
    lut: [f32; 256],
    batches_per_epoch: u64,
}

impl BatchAssembler {
    /// Opens and validates the file and the sharding arguments.
    pub fn new(cfg: LoaderConfig, opts: LoaderOptions) -> Result<Self> {
        let ds = Hdf5Dataset::open(&cfg.path)?;
        let n = ds.len() as u64;
        check_shard_args(n, cfg.world, cfg.rank, cfg.batch).map_err(|what| {
            if cfg.world >= 1 && cfg.rank < cfg.world && cfg.batch >= 1 {
                // The data is too small for the job: that is a property of the file.
                DataError::dataset(&cfg.path, IMAGES, what)
            } else {
                DataError::Config(what)
            }
        })?;
        let labels = ds
            .labels_slice()
            .map(|l| l.iter().map(|&y| y as u32).collect());
        let batches_per_epoch = batches_per_epoch(n, cfg.world, cfg.batch);
        Ok(Self {
            ds,
            cache: ChunkCache::new(opts.cache_bytes),
            cfg,
            perm: None,
            labels,
            lut: lut(),
            batches_per_epoch,
        })
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    pub fn dataset(&self) -> &Hdf5Dataset {
        &self.ds
    }

    pub fn info(&self) -> DatasetInfo {
        DatasetInfo {
            path: self.ds.path().to_path_buf(),
            len: self.ds.len(),
            height: self.ds.height(),
            width: self.ds.width(),
            channels: self.ds.channels(),
            num_classes: self.ds.num_classes(),
            class_names: self.ds.class_names().to_vec(),
        }
    }

    fn check_position(&self, pos: LoaderPosition) -> Result<()> {
        if pos.batch_index >= self.batches_per_epoch {
            return Err(DataError::Config(format!(
                "loader position batch {} of epoch {} is past the {} batches per epoch of {} (world {} x batch {}); \
                 was the run resumed with a different world size or batch size?",
                pos.batch_index,
                pos.epoch,
                self.batches_per_epoch,
                self.cfg.path.display(),
                self.cfg.world,
                self.cfg.batch
            )));
        }
        Ok(())
    }

    /// Indices this rank reads at `pos`.
    pub fn indices(&mut self, pos: LoaderPosition) -> Vec<u64> {
        if self.perm.as_ref().map(|(e, _)| *e) != Some(pos.epoch) {
            self.perm = Some((
                pos.epoch,
                epoch_permutation(self.ds.len() as u64, self.cfg.seed, pos.epoch),
            ));
        }
        let perm = &self.perm.as_ref().expect("just set").1;
        rank_block(
            perm,
            self.cfg.world,
            self.cfg.rank,
            self.cfg.batch,
            pos.batch_index,
        )
        .to_vec()
    }

    /// The batch at `pos`. Chunks are visited one at a time (in chunk order) and each is decoded into
    /// every output slot that needs it before the next is fetched, so besides the byte-budgeted cache
    /// at most one chunk (<= [`crate::limits::MAX_CHUNK_BYTES`]) is held, whatever the batch size.
    pub fn assemble(&mut self, pos: LoaderPosition) -> Result<Batch> {
        self.check_position(pos)?;
        let indices = self.indices(pos);
        let k = self.ds.chunk_images();
        let (h, w, ch) = (self.ds.height(), self.ds.width(), self.ds.channels());
        let ib = h * w * ch;
        let mut images = vec![0f32; indices.len() * ib];
        let mut order: Vec<(usize, usize)> = indices
            .iter()
            .enumerate()
            .map(|(slot, &i)| (i as usize / k, slot))
            .collect();
        order.sort_unstable();
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let c = group[0].0;
            let data = match self.cache.get(c) {
                Some(d) => d,
                None => {
                    let d = Arc::new(self.ds.read_chunk(c)?);
                    self.cache.insert(c, d.clone());
                    d
                }
            };
            for &(_, slot) in group {
                let i = indices[slot];
                let off = (i as usize % k) * ib;
                let flip = self.cfg.flip && flip_decision(self.cfg.seed, pos.epoch, i);
                let out = &mut images[slot * ib..(slot + 1) * ib];
                decode_into(&data[off..off + ib], h, w, ch, flip, &self.lut, out);
            }
        }
        let labels = self
            .labels
            .as_ref()
            .map(|l| indices.iter().map(|&i| l[i as usize]).collect());
        Ok(Batch {
            images,
            shape: [indices.len(), ch, h, w],
            labels,
            indices,
            epoch: pos.epoch,
            batch_index: pos.batch_index,
        })
    }
}

/// Background-thread loader for one rank.
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    next: LoaderPosition,
    batches_per_epoch: u64,
    info: DatasetInfo,
    failed: Option<String>,
    waited: Duration,
}

impl Loader {
    /// Validates the file and arguments here (so errors surface immediately, on the caller's thread),
    /// then starts the reader thread at `start`.
    pub fn new(cfg: LoaderConfig, start: LoaderPosition) -> Result<Self> {
        Self::with_options(cfg, start, LoaderOptions::default())
    }

    pub fn with_options(
        cfg: LoaderConfig,
        start: LoaderPosition,
        opts: LoaderOptions,
    ) -> Result<Self> {
        let mut asm = BatchAssembler::new(cfg.clone(), opts)?;
        asm.check_position(start)?;
        let batches_per_epoch = asm.batches_per_epoch();
        let info = asm.info();
        let (tx, rx) = bounded::<Result<Batch>>(cfg.prefetch);
        let handle = std::thread::Builder::new()
            .name(format!("ddpm-data-r{}", cfg.rank))
            .spawn(move || {
                let _span = tracing::debug_span!("loader", rank = cfg.rank).entered();
                let mut pos = start;
                loop {
                    let item = asm.assemble(pos);
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return; // consumer gone, or error delivered: stop
                    }
                    pos = pos.advance(batches_per_epoch);
                }
            })
            .map_err(|e| DataError::Loader(format!("cannot start the reader thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
            next: start,
            batches_per_epoch,
            info,
            failed: None,
            waited: Duration::ZERO,
        })
    }

    /// The next batch of this rank. After an error every later call fails too (the thread has stopped).
    pub fn next_batch(&mut self) -> Result<Batch> {
        if let Some(msg) = &self.failed {
            return Err(DataError::Loader(format!(
                "stopped after an earlier error: {msg}"
            )));
        }
        let t0 = Instant::now();
        let got = self.rx.as_ref().expect("receiver lives until drop").recv();
        self.waited += t0.elapsed();
        match got {
            Ok(Ok(batch)) => {
                debug_assert_eq!(
                    (batch.epoch, batch.batch_index),
                    (self.next.epoch, self.next.batch_index)
                );
                self.next = self.next.advance(self.batches_per_epoch);
                Ok(batch)
            }
            Ok(Err(e)) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
            Err(RecvError) => {
                let why = match self.handle.take().map(|h| h.join()) {
                    Some(Err(panic)) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        format!("reader thread panicked: {msg}")
                    }
                    _ => "reader thread stopped unexpectedly".to_string(),
                };
                self.failed = Some(why.clone());
                Err(DataError::Loader(why))
            }
        }
    }

    /// Position of the batch the next [`Self::next_batch`] returns; save it to resume exactly.
    pub fn position(&self) -> LoaderPosition {
        self.next
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.info.path
    }

    /// Total time `next_batch` spent blocked waiting for the reader thread (0 when I/O is fully hidden).
    pub fn wait_time(&self) -> Duration {
        self.waited
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Disconnect first so a thread blocked on a full queue wakes up and exits, then reap it.
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
