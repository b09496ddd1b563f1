//! Named models and their engines. A model is registered by name with a checkpoint directory;
//! its engine is started on the warm worker by the first request that needs it (scale from zero),
//! from the checkpoint pool; concurrent first requests share one load; `unload` / `unload_idle`
//! and memory pressure drop engines (scale to zero) while their checkpoints stay pooled.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::autoscaler::{Resident, evictions};
use crate::checkpoint::Checkpoint;
use crate::checkpoint_pool::{AdmitProgress, CheckpointPool, PoolStats};
use crate::engine::{DEFAULT_QUEUE_DEPTH, EngineHandle, LoadBreakdown, start_engine};
use crate::error::{EngineError, Result};
use crate::worker::Worker;

/// How a request came by its engine.
#[derive(Debug, Clone, Copy)]
pub struct ColdStart {
    /// How long this request waited for the engine to become ready (includes `load`, or part of
    /// it when another request had started the load).
    pub waited: Duration,
    /// The phases of the load itself.
    pub load: LoadBreakdown,
}

pub struct Acquired {
    pub engine: EngineHandle,
    /// `None` when the engine was already running (a warm start).
    pub cold_start: Option<ColdStart>,
}

/// A registered model as listed by the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub architecture: &'static str,
    pub weight_bytes: u64,
    pub loaded: bool,
}

struct Registered {
    path: PathBuf,
    architecture: &'static str,
    weight_bytes: u64,
}

pub struct ModelRegistry {
    worker: Arc<Worker>,
    pool: Arc<CheckpointPool>,
    queue_depth: usize,
    sources: RwLock<BTreeMap<String, Registered>>,
    engines: Mutex<HashMap<String, Arc<OnceCell<EngineHandle>>>>,
}

