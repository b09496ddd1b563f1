//! Tensor-parallel engines: one model split over several devices (`network::tensor_parallel`).
//! The engine actor runs rank 0 on its own thread and every other rank on a thread of its own,
//! each holding its network and its KV cache (its share of the K/V heads). A step goes to every
//! rank at once and rank 0's logits are sampled; all ranks get the scheduler's block tables, so a
//! block id names the same slots on every rank.
//!
//! Each rank loads its part of the weights over its own device's link at the same time, so a
//! split model reaches its first token sooner than it could over one link. Rank 0 loads on the
//! starting thread and every other rank on the thread that will run it: no thread that loaded
//! onto a GPU ends as soon as it is done. (With the loads on short-lived threads, an 8B start on
//! two GPUs never came back: both parts landed, the loading threads never finished, and three
//! threads spun with both GPUs idle.)
//!
//! A rank whose step fails aborts the group's collective, so no rank waits forever for it; the
//! engine then fails its sequences and stops, and the next request loads the model afresh.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::checkpoint_pool::PooledCheckpoint;
use crate::engine::{EngineConfig, EngineHandle, EngineParts, LoadBreakdown, ModelInfo, spawn_engine};
use crate::error::{EngineError, Result};
use crate::kv_cache::KvStorage;
use crate::network::graphs;
use crate::network::tensor_parallel::{Collective, Shard, ThreadCollective};
use crate::network::{Batch, Network};

/// The ranks beyond rank 0 (which the actor runs itself), and rank 0's end of the collective.
pub struct Ranks {
    others: Vec<RankThread>,
    lead_collective: Arc<dyn Collective>,
    broken: bool,
    /// Where the group's collectives go back when the engine ends cleanly.
    lent: Option<(Group, Arc<CollectiveGroups>)>,
}

impl Drop for Ranks {
    fn drop(&mut self) {
        // The other ranks' threads end first; then nothing uses the collectives any more.
        self.others.clear();
        if let Some((group, groups)) = self.lent.take()
            && !self.broken
        {
            groups.give_back(group);
        }
    }
}

/// One collective per rank over a set of devices.
pub struct Group {
    key: Vec<String>,
    collectives: Vec<Arc<dyn Collective>>,
}

/// Collective groups made once per set of devices and lent to one split engine at a time, given
/// back when it ends cleanly (an aborted group is dropped): making NCCL communicators takes about
/// half a second, longer than the rest of a split start from the pool.
#[derive(Default)]
pub struct CollectiveGroups {
    idle: std::sync::Mutex<Vec<Group>>,
    made: std::sync::atomic::AtomicU64,
}

impl CollectiveGroups {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Groups made so far (each a set of NCCL communicators on GPUs).
    pub fn made(&self) -> u64 {
        self.made.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, devices: &[Device]) -> Result<Group> {
        let key: Vec<String> = devices.iter().map(|d| format!("{:?}", d.location())).collect();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = idle.iter().position(|g| g.key == key) {
                return Ok(idle.swap_remove(at));
            }
        }
        let collectives = collectives(devices)?;
        self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Group { key, collectives })
    }

    fn give_back(&self, group: Group) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(group);
    }

    /// Sums a known pattern across `devices` (each rank on a thread of its own, as split engines
    /// run) and returns the largest error against the exact sum: 0 when the collectives add
    /// right. Independent of any model, so a wrong sum points at the transport (e.g. GPU peer
    /// access that a VM reports but does not deliver). The group is lent again after a clean sum.
    pub fn check(&self, devices: &[Device]) -> Result<f32> {
        let group = self.take(devices)?;
        let n = devices.len();
        // Small integers: exact in bf16 and in any order of addition.
        let pattern = |rank: usize| -> Vec<f32> { (0..1 << 20).map(|i| ((i % 7) * (rank + 1)) as f32).collect() };
        let expected: Vec<f32> = (0..1usize << 20).map(|i| ((i % 7) * n * (n + 1) / 2) as f32).collect();
        let sums: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
            let ranks: Vec<_> = devices
                .iter()
                .zip(&group.collectives)
                .enumerate()
                .map(|(rank, (device, collective))| {
                    let pattern = pattern(rank);
                    s.spawn(move || -> Result<Vec<f32>> {
                        let sum = (|| {
                            let x = Tensor::from_vec(pattern, 1 << 20, device)?.to_dtype(candle_core::DType::BF16)?;
                            collective.all_reduce_sum(&x)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()
                        })();
                        if sum.is_err() {
                            collective.abort();
                        }
                        sum.map_err(EngineError::runtime)
                    })
                })
                .collect();
            ranks
                .into_iter()
                .map(|r| r.join().unwrap_or_else(|_| Err(EngineError::Runtime("panicked".into()))))
                .collect()
        });
        let mut worst = 0f32;
        for sum in sums {
            let sum = sum?; // an aborted group is dropped here, not lent again
            worst = sum.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
        }
        self.give_back(group);
        Ok(worst)
    }
}

