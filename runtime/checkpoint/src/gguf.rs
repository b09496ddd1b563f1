//! GGUF checkpoints (llama.cpp's format): one file holding the config, the tokenizer, the chat
//! template and the weights, quantized or not. `open` parses and checks the whole header before
//! any weight is read: the architecture maps onto the same `NetConfig` as an HF directory, every
//! tensor is renamed to its HF name and checked against the shape the config implies, every byte
//! range must lie inside the file, and an unsupported architecture or quantization type is named.
//! Quantized tensors stay quantized on the device (candle's quantized matmul, CPU and CUDA).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::Tokenizer;

use crate::error::{CheckpointError, Result};
use crate::network::config::{MlpKind, NormKind, PositionKind};
use crate::network::{Architecture, NetConfig};

/// The quantization types whose matmuls and dequantization candle implements on CPU and CUDA.
const SUPPORTED: [GgmlDType; 13] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// One tensor of a GGUF file, under its HF name.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub dtype: GgmlDType,
    /// HF order (rows first).
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub offsets: (usize, usize),
}

/// Which kind of vocabulary `tokenizer.ggml.model` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// `gpt2`: byte-level BPE with a merge list and a pre-tokenizer regex.
    BytePairGpt2,
    /// `llama`: SentencePiece BPE (Llama 1/2, Mistral): merges by token score, spaces as `▁`,
    /// bytes as `<0xXX>` tokens when no piece matches.
    SentencePiece,
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// The tokenizer as the file describes it; built into a `Tokenizer` once, at pool admission.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    kind: VocabKind,
    tokens: Vec<String>,
    merges: Vec<String>,
    scores: Vec<f32>,
    token_types: Vec<i32>,
    pre: String,
    add_bos: bool,
    add_space_prefix: bool,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub chat_template: Option<String>,
}

#[derive(Debug, Clone)]
pub struct GgufCheckpoint {
    pub config: NetConfig,
    pub tensors: HashMap<String, GgufTensor>,
    pub tokenizer: GgufTokenizer,
    pub eos_token_ids: BTreeSet<u32>,
    pub file_bytes: u64,
}

fn tokenizer_err(e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Load(format!("GGUF tokenizer: {e}"))
}

fn load_err(path: &Path, what: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Load(format!("{}: {what}", path.display()))
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => f64::from(*x),
        Value::I8(x) => f64::from(*x),
        Value::U16(x) => f64::from(*x),
        Value::I16(x) => f64::from(*x),
        Value::U32(x) => f64::from(*x),
        Value::I32(x) => f64::from(*x),
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => f64::from(*x),
        Value::F64(x) => *x,
        _ => return None,
    })
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    arch: &'a str,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }

    /// `{arch}.{key}` as a count.
    fn count(&self, key: &str) -> Result<Option<usize>> {
        let full = format!("{}.{key}", self.arch);
        match self.get(&full) {
            None => Ok(None),
            Some(v) => match number(v) {
                Some(n) if n >= 0.0 && n.fract() == 0.0 && n < 1e12 => Ok(Some(n as usize)),
                _ => Err(load_err(self.path, format!("metadata {full} must be a count, got {v:?}"))),
            },
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.count(key)?
            .filter(|n| *n > 0)
            .ok_or_else(|| load_err(self.path, format!("metadata {}.{key} is missing or zero", self.arch)))
    }

    fn float(&self, key: &str, default: f64) -> f64 {
        self.get(&format!("{}.{key}", self.arch)).and_then(number).unwrap_or(default)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        let items = v.to_vec().map_err(|_| load_err(self.path, format!("metadata {key} must be an array")))?;
        items
            .iter()
            .map(|s| {
                s.to_string().cloned().map_err(|_| load_err(self.path, format!("metadata {key} must hold strings")))
            })
            .collect()
    }

    fn id(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(number).filter(|n| *n >= 0.0 && *n < f64::from(u32::MAX)).map(|n| n as u32)
    }
}

