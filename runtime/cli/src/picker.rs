//! `kindling picker`: the endpoint picker for Envoy, as its own process beside the gateway.

use std::time::Duration;

use anyhow::Context;
use kindling_picker::{PickerConfig, Policy};

#[derive(clap::Args, Debug)]
pub struct PickerArgs {
    /// Address Envoy's ext_proc cluster connects to (gRPC over HTTP/2, plaintext).
    #[arg(long, default_value = "127.0.0.1:9002")]
    listen: std::net::SocketAddr,
    /// Kindling nodes, `host:port`; repeat for each. A DNS name is resolved at every scrape to all
    /// its addresses (a Kubernetes headless service: every pod), so nodes may come and go.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// The nodes' admin token (their /metrics and /admin/deployments need it).
    #[arg(long, env = "KINDLING_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How often each node is scraped, in milliseconds.
    #[arg(long, default_value_t = 250)]
    scrape_ms: u64,
    /// Sequences a node may have queued over the least loaded one before locality stops
    /// winning it requests.
    #[arg(long, default_value_t = 8.0)]
    imbalance: f64,
    /// KV-cache usage (0 to 1) past which a node stops winning requests for locality.
    #[arg(long, default_value_t = 0.9)]
    kv_ceiling: f64,
    /// Serve the picker's own metrics (Prometheus text) here.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The nodes' `--domain`, so `Host: NAME.<domain>` resolves as they resolve it.
    #[arg(long)]
    domain: Option<String>,
}

pub fn run(args: PickerArgs) -> anyhow::Result<()> {
    crate::serve::init_logging(false);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("bind {}", args.listen))?;
        println!("kindling picker listening on {}", listener.local_addr()?);
        let config = PickerConfig {
            nodes: args.nodes,
            admin_token: args.admin_token,
            scrape_every: Duration::from_millis(args.scrape_ms.max(10)),
            policy: Policy {
                imbalance: args.imbalance,
                kv_ceiling: args.kv_ceiling,
                domain: args.domain.map(|d| d.trim_matches('.').to_ascii_lowercase()),
            },
        };
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        let metrics = match args.metrics_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?),
            None => None,
        };
        kindling_picker::serve(listener, metrics, config, shutdown).await
    })
}
