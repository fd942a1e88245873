//! Progressive distillation (`task = "distill"`, Salimans & Ho 2022): the config of a round, built
//! from its teacher, and the frozen teacher that makes the student's targets.
//!
//! A round trains a student, initialised from the teacher's weights, whose one DDIM step on the
//! trailing grid of `N / 2` steps matches the teacher's two steps on the grid of `N`
//! (`ddpm_diffusion::distill`). Per example the trainer draws a point `t` of the student's grid
//! (keyed like every other draw by `(seed, step, global example index)`, so resume and data
//! parallelism are as exact as for diffusion training) and noises a data example to `z_t`; the
//! teacher takes its two DDIM steps from `z_t` without gradient; the closed-form x0 that makes one
//! step land where those two did is the student's target, weighted by `max(SNR, 1)` (or `SNR + 1`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use ddpm_checkpoint::{Checkpoint, Weights};
use ddpm_diffusion::distill::{ddim_jump, one_step_target};
use ddpm_diffusion::{distill_losses, trailing_timesteps, GaussianDiffusion, TrainingLosses};
use ddpm_rng::Stream;
use ddpm_sampler::{guided_model_output, Denoiser, Guidance, UNetDenoiser};
use ddpm_unet::UNet;

use crate::timesteps::TimestepSampler;
use ddpm_config::{apply_set, DistillWeighting, Overrides, TrainConfig};

fn warn_skipped(e: &ddpm_checkpoint::CheckpointError) {
    tracing::warn!("skipping checkpoint: {e}");
}

/// The config of a distillation round: the user's config file (or, without one, the teacher's
/// config), with `task = "distill"`, the `--teacher` path and the `--set`s applied; then the
/// teacher's `[model]` and `[diffusion]` (with v-prediction and the plain loss) are put in, and
/// `distill.teacher` becomes the absolute path of the teacher's checkpoint directory. Without
/// `distill.teacher_steps`, a distilled teacher is distilled further (its own student steps).
pub fn load_config(
    config: Option<&Path>,
    teacher: Option<&Path>,
    ov: &Overrides,
) -> Result<TrainConfig> {
    let mut user: toml::Table = match config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}", p.display()))?
        }
        None => toml::Table::new(),
    };
    user.insert("task".into(), "distill".into());
    if let Some(t) = teacher {
        let path = t.to_str().ok_or_else(|| anyhow!("--teacher: not UTF-8"))?;
        table_mut(&mut user, "distill")?.insert("teacher".into(), path.into());
    }
    for s in &ov.sets {
        apply_set(&mut user, s)?;
    }
    let teacher_arg = user
        .get("distill")
        .and_then(|d| d.get("teacher"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| anyhow!("distill.teacher is not set (pass --teacher RUN_OR_CHECKPOINT)"))?
        .to_string();
    let ck = Checkpoint::resolve(Path::new(&teacher_arg), warn_skipped)
        .with_context(|| format!("distill.teacher {teacher_arg}"))?;
    let tcfg = ck.config()?;
    let user_diffusion = user.remove("diffusion");
    let mut table = match config {
        Some(_) => user,
        None => {
            let mut base = toml::Table::try_from(&tcfg)?;
            for k in ["out_dir", "task", "distill"] {
                base.remove(k);
            }
            merge(&mut base, user);
            base
        }
    };
    table.remove("diffusion");
    from_teacher(&mut table, user_diffusion, &ck, &tcfg)?;
    let text = toml::to_string(&table)?;
    let ov = Overrides {
        sets: Vec::new(),
        ..ov.clone()
    };
    Ok(TrainConfig::from_toml_str(&text, &ov)?)
}

/// Whether the config file with the `--set`s (the `--task` flag is one) asks for `task = "distill"`.
pub fn requested(config: Option<&Path>, sets: &[String]) -> Result<bool> {
    let mut t: toml::Table = match config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            // a file that does not parse is reported by the ordinary loader, with its line
            toml::from_str(&text).unwrap_or_default()
        }
        None => toml::Table::new(),
    };
    for s in sets {
        apply_set(&mut t, s)?;
    }
    Ok(t.get("task").and_then(|v| v.as_str()) == Some("distill"))
}

