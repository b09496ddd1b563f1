//! Durable state: tenants, deployments (records + component bytes) and API-registered models,
//! behind one trait so the single-node default (`file`: the data dir) and the cluster's shared
//! state (`postgres` for records, `s3` for component bytes) are interchangeable.
//!
//! Rules every store keeps:
//! - A deploy is checked and written under the store's deploy lock (cluster-wide for a shared
//!   store), against the records as they are then, and the record is written last: a crash or a
//!   refusal leaves the old deployment or the new one, never half of one.
//! - Once a record changes, the change happened: housekeeping after it (fsyncs, collecting
//!   components no record refers to) is logged on failure, never reported as a failed change.
//! - Component bytes are content-addressed by SHA-256 and verified whenever they are read back.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::app::DeployError;
use crate::tenant::TenantRecord;

pub mod file;
pub mod postgres;
pub mod s3;
mod sigv4;

pub use file::FileStore;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The manifest exactly as deployed.
    pub manifest_toml: String,
    pub component_sha256: String,
    pub component_bytes: u64,
    pub deployed_at_unix: u64,
    /// The tenant that owns the deployment; `None` for the operator's (public) deployments.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// Every readable record, by name, as a deploy's checks see them.
pub type Records = [(String, DeploymentRecord)];

/// Run under the deploy lock against the current records: the record to write, or why not.
pub type DeployCheck = Box<dyn FnOnce(&Records) -> Result<DeploymentRecord, DeployError> + Send>;

/// Run under the deploy lock against the record to delete: whether the caller may delete it.
pub type DeleteCheck = Box<dyn FnOnce(&DeploymentRecord) -> bool + Send>;

#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// Where the state lives, for logs.
    fn describe(&self) -> String;

    /// Every stored record, by name; unreadable ones come back as errors to report, not to hide.
    async fn load_deployments(&self) -> io::Result<Vec<(String, io::Result<DeploymentRecord>)>>;

    /// A component's bytes, verified against `sha256`.
    async fn read_component(&self, sha256: &str) -> io::Result<Vec<u8>>;

    /// Under the deploy lock: `check` against the current records gives the record to write; the
    /// component (`wasm`, whose hash the record names) is stored first, the record last.
    async fn put_deployment(
        &self,
        name: &str,
        wasm: Arc<Vec<u8>>,
        check: DeployCheck,
    ) -> Result<DeploymentRecord, DeployError>;

    /// Under the deploy lock: removes `name` when it exists and `may_delete` allows it. Returns
    /// whether it was removed.
    async fn delete_deployment(&self, name: &str, may_delete: DeleteCheck) -> io::Result<bool>;

    async fn load_tenants(&self) -> io::Result<BTreeMap<String, TenantRecord>>;
    /// Adds a tenant; `Ok(false)` when one of that name exists.
    async fn insert_tenant(&self, name: &str, record: &TenantRecord) -> io::Result<bool>;
    /// Replaces a tenant's record; `Ok(false)` when there is none.
    async fn update_tenant(&self, name: &str, record: &TenantRecord) -> io::Result<bool>;
    async fn delete_tenant(&self, name: &str) -> io::Result<bool>;

    /// Models registered through the API, by name.
    async fn load_models(&self) -> io::Result<BTreeMap<String, ModelRecord>>;
    async fn put_model(&self, name: &str, record: &ModelRecord) -> io::Result<()>;
    async fn remove_model(&self, name: &str) -> io::Result<bool>;

    /// Drops this node's cached copies of components none of `live` refers to (a shared store's
    /// local cache; the file store collects its own).
    fn prune_local_cache(&self, _live: &std::collections::BTreeSet<String>) {}

    /// Ticks whenever another node may have changed the state; `None` when nothing else writes.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// A model registered through the API: its checkpoint, and the workers its engine is split over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub path: PathBuf,
    /// Workers (GPUs) its engine is split over by tensor parallelism; 1: whole on one.
    #[serde(default = "whole")]
    pub ranks: usize,
}

impl ModelRecord {
    /// A model loaded whole on one worker.
    pub fn whole(path: PathBuf) -> Self {
        Self { path, ranks: 1 }
    }
}

fn whole() -> usize {
    1
}

/// A storage failure as a deploy reports it.
pub(crate) fn storage(e: io::Error) -> DeployError {
    DeployError::Storage(e.to_string())
}

/// The records a deploy's checks see: the readable ones.
pub(crate) fn readable(records: Vec<(String, io::Result<DeploymentRecord>)>) -> Vec<(String, DeploymentRecord)> {
    records.into_iter().filter_map(|(n, r)| Some((n, r.ok()?))).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks bytes read back against the hash they are stored under.
pub(crate) fn verified(sha256: &str, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
    let actual = sha256_hex(&bytes);
    if actual != sha256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("component {sha256} is corrupt: its bytes hash to {actual}"),
        ));
    }
    Ok(bytes)
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What `--state` and `--blobs` name: where a node keeps its state.
#[derive(Debug, Clone)]
pub enum StateConfig {
    /// The data dir alone: single node.
    File,
    /// Shared by every node: records in PostgreSQL, component bytes in S3-compatible storage
    /// (cached, verified, under the data dir).
    Shared { postgres_url: String, blobs: s3::S3Config },
}

/// Opens the store `config` names.
pub async fn open(config: &StateConfig, data_dir: &std::path::Path) -> anyhow::Result<Arc<dyn StateStore>> {
    Ok(match config {
        StateConfig::File => Arc::new(FileStore::open(data_dir)?),
        StateConfig::Shared { postgres_url, blobs } => {
            let blobs = s3::ComponentBlobs::open(blobs.clone(), &data_dir.join("components")).await?;
            Arc::new(postgres::PostgresStore::connect(postgres_url, blobs).await?)
        }
    })
}
