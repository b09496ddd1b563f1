//! Our decoder network (the llama family: llama incl. Llama 3.1 RoPE scaling, qwen2, qwen3,
//! mistral; and OPT, whose LayerNorm, learned positions and ReLU MLP are variants of the same
//! block, chosen by `NetConfig`), written for a batching engine: one forward pass takes the tokens of many sequences packed together
//! (a decode token for some, a prefill chunk for others), runs every projection once over the
//! whole pack, writes K and V straight into the paged cache and attends per sequence over its
//! blocks. q/k/v and gate/up projections are fused at load; grouped-query attention reads the
//! shared K/V heads without copying them per query head; RoPE is computed in f32.
//!
//! Invariant: this crate knows nothing of checkpoint files, tokenizers, scheduling or serving. It
//! takes named tensors already on the device and a `NetConfig`, and runs steps that the engine's
//! scheduler packed; the paged KV layout (`kv_cache`) is defined here because the kernels write it.

pub mod attention;
pub mod config;
pub mod error;
pub mod fused;
pub mod graphs;
pub mod host_copy;
pub mod kv_cache;
pub mod paged_kernel;
pub mod phases;
pub mod rope;
pub mod skinny;
pub mod tensor_parallel;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};

pub use crate::error::NetworkError;
use crate::error::Result;
use crate::kv_cache::KvStorage;
pub use config::{ARCHITECTURES, ArchSpec, Architecture, MlpKind, NetConfig, NormKind, PositionKind};

/// A weight as the checkpoint pool hands it over: a dense tensor in the compute dtype, or a
/// quantized one (GGUF) that stays quantized on the device.
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// As a dense tensor of `dtype` (quantized weights are dequantized: norms, embeddings).
    fn dense(self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }
}

/// `x @ w.T`, with `w` dense or quantized.
enum Linear {
    Dense(Tensor),
    Quantized(QMatMul),
}

impl Linear {
    fn new(w: Weight, how: &WeightHandling) -> candle_core::Result<Self> {
        Ok(match w {
            Weight::Dense(t) => Linear::Dense(t),
            Weight::Quantized(q) if how.dequantize => Linear::Dense(Weight::Quantized(q).dense(how.dtype)?),
            Weight::Quantized(q) => Linear::Quantized(QMatMul::from_arc(q)?),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Dense(w) if skinny::applies(x, w) => skinny::matmul_t(x, w),
            Linear::Dense(w) => x.matmul(&w.t()?),
            // Quantized matmuls take f32 activations.
            Linear::Quantized(q) => q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        }
    }
}

/// Projections that share an input, fused into one matmul when dense (rows concatenated at
/// load); quantized ones run one by one and their outputs are concatenated.
enum Projection {
    Fused(Linear),
    Parts(Vec<Linear>),
}

impl Projection {
    fn new(parts: Vec<Weight>, how: &WeightHandling) -> candle_core::Result<Self> {
        if how.dequantize || parts.iter().all(|w| matches!(w, Weight::Dense(_))) {
            let dense: Vec<Tensor> =
                parts.into_iter().map(|w| w.dense(how.dtype)).collect::<candle_core::Result<_>>()?;
            Ok(Projection::Fused(Linear::Dense(Tensor::cat(&dense, 0)?)))
        } else {
            Ok(Projection::Parts(parts.into_iter().map(|w| Linear::new(w, how)).collect::<candle_core::Result<_>>()?))
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Projection::Fused(l) => l.forward(x),
            Projection::Parts(ls) => {
                Tensor::cat(&ls.iter().map(|l| l.forward(x)).collect::<candle_core::Result<Vec<_>>>()?, 1)
            }
        }
    }
}

/// How the network holds its weights.
#[derive(Debug, Clone, Copy)]
pub struct WeightHandling {
    /// The compute dtype of activations and dense weights.
    pub dtype: DType,
    /// Dequantize quantized weights at load. Candle's quantized matmuls quantize activations to 8
    /// bits (as llama.cpp does), which moves logits by about 0.1: enough to flip a near tie. On a
    /// CPU host memory is plentiful and f32 weights give the exact numerics an f32 reference
    /// checks; on a GPU the weights stay quantized (4x less memory and memory traffic).
    pub dequantize: bool,
}

/// RMSNorm (weight) or LayerNorm (weight and bias), as the config says.
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        match &self.bias {
            None => candle_nn::ops::rms_norm(&x, &self.weight, self.eps),
            Some(b) => candle_nn::ops::layer_norm(&x, &self.weight, b, self.eps),
        }
    }
}

