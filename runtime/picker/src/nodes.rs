//! What the picker knows of each node, scraped from its own endpoints: `/metrics` (where each
//! model is resident, queue depth, KV usage) and `/admin/deployments` (what it serves, on which
//! routes, with which models). A node that does not answer is unhealthy until it does.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Where a model is on a node, best first (as the node's `kindling_model_resident` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Device,
    Pool,
    Disk,
}

impl Tier {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "device" => Some(Tier::Device),
            "pool" => Some(Tier::Pool),
            "disk" => Some(Tier::Disk),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DeploymentInfo {
    pub name: String,
    pub routes: Vec<String>,
    pub models: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NodeState {
    pub healthy: bool,
    pub tiers: BTreeMap<String, Tier>,
    /// Sequences running or waiting across the node's engines.
    pub queue: f64,
    /// KV blocks in use over all blocks, 0 to 1.
    pub kv_usage: f64,
    pub deployments: Vec<DeploymentInfo>,
}

/// A node as configured (`host:port`) and as last scraped.
#[derive(Debug, Clone)]
pub struct Node {
    pub address: String,
    pub state: NodeState,
}

/// Reads the series the picker uses out of Prometheus text.
pub fn parse_metrics(text: &str) -> NodeState {
    let mut state = NodeState { healthy: true, ..Default::default() };
    let (mut kv_used, mut kv_free) = (0.0, 0.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.trim_matches('"')))
        };
        match name {
            "kindling_model_resident" if value > 0.0 => {
                if let (Some(model), Some(tier)) = (label("model"), label("tier").and_then(Tier::parse)) {
                    state.tiers.insert(model.to_string(), tier);
                }
            }
            "kindling_engine_running_sequences" | "kindling_engine_waiting_sequences" => state.queue += value,
            "kindling_engine_kv_blocks_used" => kv_used += value,
            "kindling_engine_kv_blocks_free" => kv_free += value,
            _ => {}
        }
    }
    if kv_used + kv_free > 0.0 {
        state.kv_usage = kv_used / (kv_used + kv_free);
    }
    state
}

/// Every node's last known state, shared by the scraper and the picking.
#[derive(Clone)]
pub struct Nodes {
    inner: Arc<RwLock<Vec<Node>>>,
}

/// The endpoints (`ip:port`, as Envoy knows its hosts) that `sources` name now: a source is an
/// address or a DNS name with a port, such as a Kubernetes headless service naming every pod.
pub fn resolve(sources: &[String]) -> Vec<String> {
    use std::net::ToSocketAddrs;
    let mut out: Vec<String> = sources
        .iter()
        .flat_map(|s| match s.to_socket_addrs() {
            Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
            Err(e) => {
                tracing::warn!(source = %s, error = %e, "cannot resolve node address");
                Vec::new()
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

impl Nodes {
    pub fn new() -> Self {
        Self { inner: Arc::new(RwLock::new(Vec::new())) }
    }

    pub fn snapshot(&self) -> Vec<Node> {
        self.inner.read().expect("poisoned").clone()
    }

    #[cfg(test)]
    pub(crate) fn inner_for_tests(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Node>> {
        self.inner.write().expect("poisoned")
    }

    fn replace(&self, fresh: Vec<Node>) {
        let mut nodes = self.inner.write().expect("poisoned");
        for node in &fresh {
            let before = nodes.iter().find(|n| n.address == node.address).map(|n| n.state.healthy);
            if before != Some(node.state.healthy) {
                tracing::info!(node = %node.address, healthy = node.state.healthy, "node state changed");
            }
        }
        for gone in nodes.iter().filter(|n| !fresh.iter().any(|f| f.address == n.address)) {
            tracing::info!(node = %gone.address, "node left");
        }
        *nodes = fresh;
    }

    /// Every `every`, for the life of the process: resolves `sources` (nodes come and go as a
    /// StatefulSet scales) and scrapes every node at once.
    pub fn spawn_scraper(&self, sources: Vec<String>, every: Duration, admin_token: Option<String>) {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_millis(500))
            .timeout(Duration::from_secs(1))
            .build();
        let nodes = self.clone();
        std::thread::Builder::new()
            .name("scrape".into())
            .spawn(move || {
                loop {
                    let started = Instant::now();
                    let fresh: Vec<Node> = std::thread::scope(|scope| {
                        let handles: Vec<_> = resolve(&sources)
                            .into_iter()
                            .map(|address| {
                                let (agent, token) = (&agent, admin_token.as_deref());
                                scope.spawn(move || {
                                    let state = scrape(agent, &address, token).unwrap_or_else(|e| {
                                        tracing::debug!(node = %address, error = %e, "scrape failed");
                                        NodeState::default()
                                    });
                                    Node { address, state }
                                })
                            })
                            .collect();
                        handles.into_iter().filter_map(|h| h.join().ok()).collect()
                    });
                    nodes.replace(fresh);
                    std::thread::sleep(every.saturating_sub(started.elapsed()));
                }
            })
            .expect("spawn scraper");
    }
}

impl Default for Nodes {
    fn default() -> Self {
        Self::new()
    }
}

fn scrape(agent: &ureq::Agent, address: &str, token: Option<&str>) -> anyhow::Result<NodeState> {
    let get = |path: &str| {
        let mut req = agent.get(&format!("http://{address}{path}"));
        if let Some(t) = token {
            req = req.set("authorization", &format!("Bearer {t}"));
        }
        req.call().map_err(Box::new)
    };
    let mut state = parse_metrics(&get("/metrics")?.into_string()?);
    state.deployments = get("/admin/deployments")?.into_json()?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_resolve_to_endpoints() {
        assert_eq!(
            resolve(&["127.0.0.1:7070".into(), "127.0.0.1:7070".into(), "localhost:1".into()])[0..1],
            ["127.0.0.1:1"]
        );
        assert!(resolve(&["no-port".into()]).is_empty());
    }

    #[test]
    fn reads_residency_queue_and_kv_usage() {
        let text = "# HELP kindling_model_resident ...\n\
                    kindling_model_resident{model=\"a\",tier=\"device\"} 1\n\
                    kindling_model_resident{model=\"b\",tier=\"pool\"} 1\n\
                    kindling_model_resident{model=\"c\",tier=\"disk\"} 1\n\
                    kindling_engine_running_sequences{model=\"a\"} 3\n\
                    kindling_engine_waiting_sequences{model=\"a\"} 2\n\
                    kindling_engine_kv_blocks_used{model=\"a\"} 30\n\
                    kindling_engine_kv_blocks_free{model=\"a\"} 90\n";
        let s = parse_metrics(text);
        assert!(s.healthy);
        assert_eq!(s.tiers["a"], Tier::Device);
        assert_eq!(s.tiers["b"], Tier::Pool);
        assert_eq!(s.tiers["c"], Tier::Disk);
        assert_eq!(s.queue, 5.0);
        assert_eq!(s.kv_usage, 0.25);
    }
}
