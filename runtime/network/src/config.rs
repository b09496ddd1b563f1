//! The decoder-only families as one table: which `model_type`s we run, how each maps its
//! `config.json` onto one `NetConfig`, how its checkpoints name their tensors, and the tensors
//! (with shapes) that config implies. Adding a family member means one row in `ARCHITECTURES`
//! and, if it brings a new feature, one flag here; the checkpoint checks, the network, the
//! tiny-model writer and the warm-up all read this.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{NetworkError, Result};

/// The model families this engine can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
    Opt,
}

/// How activations are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm with a weight (the llama family).
    Rms,
    /// LayerNorm with a weight and a bias (OPT).
    Layer,
}

/// Where a token's position enters the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    /// Rotary embeddings on q and k.
    Rope,
    /// A learned table added to the token embeddings; position `p` reads row `p + offset` (OPT
    /// keeps two rows for padding).
    Learned { offset: usize },
}

/// The feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(silu(gate(x)) * up(x))`, no biases (the llama family).
    GatedSilu,
    /// `down(relu(up(x) + b) ) + b` (OPT's fc1/fc2).
    Relu,
}

/// What distinguishes one family member from another, as data.
#[derive(Debug, Clone, Copy)]
pub struct ArchSpec {
    pub arch: Architecture,
    /// `model_type` in config.json.
    pub model_type: &'static str,
    /// The HF class name written into tiny models' `architectures`.
    pub hf_class: &'static str,
    /// q/k/v projections carry a bias (qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (qwen3).
    pub qk_norm: bool,
    /// `sliding_window` in config.json is honoured without a `use_sliding_window` switch (mistral).
    pub sliding_window_always: bool,
    pub norm: NormKind,
    pub positions: PositionKind,
    pub mlp: MlpKind,
    /// The attention output and MLP projections carry biases (OPT).
    pub dense_bias: bool,
    /// config.json's key for the MLP width.
    pub intermediate_key: &'static str,
    /// The norm epsilon when config.json has none.
    pub default_norm_eps: f64,
    /// `tie_word_embeddings` when config.json omits it (the HF config class's default).
    pub default_tied: bool,
    /// How checkpoints name tensors that our names (the llama family's) call otherwise.
    pub naming: Naming,
}

/// (ours, the checkpoint's) name rewrites: `prefixes` apply to the start of a whole name
/// (`model.layers.` among them), `layer_parts` to what follows `model.layers.N.`.
#[derive(Debug, Clone, Copy)]
pub struct Naming {
    pub prefixes: &'static [(&'static str, &'static str)],
    pub layer_parts: &'static [(&'static str, &'static str)],
}

const HF_NAMES: Naming = Naming { prefixes: &[], layer_parts: &[] };

impl Naming {
    fn rewrite(&self, name: &str, to_checkpoint: bool) -> String {
        let pick = |&(ours, theirs): &(&'static str, &'static str)| {
            if to_checkpoint { (ours, theirs) } else { (theirs, ours) }
        };
        for pair in self.prefixes {
            let (from, to) = pick(pair);
            let Some(rest) = name.strip_prefix(from) else { continue };
            if pair.0 != "model.layers." {
                return format!("{to}{rest}");
            }
            let Some((index, part)) = rest.split_once('.') else { return format!("{to}{rest}") };
            let part = self
                .layer_parts
                .iter()
                .map(pick)
                .find_map(|(f, t)| part.strip_prefix(f).map(|tail| format!("{t}{tail}")))
                .unwrap_or_else(|| part.to_string());
            return format!("{to}{index}.{part}");
        }
        name.to_string()
    }

    /// Our name for a checkpoint's tensor. Checkpoints saved from the base model (no `model.`
    /// prefix, as facebook/opt-125m's are) are read as HF's loader reads them.
    pub fn ours(&self, checkpoint_name: &str) -> String {
        let full = if checkpoint_name.starts_with("model.") || checkpoint_name.starts_with("lm_head.") {
            checkpoint_name.to_string()
        } else {
            format!("model.{checkpoint_name}")
        };
        self.rewrite(&full, false)
    }

