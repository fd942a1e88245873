//! `ddpm-data`: convert datasets into the ddpm-rs HDF5 format, inspect them, print shard plans.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use ddpm_data::convert::{self, FolderOptions, IdxInput, Split};
use ddpm_data::plan::check_shard_args;
use ddpm_data::progress::bar;
use ddpm_data::{inspect, shard_plan, DataError, Hdf5Dataset, WriteOptions};

#[derive(Parser)]
#[command(
    name = "ddpm-data",
    version,
    about = "HDF5 image datasets for ddpm-rs: convert, inspect, shard plans"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a dataset into the ddpm-rs HDF5 format (written atomically).
    Convert(ConvertArgs),
    /// Print N, shape, classes with counts and pixel statistics; optionally write a preview grid.
    Inspect(InspectArgs),
    /// Print, one per line, the example indices rank R reads in epoch E (exactly the loader's order).
    ShardPlan(ShardPlanArgs),
    /// Print the content fingerprint (as training checks it) and what it cost: open (with the
    /// checking child on a file version not seen before) and fingerprint, in ms.
    Fingerprint(FingerprintArgs),
}

#[derive(Args)]
struct FingerprintArgs {
    file: PathBuf,
    /// Read every chunk in this process, ignoring the cache (the cost of a cache miss).
    #[arg(long)]
    recompute: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Source {
    /// Fashion-MNIST IDX files in DIR (Debian: /usr/share/datasets/fashion-mnist).
    FashionMnist,
    /// Any IDX image file (--images) with an optional IDX label file (--labels).
    MnistIdx,
    /// CIFAR-10 binary version in DIR (data_batch_*.bin, test_batch.bin).
    Cifar10,
    /// DIR/<class>/<image>.{png,jpg,jpeg}, resized and center-cropped to --resolution.
    Folder,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Test,
}

#[derive(Args)]
struct ConvertArgs {
    /// Input format.
    #[arg(long, value_enum)]
    from: Source,
    /// Input directory (fashion-mnist, cifar10, folder).
    dir: Option<PathBuf>,
    /// Which split to convert (fashion-mnist, cifar10).
    #[arg(long, value_enum)]
    split: Option<SplitArg>,
    /// IDX image file, .gz or plain (mnist-idx).
    #[arg(long)]
    images: Option<PathBuf>,
    /// IDX label file, .gz or plain (mnist-idx; omit for an unlabelled dataset).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Comma-separated class names (mnist-idx; default "0","1",...).
    #[arg(long, value_delimiter = ',')]
    class_names: Option<Vec<String>>,
    /// Number of classes when no names are given (mnist-idx; default largest label + 1).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Output side length in pixels (folder).
    #[arg(long)]
    resolution: Option<usize>,
    /// Store one grey channel instead of RGB (folder).
    #[arg(long)]
    grayscale: bool,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Images per HDF5 chunk (default: about 64 KiB per chunk).
    #[arg(long)]
    chunk_images: Option<usize>,
    /// Deflate level 1-9; 0 stores uncompressed.
    #[arg(long, default_value_t = 4)]
    deflate: u8,
}

#[derive(Args)]
struct InspectArgs {
    file: PathBuf,
    /// Write a PNG preview grid here.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Images per grid row.
    #[arg(long, default_value_t = 10)]
    grid_cols: usize,
}

#[derive(Args)]
struct ShardPlanArgs {
    file: PathBuf,
    #[arg(long)]
    world: usize,
    #[arg(long)]
    rank: usize,
    /// Per-rank batch size.
    #[arg(long)]
    batch: usize,
    #[arg(long)]
    epoch: u64,
    #[arg(long)]
    seed: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Convert(a) => run_convert(a),
        Cmd::Inspect(a) => run_inspect(a),
        Cmd::ShardPlan(a) => run_shard_plan(a),
        Cmd::Fingerprint(a) => run_fingerprint(a),
    };
    if let Err(e) = result {
        eprintln!("ddpm-data: error: {e:#}");
        std::process::exit(1);
    }
}

fn need_dir(dir: Option<PathBuf>, from: &str) -> Result<PathBuf> {
    dir.with_context(|| format!("--from {from} needs the input directory as an argument"))
}

