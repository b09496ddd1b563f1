//! `kindling serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kindling_engine::autoscaler;
use kindling_engine::{CheckpointPool, EngineConfig, ModelRegistry};
use kindling_server::{App, ServerConfig};
use tracing_subscriber::EnvFilter;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where deployments, compiled components and state live.
    #[arg(long, default_value = ".kindling")]
    data_dir: PathBuf,
    /// Where compiled components are cached (default: DATA_DIR/compiled). Safe to share between servers.
    #[arg(long)]
    compile_cache: Option<PathBuf>,
    /// Register a model at start: NAME=PATH to an HF-format directory or a GGUF file. Repeatable.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
    /// Split a model given with --model over N workers (tensor parallelism: each GPU holds its
    /// share of the heads and MLP columns and loads it over its own link). NAME=N; repeatable.
    #[arg(long = "tensor-parallel", value_name = "NAME=N")]
    tensor_parallel: Vec<String>,
    /// Require this bearer token on the admin API.
    #[arg(long, env = "KINDLING_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Scale a model's engine to zero after this many seconds without requests: its thread and KV
    /// cache go, its weights stay on the device (asleep) until the memory is needed, so the next
    /// request wakes it in milliseconds; 0 keeps engines running.
    #[arg(long, default_value_t = 300)]
    idle_unload_secs: u64,
    /// Where engines run: "cpu", or "cuda" / "cuda:N", a list ("cuda:0,cuda:1") or "cuda:all"
    /// (needs a build with --features cuda): one warm worker per GPU, each model placed on the
    /// GPU with the most room, else where the least recently used idle engines make room.
    #[arg(long, alias = "devices", default_value = "cpu")]
    device: String,
    /// Checkpoint pool capacity in GiB: model files kept resident (and pinned on GPU hosts).
    #[arg(long, default_value_t = 64.0)]
    pool_gib: f64,
    /// On CPU: GiB the engines may hold at once, weights and KV caches (least recently used idle
    /// engines are dropped past it).
    #[arg(long, default_value_t = 16.0)]
    engine_memory_gib: f64,
    /// On CUDA: fraction of free GPU memory reserved at boot as the engines' arena.
    #[arg(long, default_value_t = 0.8)]
    arena_fraction: f64,
    /// Sequences one model's engine decodes together in a step (continuous batching).
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    /// Tokens one engine step may feed: decode tokens plus chunks of prompts being prefilled;
    /// default 1024 on CPU, 4096 on a GPU (where a bigger prefill chunk costs little per token).
    #[arg(long)]
    max_step_tokens: Option<usize>,
    /// GiB of paged KV cache per model (less when its context and --max-running need less);
    /// default 0.25 on CPU, 16 on a GPU.
    #[arg(long)]
    kv_cache_gib: Option<f64>,
    /// Caps every model's context (prompt + completion tokens) below its max_position_embeddings.
    #[arg(long)]
    max_context: Option<usize>,
    /// Keep GGUF weights quantized and multiply with quantized matmuls on CPU too (the GPU
    /// default; activations are quantized to 8 bits). CPU default: dequantize to f32 at load.
    #[arg(long)]
    quantized_matmul: bool,
    /// Compute dtype of every model's weights, activations and KV cache: f32 or bf16.
    /// Default: f32 on CPU, bf16 on a GPU.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<kindling_engine::DType>,
    /// Handler instances that may exist at once across all deployments (pooling allocator slots).
    #[arg(long, default_value_t = 128)]
    max_instances: u32,
    /// KiB of each handler memory and table slot (and up to 512 of its async stack) kept resident
    /// between instances: the pages an instance wrote are reset in place instead of returned to
    /// the kernel, so the next instance in the slot takes no page faults. Use 0 on kernels
    /// without PAGEMAP_SCAN (before Linux 6.7), where the whole prefix is reset every time.
    #[arg(long, default_value_t = 16 << 10)]
    keep_resident_kib: usize,
    /// Handler instances made ahead of requests, one per recently invoked deployment, in slots of
    /// their own on top of --max-instances (each request still gets an instance no request has
    /// used); 0 instantiates every instance on its request's path.
    #[arg(long, default_value_t = 16)]
    warm_instances: usize,
    /// Serve deployment NAME at `http://NAME.<DOMAIN>/` (by the Host header) besides its routes.
    #[arg(long)]
    domain: Option<String>,
    /// Connections open at once; past it the server stops accepting until one closes.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Seconds in-flight requests get to finish after SIGTERM; guests still running then are stopped.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Seconds a client has to send request headers; also how long an idle keep-alive connection stays open.
    #[arg(long, default_value_t = 10)]
    header_timeout_secs: u64,
    /// Deployments each tenant may have (the operator can grant a tenant another number).
    #[arg(long, default_value_t = 16)]
    tenant_max_deployments: u32,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Shared state for a cluster: tenants, deployments and registered models in this PostgreSQL
    /// database (`postgres://user@host:port/db`), followed by every node. Needs `--blobs`.
    /// Without it, state lives under `--data-dir` (single node).
    #[arg(long, env = "KINDLING_STATE", requires = "blobs", hide_env_values = true)]
    state: Option<String>,
    /// Where a cluster keeps component bytes: S3-compatible storage as `https://host[:port]/bucket` (or http)
    /// (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, region from AWS_REGION).
    #[arg(long, env = "KINDLING_BLOBS", requires = "state")]
    blobs: Option<String>,
    /// Seconds between full resyncs with the shared state (each change is also followed at once).
    #[arg(long, default_value_t = 30)]
    resync_secs: u64,
}