    /// The checkpoint's name for one of ours (what the tiny-model writer writes).
    pub fn theirs(&self, our_name: &str) -> String {
        self.rewrite(our_name, true)
    }
}

const LLAMA_FAMILY: ArchSpec = ArchSpec {
    arch: Architecture::Llama,
    model_type: "llama",
    hf_class: "LlamaForCausalLM",
    qkv_bias: false,
    qk_norm: false,
    sliding_window_always: false,
    norm: NormKind::Rms,
    positions: PositionKind::Rope,
    mlp: MlpKind::GatedSilu,
    dense_bias: false,
    intermediate_key: "intermediate_size",
    default_norm_eps: 1e-6,
    default_tied: false,
    naming: HF_NAMES,
};

pub const ARCHITECTURES: [ArchSpec; 5] = [
    LLAMA_FAMILY,
    ArchSpec {
        arch: Architecture::Qwen2,
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        qkv_bias: true,
        ..LLAMA_FAMILY
    },
    ArchSpec {
        arch: Architecture::Qwen3,
        model_type: "qwen3",
        hf_class: "Qwen3ForCausalLM",
        qk_norm: true,
        ..LLAMA_FAMILY
    },
    ArchSpec {
        arch: Architecture::Mistral,
        model_type: "mistral",
        hf_class: "MistralForCausalLM",
        sliding_window_always: true,
        ..LLAMA_FAMILY
    },
    // facebook/opt-*: pre-LayerNorm, learned positions, ReLU MLP, biases everywhere.
    ArchSpec {
        arch: Architecture::Opt,
        model_type: "opt",
        hf_class: "OPTForCausalLM",
        qkv_bias: true,
        norm: NormKind::Layer,
        positions: PositionKind::Learned { offset: 2 },
        mlp: MlpKind::Relu,
        dense_bias: true,
        intermediate_key: "ffn_dim",
        default_norm_eps: 1e-5,
        default_tied: true,
        naming: Naming {
            prefixes: &[
                ("model.embed_tokens.", "model.decoder.embed_tokens."),
                ("model.embed_positions.", "model.decoder.embed_positions."),
                ("model.norm.", "model.decoder.final_layer_norm."),
                ("model.layers.", "model.decoder.layers."),
            ],
            layer_parts: &[
                ("input_layernorm.", "self_attn_layer_norm."),
                ("post_attention_layernorm.", "final_layer_norm."),
                ("self_attn.o_proj.", "self_attn.out_proj."),
                ("mlp.up_proj.", "fc1."),
                ("mlp.down_proj.", "fc2."),
            ],
        },
        ..LLAMA_FAMILY
    },
];

impl Architecture {
    pub const ALL: [Architecture; 5] = [Self::Llama, Self::Qwen2, Self::Qwen3, Self::Mistral, Self::Opt];

    pub fn spec(self) -> &'static ArchSpec {
        ARCHITECTURES.iter().find(|s| s.arch == self).expect("every architecture has a row")
    }

    pub fn name(self) -> &'static str {
        self.spec().model_type
    }

    pub fn from_model_type(model_type: &str) -> Result<Self> {
        ARCHITECTURES.iter().find(|s| s.model_type == model_type).map(|s| s.arch).ok_or_else(|| {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|s| s.model_type).collect();
            NetworkError::Load(format!(
                "unsupported model_type {model_type:?} in config.json (supported: {})",
                known.join(", ")
            ))
        })
    }
}