fn add_bias(x: Tensor, bias: &Option<Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => x.broadcast_add(b),
        None => Ok(x),
    }
}

enum Mlp {
    /// `gate_up` outputs `[tokens, 2 intermediate]`: gate, then up.
    GatedSilu {
        gate_up: Projection,
        down: Linear,
    },
    Relu {
        up: Linear,
        up_bias: Option<Tensor>,
        down: Linear,
        down_bias: Option<Tensor>,
    },
}

impl Mlp {
    fn forward(
        &self,
        x: &Tensor,
        intermediate: usize,
        fused: bool,
        timer: &mut phases::PhaseTimer,
    ) -> candle_core::Result<Tensor> {
        match self {
            Mlp::GatedSilu { gate_up, down } if fused => {
                let gate_up = gate_up.forward(x)?;
                timer.mark("gate_up_proj");
                let hidden = fused::silu_mul(&gate_up)?;
                timer.mark("silu_mul");
                down.forward(&hidden)
            }
            Mlp::GatedSilu { gate_up, down } => {
                let gate_up = gate_up.forward(x)?;
                let gate = gate_up.narrow(D::Minus1, 0, intermediate)?;
                let up = gate_up.narrow(D::Minus1, intermediate, intermediate)?;
                down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
            }
            Mlp::Relu { up, up_bias, down, down_bias } => {
                let hidden = add_bias(up.forward(x)?, up_bias)?.relu()?;
                add_bias(down.forward(&hidden)?, down_bias)
            }
        }
    }
}

struct Layer {
    attn_norm: Norm,
    /// Output `[tokens, q_dim + 2 kv_dim]`.
    qkv: Projection,
    qkv_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_proj: Linear,
    o_bias: Option<Tensor>,
    mlp_norm: Norm,
    mlp: Mlp,
}

pub struct Network {
    pub config: NetConfig,
    /// Positions the network serves (its RoPE tables' length).
    pub context: usize,
    pub device: Device,
    pub dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Linear,
    positions: Positions,
    /// Set on a rank of a tensor-parallel group: adds the ranks' partial sums after each
    /// layer's attention and MLP.
    collective: Option<Arc<dyn tensor_parallel::Collective>>,
    /// The rows of the vocabulary this rank's head holds, when the head is split.
    head_rows: Option<std::ops::Range<usize>>,
    /// The rows of the vocabulary this rank's embedding table holds, when it is split.
    embed_rows: Option<std::ops::Range<usize>>,
}

enum Positions {
    /// f32 RoPE tables for positions `0..context`.
    Rope { cos: Tensor, sin: Tensor },
    /// Learned embeddings, row `p` for position `p` (the offset already cut off).
    Learned(Tensor),
}

/// One sequence's part of a batch: `len` tokens starting at position `start` of the sequence
/// (its cache already holds positions `0..start`).
#[derive(Debug, Clone)]
pub struct SeqChunk {
    pub start: usize,
    pub len: usize,
    pub block_table: Vec<u32>,
    /// Whether to return logits for the chunk's last token.
    pub sample: bool,
}

/// A packed batch: `tokens[i]` belongs to the chunk that covers index `i`, in order.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub chunks: Vec<SeqChunk>,
}

