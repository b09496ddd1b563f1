//! `kindling bench coldstart`: request-to-first-token for a model with no engine, compared in one
//! run against (1) a fresh kindling process with no pool and no warm worker and (2) a fresh Python
//! process with HF transformers. Baselines run first, while the GPU is still free; the warm
//! worker (which reserves most of the GPU as its arena) is made last.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kindling_engine::{Checkpoint, CheckpointPool, ModelRegistry, SamplingParams, direct_io};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct ColdstartArgs {
    /// NAME=PATH of an HF-format model directory. Repeatable.
    #[arg(long = "model", value_name = "NAME=PATH", required = true)]
    models: Vec<String>,
    /// cpu, cuda, cuda:N, a list of GPUs ("cuda:0,cuda:1") or cuda:all: one warm worker each.
    #[arg(long, alias = "devices", default_value = "cpu")]
    device: String,
    /// Then scale every model from zero at the same moment (from the pool), and report where each
    /// landed and its time to first token.
    #[arg(long)]
    together: bool,
    /// Then, with the first model decoding one long stream, scale the others from zero on the same
    /// worker, and report the stream's time per output token before and during their loads.
    #[arg(long)]
    warm_traffic: bool,
    /// Then, per model, `--runs` pool misses with its files dropped from the page cache, each
    /// against reading the same files from disk with several parallel readers just before.
    #[arg(long)]
    pool_miss: bool,
    /// With `--pool-miss`: skip the disk reads, only the misses and their text checks.
    #[arg(long)]
    no_disk_reads: bool,
    /// Then, per model, split it over the first N workers (tensor parallelism) and scale it from
    /// the pool: time to first token against the single-worker runs above, and its greedy text
    /// against the single worker's (the same run).
    #[arg(long, value_name = "N")]
    tensor_parallel: Option<usize>,
    /// Timed runs of each variant.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A python3 with torch and transformers, for the HF fresh-process baseline (skipped without it).
    #[arg(long)]
    hf_python: Option<String>,
    #[arg(long, default_value = "scripts/bench/hf_coldstart.py")]
    hf_script: PathBuf,
    /// NAME=PATH: the checkpoint HF loads for NAME's baseline, when not the model itself (a
    /// GGUF: give the same shape in safetensors). Repeatable.
    #[arg(long = "hf-model", value_name = "NAME=PATH")]
    hf_models: Vec<String>,
    /// Skip the fresh-kindling-process baseline.
    #[arg(long)]
    skip_fresh: bool,
    #[arg(long, default_value_t = 64.0)]
    pool_gib: f64,
    /// Write the results as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct OnceArgs {
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    model: PathBuf,
    /// Then generate this many greedy tokens, twice, and report the text and whether it repeated
    /// (to set beside another implementation's greedy text for the same checkpoint).
    #[arg(long, default_value_t = 0)]
    greedy_tokens: u32,
}

const PROMPT: &str = "Hello, Kindling! Tell me a story.";

fn first_token_params() -> SamplingParams {
    SamplingParams { max_tokens: 1, ..SamplingParams::default() }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 1e4
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() { f64::NAN } else { values[values.len() / 2] }
}

/// One fresh process: make the device, load without pool or warm-up, generate one token.
pub fn once(args: OnceArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let device_started = Instant::now();
        let worker = cold_worker(&args.device)?;
        let device_s = secs(device_started.elapsed());
        let ckpt = Checkpoint::open(&args.model)?;
        let pool = CheckpointPool::new(0, None); // nothing kept, nothing pinned
        let (pooled, _) = pool.checkout(ckpt, &|_| {})?;
        let engine = kindling_engine::engine::start_engine("once", &pooled, false, &worker.device, &one_sequence())?;
        let (_, finish) = engine.generate(PROMPT.into(), first_token_params()).await?;
        let load = engine.info.load;
        let total_s = secs(started.elapsed());
        let mut texts = Vec::new();
        for _ in 0..if args.greedy_tokens > 0 { 2 } else { 0 } {
            let params =
                SamplingParams { max_tokens: args.greedy_tokens, temperature: 0.0, ..SamplingParams::default() };
            texts.push(engine.generate(PROMPT.into(), params).await?.0);
        }
        println!(
            "{}",
            json!({
                "device_s": device_s, "read_s": secs(load.admit), "h2d_s": secs(load.h2d), "init_s": secs(load.init),
                "first_token_s": secs(finish.timing.first_token), "total_s": total_s,
                "greedy_text": texts.first(), "greedy_text_repeats": texts.windows(2).all(|w| w[0] == w[1]),
            })
        );
        Ok(())
    })
}