fn need_split(split: Option<SplitArg>, from: &str) -> Result<Split> {
    match split {
        Some(SplitArg::Train) => Ok(Split::Train),
        Some(SplitArg::Test) => Ok(Split::Test),
        None => bail!("--from {from} needs --split train|test"),
    }
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    let opts = WriteOptions {
        chunk_images: a.chunk_images,
        deflate: if a.deflate == 0 {
            None
        } else {
            Some(a.deflate)
        },
    };
    let pb = bar(0, "converting");
    let summary = match a.from {
        Source::FashionMnist => {
            let dir = need_dir(a.dir, "fashion-mnist")?;
            let split = need_split(a.split, "fashion-mnist")?;
            convert::convert_fashion_mnist(&dir, split, &a.out, &opts, &pb)?
        }
        Source::MnistIdx => {
            let images = a
                .images
                .context("--from mnist-idx needs --images FILE (and usually --labels FILE)")?;
            if a.dir.is_some() {
                bail!("--from mnist-idx takes --images/--labels, not a directory");
            }
            let source = match &a.labels {
                Some(l) => format!("idx images {} labels {}", images.display(), l.display()),
                None => format!("idx images {} (unlabelled)", images.display()),
            };
            let input = IdxInput {
                images,
                labels: a.labels,
                class_names: a.class_names,
                num_classes: a.num_classes,
                source,
            };
            convert::convert_idx(&input, &a.out, &opts, &pb)?
        }
        Source::Cifar10 => {
            let dir = need_dir(a.dir, "cifar10")?;
            let split = need_split(a.split, "cifar10")?;
            convert::convert_cifar10(&dir, split, &a.out, &opts, &pb)?
        }
        Source::Folder => {
            let dir = need_dir(a.dir, "folder")?;
            let resolution = a.resolution.context("--from folder needs --resolution R")?;
            convert::convert_folder(
                &dir,
                &FolderOptions {
                    resolution,
                    grayscale: a.grayscale,
                },
                &a.out,
                &opts,
                &pb,
            )?
        }
    };
    println!("{summary}");
    Ok(())
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let ds = Hdf5Dataset::open(&a.file)?;
    let st = inspect::stats(&ds, &bar(ds.len() as u64, "reading"))?;
    println!("file:      {}", ds.path().display());
    println!("source:    {}", ds.source());
    println!("N:         {}", st.n);
    println!(
        "shape:     [{}, {}, {}, {}] (N, H, W, C) uint8",
        st.n, st.height, st.width, st.channels
    );
    println!(
        "chunks:    {} images per chunk, {} chunks, filters {:?}",
        ds.chunk_images(),
        ds.num_chunks(),
        ds.filters()
    );
    match (&st.class_counts, ds.num_classes()) {
        (Some(counts), Some(k)) => {
            println!("classes:   {k}");
            for (i, (name, count)) in ds.class_names().iter().zip(counts).enumerate() {
                println!("  {i:>4}  {name:<24} {count}");
            }
        }
        _ => println!("classes:   none (unlabelled)"),
    }
    println!("fingerprint: {}", st.fingerprint);
    println!("pixels (0..255):   mean {:.4}  std {:.4}", st.mean, st.std);
    if st.channels > 1 {
        for ch in 0..st.channels {
            println!(
                "  channel {ch}:      mean {:.4}  std {:.4}",
                st.channel_mean[ch], st.channel_std[ch]
            );
        }
    }
    println!(
        "model units [-1,1]: mean {:.4}  std {:.4}",
        st.mean / 127.5 - 1.0,
        st.std / 127.5
    );
    if let Some(out) = &a.grid {
        inspect::write_grid(&ds, out, a.grid_cols)?;
        println!("grid:      {}", out.display());
    }
    Ok(())
}

fn run_fingerprint(a: FingerprintArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let ds = Hdf5Dataset::open(&a.file)?;
    let opened = t.elapsed();
    let fp = if a.recompute {
        ddpm_data::fingerprint::compute(&ds)?
    } else {
        ds.fingerprint()?
    };
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!("fingerprint: {fp}");
    println!(
        "open {:.1} ms, fingerprint {:.1} ms{}",
        ms(opened),
        ms(t.elapsed() - opened),
        if a.recompute { " (recomputed)" } else { "" }
    );
    Ok(())
}

fn run_shard_plan(a: ShardPlanArgs) -> Result<()> {
    let ds = Hdf5Dataset::open(&a.file)?;
    let n = ds.len() as u64;
    if let Err(what) = check_shard_args(n, a.world, a.rank, a.batch) {
        if a.world >= 1 && a.rank < a.world && a.batch >= 1 {
            return Err(DataError::dataset(&a.file, ddpm_data::format::IMAGES, what).into());
        }
        bail!("{what}");
    }
    let plan = shard_plan(n, a.world, a.rank, a.batch, a.epoch, a.seed);
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for i in plan {
        if let Err(e) = writeln!(out, "{i}") {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(()); // e.g. `| head`
            }
            return Err(e).context("writing to stdout");
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}
