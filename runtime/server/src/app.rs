//! The server's shared state: the handler runtime, the model registry, and the deployment
//! table (in memory, backed by the durable store).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kindling_engine::{EngineError, ModelEntry, ModelRegistry};
use kindling_host::llm::GenerationShare;
use kindling_host::{HandlerLimits, HandlerRuntime, PrepareError, PreparedHandler, RuntimeConfig};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::manifest::{Manifest, ManifestError};
use crate::metrics::Metrics;
use crate::store::{DeploymentRecord, Records, StateConfig, StateStore};
use crate::tenant::{Caller, Tenants};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Bearer token the admin API requires; `None` accepts only local requests without credentials
    /// as the operator (local development).
    pub admin_token: Option<String>,
    /// Largest deploy request (component + manifest) accepted.
    pub max_deploy_bytes: usize,
    /// Components compiled at once; more deploys wait their turn.
    pub max_concurrent_compiles: usize,
    /// Deployments a tenant may have unless the operator grants it another number.
    pub tenant_max_deployments: u32,
    /// Operator ceilings on what a manifest may ask for.
    pub ceilings: Ceilings,
    /// With a domain, `Host: NAME.<domain>` invokes deployment NAME whatever the path.
    pub domain: Option<String>,
    /// Connections open at once; past it the server stops accepting until one closes.
    pub max_connections: usize,
    /// How long in-flight requests get to finish once shutdown starts.
    pub drain_timeout: std::time::Duration,
    /// How long a client has to send a request's headers, and how long an idle keep-alive
    /// connection stays open: a slowloris client is cut off here.
    pub header_read_timeout: std::time::Duration,
    /// Where tenants, deployments and registered models are kept.
    pub state: StateConfig,
    /// How often a node with shared state resyncs in full, besides following each change.
    pub resync_interval: std::time::Duration,
    pub runtime: RuntimeConfig,
}

/// The most any manifest may ask for on this server: past these a deploy fails with the reason,
/// instead of a 503 or an out-of-memory later.
#[derive(Debug, Clone)]
pub struct Ceilings {
    pub max_concurrency: u32,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub max_generations: u32,
}

