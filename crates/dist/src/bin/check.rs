//! `ddpm-dist-check MODE [OPTIONS]`: multi-rank checks of the communicator, run under mpirun by the
//! crate's integration tests (and by hand when bringing up a new cluster).
//!
//! Modes (every rank verifies its own result and prints `rank R: MODE ok ...`; a failed check ends the
//! job through `ddpm_dist::fail`, so mpirun exits non-zero):
//! - `info`: rank, world, local rank, back-end.
//! - `primitives`: sum/max all-reduces, broadcast and all-gather of uneven byte buffers from every root.
//! - `allreduce [--sizes a,b,..] [--bucket-bytes N]`: GradientSync mean against a serial mean.
//! - `config [--differ-on R]`: config-hash agreement; with `--differ-on` every rank must fail.
//! - `broadcast [--root R] [--shape-differs-on R]`: initial-parameter broadcast.
//! - `nonfinite [--nan-on R]`: all ranks agree to skip a step with a NaN gradient on one rank.
//! - `fail --victim R --how kill|term|panic|thread-panic|error|exit [--after K] [--catch-term 1]`: rank R
//!   dies at iteration K of a loop of all-reduces while the others wait in the collective. The job must
//!   end, non-zero. `--catch-term 1` makes every rank catch SIGTERM/SIGUSR1 as ddpm-train does.
//! - `stall --victim R --how stop|sleep [--after K] [--sleep-s S] [--iterations N]`: rank R stops
//!   itself (SIGSTOP) or sleeps S seconds before each all-reduce from iteration K on, while the others
//!   wait in it. With a stall longer than the timeout the watchdog must end the job; a shorter one
//!   must not (the job then ends with `rank R: stall ok`).
//!
//! Every mode accepts `--timeout-s T`, the collective deadline (`dist.timeout_s` of ddpm-train).

use std::collections::HashMap;
use std::process::ExitCode;

use candle_core::{Device, Tensor};
use ddpm_dist::{
    any_non_finite, broadcast_tensors, check_same_config, fail, install_failure_handlers,
    Communicator, DistError, DistOptions, GradientSync,
};

type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Deterministic pseudo-random value for (rank, tensor, element), uniform in [-2, 2).
fn value(rank: usize, tensor: usize, i: usize) -> f32 {
    let mut z = ((rank as u64) << 40) ^ ((tensor as u64) << 24) ^ (i as u64);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
}

fn tensors(rank: usize, sizes: &[usize]) -> AnyResult<Vec<Tensor>> {
    sizes
        .iter()
        .enumerate()
        .map(|(ti, &n)| {
            let v: Vec<f32> = (0..n).map(|i| value(rank, ti, i)).collect();
            // Odd 2-D shapes where possible, so reshaping is exercised too.
            let t = Tensor::from_vec(v, n, &Device::Cpu)?;
            Ok(if n % 3 == 0 && n > 3 {
                t.reshape((3, n / 3))?
            } else {
                t
            })
        })
        .collect()
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> AnyResult<()> {
    if cond {
        Ok(())
    } else {
        Err(msg().into())
    }
}

struct Args {
    mode: String,
    opts: HashMap<String, String>,
}

impl Args {
    fn parse() -> AnyResult<Self> {
        let mut it = std::env::args().skip(1);
        let mode = it
            .next()
            .ok_or("usage: ddpm-dist-check MODE [--key value]...")?;
        let mut opts = HashMap::new();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --option, got {k:?}"))?;
            let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            opts.insert(key.to_string(), v);
        }
        Ok(Args { mode, opts })
    }

    fn usize(&self, key: &str, default: Option<usize>) -> AnyResult<Option<usize>> {
        match self.opts.get(key) {
            Some(v) => Ok(Some(v.parse().map_err(|e| format!("--{key} {v:?}: {e}"))?)),
            None => Ok(default),
        }
    }
}

fn info(comm: &dyn Communicator) -> AnyResult<()> {
    println!(
        "rank {}: info ok: {} host={}",
        comm.rank(),
        comm.describe(),
        std::env::var("HOSTNAME").unwrap_or_default()
    );
    Ok(())
}