fn take(weights: &mut HashMap<String, Weight>, name: &str) -> Result<Weight> {
    weights.remove(name).ok_or_else(|| NetworkError::Load(format!("checkpoint has no tensor {name}")))
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

fn optional(weights: &mut HashMap<String, Weight>, name: &str, present: bool) -> Result<Option<Weight>> {
    if present { take(weights, name).map(Some) } else { Ok(None) }
}

impl Network {
    /// Builds the network from named tensors already on `device` in `dtype` (the checkpoint
    /// pool's output). `context` bounds the positions RoPE tables are built for.
    pub fn new(
        config: NetConfig,
        mut weights: HashMap<String, Weight>,
        context: usize,
        how: WeightHandling,
        device: &Device,
    ) -> Result<Self> {
        let w = &mut weights;
        let load = NetworkError::load;
        let dtype = how.dtype;
        let embed_weight = take(w, "model.embed_tokens.weight")?;
        // A tied head multiplies by the embedding table as stored (quantized stays quantized
        // unless the handling dequantizes everything).
        let tied_head = match (&embed_weight, config.tie_word_embeddings) {
            (Weight::Quantized(q), true) if !how.dequantize => {
                Some(Linear::Quantized(QMatMul::from_arc(q.clone()).map_err(load)?))
            }
            _ => None,
        };
        let embed = embed_weight.dense(dtype).map_err(load)?;
        let dense = |w: Weight| w.dense(dtype).map_err(load);
        let dense_opt = |w: Option<Weight>| w.map(dense).transpose();
        let layer_norm = config.norm == NormKind::Layer;
        let eps = config.norm_eps as f32;
        let norm = |w: &mut HashMap<String, Weight>, prefix: &str| -> Result<Norm> {
            Ok(Norm {
                weight: dense(take(w, &format!("{prefix}.weight"))?)?,
                bias: dense_opt(optional(w, &format!("{prefix}.bias"), layer_norm)?)?,
                eps,
            })
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}.");
            let attn_norm = norm(w, &format!("{p}input_layernorm"))?;
            let mlp_norm = norm(w, &format!("{p}post_attention_layernorm"))?;
            let mut t = |name: &str| take(w, &format!("{p}{name}"));
            let qkv = Projection::new(
                vec![t("self_attn.q_proj.weight")?, t("self_attn.k_proj.weight")?, t("self_attn.v_proj.weight")?],
                &how,
            )
            .map_err(load)?;
            let qkv_bias = if config.qkv_bias {
                let parts = [t("self_attn.q_proj.bias")?, t("self_attn.k_proj.bias")?, t("self_attn.v_proj.bias")?];
                let parts = parts.into_iter().map(dense).collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&parts, 0).map_err(load)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if config.qk_norm {
                (Some(dense(t("self_attn.q_norm.weight")?)?), Some(dense(t("self_attn.k_norm.weight")?)?))
            } else {
                (None, None)
            };
            let o_proj = Linear::new(t("self_attn.o_proj.weight")?, &how).map_err(load)?;
            let mut bias = |name: &str| -> Result<Option<Tensor>> {
                dense_opt(optional(w, &format!("{p}{name}"), config.dense_bias)?)
            };
            let o_bias = bias("self_attn.o_proj.bias")?;
            let mlp = match config.mlp {
                MlpKind::GatedSilu => Mlp::GatedSilu {
                    gate_up: Projection::new(
                        vec![
                            take(w, &format!("{p}mlp.gate_proj.weight"))?,
                            take(w, &format!("{p}mlp.up_proj.weight"))?,
                        ],
                        &how,
                    )
                    .map_err(load)?,
                    down: Linear::new(take(w, &format!("{p}mlp.down_proj.weight"))?, &how).map_err(load)?,
                },
                MlpKind::Relu => {
                    let (up_bias, down_bias) = (bias("mlp.up_proj.bias")?, bias("mlp.down_proj.bias")?);
                    Mlp::Relu {
                        up: Linear::new(take(w, &format!("{p}mlp.up_proj.weight"))?, &how).map_err(load)?,
                        up_bias,
                        down: Linear::new(take(w, &format!("{p}mlp.down_proj.weight"))?, &how).map_err(load)?,
                        down_bias,
                    }
                }
            };
            layers.push(Layer { attn_norm, qkv, qkv_bias, q_norm, k_norm, o_proj, o_bias, mlp_norm, mlp });
        }
        let norm = norm(w, "model.norm")?;
        let lm_head = match tied_head {
            Some(head) => head,
            None if config.tie_word_embeddings => Linear::Dense(embed.clone()),
            None => Linear::new(take(w, "lm_head.weight")?, &how).map_err(load)?,
        };
        let positions = match config.positions {
            PositionKind::Rope => {
                let (cos, sin) = rope::tables(&config, context, device).map_err(load)?;
                Positions::Rope { cos, sin }
            }
            PositionKind::Learned { offset } => {
                let table = dense(take(w, "model.embed_positions.weight")?)?;
                let rows = table.dim(0).map_err(load)?;
                Positions::Learned(table.narrow(0, offset, rows - offset).map_err(load)?)
            }
        };
        Ok(Self {
            config,
            context,
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            positions,
            collective: None,
            head_rows: None,
            embed_rows: None,
        })
    }

    /// One rank of a tensor-parallel group (`tensor_parallel`) from this rank's parts of the
    /// weights (`Shard::part`: the checkpoint pool loads just those, `Shard::slice_all` cuts them
    /// from the whole model's): built with `shard.local_config(&config)` as its
    /// config, adding its partial sums to the other ranks' through `collective`. Every rank must
    /// run the same steps in the same order.
    pub fn new_rank(
        config: NetConfig,
        weights: HashMap<String, Weight>,
        context: usize,
        how: WeightHandling,
        device: &Device,
        shard: tensor_parallel::Shard,
        collective: Arc<dyn tensor_parallel::Collective>,
    ) -> Result<Self> {
        let mut network = Self::new(shard.local_config(&config)?, weights, context, how, device)?;
        network.collective = Some(collective);
        // The tables given split (`Shard::part`) hold the rows `vocab_rows` names.
        if let Some(rows) = shard.vocab_rows(config.vocab_size) {
            let holds_part = |t: &Tensor| t.dim(0).is_ok_and(|n| n == rows.len());
            if holds_part(&network.embed) {
                network.embed_rows = Some(rows.clone());
            }
            if let Linear::Dense(head) = &network.lm_head
                && holds_part(head)
            {
                network.head_rows = Some(rows);
            }
        }
        Ok(network)
    }

    /// Each token's embedding. With the table split over ranks (`embed_rows`), a rank looks up
    /// the tokens in its part and gives zeros for the others; the sum over the ranks is the
    /// lookup.
    fn embed_tokens(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let Some(rows) = &self.embed_rows else { return self.embed.index_select(tokens, 0) };
        let (start, end) = (rows.start as u32, rows.end as u32);
        let inside = tokens.ge(start)?.mul(&tokens.lt(end)?)?;
        let first = Tensor::full(start, tokens.shape(), tokens.device())?;
        // Outside the part, the part's first row stands in (then zeroed), so nothing underflows.
        let local = (inside.where_cond(tokens, &first)? - first)?;
        let found = self.embed.index_select(&local, 0)?;
        self.all_ranks(found.broadcast_mul(&inside.to_dtype(found.dtype())?.unsqueeze(1)?)?)
    }

    /// Logits over the whole vocabulary from this rank's `part` of them (its `head_rows`): placed
    /// among zeros and summed over the ranks, which adds nothing but the other ranks' parts.
    fn whole_vocabulary(&self, part: Tensor) -> candle_core::Result<Tensor> {
        let Some(rows) = &self.head_rows else { return Ok(part) };
        let (n, vocab) = (part.dim(0)?, self.config.vocab_size);
        let (dtype, device) = (part.dtype(), part.device().clone());
        let zeros = |len| Tensor::zeros((n, len), dtype, &device);
        let placed = Tensor::cat(&[zeros(rows.start)?, part, zeros(vocab - rows.end)?], 1)?;
        self.all_ranks(placed)
    }

    /// The sum of every rank's `partial` (itself when the network is not sharded).
    fn all_ranks(&self, partial: Tensor) -> candle_core::Result<Tensor> {
        match &self.collective {
            Some(c) => c.all_reduce_sum(&partial),
            None => Ok(partial),
        }
    }

    /// Runs one step over a packed batch, writing each token's K and V into `kv` at its slot.
    /// Returns f32 logits `[sampled chunks, vocab]`, one row per chunk with `sample`, in order.
    pub fn forward(&self, batch: &Batch, kv: &KvStorage) -> Result<Tensor> {
        let planned = || {
            let plan = attention::StepPlan::new(batch, &self.config, &self.device)?;
            let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
            self.forward_planned(&tokens, &plan, kv)
        };
        planned().map_err(NetworkError::runtime)
    }

    /// The forward pass over inputs already on the device: `tokens` `[tokens]` and the step's
    /// plan. Launches work only: no host sync, and no host-to-device copy but the shapes and
    /// strides candle uploads for strided ops, which a graph capture takes from candle's cache
    /// (`graphs`), so a CUDA graph can capture it.
    pub(crate) fn forward_planned(
        &self,
        tokens: &Tensor,
        plan: &attention::StepPlan,
        kv: &KvStorage,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let fused = fused::applies(&self.device);
        let mut timer = phases::PhaseTimer::start(&self.device, tokens.dim(0)?);
        let mut x = self.embed_tokens(tokens)?;
        if let Positions::Learned(table) = &self.positions {
            x = (x + table.index_select(&plan.positions, 0)?)?;
        }
        // What the unfused q/k/v path needs for every layer (the fused kernel reads the RoPE
        // tables and the slots itself).
        let unfused = if fused { None } else { Some(UnfusedStep::new(plan, &self.positions, c)?) };
        // Each block's output waits here to be added to the residual stream by the next norm,
        // so the add and the norm can run as one kernel.
        let mut delta: Option<Tensor> = None;
        timer.mark("embed");
        for (l, layer) in self.layers.iter().enumerate() {
            let h = add_norm(&mut x, delta.take(), &layer.attn_norm, fused)?;
            timer.mark("norm");
            let qkv = layer.qkv.forward(&h)?;
            timer.mark("qkv_proj");
            let q = match &unfused {
                None => fused::qkv_rope_cache(&qkv, &kv.k[l], &kv.v[l], &self.qkv_args(layer, plan))?,
                Some(step) => self.qkv_unfused(layer, qkv, step, kv, l)?,
            };
            timer.mark("rope_cache");
            let attn = attention::paged(&q, &kv.k[l], &kv.v[l], plan, c)?;
            timer.mark("attention");
            let o = self.all_ranks(add_bias(layer.o_proj.forward(&attn)?, &layer.o_bias)?)?;
            timer.mark("o_proj");
            let h = add_norm(&mut x, Some(o), &layer.mlp_norm, fused)?;
            timer.mark("norm");
            delta = Some(self.all_ranks(layer.mlp.forward(&h, c.intermediate_size, fused, &mut timer)?)?);
            timer.mark("down_proj");
        }
        let logits = if plan.samples == 0 {
            Tensor::zeros((0, c.vocab_size), DType::F32, &self.device)?
        } else {
            let mut last = x.index_select(&plan.sample_rows, 0)?;
            if let Some(d) = delta {
                last = (last + d.index_select(&plan.sample_rows, 0)?)?;
            }
            self.whole_vocabulary(self.lm_head.forward(&self.norm.forward(&last)?)?)?.to_dtype(DType::F32)?
        };
        timer.mark("lm_head");
        timer.finish();
        Ok(logits)
    }

    fn qkv_args(&self, layer: &Layer, plan: &attention::StepPlan) -> fused::QkvArgs {
        fused::QkvArgs {
            heads: self.config.num_heads,
            bias: layer.qkv_bias.clone(),
            norms: layer.q_norm.clone().zip(layer.k_norm.clone()),
            rope: match &self.positions {
                Positions::Rope { cos, sin } => Some((cos.clone(), sin.clone())),
                Positions::Learned(_) => None,
            },
            interleaved: self.config.rope_interleaved,
            positions: plan.positions.clone(),
            slots: plan.slots.clone(),
            eps: self.config.norm_eps as f32,
        }
    }

    /// q/k/v split, bias, q/k norms and RoPE as separate ops; k and v scattered into the cache.
    fn qkv_unfused(
        &self,
        layer: &Layer,
        qkv: Tensor,
        step: &UnfusedStep,
        kv: &KvStorage,
        l: usize,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let n = qkv.dim(0)?;
        let qkv = add_bias(qkv, &layer.qkv_bias)?;
        let q = qkv.narrow(1, 0, c.q_dim())?.reshape((n, c.num_heads, c.head_dim))?;
        let k = qkv.narrow(1, c.q_dim(), c.kv_dim())?.reshape((n, c.num_kv_heads, c.head_dim))?;
        let v = qkv.narrow(1, c.q_dim() + c.kv_dim(), c.kv_dim())?.reshape((n, c.num_kv_heads, c.head_dim))?;
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => (rms_norm(&q, qn, c.norm_eps)?, rms_norm(&k, kn, c.norm_eps)?),
            _ => (q, k),
        };
        let (q, k) = match &step.angles {
            Some((cos, sin)) => {
                (rope::apply(&q, cos, sin, c.rope_interleaved)?, rope::apply(&k, cos, sin, c.rope_interleaved)?)
            }
            None => (q.contiguous()?, k),
        };
        // The cache is head-major: [kv_heads, slots, hd].
        kv.k[l].scatter_set(&step.write_slots, &k.transpose(0, 1)?.contiguous()?, 1)?;
        kv.v[l].scatter_set(&step.write_slots, &v.transpose(0, 1)?.contiguous()?, 1)?;
        Ok(q)
    }
}

