//! Deterministic tiny models of real architectures, written in the real HF formats.
//!
//! Tests and the offline demo need a model without downloading one. `make_tiny_model` writes
//! `config.json`, a byte-level BPE `tokenizer.json` trained on a short built-in corpus,
//! `tokenizer_config.json` with a ChatML chat template, and `model.safetensors` with bf16 weights
//! drawn from a fixed-seed generator. The same call always writes the same bytes, so an
//! independent implementation can check our generations token for token.

use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::network::{Architecture, NetConfig, PositionKind};

mod bigram;
use crate::error::{CheckpointError, Result};

const CORPUS: &str = include_str!("corpus.txt");
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const CHATML_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Shape of a tiny model; the defaults give ~0.2M parameters that run in milliseconds on CPU.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    /// Written explicitly; qwen3's differs from hidden / heads, as in the real models.
    pub head_dim: usize,
    /// Mistral's attention window (a small one, so tests cross it).
    pub sliding_window: Option<usize>,
    /// Llama 3.1 RoPE scaling with this `original_max_position_embeddings`.
    pub llama3_rope_from: Option<usize>,
    pub vocab_target: usize,
    pub seed: u64,
}

impl TinySpec {
    pub fn new(arch: Architecture) -> Self {
        let spec = arch.spec();
        let rope = spec.positions == PositionKind::Rope;
        Self {
            arch,
            head_dim: if spec.qk_norm { 32 } else { 16 },
            sliding_window: spec.sliding_window_always.then_some(32),
            llama3_rope_from: (arch == Architecture::Llama).then_some(64),
            hidden_size: 64,
            intermediate_size: 172,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            // Learned-position families (OPT) have no grouped-query attention.
            num_key_value_heads: if rope { 2 } else { 4 },
            max_position_embeddings: 512,
            vocab_target: 384,
            seed: 0x6b696e646c696e67, // "kindling"
        }
    }
}

/// A fresh directory name under the system's temp dir for a tiny model made at run time (the
/// warm-up, the graph self-check): unique per call, since GPU workers boot in parallel.
pub fn scratch_dir(purpose: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("kindling-{purpose}-{}-{n}", std::process::id()))
}

/// SplitMix64: a fixed, dependency-free generator, so the weights never change with a crate update.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box-Muller.
    pub(crate) fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// f32 -> bf16 with round-to-nearest-even, as torch does.
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

fn train_tokenizer(vocab_target: usize) -> Result<Tokenizer> {
    let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_target)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let lines: Vec<String> = CORPUS.lines().map(|l| format!("{l}\n")).collect();
    tokenizer
        .train(&mut trainer, lines.into_iter())
        .map_err(|e| CheckpointError::Load(format!("training the tiny tokenizer: {e}")))?;
    tokenizer.add_special_tokens(specials).map_err(|e| CheckpointError::Load(format!("adding special tokens: {e}")))?;
    Ok(tokenizer)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Load(format!("{}: {e}", path.display()))
}

/// Writes a tiny model into `dir` (created if missing). Returns the config it wrote.
pub fn make_tiny_model(dir: &Path, spec: &TinySpec) -> Result<NetConfig> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tokenizer = train_tokenizer(spec.vocab_target)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let id = |t: &str| tokenizer.token_to_id(t).expect("special token was added");
    let eos = [id("<|endoftext|>"), id("<|im_end|>")];

    let mut config = serde_json::json!({
        "architectures": [spec.arch.spec().hf_class],
        "model_type": spec.arch.name(),
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": eos[0],
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "sliding_window": spec.sliding_window,
        "use_sliding_window": false,
    });
    if let Some(original) = spec.llama3_rope_from {
        config["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        });
    }
    if spec.arch == Architecture::Opt {
        config = serde_json::json!({
            "architectures": [spec.arch.spec().hf_class],
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": spec.hidden_size,
            "word_embed_proj_dim": spec.hidden_size,
            "ffn_dim": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads,
            "max_position_embeddings": spec.max_position_embeddings,
            "do_layer_norm_before": true,
            "activation_function": "relu",
            "enable_bias": true,
            "layer_norm_elementwise_affine": true,
            "tie_word_embeddings": false,
            "bos_token_id": eos[0],
            "eos_token_id": eos,
            "pad_token_id": eos[0],
            "torch_dtype": "bfloat16",
        });
    }
    let config_text = serde_json::to_string_pretty(&config).expect("json");
    let shape = NetConfig::from_hf_json(&config_text)?;

    let path = dir.join("config.json");
    std::fs::write(&path, &config_text).map_err(io(&path))?;
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, true).map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?;
    let tokenizer_config = serde_json::json!({
        "chat_template": CHATML_TEMPLATE,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "model_max_length": spec.max_position_embeddings,
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&tokenizer_config).expect("json")).map_err(io(&path))?;

    write_weights(&dir.join("model.safetensors"), &shape, spec, &tokenizer)?;
    Ok(shape)
}