fn table_mut<'t>(t: &'t mut toml::Table, key: &str) -> Result<&'t mut toml::Table> {
    t.entry(key)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| anyhow!("{key} is not a table"))
}

fn as_f64(v: &toml::Value) -> Option<f64> {
    v.as_float().or(v.as_integer().map(|i| i as f64))
}

/// Copies `over` into `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The teacher's network and process in the round's table; the resolved teacher path and step count.
fn from_teacher(
    table: &mut toml::Table,
    user_diffusion: Option<toml::Value>,
    ck: &Checkpoint,
    tcfg: &TrainConfig,
) -> Result<()> {
    let tmodel = tcfg.model.clone().ok_or_else(|| {
        anyhow!(
            "distill.teacher {}: a {:?} checkpoint is not a diffusion model",
            ck.dir.display(),
            ck.task()
        )
    })?;
    if let Some(m) = table.get("model") {
        let user: ddpm_unet::UNetConfig = m.clone().try_into().context("model")?;
        if user != tmodel {
            bail!(
                "model: the student's [model] must be the teacher's (leave it out: it is copied)"
            );
        }
    }
    table.insert("model".into(), toml::Value::try_from(&tmodel)?);
    let mut diff = toml::Table::try_from(&tcfg.diffusion)?;
    if let Some(user) = user_diffusion {
        let user = user
            .try_into::<toml::Table>()
            .context("diffusion is not a table")?;
        for (k, v) in user {
            if k != "label_dropout" {
                bail!("diffusion.{k}: a distillation round takes the teacher's [diffusion] (only label_dropout may be set)");
            }
            diff.insert(k, v);
        }
    }
    if tcfg.diffusion.prediction != ddpm_config::Prediction::V {
        // The student starts from these weights but reads its output as v: near t = T an eps head
        // then predicts the wrong thing entirely, and the first round spends its steps relearning it.
        tracing::warn!(
            teacher = %ck.dir.display(),
            prediction = ?tcfg.diffusion.prediction,
            "the teacher does not predict v: its student starts from an output head that means something else; \
             train the teacher with diffusion.prediction = \"v\" or give this round many more steps"
        );
    }
    diff.insert("prediction".into(), "v".into());
    diff.insert("loss".into(), "simple".into());
    diff.insert("timestep_sampling".into(), "uniform".into());
    diff.remove("min_snr_gamma");
    table.insert("diffusion".into(), toml::Value::Table(diff));

    let dir = std::fs::canonicalize(&ck.dir)
        .with_context(|| format!("distill.teacher {}", ck.dir.display()))?;
    let d = table_mut(table, "distill")?;
    let dir = dir
        .to_str()
        .ok_or_else(|| anyhow!("distill.teacher: not UTF-8"))?;
    d.insert("teacher".into(), dir.into());
    let w = d
        .get("teacher_weights")
        .and_then(|w| w.as_str())
        .unwrap_or("ema");
    let w: Weights = w
        .parse()
        .map_err(|e| anyhow!("distill.teacher_weights: {e}"))?;
    ck.weights_file(w)
        .map_err(|e| anyhow!("distill.teacher_weights: {e}"))?;
    let inherited = tcfg.distilled();
    if !d.contains_key("teacher_steps") {
        let n = inherited.map(|t| t.student_steps()).ok_or_else(|| {
            anyhow!("distill.teacher_steps is not set: the teacher's DDIM steps N (the student learns N / 2), e.g. --set distill.teacher_steps=256")
        })?;
        d.insert("teacher_steps".into(), toml::Value::Integer(n as i64));
    }
    // A distilled teacher already carries its guidance: the student inherits it (and the record).
    if let Some(t) = inherited {
        match d.get("guidance").and_then(as_f64) {
            None => {
                d.insert("guidance".into(), t.guidance.into());
            }
            Some(w) if w != t.guidance => bail!(
                "distill.guidance = {w}: the teacher is a student with guidance {} folded in; a later round keeps it",
                t.guidance
            ),
            Some(_) => {}
        }
    } else if d.get("guidance").and_then(as_f64).is_some_and(|w| w > 0.0)
        && tcfg.diffusion.label_dropout <= 0.0
    {
        bail!("distill.guidance > 0 needs a teacher trained with diffusion.label_dropout > 0 (it never learned the null label)");
    }
    Ok(())
}

