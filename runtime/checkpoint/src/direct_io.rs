//! Reading model files around the page cache: how much of a file is cached, and reads with
//! `O_DIRECT`, which move the disk's bytes straight into the caller's memory. A checkpoint read
//! into the pool has no use for a second copy in the page cache, and on the lent H200 host (and
//! on this project's build machine) direct reads into huge pages ran well ahead of buffered ones.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// What an `O_DIRECT` read's offsets, lengths and memory must be multiples of (the largest
/// logical block size in use; pages are at least this).
pub const ALIGN: usize = 4096;

/// The fraction of `file`'s pages in the page cache (`mincore` on a map of it; reads nothing).
pub fn cached_fraction(file: &File) -> io::Result<f64> {
    let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    if len == 0 {
        return Ok(1.0);
    }
    // SAFETY: a read-only shared map of the file, used only for `mincore`, which reads nothing.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut resident = vec![0u8; len.div_ceil(ALIGN)];
    // SAFETY: `resident` holds one byte per 4 KiB page of the mapping (pages are at least that).
    let rc = unsafe { libc::mincore(map, len, resident.as_mut_ptr()) };
    let error = io::Error::last_os_error();
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(map, len) };
    if rc != 0 {
        return Err(error);
    }
    Ok(resident.iter().filter(|&&r| r & 1 == 1).count() as f64 / resident.len() as f64)
}

/// Drops `file`'s pages from the page cache (those of a file nobody maps), writing out dirty ones
/// first (a file just written would otherwise keep them): its next read comes from the disk.
pub fn drop_cached(file: &File) -> io::Result<()> {
    file.sync_all()?;
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        rc => Err(io::Error::from_raw_os_error(rc)),
    }
}

/// `path` opened for direct reads, or why not (a file system without `O_DIRECT`: tmpfs before
/// Linux 6.6, some network file systems).
pub fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)
}

/// Reads bytes `offset..offset + want` of `file` (opened with `open_direct`) into `memory`'s
/// start. `offset` and `memory`'s address must be multiples of `ALIGN`, and `memory` must hold
/// `want` rounded up to `ALIGN`: the last block is read whole, and its bytes past the end of the
/// file are left as they were. Reads the remainder through `buffered` (the same file, opened
/// normally) where the direct read stops short or the kernel refuses it (`EINVAL`).
pub fn read_exact_direct(file: &File, buffered: &File, memory: &mut [u8], want: usize, offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    debug_assert!(offset.is_multiple_of(ALIGN as u64) && (memory.as_ptr() as usize).is_multiple_of(ALIGN));
    let request = want.next_multiple_of(ALIGN);
    let mut got = 0;
    while got < want && got.is_multiple_of(ALIGN) {
        match file.read_at(&mut memory[got..request], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    if got < want {
        buffered.read_exact_at(&mut memory[got..want], offset + got as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page-aligned memory of `len` bytes (a whole number of pages).
    fn aligned(len: usize) -> memmap2::MmapMut {
        memmap2::MmapOptions::new().len(len).map_anon().unwrap()
    }

    #[test]
    fn direct_reads_match_the_file_whole_and_at_an_unaligned_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights");
        // Not a whole number of blocks, so the last read runs past the end of the file.
        let bytes: Vec<u8> = (0..3 * ALIGN + 1234).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let buffered = File::open(&path).unwrap();
        // Where the file system refuses O_DIRECT (tmpfs), the buffered file reads instead.
        let direct = open_direct(&path).unwrap_or_else(|_| File::open(&path).unwrap());
        let mut memory = aligned(4 * ALIGN);
        memory.fill(0xAA);
        read_exact_direct(&direct, &buffered, &mut memory, bytes.len(), 0).unwrap();
        assert_eq!(&memory[..bytes.len()], &bytes[..]);
        // From the second block on: the offset is aligned, the length is not.
        let mut memory = aligned(3 * ALIGN);
        read_exact_direct(&direct, &buffered, &mut memory, bytes.len() - ALIGN, ALIGN as u64).unwrap();
        assert_eq!(&memory[..bytes.len() - ALIGN], &bytes[ALIGN..]);
        // Asking for more than the file holds is an error, not a short read.
        let mut memory = aligned(5 * ALIGN);
        let past_end = read_exact_direct(&direct, &buffered, &mut memory, 4 * ALIGN + 10, 0);
        assert_eq!(past_end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn cached_fraction_sees_a_file_just_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights");
        std::fs::write(&path, vec![1u8; 8 * ALIGN]).unwrap();
        let _ = std::fs::read(&path).unwrap();
        let fraction = cached_fraction(&File::open(&path).unwrap()).unwrap();
        assert!((0.0..=1.0).contains(&fraction));
        assert!(fraction > 0.5, "a file just written and read is cached: {fraction}");
    }
}
