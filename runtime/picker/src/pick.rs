//! Which nodes a request should go to, best first: those serving its deployment, ranked by
//! where its model is (device, then pool, then disk), with a guard against piling onto one node:
//! a node whose queue is more than `imbalance` sequences over the shortest queue, or whose KV
//! cache is fuller than `kv_ceiling`, goes after the rest. Ties rotate, so equal nodes share the load.

use crate::nodes::{DeploymentInfo, Node, Tier};

/// What the picker knows of one request.
#[derive(Debug, Default)]
pub struct RequestInfo<'a> {
    pub path: &'a str,
    pub host: Option<&'a str>,
    /// The `model` field of a JSON body (OpenAI-style requests name it).
    pub model: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// Sequences a node may have queued over the least loaded serving node before it is
    /// passed over for locality.
    pub imbalance: f64,
    /// KV-cache usage (0 to 1) past which a node is passed over for locality: its new sequences
    /// would wait for blocks or preempt others.
    pub kv_ceiling: f64,
    /// With a domain, `Host: NAME.<domain>` names deployment NAME (as the nodes' `--domain`).
    pub domain: Option<String>,
}

fn normalize(route: &str) -> &str {
    let t = route.trim_end_matches('/');
    if t.is_empty() { "/" } else { t }
}

/// The length of `route` when it serves `path` (the nodes' longest-prefix rule).
fn route_match(route: &str, path: &str) -> Option<usize> {
    let route = normalize(route);
    let hit = route == "/" || path == route || path.strip_prefix(route).is_some_and(|rest| rest.starts_with('/'));
    hit.then_some(route.len())
}

/// The deployment a request is for, as any node that serves it describes it.
pub fn resolve<'a>(nodes: &'a [Node], req: &RequestInfo, domain: Option<&str>) -> Option<&'a DeploymentInfo> {
    let all = || nodes.iter().flat_map(|n| n.state.deployments.iter());
    if let (Some(domain), Some(host)) = (domain, req.host) {
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h).to_ascii_lowercase();
        if let Some(name) = host.strip_suffix(&format!(".{domain}")) {
            return all().find(|d| d.name == name);
        }
    }
    let path = req.path.split('?').next().unwrap_or("");
    all()
        .filter_map(|d| Some((d.routes.iter().filter_map(|r| route_match(r, path)).max()?, d)))
        .max_by_key(|(len, _)| *len)
        .map(|(_, d)| d)
}

/// Endpoints (`host:port`) for the request, best first; empty when the picker has no opinion
/// (unknown deployment, no healthy node serving it), so Envoy falls back to its own balancing.
pub fn pick(nodes: &[Node], req: &RequestInfo, policy: &Policy, rotation: usize) -> Vec<String> {
    ranked(nodes, req, policy, rotation).into_iter().map(|(address, _)| address).collect()
}

