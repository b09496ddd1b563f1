//! `kindling`: run the server and talk to it.

mod bench;
mod bench_cluster;
mod bench_invoke;
mod bench_serve;
mod client;
mod picker;
mod serve;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kindling_engine::tiny_model::{TinySpec, make_tiny_model};
use kindling_engine::{Architecture, Worker};

#[derive(Parser)]
#[command(name = "kindling", version, about = "Serverless LLM functions: Wasm handlers, warm models.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
pub struct Remote {
    /// Server base URL.
    #[arg(long, env = "KINDLING_URL", default_value = "http://127.0.0.1:7070", global = true)]
    url: String,
    /// Admin token, when the server requires one.
    #[arg(long, env = "KINDLING_ADMIN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: invocations at deployment routes, the admin API under /admin.
    Serve(serve::ServeArgs),
    /// Run the endpoint picker Envoy asks (ext_proc) which node should serve each request.
    Picker(picker::PickerArgs),
    /// Deploy (or redeploy) a handler component with its manifest.
    Deploy {
        /// The deployment manifest (kindling.toml).
        #[arg(long, short, default_value = "kindling.toml")]
        manifest: PathBuf,
        /// The handler component (.wasm).
        #[arg(long, short)]
        component: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// List deployments.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a deployment.
    Delete {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Send a request to a deployment's route and print the response body as it streams.
    Invoke {
        /// Path to call, e.g. /hello.
        path: String,
        /// Request body (sent as POST); without it a GET is sent.
        #[arg(long, short)]
        data: Option<String>,
        /// Print the status line and headers too.
        #[arg(long, short = 'i')]
        include: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Benchmarks (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Manage models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Request to first token for a model with no engine: warm worker + pool vs fresh processes.
    Coldstart(bench::ColdstartArgs),
    /// Warm-path throughput: N concurrent streams through the OpenAI plugin vs HF transformers.
    Serve(bench_serve::ServeBenchArgs),
    /// What an invocation itself costs: handlers that do not generate against /healthz.
    Invoke(bench_invoke::InvokeBenchArgs),
    /// Model-locality routing vs round robin over a cluster's gateway (scripts/bench/cluster.sh).
    Cluster(bench_cluster::ClusterBenchArgs),
    /// One fresh-process cold start (used by `coldstart` as its baseline).
    #[command(hide = true)]
    Once(bench::OnceArgs),
}

/// Parses `--arch` by the architectures table, so a new family member needs no CLI change.
fn parse_arch(s: &str) -> Result<Architecture, String> {
    Architecture::from_model_type(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Register a model with a running server: an HF directory (config.json, tokenizer.json,
    /// safetensors) or a GGUF file (or a directory holding one).
    Add {
        name: String,
        path: PathBuf,
        /// Also admit the weights to the server's checkpoint pool now (with a progress bar), so the
        /// first request is a pool hit.
        #[arg(long)]
        preload: bool,
        /// Split it over N of the server's GPUs (tensor parallelism).
        #[arg(long, value_name = "N")]
        tensor_parallel: Option<usize>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the models a running server knows.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the token ids a model's own tokenizer gives a text (HF directory or GGUF file).
    Tokenize { path: PathBuf, text: String },
    /// Write a deterministic tiny model of a real architecture (for tests and offline demos).
    MakeTiny {
        /// Directory to write.
        dir: PathBuf,
        /// llama, qwen2, qwen3, mistral or opt.
        #[arg(long, value_parser = parse_arch, default_value = "qwen2")]
        arch: Architecture,
    },
}

/// Makes the worker `--device` names, warm, off the async runtime (GPU boot takes a while).
pub async fn worker_from_args(device: &str, engine_memory_gib: f64, arena_fraction: f64) -> anyhow::Result<Worker> {
    let mut workers = workers_from_args(device, engine_memory_gib, arena_fraction).await?;
    anyhow::ensure!(workers.len() == 1, "--device {device:?}: one device here");
    Ok(workers.remove(0))
}

/// Makes one warm worker per device `--device` names ("cpu", "cuda", "cuda:N", a comma-separated
/// list of those, or "cuda:all"), booting them in parallel off the async runtime.
pub async fn workers_from_args(spec: &str, engine_memory_gib: f64, arena_fraction: f64) -> anyhow::Result<Vec<Worker>> {
    let budget = serve::gib(engine_memory_gib);
    let devices = device_list(spec)?;
    let boots: Vec<_> = devices
        .into_iter()
        .map(|ordinal| {
            tokio::task::spawn_blocking(move || -> anyhow::Result<Worker> {
                match ordinal {
                    None => Ok(kindling_engine::worker::warm_cpu(budget)?),
                    Some(ordinal) => cuda_worker(ordinal, arena_fraction),
                }
            })
        })
        .collect();
    let mut workers = Vec::with_capacity(boots.len());
    for boot in boots {
        workers.push(boot.await??);
    }
    Ok(workers)
}

/// The devices a `--device` value names: `None` for the CPU, GPU ordinals otherwise.
pub fn device_list(spec: &str) -> anyhow::Result<Vec<Option<usize>>> {
    if spec == "cuda:all" {
        let count = cuda_device_count()?;
        anyhow::ensure!(count > 0, "--device cuda:all: no CUDA device found");
        return Ok((0..count).map(Some).collect());
    }
    let devices: Vec<Option<usize>> = spec.split(',').map(|d| cuda_ordinal(d.trim())).collect::<anyhow::Result<_>>()?;
    let mut seen = std::collections::BTreeSet::new();
    for d in &devices {
        anyhow::ensure!(seen.insert(*d), "--device {spec:?} names a device twice");
    }
    anyhow::ensure!(
        devices.len() == 1 || devices.iter().all(Option::is_some),
        "--device {spec:?}: the CPU is one device; list GPUs only"
    );
    Ok(devices)
}

/// `None` for "cpu", the GPU ordinal for "cuda" / "cuda:N".
pub fn cuda_ordinal(device: &str) -> anyhow::Result<Option<usize>> {
    match device.strip_prefix("cuda") {
        _ if device == "cpu" => Ok(None),
        Some("") => Ok(Some(0)),
        Some(n) if n.starts_with(':') => Ok(Some(n[1..].parse().with_context(|| format!("--device {device}"))?)),
        _ => anyhow::bail!("--device must be cpu, cuda, cuda:N, a list of those or cuda:all, got {device:?}"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> anyhow::Result<usize> {
    Ok(kindling_engine::worker::cuda_device_count()?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> anyhow::Result<usize> {
    anyhow::bail!("this kindling was built without CUDA; rebuild with `cargo build --release --features cuda`")
}

#[cfg(feature = "cuda")]
fn cuda_worker(ordinal: usize, arena_fraction: f64) -> anyhow::Result<Worker> {
    Ok(Worker::cuda(ordinal, arena_fraction)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_worker(_: usize, _: f64) -> anyhow::Result<Worker> {
    anyhow::bail!("this kindling was built without CUDA; rebuild with `cargo build --release --features cuda`")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Picker(args) => picker::run(args),
        Command::Deploy { manifest, component, remote } => client::deploy(&remote, &manifest, &component),
        Command::List { remote } => client::print_json(&remote, "GET", "/admin/deployments", None),
        Command::Delete { name, remote } => client::delete(&remote, &name),
        Command::Invoke { path, data, include, remote } => client::invoke(&remote, &path, data, include),
        Command::Bench { command } => match command {
            BenchCommand::Coldstart(args) => bench::coldstart(args),
            BenchCommand::Once(args) => bench::once(args),
            BenchCommand::Serve(args) => bench_serve::serve(args),
            BenchCommand::Invoke(args) => bench_invoke::invoke(args),
            BenchCommand::Cluster(args) => bench_cluster::cluster(args),
        },
        Command::Models { command } => match command {
            ModelsCommand::Add { name, path, preload, tensor_parallel, remote } => {
                let path = std::fs::canonicalize(&path).with_context(|| format!("{}", path.display()))?;
                let mut body = serde_json::json!({ "name": name, "path": path });
                if let Some(n) = tensor_parallel {
                    body["tensor_parallel"] = n.into();
                }
                client::print_json(&remote, "POST", "/admin/models", Some(body))?;
                if preload {
                    client::preload(&remote, &name)?;
                }
                Ok(())
            }
            ModelsCommand::List { remote } => client::print_json(&remote, "GET", "/admin/models", None),
            ModelsCommand::Tokenize { path, text } => {
                let tokenizer = kindling_engine::Checkpoint::open(&path)?.load_tokenizer()?;
                let encoding = tokenizer.encode(text, true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
                let decoded =
                    tokenizer.decode(encoding.get_ids(), true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
                println!(
                    "{}",
                    serde_json::json!({ "ids": encoding.get_ids(), "tokens": encoding.get_tokens(), "decoded": decoded })
                );
                Ok(())
            }
            ModelsCommand::MakeTiny { dir, arch } => {
                let config = make_tiny_model(&dir, &TinySpec::new(arch))?;
                println!(
                    "wrote tiny {} model to {} (vocab {}, hidden {}, {} layers)",
                    arch.name(),
                    dir.display(),
                    config.vocab_size,
                    config.hidden_size,
                    config.num_layers
                );
                Ok(())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{cuda_ordinal, device_list};

    #[test]
    fn device_names_parse_or_explain() {
        assert_eq!(cuda_ordinal("cpu").unwrap(), None);
        assert_eq!(cuda_ordinal("cuda").unwrap(), Some(0));
        assert_eq!(cuda_ordinal("cuda:3").unwrap(), Some(3));
        for bad in ["gpu", "cuda3", "cuda:x", "cuda:"] {
            assert!(cuda_ordinal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_lists_name_each_gpu_once() {
        assert_eq!(device_list("cpu").unwrap(), [None]);
        assert_eq!(device_list("cuda:0, cuda:1").unwrap(), [Some(0), Some(1)]);
        for bad in ["cuda:0,cuda:0", "cpu,cuda:1", "cpu,cpu", "cuda:0,"] {
            assert!(device_list(bad).is_err(), "{bad}");
        }
    }
}