/// llama.cpp's tensor names -> HF's.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let part = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}"))
}

/// GGUF architecture names we run, and whether llama.cpp's converter permuted Q/K rows for
/// interleaved RoPE (it does for the llama family, not for qwen).
fn architecture(name: &str) -> Option<(Architecture, bool)> {
    match name {
        "llama" => Some((Architecture::Llama, true)),
        "mistral" => Some((Architecture::Mistral, true)),
        "qwen2" => Some((Architecture::Qwen2, false)),
        "qwen3" => Some((Architecture::Qwen3, false)),
        _ => None,
    }
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
        let file_bytes = file.metadata().map_err(|e| load_err(path, e))?.len();
        let content =
            Content::read(&mut file).map_err(|e| load_err(path, format!("corrupt or truncated GGUF: {e}")))?;
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| load_err(path, "metadata general.architecture is missing"))?;
        let (arch, permuted_qk) = architecture(arch_name).ok_or_else(|| {
            load_err(
                path,
                format!("unsupported GGUF architecture {arch_name:?} (supported: llama, mistral, qwen2, qwen3)"),
            )
        })?;
        let meta = Meta { md, arch: arch_name, path };

        let mut tensors = HashMap::new();
        for (name, info) in &content.tensor_infos {
            if !SUPPORTED.contains(&info.ggml_dtype) {
                return Err(load_err(path, format!("tensor {name} has unsupported type {:?}", info.ggml_dtype)));
            }
            let Some(hf) = hf_name(name) else {
                if name == "rope_freqs.weight" {
                    return Err(load_err(path, "rope_freqs (Llama 3.1 RoPE scaling in GGUF) is not supported yet"));
                }
                continue; // tensors the network does not read
            };
            let shape = info.shape.dims().to_vec();
            let elems: usize = shape.iter().product();
            let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            if !elems.is_multiple_of(block) {
                return Err(load_err(path, format!("tensor {name}: {elems} elements is not a whole number of blocks")));
            }
            let start = content.tensor_data_offset.checked_add(info.offset).map(|s| s as usize);
            let end = start.and_then(|s| s.checked_add(elems / block * size));
            match (start, end) {
                (Some(start), Some(end)) if end as u64 <= file_bytes => {
                    tensors.insert(hf, GgufTensor { dtype: info.ggml_dtype, shape, offsets: (start, end) });
                }
                _ => return Err(load_err(path, format!("tensor {name} lies past the end of the file (truncated?)"))),
            }
        }

        let embed = tensors
            .get("model.embed_tokens.weight")
            .ok_or_else(|| load_err(path, "checkpoint has no tensor token_embd.weight"))?;
        let hidden_size = meta.required("embedding_length")?;
        let num_heads = meta.required("attention.head_count")?;
        let head_dim = meta.count("attention.key_length")?.unwrap_or(hidden_size / num_heads);
        let config = NetConfig {
            arch,
            vocab_size: meta.count("vocab_size")?.unwrap_or(embed.shape[0]),
            hidden_size,
            intermediate_size: meta.required("feed_forward_length")?,
            num_layers: meta.required("block_count")?,
            num_heads,
            num_kv_heads: meta.count("attention.head_count_kv")?.unwrap_or(num_heads),
            head_dim,
            max_position_embeddings: meta.required("context_length")?,
            norm: NormKind::Rms,
            norm_eps: meta.float("attention.layer_norm_rms_epsilon", 1e-5),
            positions: PositionKind::Rope,
            mlp: MlpKind::GatedSilu,
            dense_bias: false,
            rope_theta: meta.float("rope.freq_base", 10000.0),
            rope_scaling: None,
            rope_interleaved: permuted_qk,
            tie_word_embeddings: !tensors.contains_key("lm_head.weight"),
            qkv_bias: tensors.contains_key("model.layers.0.self_attn.q_proj.bias"),
            qk_norm: tensors.contains_key("model.layers.0.self_attn.q_norm.weight"),
            sliding_window: None,
            eos_token_id: None,
        };
        config.check().map_err(|e| load_err(path, e))?;
        for (name, expected) in config.expected_tensors() {
            match tensors.get(&name) {
                None => return Err(load_err(path, format!("checkpoint has no tensor {name}"))),
                Some(t) if t.shape != expected => {
                    return Err(load_err(
                        path,
                        format!("tensor {name} has shape {:?} but the metadata implies {expected:?}", t.shape),
                    ));
                }
                Some(_) => {}
            }
        }

        let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str);
        let kind = match model {
            Some("gpt2") => VocabKind::BytePairGpt2,
            Some("llama") => VocabKind::SentencePiece,
            other => {
                return Err(load_err(
                    path,
                    format!("tokenizer model {other:?} is not supported yet (supported: gpt2, llama)"),
                ));
            }
        };
        let numbers = |key: &str| match md.get(key).map(|v| v.to_vec()) {
            Some(Ok(items)) => items.iter().map(number).collect::<Option<Vec<f64>>>(),
            _ => None,
        };
        let token_types =
            numbers("tokenizer.ggml.token_type").map(|t| t.into_iter().map(|x| x as i32).collect()).unwrap_or_default();
        let flag = |key: &str, default: bool| md.get(key).and_then(|v| v.to_bool().ok()).unwrap_or(default);
        let tokenizer = GgufTokenizer {
            kind,
            tokens: meta.strings("tokenizer.ggml.tokens")?,
            merges: if kind == VocabKind::BytePairGpt2 { meta.strings("tokenizer.ggml.merges")? } else { Vec::new() },
            scores: match kind {
                VocabKind::BytePairGpt2 => Vec::new(),
                VocabKind::SentencePiece => numbers("tokenizer.ggml.scores")
                    .ok_or_else(|| load_err(path, "a llama vocabulary needs tokenizer.ggml.scores"))?
                    .into_iter()
                    .map(|x| x as f32)
                    .collect(),
            },
            token_types,
            pre: md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default(),
            // llama.cpp's defaults: SentencePiece vocabularies start with BOS and a space.
            add_bos: flag("tokenizer.ggml.add_bos_token", kind == VocabKind::SentencePiece),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
            bos: meta.id("tokenizer.ggml.bos_token_id"),
            eos: meta.id("tokenizer.ggml.eos_token_id"),
            chat_template: md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
        };
        if kind == VocabKind::SentencePiece && tokenizer.scores.len() != tokenizer.tokens.len() {
            return Err(load_err(
                path,
                format!("{} token scores for {} tokens", tokenizer.scores.len(), tokenizer.tokens.len()),
            ));
        }
        if tokenizer.tokens.len() != config.vocab_size {
            return Err(load_err(
                path,
                format!("the tokenizer has {} tokens but the model {}", tokenizer.tokens.len(), config.vocab_size),
            ));
        }
        let eos_token_ids = tokenizer.eos.into_iter().chain(meta.id("tokenizer.ggml.eot_token_id")).collect();
        Ok(Self { config, tensors, tokenizer, eos_token_ids, file_bytes })
    }
}

/// llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`, as HF pre-tokenizers: digits split
/// one by one for the families that do, then GPT-2's byte-level split.
fn pre_tokenizer(pre: &str) -> Result<tokenizers::PreTokenizerWrapper> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "gpt-2" | "default" | "" => byte_level.into(),
        other => {
            return Err(CheckpointError::Load(format!(
                "pre-tokenizer {other:?} is not supported yet (supported: gpt-2, smollm, starcoder)"
            )));
        }
    })
}

impl GgufTokenizer {
    pub fn build(&self) -> Result<Tokenizer> {
        let mut tokenizer = match self.kind {
            VocabKind::BytePairGpt2 => self.byte_level_bpe()?,
            VocabKind::SentencePiece => self.sentencepiece_bpe()?,
        };
        // Control tokens (<|im_start|>, <s>, ...) are matched whole, never split.
        let specials: Vec<tokenizers::AddedToken> = self
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TOKEN_CONTROL)
            .map(|(i, _)| tokenizers::AddedToken::from(self.tokens[i].clone(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(|e| tokenizer_err(e.to_string()))?;
        if self.add_bos
            && let Some(bos) = self.bos
        {
            let text = self.token_text(Some(bos));
            let template = tokenizers::processors::template::TemplateProcessing::builder()
                .try_single(format!("{text} $A"))
                .and_then(|b| b.try_pair(format!("{text} $A {text} $B")))
                .map_err(tokenizer_err)?
                .special_tokens(vec![(text, bos)])
                .build()
                .map_err(|e| tokenizer_err(e.to_string()))?;
            tokenizer.with_post_processor(Some(template));
        }
        Ok(tokenizer)
    }

    /// Byte-level BPE from the file's vocabulary and merges.
    fn byte_level_bpe(&self) -> Result<Tokenizer> {
        use tokenizers::models::bpe::BPE;
        let merges: Vec<(String, String)> = self
            .merges
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| tokenizer_err("a merge is not two tokens"))?;
        let bpe =
            BPE::builder().vocab_and_merges(self.vocab(), merges).build().map_err(|e| tokenizer_err(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer(&self.pre)?));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        Ok(tokenizer)
    }

    /// SentencePiece BPE as llama.cpp runs it: spaces become `▁` (one is prepended), adjacent
    /// pieces merge highest score first, and text no piece covers falls back to `<0xXX>` byte
    /// tokens. As a merge list: every split of a piece into two pieces, ranked by its score.
    fn sentencepiece_bpe(&self) -> Result<Tokenizer> {
        use tokenizers::decoders::{
            DecoderWrapper, byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence, strip::Strip,
        };
        use tokenizers::models::bpe::BPE;
        use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as Normalizers};
        let vocab = self.vocab();
        let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
        for (id, piece) in self.tokens.iter().enumerate() {
            let mergeable =
                matches!(self.token_types.get(id).copied().unwrap_or(TOKEN_NORMAL), TOKEN_NORMAL | TOKEN_USER_DEFINED);
            if !mergeable {
                continue;
            }
            for (at, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(at);
                if vocab.contains_key(left) && vocab.contains_key(right) {
                    ranked.push((self.scores[id], id as u32, left.to_string(), right.to_string()));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let merges = ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect();
        let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
        if let Some(unk) = self.token_types.iter().position(|t| *t == TOKEN_UNKNOWN) {
            bpe = bpe.unk_token(self.tokens[unk].clone());
        }
        let mut tokenizer = Tokenizer::new(bpe.build().map_err(|e| tokenizer_err(e.to_string()))?);
        let spaces = Replace::new(" ", "▁").map_err(|e| tokenizer_err(e.to_string()))?;
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if self.add_space_prefix {
            normalizers.push(Prepend::new("▁".into()).into());
        }
        normalizers.push(spaces.into());
        tokenizer.with_normalizer(Some(Normalizers::new(normalizers))).map_err(|e| tokenizer_err(e.to_string()))?;
        let unspace = Replace::new("▁", " ").map_err(|e| tokenizer_err(e.to_string()))?;
        let mut decoders: Vec<DecoderWrapper> =
            vec![DecoderWrapper::Replace(unspace), ByteFallback::default().into(), Fuse::default().into()];
        if self.add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(Sequence::new(decoders)));
        Ok(tokenizer)
    }

    fn vocab(&self) -> tokenizers::models::bpe::Vocab {
        self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
    }

    pub fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.tokens.get(i as usize)).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_names_map_to_hf_names() {
        assert_eq!(hf_name("blk.12.attn_q.weight").unwrap(), "model.layers.12.self_attn.q_proj.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn garbage_and_truncated_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
        let err = GgufCheckpoint::open(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt or truncated GGUF"), "{err}");
        std::fs::write(&path, b"not a gguf at all").unwrap();
        assert!(GgufCheckpoint::open(&path).is_err());
    }
}