pub fn gib(v: f64) -> u64 {
    (v.max(0.0) * (1u64 << 30) as f64) as u64
}

/// Logs to stderr, filtered by `KINDLING_LOG` (default `info`).
/// `--dtype`: the compute dtypes a model may run in.
fn parse_dtype(name: &str) -> Result<kindling_engine::DType, String> {
    match name {
        "f32" => Ok(kindling_engine::DType::F32),
        "bf16" => Ok(kindling_engine::DType::BF16),
        _ => Err(format!("{name:?} is not a compute dtype: use f32 or bf16")),
    }
}

/// `--tensor-parallel NAME=N` flags as NAME -> N, each naming a model given with `--model`.
fn tensor_parallel_specs(
    specs: &[String],
    models: &[String],
) -> anyhow::Result<std::collections::HashMap<String, usize>> {
    let mut splits = std::collections::HashMap::new();
    for spec in specs {
        let parsed = spec.split_once('=').and_then(|(name, n)| Some((name, n.parse::<usize>().ok()?)));
        let Some((name, ranks)) = parsed else {
            anyhow::bail!("--tensor-parallel {spec:?}: expected NAME=N, N a number of workers");
        };
        if !models.iter().any(|m| m.split_once('=').is_some_and(|(n, _)| n == name)) {
            anyhow::bail!("--tensor-parallel {spec:?}: no --model {name}=PATH to split");
        }
        splits.insert(name.to_string(), ranks);
    }
    Ok(splits)
}