/// An engine sized for the one sequence a cold-start measurement runs.
fn one_sequence() -> kindling_engine::EngineConfig {
    kindling_engine::EngineConfig { max_running: 1, max_waiting: 0, ..Default::default() }
}

/// A worker without warm-up or arena: what a process that starts from nothing has.
fn cold_worker(device: &str) -> anyhow::Result<kindling_engine::Worker> {
    let device = match crate::cuda_ordinal(device)? {
        None => kindling_engine::Device::Cpu,
        #[cfg(feature = "cuda")]
        Some(ordinal) => kindling_engine::Device::new_cuda(ordinal)?,
        #[cfg(not(feature = "cuda"))]
        Some(_) => anyhow::bail!("this kindling was built without CUDA"),
    };
    Ok(kindling_engine::Worker::unwarmed(device))
}

fn spawn_timed(cmd: &mut Command) -> anyhow::Result<(f64, Value)> {
    let started = Instant::now();
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    let wall = secs(started.elapsed());
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("{}").to_string();
    Ok((wall, serde_json::from_str(&last).unwrap_or(Value::Null)))
}

pub fn coldstart(args: ColdstartArgs) -> anyhow::Result<()> {
    // Quiet unless asked: the engine's logs would bury the results.
    if std::env::var_os("KINDLING_LOG").is_some() {
        crate::serve::init_logging(false);
    }
    let pairs = |list: &[String], flag: &str| -> anyhow::Result<Vec<(String, PathBuf)>> {
        list.iter()
            .map(|m| {
                m.split_once('=').map(|(n, p)| (n.to_string(), PathBuf::from(p))).context(format!("{flag} NAME=PATH"))
            })
            .collect()
    };
    let models = pairs(&args.models, "--model")?;
    let hf_models = pairs(&args.hf_models, "--hf-model")?;
    let mut results = json!({ "device": args.device, "runs": args.runs, "models": {} });

    for (name, path) in &models {
        let entry = &mut results["models"][name];
        let ckpt = Checkpoint::open(path)?;
        entry["weight_bytes"] = json!(ckpt.weight_bytes);
        entry["format"] = json!(ckpt.format);
        if let Some(python) = &args.hf_python {
            let (mut walls, mut runs) = (Vec::new(), Vec::new());
            let hf_path = hf_models.iter().find(|(n, _)| n == name).map_or(path, |(_, p)| p);
            entry["hf_checkpoint"] = json!(hf_path);
            for run in 0..args.runs {
                let (wall, phases) = spawn_timed(Command::new(python).arg(&args.hf_script).arg(hf_path))?;
                eprintln!("[{name}] HF transformers fresh process, run {run}: {wall:.3} s {phases}");
                walls.push(wall);
                runs.push(json!({ "wall_s": wall, "phases": phases }));
            }
            entry["hf_fresh_process"] = json!({ "runs": runs, "median_s": median(&mut walls) });
        }
        if !args.skip_fresh {
            let exe = std::env::current_exe()?;
            let (mut walls, mut runs) = (Vec::new(), Vec::new());
            for run in 0..args.runs {
                let (wall, phases) = spawn_timed(
                    Command::new(&exe).args(["bench", "once", "--device", &args.device, "--model"]).arg(path),
                )?;
                eprintln!("[{name}] kindling fresh process (no pool, no warm worker), run {run}: {wall:.3} s {phases}");
                walls.push(wall);
                runs.push(json!({ "wall_s": wall, "phases": phases }));
            }
            entry["kindling_fresh_process"] = json!({ "runs": runs, "median_s": median(&mut walls) });
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let workers = crate::workers_from_args(&args.device, 1e6, 0.8).await?;
        for worker in &workers {
            eprintln!("warm worker {} ready in {:.3} s (paid once, at boot)", worker.label, worker.boot_time.as_secs_f64());
        }
        results["worker_boot_s"] = json!(secs(workers[0].boot_time));
        let pool = Arc::new(CheckpointPool::new(crate::serve::gib(args.pool_gib), workers[0].pinner()));
        let workers: Vec<Arc<kindling_engine::Worker>> = workers.into_iter().map(Arc::new).collect();
        let devices: Vec<kindling_engine::Device> = workers.iter().map(|w| w.device.clone()).collect();
        let registry =
            Arc::new(ModelRegistry::with_workers(workers, pool.clone(), kindling_engine::EngineConfig::default()));
        for (name, path) in &models {
            registry.register(name, path)?;
            let entry = &mut results["models"][name.as_str()];
            // The first load admits the checkpoint to the pool (page-in + pin): a pool miss.
            let started = Instant::now();
            let acquired = registry.acquire(name).await?;
            acquired.engine.generate(PROMPT.into(), first_token_params()).await?;
            entry["pool_admission_s"] = json!(secs(acquired.engine.info.load.admit));
            entry["first_request_pool_miss_s"] = json!(secs(started.elapsed()));
            drop(acquired);
            let (mut walls, mut runs) = (Vec::new(), Vec::new());
            for run in 0..args.runs {
                registry.unload(name);
                tokio::time::sleep(Duration::from_millis(300)).await; // let the old engine free its memory
                let started = Instant::now();
                let acquired = registry.acquire(name).await?;
                let (_, finish) = acquired.engine.generate(PROMPT.into(), first_token_params()).await?;
                let wall = secs(started.elapsed());
                let load = acquired.engine.info.load;
                let gbps = acquired.engine.info.weight_bytes as f64 / load.h2d.as_secs_f64().max(1e-9) / 1e9;
                eprintln!(
                    "[{name}] kindling warm worker + pool, run {run}: {wall:.4} s (h2d {:.4} s = {gbps:.1} GB/s, init {:.4} s, first token {:.4} s)",
                    load.h2d.as_secs_f64(), load.init.as_secs_f64(), finish.timing.first_token.as_secs_f64()
                );
                walls.push(wall);
                runs.push(json!({
                    "wall_s": wall, "pool_hit": load.pool_hit, "h2d_s": secs(load.h2d), "h2d_GBps": (gbps * 10.0).round() / 10.0,
                    "init_s": secs(load.init), "first_token_s": secs(finish.timing.first_token),
                }));
            }
            entry["kindling_warm_pool"] = json!({ "runs": runs, "median_s": median(&mut walls) });
            entry["kindling_wake"] = wake_from_sleep(&registry, name, args.runs).await?;
            registry.unload(name);
        }
        if let Some(n) = args.tensor_parallel {
            // On the CPU the ranks are threads sharing it; on GPUs one rank per worker.
            let split: Vec<_> = if devices[0].is_cpu() {
                vec![kindling_engine::Device::Cpu; n]
            } else {
                anyhow::ensure!(n <= devices.len(), "--tensor-parallel {n}: only {} GPU workers", devices.len());
                devices[..n].to_vec()
            };
            anyhow::ensure!(n >= 2, "--tensor-parallel {n}: a split needs 2 or more ranks");
            for (name, path) in &models {
                let split = tensor_parallel(&registry, &pool, &split, name, path, args.runs).await?;
                results["models"][name.as_str()]["tensor_parallel"] = split;
            }
        }
        if args.together {
            results["together"] = together(&registry, &models).await?;
        }
        if args.pool_miss {
            for (name, path) in &models {
                results["models"][name.as_str()]["pool_miss"] = pool_miss(&registry, &pool, name, path, args.runs, !args.no_disk_reads).await?;
            }
        }
        if args.warm_traffic {
            anyhow::ensure!(models.len() >= 2, "--warm-traffic needs a warm model and at least one to load");
            results["warm_traffic"] = warm_traffic(&registry, &models).await?;
        }
        anyhow::Ok(())
    })?;

    print_summary(&results);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&results)?)?;
    }
    // After the results are written, so the timings of a run that failed here are kept.
    let wrong = misses_that_loaded_other_weights(&results);
    anyhow::ensure!(wrong.is_empty(), "pool misses of {wrong:?} loaded other weights than their pooled copies");
    Ok(())
}

