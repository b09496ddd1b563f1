//! A loaded network of one of the supported families, driven one sequence at a time.

use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};

use crate::checkpoint::{Architecture, Checkpoint};
use crate::error::{EngineError, Result};

enum Network {
    Llama {
        model: llama::Llama,
        /// A fresh cache (rotary tables computed once); cloned per sequence, which is cheap.
        empty_cache: llama::Cache,
        cache: Option<llama::Cache>,
    },
    Qwen2(qwen2::ModelForCausalLM),
}

pub struct LoadedModel {
    network: Network,
    device: Device,
    pub max_positions: usize,
}

/// The compute dtype for a device: f32 on CPU (fast kernels there), bf16 on accelerators.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() { DType::F32 } else { DType::BF16 }
}

/// Fills the optional Qwen2 fields that some exported configs leave out with HF's defaults.
fn qwen2_config(config_json: &str) -> Result<qwen2::Config> {
    let mut v: serde_json::Value =
        serde_json::from_str(config_json).map_err(|e| EngineError::Load(format!("config.json: {e}")))?;
    let layers = v["num_hidden_layers"].clone();
    let max_pos = v["max_position_embeddings"].clone();
    let obj = v.as_object_mut().ok_or_else(|| EngineError::Load("config.json is not an object".into()))?;
    for (key, default) in [
        ("sliding_window", max_pos),
        ("max_window_layers", layers),
        ("use_sliding_window", false.into()),
        ("tie_word_embeddings", false.into()),
        ("rope_theta", 10000.0.into()),
        ("rms_norm_eps", 1e-6.into()),
        ("hidden_act", "silu".into()),
    ] {
        if obj.get(key).is_none_or(|v| v.is_null()) {
            obj.insert(key.to_string(), default);
        }
    }
    if obj.get("num_key_value_heads").is_none_or(|v| v.is_null()) {
        let heads = obj["num_attention_heads"].clone();
        obj.insert("num_key_value_heads".into(), heads);
    }
    serde_json::from_value(v).map_err(|e| EngineError::Load(format!("config.json: {e}")))
}

impl LoadedModel {
    /// Builds the network from an already-checked checkpoint. `vb` supplies the weights, so the
    /// caller decides where they come from (mmapped files, a pinned pool, ...).
    pub fn from_var_builder(ckpt: &Checkpoint, vb: VarBuilder, device: &Device) -> Result<Self> {
        let dtype = vb.dtype();
        // candle's loaders unwrap internally; the shape check in `Checkpoint::open` should make a
        // panic impossible, and this turns any that remains into an error instead of a dead thread.
        let built = catch_unwind(AssertUnwindSafe(|| -> Result<Network> {
            match ckpt.arch {
                Architecture::Llama => {
                    let cfg: llama::LlamaConfig = serde_json::from_str(&ckpt.config_json)
                        .map_err(|e| EngineError::Load(format!("config.json: {e}")))?;
                    let cfg = cfg.into_config(false);
                    let model = llama::Llama::load(vb, &cfg).map_err(EngineError::load)?;
                    let empty_cache = llama::Cache::new(true, dtype, &cfg, device).map_err(EngineError::load)?;
                    Ok(Network::Llama { model, empty_cache, cache: None })
                }
                Architecture::Qwen2 => {
                    let cfg = qwen2_config(&ckpt.config_json)?;
                    let model = qwen2::ModelForCausalLM::new(&cfg, vb).map_err(EngineError::load)?;
                    Ok(Network::Qwen2(model))
                }
            }
        }))
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "loader panicked".into());
            EngineError::Load(msg)
        })??;
        Ok(Self { network: built, device: device.clone(), max_positions: ckpt.config.max_position_embeddings })
    }

    /// Loads straight from the checkpoint's mmapped safetensors files.
    pub fn load_mmapped(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        // SAFETY: the files were opened and validated by `Checkpoint::open`; see its note on mmap.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&ckpt.weight_files, compute_dtype(device), device) }
            .map_err(EngineError::load)?;
        Self::from_var_builder(ckpt, vb, device)
    }

    /// Forgets the previous sequence's KV cache.
    pub fn begin_sequence(&mut self) {
        match &mut self.network {
            Network::Llama { empty_cache, cache, .. } => *cache = Some(empty_cache.clone()),
            Network::Qwen2(model) => model.clear_kv_cache(),
        }
    }

    /// Feeds `tokens` at position `pos` of the current sequence; returns the next-token logits (f32, [vocab]).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor> {
        let input = Tensor::new(tokens, &self.device).and_then(|t| t.unsqueeze(0)).map_err(EngineError::runtime)?;
        let logits = match &mut self.network {
            Network::Llama { model, empty_cache, cache } => {
                let cache = cache.get_or_insert_with(|| empty_cache.clone());
                model.forward(&input, pos, cache)
            }
            Network::Qwen2(model) => model.forward(&input, pos),
        };
        logits.and_then(|l| l.flatten_all()).and_then(|l| l.to_dtype(DType::F32)).map_err(EngineError::runtime)
    }
}