struct RankThread {
    steps: Option<Sender<Arc<Batch>>>,
    done: Receiver<Result<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RankThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread between steps (every step it took was answered).
        drop(self.steps.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Ranks {
    /// A rank failed: the collective is aborted and the engine must stop.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// One step on every rank; rank 0 (`lead`, `kv`) runs on the calling thread. Returns rank 0's
    /// logits (every rank computes the same ones).
    pub fn forward(&mut self, batch: &Batch, lead: &Network, kv: &KvStorage) -> Result<Tensor> {
        if self.broken {
            return Err(EngineError::Runtime("a rank of this tensor-parallel engine failed".into()));
        }
        let shared = Arc::new(batch.clone());
        let mut failed: Option<EngineError> = None;
        let sent: Vec<bool> =
            self.others.iter().map(|r| r.steps.as_ref().is_some_and(|s| s.send(shared.clone()).is_ok())).collect();
        if sent.iter().any(|s| !s) {
            failed = Some(EngineError::Runtime("a rank's thread of this tensor-parallel engine ended".into()));
            self.lead_collective.abort();
        }
        let lead_result = {
            let _gate = graphs::shared();
            lead.forward(batch, kv).map_err(EngineError::from)
        };
        if lead_result.is_err() {
            self.lead_collective.abort();
        }
        tracing::debug!(
            tokens = batch.tokens.len(),
            ok = lead_result.is_ok(),
            "tensor parallel: rank 0 queued its step"
        );
        for (rank, was_sent) in self.others.iter().zip(sent) {
            if !was_sent {
                continue;
            }
            let answer =
                rank.done.recv().unwrap_or_else(|_| Err(EngineError::Runtime("a rank's thread ended mid-step".into())));
            if let Err(e) = answer {
                failed.get_or_insert(e);
            }
        }
        match (lead_result, failed) {
            (Ok(logits), None) => Ok(logits),
            (Err(e), _) | (Ok(_), Some(e)) => {
                self.broken = true;
                Err(e)
            }
        }
    }
}

/// A rank's thread: runs each step it is sent on its network and cache, answering each.
fn run_rank(
    network: Network,
    kv: KvStorage,
    collective: Arc<dyn Collective>,
    steps: Receiver<Arc<Batch>>,
    done: Sender<Result<()>>,
) {
    while let Ok(batch) = steps.recv() {
        let result = {
            let _gate = graphs::shared();
            network.forward(&batch, &kv).map(drop).map_err(EngineError::from)
        };
        tracing::debug!(ok = result.is_ok(), "tensor parallel: a rank's thread queued its step");
        if result.is_err() {
            collective.abort();
        }
        if done.send(result).is_err() {
            break;
        }
    }
    // Device memory is freed inside the gate, like any other use of the GPU's stream.
    let _gate = graphs::shared();
    drop(kv);
    drop(network);
}

/// What loading one rank gives: its network, its KV cache, and how long its weights took to land.
type Loaded = (Network, KvStorage, Duration);

/// A rank thread's word on its load: how long its weights took to land, and its KV cache's bytes.
type LoadReport = (Duration, u64);

/// Everything a rank needs to load its part of the weights onto its device.
struct RankLoad {
    pooled: Arc<PooledCheckpoint>,
    device: Device,
    shard: Shard,
    collective: Arc<dyn Collective>,
    local: crate::network::NetConfig,
    kv: crate::engine::KvPlan,
    how: crate::network::WeightHandling,
    started: Instant,
}

impl RankLoad {
    fn load(self) -> Result<Loaded> {
        let tensors = self.pooled.load_shard(&self.device, self.how.dtype, self.shard)?;
        let h2d = self.started.elapsed();
        let _gate = graphs::shared();
        let config = self.pooled.ckpt.config.clone();
        let network =
            Network::new_rank(config, tensors, self.kv.context, self.how, &self.device, self.shard, self.collective)?;
        let c = &self.local;
        let storage =
            KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, self.kv.blocks, self.how.dtype, &self.device)?;
        tracing::info!(rank = self.shard.rank, h2d_ms = h2d.as_millis() as u64, "tensor parallel: rank loaded");
        Ok((network, storage, h2d))
    }
}

/// Starts rank `load.shard.rank`'s thread, which loads its part, reports how that went on the
/// returned channel, and then serves steps until the engine ends. The thread that loads a rank
/// is the one that runs it: no thread that used a GPU for a load ends as soon as it is done.
fn spawn_rank(name: &str, load: RankLoad) -> Result<(RankThread, Receiver<Result<LoadReport>>)> {
    let (steps, steps_rx) = channel();
    let (done_tx, done) = channel();
    let (loaded_tx, loaded) = channel();
    let collective = load.collective.clone();
    let thread = std::thread::Builder::new()
        .name(format!("rank{}-{name}", load.shard.rank))
        .spawn(move || match load.load() {
            Ok((network, storage, h2d)) => {
                if loaded_tx.send(Ok((h2d, storage.bytes()))).is_ok() {
                    run_rank(network, storage, collective, steps_rx, done_tx);
                } else {
                    let _gate = graphs::shared();
                    drop((network, storage));
                }
            }
            Err(e) => drop(loaded_tx.send(Err(e))),
        })
        .map_err(|e| EngineError::Load(format!("cannot start a rank's thread: {e}")))?;
    Ok((RankThread { steps: Some(steps), done, thread: Some(thread) }, loaded))
}

/// One collective per device: threads sharing memory on CPUs, NCCL on CUDA GPUs.
fn collectives(devices: &[Device]) -> Result<Vec<Arc<dyn Collective>>> {
    if devices.iter().all(Device::is_cpu) {
        let group = ThreadCollective::group(devices.len());
        return Ok(group.into_iter().map(|c| Arc::new(c) as Arc<dyn Collective>).collect());
    }
    #[cfg(feature = "nccl")]
    if devices.iter().all(Device::is_cuda) {
        let group = crate::network::tensor_parallel::nccl::NcclCollective::group(devices)?;
        return Ok(group.into_iter().map(|c| Arc::new(c) as Arc<dyn Collective>).collect());
    }
    Err(EngineError::Load(
        "tensor parallelism needs every rank on a CPU, or on a CUDA GPU in a build with NCCL (feature nccl)".into(),
    ))
}

/// Builds an engine whose model is split over `devices` (rank `r` on `devices[r]`), each rank
/// loading its part from the pool at the same time, and starts it, with collectives from
/// `groups`. Blocking.
pub fn start_tensor_parallel(
    name: &str,
    pooled: &Arc<PooledCheckpoint>,
    pool_hit: bool,
    devices: &[Device],
    groups: &Arc<CollectiveGroups>,
    config: &EngineConfig,
) -> Result<EngineHandle> {
    let n = devices.len();
    if n < 2 {
        return Err(EngineError::InvalidParams(format!("tensor parallelism needs 2 or more devices, not {n}")));
    }
    let dtype = config.dtype_for(&devices[0]);
    let how = config.weights_for(&devices[0]);
    // Every rank has the same share; it is refused here when the shapes do not split n ways.
    let local = Shard::new(0, n)?.local_config(&pooled.ckpt.config)?;
    let kv = config.kv_plan(&local, dtype);
    let group = groups.take(devices)?;
    let collectives = group.collectives.clone();
    tracing::info!(model = name, ranks = n, "tensor parallel: collectives ready; loading each rank's part");
    let started = Instant::now();
    let load = |rank: usize| -> Result<RankLoad> {
        Ok(RankLoad {
            pooled: pooled.clone(),
            device: devices[rank].clone(),
            shard: Shard::new(rank, n)?,
            collective: collectives[rank].clone(),
            local: local.clone(),
            kv,
            how,
            started,
        })
    };
    // Ranks 1.. load on their own threads while rank 0 loads here, all at once.
    let mut others = Vec::with_capacity(n - 1);
    let mut loaded = Vec::with_capacity(n - 1);
    let mut failed = None;
    for rank in 1..n {
        match load(rank).and_then(|l| spawn_rank(name, l)) {
            Ok((thread, report)) => {
                others.push(thread);
                loaded.push(report);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let lead = if failed.is_none() { load(0).and_then(RankLoad::load).map(Some) } else { Ok(None) };
    let mut h2d = Duration::ZERO;
    let mut kv_cache_bytes = 0;
    for report in loaded {
        match report.recv() {
            Ok(Ok((rank_h2d, bytes))) => {
                h2d = h2d.max(rank_h2d);
                kv_cache_bytes += bytes;
            }
            Ok(Err(e)) => drop(failed.get_or_insert(e)),
            Err(_) => drop(failed.get_or_insert(EngineError::Load("a rank's thread ended while loading".into()))),
        }
    }
    let (network, storage, lead_h2d) = match (lead, failed) {
        (Ok(Some(lead)), None) => lead,
        (lead, failed) => {
            let error = match (failed, lead) {
                (Some(e), lead) => {
                    let _gate = graphs::shared(); // rank 0's part is freed inside it
                    drop(lead);
                    e
                }
                (None, Err(e)) => e,
                (None, Ok(_)) => EngineError::Load("rank 0 was not loaded".into()),
            };
            // The loaded ranks' threads end (their channels close) and free what they loaded.
            drop(others);
            // No step ran on the collectives: they can be lent again.
            groups.give_back(group);
            return Err(error);
        }
    };
    let h2d = h2d.max(lead_h2d);
    let kv_cache_bytes = kv_cache_bytes + storage.bytes();
    let lead_collective = collectives[0].clone();
    let load = LoadBreakdown {
        pool_hit,
        admit: if pool_hit { Duration::ZERO } else { pooled.admit_time() },
        h2d,
        init: started.elapsed().saturating_sub(h2d),
        woke: false,
    };
    let info = ModelInfo { ranks: n, ..ModelInfo::of(name, pooled, kv_cache_bytes, kv.context, load) };
    let ranks = Ranks { others, lead_collective, broken: false, lent: Some((group, groups.clone())) };
    spawn_engine(info, EngineParts::of(pooled, network, storage, Some(ranks))?, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CheckpointPool;
    use crate::params::SamplingParams;
    use crate::tiny_model::{TinySpec, make_tiny_model};
    use candle_core::DType;

    fn greedy(max_tokens: u32) -> SamplingParams {
        SamplingParams { max_tokens, temperature: 0.0, ..Default::default() }
    }

    /// A tiny model of `arch` in a temp dir (kept while the first value lives), checked into a pool.
    fn pooled_tiny(arch: crate::Architecture) -> (tempfile::TempDir, Arc<PooledCheckpoint>) {
        let dir = tempfile::tempdir().unwrap();
        make_tiny_model(dir.path(), &TinySpec::new(arch)).unwrap();
        let pool = CheckpointPool::new(u64::MAX, None);
        let (pooled, _) = pool.checkout(crate::Checkpoint::open(dir.path()).unwrap(), &|_| {}).unwrap();
        (dir, pooled)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_model_split_over_two_ranks_generates_what_it_generates_whole() {
        let prompts = ["Once upon a time", "The lighthouse keeper climbed", "Seven ships"];
        for arch in [crate::Architecture::Llama, crate::Architecture::Qwen3, crate::Architecture::Opt] {
            let (_dir, pooled) = pooled_tiny(arch);
            let config = EngineConfig::default();
            let whole = crate::engine::start_engine("whole", &pooled, true, &Device::Cpu, &config).unwrap();
            let groups = CollectiveGroups::new();
            let split =
                start_tensor_parallel("split", &pooled, true, &[const { Device::Cpu }; 2], &groups, &config).unwrap();
            assert_eq!(split.info.weight_bytes, whole.info.weight_bytes);
            // All three at once, so steps batch them together on every rank.
            let run = |engine: EngineHandle| async move {
                let streams: Vec<_> =
                    prompts.iter().map(|p| engine.submit(p.to_string(), greedy(12)).unwrap()).collect();
                let mut texts = Vec::new();
                for s in streams {
                    texts.push(s.collect().await.unwrap().0);
                }
                texts
            };
            let alive = split.alive_token();
            let (expected, got) = (run(whole).await, run(split).await);
            assert!(expected.iter().any(|t| !t.is_empty()), "{arch:?}: the whole model generated text");
            assert_eq!(got, expected, "{arch:?}: split over two ranks");
            // Started again once the first has ended: the same collectives, not new ones.
            while alive.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let again =
                start_tensor_parallel("split", &pooled, true, &[const { Device::Cpu }; 2], &groups, &config).unwrap();
            assert_eq!(run(again).await, expected, "{arch:?}: split again");
            assert_eq!(groups.made(), 1, "{arch:?}: the group was lent again");
        }
    }

    /// Rank `rank` of 2 of the tiny llama at `dir`, with a KV cache of `blocks` blocks.
    fn rank_of(
        pooled: &PooledCheckpoint,
        rank: usize,
        collective: Arc<dyn Collective>,
        blocks: usize,
    ) -> (Network, KvStorage) {
        let shard = Shard::new(rank, 2).unwrap();
        let how = EngineConfig::default().weights_for(&Device::Cpu);
        let tensors = pooled.load_shard(&Device::Cpu, how.dtype, shard).unwrap();
        let network =
            Network::new_rank(pooled.ckpt.config.clone(), tensors, 256, how, &Device::Cpu, shard, collective).unwrap();
        let c = &network.config;
        let kv = KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, blocks, how.dtype, &Device::Cpu).unwrap();
        (network, kv)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rank_that_fails_mid_step_fails_the_request_and_stops_the_engine_without_hanging() {
        let (_dir, pooled) = pooled_tiny(crate::Architecture::Llama);
        let mut group = ThreadCollective::group(2).into_iter().map(|c| Arc::new(c) as Arc<dyn Collective>);
        let (lead_collective, other) = (group.next().unwrap(), group.next().unwrap());
        // Rank 1's cache is one block: a prompt that needs a second block fails there only.
        let (network, storage) = rank_of(&pooled, 0, lead_collective.clone(), 8);
        let (network1, storage1) = rank_of(&pooled, 1, other.clone(), 1);
        let (steps, steps_rx) = channel();
        let (done_tx, done) = channel();
        let thread = std::thread::spawn(move || run_rank(network1, storage1, other, steps_rx, done_tx));
        let others = vec![RankThread { steps: Some(steps), done, thread: Some(thread) }];
        let info = ModelInfo::of("split", &pooled, storage.bytes(), 256, LoadBreakdown::default());
        let groups = CollectiveGroups::new();
        let group = Group { key: vec![], collectives: vec![lead_collective.clone()] };
        let ranks = Ranks { others, lead_collective, broken: false, lent: Some((group, groups.clone())) };
        let parts = EngineParts::of(&pooled, network, storage, Some(ranks)).unwrap();
        let engine = spawn_engine(info, parts, &EngineConfig::default()).unwrap();
        let long = "the model reads the model for a sentence and the model reads ".repeat(4);
        let outcome = tokio::time::timeout(Duration::from_secs(30), engine.generate(long, greedy(4))).await;
        let err = outcome.expect("answered, not hung").expect_err("the failing rank fails the request");
        assert!(matches!(err, EngineError::Runtime(_)), "{err}");
        // The engine stopped; a later request is refused at once rather than waiting on it.
        for _ in 0..100 {
            if !engine.is_alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!engine.is_alive(), "a broken split engine stops");
        assert!(engine.submit("again".into(), greedy(1)).is_err());
        let alive = engine.alive_token();
        while alive.strong_count() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(groups.idle.lock().unwrap().is_empty(), "an aborted group is not lent again");
    }

    #[test]
    fn the_collective_check_sums_exactly_and_lends_its_group_again() {
        let groups = CollectiveGroups::new();
        for n in [2, 3] {
            let devices = vec![Device::Cpu; n];
            assert_eq!(groups.check(&devices).unwrap(), 0.0, "{n} ranks");
            assert_eq!(groups.check(&devices).unwrap(), 0.0, "{n} ranks, the same group again");
        }
        assert_eq!(groups.made(), 2, "one group per set of devices");
    }

    #[test]
    fn a_rank_whose_load_fails_reports_it_and_its_thread_ends() {
        let (_dir, pooled) = pooled_tiny(crate::Architecture::Llama);
        let config = EngineConfig::default();
        let local = Shard::new(0, 2).unwrap().local_config(&pooled.ckpt.config).unwrap();
        // Rank 1 of 3 of a model whose 4 heads do not split 3 ways: its own load refuses it.
        let load = RankLoad {
            pooled: pooled.clone(),
            device: Device::Cpu,
            shard: Shard::new(1, 3).unwrap(),
            collective: Arc::new(ThreadCollective::group(1).pop().unwrap()),
            local: local.clone(),
            kv: config.kv_plan(&local, DType::F32),
            how: config.weights_for(&Device::Cpu),
            started: Instant::now(),
        };
        let (thread, loaded) = spawn_rank("m", load).unwrap();
        let report = loaded.recv_timeout(Duration::from_secs(30)).expect("the thread reports its load");
        assert!(matches!(report, Err(EngineError::Load(_))), "{report:?}");
        drop(thread); // joins: the thread ended after reporting
    }

    #[test]
    fn a_shape_that_does_not_split_or_a_single_device_is_refused_before_loading() {
        let (_dir, pooled) = pooled_tiny(crate::Architecture::Llama);
        let (config, groups) = (EngineConfig::default(), CollectiveGroups::new());
        let err = start_tensor_parallel("m", &pooled, true, &[const { Device::Cpu }; 3], &groups, &config)
            .err()
            .expect("refused");
        assert!(matches!(err, EngineError::Load(_)), "{err}");
        let err = start_tensor_parallel("m", &pooled, true, &[Device::Cpu], &groups, &config).err().expect("refused");
        assert!(matches!(err, EngineError::InvalidParams(_)), "{err}");
    }
}