/// How strongly the attention and MLP blocks perturb the bigram signal in the residual stream:
/// enough that every layer changes the logits (so a wrong layer shows in tests), little enough
/// that the text stays corpus-like.
const BLOCK_SCALE: f32 = 0.5;

fn write_weights(path: &Path, shape: &NetConfig, spec: &TinySpec, tokenizer: &Tokenizer) -> Result<()> {
    let mut rng = SplitMix64(spec.seed);
    let sequences: Vec<Vec<u32>> = CORPUS
        .lines()
        .filter_map(|line| tokenizer.encode(format!("{line}\n"), false).ok())
        .map(|e| e.get_ids().to_vec())
        .collect();
    let (embed, head) = bigram::bigram_factors(&sequences, shape.vocab_size, shape.hidden_size, &mut rng);
    let naming = shape.arch.spec().naming;
    // BTreeMap order makes the draw order, and so the bytes, deterministic.
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = shape
        .expected_tensors()
        .into_iter()
        .map(|(name, dims)| {
            let n: usize = dims.iter().product();
            let values: Vec<f32> = if name == "model.embed_tokens.weight" {
                embed.clone()
            } else if name == "lm_head.weight" {
                head.clone()
            } else if name == "model.embed_positions.weight" {
                (0..n).map(|_| 0.02 * rng.normal()).collect()
            } else if name.ends_with("norm.bias") || name.ends_with("o_proj.bias") || name.ends_with("down_proj.bias") {
                // Biases added to the residual stream shift every token's logits alike: kept
                // small, so the text stays corpus-like.
                (0..n).map(|_| 0.01 * rng.normal()).collect()
            } else if name.ends_with("norm.weight") {
                (0..n).map(|_| 1.0 + 0.05 * rng.normal()).collect()
            } else if name.ends_with(".bias") {
                (0..n).map(|_| 0.1 * rng.normal()).collect()
            } else {
                // 1/sqrt(fan_in) keeps activations O(1); the blocks' outputs are scaled down.
                let mut scale = 1.0 / (dims[1] as f32).sqrt();
                if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                    scale *= BLOCK_SCALE;
                }
                (0..n).map(|_| scale * rng.normal()).collect()
            };
            let bytes = values.iter().flat_map(|v| bf16_bits(*v).to_le_bytes()).collect();
            (naming.theirs(&name), dims, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dims, bytes)| {
            let view = TensorView::new(Dtype::BF16, dims.clone(), bytes).expect("sizes match");
            (name.clone(), view)
        })
        .collect();
    let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::tensor::serialize_to_file(views, metadata, path)
        .map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;

    fn digest(dir: &Path) -> Vec<Vec<u8>> {
        ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect()
    }

    #[test]
    fn same_spec_writes_identical_files() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spec = TinySpec::new(Architecture::Qwen2);
        make_tiny_model(a.path(), &spec).unwrap();
        make_tiny_model(b.path(), &spec).unwrap();
        assert!(digest(a.path()) == digest(b.path()), "tiny model generation is not deterministic");
    }

    #[test]
    fn written_models_open_as_checkpoints() {
        for arch in Architecture::ALL {
            let dir = tempfile::tempdir().unwrap();
            let shape = make_tiny_model(dir.path(), &TinySpec::new(arch)).unwrap();
            let ckpt = Checkpoint::open(dir.path()).unwrap();
            assert_eq!(ckpt.arch, arch);
            assert_eq!(ckpt.config.vocab_size, shape.vocab_size);
            assert_eq!(ckpt.eos_token_ids.len(), 2);
        }
    }

    #[test]
    fn bf16_rounding_matches_reference_values() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        assert_eq!(bf16_bits(-2.0), 0xC000);
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
    }
}
