//! Named models and their engines. A model is registered by name with a checkpoint directory;
//! its engine is started by the first request that needs it (scale from zero), concurrent first
//! requests share one load, and `unload` / `unload_idle` drop engines (scale to zero).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::OnceCell;

use crate::checkpoint::Checkpoint;
use crate::engine::{start_engine, EngineHandle, DEFAULT_QUEUE_DEPTH};
use crate::error::{EngineError, Result};

/// How a request came by its engine.
#[derive(Debug, Clone, Copy)]
pub struct ColdStart {
    /// How long this request waited for the engine to become ready.
    pub waited: Duration,
    /// How long the load itself took (checkpoint open, weights, engine start).
    pub load: Duration,
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
    device: Device,
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
    pub fn new(device: Device) -> Self {
        Self {
            device,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            sources: RwLock::default(),
            engines: Mutex::default(),
        }
    }

    /// Registers (or re-points) `name` at a checkpoint directory after checking it opens.
    /// A running engine for the old directory is dropped.
    pub fn register(&self, name: &str, dir: &Path) -> Result<ModelEntry> {
        validate_model_name(name)?;
        let ckpt = Checkpoint::open(dir)?;
        let entry = Registered {
            path: ckpt.dir.clone(),
            architecture: ckpt.arch.name(),
            weight_bytes: ckpt.weight_bytes,
        };
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

    /// The running engine for `name`, if any, without starting one.
    pub fn loaded(&self, name: &str) -> Option<EngineHandle> {
        self.engines.lock().expect("poisoned").get(name).and_then(|c| c.get().cloned())
    }

    /// The engine for `name`, starting it if needed. Concurrent callers share one load.
    pub async fn acquire(&self, name: &str) -> Result<Acquired> {
        let path = match self.sources.read().expect("poisoned").get(name) {
            Some(r) => r.path.clone(),
            None => return Err(EngineError::ModelNotFound(name.to_string())),
        };
        let cell = self.engines.lock().expect("poisoned").entry(name.to_string()).or_default().clone();
        if let Some(engine) = cell.get() {
            return Ok(Acquired { engine: engine.clone(), cold_start: None });
        }
        let waiting_since = Instant::now();
        let engine = cell
            .get_or_try_init(|| async {
                let (device, depth, name) = (self.device.clone(), self.queue_depth, name.to_string());
                tracing::info!(model = %name, path = %path.display(), "cold start: loading model");
                let handle = tokio::task::spawn_blocking(move || {
                    let ckpt = Checkpoint::open(&path)?;
                    start_engine(&name, &ckpt, &device, depth)
                })
                .await
                .map_err(|e| EngineError::Load(format!("loader task failed: {e}")))??;
                tracing::info!(model = %handle.info.name, load_ms = handle.info.load_time.as_millis() as u64, "model loaded");
                Ok::<_, EngineError>(handle)
            })
            .await?
            .clone();
        let cold_start = ColdStart { waited: waiting_since.elapsed(), load: engine.info.load_time };
        Ok(Acquired { engine, cold_start: Some(cold_start) })
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
