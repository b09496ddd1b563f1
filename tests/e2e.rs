//! End-to-end: the real server binary, real components built from source, real HTTP.

use std::path::Path;

use kindling_e2e::{
    HELLO_MANIFEST, MISBEHAVE_MANIFEST, Server, ServerOptions, hello, misbehave, python_guest, reference_generations,
    reference_gguf_generations, server_with_models, smollm2, tiny_model,
};
use serde_json::json;

#[test]
fn hello_generates_what_an_independent_implementation_generates() {
    let server = server_with_models();
    let deployed = server.deploy(HELLO_MANIFEST, &hello());
    assert_eq!(deployed.status, 201, "{}", deployed.body);

    let prompts = ["Once upon a time", "Hello, world! Tell me about the lighthouse."];
    for (model, arch) in [("tiny", "qwen2"), ("tiny-llama", "llama")] {
        let expected = reference_generations(&tiny_model(arch), 24, &prompts);
        for (prompt, reference) in prompts.iter().zip(&expected) {
            let req = json!({ "prompt": prompt, "model": model, "max_tokens": 24, "temperature": 0 });
            let answer = server.post_json("/hello", &req);
            assert_eq!(answer.status, 200, "{}", answer.body);
            let got = answer.json();
            assert_eq!(got["text"], reference["text"], "{model} on {prompt:?}");
            assert_eq!(got["finish_reason"], reference["finish_reason"], "{model} on {prompt:?}");
            let n = reference["ids"].as_array().unwrap().len();
            assert_eq!(got["usage"]["completion_tokens"], n, "{model} on {prompt:?}");
        }
    }
}

/// Prompts of mixed lengths; the longest crosses mistral's 32-token window with its completion.
const MIXED_PROMPTS: [&str; 8] = [
    "Once",
    "The lighthouse keeper climbed the stairs",
    "A small boat",
    "In the morning the fishermen went down to the harbour, looked at the grey sea and the clouds over the cliffs, and decided that",
    "She",
    "The old man told the children a story about",
    "Rain fell on the village",
    "When the storm came the lamp",
];

