//! Test support: the real `kindling` binary, tiny models, guest components built from source
//! with componentize-py, and a server process per test on a loopback port.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

pub mod cluster;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// `target/<profile>`, derived from this test binary's own path (`target/<profile>/deps/e2e-*`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_path_buf()
}

/// A directory shared by every test of this run (models, compiled components).
pub fn shared_dir(name: &str) -> PathBuf {
    let dir = target_profile_dir().join("kindling-test").join(name);
    std::fs::create_dir_all(&dir).expect("create shared test dir");
    dir
}

pub fn kindling_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = target_profile_dir().join("kindling");
        if !bin.is_file() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "kindling", "--bin", "kindling"])
                .current_dir(workspace_root())
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the kindling binary failed");
        }
        bin
    })
    .clone()
}

/// A tiny model directory of the given architecture ("llama", "qwen2", "qwen3", "mistral", "opt"), made
/// again whenever the binary that writes it is newer (the format may have changed).
pub fn tiny_model(arch: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = shared_dir("models").join(format!("tiny-{arch}"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&dir.join("model.safetensors")) <= modified(&kindling_bin()) {
        let out = Command::new(kindling_bin())
            .args(["models", "make-tiny", "--arch", arch])
            .arg(&dir)
            .output()
            .expect("run kindling models make-tiny");
        assert!(out.status.success(), "make-tiny failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    dir
}

/// A tiny llama GGUF with a SentencePiece vocabulary, and its `.model` beside it, written by
/// `tests/reference/make_spm_gguf.py` (made again when the script changes).
pub fn spm_gguf() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = shared_dir("models").join("tiny-spm");
    let script = workspace_root().join("tests/reference/make_spm_gguf.py");
    let file = dir.join("tiny-spm.gguf");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&file) <= modified(&script) {
        let out = Command::new("python3").arg(&script).arg(&dir).output().expect("python3 runs");
        assert!(out.status.success(), "make_spm_gguf failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    file
}

fn newest_mtime(paths: &[PathBuf]) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if p.file_name().is_some_and(|n| n == "__pycache__") {
                continue;
            }
            stack.extend(std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
        } else if let Ok(m) = meta.modified() {
            newest = newest.max(m);
        }
    }
    newest
}

/// `target/.../guests/NAME.wasm` for the guest in `source_dir`, built by `build(source, out)` once
/// per run and only when the guest, its SDK files or the WIT changed since the last build.
fn cached_guest(source_dir: &Path, sdk_files: &[&str], build: impl FnOnce(&Path, &Path, &Path) -> Command) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let source_dir = root.join(source_dir);
    let name = source_dir.file_name().expect("guest dir name").to_string_lossy().to_string();
    let out = shared_dir("guests").join(format!("{name}.wasm"));
    let mut sources = vec![source_dir.clone(), root.join("wit")];
    sources.extend(sdk_files.iter().map(|f| root.join(f)));
    let fresh = std::fs::metadata(&out).and_then(|m| m.modified()).is_ok_and(|built| built > newest_mtime(&sources));
    if !fresh {
        let mut cmd = build(&root, &source_dir, &out);
        let status =
            cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/setup.sh installs the guest toolchains)"));
        assert!(status.success(), "building {} failed: {cmd:?}", source_dir.display());
    }
    out
}

/// A Python guest (a directory with app.py), built with componentize-py.
pub fn python_guest(source_dir: &Path) -> PathBuf {
    cached_guest(source_dir, &["sdk/python"], |root, source, out| {
        let mut cmd = Command::new("componentize-py");
        cmd.arg("-d").arg(root.join("wit")).args(["-w", "kindling:llm/handler", "componentize", "-p"]).arg(source);
        cmd.arg("-p").arg(root.join("sdk/python")).args(["app", "-o"]).arg(out);
        cmd
    })
}

/// A JavaScript guest (a directory with app.js), built with sdk/js/build.mjs (componentize-js).
pub fn js_guest(source_dir: &Path) -> PathBuf {
    cached_guest(source_dir, &["sdk/js/kindling.js", "sdk/js/build.mjs"], |root, source, out| {
        let mut cmd = Command::new("node");
        cmd.arg(root.join("sdk/js/build.mjs")).arg(source).arg(out).current_dir(root);
        cmd
    })
}

