//! Named models and their engines. A model is registered by name with a checkpoint directory;
//! its engine is started on a warm worker (one per GPU; `autoscaler::placement` picks which) by
//! the first request that needs it (scale from zero),
//! from the checkpoint pool; concurrent first requests share one load; `unload` / `unload_idle`
//! and memory pressure drop engines (scale to zero) while their checkpoints stay pooled.
//!
//! Residency has one owner, the table here. Each model is absent, loading (its bytes reserved on
//! its worker before the load starts), or ready (with a count of users); an engine dropped while
//! still in use is retiring until its thread exits. Each worker's memory budget counts all three in full, so two
//! loads at once cannot both squeeze past it and a busy engine is never evicted. A load runs on
//! its own task: a request that stops waiting does not cancel it, and its result is kept.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::Device;
use crate::autoscaler::{Resident, WorkerView, placements};
use crate::checkpoint::Checkpoint;
use crate::checkpoint_pool::{AdmitProgress, CheckpointPool, PoolStats};
use crate::engine::{DormantReceiver, EngineConfig, EngineHandle, LoadBreakdown, start_engine, wake_engine};
use crate::error::{EngineError, Result};
use crate::network::tensor_parallel::Shard;
use crate::ranks::{CollectiveGroups, start_tensor_parallel};
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

/// Where a registered model's weights are closest to serving, best first: what a request routed
/// here would pay (nothing, a copy from pinned memory, a read from disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Loaded on a worker (running or asleep): serves without copying weights.
    Device,
    /// In the checkpoint pool: a cold start copies from resident, pinned memory.
    Pool,
    /// Only on disk: a cold start reads the files first.
    Disk,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Pool => "pool",
            Tier::Disk => "disk",
        }
    }
}

/// A registered model as listed by the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub architecture: &'static str,
    pub weight_bytes: u64,
    /// Weights plus the KV cache its engine takes: what a load reserves (on each worker, for a
    /// model split over several).
    pub engine_bytes: u64,
    /// Workers (GPUs) its engine is split over by tensor parallelism; 1: whole on one.
    pub ranks: usize,
    pub loaded: bool,
    /// Scaled to zero with its weights kept on the device (woken by the next request).
    pub asleep: bool,
    /// The worker its engine runs (or sleeps) on; "cuda:0+cuda:1" for a split model.
    pub worker: Option<String>,
    pub tier: Tier,
}

/// One worker's memory as the registry counts it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerUsage {
    pub label: String,
    pub budget_bytes: u64,
    /// Ready, loading and retiring engines on it.
    pub resident_bytes: u64,
    pub engines: usize,
}

struct Registered {
    path: PathBuf,
    architecture: &'static str,
    weight_bytes: u64,
    /// Per worker.
    engine_bytes: u64,
    ranks: usize,
}

type LoadResult = Option<Result<EngineHandle>>;

/// `workers` of a loading or ready engine: one, or a split engine's ranks in order; `reserved`
/// and `bytes` are counted on each of them.
enum Slot {
    Loading {
        id: u64,
        workers: Vec<usize>,
        reserved: u64,
        done: watch::Receiver<LoadResult>,
    },
    Ready {
        engine: EngineHandle,
        workers: Vec<usize>,
        bytes: u64,
    },
    /// Scaled to zero but its weights kept on the device while the memory is not needed: no
    /// thread, no KV cache. Waking takes milliseconds; memory pressure drops it like an idle engine.
    Asleep {
        dormant: DormantReceiver,
        worker: usize,
        weight_bytes: u64,
        since: Instant,
        alive: Weak<()>,
    },
}

impl Slot {
    fn workers(&self) -> &[usize] {
        match self {
            Slot::Loading { workers, .. } | Slot::Ready { workers, .. } => workers,
            Slot::Asleep { worker, .. } => std::slice::from_ref(worker),
        }
    }

    fn is_on(&self, worker: usize) -> bool {
        self.workers().contains(&worker)
    }

    /// Bytes of a ready engine, or the weights of a sleeping one.
    fn ready_bytes(&self) -> u64 {
        match self {
            Slot::Ready { bytes, .. } => *bytes,
            Slot::Asleep { weight_bytes, .. } => *weight_bytes,
            Slot::Loading { .. } => 0,
        }
    }

    /// Bytes reserved by a load in progress.
    fn reserved_bytes(&self) -> u64 {
        match self {
            Slot::Loading { reserved, .. } => *reserved,
            Slot::Ready { .. } | Slot::Asleep { .. } => 0,
        }
    }
}

