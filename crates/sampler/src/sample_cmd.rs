//! The `ddpm-sample` command: generate images from a trained checkpoint, on one process or across
//! MPI ranks (the binary is `src/bin/sample.rs`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use ddpm_config::TrainConfig;
use ddpm_dist::Communicator;

use crate::device::select_device;
use crate::error::Result;
use crate::images::{class_names, write_grid_png, write_samples_h5};
use crate::{
    generate, Checkpoint, CheckpointError, ClassifierGuidance, EdmChurn, EncoderClassifier,
    GenerateJob, Generated, Guidance, LabelPlan, Sampler, SamplerKind, SamplerSettings,
    ScoreSdeOptions, UNetDenoiser, Weights,
};

/// The options of `ddpm-sample` (see the binary's `--help`).
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Run directory (its newest valid checkpoint) or one checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// ddpm | ddim | dpm-solver | heun | sde | pc | edm. Default: ddim.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Steps: ddpm/ddim/sde/pc take improved-diffusion respacing strings ("ddim50", "250",
    /// "10,20,30"), "trailingN" or a number; dpm-solver, heun and edm a number. Defaults: ddpm/sde/pc
    /// all T, ddim 50 (a distilled student: its own "trailingN"), dpm-solver 20, heun/edm 18 noise levels.
    #[arg(long)]
    pub steps: Option<String>,
    /// Output HDF5 file (`images` uint8 [N,H,W,C], `labels`). Default: RUN/samples/<sampler>-<steps>.h5.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PNG grid of (up to --grid-max of) the images. Default: the output path with .png.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Write no grid.
    #[arg(long)]
    pub no_grid: bool,
    /// Most images in the grid (per class with --per-class: the first ones of each class).
    #[arg(long, default_value_t = 256)]
    pub grid_max: usize,
    /// Number of images. Default: 10 per class for a class-conditional model, 64 otherwise.
    #[arg(long)]
    pub num: Option<usize>,
    /// Generate only class K.
    #[arg(long, conflicts_with = "per_class")]
    pub class: Option<u32>,
    /// N images of every class (class k = images k*N .. (k+1)*N-1).
    #[arg(long)]
    pub per_class: Option<usize>,
    /// Classifier-free guidance weight w: eps = (1 + w) eps_cond - w eps_uncond.
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Run directory of a noise-aware classifier (`ddpm-train --task classifier`) for classifier guidance.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Classifier guidance scale s (gradient of s * log p(y | x_t)).
    #[arg(long, default_value_t = 1.0)]
    pub classifier_scale: f64,
    /// DDIM eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Clip predicted x0 to [-1, 1] (ddpm, ddim, dpm-solver). The default for those (not for a
    /// distilled student, whose "x0" is a one-step target rather than an image), as
    /// improved-diffusion's `clip_denoised=True`: with the cosine schedule alpha_bar at t = T-1 is
    /// ~2e-9, so an unclipped x0 estimate there magnifies the model's eps error ~30x into the next
    /// step, and samplers that start near T-1 (DDPM-1000, `--steps N` sections, DPM-Solver++)
    /// turn to speckle noise.
    #[arg(long, overrides_with = "no_clip")]
    pub clip: bool,
    /// Do not clip the predicted x0 (heun never clips).
    #[arg(long, overrides_with = "clip")]
    pub no_clip: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// ema (the first EMA rate), ema:RATE, or model.
    #[arg(long, default_value = "ema")]
    pub weights: String,
    /// Images per forward batch and rank.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Use ddpm-diffusion's step functions instead of the fused ddpm-kernels update.
    #[arg(long)]
    pub no_fused: bool,
    /// sde / pc: the reverse-SDE predictor, euler-maruyama (sde's default) or reverse-diffusion
    /// (pc's default).
    #[arg(long)]
    pub predictor: Option<String>,
    /// pc: Langevin corrector steps per noise level (default 1).
    #[arg(long)]
    pub corrector_steps: Option<usize>,
    /// pc: the Langevin step-size rule's signal-to-noise ratio r (default 0.16).
    #[arg(long)]
    pub snr: Option<f64>,
    /// edm: S_churn (default 80; gamma = min(S_churn / N, sqrt 2 - 1) per level).
    #[arg(long)]
    pub s_churn: Option<f64>,
    /// edm: churn only levels with sigma >= S_tmin (default 0.05).
    #[arg(long)]
    pub s_tmin: Option<f64>,
    /// edm: churn only levels with sigma <= S_tmax (default 50).
    #[arg(long)]
    pub s_tmax: Option<f64>,
    /// edm: scale of the churn noise (default 1.003).
    #[arg(long)]
    pub s_noise: Option<f64>,
}

