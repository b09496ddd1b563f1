//! `kindling bench serve`: warm-path throughput and latency through the whole stack. Starts a real
//! `kindling serve`, deploys the OpenAI plugin (a Wasm component), and at each concurrency level
//! sends N streamed `/v1/completions` requests at once (prompts of seeded random lengths, a fixed
//! number of output tokens), timing each stream's first event and end. In the same run, HF
//! transformers `generate` (batched, same prompts, same output length) is the baseline, run first
//! while the device is free; the report prints kindling / HF ratios.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// NAME=PATH of an HF-format model directory.
    #[arg(long, value_name = "NAME=PATH")]
    model: String,
    /// The OpenAI plugin component (build it with scripts/build-guests.sh).
    #[arg(long, default_value = "target/guests/openai-python.wasm")]
    plugin: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Concurrent streams per level, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Prompt lengths in tokens are drawn from LO-HI (the bench models' tokenizer is one token per byte).
    #[arg(long, default_value = "128-512")]
    prompt_tokens: String,
    #[arg(long, default_value_t = 256)]
    output_tokens: u32,
    /// A python3 with torch and transformers, for the HF baseline (skipped without it).
    #[arg(long)]
    hf_python: Option<String>,
    #[arg(long, default_value = "scripts/bench/hf_serve.py")]
    hf_script: PathBuf,
    /// The checkpoint HF loads for its baseline, when not the model itself (a GGUF: HF would
    /// dequantize it; give the same shape in safetensors).
    #[arg(long)]
    hf_model: Option<String>,
    /// Extra arguments for `kindling serve` (e.g. "--kv-cache-gib 24").
    #[arg(long, allow_hyphen_values = true)]
    serve_args: Option<String>,
    /// Write the results as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Seeded prompts of lengths in `lo..=hi` characters: the same for both sides of the comparison.
pub fn prompts(n: usize, lo: usize, hi: usize, seed: u64) -> Vec<String> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..n)
        .map(|_| {
            let len = lo + next() % (hi - lo + 1);
            (0..len).map(|_| (b'a' + (next() % 26) as u8) as char).collect()
        })
        .collect()
}

fn parse_range(s: &str) -> anyhow::Result<(usize, usize)> {
    let (lo, hi) = s.split_once('-').context("--prompt-tokens: expected LO-HI")?;
    let (lo, hi): (usize, usize) = (lo.trim().parse()?, hi.trim().parse()?);
    if lo == 0 || lo > hi {
        bail!("--prompt-tokens: need 0 < LO <= HI");
    }
    Ok((lo, hi))
}

/// What one stream saw.
pub(crate) struct StreamResult {
    pub first_event: Duration,
    pub end: Duration,
    pub completion_tokens: u64,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() { f64::NAN } else { sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] }
}

pub fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Sends one streamed completion and reads its server-sent events to the end.
pub(crate) fn stream_once(
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    start: Instant,
) -> anyhow::Result<StreamResult> {
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": { "include_usage": true },
    });
    let resp = ureq::post(&format!("{url}/v1/completions")).timeout(Duration::from_secs(600)).send_json(body);
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => bail!("HTTP {code}: {}", r.into_string().unwrap_or_default()),
        Err(e) => return Err(e.into()),
    };
    let mut first_event = None;
    let mut completion_tokens = 0;
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        first_event.get_or_insert_with(|| start.elapsed());
        if data == "[DONE]" {
            break;
        }
        let event: Value = serde_json::from_str(data).with_context(|| format!("bad event {data:?}"))?;
        if let Some(err) = event.get("error") {
            bail!("stream error: {err}");
        }
        if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
            completion_tokens = n;
        }
    }
    let end = start.elapsed();
    Ok(StreamResult { first_event: first_event.context("the stream had no events")?, end, completion_tokens })
}

/// N streams at once; the aggregate and the spread.
fn level(url: &str, model: &str, prompts: &[String], max_tokens: u32) -> anyhow::Result<Value> {
    let start = Instant::now();
    let results: Vec<anyhow::Result<StreamResult>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            prompts.iter().map(|p| s.spawn(move || stream_once(url, model, p, max_tokens, start))).collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))).collect();
    let ok: Vec<&StreamResult> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let tokens: u64 = ok.iter().map(|r| r.completion_tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|r| r.first_event.as_secs_f64()).collect();
    ttft.sort_by(f64::total_cmp);
    let mut per_stream: Vec<f64> = ok
        .iter()
        .filter(|r| r.completion_tokens > 1)
        .map(|r| (r.completion_tokens - 1) as f64 / (r.end - r.first_event).as_secs_f64().max(1e-9))
        .collect();
    per_stream.sort_by(f64::total_cmp);
    Ok(json!({
        "streams": prompts.len(), "errors": errors.len(), "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "output_tokens": tokens, "wall_s": round4(wall), "output_tok_s": round4(tokens as f64 / wall),
        "ttft_p50_s": round4(percentile(&ttft, 0.5)), "ttft_p99_s": round4(percentile(&ttft, 0.99)),
        "per_stream_decode_tok_s_p50": round4(percentile(&per_stream, 0.5)),
    }))
}

pub struct ServerChild {
    child: Child,
    pub url: String,
    _data: tempfile::TempDir,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &ServeBenchArgs, max_streams: usize) -> anyhow::Result<ServerChild> {
    let mut serve_args: Vec<String> = ["--device", &args.device, "--model", &args.model].map(String::from).to_vec();
    serve_args.extend(["--max-instances".to_string(), (max_streams + 16).to_string()]);
    serve_args.extend(args.serve_args.as_deref().unwrap_or("").split_whitespace().map(String::from));
    spawn_server(&serve_args)
}

