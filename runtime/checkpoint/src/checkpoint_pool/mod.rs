//! The checkpoint pool: model files read into the pool's own memory (parallel reads into huge
//! pages), and (on a GPU host) registered as pinned memory so loading a model is DMA from those
//! pages straight into the engine's device tensors, with no extra host copy. Engines come and go (scale to zero); their
//! checkpoints stay here until the pool's byte capacity forces the least recently used out.
//!
//! A miss overlaps reading with loading: the load starts as the first bytes are read and copies
//! each tensor once the bytes under it have landed (`Landed`), so it ends a moment after the read
//! does. Files not in the page cache are read direct from the disk. The pages are pinned in
//! cells (256 MiB), each registered before it is marked landed, so a miss's copies are DMA like
//! a hit's: ahead of the readers when every file is read direct, otherwise as each is read.
//!
//! Invariant: the driver refuses a copy that reads across two registrations, so every copy from
//! the pool's pages onto a GPU is cut at the cells' edges (`network::host_copy`), and cells are
//! pinned only where copies honour them (`host_copy::cells_honoured`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use memmap2::Advice;
use safetensors::Dtype;

use tokenizers::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::checkpoint::{Checkpoint, TensorEntry, WeightDType};
use crate::error::{CheckpointError, Result};
use crate::network::Weight;
use crate::network::tensor_parallel::{Part, Shard};

mod admission;
use admission::{AdmissionRead, CELL, Landed, Pages, PinOrder, Registration, admission_from_env, fill, map_resident};

/// Makes host memory DMA-able by an accelerator (cuMemHostRegister on CUDA).
pub trait HostPinner: Send + Sync {
    /// Pins the pages of `range` for the device to read; `unpin` is called with the same range
    /// before the memory is unmapped. The memory may still be written (by the pool's readers)
    /// while it is pinned, and the device must then see those writes.
    fn pin(&self, range: HostRange) -> Result<()>;
    fn unpin(&self, range: HostRange);
}

/// Host memory by address: what a pinner registers. An address, not a slice, because the pool
/// registers cells that its readers are still writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostRange {
    pub start: usize,
    pub len: usize,
}

impl HostRange {
    pub fn of(bytes: &[u8]) -> Self {
        Self { start: bytes.as_ptr() as usize, len: bytes.len() }
    }
}

/// Progress of a long admission, for logs and progress bars.
#[derive(Debug, Clone, Copy)]
pub struct AdmitProgress {
    pub resident_bytes: u64,
    pub total_bytes: u64,
}

struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &std::path::Path) -> Result<FileStamp> {
    let meta = std::fs::metadata(path).map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?;
    Ok(FileStamp { len: meta.len(), modified: meta.modified().ok() })
}

/// One checkpoint held by the pool (or, when it does not fit, held only while it loads), with the
/// host-side state an engine needs besides weights: parsing a 150k-entry tokenizer.json takes
/// longer than moving a 0.5B model's weights, so it is done once, at admission, while the files
/// are read.
pub struct PooledCheckpoint {
    pub ckpt: Checkpoint,
    /// The tokenizer and chat template, or why they did not parse; set once during admission.
    text: OnceLock<std::result::Result<TextParts, String>>,
    pages: Vec<Pages>,
    landed: Landed,
    stamps: Vec<FileStamp>,
    pinner: Option<Arc<dyn HostPinner>>,
    /// The pages' registrations are this many bytes each, counted from each file's start.
    cell: usize,
    read: AdmissionRead,
    pin_order: PinOrder,
    /// Every tensor put on a device is read back and compared with these pages.
    verify: bool,
    /// What the pinner has registered, unpinned when the checkpoint goes.
    registered: Mutex<Vec<Registration>>,
    /// Every cell registered.
    pinned: AtomicBool,
    /// Set by a miss's load that failed: its read stops and nothing is pooled.
    abandoned: AtomicBool,
    times: Mutex<AdmitTimes>,
}

/// How an admission went: reading the files in, and pinning them (the time spent registering
/// cells, beside the read).
#[derive(Debug, Clone, Copy, Default)]
struct AdmitTimes {
    page_in: Option<Duration>,
    pin: Option<Duration>,
}

/// What turns text into tokens and back for this checkpoint.
struct TextParts {
    tokenizer: Arc<Tokenizer>,
    chat_template: Arc<Option<ChatTemplate>>,
}

impl Drop for PooledCheckpoint {
    fn drop(&mut self) {
        if let Some(p) = &self.pinner {
            for &(file, a, b) in self.registered.get_mut().expect("poisoned").iter() {
                p.unpin(self.pages[file].address(a, b));
            }
        }
    }
}

/// The two casts this module needs, without a dependency for them.
mod bytemuck_free {
    /// Plain-old-data element types whose every bit pattern is valid.
    pub trait Pod: Copy {}
    impl Pod for f32 {}
    impl Pod for half::bf16 {}
    impl Pod for half::f16 {}

    pub fn cast_slice<T: Pod>(bytes: &[u8]) -> Option<&[T]> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size) || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        // SAFETY: length and alignment checked above; T is Pod so any bytes are a valid T.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
    }
}

