//! `kindling bench cluster`: one workload over more models than one node holds, sent through
//! the gateway twice in the same run: routed by the endpoint picker (model locality) and round
//! robin. Each phase uses its own copies of the models, so both start with every model on disk
//! only. Reports time to first token (p50/p99), engine starts by where the weights came from
//! (device-resident wake, pool hit, disk read), and the ratios round robin / locality.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench_serve::{percentile, round4, stream_once};

#[derive(clap::Args, Debug)]
pub struct ClusterBenchArgs {
    /// The gateway listener that asks the picker.
    #[arg(long)]
    gateway: String,
    /// The gateway listener that balances round robin over the same nodes.
    #[arg(long)]
    round_robin: String,
    /// Every node, `host:port` (their metrics count engine starts), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    #[arg(long, env = "KINDLING_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Models the locality phase asks for (served by an OpenAI plugin deployment at /v1).
    #[arg(long, value_delimiter = ',', required = true)]
    models_locality: Vec<String>,
    /// As many other models, of the same shape, for the round-robin phase.
    #[arg(long, value_delimiter = ',', required = true)]
    models_round_robin: Vec<String>,
    #[arg(long, default_value_t = 96)]
    requests: usize,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Popularity skew: model i is asked for in proportion to 1/(i+1)^zipf.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// The model index of each request: seeded, Zipf-skewed, the same for both phases.
fn workload(requests: usize, models: usize, skew: f64, seed: u64) -> Vec<usize> {
    let weights: Vec<f64> = (0..models).map(|i| 1.0 / ((i + 1) as f64).powf(skew)).collect();
    let total: f64 = weights.iter().sum();
    let mut state = seed;
    (0..requests)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut u = (state >> 11) as f64 / (1u64 << 53) as f64 * total;
            weights
                .iter()
                .position(|w| {
                    u -= w;
                    u < 0.0
                })
                .unwrap_or(models - 1)
        })
        .collect()
}

/// `kindling_cold_starts_total` summed over the nodes, by `pool` label, for `models`.
fn cold_starts(args: &ClusterBenchArgs, models: &[String]) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for node in &args.nodes {
        let mut req = ureq::get(&format!("http://{node}/metrics"));
        if let Some(t) = &args.admin_token {
            req = req.set("authorization", &format!("Bearer {t}"));
        }
        let text = req.call().with_context(|| format!("metrics of {node}"))?.into_string()?;
        for line in text.lines().filter(|l| l.starts_with("kindling_cold_starts_total{")) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let label = |k: &str| series.split(&format!("{k}=\"")).nth(1).and_then(|v| v.split('"').next());
            if label("model").is_some_and(|m| models.iter().any(|x| x == m)) {
                *out.entry(label("pool").unwrap_or("?").to_string()).or_default() +=
                    value.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(out)
}

fn phase(args: &ClusterBenchArgs, label: &str, url: &str, models: &[String], order: &[usize]) -> anyhow::Result<Value> {
    let before = cold_starts(args, models)?;
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.concurrency.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&model) = order.get(i) else { return };
                    match stream_once(url, &models[model], "Say hello to the cluster.", args.max_tokens, Instant::now())
                    {
                        Ok(r) => results.lock().unwrap().push(r.first_event.as_secs_f64()),
                        Err(e) => errors.lock().unwrap().push(format!("{e:#}")),
                    }
                }
            });
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let after = cold_starts(args, models)?;
    let delta = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let (resident, hit, miss) = (delta("resident"), delta("hit"), delta("miss"));
    let mut ttft = results.into_inner().unwrap();
    ttft.sort_by(f64::total_cmp);
    let errors = errors.into_inner().unwrap();
    let n = order.len() as f64;
    eprintln!(
        "{label}: {} ok, {} errors in {wall:.1} s; engine starts: {miss} from disk, {hit} from the pool, {resident} woken",
        ttft.len(),
        errors.len()
    );
    Ok(json!({
        "routing": label,
        "requests": order.len(),
        "errors": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "wall_s": round4(wall),
        "ttft_p50_s": round4(percentile(&ttft, 0.5)),
        "ttft_p99_s": round4(percentile(&ttft, 0.99)),
        "engine_starts": { "disk": miss, "pool": hit, "woken": resident },
        // Requests that found their engine loaded, or its weights in memory (pool or device).
        "served_without_disk_read": round4((n - miss) / n),
        "served_by_a_loaded_engine": round4((n - miss - hit - resident) / n),
    }))
}

pub fn cluster(args: ClusterBenchArgs) -> anyhow::Result<()> {
    if args.models_locality.len() != args.models_round_robin.len() || args.models_locality.is_empty() {
        bail!("--models-locality and --models-round-robin need the same, non-zero number of models");
    }
    let order = workload(args.requests, args.models_locality.len(), args.zipf, args.seed);
    let locality = phase(&args, "locality", &args.gateway, &args.models_locality, &order)?;
    let round_robin = phase(&args, "round_robin", &args.round_robin, &args.models_round_robin, &order)?;
    let ratio =
        |k: &str| round4(round_robin[k].as_f64().unwrap_or(f64::NAN) / locality[k].as_f64().unwrap_or(f64::NAN));
    let report = json!({
        "nodes": args.nodes.len(),
        "models": args.models_locality.len(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "zipf": args.zipf,
        "phases": [locality, round_robin],
        "round_robin_over_locality": { "ttft_p50": ratio("ttft_p50_s"), "ttft_p99": ratio("ttft_p99_s") },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_is_seeded_and_skewed() {
        let a = workload(2000, 6, 1.0, 7);
        assert_eq!(a, workload(2000, 6, 1.0, 7));
        let count = |i| a.iter().filter(|&&m| m == i).count();
        assert!(count(0) > count(1) && count(1) > count(5), "{:?}", (0..6).map(count).collect::<Vec<_>>());
        assert!(a.iter().all(|&m| m < 6));
        let flat = workload(6000, 3, 0.0, 1);
        assert!((0..3).all(|i| flat.iter().filter(|&&m| m == i).count() > 1700));
    }
}