#[test]
fn forty_concurrent_streams_over_five_architectures_match_the_reference() {
    let archs = ["qwen2", "llama", "qwen3", "mistral", "opt"];
    let n = archs.len();
    let dirs: Vec<std::path::PathBuf> = archs.iter().map(|a| tiny_model(a)).collect();
    let names: Vec<String> = archs.iter().map(|a| format!("tiny-{a}")).collect();
    let models: Vec<(&str, &Path)> = names.iter().map(String::as_str).zip(dirs.iter().map(|d| d.as_path())).collect();
    let server = Server::start(&models);
    let manifest = format!(
        "name = \"batch\"\nroutes = [\"/batch\"]\nmodels = {names:?}\n[limits]\nmax_tokens = 64\nmax_concurrency = 64\n"
    );
    assert_eq!(server.deploy(&manifest, &hello()).status, 201);
    let expected: Vec<Vec<serde_json::Value>> =
        dirs.iter().map(|d| reference_generations(d, 40, &MIXED_PROMPTS)).collect();

    let clients: Vec<_> = (0..n * MIXED_PROMPTS.len())
        .map(|i| {
            let (url, model) = (server.url.clone(), names[i % n].clone());
            let prompt = MIXED_PROMPTS[i / n];
            std::thread::spawn(move || {
                let body = json!({ "prompt": prompt, "model": model, "max_tokens": 40, "stream": true });
                let resp =
                    ureq::post(&format!("{url}/batch")).timeout(std::time::Duration::from_secs(120)).send_json(body);
                let answer = kindling_e2e::Answer::from(resp);
                (answer.status, answer.body)
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let (status, text) = client.join().unwrap();
        assert_eq!(status, 200, "stream {i}: {text}");
        let reference = &expected[i % n][i / n];
        assert_eq!(text, reference["text"].as_str().unwrap(), "{} on {:?}", names[i % n], MIXED_PROMPTS[i / n]);
    }
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("kindling_engine_kv_blocks_used{model=\"tiny-qwen3\"} 0"), "{metrics}");
    assert!(metrics.contains("kindling_worker_engines{worker=\"cpu\"} 5"), "{metrics}");
}

/// One sample of a per-model engine series from `/metrics`.
fn engine_metric(server: &Server, series: &str, model: &str) -> f64 {
    let text = server.get("/metrics").body;
    let prefix = format!("{series}{{model=\"{model}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn a_client_that_goes_away_stops_its_generation_at_the_next_step() {
    let server = Server::start(&[("tiny", &tiny_model("qwen2"))]);
    let manifest = "name = \"long\"\nroutes = [\"/long\"]\nmodels = [\"tiny\"]\n[limits]\nmax_tokens = 4000\n";
    assert_eq!(server.deploy(manifest, &hello()).status, 201);
    let body = json!({ "prompt": "Once upon a time", "max_tokens": 4000 });
    // Uninterrupted, a whole completion runs to the end of the context: long enough to cut short.
    let started = std::time::Instant::now();
    let full = server.post_json("/long", &body);
    let full_time = started.elapsed();
    let full_tokens = full.json()["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(full_tokens >= 300, "the test needs a long generation: {}", full.body);
    let steps_before = engine_metric(&server, "kindling_engine_steps_total", "tiny");

    // The same request from a client that gives up a fifth of the way through. Steps are counted,
    // not seconds: how many run after the client left says whether its generation stopped.
    let gave_up = ureq::post(&format!("{}/long", server.url)).timeout(full_time / 5).send_json(body);
    assert!(gave_up.is_err(), "the client timed out");
    let steps_at_give_up = engine_metric(&server, "kindling_engine_steps_total", "tiny") - steps_before;
    let deadline = std::time::Instant::now() + full_time * 2 + std::time::Duration::from_secs(10);
    while engine_metric(&server, "kindling_engine_running_sequences", "tiny") != 0.0 {
        assert!(std::time::Instant::now() < deadline, "the sequence never left the batch");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let steps = engine_metric(&server, "kindling_engine_steps_total", "tiny") - steps_before;
    let after = steps - steps_at_give_up;
    assert!(
        after < full_tokens as f64 * 0.2 && steps < full_tokens as f64,
        "{after} steps ran after the client left ({steps} in all) for a request of {full_tokens} tokens"
    );
    // And the engine is free for the next caller at once.
    assert_eq!(server.post_json("/long", &json!({ "prompt": "Hi", "max_tokens": 4 })).status, 200);
}

const SMOLLM2_MANIFEST: &str =
    "name = \"smol\"\nroutes = [\"/smol\"]\nmodels = [\"smollm2\"]\n[limits]\nmax_tokens = 64\n";

#[test]
fn a_real_gguf_model_generates_what_an_independent_dequantizing_reference_generates() {
    let model = smollm2();
    let server = Server::start(&[("smollm2", &model)]);
    assert_eq!(server.deploy(SMOLLM2_MANIFEST, &hello()).status, 201);
    let prompts = ["The capital of France is", "Write a short poem about the sea.\n"];
    let expected = reference_gguf_generations(&model, 32, &prompts);
    for (prompt, reference) in prompts.iter().zip(&expected) {
        let req = json!({ "prompt": prompt, "model": "smollm2", "max_tokens": 32, "temperature": 0 });
        let got = server.post_json("/smol", &req);
        assert_eq!(got.status, 200, "{}", got.body);
        let got = got.json();
        assert_eq!(got["text"], reference["text"], "on {prompt:?}");
        assert_eq!(got["usage"]["completion_tokens"], reference["ids"].as_array().unwrap().len(), "on {prompt:?}");
    }
    // Token ids from the file's own tokenizer equal the reference's, special tokens and digits too.
    let text = "<|im_start|>user\nWhat is 1234 + 5678? Ça va, naïve café…<|im_end|>\n";
    let ours = tokenize(&model, text);
    assert_eq!(ours["ids"], reference_gguf_generations(&model, 0, &[text])[0]["prompt_ids"]);
    assert_eq!(ours["decoded"], "user\nWhat is 1234 + 5678? Ça va, naïve café…\n", "special tokens are skipped");
}

/// Our own `kindling models tokenize` on a file: ids, tokens and the ids decoded again.
fn tokenize(model: &Path, text: &str) -> serde_json::Value {
    let out = std::process::Command::new(kindling_e2e::kindling_bin())
        .args(["models", "tokenize"])
        .arg(model)
        .arg(text)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
}

#[test]
fn a_sentencepiece_gguf_tokenizes_as_sentencepiece_does_and_generates_as_the_reference() {
    let model = kindling_e2e::spm_gguf();
    // Spaces in runs, a tab and newline, digits, accents, a CJK and an emoji (no piece: bytes).
    let texts = [
        "The lighthouse keeper climbed 1234 stairs.",
        "  two  spaces,\ta tab\nand a newline ",
        "Ça va, naïve café… 日本 🙂",
        "",
    ];
    let reference = reference_gguf_generations(&model, 0, &texts);
    for (text, reference) in texts.iter().zip(&reference) {
        let ours = tokenize(&model, text);
        assert_eq!(ours["ids"], reference["prompt_ids"], "on {text:?}");
        assert_eq!(ours["decoded"], *text, "round trip of {text:?}");
    }
    let server = Server::start(&[("spm", &model)]);
    let manifest = "name = \"spm\"\nroutes = [\"/spm\"]\nmodels = [\"spm\"]\n[limits]\nmax_tokens = 64\n";
    assert_eq!(server.deploy(manifest, &hello()).status, 201);
    let prompts = ["The lighthouse keeper", "Once upon a time"];
    for (prompt, reference) in prompts.iter().zip(reference_gguf_generations(&model, 24, &prompts)) {
        let req = json!({ "prompt": prompt, "model": "spm", "max_tokens": 24, "temperature": 0 });
        let got = server.post_json("/spm", &req);
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.json()["text"], reference["text"], "on {prompt:?}");
    }
}

#[test]
fn a_real_model_answers_a_chat_through_the_openai_plugin() {
    let model = smollm2();
    let server = Server::start(&[("smollm2", &model)]);
    let plugin = python_guest(Path::new("plugins/openai-python"));
    let manifest = std::fs::read_to_string(kindling_e2e::workspace_root().join("plugins/openai-python/kindling.toml"))
        .unwrap()
        .replace("models = [\"tiny\"]", "models = [\"smollm2\"]");
    assert_eq!(server.deploy(&manifest, &plugin).status, 201);
    let question = json!({ "model": "smollm2", "max_tokens": 24, "temperature": 0,
        "messages": [{ "role": "user", "content": "What is the capital of France?" }] });
    let answer = server.post_json("/v1/chat/completions", &question);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let content = answer.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(content.contains("Paris"), "{content:?}");
}

#[test]
fn weights_kept_quantized_track_the_reference_where_it_is_not_a_near_tie() {
    // Quantized matmuls round activations to 8 bits (about 0.1 on a logit), so only tokens with a
    // clear margin are expected to agree: the first ones of this prompt are.
    let model = smollm2();
    let opts = ServerOptions { extra_args: vec!["--quantized-matmul".into()], ..Default::default() };
    let server = Server::start_with(&[("smollm2", &model)], opts);
    assert_eq!(server.deploy(SMOLLM2_MANIFEST, &hello()).status, 201);
    let prompt = "The capital of France is";
    let reference = &reference_gguf_generations(&model, 3, &[prompt])[0];
    let got = server.post_json("/smol", &json!({ "prompt": prompt, "model": "smollm2", "max_tokens": 3 }));
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.json()["text"], reference["text"]);
}

#[test]
fn truncated_or_ambiguous_gguf_checkpoints_are_refused_at_registration() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(smollm2()).unwrap();
    let truncated = dir.path().join("cut.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let answer = server.post_json("/admin/models", &json!({ "name": "cut", "path": truncated }));
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("past the end of the file"), "{}", answer.body);
    let two = dir.path().join("two");
    std::fs::create_dir(&two).unwrap();
    std::fs::write(two.join("a.gguf"), b"x").unwrap();
    std::fs::write(two.join("b.gguf"), b"y").unwrap();
    let answer = server.post_json("/admin/models", &json!({ "name": "two", "path": two }));
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("several GGUF files"), "{}", answer.body);
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn first_request_reports_a_cold_start_and_later_ones_do_not() {
    let server = server_with_models();
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let req = json!({ "prompt": "Hi", "max_tokens": 4 });
    let first = server.post_json("/hello", &req);
    assert_eq!(first.status, 200, "{}", first.body);
    let cold = first.header("x-kindling-cold-start").expect("cold start header on first request");
    assert!(cold.starts_with("model=tiny;"), "{cold}");
    let second = server.post_json("/hello", &req);
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-kindling-cold-start"), None);
    assert_eq!(first.json()["text"], second.json()["text"], "greedy decoding is deterministic");

    let metrics = server.get("/metrics");
    assert_eq!(metrics.status, 200);
    for line in [
        "kindling_requests_total{deployment=\"hello\",status=\"200\"} 2",
        "kindling_cold_starts_total{model=\"tiny\",pool=\"miss\"} 1",
        "kindling_cold_start_phase_seconds_count{model=\"tiny\",phase=\"h2d\"} 1",
        "kindling_completion_tokens_total{deployment=\"hello\"} 8",
        "kindling_deployments 1",
        "kindling_pool_checkpoints 1",
    ] {
        assert!(metrics.body.lines().any(|l| l == line), "/metrics lacks {line:?}:\n{}", metrics.body);
    }
    assert!(metrics.body.contains("kindling_engine_loaded_bytes{model=\"tiny\"}"));

    // Scaled to zero asleep, the model wakes with its weights still in place: nothing copied.
    let slept = server.post_json("/admin/models/tiny/sleep", &json!({}));
    assert_eq!(slept.json()["asleep"], true, "{}", slept.body);
    let models = server.get("/admin/models").json();
    assert_eq!(models[0]["asleep"], true, "{models}");
    let woken = server.post_json("/hello", &req);
    assert_eq!(woken.status, 200, "{}", woken.body);
    let cold = woken.header("x-kindling-cold-start").expect("a wake is a cold start");
    assert!(cold.contains("pool=resident;") && cold.contains("h2d_ms=0.0;"), "{cold}");
    assert_eq!(woken.json()["text"], first.json()["text"]);
    let metrics = server.get("/metrics").body;
    let line = "kindling_cold_starts_total{model=\"tiny\",pool=\"resident\"} 1";
    assert!(metrics.lines().any(|l| l == line), "/metrics lacks {line:?}:\n{metrics}");
}

#[test]
fn streamed_text_equals_the_whole_completion_and_sampling_is_seeded() {
    let server = server_with_models();
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let whole = server.post_json("/hello", &json!({ "prompt": "The cat", "max_tokens": 20 }));
    let streamed = server.post_json("/hello", &json!({ "prompt": "The cat", "max_tokens": 20, "stream": true }));
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert_eq!(whole.json()["text"].as_str().unwrap(), streamed.body);

    let sampled = |seed: u64| {
        let req = json!({ "prompt": "The cat", "max_tokens": 20, "temperature": 1.0, "seed": seed });
        server.post_json("/hello", &req).json()["text"].clone()
    };
    assert_eq!(sampled(7), sampled(7), "same seed, same text");
    assert_ne!(sampled(7), sampled(8), "different seeds should differ on a 20-token sample");
}

#[test]
fn stop_strings_end_the_completion_before_the_stop_text() {
    let server = server_with_models();
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let full = server.post_json("/hello", &json!({ "prompt": "Once", "max_tokens": 24 })).json();
    let text = full["text"].as_str().unwrap().to_string();
    // Stop at a piece of the greedy continuation; the result is the text before it.
    let stop: String = text.chars().skip(5).take(3).collect();
    assert!(!stop.is_empty(), "completion too short to test stop strings: {text:?}");
    let cut = text.find(&stop).unwrap();
    let stopped = server.post_json("/hello", &json!({ "prompt": "Once", "max_tokens": 24, "stop": [stop] })).json();
    assert_eq!(stopped["text"].as_str().unwrap(), &text[..cut]);
    assert_eq!(stopped["finish_reason"], "stop");
}

#[test]
fn a_model_outside_the_manifest_is_refused_to_the_guest() {
    let server = server_with_models();
    let manifest = "name = \"only-tiny\"\nroutes = [\"/only\"]\nmodels = [\"tiny\"]\n";
    assert_eq!(server.deploy(manifest, &hello()).status, 201);
    let answer = server.post_json("/only", &json!({ "prompt": "x", "model": "tiny-llama" }));
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "model_not_allowed");
    let ok = server.post_json("/only", &json!({ "prompt": "x", "model": "tiny", "max_tokens": 2 }));
    assert_eq!(ok.status, 200, "{}", ok.body);
}

#[test]
fn bad_deploys_get_clear_4xx_and_the_server_keeps_serving() {
    let server = server_with_models();
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let good_manifest = "name = \"bad\"\nroutes = [\"/bad\"]\n";
    let unknown_import =
        wat::parse_str(r#"(component (import "evil:thing/api" (instance (export "f" (func)))))"#).unwrap();
    let no_export = wat::parse_str("(component)").unwrap();
    let core_module = wat::parse_str("(module)").unwrap();
    let hello_wasm = std::fs::read(hello()).unwrap();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("garbage bytes", good_manifest, b"definitely not wasm".to_vec(), 400, "not a WebAssembly binary"),
        ("core module", good_manifest, core_module, 400, "core WebAssembly module"),
        ("truncated component", good_manifest, hello_wasm[..hello_wasm.len() / 2].to_vec(), 400, "invalid component"),
        ("unknown import", good_manifest, unknown_import, 400, "evil:thing/api"),
        ("no http export", good_manifest, no_export, 400, "incoming-handler"),
        ("manifest not toml", "{{{", hello_wasm.clone(), 400, "TOML"),
        ("manifest bad name", "name = \"Bad Name\"\nroutes = [\"/x\"]", hello_wasm.clone(), 400, "lowercase"),
        (
            "unregistered model",
            "name = \"x\"\nroutes = [\"/x\"]\nmodels = [\"gpt-9\"]",
            hello_wasm.clone(),
            400,
            "gpt-9",
        ),
        (
            "route taken",
            "name = \"other\"\nroutes = [\"/hello\"]",
            hello_wasm.clone(),
            409,
            "already served by deployment hello",
        ),
        ("reserved route", "name = \"x\"\nroutes = [\"/admin\"]", hello_wasm.clone(), 400, "reserved"),
    ];
    for (what, manifest, wasm, status, message) in cases {
        let answer = server.deploy_bytes(manifest, &wasm);
        assert_eq!(answer.status, status, "{what}: {}", answer.body);
        let msg = answer.json()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(message), "{what}: {msg:?} should mention {message:?}");
    }
    let missing_part = server.deploy_bytes("", b"");
    assert_eq!(missing_part.status, 400);

    let list = server.admin_call("GET", "/admin/deployments").json();
    assert_eq!(list.as_array().unwrap().len(), 1, "no failed deploy may leave a deployment behind: {list}");
    let answer = server.post_json("/hello", &json!({ "prompt": "still here?", "max_tokens": 3 }));
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[test]
fn deployments_can_be_listed_replaced_and_deleted() {
    let server = server_with_models();
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let replaced = server.deploy(&HELLO_MANIFEST.replace("[\"/hello\"]", "[\"/hello\", \"/hi\"]"), &hello());
    assert_eq!(replaced.status, 200, "redeploy replaces: {}", replaced.body);
    assert_eq!(server.post_json("/hi", &json!({ "prompt": "x", "max_tokens": 1 })).status, 200);
    let one = server.admin_call("GET", "/admin/deployments/hello").json();
    assert_eq!(one["routes"], json!(["/hello", "/hi"]));
    assert_eq!(server.admin_call("DELETE", "/admin/deployments/hello").status, 204);
    assert_eq!(server.admin_call("DELETE", "/admin/deployments/hello").status, 404);
    let gone = server.post_json("/hello", &json!({}));
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"]["code"], "no_route");
}

#[test]
fn a_restarted_server_serves_every_deployment_again() {
    let data = tempfile::tempdir().unwrap();
    let models = [("tiny", tiny_model("qwen2")), ("tiny-llama", tiny_model("llama"))];
    let models: Vec<(&str, &Path)> = models.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let opts = ServerOptions { data_dir: Some(data.path().to_path_buf()), ..Default::default() };
    let server = Server::start_with(&models, opts.clone());
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let before = server.post_json("/hello", &json!({ "prompt": "Persist", "max_tokens": 8 })).json();
    assert!(server.stop(), "graceful shutdown exits 0");

    let server = Server::start_with(&models, opts);
    let after = server.post_json("/hello", &json!({ "prompt": "Persist", "max_tokens": 8 }));
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(after.json()["text"], before["text"]);
}

/// A server with the hello and misbehave deployments; hello must keep working throughout.
fn limits_server() -> Server {
    let server = server_with_models();
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let deployed = server.deploy(MISBEHAVE_MANIFEST, &misbehave());
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    server
}

fn hello_still_works(server: &Server) {
    let answer = server.post_json("/hello", &json!({ "prompt": "still fine?", "max_tokens": 3 }));
    assert_eq!(answer.status, 200, "a healthy tenant was affected: {}", answer.body);
}

#[test]
fn a_handler_that_loops_forever_is_stopped_at_its_deadline() {
    let server = limits_server();
    let started = std::time::Instant::now();
    let answer = server.get("/misbehave/loop");
    assert_eq!(answer.status, 504, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "handler_timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "deadline not enforced promptly");
    hello_still_works(&server);
}

#[test]
fn a_handler_that_eats_memory_hits_its_limit() {
    let server = limits_server();
    let answer = server.get("/misbehave/memory");
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert!(answer.body.contains("MemoryError") || answer.body.contains("handler_trapped"), "{}", answer.body);
    hello_still_works(&server);
    assert_eq!(server.get("/misbehave/ok").status, 200, "the deployment itself recovers on the next request");
}

#[test]
fn a_handler_that_exits_is_a_500_and_nothing_else_breaks() {
    let server = limits_server();
    let answer = server.get("/misbehave/exit");
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "handler_trapped");
    hello_still_works(&server);
}

#[test]
fn concurrency_over_the_limit_gets_429_with_retry_after() {
    let server = limits_server();
    let url = server.url.clone();
    let slow =
        std::thread::spawn(move || ureq::get(&format!("{url}/misbehave/sleep?s=1")).call().map(|r| r.status()).ok());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let answer = server.get("/misbehave/ok");
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert!(answer.header("retry-after").is_some());
    assert_eq!(slow.join().unwrap(), Some(200));
    assert_eq!(server.get("/misbehave/ok").status, 200, "the slot is released when the body is done");
}

#[test]
fn body_size_caps_are_enforced_both_ways() {
    let server = limits_server();
    let answer = server.post_raw("/misbehave/echo", &[b'a'; 4096]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = server.post_raw("/misbehave/echo", &[b'a'; 4097]);
    assert_eq!(answer.status, 413, "{}", answer.body);
    // 4 MiB response against a 1 MiB cap: the body is cut off, the client sees a broken body.
    let resp = ureq::get(&format!("{}/misbehave/big", server.url)).call().unwrap();
    let mut body = Vec::new();
    let read = std::io::Read::read_to_end(&mut resp.into_reader(), &mut body);
    assert!(read.is_err() || body.len() <= 1 << 20, "got {} bytes past a 1 MiB cap", body.len());
    hello_still_works(&server);
}

#[test]
fn bad_prompts_get_clear_errors() {
    let server = server_with_models();
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let long_prompt = "lighthouse keeper ".repeat(400);
    let answer = server.post_json("/hello", &json!({ "prompt": long_prompt }));
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "prompt_too_long");
    // Streamed, the refusal comes before the first byte, so it is still a 413 with its code.
    let streamed = server.post_json("/hello", &json!({ "prompt": long_prompt, "stream": true }));
    assert_eq!((streamed.status, streamed.json()["error"]["code"].as_str()), (413, Some("prompt_too_long")));
    let answer = server.post_raw("/hello", b"{\"prompt\": \"\xff\xfe\"}");
    assert_eq!(answer.status, 400, "{}", answer.body);
    // The manifest caps tokens per generation at 64 whatever the handler asks for.
    let capped = server.post_json("/hello", &json!({ "prompt": "Once", "max_tokens": 1000 })).json();
    assert_eq!(capped["usage"]["completion_tokens"], 64, "{capped}");
    assert_eq!(capped["finish_reason"], "length");
    let answer = server.post_json("/hello", &json!({ "prompt": "x", "temperature": -1 }));
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "invalid_params");
}

