//! Prometheus metrics in the text exposition format, served at `/metrics`: requests, errors and
//! latency per deployment, tokens, cold starts by phase, pool bytes and loaded engines.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use kindling_engine::{EngineHandle, ModelRegistry};
use kindling_host::LlmReport;

/// Latency buckets in seconds: from a warm small-model token to a long generation.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
struct State {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    prompt_tokens: BTreeMap<String, u64>,
    completion_tokens: BTreeMap<String, u64>,
    cold_starts: BTreeMap<(String, &'static str), u64>,
    cold_start_phases: BTreeMap<(String, &'static str), Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

/// Label values are quoted; escape what the format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// A request answered with `status` after `elapsed` (to its response headers).
    pub fn request(&self, deployment: &str, status: u16, elapsed: Duration) {
        let mut s = self.state.lock().expect("poisoned");
        *s.requests.entry((deployment.to_string(), status)).or_default() += 1;
        s.latency.entry(deployment.to_string()).or_default().observe(elapsed.as_secs_f64());
    }

    /// What a finished invocation did with models.
    pub fn invocation(&self, deployment: &str, report: &LlmReport) {
        let mut s = self.state.lock().expect("poisoned");
        *s.prompt_tokens.entry(deployment.to_string()).or_default() += report.prompt_tokens;
        *s.completion_tokens.entry(deployment.to_string()).or_default() += report.completion_tokens;
        for (model, cold) in &report.cold_starts {
            let pool = cold.load.source();
            *s.cold_starts.entry((model.clone(), pool)).or_default() += 1;
            for (phase, d) in
                [("wait", cold.waited), ("admit", cold.load.admit), ("h2d", cold.load.h2d), ("init", cold.load.init)]
            {
                s.cold_start_phases.entry((model.clone(), phase)).or_default().observe(d.as_secs_f64());
            }
            if let Some(t) = report.first_token {
                s.cold_start_phases.entry((model.clone(), "first_token")).or_default().observe(t.as_secs_f64());
            }
        }
    }

    /// `instances`: handler instances alive now, including ones whose client has gone.
    pub fn render(&self, registry: &ModelRegistry, deployments: usize, instances: HandlerInstances) -> String {
        let s = self.state.lock().expect("poisoned");
        let mut out = String::new();
        let n = section_into(
            &mut out,
            "kindling_requests_total",
            "counter",
            "Invocations answered, by deployment and HTTP status.",
        );
        for ((d, status), v) in &s.requests {
            let _ = writeln!(out, "{n}{{deployment=\"{}\",status=\"{status}\"}} {v}", label(d));
        }
        let n = section_into(
            &mut out,
            "kindling_request_duration_seconds",
            "histogram",
            "Time to response headers, by deployment.",
        );
        for (d, h) in &s.latency {
            h.render(&mut out, &n, &format!("deployment=\"{}\"", label(d)));
        }
        for (name, help, map) in [
            ("kindling_prompt_tokens_total", "Prompt tokens processed, by deployment.", &s.prompt_tokens),
            ("kindling_completion_tokens_total", "Tokens generated, by deployment.", &s.completion_tokens),
        ] {
            let n = section_into(&mut out, name, "counter", help);
            for (d, v) in map {
                let _ = writeln!(out, "{n}{{deployment=\"{}\"}} {v}", label(d));
            }
        }
        let n = section_into(
            &mut out,
            "kindling_cold_starts_total",
            "counter",
            "Engine starts caused by requests, by model and where the weights came from (resident, hit, miss).",
        );
        for ((m, pool), v) in &s.cold_starts {
            let _ = writeln!(out, "{n}{{model=\"{}\",pool=\"{pool}\"}} {v}", label(m));
        }
        let n = section_into(
            &mut out,
            "kindling_cold_start_phase_seconds",
            "histogram",
            "Cold start phases: wait, admit, h2d, init, first_token.",
        );
        for ((m, phase), h) in &s.cold_start_phases {
            h.render(&mut out, &n, &format!("model=\"{}\",phase=\"{phase}\"", label(m)));
        }
        let pool = registry.pool_stats();
        for (name, help, v) in [
            ("kindling_pool_resident_bytes", "Checkpoint bytes resident in the pool.", pool.resident_bytes),
            ("kindling_pool_pinned_bytes", "Checkpoint bytes registered for DMA.", pool.pinned_bytes),
            ("kindling_pool_capacity_bytes", "Pool capacity.", pool.capacity_bytes),
            ("kindling_pool_checkpoints", "Checkpoints in the pool.", pool.entries as u64),
            ("kindling_deployments", "Live deployments.", deployments as u64),
            ("kindling_handler_instances", "Handler instances alive now.", instances.live as u64),
            (
                "kindling_handler_warm_instances",
                "Handler instances made ahead of requests, waiting for one.",
                instances.warm as u64,
            ),
        ] {
            let n = section_into(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{n} {v}");
        }
        let n = section_into(
            &mut out,
            "kindling_model_resident",
            "gauge",
            "1 for each registered model at its closest tier: device (loaded or asleep), pool, disk.",
        );
        for m in registry.list() {
            let _ = writeln!(out, "{n}{{model=\"{}\",tier=\"{}\"}} 1", label(&m.name), m.tier.as_str());
        }
        let workers = registry.workers();
        type WorkerSeries = (&'static str, &'static str, fn(&kindling_engine::registry::WorkerUsage) -> u64);
        let series: [WorkerSeries; 3] = [
            ("kindling_worker_budget_bytes", "Engine memory budget of each worker (GPU).", |w| w.budget_bytes),
            (
                "kindling_worker_resident_bytes",
                "Engine bytes counted against each worker: ready, loading, retiring.",
                |w| w.resident_bytes,
            ),
            ("kindling_worker_engines", "Engines on each worker, ready or loading.", |w| w.engines as u64),
        ];
        for (name, help, value) in series {
            let n = section_into(&mut out, name, "gauge", help);
            for w in &workers {
                let _ = writeln!(out, "{n}{{worker=\"{}\"}} {}", label(&w.label), value(w));
            }
        }
        render_engines(&mut out, &registry.engines());
        out
    }
}

/// A per-engine series: name, Prometheus type, help, how to read it off an engine.
type EngineSeries = (&'static str, &'static str, &'static str, fn(&EngineHandle) -> f64);

/// Per-engine gauges and counters: memory, batch occupancy, KV blocks, preemptions, decode speed.
/// Handler instances now: running (or finishing their response), and made ahead of requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct HandlerInstances {
    pub live: usize,
    pub warm: usize,
}

fn render_engines(out: &mut String, engines: &[(String, EngineHandle)]) {
    let rows: [EngineSeries; 10] = [
        ("kindling_engine_loaded_bytes", "gauge", "Weight bytes of each running engine.", |e| {
            e.info.weight_bytes as f64
        }),
        ("kindling_engine_kv_cache_bytes", "gauge", "KV cache bytes of each running engine.", |e| {
            e.info.kv_cache_bytes as f64
        }),
        ("kindling_engine_running_sequences", "gauge", "Sequences in the running batch.", |e| {
            e.stats.running.load(Relaxed) as f64
        }),
        ("kindling_engine_waiting_sequences", "gauge", "Sequences admitted and waiting to run.", |e| {
            e.stats.waiting.load(Relaxed) as f64
        }),
        ("kindling_engine_kv_blocks_used", "gauge", "KV cache blocks held by sequences.", |e| {
            e.stats.kv_blocks_used.load(Relaxed) as f64
        }),
        ("kindling_engine_kv_blocks_free", "gauge", "KV cache blocks free.", |e| {
            // Two loads, not one snapshot: never below zero.
            e.stats.kv_blocks_total.load(Relaxed).saturating_sub(e.stats.kv_blocks_used.load(Relaxed)) as f64
        }),
        (
            "kindling_engine_preemptions_total",
            "counter",
            "Sequences preempted for KV blocks and recomputed later.",
            |e| e.stats.preemptions.load(Relaxed) as f64,
        ),
        ("kindling_engine_steps_total", "counter", "Batched forward steps run.", |e| {
            e.stats.steps.load(Relaxed) as f64
        }),
        (
            "kindling_engine_graph_steps_total",
            "counter",
            "Steps whose forward pass was one CUDA graph launch (decode-only steps on a GPU).",
            |e| e.stats.graph_steps.load(Relaxed) as f64,
        ),
        (
            "kindling_engine_time_per_output_token_seconds",
            "gauge",
            "Mean time per output token after the first, over finished sequences.",
            |e| {
                let n = e.stats.tpot_count.load(Relaxed);
                if n == 0 { 0.0 } else { e.stats.tpot_us_sum.load(Relaxed) as f64 / n as f64 / 1e6 }
            },
        ),
    ];
    for (name, kind, help, value) in rows {
        let n = section_into(out, name, kind, help);
        for (model, engine) in engines {
            let _ = writeln!(out, "{n}{{model=\"{}\"}} {}", label(model), value(engine));
        }
    }
    let n = section_into(
        out,
        "kindling_engine_step_seconds_total",
        "counter",
        "Where steps' time went: schedule (host batch building), forward (launching the pass), sample (waiting for the tokens), deliver (to the streams).",
    );
    for (model, engine) in engines {
        let s = &engine.stats;
        for (phase, us) in [
            ("schedule", &s.step_schedule_us),
            ("forward", &s.step_forward_us),
            ("sample", &s.step_sample_us),
            ("deliver", &s.step_deliver_us),
        ] {
            let _ =
                writeln!(out, "{n}{{model=\"{}\",phase=\"{phase}\"}} {}", label(model), us.load(Relaxed) as f64 / 1e6);
        }
    }
}

fn section_into(out: &mut String, name: &str, kind: &str, help: &str) -> String {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.007);
        h.observe(3.0);
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 0"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.01\"} 1"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"5\"} 2"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 2"));
        assert!(out.contains("x_count{a=\"b\"} 2"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
