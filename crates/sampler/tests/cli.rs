//! The binaries end to end on tiny models trained for a few steps by the trainer library (the
//! diffusion U-Net and the noise-aware classifier): every sampler and guidance kind from the command line, 2 MPI ranks giving the same images
//! as one, bits/dim on 1 and 2 ranks, and the classifier Frechet distance of a set with itself.

use std::path::{Path, PathBuf};
use std::process::Command;

const T: usize = 30;

/// A run directory written by the real trainer (`ddpm_train::train`, the library behind
/// `ddpm-train`): a few optimisation steps of a tiny class-conditional U-Net (or of the noise-aware
/// classifier) on `data`, so every test below samples and evaluates a trained checkpoint in exactly
/// the format the trainer writes, not a hand-made copy of it.
fn write_run(root: &Path, name: &str, task: &str, data: &Path) -> PathBuf {
    let run = root.join(name);
    let net = if task == "diffusion" {
        "[model]\nimage_size = 8\nin_channels = 1\nmodel_channels = 8\nnum_res_blocks = 1\n\
         attention_resolutions = [4]\nchannel_mult = [1, 2]\nnum_classes = 3\nnum_heads = 2\n\
         use_scale_shift_norm = true\nnum_groups = 4\n"
    } else {
        "[classifier]\nimage_size = 8\nin_channels = 1\nmodel_channels = 8\nnum_res_blocks = 1\n\
         channel_mult = [1, 2]\nnum_classes = 3\nuse_scale_shift_norm = true\nnum_groups = 4\n\
         pool = \"adaptive\"\n"
    };
    let dropout = if task == "diffusion" {
        "label_dropout = 0.1\n"
    } else {
        ""
    };
    let text = format!(
        "task = \"{task}\"\nseed = 0\nout_dir = \"{out}\"\n\n{net}\n\
         [diffusion]\nschedule = \"cosine\"\ntimesteps = {T}\nprediction = \"eps\"\n\
         variance = \"fixed_large\"\n{dropout}\n\
         [data]\npath = \"{data}\"\nbatch = 4\n\n\
         [optim]\nlr = 2e-3\n\n[ema]\nrates = [0.999]\n\n\
         [schedule]\ntotal_steps = 7\nlog_every = 7\nsample_every = 0\n\n\
         [preview]\nsteps = 2\nper_class = 1\n",
        out = run.display(),
        data = data.display()
    );
    let cfg = ddpm_train::TrainConfig::from_toml_str(&text, &ddpm_train::Overrides::default())
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let res = ddpm_train::train(
        &cfg,
        &ddpm_dist::SingleProcess::new(),
        ddpm_train::TrainOptions::default(),
    )
    .unwrap();
    assert_eq!(res.step, 7);
    run
}

/// A small labelled dataset of 8x8 grey images.
fn write_data(path: &Path, n: usize) {
    let mut z = vec![0f32; n * 64];
    ddpm_rng::StreamKey::new(5, ddpm_rng::Stream::Noise, 0, 0).fill_normal(&mut z);
    let bytes: Vec<u8> = z
        .iter()
        .map(|v| (128.0 + 50.0 * v).clamp(0.0, 255.0) as u8)
        .collect();
    let labels: Vec<u32> = (0..n).map(|i| (i % 3) as u32).collect();
    ddpm_sampler::images::write_samples_h5(
        path,
        &bytes,
        n,
        [8, 8, 1],
        Some((&labels, vec!["a".into(), "b".into(), "c".into()])),
        "test",
    )
    .unwrap();
}

fn bin(name: &str) -> Command {
    let exe = match name {
        "ddpm-sample" => env!("CARGO_BIN_EXE_ddpm-sample"),
        _ => env!("CARGO_BIN_EXE_ddpm-eval"),
    };
    let mut c = Command::new(exe);
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn mpirun(n: usize, name: &str) -> Command {
    let exe = match name {
        "ddpm-sample" => env!("CARGO_BIN_EXE_ddpm-sample"),
        _ => env!("CARGO_BIN_EXE_ddpm-eval"),
    };
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        &n.to_string(),
    ])
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("RAYON_NUM_THREADS", "1")
    .arg(exe);
    c
}