#[test]
fn corrupt_models_are_refused_at_registration() {
    let server = server_with_models();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(tiny_model("qwen2").join(f), dir.path().join(f)).unwrap();
    }
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let body = json!({ "name": "broken", "path": dir.path() });
    let answer = kindling_e2e::Answer::from(ureq::post(&format!("{}/admin/models", server.url)).send_json(body));
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.json()["error"]["message"].as_str().unwrap().contains("corrupt or truncated"));
    hello_registered_models_unaffected(&server);
}

#[test]
fn a_split_over_more_workers_than_the_server_has_is_refused_at_registration() {
    let server = server_with_models();
    let path = tiny_model("qwen2");
    for (ranks, says) in [(2, "split over 2 workers: this server has 1"), (0, "split over 0 workers")] {
        let body = json!({ "name": "split", "path": path, "tensor_parallel": ranks });
        let answer = server.post_json("/admin/models", &body);
        assert_eq!(answer.status, 400, "{}", answer.body);
        assert_eq!(answer.json()["error"]["code"], "invalid_model", "{}", answer.body);
        assert!(answer.json()["error"]["message"].as_str().unwrap().contains(says), "{}", answer.body);
    }
    // Whole (1) is what an absent field means.
    let answer = server.post_json("/admin/models", &json!({ "name": "one", "path": path, "tensor_parallel": 1 }));
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(answer.json()["ranks"], 1);
}

