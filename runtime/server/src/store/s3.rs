//! Component bytes in S3-compatible object storage, keyed `components/<sha256>.wasm`, with a
//! verified cache under the node's data dir: each node fetches a component once, checks its hash,
//! and compiles it once (the compiled-component cache is keyed by the same hash).

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{remove_interrupted_writes, retain_files, write_atomically};
use super::sigv4::{self, Credentials};
use super::{sha256_hex, verified};

/// Where component bytes live: `endpoint` (`http(s)://host[:port]`, path-style requests) and bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Config {
    /// `http(s)://host[:port]/bucket`, credentials from `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_REGION` (default `us-east-1`).
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let shape = || anyhow::anyhow!("--blobs must look like https://host[:port]/bucket, got {url:?}");
        let (scheme, rest) = url.split_once("://").filter(|(s, _)| matches!(*s, "http" | "https")).ok_or_else(shape)?;
        let (host, bucket) = rest
            .split_once('/')
            .filter(|(h, b)| !h.is_empty() && !b.is_empty() && !b.contains('/'))
            .ok_or_else(shape)?;
        let env =
            |name: &str| std::env::var(name).map_err(|_| anyhow::anyhow!("--blobs needs {name} in the environment"));
        Ok(Self {
            endpoint: format!("{scheme}://{host}"),
            bucket: bucket.to_string(),
            region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
            access_key: env("AWS_ACCESS_KEY_ID")?,
            secret_key: env("AWS_SECRET_ACCESS_KEY")?,
        })
    }
}

/// A response that is not 2xx, kept typed so 404 is told apart from a failure.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("object storage answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("object storage unreachable: {0}")]
    Transport(String),
}

impl From<S3Error> for io::Error {
    fn from(e: S3Error) -> Self {
        match e {
            S3Error::Status { status: 404, .. } => io::Error::new(io::ErrorKind::NotFound, e),
            e => io::Error::other(e),
        }
    }
}

/// A small, blocking S3 client: the calls below are all a component store needs.
struct Client {
    config: S3Config,
    creds: Credentials,
    agent: ureq::Agent,
}

impl Client {
    fn new(config: S3Config) -> Self {
        let creds = Credentials {
            access_key: config.access_key.clone(),
            secret_key: config.secret_key.clone(),
            region: config.region.clone(),
        };
        let agent =
            ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(300)).build();
        Self { config, creds, agent }
    }

    fn request(
        &self,
        method: &str,
        key: Option<&str>,
        query: &[(String, String)],
        body: &[u8],
    ) -> Result<Vec<u8>, S3Error> {
        let host = self.config.endpoint.split_once("://").map_or(self.config.endpoint.as_str(), |(_, h)| h);
        let path = match key {
            Some(k) => format!("/{}/{k}", self.config.bucket),
            None => format!("/{}", self.config.bucket),
        };
        let payload = sha256_hex(body);
        let date = sigv4::amz_date(super::now_unix());
        let req = sigv4::Request {
            method,
            host,
            path: &path,
            query,
            headers: &[],
            payload_sha256: &payload,
            amz_date: &date,
        };
        let headers = sigv4::sign(&self.creds, &req);
        let mut url = format!("{}{}", self.config.endpoint, sigv4::uri_encode(&path, true));
        if !query.is_empty() {
            let q: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{}={}", sigv4::uri_encode(k, false), sigv4::uri_encode(v, false)))
                .collect();
            url = format!("{url}?{}", q.join("&"));
        }
        let mut call = self.agent.request(method, &url);
        for (k, v) in headers.iter().filter(|(k, _)| k != "host") {
            call = call.set(k, v);
        }
        let response = if body.is_empty() && method != "PUT" { call.call() } else { call.send_bytes(body) };
        match response {
            Ok(resp) => {
                let mut out = Vec::new();
                resp.into_reader()
                    .take(1 << 30)
                    .read_to_end(&mut out)
                    .map_err(|e| S3Error::Transport(e.to_string()))?;
                Ok(out)
            }
            Err(ureq::Error::Status(status, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                Err(S3Error::Status { status, body: body.chars().take(300).collect() })
            }
            Err(e) => Err(S3Error::Transport(e.to_string())),
        }
    }

    /// Every key under `prefix`, following continuation tokens.
    fn list(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query =
                vec![("list-type".to_string(), "2".to_string()), ("prefix".to_string(), prefix.to_string())];
            if let Some(t) = &token {
                query.push(("continuation-token".into(), t.clone()));
            }
            let xml = String::from_utf8_lossy(&self.request("GET", None, &query, b"")?).into_owned();
            keys.extend(xml_values(&xml, "Key"));
            token = xml_values(&xml, "NextContinuationToken").into_iter().next();
            if token.is_none() || !xml.contains("<IsTruncated>true</IsTruncated>") {
                return Ok(keys);
            }
        }
    }
}

