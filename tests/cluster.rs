//! A Kindling cluster on loopback with the real servers: PostgreSQL for shared state, an
//! S3-compatible store for components, three `kindling serve` nodes, the endpoint picker and
//! Envoy. One deploy is served by every node; requests go where their model is; a node killed
//! under load costs healthy tenants nothing; a node restarted catches up from the database.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kindling_e2e::cluster::{
    ADMIN_TOKEN, BUCKET, Envoy, ObjectStore, Picker, Postgres, free_port, node, node_options, wait_until,
};
use kindling_e2e::{HELLO_MANIFEST, Server, hello, kindling_bin, tiny_model};
use serde_json::json;

/// A POST through the gateway: status and the node that answered (Envoy's `x-kindling-node`).
fn through(gateway: &str, path: &str, key: &str, body: &serde_json::Value) -> Result<(u16, String), String> {
    let result = ureq::post(&format!("{gateway}{path}"))
        .set("authorization", &format!("Bearer {key}"))
        .timeout(Duration::from_secs(60))
        .send_json(body.clone());
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let (status, node) = (resp.status(), resp.header("x-kindling-node").unwrap_or_default().to_string());
    resp.into_string().map_err(|e| format!("body cut off: {e}"))?;
    Ok((status, node))
}

/// Runs `event` while three clients send requests through `gateway`; every request must succeed.
fn under_load(gateway: &str, path: &str, key: &str, ask: &serde_json::Value, event: impl FnOnce()) {
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (gateway, path, key, ask) = (gateway.to_string(), path.to_string(), key.to_string(), ask.clone());
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    match through(&gateway, &path, &key, &ask) {
                        Ok((200, _)) => {}
                        other => failures.push(format!("{other:?}")),
                    }
                }
                failures
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    event();
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        sent.load(Ordering::Relaxed)
    );
}

fn at(nodes: &[Option<Server>], i: usize) -> &Server {
    nodes[i].as_ref().expect("node is up")
}

fn serves(server: &Server, key: Option<&str>, path: &str) -> bool {
    server.call_as(key, "POST", path, Some(&json!({ "prompt": "hi", "max_tokens": 2 }))).status == 200
}