/// Dropped engines whose threads may still hold memory (in-flight generations finishing):
/// `bytes` on each of `workers`.
struct Retiring {
    workers: Vec<usize>,
    bytes: u64,
    alive: Weak<()>,
}

#[derive(Default)]
struct Residency {
    slots: HashMap<String, Slot>,
    retiring: Vec<Retiring>,
    next_load: u64,
}

impl Residency {
    /// Bytes held on `worker` by loads in progress and by retiring engines: not evictable.
    fn pinned_bytes(&mut self, worker: usize) -> u64 {
        self.retiring.retain(|r| r.alive.strong_count() > 0);
        let retiring: u64 = self.retiring.iter().filter(|r| r.workers.contains(&worker)).map(|r| r.bytes).sum();
        retiring + self.slots.values().filter(|s| s.is_on(worker)).map(Slot::reserved_bytes).sum::<u64>()
    }

    /// Everything counted against `worker`'s budget.
    fn used_bytes(&mut self, worker: usize) -> u64 {
        let ready: u64 = self.slots.values().filter(|s| s.is_on(worker)).map(Slot::ready_bytes).sum();
        ready + self.pinned_bytes(worker)
    }

    /// The engines on `worker` as eviction sees them: ready ones (busy or not) and sleeping ones.
    fn evictable_on(&self, worker: usize) -> Vec<Resident> {
        self.slots
            .iter()
            .filter(|(_, s)| s.is_on(worker))
            .filter_map(|(n, s)| match s {
                Slot::Ready { engine, bytes, .. } => Some(Resident {
                    name: n.clone(),
                    bytes: *bytes,
                    idle_for: engine.idle_for(),
                    busy: engine.is_busy(),
                }),
                Slot::Asleep { weight_bytes, since, .. } => Some(asleep_resident(n, *weight_bytes, *since)),
                Slot::Loading { .. } => None,
            })
            .collect()
    }

    fn remove(&mut self, name: &str) -> bool {
        match self.slots.remove(name) {
            Some(Slot::Ready { engine, bytes, workers }) => {
                self.retiring.push(Retiring { workers, bytes, alive: engine.alive_token() });
                true
            }
            Some(asleep @ Slot::Asleep { .. }) => {
                // Its weights are freed here, which queues work on the GPU's stream.
                let _gate = crate::network::graphs::shared();
                drop(asleep);
                true
            }
            Some(Slot::Loading { .. }) | None => false,
        }
    }
}

pub struct ModelRegistry {
    /// One per device; never empty.
    workers: Vec<Arc<Worker>>,
    pool: Arc<CheckpointPool>,
    engine_config: EngineConfig,
    sources: RwLock<BTreeMap<String, Registered>>,
    residency: Arc<Mutex<Residency>>,
    /// The collectives of split engines, made once per set of workers.
    collectives: Arc<CollectiveGroups>,
}

/// A sleeping engine as eviction sees it: idle since it fell asleep, and before any awake one.
fn asleep_resident(name: &str, weight_bytes: u64, since: Instant) -> Resident {
    Resident { name: name.to_string(), bytes: weight_bytes, idle_for: since.elapsed() + SLEEPERS_FIRST, busy: false }
}