/// The stochastic samplers' options of `args` (`None` where not given; the sampler checks which apply).
pub fn stochastic_options(args: &SampleArgs) -> Result<(ScoreSdeOptions, Option<EdmChurn>)> {
    let sde = ScoreSdeOptions {
        predictor: args.predictor.as_deref().map(str::parse).transpose()?,
        corrector_steps: args.corrector_steps,
        snr: args.snr,
    };
    let given = [args.s_churn, args.s_tmin, args.s_tmax, args.s_noise];
    let churn = given.iter().any(Option::is_some).then(|| {
        let d = EdmChurn::IDDPM;
        EdmChurn {
            s_churn: args.s_churn.unwrap_or(d.s_churn),
            s_tmin: args.s_tmin.unwrap_or(d.s_tmin),
            s_tmax: args.s_tmax.unwrap_or(d.s_tmax),
            s_noise: args.s_noise.unwrap_or(d.s_noise),
        }
    });
    Ok((sde, churn))
}

/// The resolved options of the stochastic samplers, for the summary line (null for the others).
fn options_summary(settings: &SamplerSettings) -> serde_json::Value {
    match settings.kind {
        SamplerKind::Sde | SamplerKind::Pc => {
            let (p, nc, snr) = settings.score_sde.resolved(settings.kind);
            serde_json::json!({
                "predictor": format!("{p:?}"),
                "corrector_steps": nc,
                "snr": (nc > 0).then_some(snr),
            })
        }
        SamplerKind::Edm => {
            let c = settings.churn.unwrap_or(EdmChurn::IDDPM);
            serde_json::json!({
                "s_churn": c.s_churn, "s_tmin": c.s_tmin, "s_tmax": c.s_tmax, "s_noise": c.s_noise,
            })
        }
        _ => serde_json::Value::Null,
    }
}