/// Greedy text of a few tokens, to compare two loads of one model (split and whole, miss and
/// hit).
fn text_check_params() -> SamplingParams {
    SamplingParams { max_tokens: 24, temperature: 0.0, ..SamplingParams::default() }
}

/// `engine`'s greedy text for the bench's prompt (`text_check_params`).
async fn greedy_text_of(engine: &kindling_engine::EngineHandle) -> anyhow::Result<String> {
    Ok(engine.generate(PROMPT.into(), text_check_params()).await?.0)
}

/// `name` split over `devices` (one rank each) from the pool, `runs` times: pool hit to first
/// token, each rank loading its part over its own link at once; and its greedy text against the
/// same model whole on one worker.
async fn tensor_parallel(
    registry: &ModelRegistry,
    pool: &Arc<CheckpointPool>,
    devices: &[kindling_engine::Device],
    name: &str,
    path: &Path,
    runs: usize,
) -> anyhow::Result<Value> {
    let ranks = devices.len();
    let whole = registry.acquire(name).await?;
    let whole_text = greedy_text_of(&whole.engine).await?;
    drop(whole);
    registry.unload(name);
    tokio::time::sleep(Duration::from_millis(300)).await; // let the whole engine free its memory
    let groups = kindling_engine::ranks::CollectiveGroups::new();
    // The collectives alone first: a known sum across the ranks, exact when the transport works.
    let check = {
        let (groups, devices) = (groups.clone(), devices.to_vec());
        tokio::task::spawn_blocking(move || groups.check(&devices)).await??
    };
    eprintln!("[{name}] collectives over {ranks} ranks: a known sum is off by at most {check}");
    let start = |name: String, pool: Arc<CheckpointPool>, path: PathBuf, devices: Vec<kindling_engine::Device>| {
        let groups = groups.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let started = Instant::now();
            let (pooled, hit) = pool.checkout_path(&path, &|_| {})?;
            let engine =
                kindling_engine::ranks::start_tensor_parallel(&name, &pooled, hit, &devices, &groups, &one_sequence())?;
            Ok((started, engine))
        })
    };
    let (mut walls, mut results) = (Vec::new(), Vec::new());
    let mut split_text = String::new();
    let mut first_start_s = 0.0;
    // Run 0 makes the collectives (NCCL communicators on GPUs), once for this set of workers, as
    // the first split start on them would; the timed runs after it borrow them.
    for run in 0..=runs {
        let (started, engine) = start(name.to_string(), pool.clone(), path.to_path_buf(), devices.to_vec()).await??;
        tracing::debug!(run, "tensor parallel: split engine started; generating");
        let (_, finish) = engine.generate(PROMPT.into(), first_token_params()).await?;
        let wall = secs(started.elapsed());
        if run == 0 {
            first_start_s = wall;
            eprintln!("[{name}] tensor parallel x{ranks}, first start (makes the collectives): {wall:.4} s");
            retired(engine).await;
            continue;
        }
        let load = engine.info.load;
        eprintln!(
            "[{name}] tensor parallel x{ranks}, warm workers + pool, run {run}: {wall:.4} s (h2d {:.4} s, init {:.4} s, first token {:.4} s)",
            load.h2d.as_secs_f64(),
            load.init.as_secs_f64(),
            finish.timing.first_token.as_secs_f64()
        );
        walls.push(wall);
        results.push(json!({
            "wall_s": wall, "pool_hit": load.pool_hit, "h2d_s": secs(load.h2d), "init_s": secs(load.init),
            "first_token_s": secs(finish.timing.first_token),
        }));
        if run == runs {
            split_text = greedy_text_of(&engine).await?;
        }
        retired(engine).await;
    }
    let greedy_text = compare_texts(name, ranks, "", whole_text, split_text);
    // In bf16 the split rounds its partial sums where the whole model does not, and a near tie
    // can flip a token; in f32 the two agree unless the split is wrong. GPUs only: the CPU
    // computes in f32 already.
    let greedy_text_f32 = if devices[0].is_cuda() {
        let f32 = kindling_engine::EngineConfig { dtype: Some(kindling_engine::DType::F32), ..one_sequence() };
        let (whole, pooled, hit) = {
            let (name, pool, path, device, f32) =
                (name.to_string(), pool.clone(), path.to_path_buf(), devices[0].clone(), f32.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let (pooled, hit) = pool.checkout_path(&path, &|_| {})?;
                Ok((kindling_engine::engine::start_engine(&name, &pooled, hit, &device, &f32)?, pooled, hit))
            })
            .await??
        };
        let whole_text = greedy_text_of(&whole).await?;
        retired(whole).await;
        let split = {
            let (name, devices, groups) = (name.to_string(), devices.to_vec(), groups.clone());
            tokio::task::spawn_blocking(move || {
                kindling_engine::ranks::start_tensor_parallel(&name, &pooled, hit, &devices, &groups, &f32)
            })
            .await??
        };
        let split_text = greedy_text_of(&split).await?;
        retired(split).await;
        compare_texts(name, ranks, " (f32)", whole_text, split_text)
    } else {
        Value::Null
    };
    Ok(json!({
        "ranks": ranks, "runs": results, "median_s": median(&mut walls), "first_start_s": first_start_s,
        "collective_groups_made": groups.made(), "collective_check_max_error": check,
        "greedy_text": greedy_text, "greedy_text_f32": greedy_text_f32,
    }))
}