/// The hello example's manifest, over the two tiny models `server_with_models` registers.
pub const HELLO_MANIFEST: &str = r#"
name = "hello"
routes = ["/hello"]
models = ["tiny", "tiny-llama"]
[limits]
max_tokens = 64
"#;

/// The misbehaving guest's manifest: tight limits its paths run into.
pub const MISBEHAVE_MANIFEST: &str = r#"
name = "misbehave"
routes = ["/misbehave"]
[limits]
timeout_ms = 1500
memory_mb = 96
max_concurrency = 1
max_request_bytes = 4096
max_response_bytes = 1048576
"#;

pub fn hello() -> PathBuf {
    python_guest(Path::new("examples/hello-python"))
}

/// A guest that misbehaves on purpose, one way per path (tests/guests/misbehave-python).
pub fn misbehave() -> PathBuf {
    python_guest(Path::new("tests/guests/misbehave-python"))
}

/// A server with tiny qwen2 and llama models registered as "tiny" and "tiny-llama".
pub fn server_with_models() -> Server {
    Server::start(&[("tiny", &tiny_model("qwen2")), ("tiny-llama", &tiny_model("llama"))])
}

pub struct Server {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub admin_token: Option<String>,
}

#[derive(Default, Clone)]
pub struct ServerOptions {
    /// Reuse this data dir (for restart tests) instead of a fresh temporary one.
    pub data_dir: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub extra_args: Vec<String>,
    /// Listen here instead of a free port (a node a gateway knows by address, restarted).
    pub listen: Option<String>,
    pub env: Vec<(String, String)>,
}

/// An HTTP answer, whatever its status.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl From<Result<ureq::Response, ureq::Error>> for Answer {
    fn from(result: Result<ureq::Response, ureq::Error>) -> Self {
        answer(result)
    }
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let headers = resp.headers_names().into_iter().map(|n| {
        let v = resp.header(&n).unwrap_or_default().to_string();
        (n, v)
    });
    let headers = headers.collect();
    let mut body = String::new();
    resp.into_reader().read_to_string(&mut body).expect("read body");
    Answer { status, headers, body }
}

impl Server {
    pub fn start(models: &[(&str, &Path)]) -> Server {
        Self::start_with(models, ServerOptions::default())
    }