#[test]
fn a_cluster_shares_deployments_routes_by_locality_and_survives_a_node() {
    let postgres = Postgres::start();
    let blobs = ObjectStore::start();
    let models: Vec<(&str, PathBuf)> = vec![("tiny", tiny_model("qwen2")), ("tiny-llama", tiny_model("llama"))];
    let models: Vec<(&str, &Path)> = models.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let data = tempfile::tempdir().unwrap();
    let addresses: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let start = |i: usize| node(&postgres, &blobs, &addresses[i], &data.path().join(format!("node{i}")), &models);
    let mut nodes: Vec<Option<Server>> = (0..3).map(|i| Some(start(i))).collect();

    // Tenants made on one node, a deploy on another: every node serves it, to its owner only.
    let acme = at(&nodes, 0).create_tenant("acme", &["tiny", "tiny-llama"]);
    let bolt = at(&nodes, 0).create_tenant("bolt", &["tiny", "tiny-llama"]);
    let wasm = std::fs::read(hello()).unwrap();
    wait_until("node 1 to learn of tenant acme", Duration::from_secs(20), || {
        at(&nodes, 1).call_as(Some(&acme), "GET", "/admin/deployments", None).status == 200
    });
    let deployed = at(&nodes, 1).deploy_as(Some(&acme), HELLO_MANIFEST, &wasm);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    let sha = deployed.json()["component_sha256"].as_str().unwrap().to_string();
    for i in 0..3 {
        wait_until(&format!("node {i} to serve /hello"), Duration::from_secs(180), || {
            serves(at(&nodes, i), Some(&acme), "/hello")
        });
        assert_eq!(at(&nodes, i).call_as(Some(&bolt), "POST", "/hello", Some(&json!({}))).status, 404, "node {i}");
        assert_eq!(at(&nodes, i).call_as(Some(&bolt), "GET", "/admin/deployments/hello", None).status, 404, "node {i}");
    }
    let taken = at(&nodes, 2).deploy_as(Some(&bolt), HELLO_MANIFEST, &wasm);
    assert_eq!(taken.status, 409, "another tenant cannot take the name on any node: {}", taken.body);
    // Two tenants deploying one new name at once on two nodes: the database lets exactly one win.
    for round in 0..3 {
        let name = format!("race{round}");
        let race =
            HELLO_MANIFEST.replace("\"hello\"", &format!("\"{name}\"")).replace("\"/hello\"", &format!("\"/{name}\""));
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let racers = [(0, &acme), (1, &bolt)].map(|(i, key)| {
                let (nodes, race, wasm) = (&nodes, &race, &wasm);
                scope.spawn(move || at(nodes, i).deploy_as(Some(key), race, wasm).status)
            });
            racers.map(|r| r.join().unwrap()).to_vec()
        });
        let mut sorted = statuses.clone();
        sorted.sort();
        assert_eq!(sorted, [201, 409], "one deploy wins, the other finds {name} taken: {statuses:?}");
        let winner = if statuses[0] == 201 { &acme } else { &bolt };
        assert_eq!(
            at(&nodes, 2).call_as(Some(winner), "DELETE", &format!("/admin/deployments/{name}"), None).status,
            204
        );
    }
    assert_eq!(blobs.keys(BUCKET, "components/"), [format!("components/{sha}.wasm")], "stored once, by hash");

    // Through Envoy and the picker, requests for a model follow the node that holds it.
    let picker = Picker::start(&addresses, ADMIN_TOKEN);
    let envoy = Envoy::start(&addresses, picker.port);
    let ask = json!({ "prompt": "hi", "max_tokens": 4, "model": "tiny-llama" });
    let (status, holder) = through(&envoy.gateway, "/hello", &acme, &ask).unwrap();
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(600)); // a few scrapes
    for _ in 0..8 {
        assert_eq!(through(&envoy.gateway, "/hello", &acme, &ask).unwrap(), (200, holder.clone()), "locality routing");
    }
    let picked = ureq::get(&picker.metrics).call().unwrap().into_string().unwrap();
    assert!(picked.contains("kindling_picker_routed_total{tier=\"device\"} 8"), "{picked}");
    assert!(picked.contains("kindling_picker_nodes{state=\"healthy\"} 3"), "{picked}");
    let spread: std::collections::BTreeSet<String> =
        (0..6).map(|_| through(&envoy.round_robin, "/hello", &acme, &ask).unwrap().1).collect();
    assert!(spread.len() > 1, "round robin spreads over the nodes: {spread:?}");

    // The holder dies under load (SIGKILL): healthy tenants see no error.
    let victim = addresses.iter().position(|a| *a == holder).expect("holder is a node");
    under_load(&envoy.gateway, "/hello", &acme, &ask, || {
        nodes[victim].as_mut().unwrap().kill();
        nodes[victim] = None;
    });
    let (status, now) = through(&envoy.gateway, "/hello", &acme, &ask).unwrap();
    assert_eq!(status, 200);
    assert_ne!(now, holder, "the dead node is routed around");

    // While it is down the cluster changes; restarted, it catches up from the database.
    let survivor = (0..3).find(|i| *i != victim).unwrap();
    let later = HELLO_MANIFEST.replace("name = \"hello\"", "name = \"later\"").replace("\"/hello\"", "\"/later\"");
    assert_eq!(at(&nodes, survivor).deploy_bytes(&later, &wasm).status, 201);
    assert_eq!(at(&nodes, survivor).call_as(Some(ADMIN_TOKEN), "DELETE", "/admin/tenants/bolt", None).status, 204);
    nodes[victim] = Some(start(victim));
    let back = at(&nodes, victim);
    assert!(serves(back, None, "/later"), "a restarted node serves what was deployed while it was down");
    let tenants = back.call_as(Some(ADMIN_TOKEN), "GET", "/admin/tenants", None).json();
    assert_eq!(tenants.as_array().unwrap().len(), 1, "and forgets the tenant deleted meanwhile: {tenants}");

    // Deletes reach every node; a component is collected once nothing refers to it.
    assert_eq!(at(&nodes, 0).call_as(Some(ADMIN_TOKEN), "DELETE", "/admin/deployments/later", None).status, 204);
    assert_eq!(blobs.keys(BUCKET, "components/").len(), 1, "hello still uses the component");
    assert_eq!(at(&nodes, 2).call_as(Some(&acme), "DELETE", "/admin/deployments/hello", None).status, 204);
    assert!(blobs.keys(BUCKET, "components/").is_empty(), "no record refers to it any more");
    for i in 0..3 {
        wait_until(&format!("node {i} to stop serving /hello"), Duration::from_secs(20), || {
            at(&nodes, i).call_as(Some(&acme), "POST", "/hello", Some(&json!({}))).status == 404
        });
    }

    // A node drained for a rolling update (SIGTERM) under load: its refusals (503 shutting_down)
    // are retried on the next node, so again no client sees an error.
    assert_eq!(at(&nodes, 0).deploy_bytes(&later, &wasm).status, 201);
    for i in 0..3 {
        wait_until(&format!("node {i} to serve /later"), Duration::from_secs(60), || {
            serves(at(&nodes, i), None, "/later")
        });
    }
    std::thread::sleep(Duration::from_millis(600)); // the picker sees /later everywhere
    let (_, holder) = through(&envoy.gateway, "/later", &acme, &ask).unwrap();
    let drained = addresses.iter().position(|a| *a == holder).expect("holder is a node");
    under_load(&envoy.gateway, "/later", &acme, &ask, || at(&nodes, drained).terminate());
    assert!(nodes[drained].as_mut().unwrap().wait_exit(Duration::from_secs(40)).is_some_and(|s| s.success()));
}

#[test]
fn nodes_reach_postgres_over_verified_tls() {
    let postgres = Postgres::start_tls();
    let blobs = ObjectStore::start();
    let data = tempfile::tempdir().unwrap();
    let url = format!("{}?sslmode=require", postgres.url);

    // Without trusting the server's CA the node does not start: its certificate is checked.
    let opts = node_options(&url, &blobs, "127.0.0.1:0", &data.path().join("untrusting"));
    let out = std::process::Command::new(kindling_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path().join("untrusting"))
        .args(&opts.extra_args)
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .env_remove("PGSSLROOTCERT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a node trusted an unknown CA");
    assert!(stderr.contains("certificate"), "the error names the certificate: {stderr}");

    // Trusting it (PGSSLROOTCERT), the node connects over TLS and deploys.
    let mut opts = node_options(&url, &blobs, "127.0.0.1:0", &data.path().join("trusting"));
    opts.env.push(("PGSSLROOTCERT".into(), postgres.ca_cert().display().to_string()));
    let node = Server::start_with(&[], opts);
    let wasm = std::fs::read(hello()).unwrap();
    let deployed = node.deploy_bytes("name = \"tls\"\nroutes = [\"/tls\"]\n", &wasm);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    let encrypted: u32 = postgres.query("SELECT count(*) FROM pg_stat_ssl WHERE ssl").parse().unwrap();
    assert!(encrypted >= 2, "the node's connections (queries and LISTEN) use TLS: {encrypted}");
}
