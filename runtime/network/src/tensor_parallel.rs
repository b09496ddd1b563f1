//! Tensor parallelism: one network split over several devices, Megatron-style. Rank `r` of `n`
//! holds the `r`-th `1/n` of the attention heads (its rows of q/k/v, its columns of o_proj) and of
//! the MLP's intermediate features (its rows of gate/up, its columns of down) and of the
//! vocabulary (its rows of the embedding table and of the head, when they divide); norms are
//! replicated. A layer's attention and MLP each end in a partial sum that the ranks add together
//! (`Collective::all_reduce_sum`), so every rank carries the same hidden state. The embedding and
//! the logits are sums too: each rank looks up the tokens in its part of the table (zeros for the
//! others) and places its part of the logits among zeros. Splitting the vocabulary matters for a
//! start: each rank copies its share of the weights over its own link, and a replicated table is
//! a large share to copy twice. A rank's KV cache holds its own K/V heads only, so the
//! cache, like the weights, is split `n` ways.
//!
//! A rank's network is built with its `local_config` (heads, K/V heads and intermediate size
//! divided by `n`), so attention, the kernels and the KV layout run unchanged on its share.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::Tensor;

use crate::Weight;
use crate::config::NetConfig;
use crate::error::{NetworkError, Result};

/// Adds the ranks' partial results together, the same sum arriving at every rank.
pub trait Collective: Send + Sync {
    fn all_reduce_sum(&self, x: &Tensor) -> candle_core::Result<Tensor>;

    /// Called by a rank whose step failed before it reached every sum: ranks waiting for it (now
    /// or later) get an error instead of waiting forever. The group is unusable afterwards.
    fn abort(&self);
}

/// One rank's place in a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

/// What one rank holds of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// All of it.
    Whole,
    /// `len` rows of dimension `dim`, from row `start`.
    Rows { dim: usize, start: usize, len: usize },
    /// Zeros of its shape: a bias that another rank adds.
    Zeros,
}

/// How a tensor is split across ranks.
enum Split {
    /// Every rank holds all of it.
    Replicated,
    /// Rank `r` holds rows `[r * len, (r + 1) * len)` of dimension `dim` (`len` = size / ranks).
    Part { dim: usize },
    /// A bias added after the sum: rank 0 holds it, the others hold zeros, so it counts once.
    AfterSum,
    /// The embedding table and the head: rows of the vocabulary when the ranks divide it, else
    /// all of it.
    Vocab,
}

impl Shard {
    pub fn new(rank: usize, ranks: usize) -> Result<Self> {
        if ranks == 0 || rank >= ranks {
            return Err(NetworkError::Load(format!("rank {rank} is not one of {ranks} ranks")));
        }
        Ok(Self { rank, ranks })
    }

    /// `config` as one rank sees it: its share of the heads, K/V heads and intermediate size.
    pub fn local_config(&self, config: &NetConfig) -> Result<NetConfig> {
        let n = self.ranks;
        for (what, value) in [
            ("num_attention_heads", config.num_heads),
            ("num_key_value_heads", config.num_kv_heads),
            ("intermediate_size", config.intermediate_size),
        ] {
            if !value.is_multiple_of(n) {
                return Err(NetworkError::Load(format!("{what} {value} does not split over {n} ranks")));
            }
        }
        Ok(NetConfig {
            num_heads: config.num_heads / n,
            num_kv_heads: config.num_kv_heads / n,
            intermediate_size: config.intermediate_size / n,
            ..config.clone()
        })
    }

    fn split_of(name: &str) -> Split {
        let part = |suffix: &str| name.ends_with(suffix);
        if ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
            .iter()
            .any(|p| part(&format!("{p}.weight")) || part(&format!("{p}.bias")))
        {
            Split::Part { dim: 0 }
        } else if part("o_proj.weight") || part("down_proj.weight") {
            Split::Part { dim: 1 }
        } else if part("o_proj.bias") || part("down_proj.bias") {
            Split::AfterSum
        } else if name == "lm_head.weight" || name == "model.embed_tokens.weight" {
            Split::Vocab
        } else {
            Split::Replicated
        }
    }