/// `ddpm-sample`: generates the images on every rank, writes them (rank 0) and prints a JSON summary.
pub fn run_sample(args: &SampleArgs, comm: &dyn Communicator) -> Result<()> {
    let rank0 = comm.rank() == 0;
    let warn = |e: &CheckpointError| {
        if rank0 {
            eprintln!("warning: skipping checkpoint: {e}");
        }
    };
    let ckpt = Checkpoint::resolve(&args.checkpoint, warn)?;
    let run_cfg = ckpt.config()?;
    let model_cfg = run_cfg.model.clone().ok_or_else(|| {
        usage!(
            "{}: not a diffusion-model checkpoint (task {:?})",
            ckpt.dir.display(),
            ckpt.task()
        )
    })?;
    let device = select_device(&args.device, comm.local_rank())?;
    let weights: Weights = args.weights.parse()?;
    if let Some(spec) = run_cfg.diffusion.continuous() {
        return run_sample_continuous(args, &ckpt, &run_cfg, spec, weights, device, comm);
    }
    let diffusion = ckpt.diffusion()?;
    let kind: SamplerKind = args.sampler.as_deref().unwrap_or("ddim").parse()?;
    let distilled = run_cfg.distilled();
    // A distilled student's own sampler: DDIM on its grid, unless the flags say otherwise.
    let steps = args.steps.clone().or_else(|| {
        distilled
            .filter(|_| kind == SamplerKind::Ddim)
            .map(|d| d.student_spec())
    });
    let mut settings = SamplerSettings::new(kind);
    settings.steps = steps.clone();
    settings.eta = args.eta;
    settings.clip_denoised = match kind {
        SamplerKind::Ddpm | SamplerKind::Ddim | SamplerKind::DpmSolver if distilled.is_none() => {
            !args.no_clip
        }
        _ => args.clip,
    };
    settings.fused_update = !args.no_fused;
    (settings.score_sde, settings.churn) = stochastic_options(args)?;
    let settings_clip = settings.clip_denoised;
    let options = options_summary(&settings);
    let sampler = Sampler::new(diffusion.clone(), settings)?;

    let classifier = load_guidance_classifier(args, &run_cfg, &device, warn)?;
    let num_classes = model_cfg
        .num_classes
        .or_else(|| classifier.as_ref().map(|c| c.net.config().num_classes));
    let (plan, n) = label_plan(args, num_classes)?;
    if let Some(w) = args.cfg {
        if model_cfg.num_classes.is_none() {
            bail_usage!("--cfg needs a class-conditional model");
        }
        if run_cfg.diffusion.label_dropout <= 0.0 {
            bail_usage!(
                "--cfg: the model was trained with diffusion.label_dropout = 0, so it never learned the null label \
                 that classifier-free guidance needs (w = {w})"
            );
        }
    }
    let guidance = Guidance {
        cfg_scale: args.cfg,
        null_label: model_cfg.num_classes.map(|k| k as u32),
        classifier: classifier.as_ref().map(|c| ClassifierGuidance {
            classifier: c,
            scale: args.classifier_scale,
        }),
    };
    let unet = ckpt.load_unet(weights, DType::F32, &device)?;
    let model = UNetDenoiser::new(unet);
    let job = GenerateJob {
        sampler: &sampler,
        model: &model,
        guidance,
        n,
        image_chw: [
            model_cfg.in_channels,
            model_cfg.image_size,
            model_cfg.image_size,
        ],
        labels: plan.labels(n),
        seed: args.seed,
        batch: args.batch,
        device,
        progress: true,
    };
    let start = Instant::now();
    let out = generate(&job, comm)?;
    let mut local = [out.seconds];
    comm.all_reduce_sum_f64(&mut local)?;
    if !rank0 {
        return Ok(());
    }
    let (out_path, grid_path) = write_outputs(
        args,
        &ckpt,
        &run_cfg,
        (kind, steps.as_deref()),
        plan,
        &out,
        num_classes,
    )?;
    let wall = start.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "metric": "sample",
        "checkpoint": ckpt.dir,
        "step": ckpt.step(),
        "sampler": kind.name(),
        "steps": steps,
        "model_evals_per_image": sampler.num_model_evals(),
        "cfg": args.cfg,
        "classifier_scale": args.classifier.as_ref().map(|_| args.classifier_scale),
        "eta": args.eta,
        "sampler_options": options,
        "clip": settings_clip,
        "weights": args.weights,
        "seed": args.seed,
        "num_images": n,
        "world_size": comm.world_size(),
        "seconds": wall,
        "images_per_second": n as f64 / wall,
        "out": out_path,
        "grid": grid_path,
    });
    println!("{summary}");
    Ok(())
}