/// Drops `engine` and waits (up to 30 s) for its thread to end and free its memory, so the next
/// start has the room and a split engine's collectives are back in their groups.
async fn retired(engine: kindling_engine::EngineHandle) {
    let alive = engine.alive_token();
    drop(engine);
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive.strong_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The split model's greedy text against the whole one's, and where they part.
fn compare_texts(name: &str, ranks: usize, label: &str, whole: String, split: String) -> Value {
    let same = split == whole;
    let common = whole.chars().zip(split.chars()).take_while(|(a, b)| a == b).count();
    eprintln!(
        "[{name}] tensor parallel x{ranks}{label}: greedy text {}",
        if same { "same as whole".to_string() } else { format!("DIFFERS from whole after {common} chars") }
    );
    json!({ "whole": whole, "split": split, "same": same, "common_prefix_chars": common })
}

/// Scale to zero asleep (weights kept on the device), then the first request wakes it: each run's
/// time to first token.
async fn wake_from_sleep(registry: &ModelRegistry, name: &str, runs: usize) -> anyhow::Result<Value> {
    let (mut walls, mut rows) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let acquired = registry.acquire(name).await?;
        acquired.engine.generate(PROMPT.into(), first_token_params()).await?;
        drop(acquired);
        registry.sleep(name);
        tokio::time::sleep(Duration::from_millis(300)).await; // its thread ends and frees the KV cache
        let started = Instant::now();
        let acquired = registry.acquire(name).await?;
        let (_, finish) = acquired.engine.generate(PROMPT.into(), first_token_params()).await?;
        let wall = secs(started.elapsed());
        let load = acquired.engine.info.load;
        anyhow::ensure!(load.woke, "{name} was loaded again instead of woken");
        eprintln!(
            "[{name}] kindling wake from sleep (weights on the device), run {run}: {wall:.4} s (init {:.4} s, first token {:.4} s)",
            load.init.as_secs_f64(),
            finish.timing.first_token.as_secs_f64()
        );
        walls.push(wall);
        rows.push(
            json!({ "wall_s": wall, "init_s": secs(load.init), "first_token_s": secs(finish.timing.first_token) }),
        );
    }
    Ok(json!({ "runs": rows, "median_s": median(&mut walls) }))
}