impl Default for Ceilings {
    fn default() -> Self {
        Self { max_concurrency: 1024, max_request_bytes: 64 << 20, max_response_bytes: 1 << 30, max_generations: 512 }
    }
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        let runtime = RuntimeConfig { cache_dir: Some(data_dir.join("compiled")), ..RuntimeConfig::default() };
        Self {
            data_dir,
            admin_token: None,
            max_deploy_bytes: 256 << 20,
            max_concurrent_compiles: 2,
            tenant_max_deployments: 16,
            ceilings: Ceilings::default(),
            domain: None,
            max_connections: 4096,
            drain_timeout: std::time::Duration::from_secs(30),
            header_read_timeout: std::time::Duration::from_secs(10),
            state: StateConfig::File,
            resync_interval: std::time::Duration::from_secs(30),
            runtime,
        }
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
    /// This deployment's share of the models' batches, across its invocations.
    pub generations: GenerationShare,
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
    #[error("deployment name {0} is taken")]
    NameTaken(String),
    #[error("manifest lists model {0:?}, which is not registered on this server")]
    UnknownModel(String),
    #[error("manifest lists model {0:?}, which the operator has not granted to this tenant")]
    ModelNotGranted(String),
    #[error("this tenant already has its limit of {0} deployments")]
    QuotaExceeded(u32),
    #[error("manifest: {0}")]
    OverCeiling(String),
    #[error("no deployment named {0}")]
    NotFound(String),
    #[error("storage failed: {0}")]
    Storage(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Invalid(#[from] EngineError),
    #[error("storage failed: {0}")]
    Storage(#[from] std::io::Error),
    #[error("model registration failed: {0}")]
    Internal(String),
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

/// Whether two routes would share callers: equal, or one nested inside the other.
fn routes_overlap(a: &str, b: &str) -> bool {
    route_matches(a, normalize(b)) || route_matches(b, normalize(a))
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
}

/// A route of `manifest` that would take callers from another deployment, with that deployment's
/// name and owner: the same route, or (across owners) a route nested in another's or around it,
/// since the longest prefix would then send one owner's callers to the other.
fn route_conflict<'a>(
    others: impl Iterator<Item = (&'a str, Manifest, Option<&'a str>)>,
    manifest: &Manifest,
    owner: Option<&str>,
) -> Option<(String, String, Option<&'a str>)> {
    others.filter(|(name, _, _)| *name != manifest.name).find_map(|(name, other, other_owner)| {
        let same_owner = other_owner == owner;
        manifest.routes.iter().find_map(|r| {
            let clash = |o: &String| normalize(o) == normalize(r) || (!same_owner && routes_overlap(o, r));
            other.routes.iter().any(clash).then(|| (r.clone(), name.to_string(), other_owner))
        })
    })
}

/// What a deploy asks for, checked under the store's deploy lock against every node's records.
struct DeployRequest {
    caller: Caller,
    /// The calling tenant; `None` for the operator.
    tenant: Option<String>,
    /// The calling tenant's deployment quota.
    quota: u32,
    manifest: Manifest,
    manifest_toml: String,
    sha256: String,
    bytes: u64,
}

impl DeployRequest {
    /// The record to write, or why not: the name's owner, the tenant's quota, and routes that
    /// would take another deployment's callers.
    fn admit(&self, records: &Records) -> Result<DeploymentRecord, DeployError> {
        let name = &self.manifest.name;
        let existing = records.iter().find(|(n, _)| n == name).map(|(_, r)| r);
        // Public deployments and other tenants' answer alike: the name is simply taken.
        if existing.is_some_and(|r| !self.caller.can_manage(r.tenant.as_deref())) {
            return Err(DeployError::NameTaken(name.clone()));
        }
        // The operator replacing a tenant's deployment keeps it the tenant's.
        let owner = self.tenant.clone().or_else(|| existing.and_then(|r| r.tenant.clone()));
        if let (Some(t), None) = (&self.tenant, existing) {
            let owned = records.iter().filter(|(_, r)| r.tenant.as_deref() == Some(t)).count();
            if owned >= self.quota as usize {
                return Err(DeployError::QuotaExceeded(self.quota));
            }
        }
        let others = records
            .iter()
            .filter_map(|(n, r)| Some((n.as_str(), Manifest::parse(&r.manifest_toml).ok()?, r.tenant.as_deref())));
        if let Some((route, other, other_owner)) = route_conflict(others, &self.manifest, owner.as_deref()) {
            // Name the other deployment only to a caller allowed to see it.
            let owner = if self.caller.can_manage(other_owner) {
                format!("deployment {other}")
            } else {
                "another owner's deployment".to_string()
            };
            return Err(DeployError::RouteConflict { route, owner });
        }
        Ok(DeploymentRecord {
            manifest_toml: self.manifest_toml.clone(),
            component_sha256: self.sha256.clone(),
            component_bytes: self.bytes,
            deployed_at_unix: crate::store::now_unix(),
            tenant: owner,
        })
    }
}

pub struct App {
    pub config: ServerConfig,
    pub metrics: Metrics,
    pub tenants: Tenants,
    pub runtime: Arc<HandlerRuntime>,
    pub registry: Arc<ModelRegistry>,
    /// The registry as handlers' `kindling:llm` sees it.
    pub backend: Arc<dyn kindling_host::backend::ModelBackend>,
    store: Arc<dyn StateStore>,
    /// Models this node registered from the store (API-registered, here or on another node).
    synced_models: Mutex<BTreeSet<String>>,
    table: RwLock<Table>,
    /// Deploys, deletes and resyncs run one at a time on this node so the store and the table
    /// agree (the store's own lock orders them across nodes).
    deploy_lock: tokio::sync::Mutex<()>,
    compiles: Semaphore,
    draining: AtomicBool,
}

impl App {
    /// Opens the store and brings every stored deployment back; with shared state, follows the
    /// other nodes' changes from then on.
    pub async fn open(config: ServerConfig, registry: Arc<ModelRegistry>) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)?;
        // Deploy uploads a crash interrupted; never referenced.
        let _ = std::fs::remove_dir_all(config.data_dir.join("uploads"));
        let store = crate::store::open(&config.state, &config.data_dir).await?;
        tracing::info!(state = %store.describe(), "state store");
        let tenants = Tenants::open(store.clone()).await?;
        let runtime = Arc::new(HandlerRuntime::new(config.runtime.clone())?);
        let compiles = config.max_concurrent_compiles.max(1);
        let app = Arc::new(Self {
            config,
            metrics: Metrics::default(),
            tenants,
            runtime,
            backend: Arc::new(crate::engine_backend::EngineBackend(registry.clone())),
            registry,
            store,
            synced_models: Mutex::default(),
            table: RwLock::default(),
            deploy_lock: tokio::sync::Mutex::new(()),
            compiles: Semaphore::new(compiles),
            draining: AtomicBool::new(false),
        });
        app.resync().await?;
        app.follow();
        Ok(app)
    }

    /// With shared state: resyncs after every change another node makes, and in full every
    /// `resync_interval` (a missed notification costs at most that long).
    fn follow(self: &Arc<Self>) {
        let Some(mut changes) = self.store.changes() else { return };
        let app = Arc::downgrade(self);
        let every = self.config.resync_interval;
        tokio::spawn(async move {
            let mut full = tokio::time::interval(every);
            full.tick().await;
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = full.tick() => {}
                }
                let Some(app) = app.upgrade() else { return };
                if let Err(e) = app.resync().await {
                    tracing::warn!(error = %format!("{e:#}"), "could not resync with the shared state");
                }
            }
        });
    }

    /// Makes this node's tenants, API-registered models and deployment table match the store:
    /// new and changed deployments are fetched (verified), compiled and swapped in; deleted ones
    /// stop serving. One that cannot be installed is logged and tried again at the next resync,
    /// while any version of it this node already serves keeps serving.
    pub async fn resync(self: &Arc<Self>) -> anyhow::Result<()> {
        let _guard = self.deploy_lock.lock().await;
        self.tenants.reload().await?;
        self.sync_models().await?;
        let records = self.store.load_deployments().await?;
        let stored: BTreeSet<String> = records.iter().map(|(n, _)| n.clone()).collect();
        let mut live = Some(BTreeSet::new());
        for (name, record) in records {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    live = None;
                    tracing::error!(deployment = %name, error = %e, "unreadable deployment record");
                    continue;
                }
            };
            if let Some(live) = &mut live {
                live.insert(record.component_sha256.clone());
            }
            if self.get(&name).is_some_and(|d| d.record == record) {
                continue;
            }
            match self.install(record).await {
                Ok(d) => {
                    tracing::info!(deployment = %name, sha256 = %d.record.component_sha256, "deployment installed from the store");
                    self.table.write().expect("poisoned").by_name.insert(name, Arc::new(d));
                }
                Err(e) => {
                    tracing::error!(deployment = %name, error = %format!("{e:#}"), "could not install deployment")
                }
            }
        }
        self.table.write().expect("poisoned").by_name.retain(|name, _| {
            let keep = stored.contains(name);
            if !keep {
                tracing::info!(deployment = %name, "deployment deleted from the store");
            }
            keep
        });
        if let Some(live) = live {
            self.store.prune_local_cache(&live);
        }
        Ok(())
    }

    async fn install(&self, record: DeploymentRecord) -> anyhow::Result<Deployment> {
        let manifest = Manifest::parse(&record.manifest_toml)?;
        let wasm = self.store.read_component(&record.component_sha256).await?;
        let handler = self.prepare(Arc::new(wasm)).await?;
        Ok(Self::deployment(manifest, record, handler))
    }

    /// Registers the models registered through the API (on this node or another) that this node
    /// lacks, and drops those since unregistered. A model given on the command line keeps its
    /// path; one whose checkpoint does not open here is logged and skipped.
    async fn sync_models(&self) -> std::io::Result<()> {
        let stored = self.store.load_models().await?;
        let synced = self.synced_models.lock().expect("poisoned").clone();
        for name in synced.iter().filter(|n| !stored.contains_key(*n)) {
            self.registry.remove(name);
            self.synced_models.lock().expect("poisoned").remove(name);
            tracing::info!(model = %name, "model unregistered from the store");
        }
        for (name, record) in stored {
            if self.registry.contains(&name) {
                continue;
            }
            let registry = self.registry.clone();
            let (n, p, ranks) = (name.clone(), record.path.clone(), record.ranks);
            match tokio::task::spawn_blocking(move || registry.register_split(&n, &p, ranks)).await {
                Ok(Ok(_)) => {
                    tracing::info!(model = %name, path = %record.path.display(), ranks, "registered model from the store");
                    self.synced_models.lock().expect("poisoned").insert(name);
                }
                Ok(Err(e)) => tracing::error!(model = %name, error = %e, "could not register stored model"),
                Err(e) => tracing::error!(model = %name, error = %e, "model registration task failed"),
            }
        }
        Ok(())
    }

    /// Registers a model, split over `ranks` workers (1: whole), and keeps it registered across
    /// restarts (and, with shared state, on every node).
    pub async fn register_model(
        &self,
        name: &str,
        path: &std::path::Path,
        ranks: usize,
    ) -> Result<ModelEntry, ModelError> {
        let registry = self.registry.clone();
        let (n, p) = (name.to_string(), path.to_path_buf());
        let entry = tokio::task::spawn_blocking(move || registry.register_split(&n, &p, ranks))
            .await
            .map_err(|e| ModelError::Internal(e.to_string()))??;
        let record = crate::store::ModelRecord { path: entry.path.clone(), ranks };
        if let Err(e) = self.store.put_model(name, &record).await {
            self.registry.remove(name);
            return Err(e.into());
        }
        self.synced_models.lock().expect("poisoned").insert(name.to_string());
        Ok(entry)
    }

    /// Unregisters a model, for good. Returns whether it was registered.
    pub async fn remove_model(&self, name: &str) -> std::io::Result<bool> {
        self.store.remove_model(name).await?;
        self.synced_models.lock().expect("poisoned").remove(name);
        Ok(self.registry.remove(name))
    }

    async fn prepare(&self, wasm: Arc<Vec<u8>>) -> Result<PreparedHandler, PrepareError> {
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
            generations: GenerationShare::new(&manifest.name, manifest.limits.max_generations as usize),
            manifest,
            record,
            handler,
        }
    }

    /// Checks what the manifest asks for against the operator's ceilings and, for a tenant's
    /// deployment, its model grants.
    fn admit_manifest(&self, manifest: &Manifest, owner: Option<&str>) -> Result<(), DeployError> {
        if let Some(model) = manifest.models.iter().find(|m| !self.registry.contains(m)) {
            return Err(DeployError::UnknownModel(model.clone()));
        }
        if let Some(tenant) = owner {
            let granted = self.tenants.granted_models(tenant).unwrap_or_default();
            if let Some(model) = manifest.models.iter().find(|m| !granted.contains(*m)) {
                return Err(DeployError::ModelNotGranted(model.clone()));
            }
        }
        let (l, c) = (&manifest.limits, &self.config.ceilings);
        let memory_cap_mb = (self.config.runtime.max_memory_bytes >> 20) as u64;
        let instances = self.config.runtime.max_instances;
        let over = [
            // Past the instance pool a deployment would get 503s instead of its promised slots.
            ("max_concurrency", u64::from(l.max_concurrency), u64::from(c.max_concurrency.min(instances))),
            ("max_request_bytes", l.max_request_bytes, c.max_request_bytes),
            ("max_response_bytes", l.max_response_bytes, c.max_response_bytes),
            ("max_generations", u64::from(l.max_generations), u64::from(c.max_generations)),
            ("memory_mb", l.memory_mb, memory_cap_mb),
        ];
        match over.iter().find(|(_, asked, cap)| asked > cap) {
            Some((field, asked, cap)) => Err(DeployError::OverCeiling(format!(
                "limits.{field} = {asked} is over this server's ceiling of {cap}"
            ))),
            None => Ok(()),
        }
    }

    /// Validates, compiles, stores and activates a deployment whose component the upload staged
    /// in the file `component`. Returns it and whether it replaced one.
    pub async fn deploy(
        &self,
        caller: &Caller,
        manifest_toml: &str,
        component: &std::path::Path,
    ) -> Result<(Arc<Deployment>, bool), DeployError> {
        let manifest = Manifest::parse(manifest_toml)?;
        let tenant = match caller {
            Caller::Tenant(t) => Some(t.clone()),
            _ => None,
        };
        self.admit_manifest(&manifest, tenant.as_deref())?;
        // Uploads wait for a compile slot on disk; only compiling ones hold the bytes in memory.
        let (wasm, handler) = {
            let _compiling = self.compiles.acquire().await.expect("never closed");
            let bytes = tokio::fs::read(component).await.map_err(|e| DeployError::Storage(e.to_string()))?;
            let wasm = Arc::new(bytes);
            let handler = self.prepare(wasm.clone()).await?;
            (wasm, handler)
        };
        let quota = tenant
            .as_deref()
            .and_then(|t| self.tenants.get(t))
            .and_then(|info| info.grants.max_deployments)
            .unwrap_or(self.config.tenant_max_deployments);
        let request = DeployRequest {
            caller: caller.clone(),
            tenant,
            quota,
            manifest_toml: manifest_toml.to_string(),
            sha256: handler.hash.clone(),
            bytes: wasm.len() as u64,
            manifest,
        };
        let name = request.manifest.name.clone();
        let manifest = request.manifest.clone();
        let _guard = self.deploy_lock.lock().await;
        let record =
            self.store.put_deployment(&name, wasm, Box::new(move |records: &Records| request.admit(records))).await?;
        let deployment = Arc::new(Self::deployment(manifest, record, handler));
        let replaced = self.table.write().expect("poisoned").by_name.insert(name, deployment.clone()).is_some();
        Ok((deployment, replaced))
    }

    /// Deletes a deployment the caller manages; others answer as if absent. Ownership is checked
    /// under the deploy lock, so a concurrent redeploy cannot change hands in between.
    pub async fn delete(&self, caller: &Caller, name: &str) -> Result<(), DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let caller = caller.clone();
        self.remove(name, Box::new(move |r| caller.can_manage(r.tenant.as_deref()))).await
    }

    /// Deletes a deployment's record if `may_delete` allows, then stops serving it. Call under
    /// the deploy lock.
    async fn remove(&self, name: &str, may_delete: crate::store::DeleteCheck) -> Result<(), DeployError> {
        let deleted =
            self.store.delete_deployment(name, may_delete).await.map_err(|e| DeployError::Storage(e.to_string()))?;
        if !deleted {
            return Err(DeployError::NotFound(name.to_string()));
        }
        self.table.write().expect("poisoned").by_name.remove(name);
        Ok(())
    }

    /// Deletes a tenant with every deployment it owns, so none outlives it and a later tenant of
    /// the same name starts with nothing. Returns whether the tenant existed.
    pub async fn delete_tenant(&self, name: &str) -> Result<bool, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let records = self.store.load_deployments().await.map_err(|e| DeployError::Storage(e.to_string()))?;
        let owned = records.into_iter().filter_map(|(n, r)| (r.ok()?.tenant.as_deref() == Some(name)).then_some(n));
        for deployment in owned {
            let tenant = name.to_string();
            match self.remove(&deployment, Box::new(move |r| r.tenant.as_deref() == Some(&tenant))).await {
                Ok(()) | Err(DeployError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            tracing::info!(tenant = name, deployment = %deployment, "deleted with its tenant");
        }
        self.tenants.delete(name).await.map_err(|e| DeployError::Storage(e.to_string()))
    }

    /// The models an invocation of `deployment` may load: its manifest's, less any the operator
    /// has since revoked from its tenant. `None` when its tenant is gone.
    pub fn invocation_models(&self, deployment: &Deployment) -> Option<Arc<BTreeSet<String>>> {
        let Some(tenant) = deployment.record.tenant.as_deref() else {
            return Some(deployment.allowed_models.clone());
        };
        let granted = self.tenants.granted_models(tenant)?;
        if deployment.allowed_models.is_subset(&granted) {
            return Some(deployment.allowed_models.clone());
        }
        Some(Arc::new(deployment.allowed_models.intersection(&granted).cloned().collect()))
    }

    /// The deployment a request is for: by `Host: NAME.<domain>` when a domain is configured,
    /// else by the longest route prefix of its path.
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Option<Arc<Deployment>> {
        if let (Some(domain), Some(host)) = (&self.config.domain, host) {
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h).trim_end_matches('.');
            let name = host.len().checked_sub(domain.len() + 1).and_then(|at| {
                let (name, rest) = host.split_at(at);
                (rest.strip_prefix('.')?.eq_ignore_ascii_case(domain)).then_some(name)
            });
            if let Some(name) = name {
                return self.get(&name.to_ascii_lowercase());
            }
        }
        self.route(path)
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

    #[test]
    fn nested_routes_overlap_and_siblings_do_not() {
        assert!(routes_overlap("/acme", "/acme/v1"));
        assert!(routes_overlap("/acme/v1/", "/acme"));
        assert!(routes_overlap("/", "/acme"));
        assert!(routes_overlap("/acme", "/acme/"));
        assert!(!routes_overlap("/acme", "/acmex"));
        assert!(!routes_overlap("/acme/v1", "/acme/v2"));
    }
}