fn hello_registered_models_unaffected(server: &Server) {
    let models = server.admin_call("GET", "/admin/models").json();
    assert_eq!(models.as_array().unwrap().len(), 2, "{models}");
}

#[test]
fn tenants_cannot_see_call_or_delete_each_others_deployments() {
    let opts = ServerOptions { admin_token: Some("root-token".into()), ..Default::default() };
    let server = Server::start_with(&[("tiny", &tiny_model("qwen2"))], opts);
    assert_eq!(server.call_as(None, "GET", "/admin/deployments", None).status, 401);
    assert_eq!(server.call_as(Some("wrong"), "GET", "/admin/deployments", None).status, 401);
    let key = |name: &str| {
        let created = server.call_as(Some("root-token"), "POST", "/admin/tenants", Some(&json!({ "name": name })));
        assert_eq!(created.status, 201, "{}", created.body);
        created.json()["api_key"].as_str().unwrap().to_string()
    };
    let (acme, bolt) = (key("acme"), key("bolt"));
    assert_eq!(server.call_as(Some(&acme), "GET", "/admin/tenants", None).status, 403, "tenants are admin-only");

    let wasm = std::fs::read(misbehave()).unwrap();
    let manifest = |name: &str| format!("name = \"{name}\"\nroutes = [\"/{name}\"]\n");
    assert_eq!(server.deploy_as(Some(&acme), &manifest("acme-app"), &wasm).status, 201);
    assert_eq!(server.deploy_as(Some(&bolt), &manifest("bolt-app"), &wasm).status, 201);

    // Seeing: each tenant lists only its own; the operator sees both.
    let names = |key: &str| -> Vec<String> {
        let list = server.call_as(Some(key), "GET", "/admin/deployments", None).json();
        list.as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names(&acme), ["acme-app"]);
    assert_eq!(names(&bolt), ["bolt-app"]);
    assert_eq!(names("root-token"), ["acme-app", "bolt-app"]);
    assert_eq!(server.call_as(Some(&bolt), "GET", "/admin/deployments/acme-app", None).status, 404);

    // Calling: only with the owner's key (others get the 404 of a missing route); the handler
    // never sees the key.
    assert_eq!(server.call_as(None, "GET", "/acme-app/ok", None).status, 404);
    assert_eq!(server.call_as(Some(&bolt), "GET", "/acme-app/ok", None).status, 404);
    let own = server.call_as(Some(&acme), "GET", "/acme-app/headers", None);
    assert_eq!(own.status, 200, "{}", own.body);
    assert!(own.json().get("authorization").is_none(), "credentials leaked to the handler: {}", own.body);

    // Deleting or taking over: refused without revealing the other tenant.
    assert_eq!(server.call_as(Some(&bolt), "DELETE", "/admin/deployments/acme-app", None).status, 404);
    let takeover = server.deploy_as(Some(&bolt), &manifest("acme-app"), &wasm);
    assert_eq!(takeover.status, 409, "{}", takeover.body);
    let route_grab = server.deploy_as(Some(&bolt), "name = \"grab\"\nroutes = [\"/acme-app\"]\n", &wasm);
    assert_eq!(route_grab.status, 409);
    assert!(
        !route_grab.body.contains("acme-app\n") && route_grab.body.contains("another owner"),
        "{}",
        route_grab.body
    );
    assert_eq!(server.call_as(Some(&acme), "GET", "/acme-app/ok", None).status, 200, "acme is untouched");
    assert_eq!(server.call_as(Some(&acme), "DELETE", "/admin/deployments/acme-app", None).status, 204);
}