    /// Which part of the tensor `name` (our names, as `NetConfig::expected_tensors` lists them)
    /// of `shape` this rank holds; an error when the split dimension does not divide.
    pub fn part(&self, name: &str, shape: &[usize]) -> Result<Part> {
        match Self::split_of(name) {
            _ if self.ranks == 1 => Ok(Part::Whole),
            Split::Replicated => Ok(Part::Whole),
            Split::AfterSum if self.rank == 0 => Ok(Part::Whole),
            Split::AfterSum => Ok(Part::Zeros),
            Split::Vocab => Ok(match shape.first().and_then(|&vocab| self.vocab_rows(vocab)) {
                Some(rows) => Part::Rows { dim: 0, start: rows.start, len: rows.len() },
                None => Part::Whole,
            }),
            Split::Part { dim } => match shape.get(dim) {
                Some(size) if size.is_multiple_of(self.ranks) => {
                    let len = size / self.ranks;
                    Ok(Part::Rows { dim, start: self.rank * len, len })
                }
                _ => Err(NetworkError::Load(format!(
                    "{name} of shape {shape:?} does not split over {} ranks on dimension {dim}",
                    self.ranks
                ))),
            },
        }
    }

    /// The rows of a vocabulary of `vocab` entries this rank's embedding table and head hold:
    /// its `1/n` when the ranks divide it; `None` when every rank holds all of it.
    pub fn vocab_rows(&self, vocab: usize) -> Option<std::ops::Range<usize>> {
        let len = vocab / self.ranks;
        (self.ranks > 1 && vocab.is_multiple_of(self.ranks)).then(|| self.rank * len..(self.rank + 1) * len)
    }

    /// This rank's part of every weight of a model (`slice` of each).
    pub fn slice_all(&self, weights: HashMap<String, Weight>) -> Result<HashMap<String, Weight>> {
        weights.into_iter().map(|(name, w)| self.slice(&name, w).map(|w| (name, w))).collect()
    }

    /// This rank's part of the tensor `name`. Quantized weights cannot be split.
    pub fn slice(&self, name: &str, weight: Weight) -> Result<Weight> {
        let load = NetworkError::load;
        let t = match weight {
            Weight::Dense(t) => t,
            Weight::Quantized(q) => {
                return match self.part(name, q.shape().dims())? {
                    Part::Whole => Ok(Weight::Quantized(q)),
                    _ => Err(quantized(name)),
                };
            }
        };
        Ok(Weight::Dense(match self.part(name, t.dims())? {
            Part::Whole => t,
            Part::Zeros => t.zeros_like().map_err(load)?,
            Part::Rows { dim, start, len } => t.narrow(dim, start, len).and_then(|p| p.contiguous()).map_err(load)?,
        }))
    }
}

/// The error for a quantized tensor a rank would hold only part of.
pub fn quantized(name: &str) -> NetworkError {
    NetworkError::Load(format!("{name} is quantized; tensor parallelism needs dense weights"))
}

/// Ranks on threads of one process, adding through shared memory: tensor parallelism on the CPU
/// (and a reference for a GPU collective). Every rank must call `all_reduce_sum` the same number
/// of times, in the same order, as with any collective; a rank whose step fails first calls
/// `abort`, which fails every rank's waiting and later sums.
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<ThreadGroup>,
}

struct ThreadGroup {
    ranks: usize,
    state: Mutex<Rendezvous>,
    turn: Condvar,
}

#[derive(Default)]
struct Rendezvous {
    parts: Vec<Option<Tensor>>,
    /// Ranks that reached the current meeting point.
    arrived: usize,
    /// Meeting points passed so far.
    generation: u64,
    aborted: bool,
}

impl ThreadGroup {
    fn lock(&self) -> MutexGuard<'_, Rendezvous> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Arrives at the current meeting point and waits until every rank has, or one aborted.
    fn meet<'a>(&'a self, mut state: MutexGuard<'a, Rendezvous>) -> candle_core::Result<MutexGuard<'a, Rendezvous>> {
        if !state.aborted {
            let generation = state.generation;
            state.arrived += 1;
            if state.arrived == self.ranks {
                state.arrived = 0;
                state.generation += 1;
                self.turn.notify_all();
            }
            state = self
                .turn
                .wait_while(state, |s| s.generation == generation && !s.aborted)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if state.aborted { Err(candle_core::Error::Msg("another rank of the group failed".into())) } else { Ok(state) }
    }
}

impl ThreadCollective {
    /// One collective per rank of a group of `ranks`.
    pub fn group(ranks: usize) -> Vec<ThreadCollective> {
        let state = Rendezvous { parts: vec![None; ranks], ..Default::default() };
        let shared = Arc::new(ThreadGroup { ranks, state: Mutex::new(state), turn: Condvar::new() });
        (0..ranks).map(|rank| ThreadCollective { rank, shared: shared.clone() }).collect()
    }
}

impl Collective for ThreadCollective {
    fn all_reduce_sum(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let group = &self.shared;
        let mut state = group.lock();
        state.parts[self.rank] = Some(x.clone());
        let state = group.meet(state)?;
        // Every rank adds in rank order, so all get bit-identical sums.
        let sum = {
            let mut parts = state.parts.iter().map(|s| s.as_ref().expect("every rank wrote its part"));
            let first = parts.next().expect("at least one rank").clone();
            parts.try_fold(first, |acc, p| acc + p)
        };
        // No rank writes the next round's part before every rank has read this one.
        drop(group.meet(state)?);
        sum
    }

