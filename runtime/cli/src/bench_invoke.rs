//! `kindling bench invoke`: what an invocation itself costs. Starts a real `kindling serve`,
//! deploys handlers that do not generate (examples/ping-wat, the smallest component there is,
//! hand-written; examples/ping-python; examples/ping-js), and at each
//! concurrency level sends GETs over keep-alive connections, timing each. In the same run
//! `/healthz` (no handler at all) is the baseline, so the report shows what instantiating and
//! running a guest adds; the server's `Server-Timing` header splits it into instantiate and
//! handler time (the rest is the body and HTTP).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench_serve::{ServerChild, percentile, round4, spawn_server};

#[derive(clap::Args)]
pub struct InvokeBenchArgs {
    /// NAME=PATH of a component (.wasm, or .wat text) that answers GET /NAME without generating.
    /// Repeatable.
    #[arg(long = "component", value_name = "NAME=PATH", default_values_t = [
        "ping-wat=examples/ping-wat/ping.wat".to_string(),
        "ping-python=target/guests/ping-python.wasm".to_string(),
        "ping-js=target/guests/ping-js.wasm".to_string(),
    ])]
    components: Vec<String>,
    /// Concurrent clients per level, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Requests per client at each level (after a warm-up).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Extra arguments for `kindling serve`.
    #[arg(long, allow_hyphen_values = true)]
    serve_args: Option<String>,
    /// Write the results as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One request's latency and the server's own split of it (ms), when it sent one.
struct Sample {
    latency: f64,
    instantiate: Option<f64>,
    handler: Option<f64>,
    /// Its instance was made ahead of the request.
    warm: bool,
}

fn server_timing(header: Option<&str>, name: &str) -> Option<f64> {
    header?.split(',').find_map(|m| {
        let m = m.trim();
        m.strip_prefix(name)?.strip_prefix(";dur=")?.parse().ok()
    })
}

fn client(url: &str, n: usize) -> anyhow::Result<Vec<Sample>> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp = agent.get(url).call().with_context(|| format!("GET {url}"))?;
        let timing = resp.header("server-timing").map(str::to_string);
        resp.into_string()?;
        samples.push(Sample {
            latency: t.elapsed().as_secs_f64() * 1e3,
            instantiate: server_timing(timing.as_deref(), "instantiate"),
            handler: server_timing(timing.as_deref(), "handler"),
            warm: timing.is_some_and(|t| t.split(',').any(|m| m.trim() == "warm")),
        });
    }
    Ok(samples)
}

fn level(url: &str, clients: usize, requests: usize) -> anyhow::Result<Value> {
    client(url, 10)?; // warm-up: compiled code paged in, connections open
    let start = Instant::now();
    let results: Vec<anyhow::Result<Vec<Sample>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients).map(|_| s.spawn(|| client(url, requests))).collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let samples: Vec<Sample> = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?.into_iter().flatten().collect();
    let sorted = |f: &dyn Fn(&Sample) -> Option<f64>| {
        let mut v: Vec<f64> = samples.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let latency = sorted(&|s| Some(s.latency));
    let instantiate = sorted(&|s| s.instantiate);
    let handler = sorted(&|s| s.handler);
    Ok(json!({
        "clients": clients, "requests": samples.len(), "req_s": round4(samples.len() as f64 / wall),
        "p50_ms": round4(percentile(&latency, 0.5)), "p90_ms": round4(percentile(&latency, 0.9)),
        "p99_ms": round4(percentile(&latency, 0.99)), "p999_ms": round4(percentile(&latency, 0.999)),
        "max_ms": round4(latency.last().copied().unwrap_or(f64::NAN)),
        "instantiate_p50_ms": round4(percentile(&instantiate, 0.5)),
        "instantiate_p99_ms": round4(percentile(&instantiate, 0.99)),
        "handler_p50_ms": round4(percentile(&handler, 0.5)),
        "handler_p99_ms": round4(percentile(&handler, 0.99)),
        "made_ahead": round4(samples.iter().filter(|s| s.warm).count() as f64 / samples.len().max(1) as f64),
    }))
}

fn deploy(server: &ServerChild, name: &str, path: &str, max_concurrency: usize) -> anyhow::Result<()> {
    let wasm = crate::client::read_component(path.as_ref())
        .with_context(|| "scripts/build-guests.sh builds the Python and JavaScript guests")?;
    let manifest =
        format!("name = \"{name}\"\nroutes = [\"/{name}\"]\n[limits]\nmax_concurrency = {max_concurrency}\n");
    let remote = crate::Remote { url: server.url.clone(), token: None };
    crate::client::deploy_bytes(&remote, manifest.as_bytes(), &wasm).map(drop)
}

pub fn invoke(args: InvokeBenchArgs) -> anyhow::Result<()> {
    let most = args.concurrency.iter().copied().max().unwrap_or(1).max(1);
    let mut serve_args = vec!["--max-instances".to_string(), (most + 16).to_string()];
    serve_args.extend(args.serve_args.as_deref().unwrap_or("").split_whitespace().map(String::from));
    let server = spawn_server(&serve_args)?;
    let mut targets = vec![("healthz (baseline)".to_string(), format!("{}/healthz", server.url))];
    for spec in &args.components {
        let Some((name, path)) = spec.split_once('=') else { bail!("--component {spec:?}: expected NAME=PATH") };
        deploy(&server, name, path, most + 8)?;
        targets.push((name.to_string(), format!("{}/{name}", server.url)));
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut report = Vec::new();
    for &clients in &args.concurrency {
        let baseline = level(&targets[0].1, clients, args.requests)?;
        for (name, url) in &targets {
            let r = if name == &targets[0].0 { baseline.clone() } else { level(url, clients, args.requests)? };
            let over =
                |key: &str| round4(r[key].as_f64().unwrap_or(f64::NAN) - baseline[key].as_f64().unwrap_or(f64::NAN));
            let ms = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
            // What neither the baseline nor the server's split covers: the body, the instance's
            // teardown on the way, HTTP.
            let rest = over("p50_ms") - ms("instantiate_p50_ms") - ms("handler_p50_ms");
            println!(
                "{name:>20} x{clients:<3} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  over /healthz: p50 +{:.3} ms, p99 +{:.3} ms (p50 split: instantiate {:.3}, handler {:.3}, body and rest {:.3}; instances made ahead {:.0}%)",
                ms("req_s"),
                ms("p50_ms"),
                ms("p99_ms"),
                over("p50_ms"),
                over("p99_ms"),
                ms("instantiate_p50_ms"),
                ms("handler_p50_ms"),
                rest,
                ms("made_ahead") * 100.0,
            );
            report.push(json!({ "target": name, "result": r, "p50_over_baseline_ms": over("p50_ms"), "p99_over_baseline_ms": over("p99_ms") }));
        }
    }
    let out = json!({ "cores": cores, "levels": report });
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}
