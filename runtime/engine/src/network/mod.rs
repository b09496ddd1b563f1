//! Our llama-family network (llama incl. Llama 3.1 RoPE scaling, qwen2, qwen3, mistral), written
//! for a batching engine: one forward pass takes the tokens of many sequences packed together
//! (a decode token for some, a prefill chunk for others), runs every projection once over the
//! whole pack, writes K and V straight into the paged cache and attends per sequence over its
//! blocks. q/k/v and gate/up projections are fused at load; grouped-query attention reads the
//! shared K/V heads without copying them per query head; RoPE is computed in f32.

pub mod attention;
pub mod config;
pub mod rope;

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::kv_cache::KvStorage;
pub use config::{ARCHITECTURES, ArchSpec, Architecture, NetConfig};

struct Layer {
    attn_norm: Tensor,
    /// `[q_dim + 2 kv_dim, hidden]`.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_proj: Tensor,
    mlp_norm: Tensor,
    /// `[2 intermediate, hidden]`: gate rows, then up rows.
    gate_up: Tensor,
    down: Tensor,
}

pub struct Network {
    pub config: NetConfig,
    pub device: Device,
    pub dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// f32 RoPE tables for positions `0..context`.
    cos: Tensor,
    sin: Tensor,
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
#[derive(Debug, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub chunks: Vec<SeqChunk>,
}

fn take(weights: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    weights.remove(name).ok_or_else(|| EngineError::Load(format!("checkpoint has no tensor {name}")))
}

fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

impl Network {
    /// Builds the network from named tensors already on `device` in `dtype` (the checkpoint
    /// pool's output). `context` bounds the positions RoPE tables are built for.
    pub fn new(
        config: NetConfig,
        mut weights: HashMap<String, Tensor>,
        context: usize,
        device: &Device,
    ) -> Result<Self> {
        let w = &mut weights;
        let embed = take(w, "model.embed_tokens.weight")?;
        let dtype = embed.dtype();
        let fuse = |parts: &[Tensor]| Tensor::cat(parts, 0).map_err(EngineError::load);
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}.");
            let mut t = |name: &str| take(w, &format!("{p}{name}"));
            let qkv =
                fuse(&[t("self_attn.q_proj.weight")?, t("self_attn.k_proj.weight")?, t("self_attn.v_proj.weight")?])?;
            let qkv_bias = if config.qkv_bias {
                Some(fuse(&[t("self_attn.q_proj.bias")?, t("self_attn.k_proj.bias")?, t("self_attn.v_proj.bias")?])?)
            } else {
                None
            };
            let (q_norm, k_norm) = if config.qk_norm {
                (Some(t("self_attn.q_norm.weight")?), Some(t("self_attn.k_norm.weight")?))
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: t("input_layernorm.weight")?,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o_proj: t("self_attn.o_proj.weight")?,
                mlp_norm: t("post_attention_layernorm.weight")?,
                gate_up: fuse(&[t("mlp.gate_proj.weight")?, t("mlp.up_proj.weight")?])?,
                down: t("mlp.down_proj.weight")?,
            });
        }
        let norm = take(w, "model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings { embed.clone() } else { take(w, "lm_head.weight")? };
        let (cos, sin) = rope::tables(&config, context, device).map_err(EngineError::load)?;
        Ok(Self { config, device: device.clone(), dtype, embed, layers, norm, lm_head, cos, sin })
    }

    /// Runs one step over a packed batch, writing each token's K and V into `kv` at its slot.
    /// Returns f32 logits `[sampled chunks, vocab]`, one row per chunk with `sample`, in order.
    pub fn forward(&self, batch: &Batch, kv: &KvStorage) -> Result<Tensor> {
        self.forward_inner(batch, kv).map_err(EngineError::runtime)
    }

    fn forward_inner(&self, batch: &Batch, kv: &KvStorage) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let n = batch.tokens.len();
        let plan = attention::StepPlan::new(batch, c, &self.device)?;
        let cos = self.cos.index_select(&plan.positions, 0)?;
        let sin = self.sin.index_select(&plan.positions, 0)?;
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&tokens, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_norm_eps)?;
            let mut qkv = linear(&h, &layer.qkv)?;
            if let Some(b) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(b)?;
            }
            let q = qkv.narrow(1, 0, c.q_dim())?.reshape((n, c.num_heads, c.head_dim))?;
            let k = qkv.narrow(1, c.q_dim(), c.kv_dim())?.reshape((n, c.num_kv_heads, c.head_dim))?;
            let v = qkv.narrow(1, c.q_dim() + c.kv_dim(), c.kv_dim())?.contiguous()?;
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (rms_norm(&q, qn, c.rms_norm_eps)?, rms_norm(&k, kn, c.rms_norm_eps)?),
                _ => (q, k),
            };
            let q = rope::apply(&q, &cos, &sin)?;
            let k = rope::apply(&k, &cos, &sin)?.reshape((n, c.kv_dim()))?;
            kv.k[l].scatter_set(&plan.write_slots, &k, 0)?;
            kv.v[l].scatter_set(&plan.write_slots, &v, 0)?;
            let attn = attention::paged(&q, &kv.k[l], &kv.v[l], &plan, c)?;
            x = (x + linear(&attn, &layer.o_proj)?)?;
            let h = rms_norm(&x, &layer.mlp_norm, c.rms_norm_eps)?;
            let gate_up = linear(&h, &layer.gate_up)?;
            let gate = gate_up.narrow(D::Minus1, 0, c.intermediate_size)?;
            let up = gate_up.narrow(D::Minus1, c.intermediate_size, c.intermediate_size)?;
            x = (x + linear(&(candle_nn::ops::silu(&gate)? * up)?, &layer.down)?)?;
        }
        if plan.samples == 0 {
            return Tensor::zeros((0, c.vocab_size), DType::F32, &self.device);
        }
        let last = x.index_select(&plan.sample_rows, 0)?;
        let last = rms_norm(&last, &self.norm, c.rms_norm_eps)?;
        linear(&last, &self.lm_head)?.to_dtype(DType::F32)
    }
}