/// Drops `files` from the page cache (clean pages of unmapped files: the pool must not hold them).
/// Returns the fraction of their pages still cached afterwards (`mincore`): the kernel may keep
/// some, and a measurement "from disk" says how far that held.
fn drop_from_page_cache(files: &[PathBuf]) -> anyhow::Result<f64> {
    let (mut cached, mut total) = (0.0, 0u64);
    for path in files {
        let file = std::fs::File::open(path)?;
        direct_io::drop_cached(&file).with_context(|| format!("dropping {} from the page cache", path.display()))?;
        let len = file.metadata()?.len();
        cached += direct_io::cached_fraction(&file)? * len as f64;
        total += len;
    }
    Ok(if total == 0 { 0.0 } else { cached / total as f64 })
}

/// Reads every byte of `files` with `readers` threads (disjoint 16 MiB pieces, in order), as the
/// disk baseline: seconds taken. `direct` reads around the page cache (`O_DIRECT`) into huge
/// pages, as the pool's admission does; otherwise through it, into ordinary buffers.
fn read_with(files: &[PathBuf], readers: usize, direct: bool) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 16 << 20;
    let pieces: Vec<(usize, u64, usize)> = files
        .iter()
        .enumerate()
        .map(|(i, p)| Ok((i, std::fs::metadata(p)?.len() as usize)))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flat_map(|(i, len)| (0..len.div_ceil(PIECE)).map(move |k| (i, (k * PIECE) as u64, PIECE.min(len - k * PIECE))))
        .collect();
    let opened: Vec<std::fs::File> = files.iter().map(std::fs::File::open).collect::<std::io::Result<_>>()?;
    let direct: Vec<std::fs::File> = if direct {
        files.iter().map(|p| direct_io::open_direct(p)).collect::<std::io::Result<_>>()?
    } else {
        Vec::new()
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..readers)
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    let mut buf = memmap2::MmapOptions::new().len(PIECE).map_anon()?;
                    if !direct.is_empty() {
                        #[cfg(target_os = "linux")]
                        let _ = buf.advise(memmap2::Advice::HugePage);
                    }
                    buf.fill(0);
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(file, offset, len)) = pieces.get(k) else { return Ok(()) };
                        match direct.get(file) {
                            Some(d) => direct_io::read_exact_direct(d, &opened[file], &mut buf, len, offset)?,
                            None => opened[file].read_exact_at(&mut buf[..len], offset)?,
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("reader thread"))
    })?;
    Ok(secs(started.elapsed()))
}