/// Per-step inputs of the unfused q/k/v path, shared by every layer.
struct UnfusedStep {
    /// cos and sin of each packed token's position (RoPE families).
    angles: Option<(Tensor, Tensor)>,
    /// Each token's cache slot broadcast to `[kv_heads, tokens, head_dim]` for `scatter_set`.
    write_slots: Tensor,
}

impl UnfusedStep {
    fn new(plan: &attention::StepPlan, positions: &Positions, c: &NetConfig) -> candle_core::Result<Self> {
        let angles = match positions {
            Positions::Rope { cos, sin } => {
                Some((cos.index_select(&plan.positions, 0)?, sin.index_select(&plan.positions, 0)?))
            }
            Positions::Learned(_) => None,
        };
        let n = plan.slots.dim(0)?;
        let write_slots = plan.slots.reshape((1, n, 1))?.broadcast_as((c.num_kv_heads, n, c.head_dim))?.contiguous()?;
        Ok(Self { angles, write_slots })
    }
}

/// Adds a block's output to the residual stream `x` (when there is one) and normalises the sum;
/// one kernel on a GPU for RMSNorm.
fn add_norm(x: &mut Tensor, delta: Option<Tensor>, norm: &Norm, fused: bool) -> candle_core::Result<Tensor> {
    match delta {
        None => norm.forward(x),
        Some(d) if fused && norm.bias.is_none() => {
            let (sum, normed) = fused::add_rms_norm(x, &d, &norm.weight, norm.eps)?;
            *x = sum;
            Ok(normed)
        }
        Some(d) => {
            *x = (&*x + d)?;
            norm.forward(x)
        }
    }
}