fn primitives(comm: &dyn Communicator) -> AnyResult<()> {
    let (r, w) = (comm.rank(), comm.world_size());
    let mut f = vec![r as f32 + 0.5, 1.0, -(r as f32)];
    comm.all_reduce_sum_f32(&mut f)?;
    let s: f32 = (0..w).map(|q| q as f32).sum();
    check(f == vec![s + 0.5 * w as f32, w as f32, -s], || {
        format!("sum f32 {f:?}")
    })?;
    let mut d = vec![r as f64 * 0.25; 5];
    comm.all_reduce_sum_f64(&mut d)?;
    check(d.iter().all(|&x| x == s as f64 * 0.25), || {
        format!("sum f64 {d:?}")
    })?;
    let mut m = vec![r as u64, 100 - r as u64];
    comm.all_reduce_max_u64(&mut m)?;
    check(m == vec![w as u64 - 1, 100], || format!("max u64 {m:?}"))?;
    for root in 0..w {
        let mut b: Vec<u8> = if r == root {
            (0..(root * 7 + 3)).map(|i| i as u8 ^ root as u8).collect()
        } else {
            vec![0xEE; 2]
        };
        comm.broadcast_bytes(&mut b, root)?;
        let want: Vec<u8> = (0..(root * 7 + 3)).map(|i| i as u8 ^ root as u8).collect();
        check(b == want, || format!("broadcast from {root}: {b:?}"))?;
    }
    let mine: Vec<u8> = (0..r * 3).map(|i| (i + r) as u8).collect();
    let all = comm.all_gather_bytes(&mine)?;
    for (q, v) in all.iter().enumerate() {
        let want: Vec<u8> = (0..q * 3).map(|i| (i + q) as u8).collect();
        check(*v == want, || format!("all_gather from {q}: {v:?}"))?;
    }
    comm.barrier()?;
    println!("rank {r}: primitives ok");
    Ok(())
}

fn allreduce(comm: &dyn Communicator, args: &Args) -> AnyResult<()> {
    let sizes: Vec<usize> = match args.opts.get("sizes") {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()?,
        None => vec![3, 1, 1001, 2047, 7, 65_537, 12, 4099, 333_333, 5],
    };
    let bucket_bytes = args.usize("bucket-bytes", Some(40_000))?.unwrap();
    let (r, w) = (comm.rank(), comm.world_size());
    let grads = tensors(r, &sizes)?;
    let mut sync = GradientSync::from_tensors(&grads, bucket_bytes)?;
    sync.verify_across_ranks(comm)?;
    let out = sync.all_reduce_mean(comm, &grads)?;
    let mut max_diff = 0f32;
    for (ti, (o, g)) in out.iter().zip(&grads).enumerate() {
        check(o.shape() == g.shape(), || {
            format!("tensor {ti}: shape {:?} vs {:?}", o.dims(), g.dims())
        })?;
        let got = o.flatten_all()?.to_vec1::<f32>()?;
        for (i, x) in got.iter().enumerate() {
            let mut sum = 0f32;
            for q in 0..w {
                sum += value(q, ti, i);
            }
            let want = sum / w as f32;
            let diff = (x - want).abs();
            max_diff = max_diff.max(diff);
            // Two ranks: a + b is one rounding whatever the order, so exact. More ranks may sum in
            // another order than the serial loop.
            let tol = if w <= 2 { 0.0 } else { 1e-6 * w as f32 };
            check(diff <= tol, || {
                format!("tensor {ti} element {i}: got {x}, serial mean {want}")
            })?;
        }
    }
    let st = sync.last_stats();
    println!(
        "rank {r}: allreduce ok: {} tensors, {} elements, {} buckets of <= {} bytes, max |diff| {max_diff:e}",
        sizes.len(),
        st.elems,
        st.buckets,
        bucket_bytes
    );
    Ok(())
}

fn config(comm: &dyn Communicator, args: &Args) -> AnyResult<()> {
    let mut hash = [0x5au8; 32];
    if args.usize("differ-on", None)? == Some(comm.rank()) {
        hash[31] ^= 1;
    }
    check_same_config(comm, &hash)?;
    println!("rank {}: config ok", comm.rank());
    Ok(())
}

fn broadcast(comm: &dyn Communicator, args: &Args) -> AnyResult<()> {
    let root = args.usize("root", Some(0))?.unwrap();
    let mut sizes = vec![6, 5, 70_001];
    if args.usize("shape-differs-on", None)? == Some(comm.rank()) {
        sizes[1] += 1;
    }
    let mine = tensors(comm.rank(), &sizes)?;
    let got = broadcast_tensors(comm, &mine, root)?;
    let want = tensors(root, &sizes)?;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let (g, w) = (
            g.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
        );
        check(g == w, || format!("tensor {i} differs from rank {root}'s"))?;
    }
    println!("rank {}: broadcast ok from root {root}", comm.rank());
    Ok(())
}

fn nonfinite(comm: &dyn Communicator, args: &Args) -> AnyResult<()> {
    let nan_on = args.usize("nan-on", None)?;
    let mut g = tensors(comm.rank(), &[10, 7])?;
    if nan_on == Some(comm.rank()) {
        let mut v = g[1].to_vec1::<f32>()?;
        v[3] = f32::NAN;
        g[1] = Tensor::from_vec(v, 7, &Device::Cpu)?;
    }
    let local = g
        .iter()
        .map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()))
        .collect::<candle_core::Result<Vec<_>>>()?
        .iter()
        .flatten()
        .any(|x| !x.is_finite());
    let skip = any_non_finite(comm, local)?;
    check(skip == nan_on.is_some(), || {
        format!("skip={skip} but NaN on {nan_on:?}")
    })?;
    println!(
        "rank {}: nonfinite ok: local={local} skip={skip}",
        comm.rank()
    );
    Ok(())
}