/// The text of every `<tag>…</tag>` in a ListObjectsV2 answer (keys here are hex hashes, so
/// no entity decoding is needed beyond what the format guarantees).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open).skip(1).filter_map(|part| part.split_once(&close).map(|(v, _)| v.to_string())).collect()
}

fn object_key(sha256: &str) -> String {
    format!("components/{sha256}.wasm")
}

pub struct ComponentBlobs {
    client: std::sync::Arc<Client>,
    cache: PathBuf,
}

impl ComponentBlobs {
    /// Connects and makes sure the bucket exists.
    pub async fn open(config: S3Config, cache: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(cache)?;
        remove_interrupted_writes(cache)?;
        let blobs = Self { client: std::sync::Arc::new(Client::new(config)), cache: cache.to_path_buf() };
        blobs
            .blocking(|c| match c.request("HEAD", None, &[], b"") {
                Err(S3Error::Status { status: 404, .. }) => c.request("PUT", None, &[], b"").map(drop),
                other => other.map(drop),
            })
            .await
            .map_err(|e| anyhow::anyhow!("object storage bucket: {e}"))?;
        Ok(blobs)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, S3Error> + Send + 'static,
    ) -> io::Result<T> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || f(&client).map_err(io::Error::from))
            .await
            .map_err(|e| io::Error::other(format!("object storage task failed: {e}")))?
    }

    pub fn describe(&self) -> String {
        format!("{}/{}", self.client.config.endpoint, self.client.config.bucket)
    }

    fn cached(&self, sha256: &str) -> PathBuf {
        self.cache.join(format!("{sha256}.wasm"))
    }

    /// Stores a component unless the bucket has it already.
    pub async fn put(&self, sha256: &str, wasm: std::sync::Arc<Vec<u8>>) -> io::Result<()> {
        let key = object_key(sha256);
        self.blocking(move |c| match c.request("HEAD", Some(&key), &[], b"") {
            Ok(_) => Ok(()),
            Err(S3Error::Status { status: 404, .. }) => c.request("PUT", Some(&key), &[], &wasm).map(drop),
            Err(e) => Err(e),
        })
        .await
    }

    /// A component's bytes: from this node's cache when it has them intact, else from the bucket
    /// (then cached). Bytes that do not hash to `sha256` are an error either way.
    pub async fn get(&self, sha256: &str) -> io::Result<Vec<u8>> {
        let path = self.cached(sha256);
        if let Ok(bytes) = tokio::fs::read(&path).await {
            match verified(sha256, bytes) {
                Ok(bytes) => return Ok(bytes),
                Err(e) => tracing::warn!(error = %e, "cached component is corrupt; fetching it again"),
            }
        }
        let key = object_key(sha256);
        let bytes = verified(sha256, self.blocking(move |c| c.request("GET", Some(&key), &[], b"")).await?)?;
        if let Err(e) = write_atomically(&path, &bytes) {
            tracing::warn!(error = %e, "could not cache a component");
        }
        Ok(bytes)
    }

    /// Deletes every stored component not in `live`, and this node's cached copies of them.
    pub async fn retain(&self, live: BTreeSet<String>) -> io::Result<()> {
        self.retain_cached(&live)?;
        self.blocking(move |c| {
            for key in c.list("components/")? {
                let sha = key.trim_start_matches("components/").trim_end_matches(".wasm");
                if !live.contains(sha) {
                    c.request("DELETE", Some(&key), &[], b"")?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Drops this node's cached copies of components no record refers to.
    pub fn retain_cached(&self, live: &BTreeSet<String>) -> io::Result<()> {
        retain_files(&self.cache, live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_answers_are_read() {
        let xml = "<ListBucketResult><IsTruncated>true</IsTruncated><Contents><Key>components/aa.wasm</Key></Contents>\
                   <Contents><Key>components/bb.wasm</Key></Contents><NextContinuationToken>t1</NextContinuationToken></ListBucketResult>";
        assert_eq!(xml_values(xml, "Key"), ["components/aa.wasm", "components/bb.wasm"]);
        assert_eq!(xml_values(xml, "NextContinuationToken"), ["t1"]);
    }

    #[test]
    fn blob_urls_are_checked() {
        assert!(S3Config::from_url("s3://bucket").is_err());
        assert!(S3Config::from_url("ftp://host/bucket").is_err());
        assert!(S3Config::from_url("http://127.0.0.1:9000/").is_err());
        assert!(S3Config::from_url("http://127.0.0.1:9000/a/b").is_err());
    }
}