/// The noise-aware classifier of `--classifier` (its first EMA), after checking it was trained on the
/// model's schedule.
/// `ddpm-sample` for a continuous-time checkpoint (`continuous_cmd.rs`): ancestral, DDIM or
/// DPM-Solver++ on the model's own (possibly learned) schedule, with classifier-free guidance
/// (classifier guidance needs a noise-aware classifier on the same continuous schedule: none is
/// trained yet).
fn run_sample_continuous(
    args: &SampleArgs,
    ckpt: &Checkpoint,
    run_cfg: &TrainConfig,
    spec: ddpm_config::ContinuousSpec,
    weights: Weights,
    device: Device,
    comm: &dyn Communicator,
) -> Result<()> {
    use crate::continuous_cmd::{
        generate_continuous, load_model, ContinuousSampleJob, DEFAULT_STEPS,
    };
    if args.classifier.is_some() {
        bail_usage!("--classifier: classifier guidance is not implemented for continuous-time models (--cfg is)");
    }
    let kind: SamplerKind = args.sampler.as_deref().unwrap_or("ddim").parse()?;
    let steps = match &args.steps {
        None => DEFAULT_STEPS,
        Some(s) => s.parse().map_err(|_| {
            usage!("--steps {s:?}: a continuous-time model takes a number of steps")
        })?,
    };
    let mut model = load_model(ckpt, spec, weights, &device)?;
    model.cfg = args.cfg;
    let num_classes = model.unet.config().num_classes;
    let (plan, n) = label_plan(args, num_classes)?;
    let guidance = Guidance {
        cfg_scale: args.cfg,
        null_label: num_classes.map(|k| k as u32),
        classifier: None,
    };
    guidance.validate(plan.labels(n).as_deref())?;
    let job = ContinuousSampleJob {
        model: &model,
        kind: args.sampler.as_deref().unwrap_or("ddim").parse()?,
        steps,
        clip: !args.no_clip,
        n,
        labels: plan.labels(n),
        seed: args.seed,
        batch: args.batch,
        device,
    };
    let start = Instant::now();
    let out = generate_continuous(&job, comm)?;
    if comm.rank() != 0 {
        return Ok(());
    }
    let (out_path, grid_path) = write_outputs(
        args,
        ckpt,
        run_cfg,
        (kind, args.steps.as_deref()),
        plan,
        &out,
        num_classes,
    )?;
    let wall = start.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "metric": "sample",
        "time": "continuous",
        "checkpoint": ckpt.dir,
        "step": ckpt.step(),
        "sampler": kind.name(),
        "steps": steps,
        "model_evals_per_image": steps,
        "cfg": args.cfg,
        "clip": !args.no_clip,
        "weights": args.weights,
        "seed": args.seed,
        "num_images": n,
        "world_size": comm.world_size(),
        "seconds": wall,
        "images_per_second": n as f64 / wall,
        "out": out_path,
        "grid": grid_path,
    });
    println!("{summary}");
    Ok(())
}

fn load_guidance_classifier(
    args: &SampleArgs,
    run_cfg: &TrainConfig,
    device: &Device,
    warn: impl FnMut(&CheckpointError),
) -> Result<Option<EncoderClassifier>> {
    Ok(match &args.classifier {
        None => None,
        Some(p) => {
            let c = Checkpoint::resolve(p, warn)?;
            let (cd, md) = (c.config()?.diffusion, &run_cfg.diffusion);
            if cd.schedule != md.schedule || cd.timesteps != md.timesteps {
                bail_usage!(
                    "{}: the classifier was trained on a {} schedule with {} steps, the model on {} with {}",
                    c.dir.display(),
                    cd.schedule,
                    cd.timesteps,
                    md.schedule,
                    md.timesteps
                );
            }
            let w = if c.manifest.ema_rates.is_empty() {
                Weights::Model
            } else {
                Weights::Ema(None)
            };
            Some(EncoderClassifier::new(c.load_classifier(w, device)?))
        }
    })
}