static TERM_SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn failure(comm: &dyn Communicator, args: &Args) -> AnyResult<()> {
    let victim = args.usize("victim", Some(1))?.unwrap();
    let after = args.usize("after", Some(3))?.unwrap();
    let how = args.opts.get("how").map(String::as_str).unwrap_or("kill");
    if args.usize("catch-term", Some(0))? == Some(1) {
        // Like ddpm-train: SIGTERM/SIGUSR1 only set a flag (checkpoint-and-stop at the next step
        // boundary). A survivor blocked in a collective never reaches that boundary, so the launcher
        // must still be able to end it.
        extern "C" fn on_signal(_: libc::c_int) {
            TERM_SEEN.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGUSR1, on_signal as *const () as libc::sighandler_t);
        }
    }
    let mut buf = vec![1f32; 1 << 20];
    // Far more iterations than the test waits for: the survivors must be stopped by the launcher.
    for it in 0..1_000_000usize {
        if comm.rank() == victim && it == after {
            eprintln!(
                "rank {}: failing on purpose ({how}) at iteration {it}",
                comm.rank()
            );
            match how {
                // SAFETY: raising a signal on our own process.
                "kill" => unsafe {
                    libc::raise(libc::SIGKILL);
                },
                "term" => unsafe {
                    libc::raise(libc::SIGTERM);
                },
                "panic" => panic!("injected panic at iteration {it}"),
                "error" => {
                    return Err(Box::new(DistError::Launch(format!(
                        "injected error at iteration {it}"
                    ))))
                }
                "exit" => std::process::exit(3),
                // A helper thread (think: the data loader) dies while the main thread waits in a
                // collective: the panic hook must still end the job.
                "thread-panic" => {
                    std::thread::Builder::new()
                        .name("loader".into())
                        .spawn(|| panic!("injected panic in a helper thread"))?;
                }
                other => return Err(format!("unknown --how {other:?}").into()),
            }
        }
        comm.all_reduce_sum_f32(&mut buf)?;
        buf.iter_mut().for_each(|x| *x = 1.0);
    }
    Err("the victim never failed".into())
}

fn stall(comm: &dyn Communicator, args: &Args) -> AnyResult<()> {
    let victim = args.usize("victim", Some(1))?.unwrap();
    let after = args.usize("after", Some(3))?.unwrap();
    let iterations = args.usize("iterations", Some(1_000_000))?.unwrap();
    let sleep_s = args.usize("sleep-s", Some(3600))?.unwrap();
    let how = args.opts.get("how").map(String::as_str).unwrap_or("stop");
    let mut buf = vec![1f32; 1024];
    for it in 0..iterations {
        if comm.rank() == victim && it >= after {
            eprintln!(
                "rank {}: stalling on purpose ({how}) before collective iteration {it}",
                comm.rank()
            );
            match how {
                // SAFETY: raising a signal on our own process.
                "stop" => unsafe {
                    libc::raise(libc::SIGSTOP);
                },
                "sleep" => std::thread::sleep(std::time::Duration::from_secs(sleep_s as u64)),
                other => return Err(format!("unknown --how {other:?}").into()),
            }
        }
        comm.all_reduce_sum_f32(&mut buf)?;
        let w = comm.world_size() as f32;
        check(buf.iter().all(|&x| x == w), || format!("sum {}", buf[0]))?;
        buf.iter_mut().for_each(|x| *x = 1.0);
    }
    println!("rank {}: stall ok: {iterations} all-reduces", comm.rank());
    Ok(())
}

fn run(comm: &dyn Communicator, args: &Args) -> AnyResult<()> {
    match args.mode.as_str() {
        "info" => info(comm),
        "primitives" => primitives(comm),
        "allreduce" => allreduce(comm, args),
        "config" => config(comm, args),
        "broadcast" => broadcast(comm, args),
        "nonfinite" => nonfinite(comm, args),
        "fail" => failure(comm, args),
        "stall" => stall(comm, args),
        m => Err(format!("unknown mode {m:?}").into()),
    }
}

fn options(args: &Args) -> AnyResult<DistOptions> {
    Ok(match args.opts.get("timeout-s") {
        Some(v) => {
            DistOptions::with_timeout_s(v.parse().map_err(|e| format!("--timeout-s {v:?}: {e}"))?)?
        }
        None => DistOptions::default(),
    })
}

fn main() -> ExitCode {
    let started = Args::parse().and_then(|a| Ok((options(&a)?, a)));
    let (opts, args) = match started {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let comm = match ddpm_dist::init_with(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    install_failure_handlers(&*comm);
    if let Err(e) = run(&*comm, &args) {
        fail(&*comm, &*e);
    }
    drop(comm);
    ExitCode::SUCCESS
}