/// Pool misses from disk, `rounds` times: each round reads the model's files with 8 buffered
/// readers and with the admission's own number (and, the first time, 1), and with that number of
/// direct readers, each after dropping them from the page cache, then unloads the model, drops
/// its checkpoint from the pool and its files from the page cache, and sends the first request. Disk speed drifts between reads, so each miss is set
/// against the best read of its own round, and the medians over rounds are reported.
async fn pool_miss(
    registry: &ModelRegistry,
    pool: &CheckpointPool,
    name: &str,
    path: &Path,
    rounds: usize,
    disk_reads: bool,
) -> anyhow::Result<Value> {
    let files = Checkpoint::open(path)?.weight_files;
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
    let admission_readers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(16);
    // Each miss's greedy text must be what the pooled copy gives: a read that put a byte wrong
    // would show here, not in the timings. That judges only where the engine's greedy text
    // repeats from one load (for the 8B it did not while an engine's first step could race its
    // construction on another thread's stream; BENCHMARKS.md).
    let pooled_text = greedy_text_of(&registry.acquire(name).await?.engine).await?;
    // Twice from one load: a difference here is the engine's, not the read's.
    let pooled_text_repeats = greedy_text_of(&registry.acquire(name).await?.engine).await? == pooled_text;
    // Direct reads only where the file system takes them (not tmpfs before Linux 6.6).
    let direct = files.iter().all(|f| direct_io::open_direct(f).is_ok()).then_some((admission_readers, true));
    let (mut results, mut over, mut tails) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        let mut disk = serde_json::Map::new();
        let mut cached_before = serde_json::Map::new();
        let buffered: &[usize] = if round == 0 { &[1, 8, admission_readers] } else { &[8, admission_readers] };
        let reads = buffered.iter().map(|&n| (n, false)).chain(direct).filter(|_| disk_reads);
        for (readers, direct) in reads {
            let cached = drop_from_page_cache(&files)?;
            let s = read_with(&files, readers, direct)?;
            let how = if direct { "direct" } else { "buffered" };
            eprintln!(
                "[{name}] round {round}: disk, {readers} reader(s), {how}: {s:.3} s ({:.2} GB/s; {:.1}% cached before)",
                bytes as f64 / s / 1e9,
                cached * 100.0
            );
            let key = if direct { format!("direct_{readers}") } else { format!("readers_{readers}") };
            disk.insert(format!("{key}_s"), json!(s));
            cached_before.insert(key, json!(cached));
        }
        let best = disk.values().filter_map(Value::as_f64).fold(f64::INFINITY, f64::min);
        registry.unload(name);
        tokio::time::sleep(Duration::from_millis(300)).await; // the engine frees its memory
        anyhow::ensure!(pool.evict(path), "{name}'s checkpoint is still in use; cannot measure a miss");
        let cached = drop_from_page_cache(&files)?;
        cached_before.insert("miss".into(), json!(cached));
        let started = Instant::now();
        let acquired = registry.acquire(name).await?;
        acquired.engine.generate(PROMPT.into(), first_token_params()).await?;
        let wall = secs(started.elapsed());
        let load = acquired.engine.info.load;
        anyhow::ensure!(!load.pool_hit, "{name} was a pool hit");
        let text = greedy_text_of(&acquired.engine).await?;
        drop(acquired);
        // The last cell may still be registering; wait for it to report (a CPU pool pins
        // nothing).
        let mut phases = pool.admission_phases(path).unwrap_or_default();
        for _ in 0..100 {
            if phases.1.is_some() || !pool.pins() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            phases = pool.admission_phases(path).unwrap_or_default();
        }
        let (page_in, pin) = (secs(phases.0), secs(phases.1.unwrap_or_default()));
        eprintln!(
            "[{name}] round {round}: pool miss from disk ({:.1}% cached before): {wall:.3} s; its read {page_in:.3} s \
             (its cells registered beside it in {pin:.3} s), first token {:.3} s after the read; best disk read {best:.3} s; \
             over it by {:.3} s",
            cached * 100.0,
            wall - page_in,
            wall - best
        );
        let same_text = text == pooled_text;
        // Where the text cannot judge, the bytes do: the pool's against the files (the read;
        // with KINDLING_POOL_VERIFY=1 the load has compared the device's with the pool's).
        let bytes_as_files = if same_text {
            None
        } else {
            eprintln!(
                "[{name}] round {round}: the miss's text {text:?} differs from the pooled copy's {pooled_text:?} \
                 (which {} from one load)",
                if pooled_text_repeats { "repeats" } else { "does not repeat" }
            );
            let pooled = pool.checkout_path(path, &|_| {})?.0;
            let unlike = tokio::task::spawn_blocking(move || pooled.first_byte_unlike_files()).await??;
            eprintln!("[{name}] round {round}: the pool's bytes differ from the files at {unlike:?}");
            Some(unlike.is_none())
        };
        over.push(wall - best);
        tails.push(wall - page_in);
        results.push(json!({
            "disk": disk, "cached_fraction": cached_before, "best_disk_s": best, "miss_s": wall,
            "admit_s": secs(load.admit), "page_in_s": page_in, "pin_s": pin, "h2d_s": secs(load.h2d),
            "over_disk_s": wall - best, "after_read_s": wall - page_in, "text_as_pooled": same_text,
            "pool_bytes_as_files": bytes_as_files, "miss_text": text,
        }));
    }
    let (over, tail) = (median(&mut over), median(&mut tails));
    eprintln!(
        "[{name}] pool miss over the disk read: median {over:.3} s; first token after the read: median {tail:.3} s"
    );
    let admission = ["KINDLING_POOL_READ", "KINDLING_POOL_PIN", "KINDLING_POOL_HUGEPAGES"]
        .map(|var| (var, std::env::var(var).unwrap_or_else(|_| "default".into())));
    Ok(json!({
        "bytes": bytes, "rounds": results, "over_disk_median_s": over, "after_read_median_s": tail,
        "admission": serde_json::Map::from_iter(admission.map(|(k, v)| (k.to_string(), json!(v)))),
        "pooled_text": pooled_text, "pooled_text_repeats": pooled_text_repeats,
    }))
}