pub(crate) fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("KINDLING_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let served = runtime.block_on(async move {
        let workers = crate::workers_from_args(&args.device, args.engine_memory_gib, args.arena_fraction).await?;
        for worker in &workers {
            tracing::info!(worker = %worker.label, boot_ms = worker.boot_time.as_millis() as u64, budget = worker.memory_budget, "worker ready");
        }
        let worker = &workers[0];
        // Pinned pages are registered portable: every GPU's worker can DMA from them.
        let pool = Arc::new(CheckpointPool::new(gib(args.pool_gib), worker.pinner()));
        let engine_config = EngineConfig {
            max_running: args.max_running.max(1),
            max_waiting: args.max_running.max(1),
            max_step_tokens: args
                .max_step_tokens
                .unwrap_or(if worker.device.is_cpu() { 1024 } else { 4096 })
                .max(args.max_running.max(1)),
            kv_cache_bytes: gib(args.kv_cache_gib.unwrap_or(if worker.device.is_cpu() { 0.25 } else { 16.0 })),
            max_context: args.max_context,
            dequantize: if args.quantized_matmul { Some(false) } else { None },
            dtype: args.dtype,
        };
        let workers = workers.into_iter().map(Arc::new).collect();
        let registry = Arc::new(ModelRegistry::with_workers(workers, pool, engine_config));
        let splits = tensor_parallel_specs(&args.tensor_parallel, &args.models)?;
        for spec in &args.models {
            let (name, path) = spec.split_once('=').with_context(|| format!("--model {spec:?}: expected NAME=PATH"))?;
            let ranks = splits.get(name).copied().unwrap_or(1);
            let entry =
                registry.register_split(name, path.as_ref(), ranks).with_context(|| format!("--model {spec}"))?;
            tracing::info!(model = %entry.name, arch = entry.architecture, bytes = entry.weight_bytes, ranks, "registered model");
        }
        let mut config = ServerConfig::new(args.data_dir.clone());
        config.admin_token = args.admin_token.clone();
        config.runtime.max_instances = args.max_instances.max(1);
        config.runtime.keep_resident_bytes = args.keep_resident_kib << 10;
        config.runtime.warm_instances = args.warm_instances;
        config.domain = args.domain.clone().map(|d| d.trim_matches('.').to_ascii_lowercase());
        config.max_connections = args.max_connections.max(1);
        config.drain_timeout = Duration::from_secs(args.drain_secs);
        config.header_read_timeout = Duration::from_secs(args.header_timeout_secs.max(1));
        config.tenant_max_deployments = args.tenant_max_deployments;
        if let (Some(postgres_url), Some(blobs)) = (&args.state, &args.blobs) {
            let blobs = kindling_server::store::s3::S3Config::from_url(blobs)?;
            config.state = kindling_server::store::StateConfig::Shared { postgres_url: postgres_url.clone(), blobs };
        }
        config.resync_interval = Duration::from_secs(args.resync_secs.max(1));
        if let Some(dir) = &args.compile_cache {
            config.runtime.cache_dir = Some(dir.clone());
        }
        let app = App::open(config, registry.clone()).await?;

        if args.idle_unload_secs > 0 {
            autoscaler::spawn_idle_reaper(registry.clone(), Duration::from_secs(args.idle_unload_secs));
        }

        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("bind {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Scripts and tests read this line to learn the port.
        println!("kindling listening on http://{addr}");
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        kindling_server::serve(app, listener, shutdown).await
    });
    // Guests were stopped by `serve`; do not wait on stragglers (e.g. a tokenizer call) for ever.
    runtime.shutdown_timeout(Duration::from_secs(5));
    served
}

#[cfg(test)]
mod tests {
    use super::{parse_dtype, tensor_parallel_specs};

    #[test]
    fn dtype_flags_name_a_compute_dtype() {
        assert_eq!(parse_dtype("f32"), Ok(kindling_engine::DType::F32));
        assert_eq!(parse_dtype("bf16"), Ok(kindling_engine::DType::BF16));
        for bad in ["int8", "f16"] {
            assert!(parse_dtype(bad).unwrap_err().contains("f32 or bf16"), "{bad}");
        }
    }

    #[test]
    fn tensor_parallel_flags_name_a_model_and_a_number() {
        let models = ["big=/m/big".to_string(), "small=/m/small".to_string()];
        let splits = tensor_parallel_specs(&["big=2".into()], &models).unwrap();
        assert_eq!(splits.get("big"), Some(&2));
        assert_eq!(splits.get("small"), None, "not split: whole on one worker");
        for bad in ["big", "big=two", "big=-1", "other=2"] {
            assert!(tensor_parallel_specs(&[bad.to_string()], &models).is_err(), "{bad}");
        }
    }
}