impl PooledCheckpoint {
    /// Parses the tokenizer and chat template (once; later calls do nothing). Always sets
    /// `text`, a panic in the parser included, since a load may be waiting on it.
    fn parse_text(&self) {
        self.text.get_or_init(|| {
            let parse = || self.ckpt.load_tokenizer().and_then(|t| Ok((t, self.ckpt.load_chat_template()?)));
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)) {
                Ok(Ok((tokenizer, template))) => {
                    Ok(TextParts { tokenizer: Arc::new(tokenizer), chat_template: Arc::new(template) })
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("{}: the tokenizer's parser panicked", self.ckpt.dir.display())),
            }
        });
    }

    fn text(&self) -> Result<&TextParts> {
        self.text.wait().as_ref().map_err(|e| CheckpointError::Load(e.clone()))
    }

    /// The checkpoint's tokenizer; during an admission, waits for it to be parsed.
    pub fn tokenizer(&self) -> Result<Arc<Tokenizer>> {
        Ok(self.text()?.tokenizer.clone())
    }

    /// The checkpoint's chat template, if it has one; during an admission, waits for it.
    pub fn chat_template(&self) -> Result<Arc<Option<ChatTemplate>>> {
        Ok(self.text()?.chat_template.clone())
    }

    fn still_current(&self) -> bool {
        self.ckpt
            .weight_files
            .iter()
            .zip(&self.stamps)
            .all(|(p, s)| stamp(p).is_ok_and(|now| now.len == s.len && now.modified == s.modified))
    }

    /// A tensor's bytes, once they have landed.
    fn bytes(&self, entry: &TensorEntry) -> Result<&[u8]> {
        let (a, b) = entry.offsets;
        let pages = &self.pages[entry.file];
        if a > b || b > pages.len {
            return Err(CheckpointError::Load(format!("tensor bytes {a}..{b} past the file's {} bytes", pages.len)));
        }
        self.landed.wait(entry.file, b)?;
        // SAFETY: in bounds (checked above) and landed (waited for).
        Ok(unsafe { pages.range(a, b) })
    }

    /// The first byte at which the pooled pages differ from the files on disk, as (file, offset),
    /// or `None` when they are equal: checks an admission's read independently of any load.
    /// Waits for the read to end; reads every file through the page cache.
    pub fn first_byte_unlike_files(&self) -> Result<Option<(PathBuf, u64)>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 64 << 20];
        for (file, (path, pages)) in self.ckpt.weight_files.iter().zip(&self.pages).enumerate() {
            self.landed.wait(file, pages.len)?;
            let opened =
                std::fs::File::open(path).map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?;
            let mut offset = 0;
            while offset < pages.len {
                let len = buf.len().min(pages.len - offset);
                opened
                    .read_exact_at(&mut buf[..len], offset as u64)
                    .map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?;
                // SAFETY: in bounds, and landed (waited for above).
                let pooled = unsafe { pages.range(offset, offset + len) };
                if let Some(i) = pooled.iter().zip(&buf[..len]).position(|(a, b)| a != b) {
                    return Ok(Some((path.clone(), (offset + i) as u64)));
                }
                offset += len;
            }
        }
        Ok(None)
    }

    /// Gives up on a miss from inside its `using` (the load failed): the admission's readers stop
    /// after the piece they are reading, the checkout returns `using`'s result at once instead of
    /// after the whole read, and the checkpoint is not pooled. No effect on a hit.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Whether the pages are registered for DMA (pinning follows an admission, in the background).
    pub fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Acquire)
    }

    /// How long reading the files in took (so far, while it is still going on).
    pub fn admit_time(&self) -> Duration {
        self.times.lock().expect("poisoned").page_in.unwrap_or_default()
    }

    /// Copies every tensor onto `device`: float tensors as `dtype`, quantized ones as they are
    /// (they stay quantized on the device). From pinned pages each copy is a DMA straight into the
    /// tensor's device allocation; the copies are queued on the device's stream and this returns
    /// once all of them have landed. Tensors go in file order, each as soon as its bytes have
    /// been read in (on a miss the admission is still reading).
    pub fn load_tensors(&self, device: &Device, dtype: DType) -> Result<HashMap<String, Weight>> {
        self.load(device, dtype, |_, _| Ok(Part::Whole))
    }

    /// Loads one tensor-parallel rank's parts of the weights (`Shard::part`) onto `device`: a
    /// part of rows is copied from the pool's bytes alone, a part of columns is gathered from
    /// each row's bytes first, and a zero bias is made on the device. Quantized tensors cannot be
    /// split.
    pub fn load_shard(&self, device: &Device, dtype: DType, shard: Shard) -> Result<HashMap<String, Weight>> {
        self.load(device, dtype, |name, shape| Ok(shard.part(name, shape)?))
    }

    fn load(
        &self,
        device: &Device,
        dtype: DType,
        part_of: impl Fn(&str, &[usize]) -> Result<Part>,
    ) -> Result<HashMap<String, Weight>> {
        let mut out = HashMap::with_capacity(self.ckpt.tensors.len());
        let mut in_file_order: Vec<_> = self.ckpt.tensors.iter().collect();
        in_file_order.sort_by_key(|(_, e)| (e.file, e.offsets.0));
        for (name, entry) in in_file_order {
            let part = part_of(name, &entry.shape)?;
            let err = |e: candle_core::Error| CheckpointError::Load(format!("tensor {name}: {e}"));
            if part == Part::Zeros {
                let _gate = crate::network::graphs::shared();
                out.insert(
                    name.clone(),
                    Weight::Dense(Tensor::zeros(entry.shape.as_slice(), dtype, device).map_err(err)?),
                );
                continue;
            }
            if part != Part::Whole && entry.dtype.is_quantized() {
                return Err(crate::network::tensor_parallel::quantized(name).into());
            }
            if let Some(copied) = self.copied_to_gpu(entry, part, device).map_err(err)? {
                self.verify_copy(name, entry, part, &copied)?;
                out.insert(name.clone(), Weight::Dense(copied.to_dtype(dtype).map_err(err)?));
                continue;
            }
            let mut bytes = Cow::Borrowed(self.bytes(entry)?);
            if device.is_cuda() && self.may_pin() && self.crosses_cells(entry) {
                // What goes through candle is copied in one piece, which the driver refuses
                // across two registrations: from the host's own memory, then.
                bytes = Cow::Owned(bytes.into_owned());
            }
            let (bytes, shape) = part_bytes(&bytes, &entry.shape, part)
                .map_err(|e| CheckpointError::Load(format!("tensor {name}: {e}")))?;
            let (bytes, shape) = (bytes.as_ref(), shape.as_slice());
            // Per tensor, not across the load: a miss waits here for the disk, and a decode
            // graph capture on this GPU must not wait for that.
            let _gate = crate::network::graphs::shared();
            let weight = match entry.dtype {
                WeightDType::Safetensors(Dtype::BF16) | WeightDType::Ggml(GgmlDType::BF16) => {
                    Self::from_bytes::<half::bf16>(bytes, shape, device)
                }
                WeightDType::Safetensors(Dtype::F16) | WeightDType::Ggml(GgmlDType::F16) => {
                    Self::from_bytes::<half::f16>(bytes, shape, device)
                }
                WeightDType::Safetensors(Dtype::F32) | WeightDType::Ggml(GgmlDType::F32) => {
                    Self::from_bytes::<f32>(bytes, shape, device)
                }
                WeightDType::Ggml(q) => {
                    let qtensor =
                        candle_core::quantized::ggml_file::qtensor_from_ggml(q, bytes, shape.to_vec(), device);
                    out.insert(name.clone(), Weight::Quantized(Arc::new(qtensor.map_err(err)?)));
                    continue;
                }
                // Non-float tensors (e.g. quantization metadata) are not read by our networks.
                WeightDType::Safetensors(_) => continue,
            }
            .map_err(err)?;
            self.verify_copy(name, entry, part, &weight)?;
            out.insert(name.clone(), Weight::Dense(weight.to_dtype(dtype).map_err(err)?));
        }
        let _gate = crate::network::graphs::shared();
        device.synchronize().map_err(CheckpointError::load)?;
        Ok(out)
    }

    /// A float tensor's `part` copied straight from the pages onto a GPU (`network::host_copy`):
    /// cut at the cells' edges, and a part of columns as pitched copies rather than gathered on
    /// the host. `None` where that does not apply (not a GPU, not a float tensor, the copies
    /// turned off): the part goes through the host and candle.
    fn copied_to_gpu(&self, entry: &TensorEntry, part: Part, device: &Device) -> candle_core::Result<Option<Tensor>> {
        use crate::network::host_copy::{self, Block, Cells};
        let dtype = match entry.dtype {
            WeightDType::Safetensors(Dtype::BF16) | WeightDType::Ggml(GgmlDType::BF16) => DType::BF16,
            WeightDType::Safetensors(Dtype::F16) | WeightDType::Ggml(GgmlDType::F16) => DType::F16,
            WeightDType::Safetensors(Dtype::F32) | WeightDType::Ggml(GgmlDType::F32) => DType::F32,
            _ => return Ok(None),
        };
        if !device.is_cuda() || !host_copy::enabled() {
            return Ok(None);
        }
        let (a, b) = entry.offsets;
        let mut shape = entry.shape.clone();
        let block = match (part, shape.as_slice()) {
            (Part::Whole, _) => Block::span(0, b.saturating_sub(a)),
            (Part::Rows { dim: 0, start, len }, [rows, ..]) => {
                let row = b.saturating_sub(a) / (*rows).max(1);
                shape[0] = len;
                Block::span(start * row, len * row)
            }
            (Part::Rows { dim: 1, start, len }, &[rows, cols]) => {
                shape[1] = len;
                Block::columns([rows, cols], [start, len], dtype.size_in_bytes())
            }
            _ => return Ok(None), // no such part: `part_bytes` says why
        };
        let bytes = self.bytes(entry).map_err(candle_core::Error::wrap)?;
        let cells = Cells { offset: a, cell: self.cell };
        let _gate = crate::network::graphs::shared();
        host_copy::to_device(bytes, cells, block, dtype, &shape, device).transpose()
    }

    /// With `verify` on, reads `copied` (a tensor's `part`, as stored) back from its device and
    /// fails the load at the first byte that differs from the pool's.
    fn verify_copy(&self, name: &str, entry: &TensorEntry, part: Part, copied: &Tensor) -> Result<()> {
        if !self.verify {
            return Ok(());
        }
        let (expected, _) = part_bytes(self.bytes(entry)?, &entry.shape, part)
            .map_err(|e| CheckpointError::Load(format!("tensor {name}: {e}")))?;
        let _gate = crate::network::graphs::shared();
        let unlike = first_byte_unlike(copied, &expected)
            .map_err(|e| CheckpointError::Load(format!("tensor {name}: reading it back: {e}")))?;
        match unlike {
            None => Ok(()),
            Some(at) => Err(CheckpointError::Load(format!(
                "tensor {name}: byte {at} on {:?} differs from the pool's (KINDLING_POOL_VERIFY)",
                copied.device()
            ))),
        }
    }

    /// Whether cells of these pages are (or are about to be) registered with a pinner.
    fn may_pin(&self) -> bool {
        self.pinner.is_some() && crate::network::host_copy::cells_honoured()
    }

    /// Whether a tensor's bytes lie in more than one cell (registration) of its file.
    fn crosses_cells(&self, entry: &TensorEntry) -> bool {
        let (a, b) = entry.offsets;
        b > a && a / self.cell != (b - 1) / self.cell
    }

    fn from_bytes<T: bytemuck_free::Pod + candle_core::WithDType>(
        bytes: &[u8],
        shape: &[usize],
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match bytemuck_free::cast_slice::<T>(bytes) {
            Some(values) => Tensor::from_slice(values, shape, device),
            // Misaligned data (legal in safetensors, rare in practice): copy to an aligned buffer.
            None => {
                let size = std::mem::size_of::<T>();
                let values: Vec<T> = bytes
                    .chunks_exact(size)
                    .map(|c| {
                        // SAFETY: c has exactly size_of::<T>() bytes and T is Pod.
                        unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<T>()) }
                    })
                    .collect();
                Tensor::from_slice(&values, shape, device)
            }
        }
    }
}