/// Models whose pool misses (`--pool-miss`) loaded other weights than a hit does: the pool's
/// bytes differ from the files, or the greedy text differs from the pooled copy's where the
/// engine's greedy text repeats.
fn misses_that_loaded_other_weights(results: &Value) -> Vec<String> {
    let models = results["models"].as_object().into_iter().flatten();
    models
        .filter(|(_, m)| {
            let judged_by_text = m["pool_miss"]["pooled_text_repeats"] == true;
            let mut rounds = m["pool_miss"]["rounds"].as_array().into_iter().flatten();
            rounds.any(|r| r["pool_bytes_as_files"] == false || (judged_by_text && r["text_as_pooled"] == false))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Starts every model of `models` from zero at once: for each, its name, the seconds from
/// `started` to its first token, and how it loaded.
fn scale_from_zero(
    registry: &Arc<ModelRegistry>,
    models: &[(String, PathBuf)],
    started: Instant,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<(String, f64, kindling_engine::LoadBreakdown)>>> {
    models
        .iter()
        .map(|(name, _)| {
            let (registry, name) = (registry.clone(), name.clone());
            tokio::spawn(async move {
                let acquired = registry.acquire(&name).await?;
                acquired.engine.generate(PROMPT.into(), first_token_params()).await?;
                anyhow::Ok((name, secs(started.elapsed()), acquired.engine.info.load))
            })
        })
        .collect()
}

/// Every model scaled from zero at the same moment (all pooled already): each one's time to
/// first token and the worker it was placed on.
async fn together(registry: &Arc<ModelRegistry>, models: &[(String, PathBuf)]) -> anyhow::Result<Value> {
    for (name, _) in models {
        registry.unload(name);
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // let the old engines free their memory
    let started = Instant::now();
    let tasks = scale_from_zero(registry, models, started);
    let mut rows = Vec::new();
    for task in tasks {
        let (name, wall, load) = task.await??;
        let row = json!({
            "model": name, "wall_s": wall, "worker": registry.worker_of(&name),
            "pool_hit": load.pool_hit, "h2d_s": secs(load.h2d),
        });
        eprintln!("[together] {row}");
        rows.push(row);
    }
    let mut walls: Vec<f64> = rows.iter().filter_map(|r| r["wall_s"].as_f64()).collect();
    walls.sort_by(f64::total_cmp);
    let (p50, p99) = (crate::bench_serve::percentile(&walls, 0.5), crate::bench_serve::percentile(&walls, 0.99));
    eprintln!("[together] {} models, time to first token p50 {p50:.4} s, p99 {p99:.4} s", walls.len());
    Ok(json!({ "models": rows, "first_token_p50_s": p50, "first_token_p99_s": p99 }))
}

/// The first model streams a long generation; once it is in steady state the others are scaled
/// from zero (from the pool) at once. Its gaps between tokens before the loads (the baseline, same
/// run) and while they run show whether a cold load stalls warm traffic.
async fn warm_traffic(registry: &Arc<ModelRegistry>, models: &[(String, PathBuf)]) -> anyhow::Result<Value> {
    let (warm, cold) = (&models[0].0, &models[1..]);
    for (name, _) in cold {
        registry.unload(name);
    }
    let acquired = registry.acquire(warm).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // the unloaded engines free their memory
    let params = SamplingParams { max_tokens: 4096, temperature: 0.0, ..SamplingParams::default() };
    let mut stream = acquired.engine.submit(PROMPT.into(), params)?;
    let mut stamps = Vec::new();
    while stamps.len() < 48 {
        match stream.next().await {
            Some(Ok(kindling_engine::StreamItem::Text(_))) => stamps.push(Instant::now()),
            other => anyhow::bail!("the warm stream ended during warm-up: {other:?}"),
        }
    }
    let loads_started = Instant::now();
    let loads = scale_from_zero(registry, cold, loads_started);
    let loads_done = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let waiter = {
        let loads_done = loads_done.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for load in loads {
                let (name, wall, _) = load.await??;
                out.push((name, wall));
            }
            *loads_done.lock().unwrap() = Some(Instant::now());
            anyhow::Ok(out)
        })
    };
    // Keep reading until a second after the loads finished (or the stream ends).
    loop {
        let done = *loads_done.lock().unwrap();
        if done.is_some_and(|d| d.elapsed() > Duration::from_secs(1)) {
            break;
        }
        match stream.next().await {
            Some(Ok(kindling_engine::StreamItem::Text(_))) => stamps.push(Instant::now()),
            _ => break,
        }
    }
    drop(stream);
    let cold_first_tokens = waiter.await??;
    let loads_ended = loads_done.lock().unwrap().context("the loads did not finish")?;
    let gaps = |from: Instant, to: Instant| -> Vec<f64> {
        let mut g: Vec<f64> =
            stamps.windows(2).filter(|w| w[1] > from && w[0] < to).map(|w| secs(w[1] - w[0])).collect();
        g.sort_by(f64::total_cmp);
        g
    };
    let before = gaps(stamps[8], loads_started);
    let during = gaps(loads_started, loads_ended);
    let stats = |g: &[f64]| {
        let mean = g.iter().sum::<f64>() / g.len().max(1) as f64;
        json!({ "tokens": g.len(), "mean_s": mean, "p50_s": crate::bench_serve::percentile(g, 0.5),
                "max_s": g.last().copied().unwrap_or(f64::NAN) })
    };
    let (b, d) = (stats(&before), stats(&during));
    let ratio = d["mean_s"].as_f64().unwrap_or(f64::NAN) / b["mean_s"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "[warm traffic] {warm}: time per output token {:.4} s before, {:.4} s while {} model(s) loaded (x{ratio:.2}, longest gap {:.4} s); their first tokens: {cold_first_tokens:?}",
        b["mean_s"].as_f64().unwrap_or(f64::NAN),
        d["mean_s"].as_f64().unwrap_or(f64::NAN),
        cold.len(),
        d["max_s"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(json!({
        "warm_model": warm,
        "loaded": cold_first_tokens.iter().map(|(n, t)| json!({ "model": n, "first_token_s": t })).collect::<Vec<_>>(),
        "tpot_before": b, "tpot_during_loads": d, "tpot_during_over_before": ratio,
    }))
}

fn print_summary(results: &Value) {
    println!("\ncold start to first token (median of {} runs, {}):", results["runs"], results["device"]);
    println!(
        "{:<14} {:>9} {:>12} {:>14} {:>12} {:>16} {:>16} {:>10}",
        "model", "wake s", "warm+pool s", "fresh kindling", "fresh HF s", "fresh/warm", "HF/warm", "h2d GB/s"
    );
    for (name, m) in results["models"].as_object().into_iter().flatten() {
        let warm = m["kindling_warm_pool"]["median_s"].as_f64().unwrap_or(f64::NAN);
        let wake = m["kindling_wake"]["median_s"].as_f64().unwrap_or(f64::NAN);
        let fresh = m["kindling_fresh_process"]["median_s"].as_f64().unwrap_or(f64::NAN);
        let hf = m["hf_fresh_process"]["median_s"].as_f64().unwrap_or(f64::NAN);
        let mut gbps: Vec<f64> = m["kindling_warm_pool"]["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["h2d_GBps"].as_f64())
            .collect();
        println!(
            "{name:<14} {wake:>9.4} {warm:>12.4} {fresh:>14.3} {hf:>12.3} {:>15.1}x {:>15.1}x {:>10.1}",
            fresh / warm,
            hf / warm,
            median(&mut gbps)
        );
        if let Some(split) = m["tensor_parallel"].as_object() {
            let tp = split["median_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{name:<14} split over {} workers (tensor parallel): {tp:.4} s, {:.2}x the single worker's warm+pool; greedy text same as whole: {} (f32: {})",
                split["ranks"],
                warm / tp,
                split["greedy_text"]["same"],
                split["greedy_text_f32"]["same"]
            );
        }
    }
}
