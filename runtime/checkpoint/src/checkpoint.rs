//! A model checkpoint, opened and checked before any weights are touched: an HF-format directory
//! (config.json, tokenizer.json, safetensors) or a GGUF file (`gguf.rs`).
//!
//! Which one a path means: a path to a `.gguf` file is that file. A directory with `config.json`
//! and safetensors weights is an HF checkpoint, even if it also holds GGUF files; otherwise a
//! directory holding exactly one `.gguf` file is that file (several are an error that names them).
//!
//! `Checkpoint::open` reads `config.json`, finds the safetensors files (single file or sharded
//! index), parses every header and checks each tensor the architecture needs against the shape the
//! config implies. A truncated file, a corrupt header or a config that lies about shapes is
//! reported here with the file and tensor named, instead of as a panic deep inside a model loader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use candle_core::quantized::GgmlDType;

use crate::chat_template::ChatTemplate;
use crate::error::{CheckpointError, Result};
use crate::gguf::{GgufCheckpoint, GgufTokenizer};
pub use crate::network::{Architecture, NetConfig};

/// One tensor as its safetensors header describes it.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub file: usize,
    pub dtype: WeightDType,
    pub shape: Vec<usize>,
    /// Byte range inside the file (absolute, header included).
    pub offsets: (usize, usize),
}

/// How a tensor's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightDType {
    Safetensors(Dtype),
    Ggml(GgmlDType),
}

impl WeightDType {
    /// Stored in blocks of quantized values (not plain floats), so not sliceable by rows.
    pub fn is_quantized(self) -> bool {
        matches!(self, WeightDType::Ggml(q) if !matches!(q, GgmlDType::BF16 | GgmlDType::F16 | GgmlDType::F32))
    }
}

/// Where the tokenizer (and chat template) come from.
#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// `tokenizer.json` (and `tokenizer_config.json` beside it for the chat template).
    File(PathBuf),
    Gguf(Box<GgufTokenizer>),
}

/// A checked, not yet loaded, checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The path it was opened from (a directory or a `.gguf` file); opening it again gives the same.
    pub dir: PathBuf,
    pub format: &'static str,
    pub arch: Architecture,
    pub config: NetConfig,
    pub weight_files: Vec<PathBuf>,
    pub tensors: HashMap<String, TensorEntry>,
    pub tokenizer: TokenizerSource,
    pub eos_token_ids: BTreeSet<u32>,
    /// Sum of the weight files' sizes.
    pub weight_bytes: u64,
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))
}

fn collect_ids(value: &serde_json::Value, into: &mut BTreeSet<u32>) {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(id) = n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                into.insert(id);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_ids(v, into)),
        _ => {}
    }
}

