//! The server's shared state: the handler runtime, the model registry, and the deployment
//! table (in memory, backed by the durable store).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use kindling_engine::ModelRegistry;
use kindling_host::{HandlerLimits, HandlerRuntime, PrepareError, PreparedHandler, RuntimeConfig};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::manifest::{Manifest, ManifestError};
use crate::metrics::Metrics;
use crate::store::{DeploymentRecord, DeploymentStore};
use crate::tenant::{Caller, Tenants};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Bearer token the admin API requires; `None` leaves it open (local development only).
    pub admin_token: Option<String>,
    /// Largest deploy request (component + manifest) accepted.
    pub max_deploy_bytes: usize,
    pub runtime: RuntimeConfig,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        let runtime = RuntimeConfig { cache_dir: Some(data_dir.join("compiled")), ..RuntimeConfig::default() };
        Self { data_dir, admin_token: None, max_deploy_bytes: 256 << 20, runtime }
    }
}

/// A live deployment: its manifest, compiled handler and admission control.
pub struct Deployment {
    pub manifest: Manifest,
    pub record: DeploymentRecord,
    pub handler: PreparedHandler,
    pub limits: HandlerLimits,
    pub allowed_models: Arc<BTreeSet<String>>,
    pub in_flight: Arc<Semaphore>,
}

#[derive(Debug, Serialize)]
pub struct DeploymentSummary {
    pub name: String,
    pub tenant: Option<String>,
    pub routes: Vec<String>,
    pub models: Vec<String>,
    pub component_sha256: String,
    pub component_bytes: u64,
    pub deployed_at_unix: u64,
    pub in_flight: usize,
}