/// Starts `kindling serve` (this binary) on a free loopback port with its own data dir.
pub fn spawn_server(serve_args: &[String]) -> anyhow::Result<ServerChild> {
    let data = tempfile::tempdir()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--idle-unload-secs", "0"])
        .arg("--data-dir")
        .arg(data.path())
        .args(serve_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting kindling serve")?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("kindling listening on ") {
                    break url.trim().to_string();
                }
            }
            _ => bail!("kindling serve exited before listening: {:?}", child.wait()?),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(ServerChild { child, url, _data: data })
}

fn deploy_plugin(url: &str, plugin: &Path, model: &str, max_streams: usize, max_tokens: u32) -> anyhow::Result<()> {
    // Headroom: a finished stream's slot is freed when the server drops its body, which can be a
    // moment after the client has read the last event.
    let slots = max_streams + 8;
    let manifest = format!(
        "name = \"openai\"\nroutes = [\"/v1\"]\nmodels = [\"{model}\"]\n[limits]\ntimeout_ms = 600000\nmax_tokens = {}\nmax_concurrency = {slots}\nmax_generations = {slots}\n",
        max_tokens.max(16),
    );
    let wasm = std::fs::read(plugin)
        .with_context(|| format!("reading {} (scripts/build-guests.sh builds it)", plugin.display()))?;
    let remote = crate::Remote { url: url.to_string(), token: None };
    crate::client::deploy_bytes(&remote, manifest.as_bytes(), &wasm).map(drop)
}

fn hf_baseline(
    args: &ServeBenchArgs,
    python: &str,
    dir: &str,
    levels: &[(usize, Vec<String>)],
) -> anyhow::Result<Value> {
    let file = tempfile::NamedTempFile::new()?;
    let spec: Vec<Value> = levels.iter().map(|(n, p)| json!({ "streams": n, "prompts": p })).collect();
    std::fs::write(file.path(), serde_json::to_vec(&spec)?)?;
    let out = Command::new(python)
        .arg(&args.hf_script)
        .arg(dir)
        .arg(file.path())
        .arg(args.output_tokens.to_string())
        .arg(if args.device == "cpu" { "cpu" } else { "cuda" })
        .stderr(Stdio::inherit())
        .output()
        .context("running the HF baseline")?;
    if !out.status.success() {
        bail!("the HF baseline failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout).context("HF baseline output")
}

pub fn serve(args: ServeBenchArgs) -> anyhow::Result<()> {
    let (name, dir) = args.model.split_once('=').context("--model: expected NAME=PATH")?;
    let (lo, hi) = parse_range(&args.prompt_tokens)?;
    let levels: Vec<(usize, Vec<String>)> =
        args.concurrency.iter().map(|&n| (n, prompts(n, lo, hi, 0x5eed ^ n as u64))).collect();
    let max_streams = args.concurrency.iter().copied().max().unwrap_or(1);

    let hf = match &args.hf_python {
        Some(python) => Some(hf_baseline(&args, python, args.hf_model.as_deref().unwrap_or(dir), &levels)?),
        None => None,
    };
    let server = start_server(&args, max_streams)?;
    deploy_plugin(&server.url, &args.plugin, name, max_streams, args.output_tokens)?;
    // The cold start is another benchmark's business: load the model before timing anything.
    stream_once(&server.url, name, "warm up", 4, Instant::now()).context("warm-up request")?;

    let mut report = Vec::new();
    for (n, prompts) in &levels {
        let ours = level(&server.url, name, prompts, args.output_tokens)?;
        let theirs = hf.as_ref().and_then(|h| h.as_array()?.iter().find(|l| l["streams"] == *n).cloned());
        let ratio = |key: &str, higher_is_better: bool| -> Value {
            let (a, b) = (ours[key].as_f64(), theirs.as_ref().and_then(|t| t[key].as_f64()));
            match (a, b) {
                (Some(a), Some(b)) if a > 0.0 && b > 0.0 => json!(round4(if higher_is_better { a / b } else { b / a })),
                _ => Value::Null,
            }
        };
        let row = json!({
            "streams": n, "kindling": ours, "hf": theirs,
            "throughput_vs_hf": ratio("output_tok_s", true), "ttft_p50_vs_hf": ratio("ttft_p50_s", false),
        });
        eprintln!("{}", serde_json::to_string(&row)?);
        report.push(row);
    }
    let metrics = ureq::get(&format!("{}/metrics", server.url)).call()?.into_string()?;
    let engine_metrics: Vec<&str> = metrics.lines().filter(|l| l.starts_with("kindling_engine_")).collect();
    let result = json!({
        "model": name, "device": args.device, "output_tokens": args.output_tokens, "prompt_tokens": args.prompt_tokens,
        "levels": report, "engine_metrics": engine_metrics,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    let failed: u64 = report.iter().map(|r| r["kindling"]["errors"].as_u64().unwrap_or(0)).sum();
    if failed > 0 {
        bail!("{failed} streams failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_seeded_and_within_the_range() {
        let a = prompts(20, 5, 9, 1);
        assert_eq!(a, prompts(20, 5, 9, 1));
        assert!(a.iter().all(|p| (5..=9).contains(&p.len())));
        assert!(a.iter().any(|p| p.len() == 5) && a.iter().any(|p| p.len() == 9));
        assert!(parse_range("9-5").is_err() && parse_range("0-5").is_err());
    }
}
