//! Reading a checkpoint into the pool: the pages a file is read into, how far each file has
//! landed (loads wait on it), the parallel readers that fill them, and pinning afterwards.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use memmap2::{Advice, Mmap, MmapMut};

use super::{AdmitProgress, PooledCheckpoint};
use crate::error::{CheckpointError, Result};

/// How much is read per step of making pages resident (and per progress report).
const RESIDENCY_CHUNK: usize = 256 << 20;

/// A checkpoint file's bytes in the pool's memory. The admission's readers write them while a
/// load may already copy what has landed, so they are only ever viewed below the file's landed
/// mark (`Landed`), never as one slice while writes are under way.
pub(super) struct Pages {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    pub(super) owner: PagesOwner,
}

pub(super) enum PagesOwner {
    /// The file's own pages, mapped and faulted in before anyone reads them.
    Mapped(#[allow(dead_code)] Mmap),
    /// The pool's memory, filled by reads.
    Read(#[allow(dead_code)] MmapMut),
}

// SAFETY: the memory is owned by the mapping inside; it is written only by admission readers, each
// to pieces no one else touches, and read only below the landed mark that those writes publish.
unsafe impl Send for Pages {}
unsafe impl Sync for Pages {}

impl Pages {
    pub(super) fn mapped(map: Mmap) -> Self {
        Self { ptr: map.as_ptr().cast_mut(), len: map.len(), owner: PagesOwner::Mapped(map) }
    }

    pub(super) fn read(mut map: MmapMut, len: usize) -> Self {
        Self { ptr: map.as_mut_ptr(), len, owner: PagesOwner::Read(map) }
    }

    /// Bytes `a..b`.
    ///
    /// # Safety
    /// They must have landed (`Landed::wait`) and `a <= b <= len`.
    pub(super) unsafe fn range(&self, a: usize, b: usize) -> &[u8] {
        debug_assert!(a <= b && b <= self.len);
        // SAFETY: in bounds (caller); written and published before the landed mark passed them.
        unsafe { std::slice::from_raw_parts(self.ptr.add(a), b - a) }
    }

    /// The whole file, once all of it has landed.
    pub(super) fn all(&self) -> &[u8] {
        // SAFETY: only called on complete checkpoints (pinning, unpinning).
        unsafe { self.range(0, self.len) }
    }
}

/// How far each file has been read into its pages, contiguously from the start; loads wait on it.
pub(super) struct Landed {
    marks: Vec<AtomicUsize>,
    failed: Mutex<Option<String>>,
    moved: Condvar,
}

impl Landed {
    pub(super) fn new(lens: impl Iterator<Item = usize>, complete: bool) -> Self {
        let marks = lens.map(|len| AtomicUsize::new(if complete { len } else { 0 })).collect();
        Self { marks, failed: Mutex::new(None), moved: Condvar::new() }
    }

    /// Waits until bytes `..end` of `file` have landed (or the admission failed).
    pub(super) fn wait(&self, file: usize, end: usize) -> Result<()> {
        if self.marks[file].load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let mut failed = self.failed.lock().expect("poisoned");
        loop {
            if self.marks[file].load(Ordering::Acquire) >= end {
                return Ok(());
            }
            if let Some(e) = &*failed {
                return Err(CheckpointError::Load(format!("reading the checkpoint failed: {e}")));
            }
            failed = self.moved.wait(failed).expect("poisoned");
        }
    }

    pub(super) fn advance(&self, file: usize, to: usize) {
        let _held = self.failed.lock().expect("poisoned"); // no waiter misses the wake-up
        self.marks[file].store(to, Ordering::Release);
        self.moved.notify_all();
    }

    pub(super) fn fail(&self, error: String) {
        *self.failed.lock().expect("poisoned") = Some(error);
        self.moved.notify_all();
    }
}

/// Reads the files of an admission into its pages, from several threads reading 16 MiB pieces
/// at once, one RESIDENCY_CHUNK at a time, each chunk marked landed as it completes. Faulting an
/// mmap of the file in page by page ran at 1.7 GB/s on the lent H100 host, where parallel reads of
/// the same (cached) file ran at 36 GB/s.
pub(super) fn fill(
    pooled: &PooledCheckpoint,
    started: Instant,
    progress: &(dyn Fn(AdmitProgress) + Sync),
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 16 << 20;
    let total = pooled.ckpt.weight_bytes;
    let mut resident = 0u64;
    let mapped = matches!(pooled.pages.first().map(|p| &p.owner), Some(PagesOwner::Mapped(_)));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(16);
    let result = (|| -> Result<()> {
        if mapped {
            return Ok(()); // faulted in by `start_admission`
        }
        for (i, path) in pooled.ckpt.weight_files.iter().enumerate() {
            let err = |e: std::io::Error| CheckpointError::Load(format!("{}: {e}", path.display()));
            let file = File::open(path).map_err(err)?;
            let pages = &pooled.pages[i];
            for chunk_start in (0..pages.len).step_by(RESIDENCY_CHUNK) {
                let chunk_end = (chunk_start + RESIDENCY_CHUNK).min(pages.len);
                let next = AtomicUsize::new(chunk_start);
                std::thread::scope(|s| {
                    let readers: Vec<_> = (0..threads)
                        .map(|_| {
                            s.spawn(|| -> std::io::Result<()> {
                                loop {
                                    if pooled.is_abandoned() {
                                        return Err(std::io::Error::other("the load gave up on this read"));
                                    }
                                    let at = next.fetch_add(PIECE, Ordering::Relaxed);
                                    if at >= chunk_end {
                                        return Ok(());
                                    }
                                    let len = PIECE.min(chunk_end - at);
                                    // SAFETY: `at..at + len` is in bounds, given to this reader
                                    // alone, and not landed yet, so nothing reads it meanwhile.
                                    let piece = unsafe { std::slice::from_raw_parts_mut(pages.ptr.add(at), len) };
                                    file.read_exact_at(piece, at as u64)?;
                                }
                            })
                        })
                        .collect();
                    readers.into_iter().try_for_each(|r| r.join().expect("reader thread"))
                })
                .map_err(err)?;
                let last = i + 1 == pooled.pages.len() && chunk_end == pages.len;
                if last {
                    // Before the last bytes land, so a load that waited for them sees it.
                    pooled.times.lock().expect("poisoned").page_in = Some(started.elapsed());
                }
                pooled.landed.advance(i, chunk_end);
                resident += (chunk_end - chunk_start) as u64;
                progress(AdmitProgress { resident_bytes: resident, total_bytes: total });
            }
        }
        Ok(())
    })();
    match &result {
        Ok(()) => {
            pooled.times.lock().expect("poisoned").page_in.get_or_insert(started.elapsed());
        }
        Err(e) => pooled.landed.fail(e.to_string()),
    }
    result
}

/// Registers an admitted checkpoint's pages for DMA, off the path of the load that admitted it
/// (16 GB take about 0.4 s): later loads from the pool copy at the link's full speed.
pub(super) fn pin_in_background(pooled: Arc<PooledCheckpoint>) {
    let Some(pinner) = pooled.pinner.clone() else { return };
    let spawned = std::thread::Builder::new().name("pool-pin".into()).spawn(move || {
        let started = Instant::now();
        let mut done = Vec::new();
        for pages in &pooled.pages {
            match pinner.pin(pages.all()) {
                Ok(()) => done.push(pages),
                Err(e) => {
                    done.iter().for_each(|p| pinner.unpin(p.all()));
                    tracing::warn!(error = %e, "could not pin checkpoint pages; loads will use pageable copies");
                    return;
                }
            }
        }
        pooled.times.lock().expect("poisoned").pin = Some(started.elapsed());
        pooled.pinned.store(true, Ordering::Release);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start pinning checkpoint pages; loads will use pageable copies");
    }
}

/// How admission makes a checkpoint resident: parallel reads into the pool's own memory (the
/// default), or the file's own pages, mapped and faulted in (`KINDLING_POOL_READ=mmap`, kept to
/// compare the two on a machine's disk).
pub(super) enum AdmissionRead {
    Parallel,
    Mapped,
}

pub(super) fn admission_read() -> AdmissionRead {
    match std::env::var("KINDLING_POOL_READ").as_deref() {
        Ok("mmap") => AdmissionRead::Mapped,
        _ => AdmissionRead::Parallel,
    }
}

/// The file mapped, every page faulted in by several threads (`MADV_POPULATE_READ` where the
/// kernel has it, else a read of each page).
pub(super) fn map_resident(file: &File, mut progress: impl FnMut(usize)) -> std::io::Result<Mmap> {
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