    fn abort(&self) {
        let mut state = self.shared.lock();
        state.aborted = true;
        self.shared.turn.notify_all();
    }
}

/// Ranks on GPUs of one process, adding through NCCL on each GPU's stream (the one candle and every
/// engine on that GPU queue their work on), so a sum is queued in order with the rank's kernels
/// and the host never waits for it.
#[cfg(feature = "nccl")]
pub mod nccl {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Shape, Tensor};

    use super::Collective;
    use crate::error::{NetworkError, Result};

    pub struct NcclCollective {
        /// Dropped by hand (`Drop` below): cudarc's drop panics when NCCL cannot abort the
        /// communicator, which is what happens when it is dropped as the process exits.
        comm: std::mem::ManuallyDrop<Comm>,
    }

    impl Drop for NcclCollective {
        fn drop(&mut self) {
            // SAFETY: dropped once, here; nothing uses `comm` after.
            let comm = unsafe { std::mem::ManuallyDrop::take(&mut self.comm) };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(comm))).is_err() {
                tracing::warn!("an NCCL communicator could not be aborted (the CUDA driver may be shutting down)");
            }
        }
    }

    // SAFETY: a communicator is used by one thread at a time: its rank's, which runs that rank's
    // steps one after another (NCCL allows a communicator on any thread, not on two at once).
    unsafe impl Send for NcclCollective {}
    unsafe impl Sync for NcclCollective {}

    impl NcclCollective {
        /// One communicator per device, rank `r` on `devices[r]` (ncclCommInitAll).
        pub fn group(devices: &[Device]) -> Result<Vec<NcclCollective>> {
            let streams = devices
                .iter()
                .map(|d| d.as_cuda_device().map(|c| c.cuda_stream()))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(NetworkError::load)?;
            let comms = Comm::from_devices(streams)
                .map_err(|e| NetworkError::Load(format!("NCCL could not make a communicator: {e:?}")))?;
            Ok(comms.into_iter().map(|comm| NcclCollective { comm: std::mem::ManuallyDrop::new(comm) }).collect())
        }
    }

    impl Collective for NcclCollective {
        fn all_reduce_sum(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            x.contiguous()?.apply_op1_no_bwd(&AllReduce { comm: &self.comm })
        }

        /// Nothing to do on the host: a sum missing one rank stalls only the GPUs, and the
        /// communicators are aborted (Comm's drop) when the failed group is dropped.
        fn abort(&self) {}
    }

    struct AllReduce<'a> {
        comm: &'a Comm,
    }

    impl AllReduce<'_> {
        fn sum<T>(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage>
        where
            T: candle_core::cuda_backend::CudaDType
                + candle_core::cuda_backend::cudarc::driver::DeviceRepr
                + candle_core::cuda_backend::cudarc::nccl::safe::NcclType,
        {
            let dev = s.device().clone();
            let all = s.as_cuda_slice::<T>()?;
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("all-reduce of a strided tensor")
            };
            let src = all.slice(start..end);
            // SAFETY: NCCL writes every element before anything reads it (same stream).
            let mut dst = unsafe { dev.alloc::<T>(src.len()) }?;
            self.comm
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev))
        }
    }

    impl candle_core::CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL sums GPU tensors only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let out = match s.dtype() {
                DType::BF16 => self.sum::<half::bf16>(s, l)?,
                DType::F16 => self.sum::<half::f16>(s, l)?,
                DType::F32 => self.sum::<f32>(s, l)?,
                other => candle_core::bail!("NCCL all-reduce of {other:?}"),
            };
            Ok((out, l.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::kv_cache::KvStorage;
    use crate::test_support::{F32, config, dense, random_weights};
    use crate::{Batch, Network, SeqChunk};

    /// Logits of a prefill of two sequences (5 and 3 tokens, blocks 0 and 1) and their next
    /// decode step, from `network` with a cache of its own.
    fn two_steps(network: &Network) -> Vec<Vec<Vec<f32>>> {
        let c = &network.config;
        let kv = KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, 2, DType::F32, &Device::Cpu).unwrap();
        let chunk = |start, len, block| SeqChunk { start, len, block_table: vec![block], sample: true };
        let prefill =
            Batch { tokens: vec![3, 14, 15, 92, 65, 35, 89, 79], chunks: vec![chunk(0, 5, 0), chunk(0, 3, 1)] };
        let decode = Batch { tokens: vec![32, 38], chunks: vec![chunk(5, 1, 0), chunk(3, 1, 1)] };
        [prefill, decode].iter().map(|b| network.forward(b, &kv).unwrap().to_vec2::<f32>().unwrap()).collect()
    }

    #[test]
    fn two_ranks_give_what_one_network_gives() {
        for model_type in ["llama", "qwen2", "qwen3", "opt"] {
            let c = config(model_type, serde_json::json!({}));
            let weights = random_weights(&c);
            let whole = two_steps(&Network::new(c.clone(), dense(&weights), 64, F32, &Device::Cpu).unwrap());
            let c_vocab = c.vocab_size;
            let collectives = ThreadCollective::group(2);
            let ranks: Vec<_> = std::thread::scope(|s| {
                let ranks: Vec<_> = collectives
                    .into_iter()
                    .enumerate()
                    .map(|(rank, collective)| {
                        let (c, weights) = (c.clone(), dense(&weights));
                        s.spawn(move || {
                            let shard = Shard::new(rank, 2).unwrap();
                            let weights = shard.slice_all(weights).unwrap();
                            let network =
                                Network::new_rank(c, weights, 64, F32, &Device::Cpu, shard, Arc::new(collective))
                                    .unwrap();
                            assert_eq!(network.config.num_kv_heads, 1, "each rank caches half the K/V heads");
                            let half = Some(rank * c_vocab / 2..(rank + 1) * c_vocab / 2);
                            assert_eq!(network.embed_rows, half, "the table holds its half of the vocabulary");
                            assert_eq!(network.head_rows, half, "so does the head, tied or not");
                            two_steps(&network)
                        })
                    })
                    .collect();
                ranks.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(ranks[0], ranks[1], "{model_type}: every rank ends with the same logits");
            let worst = whole.iter().flatten().flatten().zip(ranks[0].iter().flatten().flatten());
            let worst = worst.map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{model_type}: two ranks differ from one network by {worst}");
        }
    }

    #[test]
    fn an_aborted_group_fails_waiting_and_later_sums_instead_of_hanging() {
        let mut group = ThreadCollective::group(2).into_iter();
        let (first, second) = (group.next().unwrap(), group.next().unwrap());
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let summed = std::thread::scope(|s| {
            let waiting = s.spawn(|| first.all_reduce_sum(&x));
            // The other rank "fails" instead of arriving.
            std::thread::sleep(std::time::Duration::from_millis(50));
            second.abort();
            waiting.join().unwrap()
        });
        assert!(summed.is_err(), "a waiting rank is released with an error");
        assert!(first.all_reduce_sum(&x).is_err() && second.all_reduce_sum(&x).is_err(), "the group stays aborted");
    }

    #[test]
    fn shapes_that_do_not_split_and_quantized_weights_are_refused() {
        let c = config("llama", serde_json::json!({}));
        let err = Shard::new(0, 3).unwrap().local_config(&c).unwrap_err();
        assert!(matches!(&err, NetworkError::Load(m) if m.contains("num_attention_heads 4")), "{err}");
        assert!(Shard::new(2, 2).is_err());
        let q = candle_core::quantized::QTensor::quantize(
            &Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .unwrap();
        let err =
            Shard::new(1, 2).unwrap().slice("model.layers.0.self_attn.q_proj.weight", Weight::Quantized(Arc::new(q)));
        assert!(matches!(err, Err(NetworkError::Load(m)) if m.contains("quantized")));
    }

    #[test]
    fn the_vocabulary_splits_when_the_ranks_divide_it() {
        let shard = Shard::new(1, 2).unwrap();
        assert_eq!(shard.part("lm_head.weight", &[96, 8]).unwrap(), Part::Rows { dim: 0, start: 48, len: 48 });
        assert_eq!(shard.part("lm_head.weight", &[97, 8]).unwrap(), Part::Whole, "an odd vocabulary stays whole");
        assert_eq!(
            shard.part("model.embed_tokens.weight", &[96, 8]).unwrap(),
            Part::Rows { dim: 0, start: 48, len: 48 }
        );
    }

    #[test]
    fn biases_after_the_sum_count_once() {
        let bias = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let name = "model.layers.0.mlp.down_proj.bias";
        let part = |rank| match Shard::new(rank, 2).unwrap().slice(name, Weight::Dense(bias.clone())).unwrap() {
            Weight::Dense(t) => t.to_vec1::<f32>().unwrap(),
            Weight::Quantized(_) => unreachable!(),
        };
        assert_eq!((part(0), part(1)), (vec![1.0, 2.0], vec![0.0, 0.0]));
    }
}