fn run_ok(mut c: Command) -> String {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_images(path: &Path) -> (Vec<u8>, Option<Vec<i64>>) {
    let ds = ddpm_data::Hdf5Dataset::open(path).unwrap();
    (ds.read_images(0, ds.len()).unwrap(), ds.labels())
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    run: PathBuf,
    clf: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let data = root.join("test.h5");
    write_data(&data, 24);
    let run = write_run(&root, "run", "diffusion", &data);
    let clf = write_run(&root, "clf", "classifier", &data);
    Fixture {
        _tmp: tmp,
        root,
        run,
        clf,
        data,
    }
}

#[test]
fn every_sampler_and_guidance_from_the_command_line() {
    let f = fixture();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--sampler", "ddpm", "--per-class", "2", "--clip"],
        vec![
            "--sampler",
            "ddpm",
            "--steps",
            "10",
            "--num",
            "5",
            "--cfg",
            "2",
        ],
        vec![
            "--sampler",
            "ddim",
            "--steps",
            "ddim10",
            "--eta",
            "0.5",
            "--class",
            "1",
            "--num",
            "3",
        ],
        vec![
            "--sampler",
            "ddim",
            "--steps",
            "5,5",
            "--per-class",
            "1",
            "--classifier",
            "CLF",
            "--classifier-scale",
            "2",
        ],
        vec![
            "--sampler",
            "dpm-solver",
            "--steps",
            "8",
            "--per-class",
            "2",
            "--cfg",
            "1.5",
        ],
        vec![
            "--sampler",
            "heun",
            "--steps",
            "6",
            "--num",
            "4",
            "--classifier",
            "CLF",
            "--weights",
            "model",
        ],
        vec![
            "--sampler",
            "ddpm",
            "--steps",
            "6",
            "--num",
            "4",
            "--classifier",
            "CLF",
            "--no-fused",
        ],
        vec![
            "--sampler",
            "sde",
            "--steps",
            "8",
            "--num",
            "4",
            "--cfg",
            "1",
        ],
        vec![
            "--sampler",
            "pc",
            "--steps",
            "5",
            "--corrector-steps",
            "2",
            "--snr",
            "0.1",
            "--per-class",
            "1",
            "--classifier",
            "CLF",
        ],
        vec![
            "--sampler",
            "edm",
            "--steps",
            "6",
            "--s-churn",
            "20",
            "--num",
            "3",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let out = f.root.join(format!("s{i}.h5"));
        let mut c = bin("ddpm-sample");
        c.arg("--checkpoint")
            .arg(&f.run)
            .arg("--out")
            .arg(&out)
            .args(["--batch", "3"]);
        for a in case {
            if *a == "CLF" {
                c.arg(&f.clf);
            } else {
                c.arg(a);
            }
        }
        let stdout = run_ok(c);
        let summary: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{case:?}: {e}: {stdout}"));
        assert_eq!(summary["metric"], "sample");
        if case.contains(&"pc") {
            assert_eq!(summary["sampler_options"]["corrector_steps"], 2);
            assert_eq!(summary["model_evals_per_image"], 15);
        }
        if case.contains(&"edm") {
            assert_eq!(summary["sampler_options"]["s_churn"], 20.0);
            assert_eq!(summary["sampler_options"]["s_noise"], 1.003);
        }
        let (images, labels) = read_images(&out);
        let n = summary["num_images"].as_u64().unwrap() as usize;
        assert_eq!(images.len(), n * 64, "{case:?}");
        let labels = labels.expect("labels");
        assert_eq!(labels.len(), n);
        if case.contains(&"--per-class") {
            let per = n / 3;
            assert!(
                labels
                    .iter()
                    .enumerate()
                    .all(|(i, &y)| y as usize == i / per),
                "{case:?}: {labels:?}"
            );
        }
        if case.contains(&"--class") {
            assert!(labels.iter().all(|&y| y == 1));
        }
        assert!(out.with_extension("png").is_file(), "{case:?}: no grid");
        // not a constant image: the sampler produced something
        assert!(images.iter().any(|&p| p != images[0]), "{case:?}");
    }
    // x0 clipping: on by default for ddpm/ddim (improved-diffusion's clip_denoised), off with
    // --no-clip; heun never clips (and rejects an explicit --clip, below)
    for (args, want) in [
        (&["--sampler", "ddpm"][..], true),
        (&["--sampler", "ddim", "--no-clip"][..], false),
        (&["--sampler", "dpm-solver"][..], true),
        (&["--sampler", "heun"][..], false),
    ] {
        let mut c = bin("ddpm-sample");
        c.arg("--checkpoint")
            .arg(&f.run)
            .arg("--out")
            .arg(f.root.join("clip.h5"))
            .args(["--steps", "3", "--num", "2", "--no-grid"])
            .args(args);
        let summary: serde_json::Value = serde_json::from_str(run_ok(c).trim()).unwrap();
        assert_eq!(summary["clip"], want, "{args:?}");
    }
    // bad input is a clear error, not a panic
    let mut c = bin("ddpm-sample");
    c.arg("--checkpoint")
        .arg(&f.run)
        .args(["--sampler", "heun", "--clip"]);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("clipping"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // an option of another sampler is an error that names it
    for (args, says) in [
        (&["--sampler", "heun", "--snr", "0.1"][..], "pc only"),
        (&["--sampler", "ddim", "--s-churn", "10"][..], "edm only"),
        (
            &["--sampler", "pc", "--corrector-steps", "0"][..],
            "corrector step",
        ),
        (
            &["--sampler", "sde", "--predictor", "heun"][..],
            "unknown predictor",
        ),
    ] {
        let mut c = bin("ddpm-sample");
        c.arg("--checkpoint").arg(&f.run).args(args);
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let mut c = bin("ddpm-sample");
    c.arg("--checkpoint")
        .arg(f.root.join("nope"))
        .arg("--out")
        .arg(f.root.join("x.h5"));
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
}

/// `mpirun -n 2 ddpm-sample` writes exactly the images (and labels) of a single process.
/// A distillation round of the fixture's model: `ddpm-sample` without `--sampler`/`--steps` uses
/// DDIM on the student's own grid without clipping; explicit flags override.
#[test]
fn a_distilled_student_samples_with_its_own_steps_by_default() {
    let f = fixture();
    let student = f.root.join("student");
    let ov = ddpm_train::Overrides {
        sets: vec![
            "distill.teacher_steps=8".into(),
            "distill.guidance=1.0".into(),
        ],
        steps: Some(2),
        out: Some(student.clone()),
        ..Default::default()
    };
    let cfg = ddpm_train::distill::load_config(None, Some(&f.run), &ov).unwrap();
    let res = ddpm_train::train(
        &cfg,
        &ddpm_dist::SingleProcess::new(),
        ddpm_train::TrainOptions::default(),
    )
    .unwrap();
    assert_eq!(res.step, 2);
    let sample = |extra: &[&str]| -> serde_json::Value {
        let mut c = bin("ddpm-sample");
        c.arg("--checkpoint")
            .arg(&student)
            .args(["--num", "3", "--no-grid", "--out"])
            .arg(f.root.join("s.h5"))
            .args(extra);
        serde_json::from_str(run_ok(c).lines().last().unwrap()).unwrap()
    };
    let d = sample(&[]);
    assert_eq!(d["sampler"], "ddim");
    assert_eq!(d["steps"], "trailing4");
    assert_eq!(d["model_evals_per_image"], 4);
    assert_eq!(d["clip"], false);
    let o = sample(&["--steps", "2", "--clip"]);
    assert_eq!(
        (o["steps"].as_str(), o["model_evals_per_image"].as_u64()),
        (Some("2"), Some(2))
    );
    assert_eq!(o["clip"], true);
    let h = sample(&["--sampler", "heun"]);
    assert_eq!(
        (h["sampler"].as_str(), h["steps"].is_null()),
        (Some("heun"), true)
    );
}

#[test]
fn two_ranks_give_the_same_images_as_one() {
    let f = fixture();
    for args in [
        vec![
            "--sampler",
            "ddpm",
            "--steps",
            "8",
            "--per-class",
            "3",
            "--cfg",
            "1",
        ],
        vec![
            "--sampler",
            "ddim",
            "--steps",
            "6",
            "--eta",
            "1",
            "--num",
            "7",
        ],
        vec![
            "--sampler",
            "dpm-solver",
            "--steps",
            "5",
            "--num",
            "7",
            "--classifier",
            "CLF",
            "--classifier-scale",
            "3",
        ],
        // a stochastic sampler with several noise draws per step (corrector + predictor)
        vec![
            "--sampler",
            "pc",
            "--steps",
            "4",
            "--num",
            "5",
            "--cfg",
            "1",
        ],
    ] {
        let mut outs = Vec::new();
        for ranks in [1, 2] {
            let out = f.root.join(format!("r{ranks}.h5"));
            let mut c = if ranks == 1 {
                bin("ddpm-sample")
            } else {
                mpirun(ranks, "ddpm-sample")
            };
            c.arg("--checkpoint")
                .arg(&f.run)
                .arg("--out")
                .arg(&out)
                .args(["--batch", "2", "--seed", "11"]);
            for a in &args {
                if *a == "CLF" {
                    c.arg(&f.clf);
                } else {
                    c.arg(a);
                }
            }
            let stdout = run_ok(c);
            let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            assert_eq!(summary["world_size"], ranks);
            outs.push(read_images(&out));
        }
        assert_eq!(outs[0].1, outs[1].1, "{args:?}: labels differ");
        assert!(
            outs[0].0 == outs[1].0,
            "{args:?}: 2 ranks gave different images than 1"
        );
    }
}

fn last_eval_lines(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("eval.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len() - n..]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn bits_per_dim_on_one_and_two_ranks() {
    let f = fixture();
    let mut totals = Vec::new();
    for ranks in [1, 2] {
        let mut c = if ranks == 1 {
            bin("ddpm-eval")
        } else {
            mpirun(ranks, "ddpm-eval")
        };
        c.arg("bpd")
            .arg("--checkpoint")
            .arg(&f.run)
            .arg("--data")
            .arg(&f.data)
            .args(["--num", "6", "--batch", "2"]);
        let stdout = run_ok(c);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["metric"], "bpd");
        assert_eq!(v["num_examples"], 6);
        let (p, k, d, t) = (
            v["prior_bpd_L_T"].as_f64().unwrap(),
            v["kl_bpd_sum_L_t_minus_1"].as_f64().unwrap(),
            v["decoder_bpd_L_0"].as_f64().unwrap(),
            v["total_bpd"].as_f64().unwrap(),
        );
        assert!(p >= 0.0 && k > 0.0 && d > 0.0, "{v}");
        assert!((p + k + d - t).abs() < 1e-9 * t, "{v}");
        assert_eq!(last_eval_lines(&f.run, 1)[0]["total_bpd"], v["total_bpd"]);
        totals.push(t);
    }
    assert!(
        (totals[0] - totals[1]).abs() < 1e-9 * totals[0],
        "1 rank {} vs 2 ranks {}",
        totals[0],
        totals[1]
    );
}

#[test]
fn classifier_frechet_distance_and_accuracy() {
    let f = fixture();
    // a set against itself: FD ~ 0
    let mut c = bin("ddpm-eval");
    c.arg("fid")
        .arg("--classifier")
        .arg(&f.clf)
        .arg("--data")
        .arg(&f.data)
        .arg("--samples")
        .arg(&f.data);
    c.arg("--checkpoint").arg(&f.run).args(["--name", "toy"]);
    let stdout = run_ok(c);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["metric"], "FD-toy-classifier");
    let fd = lines[0]["value"].as_f64().unwrap();
    assert!(fd.abs() < 1e-6, "FD of a set with itself is {fd}");
    assert_eq!(lines[1]["metric"], "classifier_accuracy_real");
    assert_eq!(lines[2]["metric"], "classifier_accuracy_samples");
    assert_eq!(lines[1]["value"], lines[2]["value"]);
    assert_eq!(last_eval_lines(&f.run, 3)[0]["metric"], "FD-toy-classifier");
    // generated samples against the data, on 2 ranks: a positive distance, same as on 1 rank
    let samples = f.root.join("gen.h5");
    let mut c = bin("ddpm-sample");
    c.arg("--checkpoint")
        .arg(&f.run)
        .arg("--out")
        .arg(&samples)
        .args(["--sampler", "ddim", "--steps", "5", "--per-class", "6"]);
    run_ok(c);
    let mut fds = Vec::new();
    for ranks in [1, 2] {
        let mut c = if ranks == 1 {
            bin("ddpm-eval")
        } else {
            mpirun(ranks, "ddpm-eval")
        };
        c.arg("fid")
            .arg("--classifier")
            .arg(&f.clf)
            .arg("--data")
            .arg(&f.data)
            .arg("--samples")
            .arg(&samples);
        let stdout = run_ok(c);
        let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
        assert_eq!(v["num_generated"], 18);
        fds.push(v["value"].as_f64().unwrap());
    }
    assert!(fds[0] > 1e-6, "FD of samples vs data {}", fds[0]);
    assert!((fds[0] - fds[1]).abs() <= 1e-9 * fds[0], "{fds:?}");
    assert!(samples.parent().unwrap().join("eval.jsonl").is_file());
}