#[test]
fn shutdown_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let server = limits_server();
    let url = server.url.clone();
    let in_flight = std::thread::spawn(move || {
        let resp = ureq::get(&format!("{url}/misbehave/sleep?s=1")).call();
        resp.map(|r| (r.status(), r.into_string().unwrap_or_default())).ok()
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    server.terminate();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // A new request is either refused at connect (listener closed) or answered 503.
    match ureq::get(&format!("{}/hello", server.url)).call() {
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 503),
        Err(ureq::Error::Transport(_)) => {}
        Ok(r) => panic!("a request after shutdown began was served: {}", r.status()),
    }
    let (status, body) = in_flight.join().unwrap().expect("in-flight request completes");
    assert_eq!((status, body.as_str()), (200, "slept\n"));
    assert!(server.stop(), "server exits cleanly after draining");
}

#[test]
fn bench_serve_drives_concurrent_streams_through_the_openai_plugin() {
    let plugin = python_guest(Path::new("plugins/openai-python"));
    let out = std::process::Command::new(kindling_e2e::kindling_bin())
        .args(["bench", "serve", "--concurrency", "1,6", "--prompt-tokens", "4-40", "--output-tokens", "12"])
        .arg("--model")
        .arg(format!("tiny={}", tiny_model("llama").display()))
        .arg("--plugin")
        .arg(&plugin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for level in levels {
        let ours = &level["kindling"];
        let streams = level["streams"].as_u64().unwrap();
        assert_eq!(ours["errors"], 0, "{level}");
        // Tiny models may stop early at their end-of-text token; never beyond the budget.
        let tokens = ours["output_tokens"].as_u64().unwrap();
        assert!(tokens > 0 && tokens <= streams * 12, "{level}");
        assert!(ours["ttft_p50_s"].as_f64().unwrap() <= ours["wall_s"].as_f64().unwrap(), "{level}");
    }
    let metrics = report["engine_metrics"].as_array().unwrap();
    assert!(metrics.iter().any(|m| m.as_str().unwrap().starts_with("kindling_engine_steps_total")), "{report}");
}

#[test]
fn bench_coldstart_measures_a_pool_miss_hits_wakes_splits_and_models_started_together_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("coldstart.json");
    let out = std::process::Command::new(kindling_e2e::kindling_bin())
        .args([
            "bench",
            "coldstart",
            "--runs",
            "2",
            "--skip-fresh",
            "--together",
            "--tensor-parallel",
            "2",
            "--pool-miss",
        ])
        .arg("--out")
        .arg(&out_file)
        .arg("--model")
        .arg(format!("q={}", tiny_model("qwen2").display()))
        .arg("--model")
        .arg(format!("l={}", tiny_model("llama").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    for name in ["q", "l"] {
        let m = &report["models"][name];
        assert!(m["first_request_pool_miss_s"].as_f64().unwrap() > 0.0, "{m}");
        let hits = m["kindling_warm_pool"]["runs"].as_array().unwrap();
        assert!(hits.len() == 2 && hits.iter().all(|r| r["pool_hit"] == true), "{m}");
        assert_eq!(m["kindling_wake"]["runs"].as_array().unwrap().len(), 2, "{m}");
        // Split over two ranks (threads on the CPU): from the pool, with the whole model's text.
        let split = &m["tensor_parallel"];
        assert_eq!(split["ranks"], 2, "{m}");
        assert!(split["runs"].as_array().unwrap().iter().all(|r| r["pool_hit"] == true), "{m}");
        assert_eq!(split["greedy_text"]["same"], true, "{m}");
        assert_eq!(split["collective_check_max_error"], 0.0, "{m}");
        assert_eq!(split["collective_groups_made"], 1, "made once, lent to every start: {m}");
        assert!(!split["greedy_text"]["whole"].as_str().unwrap().is_empty(), "{m}");
        // Misses from disk, each after reading the files as the baseline, each giving the pooled
        // copy's greedy text.
        let rounds = m["pool_miss"]["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2, "{m}");
        assert_eq!(m["pool_miss"]["pooled_text_repeats"], true, "greedy text repeats on a CPU: {m}");
        for round in rounds {
            assert!(round["miss_s"].as_f64().unwrap() > 0.0, "{m}");
            assert!(round["page_in_s"].as_f64().unwrap() <= round["miss_s"].as_f64().unwrap(), "{m}");
            assert!(round["disk"].as_object().unwrap().keys().any(|k| k.starts_with("readers_")), "{m}");
            assert_eq!(round["text_as_pooled"], true, "{m}");
        }
    }
    let together = report["together"]["models"].as_array().unwrap();
    assert_eq!(together.len(), 2, "{report}");
    assert!(together.iter().all(|r| r["pool_hit"] == true && r["worker"] == "cpu"), "{report}");
    let (p50, p99) =
        (report["together"]["first_token_p50_s"].as_f64(), report["together"]["first_token_p99_s"].as_f64());
    assert!(p50.unwrap() > 0.0 && p50 <= p99, "{report}");
}

#[test]
fn the_openai_plugin_serves_the_official_openai_client() {
    let server = server_with_models();
    let plugin = python_guest(Path::new("plugins/openai-python"));
    let manifest =
        std::fs::read_to_string(kindling_e2e::workspace_root().join("plugins/openai-python/kindling.toml")).unwrap();
    let deployed = server.deploy(&manifest, &plugin);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    let script = kindling_e2e::workspace_root().join("tests/reference/openai_client_check.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(format!("{}/v1", server.url))
        .arg("tiny")
        .output()
        .unwrap();
    assert!(out.status.success(), "openai client failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let chat = &got["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert!(!chat["text"].as_str().unwrap().is_empty(), "{got}");
    let completion_tokens = chat["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion_tokens > 0 && completion_tokens <= 16, "{got}");
    assert_eq!(
        chat["usage"]["total_tokens"].as_u64().unwrap(),
        chat["usage"]["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    // Streaming: the same greedy text, delivered in several events, with usage at the end.
    let streamed = &got["chat_stream"];
    assert_eq!(streamed["text"], chat["text"], "{got}");
    assert!(streamed["pieces"].as_array().unwrap().len() > 1, "{got}");
    assert_eq!(streamed["finish"], chat["finish"]);
    assert_eq!(streamed["usage"]["completion_tokens"], chat["usage"]["completion_tokens"]);
    // Plain completions match the hello handler's greedy text for the same prompt.
    let hello_text = {
        assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
        server.post_json("/hello", &json!({ "prompt": "Once upon a time", "max_tokens": 12 })).json()["text"].clone()
    };
    assert_eq!(got["completion"]["text"], hello_text, "{got}");
    assert_eq!(got["completion_stream"]["text"], hello_text);
    assert_eq!(got["error"]["status"], 403, "a model outside the manifest: {got}");
}

#[test]
fn a_javascript_handler_generates_the_same_text_as_the_python_one() {
    let server = server_with_models();
    let js_manifest =
        std::fs::read_to_string(kindling_e2e::workspace_root().join("examples/hello-js/kindling.toml")).unwrap();
    let deployed = server.deploy(&js_manifest, &kindling_e2e::js_guest(Path::new("examples/hello-js")));
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    assert_eq!(server.deploy(HELLO_MANIFEST, &hello()).status, 201);
    let req = json!({ "prompt": "Hello, world! Tell me about the lighthouse.", "max_tokens": 20 });
    let js = server.post_json("/hello-js", &req);
    assert_eq!(js.status, 200, "{}", js.body);
    let py = server.post_json("/hello", &req).json();
    assert_eq!(js.json()["text"], py["text"]);
    assert_eq!(js.json()["usage"], py["usage"]);
    let streamed = server.post_json(
        "/hello-js",
        &json!({ "prompt": "Hello, world! Tell me about the lighthouse.", "max_tokens": 20, "stream": true }),
    );
    assert_eq!(streamed.body, py["text"].as_str().unwrap());
    let refused = server.post_json("/hello-js", &json!({ "model": "tiny-llama" }));
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "model_not_allowed");
    assert_eq!(server.post_raw("/hello-js", b"{oops").status, 400);
    let long = json!({ "prompt": "lighthouse keeper ".repeat(400), "stream": true });
    let refused = server.post_json("/hello-js", &long);
    assert_eq!((refused.status, refused.json()["error"]["code"].as_str()), (413, Some("prompt_too_long")));
}

#[test]
fn the_smallest_hand_written_component_serves_and_splits_its_time() {
    let server = Server::start(&[]);
    let root = kindling_e2e::workspace_root();
    let wasm = wat::parse_file(root.join("examples/ping-wat/ping.wat")).unwrap();
    let manifest = std::fs::read_to_string(root.join("examples/ping-wat/kindling.toml")).unwrap();
    assert_eq!(server.deploy_bytes(&manifest, &wasm).status, 201);
    let answer = server.get("/ping-wat/anything");
    assert_eq!((answer.status, answer.body.as_str()), (200, ""));
    let timing = answer.header("server-timing").expect("Server-Timing on an invocation");
    assert!(timing.starts_with("instantiate;dur=") && timing.contains(", handler;dur="), "{timing}");
    assert!(!timing.ends_with(", warm"), "nothing was made ahead of the first request: {timing}");
    // Its successor is made in the background; a later request gets it (`, warm`).
    let warm = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        server.get("/ping-wat/again").header("server-timing").is_some_and(|t| t.ends_with(", warm"))
    });
    assert!(warm, "no request got an instance made ahead of it");
}

#[test]
fn the_rust_sdk_example_type_checks() {
    // The wasm32 target is not installable here, so this proves the SDK and example agree with
    // the WIT; building for wasm32-wasip2 produces the deployable component.
    let root = kindling_e2e::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["check", "--quiet", "--manifest-path"])
        .arg(root.join("examples/hello-rust/Cargo.toml"))
        .arg("--target-dir")
        .arg(kindling_e2e::shared_dir("rust-example"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn models_add_with_preload_shows_progress_and_makes_the_first_request_a_pool_hit() {
    let server = server_with_models();
    let out = std::process::Command::new(kindling_e2e::kindling_bin())
        .args(["models", "add", "tiny-copy"])
        .arg(tiny_model("qwen2"))
        .args(["--preload", "--url", &server.url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("100%") && stderr.contains("tiny-copy: pooled in"), "{stderr}");
    let manifest = "name = \"copy\"\nroutes = [\"/copy\"]\nmodels = [\"tiny-copy\"]\n";
    assert_eq!(server.deploy(manifest, &hello()).status, 201);
    let first = server.post_json("/copy", &json!({ "model": "tiny-copy", "max_tokens": 2 }));
    assert_eq!(first.status, 200, "{}", first.body);
    let cold = first.header("x-kindling-cold-start").unwrap();
    assert!(cold.contains("pool=hit"), "{cold}");
    let again = server.call_as(None, "POST", "/admin/models/tiny-copy/preload", None);
    assert!(again.body.contains("\"already_pooled\":true"), "{}", again.body);
    assert_eq!(server.call_as(None, "POST", "/admin/models/nope/preload", None).status, 404);
}