/// Model names are used in URLs, manifests and file names.
pub fn validate_model_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidParams(format!(
            "model name {name:?} must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

impl ModelRegistry {
    pub fn new(worker: Arc<Worker>, pool: Arc<CheckpointPool>) -> Self {
        Self { worker, pool, queue_depth: DEFAULT_QUEUE_DEPTH, sources: RwLock::default(), engines: Mutex::default() }
    }

    /// Registers (or re-points) `name` at a checkpoint directory after checking it opens.
    /// A running engine for the old directory is dropped.
    pub fn register(&self, name: &str, dir: &Path) -> Result<ModelEntry> {
        validate_model_name(name)?;
        let ckpt = Checkpoint::open(dir)?;
        let entry =
            Registered { path: ckpt.dir.clone(), architecture: ckpt.arch.name(), weight_bytes: ckpt.weight_bytes };
        self.sources.write().expect("poisoned").insert(name.to_string(), entry);
        self.unload(name);
        Ok(self.entry(name).expect("just inserted"))
    }

    pub fn remove(&self, name: &str) -> bool {
        self.unload(name);
        self.sources.write().expect("poisoned").remove(name).is_some()
    }

    fn entry(&self, name: &str) -> Option<ModelEntry> {
        let sources = self.sources.read().expect("poisoned");
        let r = sources.get(name)?;
        Some(ModelEntry {
            name: name.to_string(),
            path: r.path.clone(),
            architecture: r.architecture,
            weight_bytes: r.weight_bytes,
            loaded: self.loaded(name).is_some(),
        })
    }

    pub fn list(&self) -> Vec<ModelEntry> {
        let names: Vec<String> = self.sources.read().expect("poisoned").keys().cloned().collect();
        names.iter().filter_map(|n| self.entry(n)).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.sources.read().expect("poisoned").contains_key(name)
    }

    /// The checkpoint directory and weight size `name` is registered with.
    fn source(&self, name: &str) -> Result<(PathBuf, u64)> {
        match self.sources.read().expect("poisoned").get(name) {
            Some(r) => Ok((r.path.clone(), r.weight_bytes)),
            None => Err(EngineError::ModelNotFound(name.to_string())),
        }
    }

    /// The running engine for `name`, if any, without starting one.
    pub fn loaded(&self, name: &str) -> Option<EngineHandle> {
        self.engines.lock().expect("poisoned").get(name).and_then(|c| c.get().cloned())
    }

    /// The engine for `name`, starting it if needed. Concurrent callers share one load.
    pub async fn acquire(&self, name: &str) -> Result<Acquired> {
        let (path, weight_bytes) = self.source(name)?;
        let cell = self.engines.lock().expect("poisoned").entry(name.to_string()).or_default().clone();
        if let Some(engine) = cell.get() {
            return Ok(Acquired { engine: engine.clone(), cold_start: None });
        }
        let waiting_since = Instant::now();
        let engine = cell
            .get_or_try_init(|| async {
                self.make_room(name, weight_bytes)?;
                let (worker, pool, depth, name) =
                    (self.worker.clone(), self.pool.clone(), self.queue_depth, name.to_string());
                tracing::info!(model = %name, path = %path.display(), worker = %worker.label, "cold start: loading model");
                let handle = tokio::task::spawn_blocking(move || {
                    let ckpt = Checkpoint::open(&path)?;
                    let log_progress = |p: AdmitProgress| {
                        tracing::info!(model = %name, resident = p.resident_bytes, total = p.total_bytes, "admitting checkpoint to the pool");
                    };
                    let (pooled, hit) = pool.checkout(ckpt, &log_progress)?;
                    start_engine(&name, &pooled, hit, &worker.device, depth)
                })
                .await
                .map_err(|e| EngineError::Load(format!("loader task failed: {e}")))??;
                let load = handle.info.load;
                tracing::info!(
                    model = %handle.info.name,
                    pool_hit = load.pool_hit,
                    admit_ms = load.admit.as_millis() as u64,
                    h2d_ms = load.h2d.as_millis() as u64,
                    init_ms = load.init.as_millis() as u64,
                    "model loaded"
                );
                Ok::<_, EngineError>(handle)
            })
            .await?
            .clone();
        let cold_start = ColdStart { waited: waiting_since.elapsed(), load: engine.info.load };
        Ok(Acquired { engine, cold_start: Some(cold_start) })
    }

    /// Drops least recently used idle engines until `bytes` more fit in the worker's budget.
    fn make_room(&self, loading: &str, bytes: u64) -> Result<()> {
        let resident: Vec<Resident> = {
            let engines = self.engines.lock().expect("poisoned");
            engines
                .iter()
                .filter(|(n, _)| n.as_str() != loading)
                .filter_map(|(n, c)| c.get().map(|e| (n, e)))
                .map(|(n, e)| Resident {
                    name: n.clone(),
                    bytes: e.info.weight_bytes,
                    idle_for: e.idle_for(),
                    busy: e.queued() > 0,
                })
                .collect()
        };
        for victim in evictions(bytes, self.worker.memory_budget, &resident)? {
            tracing::info!(model = %victim, for_model = %loading, "evicting engine to make room");
            self.unload(&victim);
        }
        Ok(())
    }

    /// Admits `name`'s checkpoint to the pool ahead of the first request (page-in and pinning can
    /// take seconds for a large model), reporting progress. Returns whether it was already pooled.
    pub async fn preload(&self, name: &str, progress: impl Fn(AdmitProgress) + Send + 'static) -> Result<bool> {
        let (path, _) = self.source(name)?;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let ckpt = Checkpoint::open(&path)?;
            pool.checkout(ckpt, &progress).map(|(_, hit)| hit)
        })
        .await
        .map_err(|e| EngineError::Load(format!("preload task failed: {e}")))?
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Names and sizes of the engines running now.
    pub fn loaded_engines(&self) -> Vec<(String, u64)> {
        let engines = self.engines.lock().expect("poisoned");
        engines.iter().filter_map(|(n, c)| c.get().map(|e| (n.clone(), e.info.weight_bytes))).collect()
    }

    /// Drops the engine for `name`; in-flight generations finish first (they hold handles).
    pub fn unload(&self, name: &str) -> bool {
        self.engines.lock().expect("poisoned").remove(name).is_some_and(|c| c.get().is_some())
    }

    /// Drops every engine idle for longer than `idle`; returns their names.
    pub fn unload_idle(&self, idle: Duration) -> Vec<String> {
        let mut engines = self.engines.lock().expect("poisoned");
        let idle_names: Vec<String> = engines
            .iter()
            .filter(|(_, c)| c.get().is_some_and(|e| e.queued() == 0 && e.idle_for() > idle))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &idle_names {
            engines.remove(name);
        }
        idle_names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_model::{TinySpec, make_tiny_model};
    use crate::{Architecture, SamplingParams};

    /// Tiny qwen2 "q" and llama "l" models in a temp dir.
    fn models() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, arch) in [("q", Architecture::Qwen2), ("l", Architecture::Llama)] {
            make_tiny_model(&dir.path().join(name), &TinySpec::new(arch)).unwrap();
        }
        dir
    }

    fn registry_over(dir: &Path, budget: u64) -> ModelRegistry {
        let pool = Arc::new(CheckpointPool::new(1 << 30, None));
        let registry = ModelRegistry::new(Arc::new(Worker::cpu(budget)), pool);
        registry.register("q", &dir.join("q")).unwrap();
        registry.register("l", &dir.join("l")).unwrap();
        registry
    }

    fn registry(budget: u64) -> (tempfile::TempDir, ModelRegistry) {
        let dir = models();
        let registry = registry_over(dir.path(), budget);
        (dir, registry)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_requests_share_one_load() {
        let (_d, registry) = registry(u64::MAX);
        let registry = Arc::new(registry);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let r = registry.clone();
                tokio::spawn(async move { r.acquire("q").await.unwrap() })
            })
            .collect();
        let mut acquired = Vec::new();
        for t in tasks {
            acquired.push(t.await.unwrap());
        }
        let first = &acquired[0].engine.info;
        assert!(acquired.iter().all(|a| Arc::ptr_eq(&a.engine.info, first)), "one engine for all");
        assert!(acquired.iter().any(|a| a.cold_start.is_some()));
        assert!(registry.acquire("q").await.unwrap().cold_start.is_none(), "then it is warm");
    }

    #[tokio::test]
    async fn scaling_back_from_zero_is_a_pool_hit_and_generates_the_same_text() {
        let (_d, registry) = registry(u64::MAX);
        let params = SamplingParams { max_tokens: 8, ..Default::default() };
        let first = registry.acquire("q").await.unwrap();
        assert!(!first.cold_start.unwrap().load.pool_hit);
        let (text1, _) = first.engine.generate("Once".into(), params.clone()).await.unwrap();
        drop(first);
        assert!(registry.unload("q"));
        assert!(registry.loaded("q").is_none());
        let again = registry.acquire("q").await.unwrap();
        assert!(again.cold_start.unwrap().load.pool_hit, "weights stayed in the pool");
        let (text2, _) = again.engine.generate("Once".into(), params).await.unwrap();
        assert_eq!(text1, text2);
    }

    #[tokio::test]
    async fn memory_pressure_evicts_the_least_recently_used_idle_engine() {
        let dir = models();
        let one = Checkpoint::open(dir.path().join("q")).unwrap().weight_bytes;
        // Budget for one tiny model, not two.
        let registry = registry_over(dir.path(), one * 3 / 2);
        drop(registry.acquire("q").await.unwrap());
        drop(registry.acquire("l").await.unwrap());
        assert!(registry.loaded("q").is_none(), "q was evicted to make room for l");
        assert!(registry.loaded("l").is_some());
    }

    #[tokio::test]
    async fn idle_engines_are_reaped_and_unknown_models_are_not_found() {
        let (_d, registry) = registry(u64::MAX);
        drop(registry.acquire("l").await.unwrap());
        assert_eq!(registry.unload_idle(Duration::ZERO), ["l"]);
        assert!(matches!(registry.acquire("nope").await, Err(EngineError::ModelNotFound(_))));
    }
}
