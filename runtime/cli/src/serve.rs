//! `kindling serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kindling_engine::{Device, ModelRegistry};
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
    /// Register a model at start: NAME=PATH to an HF-format directory. Repeatable.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
    /// Require this bearer token on the admin API.
    #[arg(long, env = "KINDLING_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Drop a model's engine after this many seconds without requests (scale to zero); 0 keeps engines.
    #[arg(long, default_value_t = 300)]
    idle_unload_secs: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn init_logging(json: bool) {
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
    runtime.block_on(async move {
        let registry = Arc::new(ModelRegistry::new(Device::Cpu));
        for spec in &args.models {
            let (name, path) = spec.split_once('=').with_context(|| format!("--model {spec:?}: expected NAME=PATH"))?;
            let entry = registry.register(name, path.as_ref()).with_context(|| format!("--model {spec}"))?;
            tracing::info!(model = %entry.name, arch = entry.architecture, bytes = entry.weight_bytes, "registered model");
        }
        let mut config = ServerConfig::new(args.data_dir.clone());
        config.admin_token = args.admin_token.clone();
        if let Some(dir) = &args.compile_cache {
            config.runtime.cache_dir = Some(dir.clone());
        }
        let app = App::open(config, registry.clone()).await?;

        if args.idle_unload_secs > 0 {
            let idle = Duration::from_secs(args.idle_unload_secs);
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(idle.min(Duration::from_secs(5)));
                loop {
                    tick.tick().await;
                    for name in registry.unload_idle(idle) {
                        tracing::info!(model = %name, "scaled to zero after idle timeout");
                    }
                }
            });
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
    })
}