/// `pick`, with where the request's model is on each endpoint (`None`: not registered there).
pub fn ranked(nodes: &[Node], req: &RequestInfo, policy: &Policy, rotation: usize) -> Vec<(String, Option<Tier>)> {
    let Some(deployment) = resolve(nodes, req, policy.domain.as_deref()) else { return Vec::new() };
    let models: Vec<&str> = match req.model.filter(|m| deployment.models.iter().any(|d| d == m)) {
        Some(m) => vec![m],
        None => deployment.models.iter().map(String::as_str).collect(),
    };
    let serving: Vec<(usize, &Node)> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.state.healthy && n.state.deployments.iter().any(|d| d.name == deployment.name))
        .collect();
    let Some(shortest) = serving.iter().map(|(_, n)| n.state.queue).reduce(f64::min) else { return Vec::new() };
    let count = nodes.len().max(1);
    let mut order: Vec<_> = serving
        .into_iter()
        .map(|(i, n)| {
            let tier: Option<Tier> = models.iter().filter_map(|m| n.state.tiers.get(*m).copied()).min();
            let overloaded = n.state.queue > shortest + policy.imbalance || n.state.kv_usage > policy.kv_ceiling;
            // `None` (model not registered there) sorts after every tier.
            let tier_rank = tier.map_or(3, |t| t as u8);
            (
                (overloaded, tier_rank, n.state.queue.to_bits(), (i + count - rotation % count) % count),
                (n.address.clone(), tier),
            )
        })
        .collect();
    order.sort_by_key(|(key, _)| *key);
    order.into_iter().map(|(_, picked)| picked).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::NodeState;

    fn node(address: &str, tiers: &[(&str, Tier)], queue: f64) -> Node {
        Node {
            address: address.into(),
            state: NodeState {
                healthy: true,
                tiers: tiers.iter().map(|(m, t)| (m.to_string(), *t)).collect(),
                queue,
                kv_usage: 0.0,
                deployments: vec![
                    DeploymentInfo {
                        name: "chat".into(),
                        routes: vec!["/chat".into()],
                        models: vec!["a".into(), "b".into()],
                    },
                    DeploymentInfo { name: "root".into(), routes: vec!["/".into()], models: vec!["b".into()] },
                ],
            },
        }
    }

    fn policy() -> Policy {
        Policy { imbalance: 4.0, kv_ceiling: 0.9, domain: Some("fn.example".into()) }
    }

    fn req<'a>(path: &'a str, model: Option<&'a str>) -> RequestInfo<'a> {
        RequestInfo { path, host: None, model }
    }

    #[test]
    fn the_node_holding_the_model_closest_comes_first() {
        let nodes = [
            node("n1:1", &[("a", Tier::Disk)], 0.0),
            node("n2:2", &[("a", Tier::Device)], 1.0),
            node("n3:3", &[("a", Tier::Pool)], 0.0),
        ];
        assert_eq!(pick(&nodes, &req("/chat/v1", Some("a")), &policy(), 0), ["n2:2", "n3:3", "n1:1"]);
    }

    #[test]
    fn the_body_model_narrows_the_deployments_models() {
        let nodes =
            [node("n1:1", &[("a", Tier::Device), ("b", Tier::Disk)], 0.0), node("n2:2", &[("b", Tier::Device)], 0.0)];
        assert_eq!(pick(&nodes, &req("/chat", Some("b")), &policy(), 0)[0], "n2:2");
        // Without a model named, the best tier of any of the deployment's models counts: a tie.
        let both = pick(&nodes, &req("/chat", None), &policy(), 0);
        assert_eq!(both.len(), 2);
    }

    #[test]
    fn an_overloaded_node_loses_its_locality_edge() {
        let nodes = [node("hot:1", &[("a", Tier::Device)], 20.0), node("cold:2", &[("a", Tier::Disk)], 1.0)];
        assert_eq!(pick(&nodes, &req("/chat", Some("a")), &policy(), 0), ["cold:2", "hot:1"]);
        let nodes = [node("warm:1", &[("a", Tier::Device)], 4.0), node("cold:2", &[("a", Tier::Disk)], 1.0)];
        assert_eq!(
            pick(&nodes, &req("/chat", Some("a")), &policy(), 0)[0],
            "warm:1",
            "within the guard, locality wins"
        );
    }

    #[test]
    fn unhealthy_nodes_and_nodes_without_the_deployment_are_left_out() {
        let mut nodes = [node("n1:1", &[("a", Tier::Device)], 0.0), node("n2:2", &[], 0.0), node("n3:3", &[], 0.0)];
        nodes[0].state.healthy = false;
        nodes[2].state.deployments.clear();
        assert_eq!(pick(&nodes, &req("/chat", Some("a")), &policy(), 0), ["n2:2"]);
        assert!(pick(&nodes, &req("/chat", Some("a")), &policy(), 0).iter().all(|a| a != "n3:3"));
    }

    #[test]
    fn ties_rotate_and_unknown_deployments_get_no_opinion() {
        let nodes = [node("n1:1", &[], 0.0), node("n2:2", &[], 0.0)];
        let firsts: Vec<_> = (0..4).map(|r| pick(&nodes, &req("/chat", None), &policy(), r)[0].clone()).collect();
        assert_eq!(firsts, ["n1:1", "n2:2", "n1:1", "n2:2"]);
        let mut bare = nodes.clone();
        for n in &mut bare {
            n.state.deployments.retain(|d| d.name == "chat");
        }
        assert!(pick(&bare, &req("/other", None), &policy(), 0).is_empty());
    }

    #[test]
    fn routes_resolve_by_longest_prefix_and_hosts_by_domain() {
        let nodes = [node("n1:1", &[], 0.0)];
        assert_eq!(resolve(&nodes, &req("/chat/x?q=1", None), None).unwrap().name, "chat");
        assert_eq!(resolve(&nodes, &req("/chatty", None), None).unwrap().name, "root");
        let by_host = RequestInfo { path: "/", host: Some("chat.fn.example:8080"), model: None };
        assert_eq!(resolve(&nodes, &by_host, Some("fn.example")).unwrap().name, "chat");
    }
}
