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

/// Every node's last known state, shared by the scrapers and the picking.
#[derive(Clone)]
pub struct Nodes {
    inner: Arc<RwLock<Vec<Node>>>,
}

impl Nodes {
    pub fn new(addresses: &[String]) -> Self {
        let nodes = addresses.iter().map(|a| Node { address: a.clone(), state: NodeState::default() }).collect();
        Self { inner: Arc::new(RwLock::new(nodes)) }
    }

    pub fn snapshot(&self) -> Vec<Node> {
        self.inner.read().expect("poisoned").clone()
    }

    #[cfg(test)]
    pub(crate) fn inner_for_tests(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Node>> {
        self.inner.write().expect("poisoned")
    }

    fn set(&self, index: usize, state: NodeState) {
        let mut nodes = self.inner.write().expect("poisoned");
        if nodes[index].state.healthy != state.healthy {
            tracing::info!(node = %nodes[index].address, healthy = state.healthy, "node health changed");
        }
        nodes[index].state = state;
    }

    /// One scraping thread per node, every `every`, for the life of the process.
    pub fn spawn_scrapers(&self, every: Duration, admin_token: Option<String>) {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
        for (index, node) in self.snapshot().into_iter().enumerate() {
            let (nodes, agent, token) = (self.clone(), agent.clone(), admin_token.clone());
            std::thread::Builder::new()
                .name(format!("scrape-{}", node.address))
                .spawn(move || {
                    loop {
                        let started = Instant::now();
                        let state = scrape(&agent, &node.address, token.as_deref()).unwrap_or_else(|e| {
                            tracing::debug!(node = %node.address, error = %e, "scrape failed");
                            NodeState::default()
                        });
                        nodes.set(index, state);
                        std::thread::sleep(every.saturating_sub(started.elapsed()));
                    }
                })
                .expect("spawn scraper");
        }
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