/// Added to a sleeping engine's idle time: under pressure sleepers go before awake idle engines.
const SLEEPERS_FIRST: Duration = Duration::from_secs(1 << 30);

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
        Self::with_engine_config(worker, pool, EngineConfig::default())
    }

    pub fn with_engine_config(worker: Arc<Worker>, pool: Arc<CheckpointPool>, engine_config: EngineConfig) -> Self {
        Self::with_workers(vec![worker], pool, engine_config)
    }

    /// A registry over several workers (one per GPU), sharing one checkpoint pool.
    pub fn with_workers(workers: Vec<Arc<Worker>>, pool: Arc<CheckpointPool>, engine_config: EngineConfig) -> Self {
        assert!(!workers.is_empty(), "a registry needs a worker");
        Self {
            workers,
            pool,
            engine_config,
            sources: RwLock::default(),
            residency: Arc::default(),
            collectives: CollectiveGroups::new(),
        }
    }

    /// Registers (or re-points) `name` at a checkpoint directory after checking it opens.
    /// A running engine for the old directory is dropped.
    pub fn register(&self, name: &str, dir: &Path) -> Result<ModelEntry> {
        self.register_split(name, dir, 1)
    }

    /// Registers `name` to be split over `ranks` workers by tensor parallelism (1: whole on one
    /// worker). Refused when the registry has fewer workers or the model's shapes do not split
    /// `ranks` ways.
    pub fn register_split(&self, name: &str, dir: &Path, ranks: usize) -> Result<ModelEntry> {
        validate_model_name(name)?;
        if ranks == 0 || ranks > self.workers.len() {
            return Err(EngineError::InvalidParams(format!(
                "model {name} split over {ranks} workers: this server has {} (--devices)",
                self.workers.len()
            )));
        }
        let ckpt = Checkpoint::open(dir)?;
        let local = Shard::new(0, ranks)?.local_config(&ckpt.config)?;
        let kv = self.engine_config.kv_plan(&local, self.engine_config.dtype_for(&self.workers[0].device));
        let entry = Registered {
            path: ckpt.dir.clone(),
            architecture: ckpt.arch.name(),
            weight_bytes: ckpt.weight_bytes,
            engine_bytes: ckpt.weight_bytes.div_ceil(ranks as u64) + kv.bytes,
            ranks,
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
            engine_bytes: r.engine_bytes,
            ranks: r.ranks,
            loaded: self.loaded(name).is_some(),
            asleep: self.is_asleep(name),
            worker: self.worker_of(name),
            tier: self.tier_of(name, &r.path),
        })
    }

    pub fn list(&self) -> Vec<ModelEntry> {
        let names: Vec<String> = self.sources.read().expect("poisoned").keys().cloned().collect();
        names.iter().filter_map(|n| self.entry(n)).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.sources.read().expect("poisoned").contains_key(name)
    }

    fn tier_of(&self, name: &str, path: &Path) -> Tier {
        let on_device = matches!(
            self.residency.lock().expect("poisoned").slots.get(name),
            Some(Slot::Ready { .. } | Slot::Asleep { .. } | Slot::Loading { .. })
        );
        if on_device {
            Tier::Device
        } else if self.pool.holds(path) {
            Tier::Pool
        } else {
            Tier::Disk
        }
    }

    /// The checkpoint directory, engine footprint (per worker) and ranks `name` is registered with.
    fn source(&self, name: &str) -> Result<(PathBuf, u64, usize)> {
        match self.sources.read().expect("poisoned").get(name) {
            Some(r) => Ok((r.path.clone(), r.engine_bytes, r.ranks)),
            None => Err(EngineError::ModelNotFound(name.to_string())),
        }
    }

    /// The label of the worker `name`'s engine runs (or loads) on; a split engine's workers
    /// joined by '+'.
    pub fn worker_of(&self, name: &str) -> Option<String> {
        let res = self.residency.lock().expect("poisoned");
        res.slots.get(name).map(|s| self.labels(s.workers()))
    }

    /// Workers' labels, rank 0 first, joined by '+'.
    fn labels(&self, workers: &[usize]) -> String {
        workers.iter().map(|&w| self.workers[w].label.as_str()).collect::<Vec<_>>().join("+")
    }

    /// The running engine for `name`, if any, without starting one.
    pub fn loaded(&self, name: &str) -> Option<EngineHandle> {
        match self.residency.lock().expect("poisoned").slots.get(name) {
            Some(Slot::Ready { engine, .. }) if engine.is_alive() => Some(engine.clone()),
            _ => None,
        }
    }

    /// The engine for `name`, starting it if needed. Concurrent callers share one load.
    pub async fn acquire(&self, name: &str) -> Result<Acquired> {
        let (path, bytes, ranks) = self.source(name)?;
        let waiting_since = Instant::now();
        let mut done = {
            let mut res = self.residency.lock().expect("poisoned");
            match res.slots.get(name) {
                Some(Slot::Ready { engine, .. }) if engine.is_alive() => {
                    return Ok(Acquired { engine: engine.clone(), cold_start: None });
                }
                Some(Slot::Loading { done, .. }) => done.clone(),
                Some(Slot::Asleep { .. }) => {
                    let Some(Slot::Asleep { dormant, worker, alive, .. }) = res.slots.remove(name) else {
                        unreachable!()
                    };
                    // Its old KV cache is freed before the new one is made (the wake waits for
                    // the thread to end): not counted twice.
                    res.retiring.retain(|r| !r.alive.ptr_eq(&alive));
                    self.make_room_on(&mut res, worker, name, bytes)?;
                    let (tx, rx) = watch::channel(None);
                    let id = res.next_load;
                    res.next_load += 1;
                    let slot = Slot::Loading { id, workers: vec![worker], reserved: bytes, done: rx.clone() };
                    res.slots.insert(name.to_string(), slot);
                    self.spawn_load(name.to_string(), path, bytes, (id, vec![worker]), Some(dormant), tx);
                    rx
                }
                Some(Slot::Ready { .. }) | None => {
                    // Absent, or its engine thread died (it is dropped here and loaded afresh).
                    res.slots.remove(name);
                    let workers = self.make_room(&mut res, name, bytes, ranks)?;
                    let (tx, rx) = watch::channel(None);
                    let id = res.next_load;
                    res.next_load += 1;
                    let slot = Slot::Loading { id, workers: workers.clone(), reserved: bytes, done: rx.clone() };
                    res.slots.insert(name.to_string(), slot);
                    self.spawn_load(name.to_string(), path, bytes, (id, workers), None, tx);
                    rx
                }
            }
        };
        let result = done
            .wait_for(Option::is_some)
            .await
            .map_err(|_| EngineError::Load("the load was abandoned".into()))?
            .clone()
            .expect("waited for Some");
        let engine = result?;
        let cold_start = ColdStart { waited: waiting_since.elapsed(), load: engine.info.load };
        Ok(Acquired { engine, cold_start: Some(cold_start) })
    }

    /// Loads on a task of its own, so the result outlives any one waiter, then publishes it. With
    /// a sleeping engine's weights, wakes it instead (a load from the pool if they never come).
    /// Over several workers, starts a split engine, one rank on each.
    fn spawn_load(
        &self,
        name: String,
        path: PathBuf,
        bytes: u64,
        (id, at): (u64, Vec<usize>),
        asleep: Option<DormantReceiver>,
        tx: watch::Sender<LoadResult>,
    ) {
        let (worker, pool, config, residency) =
            (self.workers[at[0]].clone(), self.pool.clone(), self.engine_config.clone(), self.residency.clone());
        let split: Vec<Device> = at.iter().map(|&w| self.workers[w].device.clone()).collect();
        let collectives = self.collectives.clone();
        let labels = self.labels(&at);
        tokio::spawn(async move {
            tracing::info!(model = %name, path = %path.display(), worker = %labels, "cold start: loading model");
            let loader_name = name.clone();
            let result = tokio::task::spawn_blocking(move || {
                let log_progress = |p: AdmitProgress| {
                    tracing::info!(model = %loader_name, resident = p.resident_bytes, total = p.total_bytes, "admitting checkpoint to the pool");
                };
                // The sleeping engine's thread hands its weights over as it ends (at once: only
                // idle engines are put to sleep).
                if let Some(dormant) = asleep.and_then(|rx| rx.recv_timeout(Duration::from_secs(10)).ok()) {
                    return wake_engine(dormant, &worker.device, &config);
                }
                pool.checkout_path_using(&path, &log_progress, |pooled, hit| {
                    if split.len() > 1 {
                        // Each rank takes its own worker's link at once; the link turns (below)
                        // order the loads of one worker, which a split load spans several of.
                        return start_tensor_parallel(&loader_name, pooled, hit, &split, &collectives, &config)
                            .inspect_err(|_| pooled.abandon());
                    }
                    let start = || start_engine(&loader_name, pooled, hit, &worker.device, &config);
                    // Loads from the pool take the link in turns, smallest first (see `link`). A
                    // miss copies each tensor as the disk delivers it, far below the link's speed,
                    // and takes no turn: it would hold the link for the whole read.
                    if hit {
                        return worker.link.transfer(pooled.ckpt.weight_bytes, start);
                    }
                    // A miss whose load failed (out of memory, a bad tensor) answers now, not
                    // after the rest of the files are read.
                    start().inspect_err(|_| pooled.abandon())
                })?
            })
            .await
            .unwrap_or_else(|e| Err(EngineError::Load(format!("loader task failed: {e}"))));
            {
                let mut res = residency.lock().expect("poisoned");
                let ours = matches!(res.slots.get(&name), Some(Slot::Loading { id: current, .. }) if *current == id);
                if ours {
                    res.slots.remove(&name);
                }
                match &result {
                    Ok(engine) if ours => {
                        res.slots.insert(name.clone(), Slot::Ready { engine: engine.clone(), workers: at, bytes });
                    }
                    // Unloaded while loading: whoever waited still gets the engine; count it
                    // as retiring until they are done with it.
                    Ok(engine) => res.retiring.push(Retiring { workers: at, bytes, alive: engine.alive_token() }),
                    Err(_) => {}
                }
            }
            match &result {
                Ok(engine) => {
                    let load = engine.info.load;
                    tracing::info!(
                        model = %name,
                        pool_hit = load.pool_hit,
                        admit_ms = load.admit.as_millis() as u64,
                        h2d_ms = load.h2d.as_millis() as u64,
                        init_ms = load.init.as_millis() as u64,
                        kv_cache_bytes = engine.info.kv_cache_bytes,
                        context = engine.info.context,
                        "model loaded"
                    );
                }
                Err(e) => tracing::warn!(model = %name, error = %e, "model failed to load"),
            }
            let _ = tx.send(Some(result));
        });
    }

    /// Picks the worker for a load of `bytes` (`ranks` workers for a split model, `bytes` on
    /// each) and drops least recently used idle engines there until it fits, counting loads in
    /// progress and retiring engines as taken. Returns the workers' indices, rank by rank.
    fn make_room(&self, res: &mut Residency, loading: &str, bytes: u64, ranks: usize) -> Result<Vec<usize>> {
        let views: Vec<WorkerView> = (0..self.workers.len())
            .map(|w| WorkerView {
                budget: self.workers[w].memory_budget,
                pinned: res.pinned_bytes(w),
                resident: res.evictable_on(w),
            })
            .collect();
        let placed = placements(bytes, ranks, &views).map_err(|e| match e {
            EngineError::Load(_) => EngineError::Load(format!(
                "model {loading} needs {bytes} bytes (weights and KV cache), more than any worker's engine memory budget ({})",
                self.workers.iter().map(|w| format!("{} {}", w.label, w.memory_budget)).collect::<Vec<_>>().join(", ")
            )),
            _ => EngineError::Overloaded(format!(
                "not enough engine memory for model {loading}: {bytes} bytes needed on {ranks} worker(s), and the rest of the budget is held by engines that are busy or loading"
            )),
        })?;
        for (worker, victims) in &placed {
            self.evict(res, *worker, victims, loading);
        }
        Ok(placed.into_iter().map(|(worker, _)| worker).collect())
    }

    /// Makes room for `bytes` on one given worker (where a sleeping engine's weights are).
    fn make_room_on(&self, res: &mut Residency, worker: usize, loading: &str, bytes: u64) -> Result<()> {
        let budget = self.workers[worker].memory_budget.saturating_sub(res.pinned_bytes(worker));
        let resident = res.evictable_on(worker);
        let victims = crate::autoscaler::evictions(bytes, budget, &resident).map_err(|_| {
            EngineError::Overloaded(format!(
                "not enough engine memory on {} to wake model {loading}: {bytes} bytes needed, the rest is held by engines that are busy or loading",
                self.workers[worker].label
            ))
        })?;
        self.evict(res, worker, &victims, loading);
        Ok(())
    }

    fn evict(&self, res: &mut Residency, worker: usize, victims: &[String], loading: &str) {
        for victim in victims {
            tracing::info!(model = %victim, for_model = %loading, worker = %self.workers[worker].label, "evicting engine to make room");
            res.remove(victim);
        }
    }

    /// Admits `name`'s checkpoint to the pool ahead of the first request (page-in and pinning can
    /// take seconds for a large model), reporting progress. Returns whether it was already pooled.
    pub async fn preload(&self, name: &str, progress: impl Fn(AdmitProgress) + Send + Sync + 'static) -> Result<bool> {
        let (path, ..) = self.source(name)?;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.checkout_path(&path, &progress).map(|(_, hit)| hit))
            .await
            .map_err(|e| EngineError::Load(format!("preload task failed: {e}")))?
            .map_err(EngineError::from)
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// The engines running now, by name.
    pub fn engines(&self) -> Vec<(String, EngineHandle)> {
        let res = self.residency.lock().expect("poisoned");
        let mut out: Vec<(String, EngineHandle)> = res
            .slots
            .iter()
            .filter_map(|(n, s)| match s {
                Slot::Ready { engine, .. } => Some((n.clone(), engine.clone())),
                Slot::Loading { .. } | Slot::Asleep { .. } => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Engine loads started since the registry was made (each cold start that did the work).
    pub fn loads_started(&self) -> u64 {
        self.residency.lock().expect("poisoned").next_load
    }

    /// Bytes the budgets count as taken now, on all workers: ready, loading and retiring engines.
    pub fn resident_bytes(&self) -> u64 {
        let mut res = self.residency.lock().expect("poisoned");
        (0..self.workers.len()).map(|w| res.used_bytes(w)).sum()
    }

    /// Each worker's budget and what is counted against it.
    pub fn workers(&self) -> Vec<WorkerUsage> {
        let mut res = self.residency.lock().expect("poisoned");
        (0..self.workers.len())
            .map(|w| WorkerUsage {
                label: self.workers[w].label.clone(),
                budget_bytes: self.workers[w].memory_budget,
                resident_bytes: res.used_bytes(w),
                engines: res.slots.values().filter(|s| s.is_on(w)).count(),
            })
            .collect()
    }

    /// Drops the engine for `name`; in-flight generations finish first (they hold handles), and
    /// its memory counts as retiring until they have.
    pub fn unload(&self, name: &str) -> bool {
        self.residency.lock().expect("poisoned").remove(name)
    }

    /// Drops the engine for `name` but keeps its weights on the device (scale to zero, asleep):
    /// its thread and KV cache go, and the next request wakes it without copying anything.
    /// Memory pressure drops a sleeping engine like any idle one. False if it is not loaded.
    pub fn sleep(&self, name: &str) -> bool {
        let mut res = self.residency.lock().expect("poisoned");
        Self::sleep_locked(&mut res, name)
    }

    fn sleep_locked(res: &mut Residency, name: &str) -> bool {
        let Some(Slot::Ready { engine, .. }) = res.slots.get(name) else { return false };
        // A split engine does not sleep (`take_dormant` gives nothing): it is dropped.
        let Some(dormant) = engine.take_dormant() else { return res.remove(name) };
        let Some(Slot::Ready { engine, workers, bytes }) = res.slots.remove(name) else { unreachable!() };
        let worker = workers[0];
        let weight_bytes = engine.info.weight_bytes.min(bytes);
        // Until the thread ends, its KV cache still holds memory.
        let alive = engine.alive_token();
        res.retiring.push(Retiring { workers, bytes: bytes - weight_bytes, alive: alive.clone() });
        res.slots
            .insert(name.to_string(), Slot::Asleep { dormant, worker, weight_bytes, since: Instant::now(), alive });
        true
    }

    /// Whether `name`'s engine is asleep (weights kept on its device).
    pub fn is_asleep(&self, name: &str) -> bool {
        matches!(self.residency.lock().expect("poisoned").slots.get(name), Some(Slot::Asleep { .. }))
    }

    /// Puts every engine idle for longer than `idle` and not in use to sleep; returns their names.
    pub fn sleep_idle(&self, idle: Duration) -> Vec<String> {
        let mut res = self.residency.lock().expect("poisoned");
        let idle_names: Vec<String> = res
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready { engine, .. } if !engine.is_busy() && engine.idle_for() > idle))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &idle_names {
            Self::sleep_locked(&mut res, name);
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

    /// What one tiny engine reserves: weights plus its KV cache.
    fn engine_bytes(dir: &Path) -> u64 {
        registry_over(dir, u64::MAX).list()[0].engine_bytes
    }

    #[tokio::test]
    async fn memory_pressure_evicts_the_least_recently_used_idle_engine() {
        let dir = models();
        // Budget for one tiny engine, not two.
        let registry = registry_over(dir.path(), engine_bytes(dir.path()) * 3 / 2);
        drop(registry.acquire("q").await.unwrap());
        drop(registry.acquire("l").await.unwrap());
        assert!(registry.loaded("q").is_none(), "q was evicted to make room for l");
        assert!(registry.loaded("l").is_some());
    }

    #[tokio::test]
    async fn an_engine_in_use_is_never_evicted_or_reaped() {
        let dir = models();
        let registry = registry_over(dir.path(), engine_bytes(dir.path()) * 3 / 2);
        let q = registry.acquire("q").await.unwrap().engine;
        // Held by an invocation (it may generate next): neither pressure nor the reaper drops it.
        assert!(matches!(registry.acquire("l").await, Err(EngineError::Overloaded(_))));
        assert!(registry.sleep_idle(Duration::ZERO).is_empty());
        // Generating without a handle beyond the registry's own still counts as in use.
        let stream = q.submit("Once".into(), SamplingParams { max_tokens: 200, ..Default::default() }).unwrap();
        drop(q);
        assert!(registry.sleep_idle(Duration::ZERO).is_empty(), "a generation is in flight");
        assert!(matches!(registry.acquire("l").await, Err(EngineError::Overloaded(_))));
        stream.collect().await.unwrap();
        assert!(registry.acquire("l").await.is_ok(), "once idle, q makes room");
        assert!(registry.loaded("q").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_loads_of_different_models_respect_the_budget() {
        let dir = models();
        let one = engine_bytes(dir.path());
        let registry = Arc::new(registry_over(dir.path(), one * 3 / 2));
        let loads: Vec<_> = ["q", "l"]
            .into_iter()
            .map(|name| {
                let r = registry.clone();
                tokio::spawn(async move { r.acquire(name).await.map(|a| a.engine) })
            })
            .collect();
        let mut held = Vec::new();
        for load in loads {
            match load.await.unwrap() {
                Ok(engine) => held.push(engine),
                Err(e) => assert!(matches!(e, EngineError::Overloaded(_)), "{e}"),
            }
            assert!(registry.resident_bytes() <= one * 3 / 2, "the budget held at every point");
        }
        assert_eq!(held.len(), 1, "only one of the two fits; the other is told to retry");
    }

    #[tokio::test]
    async fn a_sleeping_engine_wakes_without_a_copy_and_gives_way_under_pressure() {
        let dir = models();
        let (one, weights) = {
            let probe = registry_over(dir.path(), u64::MAX);
            let q = probe.list().into_iter().find(|e| e.name == "q").unwrap();
            (q.engine_bytes, q.weight_bytes)
        };
        // Room for one awake engine, not for one awake and another's weights.
        let registry = registry_over(dir.path(), one + weights / 2);
        let params = SamplingParams { max_tokens: 8, ..Default::default() };
        let first = registry.acquire("q").await.unwrap();
        let (before, _) = first.engine.generate("Once".into(), params.clone()).await.unwrap();
        drop(first);
        assert_eq!(registry.sleep_idle(Duration::ZERO), ["q"]);
        assert!(registry.is_asleep("q") && registry.loaded("q").is_none());
        let woke = registry.acquire("q").await.unwrap();
        let load = woke.cold_start.expect("a wake is a start").load;
        assert!(load.woke && load.h2d.is_zero(), "the weights were still there: {load:?}");
        let (after, _) = woke.engine.generate("Once".into(), params).await.unwrap();
        assert_eq!(before, after);
        drop(woke);
        assert!(registry.sleep("q"));
        // Its KV cache counts until its thread has ended; then only the weights do.
        let deadline = Instant::now() + Duration::from_secs(10);
        while registry.resident_bytes() > weights {
            assert!(
                Instant::now() < deadline,
                "the sleeping engine's thread ended: {:?} vs {weights}",
                registry.workers()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(registry.acquire("l").await.unwrap());
        assert!(!registry.is_asleep("q"), "a sleeping engine's weights gave way to l");
        let reloaded = registry.acquire("q").await.unwrap().cold_start.unwrap().load;
        assert!(!reloaded.woke && reloaded.pool_hit, "then q comes back from the pool: {reloaded:?}");
    }

    /// Two fake devices, each with room for one tiny engine and a half.
    fn two_worker_registry(dir: &Path) -> ModelRegistry {
        let one = engine_bytes(dir);
        let workers = (0..2)
            .map(|i| {
                let mut w = Worker::cpu(one * 3 / 2);
                w.label = format!("cpu:{i}");
                Arc::new(w)
            })
            .collect();
        let pool = Arc::new(CheckpointPool::new(1 << 30, None));
        let registry = ModelRegistry::with_workers(workers, pool, EngineConfig::default());
        for name in ["q", "l", "q2"] {
            registry.register(name, &dir.join(if name == "l" { "l" } else { "q" })).unwrap();
        }
        registry
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn models_scaled_from_zero_together_land_on_different_workers() {
        let dir = models();
        let registry = Arc::new(two_worker_registry(dir.path()));
        let (q, l) = tokio::join!(registry.acquire("q"), registry.acquire("l"));
        let (q, l) = (q.unwrap().engine, l.unwrap().engine);
        let (wq, wl) = (registry.worker_of("q").unwrap(), registry.worker_of("l").unwrap());
        assert_ne!(wq, wl, "one per worker: neither needed an eviction");
        for usage in registry.workers() {
            assert_eq!(usage.engines, 1, "{usage:?}");
            assert!(usage.resident_bytes <= usage.budget_bytes, "{usage:?}");
        }
        // Both busy: a third model has nowhere to go.
        assert!(matches!(registry.acquire("q2").await, Err(EngineError::Overloaded(_))));
        // q idle the longest: the third model takes its worker, l stays where it is.
        drop(q);
        tokio::time::sleep(Duration::from_millis(20)).await;
        l.generate("Once".into(), SamplingParams { max_tokens: 2, ..Default::default() }).await.unwrap();
        drop(l);
        drop(registry.acquire("q2").await.unwrap());
        assert!(registry.loaded("q").is_none(), "the least recently used engine made room");
        assert_eq!(registry.worker_of("q2").unwrap(), wq);
        assert_eq!(registry.worker_of("l").unwrap(), wl);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_split_model_spans_two_workers_generates_what_it_generates_whole_and_is_dropped_when_idle() {
        let dir = models();
        let registry = two_worker_registry(dir.path());
        let whole = registry.list().into_iter().find(|e| e.name == "q").unwrap();
        let entry = registry.register_split("s", &dir.path().join("q"), 2).unwrap();
        assert_eq!((entry.ranks, whole.ranks), (2, 1));
        assert!(entry.engine_bytes < whole.engine_bytes * 2 / 3, "each worker holds a share: {entry:?}");
        let greedy = SamplingParams { max_tokens: 12, temperature: 0.0, ..Default::default() };
        let acquired = registry.acquire("q").await.unwrap();
        let (expected, _) = acquired.engine.generate("Once upon".into(), greedy.clone()).await.unwrap();
        drop(acquired);
        let split = registry.acquire("s").await.unwrap();
        // Rank 0 goes where there is the most room (here cpu:1, as q's idle engine is on cpu:0).
        assert_eq!(registry.worker_of("s").unwrap(), "cpu:1+cpu:0");
        assert_eq!(registry.list().into_iter().find(|e| e.name == "s").unwrap().worker.unwrap(), "cpu:1+cpu:0");
        assert_eq!(split.engine.info.ranks, 2, "a split engine");
        let (text, _) = split.engine.generate("Once upon".into(), greedy).await.unwrap();
        assert_eq!(text, expected, "split over two workers, the same greedy text");
        for usage in registry.workers() {
            assert!(usage.resident_bytes <= usage.budget_bytes, "{usage:?}");
            assert!(usage.resident_bytes >= entry.engine_bytes, "the split counts on every worker: {usage:?}");
        }
        drop(split);
        // Idle, a split engine is dropped rather than put to sleep, and comes back split.
        assert!(registry.sleep_idle(Duration::ZERO).contains(&"s".to_string()));
        assert!(!registry.is_asleep("s") && registry.loaded("s").is_none());
        let again = registry.acquire("s").await.unwrap();
        assert!(again.cold_start.unwrap().load.pool_hit);
        assert_eq!(again.engine.info.ranks, 2);
        assert!(["cpu:0+cpu:1", "cpu:1+cpu:0"].contains(&registry.worker_of("s").unwrap().as_str()));
    }

    #[test]
    fn a_split_over_more_workers_than_there_are_or_that_does_not_divide_is_refused() {
        let dir = models();
        let two = two_worker_registry(dir.path());
        let err = two.register_split("s", &dir.path().join("q"), 3).unwrap_err();
        assert!(matches!(err, EngineError::InvalidParams(_)), "{err}");
        assert!(!two.contains("s"));
        let workers = (0..3).map(|_| Arc::new(Worker::cpu(u64::MAX))).collect();
        let three =
            ModelRegistry::with_workers(workers, Arc::new(CheckpointPool::new(1 << 30, None)), EngineConfig::default());
        // 4 attention heads do not split 3 ways.
        let err = three.register_split("s", &dir.path().join("q"), 3).unwrap_err();
        assert!(matches!(err, EngineError::Load(_)), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_that_give_up_do_not_waste_the_load() {
        let (_d, registry) = registry(u64::MAX);
        for _ in 0..5 {
            let gave_up = tokio::time::timeout(Duration::from_micros(1), registry.acquire("q")).await;
            assert!(gave_up.is_err(), "the load takes longer than a microsecond");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while registry.loaded("q").is_none() {
            assert!(Instant::now() < deadline, "the abandoned load finished and was kept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(registry.loads_started(), 1, "five impatient requests, one load");
        assert!(registry.acquire("q").await.unwrap().cold_start.is_none());
    }

    #[tokio::test]
    async fn idle_engines_are_reaped_and_unknown_models_are_not_found() {
        let (_d, registry) = registry(u64::MAX);
        drop(registry.acquire("l").await.unwrap());
        assert_eq!(registry.sleep_idle(Duration::ZERO), ["l"]);
        assert!(matches!(registry.acquire("nope").await, Err(EngineError::ModelNotFound(_))));
    }
}
