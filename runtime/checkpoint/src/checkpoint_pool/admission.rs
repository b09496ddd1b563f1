//! Reading a checkpoint into the pool: the pages a file is read into, how far each file has
//! landed (loads wait on it), the parallel readers that fill them, and the pinning of each cell
//! as it is read.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use memmap2::{Advice, Mmap, MmapMut};

use super::{AdmitProgress, PooledCheckpoint};
use crate::direct_io;
use crate::error::{CheckpointError, Result};

/// How much is read per step of making pages resident (and per progress report), and pinned per
/// registration: the pool's default cell.
pub(super) const CELL: usize = 256 << 20;

/// Bytes `a..b` of file `file`'s pages, registered with the pinner.
pub(super) type Registration = (usize, usize, usize);

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
    Mapped(Mmap),
    /// The pool's memory, filled by reads.
    Read(MmapMut),
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

    /// Faults bytes `a..b` in writable without writing them (`MADV_POPULATE_WRITE`), so a
    /// registration pins the very pages the readers then write, and the readers fault nothing.
    /// Fails on kernels before 5.14 and off Linux.
    pub(super) fn populate_writable(&self, a: usize, b: usize) -> std::io::Result<()> {
        match &self.owner {
            #[cfg(target_os = "linux")]
            PagesOwner::Read(map) => map.advise_range(memmap2::Advice::PopulateWrite, a, b - a),
            _ => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
        }
    }

    /// Bytes the mapping holds: the file's, then slack to the end of its last page.
    pub(super) fn capacity(&self) -> usize {
        match &self.owner {
            PagesOwner::Mapped(map) => map.len(),
            PagesOwner::Read(map) => map.len(),
        }
    }

    /// Where bytes `a..b` are, read or not.
    pub(super) fn address(&self, a: usize, b: usize) -> super::HostRange {
        assert!(a <= b && b <= self.len);
        super::HostRange { start: self.ptr as usize + a, len: b - a }
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

    /// Marks bytes `..to` of `file` landed (never moving a mark back).
    pub(super) fn advance(&self, file: usize, to: usize) {
        let _held = self.failed.lock().expect("poisoned"); // no waiter misses the wake-up
        self.marks[file].fetch_max(to, Ordering::Release);
        self.moved.notify_all();
    }

    pub(super) fn fail(&self, error: String) {
        *self.failed.lock().expect("poisoned") = Some(error);
        self.moved.notify_all();
    }
}