    pub fn start_with(models: &[(&str, &Path)], opts: ServerOptions) -> Server {
        let (temp, data_dir) = match opts.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let mut cmd = Command::new(kindling_bin());
        let listen = opts.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        cmd.args(["serve", "--listen", &listen, "--idle-unload-secs", "0", "--data-dir"])
            .arg(&data_dir)
            .arg("--compile-cache")
            .arg(shared_dir("compiled"))
            .args(&opts.extra_args)
            .env("KINDLING_LOG", "info")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, path) in models {
            cmd.arg("--model").arg(format!("{name}={}", path.display()));
        }
        if let Some(t) = &opts.admin_token {
            cmd.arg("--admin-token").arg(t);
        }
        let mut child = cmd.spawn().expect("spawn kindling serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("kindling listening on ") {
                        break addr.trim().to_string();
                    }
                }
                _ => {
                    let status = child.wait().expect("wait");
                    panic!("kindling serve exited before listening: {status}");
                }
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, url, data_dir, _temp: temp, admin_token: opts.admin_token }
    }

    /// Deploys raw component bytes with a manifest, as `kindling deploy` does.
    pub fn deploy_bytes(&self, manifest: &str, wasm: &[u8]) -> Answer {
        self.deploy_as(self.admin_token.as_deref(), manifest, wasm)
    }

    pub fn deploy(&self, manifest: &str, component: &Path) -> Answer {
        let wasm = std::fs::read(component).expect("read component");
        self.deploy_bytes(manifest, &wasm)
    }

    /// A request with an explicit bearer key (or none), for tenant-isolation tests.
    pub fn call_as(&self, key: Option<&str>, method: &str, path: &str, body: Option<&serde_json::Value>) -> Answer {
        let mut req = ureq::request(method, &format!("{}{path}", self.url)).timeout(Duration::from_secs(120));
        if let Some(k) = key {
            req = req.set("authorization", &format!("Bearer {k}"));
        }
        answer(match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        })
    }

    /// Deploys as the holder of `key` (a tenant API key or the admin token).
    pub fn deploy_as(&self, key: Option<&str>, manifest: &str, wasm: &[u8]) -> Answer {
        let boundary = "kindling-test-boundary-7d1f";
        let mut req = ureq::post(&format!("{}/admin/deployments", self.url))
            .timeout(Duration::from_secs(300))
            .set("content-type", &format!("multipart/form-data; boundary={boundary}"));
        if let Some(k) = key {
            req = req.set("authorization", &format!("Bearer {k}"));
        }
        answer(req.send_bytes(&multipart(boundary, manifest, wasm)))
    }

    pub fn admin_call(&self, method: &str, path: &str) -> Answer {
        self.call_as(self.admin_token.as_deref(), method, path, None)
    }

    pub fn get(&self, path: &str) -> Answer {
        answer(ureq::get(&format!("{}{path}", self.url)).timeout(Duration::from_secs(120)).call())
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Answer {
        answer(ureq::post(&format!("{}{path}", self.url)).timeout(Duration::from_secs(120)).send_json(body.clone()))
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Answer {
        answer(ureq::post(&format!("{}{path}", self.url)).timeout(Duration::from_secs(120)).send_bytes(body))
    }

    /// `127.0.0.1:PORT`, for raw TCP clients.
    pub fn addr(&self) -> &str {
        self.url.strip_prefix("http://").expect("http url")
    }

    /// A request with arbitrary headers (and optional bearer key), e.g. a forged `Host` or `Origin`.
    pub fn call_with_headers(&self, key: Option<&str>, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = ureq::request(method, &format!("{}{path}", self.url)).timeout(Duration::from_secs(120));
        for (name, value) in headers {
            req = req.set(name, value);
        }
        if let Some(k) = key {
            req = req.set("authorization", &format!("Bearer {k}"));
        }
        answer(req.call())
    }

    /// Creates a tenant with model grants as the operator; returns its API key.
    pub fn create_tenant(&self, name: &str, models: &[&str]) -> String {
        let body = serde_json::json!({ "name": name, "models": models });
        let created = self.call_as(self.admin_token.as_deref(), "POST", "/admin/tenants", Some(&body));
        assert_eq!(created.status, 201, "{}", created.body);
        created.json()["api_key"].as_str().expect("api_key").to_string()
    }

    /// Waits up to `timeout` for the process to exit; its exit status when it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM and waits for the process to exit, returning whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        self.terminate();
        self.wait_exit(Duration::from_secs(60)).is_some_and(|s| s.success())
    }

    /// Kills the process outright (SIGKILL), as a crashed node dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }
}

fn multipart(boundary: &str, manifest: &str, wasm: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, bytes) in [("manifest", manifest.as_bytes()), ("component", wasm)] {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Greedy generations from the independent numpy implementation (tests/reference).
pub fn reference_generations(model_dir: &Path, max_tokens: u32, prompts: &[&str]) -> Vec<serde_json::Value> {
    run_reference("reference_generate.py", model_dir, max_tokens, prompts)
}

/// The same from `reference_gguf.py`: the GGUF dequantized by the `gguf` package, its tokenizer
/// rebuilt from the file's metadata in Python.
pub fn reference_gguf_generations(file: &Path, max_tokens: u32, prompts: &[&str]) -> Vec<serde_json::Value> {
    run_reference("reference_gguf.py", file, max_tokens, prompts)
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF), which scripts/setup.sh unpacks from its PyPI package.
pub fn smollm2() -> PathBuf {
    let path = workspace_root().join(".kindling/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run scripts/setup.sh", path.display());
    path
}

fn run_reference(script: &str, model: &Path, max_tokens: u32, prompts: &[&str]) -> Vec<serde_json::Value> {
    let script = workspace_root().join("tests/reference").join(script);
    let out = Command::new("python3")
        .arg(script)
        .arg(model)
        .arg(max_tokens.to_string())
        .args(prompts)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}