/// Networks with random weights for tests: real shapes and code paths, no checkpoint files.
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::{NetConfig, Weight, WeightHandling};

    pub const F32: WeightHandling = WeightHandling { dtype: DType::F32, dequantize: true };

    /// A 2-layer config of `model_type`: 4 heads of 16, 2 K/V heads, intermediate 96, `extra`
    /// merged over it.
    pub fn config(model_type: &str, extra: serde_json::Value) -> NetConfig {
        let mut v = serde_json::json!({
            "model_type": model_type, "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "head_dim": 16,
        });
        if model_type == "opt" {
            v["ffn_dim"] = 96.into();
            v["do_layer_norm_before"] = true.into();
            v["word_embed_proj_dim"] = 64.into();
            v["activation_function"] = "relu".into();
        }
        for (key, value) in extra.as_object().into_iter().flatten() {
            v[key] = value.clone();
        }
        NetConfig::from_hf_json(&v.to_string()).unwrap()
    }

    pub fn random_weights(c: &NetConfig) -> HashMap<String, Tensor> {
        c.expected_tensors()
            .into_iter()
            .map(|(name, shape)| (name, Tensor::randn(0f32, 0.3, shape, &Device::Cpu).unwrap()))
            .collect()
    }

    pub fn dense(weights: &HashMap<String, Tensor>) -> HashMap<String, Weight> {
        weights.iter().map(|(n, t)| (n.clone(), Weight::Dense(t.clone()))).collect()
    }
}