/// Reads the files of an admission into its pages from several threads, each taking the next
/// 16 MiB piece (in file order, with no pause between cells). A cell whose pieces, and every
/// piece before it, have all been read is handed on, in order: to the pinning thread
/// (`pin_cells`), which marks it landed once registered, or straight to landed. With
/// `KINDLING_POOL_READ=direct`, files not in the page cache are read with `O_DIRECT`, straight
/// into the pool's pages. Faulting an mmap of the file in page by page ran at 1.7 GB/s on the
/// lent H100 host, where parallel reads of the same (cached) file ran at 36 GB/s.
pub(super) fn fill(
    pooled: &Arc<PooledCheckpoint>,
    started: Instant,
    progress: &(dyn Fn(AdmitProgress) + Sync),
) -> Result<()> {
    const PIECE: usize = 16 << 20;
    let cell = pooled.cell;
    let cells_of = |i: usize| {
        let len = pooled.pages[i].len;
        (0..len).step_by(cell).map(move |a| (i, a, (a + cell).min(len)))
    };
    let cells: Vec<_> = (0..pooled.pages.len()).flat_map(cells_of).collect();
    let mapped = pooled.read == AdmissionRead::Mapped;
    let direct = pooled.read == AdmissionRead::Direct;
    let opened: Vec<Source> = if mapped {
        Vec::new()
    } else {
        (pooled.ckpt.weight_files.iter())
            .map(|path| {
                Source::open(path, direct).map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))
            })
            .collect::<Result<_>>()
            .inspect_err(|e| pooled.landed.fail(e.to_string()))?
    };
    // Ahead of the readers only where they read at the disk's pace: readers of cached files run
    // ahead of any registration, and faulting in beside them only fights them for the pages.
    let ahead = pooled.pin_order == PinOrder::Ahead && !opened.is_empty() && opened.iter().all(|s| s.direct.is_some());
    let pin = pin_cells(pooled.clone(), if ahead { cells.clone() } else { Vec::new() });
    let hand_on = |i: usize, a: usize, b: usize| match &pin {
        Some(cells) if cells.send((i, a, b)).is_ok() => {}
        _ => pooled.landed.advance(i, b),
    };
    if mapped {
        // Faulted in by `start_admission`, and landed already: only pinning is left.
        cells.iter().for_each(|&(i, a, b)| hand_on(i, a, b));
        pooled.times.lock().expect("poisoned").page_in.get_or_insert(started.elapsed());
        return Ok(());
    }
    // Pieces never cross a cell, so a cell is done when its own pieces are.
    let pieces: Vec<(usize, usize, usize, usize)> = (cells.iter().enumerate())
        .flat_map(|(c, &(i, a, b))| (a..b).step_by(PIECE).map(move |at| (c, i, at, PIECE.min(b - at))))
        .collect();
    let total = pooled.ckpt.weight_bytes;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(16);
    let next = AtomicUsize::new(0);
    // Pieces still unread per cell, the first cell not yet handed on, and the bytes before it.
    let unread: Vec<_> = cells.iter().map(|&(_, a, b)| (b - a).div_ceil(PIECE)).collect();
    let frontier = Mutex::new((unread, 0usize, 0u64));
    let read = |(c, i, at, len): (usize, usize, usize, usize)| -> Result<()> {
        if pooled.is_abandoned() {
            return Err(CheckpointError::Load("the load gave up on this read".into()));
        }
        let pages = &pooled.pages[i];
        // A direct read fills the piece's last block whole (past the file's end, into the
        // mapping's slack); pieces start on block edges, so no other piece shares a block.
        let room = len.next_multiple_of(direct_io::ALIGN).min(pages.capacity() - at);
        // SAFETY: `at..at + room` is in the mapping, given to this reader alone, and not landed
        // yet, so nothing reads it meanwhile.
        let piece = unsafe { std::slice::from_raw_parts_mut(pages.ptr.add(at), room) };
        (opened[i].read(piece, len, at as u64))
            .map_err(|e| CheckpointError::Load(format!("{}: {e}", pooled.ckpt.weight_files[i].display())))?;
        let mut held = frontier.lock().expect("poisoned");
        let (unread, first, resident) = &mut *held;
        unread[c] -= 1;
        while *first < cells.len() && unread[*first] == 0 {
            let (i, a, b) = cells[*first];
            *first += 1;
            if *first == cells.len() {
                // Before the last bytes land, so a load that waited for them sees it.
                pooled.times.lock().expect("poisoned").page_in = Some(started.elapsed());
            }
            hand_on(i, a, b);
            *resident += (b - a) as u64;
            progress(AdmitProgress { resident_bytes: *resident, total_bytes: total });
        }
        Ok(())
    };
    let result = std::thread::scope(|s| {
        let readers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let Some(&piece) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else { return Ok(()) };
                        if let Err(e) = read(piece) {
                            next.store(pieces.len(), Ordering::Relaxed); // the others stop too
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().expect("reader thread")).collect::<Result<Vec<()>>>()
    });
    match result {
        Ok(_) => {
            pooled.times.lock().expect("poisoned").page_in.get_or_insert(started.elapsed());
            Ok(())
        }
        Err(e) => {
            pooled.landed.fail(e.to_string());
            Err(e)
        }
    }
}