impl Deployment {
    pub fn summary(&self) -> DeploymentSummary {
        DeploymentSummary {
            name: self.manifest.name.clone(),
            tenant: self.record.tenant.clone(),
            routes: self.manifest.routes.clone(),
            models: self.manifest.models.clone(),
            component_sha256: self.record.component_sha256.clone(),
            component_bytes: self.record.component_bytes,
            deployed_at_unix: self.record.deployed_at_unix,
            in_flight: self.manifest.limits.max_concurrency as usize - self.in_flight.available_permits(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Component(#[from] PrepareError),
    #[error("route {route} is already served by {owner}")]
    RouteConflict { route: String, owner: String },
    #[error("deployment name {0} is taken by another tenant")]
    NameTaken(String),
    #[error("manifest lists model {0:?}, which is not registered on this server")]
    UnknownModel(String),
    #[error("storage failed: {0}")]
    Storage(String),
}

#[derive(Default)]
struct Table {
    by_name: BTreeMap<String, Arc<Deployment>>,
}

fn normalize(route: &str) -> &str {
    let t = route.trim_end_matches('/');
    if t.is_empty() { "/" } else { t }
}

fn route_matches(route: &str, path: &str) -> bool {
    let route = normalize(route);
    route == "/" || path == route || path.strip_prefix(route).is_some_and(|rest| rest.starts_with('/'))
}

impl Table {
    fn route(&self, path: &str) -> Option<Arc<Deployment>> {
        self.by_name
            .values()
            .flat_map(|d| d.manifest.routes.iter().map(move |r| (normalize(r), d)))
            .filter(|(r, _)| route_matches(r, path))
            .max_by_key(|(r, _)| r.len())
            .map(|(_, d)| d.clone())
    }

    /// A route of `manifest` that another deployment serves, with that deployment.
    fn conflict(&self, manifest: &Manifest) -> Option<(String, Arc<Deployment>)> {
        self.by_name.values().filter(|d| d.manifest.name != manifest.name).find_map(|d| {
            manifest.routes.iter().find_map(|r| {
                d.manifest.routes.iter().any(|o| normalize(o) == normalize(r)).then(|| (r.clone(), d.clone()))
            })
        })
    }
}

pub struct App {
    pub config: ServerConfig,
    pub metrics: Metrics,
    pub tenants: Tenants,
    pub runtime: Arc<HandlerRuntime>,
    pub registry: Arc<ModelRegistry>,
    store: DeploymentStore,
    table: RwLock<Table>,
    /// Deploys and deletes run one at a time so the store and the table agree.
    deploy_lock: tokio::sync::Mutex<()>,
    draining: AtomicBool,
}

impl App {
    /// Opens the data dir and brings every stored deployment back.
    pub async fn open(config: ServerConfig, registry: Arc<ModelRegistry>) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store = DeploymentStore::open(&config.data_dir)?;
        let tenants = Tenants::open(&config.data_dir)?;
        let runtime = Arc::new(HandlerRuntime::new(config.runtime.clone())?);
        let app = Arc::new(Self {
            config,
            metrics: Metrics::default(),
            tenants,
            runtime,
            registry,
            store,
            table: RwLock::default(),
            deploy_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
        });
        app.restore().await?;
        Ok(app)
    }

    async fn restore(self: &Arc<Self>) -> anyhow::Result<()> {
        for (name, record) in self.store.load_all()? {
            let restored = async {
                let record = record?;
                let manifest = Manifest::parse(&record.manifest_toml)?;
                let wasm = self.store.read_component(&record.component_sha256)?;
                let handler = self.prepare(wasm).await?;
                anyhow::Ok(Self::deployment(manifest, record, handler))
            }
            .await;
            match restored {
                Ok(d) => {
                    tracing::info!(deployment = %name, "restored deployment");
                    self.table.write().expect("poisoned").by_name.insert(name, Arc::new(d));
                }
                // Keep serving the others; the operator sees why this one is missing.
                Err(e) => {
                    tracing::error!(deployment = %name, error = %format!("{e:#}"), "could not restore deployment")
                }
            }
        }
        Ok(())
    }

    async fn prepare(&self, wasm: Vec<u8>) -> Result<PreparedHandler, PrepareError> {
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || runtime.prepare(&wasm))
            .await
            .unwrap_or_else(|e| Err(PrepareError::Invalid(format!("compiler task failed: {e}"))))
    }

    fn deployment(manifest: Manifest, record: DeploymentRecord, handler: PreparedHandler) -> Deployment {
        Deployment {
            limits: manifest.handler_limits(),
            allowed_models: Arc::new(manifest.allowed_models()),
            in_flight: Arc::new(Semaphore::new(manifest.limits.max_concurrency as usize)),
            manifest,
            record,
            handler,
        }
    }

    /// Validates, compiles, stores and activates a deployment. Returns it and whether it replaced one.
    pub async fn deploy(
        &self,
        caller: &Caller,
        manifest_toml: &str,
        wasm: Vec<u8>,
    ) -> Result<(Arc<Deployment>, bool), DeployError> {
        let tenant = match caller {
            Caller::Tenant(t) => Some(t.as_str()),
            _ => None,
        };
        let manifest = Manifest::parse(manifest_toml)?;
        if let Some(model) = manifest.models.iter().find(|m| !self.registry.contains(m)) {
            return Err(DeployError::UnknownModel(model.clone()));
        }
        let handler = self.prepare(wasm.clone()).await?;
        let _guard = self.deploy_lock.lock().await;
        if let Some(existing) = self.get(&manifest.name)
            && !caller.can_access(existing.record.tenant.as_deref())
        {
            return Err(DeployError::NameTaken(manifest.name.clone()));
        }
        if let Some((route, other)) = self.table.read().expect("poisoned").conflict(&manifest) {
            // Name the other deployment only to a caller allowed to see it.
            let owner = if caller.can_access(other.record.tenant.as_deref()) {
                format!("deployment {}", other.manifest.name)
            } else {
                "another tenant's deployment".to_string()
            };
            return Err(DeployError::RouteConflict { route, owner });
        }
        let record = self
            .store
            .put(&manifest, manifest_toml, &handler.hash, &wasm, tenant)
            .map_err(|e| DeployError::Storage(e.to_string()))?;
        let name = manifest.name.clone();
        let deployment = Arc::new(Self::deployment(manifest, record, handler));
        let replaced = self.table.write().expect("poisoned").by_name.insert(name, deployment.clone()).is_some();
        Ok((deployment, replaced))
    }

    pub async fn delete(&self, name: &str) -> Result<bool, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let existed = self.store.delete(name).map_err(|e| DeployError::Storage(e.to_string()))?;
        self.table.write().expect("poisoned").by_name.remove(name);
        Ok(existed)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Deployment>> {
        self.table.read().expect("poisoned").by_name.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Deployment>> {
        self.table.read().expect("poisoned").by_name.values().cloned().collect()
    }

    pub fn route(&self, path: &str) -> Option<Arc<Deployment>> {
        self.table.read().expect("poisoned").route(path)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_on_segment_boundaries() {
        assert!(route_matches("/hello", "/hello"));
        assert!(route_matches("/hello", "/hello/x"));
        assert!(route_matches("/hello/", "/hello/x"));
        assert!(!route_matches("/hello", "/helloworld"));
        assert!(route_matches("/", "/anything"));
    }
}