/// Which label each image gets, and how many images.
fn label_plan(args: &SampleArgs, num_classes: Option<usize>) -> Result<(LabelPlan, usize)> {
    let plan = match (num_classes, args.class, args.per_class) {
        (None, Some(_), _) | (None, _, Some(_)) => {
            bail_usage!("--class / --per-class need a class-conditional model or a classifier (--classifier)")
        }
        (None, None, None) => LabelPlan::Unconditional,
        (Some(k), Some(c), _) => {
            if c as usize >= k {
                bail_usage!("--class {c}: the model has {k} classes (0..{})", k - 1);
            }
            LabelPlan::Class(c)
        }
        (Some(k), None, Some(m)) => LabelPlan::PerClass {
            per_class: m,
            num_classes: k,
        },
        (Some(k), None, None) => LabelPlan::RoundRobin { num_classes: k },
    };
    let n = match (plan, args.num) {
        (
            LabelPlan::PerClass {
                per_class,
                num_classes,
            },
            None,
        ) => per_class * num_classes,
        (
            LabelPlan::PerClass {
                per_class,
                num_classes,
            },
            Some(n),
        ) if n != per_class * num_classes => {
            bail_usage!("--num {n} disagrees with --per-class {per_class} x {num_classes} classes")
        }
        (_, Some(n)) => n,
        (LabelPlan::Unconditional, None) => 64,
        (_, None) => 10 * num_classes.unwrap_or(1),
    };
    if n == 0 {
        bail_usage!("--num must be at least 1");
    }
    Ok((plan, n))
}

/// Rank 0: the HDF5 file and the PNG grid. Returns their paths.
fn write_outputs(
    args: &SampleArgs,
    ckpt: &Checkpoint,
    run_cfg: &TrainConfig,
    (kind, steps): (SamplerKind, Option<&str>),
    plan: LabelPlan,
    out: &Generated,
    num_classes: Option<usize>,
) -> Result<(PathBuf, Option<PathBuf>)> {
    let n = out.n;
    let steps_label = steps.unwrap_or("default").replace(',', "_");
    let out_path = args.out.clone().unwrap_or_else(|| {
        ckpt.run_dir
            .join("samples")
            .join(format!("{}-{steps_label}.h5", kind.name()))
    });
    if let Some(parent) = out_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            std::io::Error::new(e.kind(), format!("creating {}: {e}", parent.display()))
        })?;
    }
    let labels = out
        .labels
        .as_deref()
        .map(|l| (l, class_names(run_cfg, num_classes.unwrap_or(0))));
    let source = format!(
        "ddpm-sample: checkpoint {} (step {}), sampler {} steps {:?}, weights {}, seed {}, cfg {:?}, classifier {:?} scale {}",
        ckpt.dir.display(),
        ckpt.step(),
        kind,
        steps,
        args.weights,
        args.seed,
        args.cfg,
        args.classifier,
        args.classifier_scale
    );
    write_samples_h5(&out_path, &out.images, n, out.hwc, labels, &source)?;
    let grid_path = if args.no_grid {
        None
    } else {
        Some(
            args.grid
                .clone()
                .unwrap_or_else(|| out_path.with_extension("png")),
        )
    };
    if let Some(g) = &grid_path {
        let (idx, cols) = grid_selection(n, plan, args.grid_max);
        let per = out.hwc.iter().product::<usize>();
        let sel: Vec<u8> = idx
            .iter()
            .flat_map(|&i| out.images[i * per..(i + 1) * per].iter().copied())
            .collect();
        write_grid_png(g, &sel, idx.len(), out.hwc, cols)?;
    }
    Ok((out_path, grid_path))
}

fn grid_selection(n: usize, plan: LabelPlan, max: usize) -> (Vec<usize>, usize) {
    match plan {
        LabelPlan::PerClass {
            per_class,
            num_classes,
        } => {
            let cols = per_class.min((max / num_classes).max(1));
            let idx = (0..num_classes)
                .flat_map(|k| (0..cols).map(move |j| k * per_class + j))
                .collect();
            (idx, cols)
        }
        _ => {
            let m = n.min(max);
            let cols = (m as f64).sqrt().ceil() as usize;
            ((0..m).collect(), cols)
        }
    }
}