impl Checkpoint {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            return Self::open_gguf(path.clone(), &path);
        }
        if !path.is_dir() {
            return Err(CheckpointError::Load(format!("{} is neither a directory nor a .gguf file", path.display())));
        }
        let hf = path.join("config.json").is_file()
            && (path.join("model.safetensors").is_file() || path.join("model.safetensors.index.json").is_file());
        if !hf {
            let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            ggufs.sort();
            match ggufs.len() {
                0 => {}
                1 => return Self::open_gguf(path, &ggufs[0]),
                _ => {
                    let names: Vec<String> = ggufs.iter().map(|p| p.display().to_string()).collect();
                    return Err(CheckpointError::Load(format!(
                        "{} holds several GGUF files ({}); register one of them by its path",
                        path.display(),
                        names.join(", ")
                    )));
                }
            }
        }
        Self::open_hf(path)
    }

    /// The checkpoint's tokenizer (parsed or built: tens of milliseconds for a large vocabulary,
    /// which is why the pool does it once per admission).
    pub fn load_tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        match &self.tokenizer {
            TokenizerSource::File(path) => tokenizers::Tokenizer::from_file(path)
                .map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display()))),
            TokenizerSource::Gguf(t) => t.build(),
        }
    }

    /// The chat template, if the checkpoint has one.
    pub fn load_chat_template(&self) -> Result<Option<ChatTemplate>> {
        match &self.tokenizer {
            TokenizerSource::File(path) => ChatTemplate::from_model_dir(path.parent().unwrap_or(&self.dir)),
            TokenizerSource::Gguf(t) => match &t.chat_template {
                Some(source) => ChatTemplate::new(source, t.token_text(t.bos), t.token_text(t.eos)).map(Some),
                None => Ok(None),
            },
        }
    }

    fn open_gguf(dir: PathBuf, file: &Path) -> Result<Self> {
        let g = GgufCheckpoint::open(file)?;
        let tensors = g
            .tensors
            .into_iter()
            .map(|(name, t)| {
                (name, TensorEntry { file: 0, dtype: WeightDType::Ggml(t.dtype), shape: t.shape, offsets: t.offsets })
            })
            .collect();
        Ok(Self {
            dir,
            format: "gguf",
            arch: g.config.arch,
            config: g.config,
            weight_files: vec![file.to_path_buf()],
            tensors,
            tokenizer: TokenizerSource::Gguf(Box::new(g.tokenizer)),
            eos_token_ids: g.eos_token_ids,
            weight_bytes: g.file_bytes,
        })
    }

    fn open_hf(dir: PathBuf) -> Result<Self> {
        let config = NetConfig::from_hf_json(&read_to_string(&dir.join("config.json"))?)?;
        let arch = config.arch;

        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(CheckpointError::Load(format!("{} is missing", tokenizer_path.display())));
        }

        let weight_files = Self::find_weight_files(&dir)?;
        let mut tensors = HashMap::new();
        let mut weight_bytes = 0;
        for (index, path) in weight_files.iter().enumerate() {
            weight_bytes += Self::read_header(index, path, &mut tensors)?;
        }
        let tensors = Self::rename(arch, tensors)?;
        Self::check_shapes(&config, &tensors)?;

        let mut eos_token_ids = BTreeSet::new();
        if let Some(v) = &config.eos_token_id {
            collect_ids(v, &mut eos_token_ids);
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json"))
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            collect_ids(&v["eos_token_id"], &mut eos_token_ids);
        }

        Ok(Self {
            dir,
            format: "safetensors",
            arch,
            config,
            weight_files,
            tensors,
            tokenizer: TokenizerSource::File(tokenizer_path),
            eos_token_ids,
            weight_bytes,
        })
    }

    fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.is_file() {
            return Err(CheckpointError::Load(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        }
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let index: Index = serde_json::from_str(&read_to_string(&index_path)?)
            .map_err(|e| CheckpointError::Load(format!("{}: {e}", index_path.display())))?;
        let names: BTreeSet<&String> = index.weight_map.values().collect();
        let mut files = Vec::new();
        for name in names {
            if name.contains('/') || name.contains("..") {
                return Err(CheckpointError::Load(format!("shard name {name:?} escapes the model directory")));
            }
            files.push(dir.join(name));
        }
        if files.is_empty() {
            return Err(CheckpointError::Load(format!("{} lists no shards", index_path.display())));
        }
        Ok(files)
    }

    /// Parses one file's header and records its tensors; returns the file's size.
    fn read_header(index: usize, path: &Path, tensors: &mut HashMap<String, TensorEntry>) -> Result<u64> {
        let file = File::open(path).map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?;
        // SAFETY: read-only map; a concurrent truncation would fault, which we accept for model files
        // the operator registered (the same contract as every mmap-based loader).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?;
        let parsed = SafeTensors::deserialize(&mmap)
            .map_err(|e| CheckpointError::Load(format!("{}: corrupt or truncated safetensors: {e}", path.display())))?;
        let header_len = 8 + u64::from_le_bytes(mmap[..8].try_into().expect("deserialize checked length")) as usize;
        for (name, view) in parsed.tensors() {
            let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
            debug_assert!(start >= header_len);
            let entry = TensorEntry {
                file: index,
                dtype: WeightDType::Safetensors(view.dtype()),
                shape: view.shape().to_vec(),
                offsets: (start, start + view.data().len()),
            };
            if tensors.insert(name.clone(), entry).is_some() {
                return Err(CheckpointError::Load(format!("tensor {name} appears in more than one shard")));
            }
        }
        Ok(mmap.len() as u64)
    }

    /// Keys the tensors by our names (the family's checkpoint names differ for OPT).
    fn rename(arch: Architecture, tensors: HashMap<String, TensorEntry>) -> Result<HashMap<String, TensorEntry>> {
        let naming = arch.spec().naming;
        let mut ours = HashMap::with_capacity(tensors.len());
        for (name, entry) in tensors {
            let our_name = naming.ours(&name);
            if ours.insert(our_name, entry).is_some() {
                return Err(CheckpointError::Load(format!(
                    "tensor {name} appears twice (with and without a model. prefix)"
                )));
            }
        }
        Ok(ours)
    }

    fn check_shapes(config: &NetConfig, tensors: &HashMap<String, TensorEntry>) -> Result<()> {
        let naming = config.arch.spec().naming;
        for (ours, expected) in config.expected_tensors() {
            let name = naming.theirs(&ours);
            let Some(entry) = tensors.get(&ours) else {
                return Err(CheckpointError::Load(format!("checkpoint has no tensor {name}")));
            };
            if entry.shape != expected {
                return Err(CheckpointError::Load(format!(
                    "tensor {name} has shape {:?} but config.json implies {expected:?}",
                    entry.shape
                )));
            }
            if !matches!(entry.dtype, WeightDType::Safetensors(Dtype::F32 | Dtype::F16 | Dtype::BF16)) {
                return Err(CheckpointError::Load(format!(
                    "tensor {name} has dtype {:?}; only f32, f16 and bf16 are supported",
                    entry.dtype
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_model::{TinySpec, make_tiny_model};

    fn tiny() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        make_tiny_model(dir.path(), &TinySpec::new(Architecture::Llama)).unwrap();
        dir
    }

    fn open_err(dir: &Path) -> String {
        match Checkpoint::open(dir) {
            Ok(_) => panic!("{} opened but should not", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let path = dir.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(path, v.to_string()).unwrap();
    }

    #[test]
    fn truncated_weights_are_reported_with_the_file() {
        let dir = tiny();
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
        let err = open_err(dir.path());
        assert!(err.contains("model.safetensors") && err.contains("corrupt or truncated"), "{err}");
    }

    #[test]
    fn a_garbage_header_is_reported() {
        let dir = tiny();
        std::fs::write(dir.path().join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
        assert!(open_err(dir.path()).contains("corrupt or truncated"));
    }

    #[test]
    fn a_config_that_lies_about_shapes_names_the_tensor() {
        let dir = tiny();
        edit_config(dir.path(), |v| v["intermediate_size"] = 999.into());
        let err = open_err(dir.path());
        assert!(err.contains("mlp") && err.contains("999"), "{err}");
        let dir = tiny();
        edit_config(dir.path(), |v| v["num_hidden_layers"] = 3.into());
        assert!(open_err(dir.path()).contains("has no tensor model.layers.2"));
    }

    #[test]
    fn impossible_or_unsupported_configs_are_rejected() {
        let dir = tiny();
        edit_config(dir.path(), |v| v["num_attention_heads"] = 5.into());
        assert!(open_err(dir.path()).contains("not divisible"));
        let dir = tiny();
        edit_config(dir.path(), |v| v["model_type"] = "mamba".into());
        assert!(open_err(dir.path()).contains("unsupported model_type"));
        let dir = tiny();
        edit_config(dir.path(), |v| v["hidden_size"] = serde_json::Value::Null);
        assert!(open_err(dir.path()).contains("config.json"));
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tiny();
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        assert!(open_err(dir.path()).contains("tokenizer.json is missing"));
        let dir = tiny();
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        assert!(open_err(dir.path()).contains("neither model.safetensors"));
        assert!(open_err(Path::new("/nonexistent/model")).contains("neither a directory nor a .gguf file"));
    }

    #[test]
    fn sharded_checkpoints_are_read_through_their_index_and_may_not_escape() {
        let dir = tiny();
        let d = dir.path();
        std::fs::rename(d.join("model.safetensors"), d.join("model-00001-of-00001.safetensors")).unwrap();
        let ckpt_names: Vec<String> = {
            let bytes = std::fs::read(d.join("model-00001-of-00001.safetensors")).unwrap();
            SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_string).collect()
        };
        let map: serde_json::Map<String, serde_json::Value> =
            ckpt_names.iter().map(|n| (n.clone(), "model-00001-of-00001.safetensors".into())).collect();
        std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({ "weight_map": map }).to_string())
            .unwrap();
        let ckpt = Checkpoint::open(d).unwrap();
        assert_eq!(ckpt.weight_files.len(), 1);
        let evil: serde_json::Map<String, serde_json::Value> =
            ckpt_names.iter().map(|n| (n.clone(), "../../etc/passwd".into())).collect();
        std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({ "weight_map": evil }).to_string())
            .unwrap();
        assert!(open_err(d).contains("escapes the model directory"));
    }
}
