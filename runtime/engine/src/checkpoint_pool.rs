//! The checkpoint pool: model files read into the pool's own memory (parallel reads into huge
//! pages), and (on a GPU host) registered as pinned memory so loading a model is DMA from those
//! pages straight into the engine's device tensors, with no extra host copy. Engines come and go (scale to zero); their
//! checkpoints stay here until the pool's byte capacity forces the least recently used out.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use memmap2::{Advice, Mmap};
use safetensors::Dtype;

use tokenizers::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::checkpoint::{Checkpoint, TensorEntry, WeightDType};
use crate::error::{EngineError, Result};
use crate::network::Weight;

/// Makes host memory DMA-able by an accelerator (cuMemHostRegister on CUDA).
pub trait HostPinner: Send + Sync {
    /// Pins `bytes` read-only; `unpin` is called with the same slice before it is unmapped.
    fn pin(&self, bytes: &[u8]) -> Result<()>;
    fn unpin(&self, bytes: &[u8]);
}

/// Progress of a long admission, for logs and progress bars.
#[derive(Debug, Clone, Copy)]
pub struct AdmitProgress {
    pub resident_bytes: u64,
    pub total_bytes: u64,
}

/// How much is read per step of making pages resident (and per progress report).
const RESIDENCY_CHUNK: usize = 256 << 20;

struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &std::path::Path) -> Result<FileStamp> {
    let meta = std::fs::metadata(path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
    Ok(FileStamp { len: meta.len(), modified: meta.modified().ok() })
}

/// One checkpoint held by the pool (or, when it does not fit, held only while it loads), with the
/// host-side state an engine needs besides weights: parsing a 150k-entry tokenizer.json takes
/// longer than moving a 0.5B model's weights, so it is done once, at admission.
pub struct PooledCheckpoint {
    pub ckpt: Checkpoint,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Arc<Option<ChatTemplate>>,
    maps: Vec<Mmap>,
    stamps: Vec<FileStamp>,
    pinner: Option<Arc<dyn HostPinner>>,
    pub pinned: bool,
    pub admit_time: Duration,
    /// Of `admit_time`: making the pages resident, and pinning them.
    pub page_in_time: Duration,
    pub pin_time: Duration,
}

impl Drop for PooledCheckpoint {
    fn drop(&mut self) {
        if let (true, Some(p)) = (self.pinned, &self.pinner) {
            self.maps.iter().for_each(|m| p.unpin(m));
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
    fn still_current(&self) -> bool {
        self.ckpt
            .weight_files
            .iter()
            .zip(&self.stamps)
            .all(|(p, s)| stamp(p).is_ok_and(|now| now.len == s.len && now.modified == s.modified))
    }

    fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.maps[entry.file][entry.offsets.0..entry.offsets.1]
    }

    /// Copies every tensor onto `device`: float tensors as `dtype`, quantized ones as they are
    /// (they stay quantized on the device). From pinned pages each copy is a DMA straight into the
    /// tensor's device allocation; the copies are queued on the device's stream and this returns
    /// once all of them have landed.
    pub fn load_tensors(&self, device: &Device, dtype: DType) -> Result<HashMap<String, Weight>> {
        let mut out = HashMap::with_capacity(self.ckpt.tensors.len());
        for (name, entry) in &self.ckpt.tensors {
            let bytes = self.bytes(entry);
            let shape = entry.shape.as_slice();
            let err = |e: candle_core::Error| EngineError::Load(format!("tensor {name}: {e}"));
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
            .and_then(|t| t.to_dtype(dtype))
            .map_err(err)?;
            out.insert(name.clone(), Weight::Dense(weight));
        }
        device.synchronize().map_err(EngineError::load)?;
        Ok(out)
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
    entries: Mutex<HashMap<PathBuf, Entry>>,
    /// Admissions read whole files; one at a time keeps them from fighting over the disk.
    admit_lock: Mutex<()>,
}

impl CheckpointPool {
    pub fn new(capacity_bytes: u64, pinner: Option<Arc<dyn HostPinner>>) -> Self {
        Self { capacity_bytes, pinner, entries: Mutex::default(), admit_lock: Mutex::new(()) }
    }

    pub fn stats(&self) -> PoolStats {
        let entries = self.entries.lock().expect("poisoned");
        let resident: u64 = entries.values().map(|e| e.pooled.ckpt.weight_bytes).sum();
        let pinned: u64 = entries.values().filter(|e| e.pooled.pinned).map(|e| e.pooled.ckpt.weight_bytes).sum();
        PoolStats {
            entries: entries.len(),
            resident_bytes: resident,
            pinned_bytes: pinned,
            capacity_bytes: self.capacity_bytes,
        }
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

    /// How the pooled checkpoint at `dir` was admitted: making its pages resident, and pinning.
    pub fn admission_phases(&self, dir: &Path) -> Option<(Duration, Duration)> {
        let entries = self.entries.lock().expect("poisoned");
        entries.get(dir).map(|e| (e.pooled.page_in_time, e.pooled.pin_time))
    }

    /// Whether the checkpoint at `dir` (a registered model's path) is resident in the pool.
    pub fn holds(&self, dir: &Path) -> bool {
        self.entries.lock().expect("poisoned").contains_key(dir)
    }

    /// The pooled checkpoint at `dir` (a registered model's path): a hit is handed out as pooled,
    /// without opening and re-checking every shard header again; only a miss opens the checkpoint.
    pub fn checkout_path(&self, dir: &Path, progress: &dyn Fn(AdmitProgress)) -> Result<(Arc<PooledCheckpoint>, bool)> {
        if let Some(hit) = self.lookup(dir) {
            return Ok((hit, true));
        }
        self.checkout(Checkpoint::open(dir)?, progress)
    }

    /// The pooled checkpoint for `ckpt`, admitting it on a miss. Returns whether it was a hit.
    pub fn checkout(
        &self,
        ckpt: Checkpoint,
        progress: &dyn Fn(AdmitProgress),
    ) -> Result<(Arc<PooledCheckpoint>, bool)> {
        if let Some(hit) = self.lookup(&ckpt.dir) {
            return Ok((hit, true));
        }
        let _admitting = self.admit_lock.lock().expect("poisoned");
        if let Some(hit) = self.lookup(&ckpt.dir) {
            return Ok((hit, true));
        }
        let fits = ckpt.weight_bytes <= self.capacity_bytes;
        let pooled = Arc::new(self.admit(ckpt, fits, progress)?);
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
        Ok((pooled, false))
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

    fn admit(&self, ckpt: Checkpoint, pin: bool, progress: &dyn Fn(AdmitProgress)) -> Result<PooledCheckpoint> {
        let started = Instant::now();
        // Before any page is pinned, so a failure here leaves nothing to undo.
        let (tokenizer, chat_template) = (ckpt.load_tokenizer()?, ckpt.load_chat_template()?);
        let mut maps = Vec::new();
        let mut stamps = Vec::new();
        let total = ckpt.weight_bytes;
        let mut resident = 0u64;
        for path in &ckpt.weight_files {
            let err = |e: std::io::Error| EngineError::Load(format!("{}: {e}", path.display()));
            stamps.push(stamp(path)?);
            let file = File::open(path).map_err(err)?;
            let report = |bytes: usize| {
                resident += bytes as u64;
                progress(AdmitProgress { resident_bytes: resident, total_bytes: total });
            };
            let map = match admission_read() {
                AdmissionRead::Parallel => read_into_memory(&file, report),
                AdmissionRead::Mapped => map_resident(&file, report),
            }
            .map_err(err)?;
            maps.push(map);
        }
        let page_in_time = started.elapsed();
        let mut pinned = false;
        if let (true, Some(pinner)) = (pin, &self.pinner) {
            let mut done = Vec::new();
            for map in &maps {
                match pinner.pin(map) {
                    Ok(()) => done.push(map),
                    Err(e) => {
                        done.iter().for_each(|m| pinner.unpin(m));
                        tracing::warn!(error = %e, "could not pin checkpoint pages; loads will use pageable copies");
                        done.clear();
                        break;
                    }
                }
            }
            pinned = !done.is_empty();
        }
        Ok(PooledCheckpoint {
            ckpt,
            tokenizer: Arc::new(tokenizer),
            chat_template: Arc::new(chat_template),
            maps,
            stamps,
            pinner: self.pinner.clone(),
            pinned,
            admit_time: started.elapsed(),
            page_in_time,
            pin_time: started.elapsed() - page_in_time,
        })
    }
}

/// How admission makes a checkpoint resident: parallel reads into the pool's own memory (the
/// default), or the file's own pages, mapped and faulted in (`KINDLING_POOL_READ=mmap`, kept to
/// compare the two on a machine's disk).
enum AdmissionRead {
    Parallel,
    Mapped,
}

fn admission_read() -> AdmissionRead {
    match std::env::var("KINDLING_POOL_READ").as_deref() {
        Ok("mmap") => AdmissionRead::Mapped,
        _ => AdmissionRead::Parallel,
    }
}

/// The file mapped, every page faulted in by several threads (`MADV_POPULATE_READ` where the
/// kernel has it, else a read of each page).
fn map_resident(file: &File, mut progress: impl FnMut(usize)) -> std::io::Result<Mmap> {
    const PAGE: usize = 4096;
    // SAFETY: read-only map of a model file; see `Checkpoint::read_header`.
    let map = unsafe { Mmap::map(file) }?;
    let _ = map.advise(Advice::WillNeed);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(16);
    for (k, chunk) in map.chunks(RESIDENCY_CHUNK).enumerate() {
        let offset = k * RESIDENCY_CHUNK;
        let per = chunk.len().div_ceil(threads).next_multiple_of(PAGE).max(PAGE);
        std::thread::scope(|s| {
            for start in (offset..offset + chunk.len()).step_by(per) {
                let (map, part) = (&map, per.min(offset + chunk.len() - start));
                s.spawn(move || {
                    #[cfg(target_os = "linux")]
                    if map.advise_range(Advice::PopulateRead, start, part).is_ok() {
                        return;
                    }
                    let mut acc = 0u8;
                    for i in (start..start + part).step_by(PAGE) {
                        // SAFETY: i < map.len(); volatile so the read is not optimised away.
                        acc ^= unsafe { std::ptr::read_volatile(map.as_ptr().add(i)) };
                    }
                    std::hint::black_box(acc);
                });
            }
        });
        progress(chunk.len());
    }
    Ok(map)
}

/// Reads a whole file into memory of the pool's own (anonymous, huge pages where the kernel
/// gives them), from several threads reading 16 MiB pieces at once. Faulting an mmap of the file
/// in page by page ran at 1.7 GB/s on the lent H100 host, where parallel reads of the same
/// (cached) file ran at 36 GB/s. `progress` hears of each RESIDENCY_CHUNK read.
fn read_into_memory(file: &File, mut progress: impl FnMut(usize)) -> std::io::Result<Mmap> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 16 << 20;
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    if len == 0 {
        return memmap2::MmapOptions::new().len(1).map_anon()?.make_read_only();
    }
    let mut memory = memmap2::MmapOptions::new().len(len).map_anon()?;
    #[cfg(target_os = "linux")]
    let _ = memory.advise(Advice::HugePage);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(16);
    for (k, chunk) in memory.chunks_mut(RESIDENCY_CHUNK).enumerate() {
        let base = (k * RESIDENCY_CHUNK) as u64;
        let chunk_len = chunk.len();
        let pieces = Mutex::new(chunk.chunks_mut(PIECE).enumerate());
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> std::io::Result<()> {
                        loop {
                            let Some((i, piece)) = pieces.lock().expect("poisoned").next() else { return Ok(()) };
                            file.read_exact_at(piece, base + (i * PIECE) as u64)?;
                        }
                    })
                })
                .collect();
            readers.into_iter().try_for_each(|r| r.join().expect("reader thread"))
        })?;
        progress(chunk_len);
    }
    memory.make_read_only()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Architecture;
    use crate::tiny_model::{TinySpec, make_tiny_model};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountingPinner(AtomicUsize, AtomicUsize);

    impl HostPinner for CountingPinner {
        fn pin(&self, _: &[u8]) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn unpin(&self, _: &[u8]) {
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
        drop(pool.checkout(b.clone(), &|_| {}).unwrap());
        assert!(pool.contains(&b) && !pool.contains(&a), "a was least recently used");
        assert_eq!(pinner.0.load(Ordering::SeqCst), 2);
        assert_eq!(pinner.1.load(Ordering::SeqCst), 1, "evicting a unpins its pages");
    }

    #[test]
    fn a_checkpoint_larger_than_the_pool_loads_without_being_kept() {
        let (_d, ckpt) = tiny(Architecture::Qwen2);
        let pool = CheckpointPool::new(1, None);
        let (p, hit) = pool.checkout(ckpt.clone(), &|_| {}).unwrap();
        assert!(!hit && !p.pinned);
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