/// Llama 3.1's long-context frequency scaling (HF `rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything the network needs from `config.json`, normalised across the family.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub positions: PositionKind,
    pub mlp: MlpKind,
    /// The attention output and MLP projections carry biases.
    pub dense_bias: bool,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// RoPE rotates adjacent pairs (llama.cpp's layout: its converter permutes Q/K rows so) rather
    /// than the two halves of each head (HF's rotate_half).
    pub rope_interleaved: bool,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// Each token attends to at most this many most recent positions (itself included).
    pub sliding_window: Option<usize>,
    pub eos_token_id: Option<Value>,
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_field(v: &Value, key: &str) -> Result<Option<usize>> {
    match field(v, key) {
        None => Ok(None),
        Some(x) => {
            x.as_u64().and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| {
                NetworkError::Load(format!("config.json: {key} must be a non-negative integer, got {x}"))
            })
        }
    }
}

fn required(v: &Value, key: &str) -> Result<usize> {
    let n = usize_field(v, key)?.ok_or_else(|| NetworkError::Load(format!("config.json: {key} is missing")))?;
    if n == 0 {
        return Err(NetworkError::Load(format!("config.json: {key} must be positive")));
    }
    Ok(n)
}

fn f64_field(v: &Value, key: &str, default: f64) -> Result<f64> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| NetworkError::Load(format!("config.json: {key} must be a positive number, got {x}"))),
    }
}

fn rope_scaling(v: &Value) -> Result<Option<Llama3RopeScaling>> {
    let Some(s) = field(v, "rope_scaling") else { return Ok(None) };
    let kind = field(s, "rope_type").or_else(|| field(s, "type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(Llama3RopeScaling {
            factor: f64_field(s, "factor", 8.0)?,
            low_freq_factor: f64_field(s, "low_freq_factor", 1.0)?,
            high_freq_factor: f64_field(s, "high_freq_factor", 4.0)?,
            original_max_position_embeddings: required(s, "original_max_position_embeddings")?,
        })),
        other => Err(NetworkError::Load(format!(
            "config.json: rope_scaling type {other:?} is not supported (supported: llama3)"
        ))),
    }
}

/// The OPT variants our network does not implement are named rather than run wrong: post-LN
/// (opt-350m), a projected embedding width (opt-350m), other activations, no biases.
fn check_opt_variant(v: &Value, hidden_size: usize) -> Result<()> {
    let unsupported = |what: String| Err(NetworkError::Load(format!("config.json: {what} is not supported")));
    if field(v, "do_layer_norm_before").and_then(Value::as_bool) == Some(false) {
        return unsupported("OPT with do_layer_norm_before = false (post-LayerNorm, as opt-350m)".into());
    }
    if let Some(width) = usize_field(v, "word_embed_proj_dim")?
        && width != hidden_size
    {
        return unsupported(format!("OPT with word_embed_proj_dim {width} != hidden_size {hidden_size}"));
    }
    if let Some(act) = field(v, "activation_function").and_then(Value::as_str)
        && act != "relu"
    {
        return unsupported(format!("OPT activation_function {act:?} (supported: relu)"));
    }
    for flag in ["enable_bias", "layer_norm_elementwise_affine"] {
        if field(v, flag).and_then(Value::as_bool) == Some(false) {
            return unsupported(format!("OPT with {flag} = false"));
        }
    }
    Ok(())
}