/// The first byte at which `tensor` (a float tensor, as stored) differs from `expected`, read
/// back from its device; a length that differs counts from the shorter one's end.
fn first_byte_unlike(tensor: &Tensor, expected: &[u8]) -> candle_core::Result<Option<usize>> {
    let flat = tensor.flatten_all()?;
    let bytes: Vec<u8> = match tensor.dtype() {
        DType::BF16 => flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F16 => flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F32 => flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        other => return Err(candle_core::Error::Msg(format!("cannot compare {other:?} tensors byte for byte"))),
    };
    let differs = bytes.iter().zip(expected).position(|(a, b)| a != b);
    Ok(differs.or((bytes.len() != expected.len()).then(|| bytes.len().min(expected.len()))))
}

/// The bytes of `part` of a tensor of `shape` stored row-major in `bytes`, and its shape: the
/// whole, a range of rows of dimension 0 (borrowed), or of dimension 1 of a matrix (each row's
/// range, gathered).
fn part_bytes<'a>(
    bytes: &'a [u8],
    shape: &[usize],
    part: Part,
) -> std::result::Result<(Cow<'a, [u8]>, Vec<usize>), String> {
    let mut out_shape = shape.to_vec();
    match part {
        Part::Whole | Part::Zeros => Ok((Cow::Borrowed(bytes), out_shape)),
        Part::Rows { dim: 0, start, len } => {
            let row = bytes.len() / shape[0].max(1);
            out_shape[0] = len;
            Ok((Cow::Borrowed(&bytes[start * row..(start + len) * row]), out_shape))
        }
        Part::Rows { dim: 1, start, len } if shape.len() == 2 => {
            let row = bytes.len() / shape[0].max(1);
            let elem = row / shape[1].max(1);
            out_shape[1] = len;
            let mut gathered = Vec::with_capacity(shape[0] * len * elem);
            for r in bytes.chunks_exact(row) {
                gathered.extend_from_slice(&r[start * elem..(start + len) * elem]);
            }
            Ok((Cow::Owned(gathered), out_shape))
        }
        Part::Rows { dim, .. } => Err(format!("cannot split dimension {dim} of a tensor of shape {shape:?}")),
    }
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PoolStats {
    pub entries: usize,
    pub resident_bytes: u64,
    pub pinned_bytes: u64,
    pub capacity_bytes: u64,
}

struct Entry {
    pooled: Arc<PooledCheckpoint>,
    last_used: Instant,
}

pub struct CheckpointPool {
    capacity_bytes: u64,
    pinner: Option<Arc<dyn HostPinner>>,
    /// Bytes per read step and per registration (`CELL`; tests use a few pages).
    cell: usize,
    read: AdmissionRead,
    pin_order: PinOrder,
    /// `KINDLING_POOL_VERIFY=1`: loads read every tensor back from the device and compare it
    /// with the pool's bytes (a check of a way of reading and copying; it slows loads down).
    verify: bool,
    entries: Mutex<HashMap<PathBuf, Entry>>,
    /// Admissions read whole files; one at a time keeps them from fighting over the disk.
    admit_lock: Mutex<()>,
}

impl CheckpointPool {
    pub fn new(capacity_bytes: u64, pinner: Option<Arc<dyn HostPinner>>) -> Self {
        let (read, pin_order) = admission_from_env();
        let verify = std::env::var("KINDLING_POOL_VERIFY").as_deref() == Ok("1");
        let (entries, admit_lock) = (Mutex::default(), Mutex::new(()));
        Self { capacity_bytes, pinner, cell: CELL, read, pin_order, verify, entries, admit_lock }
    }

    /// Reads and pins in cells of `bytes` (rounded up to whole 4 KiB pages) instead of 256 MiB.
    pub fn with_cell_bytes(mut self, bytes: usize) -> Self {
        self.cell = bytes.max(1).next_multiple_of(4096);
        self
    }

    pub fn stats(&self) -> PoolStats {
        let entries = self.entries.lock().expect("poisoned");
        let resident: u64 = entries.values().map(|e| e.pooled.ckpt.weight_bytes).sum();
        let pinned: u64 = entries.values().filter(|e| e.pooled.is_pinned()).map(|e| e.pooled.ckpt.weight_bytes).sum();
        PoolStats {
            entries: entries.len(),
            resident_bytes: resident,
            pinned_bytes: pinned,
            capacity_bytes: self.capacity_bytes,
        }
    }

    /// Whether admitted checkpoints are pinned (on a GPU host).
    pub fn pins(&self) -> bool {
        self.pinner.is_some()
    }

    pub fn contains(&self, ckpt: &Checkpoint) -> bool {
        self.holds(&ckpt.dir)
    }

    /// Drops the checkpoint at `dir` from the pool unless a load is using it. Returns whether it
    /// was dropped.
    pub fn evict(&self, dir: &Path) -> bool {
        let mut entries = self.entries.lock().expect("poisoned");
        match entries.get(dir) {
            Some(e) if Arc::strong_count(&e.pooled) == 1 => entries.remove(dir).is_some(),
            _ => false,
        }
    }

    /// How the pooled checkpoint at `dir` was admitted: reading its pages in, and pinning them
    /// (`None` until every cell is pinned).
    pub fn admission_phases(&self, dir: &Path) -> Option<(Duration, Option<Duration>)> {
        let entries = self.entries.lock().expect("poisoned");
        entries.get(dir).map(|e| {
            let t = *e.pooled.times.lock().expect("poisoned");
            (t.page_in.unwrap_or_default(), t.pin)
        })
    }

    /// Whether the checkpoint at `dir` (a registered model's path) is resident in the pool.
    pub fn holds(&self, dir: &Path) -> bool {
        self.entries.lock().expect("poisoned").contains_key(dir)
    }

    /// The pooled checkpoint at `dir` (a registered model's path): a hit is handed out as pooled,
    /// without opening and re-checking every shard header again; only a miss opens the checkpoint.
    /// Returns once it is all read in.
    pub fn checkout_path(
        &self,
        dir: &Path,
        progress: &(dyn Fn(AdmitProgress) + Sync),
    ) -> Result<(Arc<PooledCheckpoint>, bool)> {
        self.checkout_path_using(dir, progress, |pooled, hit| (pooled.clone(), hit))
    }

    /// Runs `using` on the pooled checkpoint at `dir` and whether it was a hit. On a miss `using`
    /// runs while the admission reads the files: what it reads through `load_tensors` waits for
    /// each tensor's bytes to land. Returns `using`'s result once both are done.
    pub fn checkout_path_using<T>(
        &self,
        dir: &Path,
        progress: &(dyn Fn(AdmitProgress) + Sync),
        using: impl FnOnce(&Arc<PooledCheckpoint>, bool) -> T,
    ) -> Result<T> {
        if let Some(hit) = self.lookup(dir) {
            return Ok(using(&hit, true));
        }
        self.checkout_using(Checkpoint::open(dir)?, progress, using)
    }

    /// The pooled checkpoint for `ckpt`, admitting it on a miss. Returns whether it was a hit.
    pub fn checkout(
        &self,
        ckpt: Checkpoint,
        progress: &(dyn Fn(AdmitProgress) + Sync),
    ) -> Result<(Arc<PooledCheckpoint>, bool)> {
        self.checkout_using(ckpt, progress, |pooled, hit| (pooled.clone(), hit))
    }

    fn checkout_using<T>(
        &self,
        ckpt: Checkpoint,
        progress: &(dyn Fn(AdmitProgress) + Sync),
        using: impl FnOnce(&Arc<PooledCheckpoint>, bool) -> T,
    ) -> Result<T> {
        if let Some(hit) = self.lookup(&ckpt.dir) {
            return Ok(using(&hit, true));
        }
        let _admitting = self.admit_lock.lock().expect("poisoned");
        if let Some(hit) = self.lookup(&ckpt.dir) {
            return Ok(using(&hit, true));
        }
        let fits = ckpt.weight_bytes <= self.capacity_bytes;
        let started = Instant::now();
        let pooled = Arc::new(self.start_admission(ckpt)?);
        // The files are read on a thread of the scope and the load runs here: a thread that has
        // used the GPU must not be one the scope waits to end (the CUDA driver's clean-up of a
        // thread's state at its exit hung, waiting on the new engine's use of the device).
        // The tokenizer parses on a thread of its own, beside the read rather than before it
        // (about 0.2 s for a 128k vocabulary); the load waits for it only to start the engine.
        let (read, used) = std::thread::scope(|s| {
            let reader = s.spawn(|| fill(&pooled, started, progress));
            s.spawn(|| pooled.parse_text());
            let used = using(&pooled, false);
            (reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), used)
        });
        if pooled.is_abandoned() {
            return Ok(used); // the load failed; its error is in `used`, the read stopped early
        }
        read?;
        pooled.tokenizer()?; // a tokenizer that does not parse: nothing can use the checkpoint
        if fits {
            let mut entries = self.entries.lock().expect("poisoned");
            entries.insert(pooled.ckpt.dir.clone(), Entry { pooled: pooled.clone(), last_used: Instant::now() });
            Self::evict_over_capacity(&mut entries, self.capacity_bytes, &pooled.ckpt.dir);
        } else {
            tracing::warn!(
                model = %pooled.ckpt.dir.display(),
                bytes = pooled.ckpt.weight_bytes,
                capacity = self.capacity_bytes,
                "checkpoint is larger than the pool; loading it without pooling"
            );
        }
        Ok(used)
    }

    fn lookup(&self, dir: &Path) -> Option<Arc<PooledCheckpoint>> {
        let mut entries = self.entries.lock().expect("poisoned");
        let entry = entries.get_mut(dir)?;
        // A stat of each file, not a parse: a checkpoint replaced on disk is admitted afresh.
        if !entry.pooled.still_current() {
            tracing::info!(model = %dir.display(), "checkpoint files changed on disk; re-admitting");
            entries.remove(dir);
            return None;
        }
        entry.last_used = Instant::now();
        Some(entry.pooled.clone())
    }

    fn evict_over_capacity(entries: &mut HashMap<PathBuf, Entry>, capacity: u64, keep: &PathBuf) {
        loop {
            let total: u64 = entries.values().map(|e| e.pooled.ckpt.weight_bytes).sum();
            if total <= capacity {
                return;
            }
            // Least recently used first; a checkpoint an engine is loading from stays.
            let victim = entries
                .iter()
                .filter(|(dir, e)| *dir != keep && Arc::strong_count(&e.pooled) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(dir, _)| dir.clone());
            match victim {
                Some(dir) => {
                    tracing::info!(model = %dir.display(), "evicting checkpoint from the pool");
                    entries.remove(&dir);
                }
                None => return,
            }
        }
    }

    /// A checkpoint about to be read in: memory for its files reserved (or, with
    /// `KINDLING_POOL_READ=mmap`, the files mapped and faulted in already); its tokenizer is
    /// parsed next, beside the read (`parse_text`).
    fn start_admission(&self, ckpt: Checkpoint) -> Result<PooledCheckpoint> {
        let mut pages = Vec::new();
        let mut stamps = Vec::new();
        let mapped = self.read == AdmissionRead::Mapped;
        for path in &ckpt.weight_files {
            let err = |e: std::io::Error| CheckpointError::Load(format!("{}: {e}", path.display()));
            stamps.push(stamp(path)?);
            pages.push(if mapped {
                Pages::mapped(map_resident(&File::open(path).map_err(err)?, |_| {}).map_err(err)?)
            } else {
                let len = usize::try_from(stamps.last().expect("pushed").len)
                    .map_err(|e| CheckpointError::Load(e.to_string()))?;
                // Anonymous memory (huge pages where the kernel gives them), to the end of the
                // file's last block (a direct read fills it whole); one block for an empty file,
                // which cannot be mapped with length 0.
                let room = len.max(1).next_multiple_of(crate::direct_io::ALIGN);
                let memory = memmap2::MmapOptions::new().len(room).map_anon().map_err(err)?;
                #[cfg(target_os = "linux")]
                if huge_pages() {
                    let _ = memory.advise(Advice::HugePage);
                }
                Pages::read(memory, len)
            });
        }
        let landed = Landed::new(pages.iter().map(|p| p.len), mapped);
        Ok(PooledCheckpoint {
            ckpt,
            text: OnceLock::new(),
            pages,
            landed,
            stamps,
            pinner: self.pinner.clone(),
            cell: self.cell,
            read: self.read,
            pin_order: self.pin_order,
            verify: self.verify,
            registered: Mutex::default(),
            pinned: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            times: Mutex::default(),
        })
    }
}