/// The frozen teacher of a round and the two grids: what turns a noised example into the
/// student's target.
pub struct Distiller {
    teacher: UNetDenoiser,
    teacher_weights: Vec<(String, Tensor)>,
    /// The teacher's own process (its prediction type), to read its outputs.
    teacher_diffusion: GaussianDiffusion,
    /// The student's process (v-prediction), to read the student's outputs.
    student_diffusion: GaussianDiffusion,
    /// Teacher grid (N points) and student grid (N / 2 points, the odd ones of the teacher's).
    fine: Vec<usize>,
    coarse: Vec<usize>,
    /// Classifier-free guidance applied to the teacher (an ordinary teacher with guidance > 0).
    guidance: Option<f64>,
    null_label: Option<u32>,
    /// An ordinary model's x0 is clipped to [-1, 1] as DDIM sampling does; a distilled teacher's
    /// "x0" is a one-step target and is not.
    clip_teacher: bool,
    weighting: DistillWeighting,
}

impl Distiller {
    /// The distiller of a `task = "distill"` run (`None` for other tasks): loads the teacher and
    /// checks it has the student's network and schedule.
    pub fn for_run(cfg: &TrainConfig, device: &Device) -> Result<Option<Self>> {
        let Some(d) = cfg.distilled() else {
            return Ok(None);
        };
        let ck = Checkpoint::resolve(&d.teacher, warn_skipped)
            .with_context(|| format!("distill.teacher {}", d.teacher.display()))?;
        let tcfg = ck.config()?;
        if tcfg.model != cfg.model {
            bail!(
                "distill.teacher {}: its [model] differs from the student's",
                ck.dir.display()
            );
        }
        let (td, sd) = (&tcfg.diffusion, &cfg.diffusion);
        if (td.schedule, td.timesteps) != (sd.schedule, sd.timesteps) {
            bail!(
                "distill.teacher {}: trained on a {} schedule of {} steps, the student on {} of {}",
                ck.dir.display(),
                td.schedule,
                td.timesteps,
                sd.schedule,
                sd.timesteps
            );
        }
        let weights: Weights = d
            .teacher_weights
            .parse()
            .map_err(|e| anyhow!("distill.teacher_weights: {e}"))?;
        let unet = ck.load_unet(weights, DType::F32, device)?;
        let teacher_weights = unet.named_parameters().to_vec();
        let big_t = sd.timesteps;
        let teacher_distilled = tcfg.distilled().is_some();
        Ok(Some(Self {
            teacher: UNetDenoiser::new(unet),
            teacher_weights,
            teacher_diffusion: td.build()?,
            student_diffusion: sd.build()?,
            fine: trailing_timesteps(big_t, d.teacher_steps)?,
            coarse: trailing_timesteps(big_t, d.student_steps())?,
            guidance: (d.guidance > 0.0 && !teacher_distilled).then_some(d.guidance),
            null_label: cfg
                .model
                .as_ref()
                .and_then(|m| m.num_classes)
                .map(|k| k as u32),
            clip_teacher: !teacher_distilled,
            weighting: d.weighting,
        }))
    }