impl NetConfig {
    /// Parses and checks an HF `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| NetworkError::Load(format!("config.json: {e}")))?;
        if !v.is_object() {
            return Err(NetworkError::Load("config.json is not an object".into()));
        }
        let model_type = field(&v, "model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| NetworkError::Load("config.json: model_type is missing".into()))?;
        let spec = Architecture::from_model_type(model_type)?.spec();
        let hidden_size = required(&v, "hidden_size")?;
        let num_heads = required(&v, "num_attention_heads")?;
        let num_kv_heads = usize_field(&v, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match usize_field(&v, "head_dim")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(NetworkError::Load(format!(
                    "config.json: hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                )));
            }
        };
        let use_window =
            spec.sliding_window_always || field(&v, "use_sliding_window").and_then(Value::as_bool) == Some(true);
        if spec.arch == Architecture::Opt {
            check_opt_variant(&v, hidden_size)?;
        }
        let config = Self {
            arch: spec.arch,
            vocab_size: required(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: required(&v, spec.intermediate_key)?,
            num_layers: required(&v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: required(&v, "max_position_embeddings")?,
            norm: spec.norm,
            norm_eps: f64_field(&v, "rms_norm_eps", spec.default_norm_eps)?,
            positions: spec.positions,
            mlp: spec.mlp,
            dense_bias: spec.dense_bias,
            rope_theta: f64_field(&v, "rope_theta", 10000.0)?,
            rope_scaling: rope_scaling(&v)?,
            rope_interleaved: false,
            tie_word_embeddings: field(&v, "tie_word_embeddings").and_then(Value::as_bool).unwrap_or(spec.default_tied),
            qkv_bias: spec.qkv_bias,
            qk_norm: spec.qk_norm,
            sliding_window: if use_window { usize_field(&v, "sliding_window")? } else { None },
            eos_token_id: field(&v, "eos_token_id").cloned(),
        };
        config.check()?;
        Ok(config)
    }

    /// Refuses shapes the network cannot be built with (heads that do not divide, a zero size...).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(NetworkError::Load(format!("config.json: {m}")));
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || (self.positions == PositionKind::Rope && !self.head_dim.is_multiple_of(2)) {
            return bad(format!("head_dim {} must be positive and even (RoPE rotates pairs)", self.head_dim));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        // Guards against configs whose products overflow or would ask for absurd allocations.
        let params = [self.vocab_size, self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim]
            .iter()
            .try_fold(1u128, |acc, &x| acc.checked_mul(x as u128));
        if params.is_none_or(|p| p > 1u128 << 80) || self.max_position_embeddings > 1 << 24 {
            return bad("sizes are out of any supported range".into());
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Every tensor the network reads (by our names), with the shape this config implies.
    pub fn expected_tensors(&self) -> BTreeMap<String, Vec<usize>> {
        let (h, i, v, q, kv, d) =
            (self.hidden_size, self.intermediate_size, self.vocab_size, self.q_dim(), self.kv_dim(), self.head_dim);
        let layer_norm = self.norm == NormKind::Layer;
        let mut t = BTreeMap::new();
        t.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
        if let PositionKind::Learned { offset } = self.positions {
            t.insert("model.embed_positions.weight".to_string(), vec![self.max_position_embeddings + offset, h]);
        }
        t.insert("model.norm.weight".to_string(), vec![h]);
        if layer_norm {
            t.insert("model.norm.bias".to_string(), vec![h]);
        }
        if !self.tie_word_embeddings {
            t.insert("lm_head.weight".to_string(), vec![v, h]);
        }
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            let mut layer = vec![
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ];
            if self.mlp == MlpKind::GatedSilu {
                layer.push(("mlp.gate_proj.weight", vec![i, h]));
            }
            if layer_norm {
                layer.extend([("input_layernorm.bias", vec![h]), ("post_attention_layernorm.bias", vec![h])]);
            }
            if self.qkv_bias {
                layer.extend([
                    ("self_attn.q_proj.bias", vec![q]),
                    ("self_attn.k_proj.bias", vec![kv]),
                    ("self_attn.v_proj.bias", vec![kv]),
                ]);
            }
            if self.dense_bias {
                layer.extend([
                    ("self_attn.o_proj.bias", vec![h]),
                    ("mlp.up_proj.bias", vec![i]),
                    ("mlp.down_proj.bias", vec![h]),
                ]);
            }
            if self.qk_norm {
                layer.extend([("self_attn.q_norm.weight", vec![d]), ("self_attn.k_norm.weight", vec![d])]);
            }
            for (name, shape) in layer {
                t.insert(format!("{p}.{name}"), shape);
            }
        }
        t
    }

    /// Bytes of K and V one token occupies in the cache, over all layers.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.num_layers * self.kv_dim() * dtype_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        })
    }

    fn parse(v: &Value) -> Result<NetConfig> {
        NetConfig::from_hf_json(&v.to_string())
    }

    #[test]
    fn each_family_member_maps_its_own_features() {
        let mut v = base();
        assert_eq!(parse(&v).unwrap().head_dim, 16);
        v["model_type"] = "qwen3".into();
        v["head_dim"] = 32.into();
        let c = parse(&v).unwrap();
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!((c.head_dim, c.q_dim()), (32, 128));
        assert!(c.expected_tensors().contains_key("model.layers.1.self_attn.k_norm.weight"));
        v["model_type"] = "qwen2".into();
        v["sliding_window"] = 32.into();
        let c = parse(&v).unwrap();
        assert!(c.qkv_bias && c.sliding_window.is_none(), "qwen2 ignores the window unless switched on");
        v["model_type"] = "mistral".into();
        assert_eq!(parse(&v).unwrap().sliding_window, Some(32));
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_unknown_kinds_are_named() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert_eq!(parse(&v).unwrap().rope_scaling.unwrap().original_max_position_embeddings, 8192);
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(parse(&v).unwrap_err().to_string().contains("\"yarn\""));
    }

    #[test]
    fn opt_maps_its_config_and_its_tensor_names() {
        let v = serde_json::json!({
            "model_type": "opt", "vocab_size": 100, "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 128, "do_layer_norm_before": true,
            "word_embed_proj_dim": 64, "activation_function": "relu",
        });
        let c = parse(&v).unwrap();
        assert_eq!((c.norm, c.mlp, c.intermediate_size, c.norm_eps), (NormKind::Layer, MlpKind::Relu, 256, 1e-5));
        assert!(c.tie_word_embeddings && c.qkv_bias && c.dense_bias, "OPT's defaults");
        let t = c.expected_tensors();
        assert_eq!(t["model.embed_positions.weight"], vec![130, 64]);
        assert!(t.contains_key("model.layers.1.mlp.down_proj.bias") && t.contains_key("model.norm.bias"));
        assert!(!t.contains_key("model.layers.1.mlp.gate_proj.weight") && !t.contains_key("lm_head.weight"));
        let naming = Architecture::Opt.spec().naming;
        for (ours, theirs) in [
            ("model.layers.3.mlp.up_proj.weight", "model.decoder.layers.3.fc1.weight"),
            ("model.layers.0.post_attention_layernorm.bias", "model.decoder.layers.0.final_layer_norm.bias"),
            ("model.layers.0.self_attn.o_proj.weight", "model.decoder.layers.0.self_attn.out_proj.weight"),
            ("model.layers.0.self_attn.q_proj.bias", "model.decoder.layers.0.self_attn.q_proj.bias"),
            ("model.norm.weight", "model.decoder.final_layer_norm.weight"),
            ("model.embed_positions.weight", "model.decoder.embed_positions.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(naming.theirs(ours), theirs);
            assert_eq!(naming.ours(theirs), ours);
        }
        // facebook/opt-125m's own files are saved from the base model, without "model.".
        assert_eq!(naming.ours("decoder.layers.0.fc2.bias"), "model.layers.0.mlp.down_proj.bias");
        for (key, value) in [
            ("do_layer_norm_before", Value::from(false)),
            ("word_embed_proj_dim", Value::from(512)),
            ("activation_function", Value::from("gelu")),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let err = parse(&bad).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("not supported"), "{err}");
        }
    }

    #[test]
    fn impossible_configs_are_load_errors() {
        for (key, value) in [
            ("num_attention_heads", Value::from(5)),
            ("hidden_size", Value::Null),
            ("vocab_size", Value::from(-3)),
            ("model_type", Value::from("mamba")),
            ("vocab_size", Value::from(u64::MAX)),
        ] {
            let mut v = base();
            v[key] = value;
            assert!(matches!(parse(&v), Err(NetworkError::Load(_))), "{key}");
        }
    }
}