/// Whether the pool's memory asks for transparent huge pages (`KINDLING_POOL_HUGEPAGES=0` turns
/// that off, to compare the two on a host).
fn huge_pages() -> bool {
    std::env::var("KINDLING_POOL_HUGEPAGES").as_deref() != Ok("0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Architecture;
    use crate::tiny_model::{TinySpec, make_tiny_model};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountingPinner(AtomicUsize, AtomicUsize);

    impl HostPinner for CountingPinner {
        fn pin(&self, _: HostRange) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn unpin(&self, _: HostRange) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn tiny(arch: Architecture) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        make_tiny_model(dir.path(), &TinySpec::new(arch)).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        (dir, ckpt)
    }

    #[test]
    fn the_tokenizer_parses_beside_the_read_and_a_bad_one_keeps_the_checkpoint_out() {
        let (dir, ckpt) = tiny(Architecture::Llama);
        let pool = CheckpointPool::new(u64::MAX, None);
        let (pooled, hit) = pool.checkout(ckpt, &|_| {}).unwrap();
        assert!(!hit);
        assert!(pooled.tokenizer().unwrap().get_vocab_size(true) > 0, "parsed during the admission");
        // A tokenizer that no longer parses: the admission fails with its error, pools nothing
        // and leaves no load waiting for it.
        let (bad_dir, bad) = tiny(Architecture::Qwen2);
        std::fs::write(bad_dir.path().join("tokenizer.json"), b"{ not json").unwrap();
        let err = pool.checkout(bad, &|_| {}).err().expect("a tokenizer that does not parse");
        assert!(matches!(&err, CheckpointError::Load(m) if m.contains("tokenizer.json")), "{err}");
        assert_eq!(pool.stats().entries, 1, "only the good checkpoint is pooled");
        drop(dir);
    }

    #[test]
    fn a_rank_loads_exactly_its_part_of_each_tensor() {
        // Rows, columns (o_proj, down) and zeroed after-sum biases (OPT), against the whole load
        // sliced on the device; OPT's own q/k/v biases and LayerNorms come along.
        for arch in [Architecture::Llama, Architecture::Opt] {
            let (_dir, ckpt) = tiny(arch);
            let pool = CheckpointPool::new(u64::MAX, None);
            let (pooled, _) = pool.checkout(ckpt, &|_| {}).unwrap();
            let whole = pooled.load_tensors(&Device::Cpu, DType::F32).unwrap();
            for rank in 0..2 {
                let shard = Shard::new(rank, 2).unwrap();
                let part = pooled.load_shard(&Device::Cpu, DType::F32, shard).unwrap();
                assert_eq!(part.len(), whole.len());
                for (name, w) in &whole {
                    let Weight::Dense(expected) = shard.slice(name, Weight::Dense(dense(w))).unwrap() else {
                        unreachable!()
                    };
                    let got = dense(&part[name]);
                    assert_eq!(got.dims(), expected.dims(), "{arch:?} rank {rank}: {name}");
                    let diff = (got - expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{arch:?} rank {rank}: {name}");
                }
                let down = &part["model.layers.0.mlp.down_proj.weight"];
                assert_eq!(dense(down).dims()[1] * 2, dense(&whole["model.layers.0.mlp.down_proj.weight"]).dims()[1]);
            }
        }
    }

    fn dense(w: &Weight) -> Tensor {
        match w {
            Weight::Dense(t) => t.clone(),
            Weight::Quantized(_) => panic!("tiny models are dense"),
        }
    }

    #[test]
    fn part_bytes_cut_rows_and_gather_columns() {
        let bytes: Vec<u8> = (0..12).collect(); // a 3 x 4 matrix of one-byte elements
        let rows = part_bytes(&bytes, &[3, 4], Part::Rows { dim: 0, start: 1, len: 2 }).unwrap();
        assert_eq!((rows.0.as_ref(), rows.1), (&bytes[4..12], vec![2, 4]));
        let cols = part_bytes(&bytes, &[3, 4], Part::Rows { dim: 1, start: 2, len: 2 }).unwrap();
        assert_eq!((cols.0.as_ref(), cols.1), (&[2u8, 3, 6, 7, 10, 11][..], vec![3, 2]));
        assert!(part_bytes(&bytes, &[2, 2, 3], Part::Rows { dim: 2, start: 0, len: 1 }).is_err());
    }

    #[test]
    fn a_pooled_checkpoint_is_handed_out_by_path_without_reopening_it() {
        let (dir, ckpt) = tiny(Architecture::Llama);
        let pool = CheckpointPool::new(1 << 30, None);
        let (_, hit) = pool.checkout_path(&ckpt.dir, &|_| {}).unwrap();
        assert!(!hit);
        // A config that no longer parses proves the hit never re-opened the checkpoint.
        std::fs::write(dir.path().join("config.json"), b"{ broken").unwrap();
        let (again, hit) = pool.checkout_path(&ckpt.dir, &|_| {}).unwrap();
        assert!(hit);
        assert_eq!(again.ckpt.weight_bytes, ckpt.weight_bytes);
        // New weights on disk are noticed by a stat and admitted afresh (opening, so failing here).
        let weights = &ckpt.weight_files[0];
        let bytes = std::fs::read(weights).unwrap();
        std::fs::write(weights, &bytes[..bytes.len() - 1]).unwrap();
        assert!(pool.checkout_path(&ckpt.dir, &|_| {}).is_err());
    }

    #[test]
    fn second_checkout_is_a_hit_and_tensors_match_the_files() {
        let (_d, ckpt) = tiny(Architecture::Qwen2);
        let pool = CheckpointPool::new(1 << 30, None);
        let reports = AtomicUsize::new(0);
        let (a, hit) = pool
            .checkout(ckpt.clone(), &|_| {
                reports.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        assert!(!hit);
        assert!(reports.load(Ordering::SeqCst) >= 1, "admission reports progress");
        let (_, hit) = pool.checkout(ckpt.clone(), &|_| {}).unwrap();
        assert!(hit);
        let tensors = a.load_tensors(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(tensors.len(), ckpt.tensors.len());
        // Compare against candle's own safetensors reader on the same file.
        let reference = candle_core::safetensors::load(&ckpt.weight_files[0], &Device::Cpu).unwrap();
        for (name, t) in &reference {
            let crate::network::Weight::Dense(ours) = &tensors[name] else { panic!("{name} is not dense") };
            let diff = (ours - t.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        assert_eq!(pool.stats().entries, 1);
    }

    #[test]
    fn least_recently_used_idle_checkpoint_is_evicted_and_pins_are_released() {
        let (_d1, a) = tiny(Architecture::Qwen2);
        let (_d2, b) = tiny(Architecture::Llama);
        let pinner = Arc::new(CountingPinner(AtomicUsize::new(0), AtomicUsize::new(0)));
        // Room for one tiny model, not two.
        let pool = CheckpointPool::new(a.weight_bytes.max(b.weight_bytes) + 1, Some(pinner.clone()));
        drop(pool.checkout(a.clone(), &|_| {}).unwrap());
        assert!(pool.contains(&a));
        until(|| pinner.0.load(Ordering::SeqCst) == 1); // pinned as it was read
        drop(pool.checkout(b.clone(), &|_| {}).unwrap());
        until(|| pinner.0.load(Ordering::SeqCst) == 2);
        assert!(pool.contains(&b) && !pool.contains(&a), "a was least recently used");
        assert_eq!(pinner.1.load(Ordering::SeqCst), 1, "evicting a unpins its pages");
    }

    /// Records what is pinned and unpinned, as (address, length).
    #[derive(Default)]
    struct RecordingPinner {
        pinned: Mutex<Vec<(usize, usize)>>,
        unpinned: Mutex<Vec<(usize, usize)>>,
    }

    impl HostPinner for RecordingPinner {
        fn pin(&self, range: HostRange) -> Result<()> {
            self.pinned.lock().unwrap().push((range.start, range.len));
            Ok(())
        }
        fn unpin(&self, range: HostRange) {
            self.unpinned.lock().unwrap().push((range.start, range.len));
        }
    }

    #[test]
    fn a_miss_pins_each_cell_once_ahead_of_its_read_and_unpins_them_all_when_it_goes() {
        a_miss_pins_each_cell_once(PinOrder::Ahead);
    }

    #[test]
    fn a_miss_pins_each_cell_once_as_it_is_read_and_unpins_them_all_when_it_goes() {
        a_miss_pins_each_cell_once(PinOrder::Behind);
    }

    fn a_miss_pins_each_cell_once(order: PinOrder) {
        let (_d, ckpt) = tiny(Architecture::Llama);
        let file_len = std::fs::metadata(&ckpt.weight_files[0]).unwrap().len() as usize;
        let pinner = Arc::new(RecordingPinner::default());
        let mut pool = CheckpointPool::new(1 << 30, Some(pinner.clone())).with_cell_bytes(4096);
        (pool.read, pool.pin_order) = (AdmissionRead::Direct, order);
        drop_from_page_cache(&ckpt.weight_files);
        let (tensors, hit) = pool
            .checkout_path_using(&ckpt.dir, &|_| {}, |pooled, hit| (pooled.load_tensors(&Device::Cpu, DType::F32), hit))
            .unwrap();
        assert!(!hit);
        let reference = candle_core::safetensors::load(&ckpt.weight_files[0], &Device::Cpu).unwrap();
        let tensors = tensors.unwrap();
        for (name, t) in &reference {
            let crate::network::Weight::Dense(ours) = &tensors[name] else { panic!("{name} is not dense") };
            let diff = (ours - t.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        // Every cell was registered before it landed, so all are registered once the load is done.
        let mut pinned = pinner.pinned.lock().unwrap().clone();
        pinned.sort();
        assert_eq!(pinned.len(), file_len.div_ceil(4096), "one registration per 4 KiB cell");
        let start = pinned[0].0;
        assert_eq!(start % 4096, 0, "cells start on pages");
        for (k, &(at, len)) in pinned.iter().enumerate() {
            assert_eq!(at, start + k * 4096, "cells tile the file in order, without overlap");
            assert_eq!(len, 4096.min(file_len - k * 4096));
        }
        assert!(pinner.unpinned.lock().unwrap().is_empty(), "pooled: still pinned");
        until(|| pool.stats().pinned_bytes == ckpt.weight_bytes);
        until(|| pool.evict(&ckpt.dir)); // once the pinning thread has let go of it
        let mut unpinned = pinner.unpinned.lock().unwrap().clone();
        unpinned.sort();
        assert_eq!(unpinned, pinned, "evicted: every registration released");
    }

    #[test]
    fn a_byte_that_differs_from_the_file_is_found_where_it_is() {
        let (_d, ckpt) = tiny(Architecture::Llama);
        let pool = CheckpointPool::new(1 << 30, None);
        let pooled = pool.checkout(ckpt, &|_| {}).unwrap().0;
        assert_eq!(pooled.first_byte_unlike_files().unwrap(), None);
        let at = pooled.pages[0].len / 2;
        // SAFETY: in bounds; the admission is over and nothing else reads the pages here.
        unsafe { *pooled.pages[0].ptr.add(at) ^= 1 };
        let (file, offset) = pooled.first_byte_unlike_files().unwrap().expect("the flipped byte");
        assert_eq!((file, offset), (pooled.ckpt.weight_files[0].clone(), at as u64));
    }

    #[test]
    fn a_copy_read_back_is_compared_byte_for_byte() {
        let values = [1.5f32, -2.0, 3.25];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::new(&values, &Device::Cpu).unwrap();
        assert_eq!(first_byte_unlike(&t, &bytes).unwrap(), None);
        let mut wrong = bytes.clone();
        wrong[9] ^= 0x80;
        assert_eq!(first_byte_unlike(&t, &wrong).unwrap(), Some(9));
        assert_eq!(first_byte_unlike(&t, &bytes[..8]).unwrap(), Some(8), "a short copy");
        let bf16 = t.to_dtype(DType::BF16).unwrap();
        let halves: Vec<u8> = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
        assert_eq!(first_byte_unlike(&bf16, &halves).unwrap(), None);
    }

    #[test]
    fn a_sharded_checkpoint_equals_candles_reading_whichever_way_it_is_read_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = TinySpec::new(Architecture::Llama);
        (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers) = (256, 1024, 3);
        make_tiny_model(dir.path(), &spec).unwrap();
        shard(dir.path(), 3);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.weight_files.len(), 3);
        let ways = [
            (AdmissionRead::Direct, PinOrder::Ahead),
            (AdmissionRead::Direct, PinOrder::Behind),
            (AdmissionRead::Buffered, PinOrder::Behind),
            (AdmissionRead::Mapped, PinOrder::Behind),
        ];
        for (read, order) in ways {
            drop_from_page_cache(&ckpt.weight_files);
            let pinner = Arc::new(RecordingPinner::default());
            // Many cells per file, each several read pieces' worth of pages.
            let mut pool = CheckpointPool::new(1 << 40, Some(pinner.clone())).with_cell_bytes(64 << 10);
            (pool.read, pool.pin_order, pool.verify) = (read, order, true);
            let (tensors, hit) = pool
                .checkout_path_using(&ckpt.dir, &|_| {}, |pooled, hit| {
                    (pooled.load_tensors(&Device::Cpu, DType::F32), hit)
                })
                .unwrap();
            assert!(!hit);
            let pooled = pool.checkout_path(&ckpt.dir, &|_| {}).unwrap().0;
            assert_eq!(pooled.first_byte_unlike_files().unwrap(), None, "{read:?}, {order:?}");
            let tensors = tensors.unwrap();
            for file in &ckpt.weight_files {
                for (name, t) in &candle_core::safetensors::load(file, &Device::Cpu).unwrap() {
                    let crate::network::Weight::Dense(ours) = &tensors[name] else { panic!("{name} is not dense") };
                    let diff = (ours - t.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
                    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{read:?}, {order:?}: {name}");
                }
            }
            let cells: usize = (ckpt.weight_files.iter())
                .map(|f| (std::fs::metadata(f).unwrap().len() as usize).div_ceil(64 << 10))
                .sum();
            // Registered by the admission's own thread; all of them by the time the load is done.
            until(|| pinner.pinned.lock().unwrap().len() >= cells);
            assert_eq!(pinner.pinned.lock().unwrap().len(), cells, "{read:?}, {order:?}: every cell registered once");
        }
    }

    /// Rewrites the single `model.safetensors` in `dir` as `n` shards with an index, as large
    /// checkpoints come.
    fn shard(dir: &Path, n: usize) {
        let whole = dir.join("model.safetensors");
        let bytes = std::fs::read(&whole).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
        names.sort();
        let mut weight_map = serde_json::Map::new();
        for (k, part) in names.chunks(names.len().div_ceil(n)).enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            let views: Vec<_> = part.iter().map(|name| (name.clone(), tensors.tensor(name).unwrap())).collect();
            safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
            part.iter().for_each(|name| drop(weight_map.insert(name.clone(), file.clone().into())));
        }
        std::fs::remove_file(&whole).unwrap();
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }

    /// Drops `files` from the page cache, so the readers read them direct (where the file
    /// system allows).
    fn drop_from_page_cache(files: &[PathBuf]) {
        files.iter().for_each(|path| crate::direct_io::drop_cached(&File::open(path).unwrap()).unwrap());
    }

    fn until(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_miss_loads_while_the_files_are_read_and_gets_the_files_bytes() {
        let (_d, ckpt) = tiny(Architecture::Llama);
        let pool = CheckpointPool::new(1 << 30, None);
        let (tensors, hit) = pool
            .checkout_path_using(&ckpt.dir, &|_| {}, |pooled, hit| (pooled.load_tensors(&Device::Cpu, DType::F32), hit))
            .unwrap();
        assert!(!hit);
        let tensors = tensors.unwrap();
        let reference = candle_core::safetensors::load(&ckpt.weight_files[0], &Device::Cpu).unwrap();
        assert_eq!(tensors.len(), reference.len());
        for (name, t) in &reference {
            let crate::network::Weight::Dense(ours) = &tensors[name] else { panic!("{name} is not dense") };
            let diff = (ours - t.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        let (page_in, _) = pool.admission_phases(&ckpt.dir).expect("pooled after the miss");
        assert!(page_in > Duration::ZERO);
        assert!(pool.checkout_path_using(&ckpt.dir, &|_| {}, |_, hit| hit).unwrap(), "then a hit");
    }

    #[test]
    fn a_failed_load_abandons_the_read_and_nothing_is_pooled() {
        let (_d, ckpt) = tiny(Architecture::Llama);
        let pool = CheckpointPool::new(1 << 30, None);
        let failed = pool.checkout_path_using(&ckpt.dir, &|_| {}, |pooled, hit| {
            assert!(!hit);
            pooled.abandon();
            Err::<(), _>(CheckpointError::Load("out of device memory".into()))
        });
        assert!(matches!(&failed, Ok(Err(CheckpointError::Load(m))) if m == "out of device memory"), "{failed:?}");
        assert!(!pool.holds(&ckpt.dir), "an abandoned admission is not pooled");
        assert!(!pool.checkout_path_using(&ckpt.dir, &|_| {}, |_, hit| hit).unwrap(), "the next checkout reads again");
        assert!(pool.holds(&ckpt.dir));
    }

    #[test]
    fn a_load_waits_for_the_bytes_it_needs_and_hears_of_a_failed_read() {
        let landed = Arc::new(Landed::new([100usize, 10].into_iter(), false));
        let waiter = {
            let landed = landed.clone();
            std::thread::spawn(move || landed.wait(0, 100))
        };
        landed.advance(0, 50);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "half the bytes are not enough");
        landed.advance(0, 100);
        assert!(waiter.join().unwrap().is_ok());

        let waiter = {
            let landed = landed.clone();
            std::thread::spawn(move || landed.wait(1, 10))
        };
        landed.fail("disk gone".into());
        assert!(matches!(waiter.join().unwrap(), Err(CheckpointError::Load(m)) if m.contains("disk gone")));
        assert!(landed.wait(0, 100).is_ok(), "what landed before the failure stays usable");
    }

    #[test]
    fn a_checkpoint_larger_than_the_pool_loads_without_being_kept() {
        let (_d, ckpt) = tiny(Architecture::Qwen2);
        let pool = CheckpointPool::new(1, None);
        let (p, hit) = pool.checkout(ckpt.clone(), &|_| {}).unwrap();
        assert!(!hit && !p.is_pinned());
        assert_eq!(pool.stats().entries, 0);
        assert!(p.load_tensors(&Device::Cpu, DType::F32).is_ok());
    }

    #[test]
    fn changed_files_are_readmitted() {
        let (dir, ckpt) = tiny(Architecture::Qwen2);
        let pool = CheckpointPool::new(1 << 30, None);
        drop(pool.checkout(ckpt.clone(), &|_| {}).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        make_tiny_model(dir.path(), &TinySpec { seed: 1, ..TinySpec::new(Architecture::Qwen2) }).unwrap();
        let (_, hit) = pool.checkout(ckpt, &|_| {}).unwrap();
        assert!(!hit, "a rewritten checkpoint must not be served from stale pages");
    }
}