/// Starts the thread that registers an admission's cells for DMA, each on its own, and marks
/// each landed once it is both read and registered: a miss's own copies are DMA, as a hit's are.
/// Cells in `ahead` (all of them, in order, with `KINDLING_POOL_PIN=ahead` and direct reads) are
/// faulted in writable and registered before the readers reach them, so the disk writes into
/// pages that are resident already; the others are registered as they arrive read. On the lent
/// H200 the first token came 0.04 s after the read ended with cells registered as read, 0.07 s
/// with no pinning at all, and 0.5 s when the pages were pinned after the load instead:
/// registrations hold up an engine's first steps. A cell that cannot be registered (the
/// memory-lock limit) ends the pinning; the rest land unpinned and copy through the driver's
/// staging buffer. `None` where nothing is pinned (no GPU, or copies onto it do not honour
/// cells): the readers mark cells landed.
fn pin_cells(pooled: Arc<PooledCheckpoint>, ahead: Vec<Registration>) -> Option<mpsc::Sender<Registration>> {
    let pinner = pooled.pinner.clone().filter(|_| pooled.may_pin())?;
    let (cells, read) = mpsc::channel::<Registration>();
    // Not a thread the admission joins: a thread that has used the driver can hang at its exit
    // while an engine uses the device, and the load never waits for it to end.
    let spawned = std::thread::Builder::new().name("pool-pin".into()).spawn(move || {
        let mut spent = Duration::ZERO;
        let mut pinning = true;
        let mut pinned_bytes = 0;
        let mut pin = |(file, a, b): Registration, pinning: &mut bool| {
            if !*pinning || pooled.is_abandoned() {
                return;
            }
            let started = Instant::now();
            match pinner.pin(pooled.pages[file].address(a, b)) {
                Ok(()) => {
                    pooled.registered.lock().expect("poisoned").push((file, a, b));
                    pinned_bytes += b - a;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not pin checkpoint pages; the rest copy from pageable memory");
                    *pinning = false;
                }
            }
            spent += started.elapsed();
        };
        // Cells read so far, in order (the readers hand them on in order), and how many landed.
        let mut arrived = std::collections::VecDeque::new();
        let mut landed = 0;
        let mut registered_ahead = 0;
        for &(file, a, b) in &ahead {
            if !pinning || pooled.is_abandoned() {
                break;
            }
            if let Err(e) = pooled.pages[file].populate_writable(a, b) {
                tracing::debug!(error = %e, "cannot fault pool pages in ahead of the read; cells are pinned as read");
                break;
            }
            pin((file, a, b), &mut pinning);
            registered_ahead += 1;
            arrived.extend(read.try_iter());
            while landed < registered_ahead
                && let Some((file, _, b)) = arrived.pop_front()
            {
                pooled.landed.advance(file, b);
                landed += 1;
            }
        }
        for cell in arrived.into_iter().chain(read) {
            if landed >= registered_ahead {
                pin(cell, &mut pinning);
            }
            pooled.landed.advance(cell.0, cell.2);
            landed += 1;
        }
        if pinned_bytes == pooled.pages.iter().map(|p| p.len).sum::<usize>() {
            pooled.times.lock().expect("poisoned").pin = Some(spent);
            pooled.pinned.store(true, Ordering::Release);
        }
    });
    match spawned {
        Ok(_) => Some(cells),
        Err(e) => {
            tracing::warn!(error = %e, "could not start pinning checkpoint pages; loads copy from pageable memory");
            None
        }
    }
}

/// When an admission's cells are registered: for direct reads, before the readers reach them
/// (the default), so that the last cell lands registered as the disk delivers it; otherwise, or
/// with `KINDLING_POOL_PIN=behind`, once each is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PinOrder {
    Ahead,
    Behind,
}

/// How admission makes a checkpoint resident: parallel reads into the pool's own memory, direct
/// from the disk for files not in the page cache and through it for the others (the default);
/// the same reads all through the page cache (`KINDLING_POOL_READ=buffered`); or the file's own
/// pages, mapped and faulted in (`KINDLING_POOL_READ=mmap`). Direct reads were the disk's best
/// on the lent H200 host, and a miss read that way put every byte on the GPU as in the files
/// (`KINDLING_POOL_VERIFY=1`; BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AdmissionRead {
    Buffered,
    Direct,
    Mapped,
}

/// The admission settings from the environment (`KINDLING_POOL_READ`, `KINDLING_POOL_PIN`).
pub(super) fn admission_from_env() -> (AdmissionRead, PinOrder) {
    let read = match std::env::var("KINDLING_POOL_READ").as_deref() {
        Ok("mmap") => AdmissionRead::Mapped,
        Ok("buffered") => AdmissionRead::Buffered,
        _ => AdmissionRead::Direct,
    };
    let pin = match std::env::var("KINDLING_POOL_PIN").as_deref() {
        Ok("behind") => PinOrder::Behind,
        _ => PinOrder::Ahead,
    };
    (read, pin)
}

/// A checkpoint file opened for the readers: direct where it is worth it, always buffered too.
struct Source {
    buffered: File,
    direct: Option<File>,
}

impl Source {
    /// Reads go direct when `direct` is asked for and less than half of the file is in the page
    /// cache (a file just downloaded is read from memory, not again from the disk), and the file
    /// system takes `O_DIRECT`.
    fn open(path: &std::path::Path, direct: bool) -> std::io::Result<Self> {
        let buffered = File::open(path)?;
        let uncached = || direct_io::cached_fraction(&buffered).is_ok_and(|f| f < 0.5);
        let direct = if direct && uncached() { direct_io::open_direct(path).ok() } else { None };
        Ok(Self { buffered, direct })
    }

    /// Reads bytes `offset..offset + want` into `memory`, which has room for the last block of a
    /// direct read (see `direct_io::read_exact_direct`).
    fn read(&self, memory: &mut [u8], want: usize, offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.direct {
            Some(direct) => direct_io::read_exact_direct(direct, &self.buffered, memory, want, offset),
            None => self.buffered.read_exact_at(&mut memory[..want], offset),
        }
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
    for (k, chunk) in map.chunks(CELL).enumerate() {
        let offset = k * CELL;
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