    /// Sets the student's parameters to the teacher's (the start of every round).
    pub fn init_student(&self, names: &[String], vars: &[Var]) -> Result<()> {
        let by_name: HashMap<&str, &Tensor> = self
            .teacher_weights
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        for (n, v) in names.iter().zip(vars) {
            let t = by_name
                .get(n.as_str())
                .ok_or_else(|| anyhow!("the teacher has no parameter {n}"))?;
            v.set(&t.to_device(v.device())?.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    /// The student's grid points for local examples `first .. first + n` of step `step`: uniform,
    /// keyed like the diffusion task's timesteps.
    pub fn timesteps(&self, seed: u64, step: u64, first: u64, n: usize) -> Vec<usize> {
        let (k, _) = TimestepSampler::new(self.coarse.len(), false).sample(seed, step, first, n);
        k.into_iter().map(|k| self.coarse[k]).collect()
    }

    /// The teacher's two DDIM steps from `z_t` (at student grid points `t`, original timesteps):
    /// `(z_end, abar_t, abar_end)`, where the end of the first interval is the clean image (abar 1).
    fn teacher_two_steps(
        &self,
        z_t: &Tensor,
        t: &[usize],
        labels: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
        let abar = &self.student_diffusion.schedule.alphas_cumprod;
        let level = |j: Option<usize>| j.map_or(1.0, |j| abar[self.fine[j]]);
        let (mut mid, mut a_t, mut a_mid, mut a_end) = (vec![], vec![], vec![], vec![]);
        for &ti in t {
            let k = self
                .coarse
                .binary_search(&ti)
                .map_err(|_| anyhow!("timestep {ti} is not on the student's grid"))?;
            let j = 2 * k + 1; // the student's point on the teacher's grid
            mid.push(self.fine[j - 1]);
            a_t.push(abar[ti]);
            a_mid.push(level(Some(j - 1)));
            a_end.push(level(j.checked_sub(2)));
        }
        let x0 = self.teacher_x0(z_t, t, labels)?;
        let z_mid = ddim_jump(z_t, &x0, &a_t, &a_mid)?;
        let x0 = self.teacher_x0(&z_mid, &mid, labels)?;
        let z_end = ddim_jump(&z_mid, &x0, &a_mid, &a_end)?;
        Ok((z_end.detach(), a_t, a_end))
    }

    fn teacher_x0(&self, x: &Tensor, t: &[usize], labels: Option<&Tensor>) -> Result<Tensor> {
        let g = Guidance {
            cfg_scale: self.guidance,
            null_label: self.null_label,
            classifier: None,
        };
        let td = &self.teacher_diffusion;
        let out = guided_model_output(&self.teacher, td, &g, x, t, labels)?;
        let (mean, _) = td.split_model_output(&out, x)?;
        let x0 = td.predict_xstart(&mean, x, t)?;
        Ok(if self.clip_teacher {
            x0.clamp(-1f32, 1f32)?
        } else {
            x0
        })
    }

    /// The student's per-example losses for its output `out` at `z_t` (grid points `t`, the labels
    /// the student saw: a dropped label gives the teacher's unconditional target).
    pub fn losses(
        &self,
        out: &Tensor,
        z_t: &Tensor,
        t: &[usize],
        labels: Option<&Tensor>,
    ) -> Result<TrainingLosses> {
        let (z_end, a_t, a_end) = self.teacher_two_steps(z_t, t, labels)?;
        let target = one_step_target(z_t, &z_end, &a_t, &a_end)?;
        let w = self.weighting.to_diffusion();
        Ok(distill_losses(
            &self.student_diffusion,
            out,
            z_t,
            t,
            &target,
            w,
        )?)
    }

    /// The mean squared distance between `student`'s one DDIM step and the teacher's two, from
    /// `x0` noised (noise keyed by `seed`) to the student's grid point `i % (N / 2)` for example
    /// `i`: what a round drives down (with `student` = the teacher's weights, its value before
    /// training).
    pub fn one_step_gap(
        &self,
        student: UNet,
        x0: &Tensor,
        labels: Option<&Tensor>,
        seed: u64,
    ) -> Result<f64> {
        let b = x0.dim(0)?;
        let t: Vec<usize> = (0..b).map(|i| self.coarse[i % self.coarse.len()]).collect();
        let key = ddpm_kernels::NoiseKey {
            seed,
            step: 0,
            first_example: 0,
        };
        let noise =
            ddpm_kernels::philox_normal(x0.dims(), Stream::Sampler as u32, key, x0.device())?
                .to_dtype(x0.dtype())?;
        let sd = &self.student_diffusion;
        let z_t = sd.q_sample(x0, &t, &noise)?;
        let (z_end, a_t, a_end) = self.teacher_two_steps(&z_t, &t, labels)?;
        let out = UNetDenoiser::new(student).predict(&z_t, &t, labels)?;
        let (mean, _) = sd.split_model_output(&out, &z_t)?;
        let x_hat = sd.predict_xstart(&mean, &z_t, &t)?;
        let z_student = ddim_jump(&z_t, &x_hat, &a_t, &a_end)?;
        Ok(z_student
            .sub(&z_end)?
            .sqr()?
            .mean_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }
}
