//! Copies from host memory onto a GPU that honour how that memory was pinned. The checkpoint pool
//! registers its pages for DMA in fixed cells (one registration per cell, each made as the cell
//! is read in), and the driver refuses a copy whose source runs across two registrations
//! (`CUDA_ERROR_INVALID_VALUE`), so every copy here is cut at the cells' edges. The same copies
//! take a range of a matrix's columns as pitched DMAs (`cuMemcpy2D`, one per run of rows within a
//! cell) instead of gathering it on the host first: a tensor-parallel rank loads its part of the
//! o and down projections that way.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "cuda"));

/// Turns these copies off (a failed self-check): the caller gathers on the host and copies
/// through candle, and must not pin memory in cells.
pub fn disable(reason: &str) {
    if ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(reason, "cell-wise host copies disabled; parts are gathered on the host");
    }
}

/// Whether copies go through here (a CUDA build whose self-check passed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether host memory may be registered in cells: every copy onto a GPU is cut at their edges
/// here, or there is no GPU to copy onto.
pub fn cells_honoured() -> bool {
    !cfg!(feature = "cuda") || enabled()
}

/// Where a host buffer lies among its memory's registrations: `offset` bytes past the start of a
/// run of registrations of `cell` bytes each (the last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cells {
    pub offset: usize,
    pub cell: usize,
}

impl Cells {
    /// Memory registered as one piece, or not at all: nothing to cut.
    pub const WHOLE: Cells = Cells { offset: 0, cell: usize::MAX };
}

/// What to copy out of a buffer: `rows` rows of `width` bytes, the first at byte `x`, each
/// `pitch` bytes after the one before. It lands as `rows * width` contiguous bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub rows: usize,
    pub pitch: usize,
    pub x: usize,
    pub width: usize,
}

impl Block {
    /// Bytes `start..start + len`, as one row.
    pub fn span(start: usize, len: usize) -> Self {
        Self { rows: 1, pitch: len, x: start, width: len }
    }

    /// Columns `start..start + len` of a row-major `[rows, cols]` matrix of `elem`-byte elements.
    pub fn columns([rows, cols]: [usize; 2], [start, len]: [usize; 2], elem: usize) -> Self {
        Self { rows, pitch: cols * elem, x: start * elem, width: len * elem }
    }

    /// One past the last byte read.
    fn end(&self) -> usize {
        if self.rows == 0 || self.width == 0 { 0 } else { self.x + (self.rows - 1) * self.pitch + self.width }
    }
}

/// One copy the driver is given: `rows` rows of `width` bytes from `src` (rows `pitch` apart in
/// the source) to `dst` (rows `block.width` apart in the destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub src: usize,
    pub dst: usize,
    pub rows: usize,
    pub width: usize,
    pub pitch: usize,
}

/// `block` cut into pieces, none of which reads across a cell's edge: runs of whole rows inside
/// one cell, and a row that crosses an edge in one piece per cell it touches.
pub fn pieces(block: Block, cells: Cells) -> Vec<Piece> {
    let Block { rows, pitch, x, width } = block;
    let mut out = Vec::new();
    if rows == 0 || width == 0 {
        return out;
    }
    let cell_of = |byte: usize| (cells.offset + byte) / cells.cell;
    let mut row = 0;
    while row < rows {
        let start = x + row * pitch;
        let cell = cell_of(start);
        if cell_of(start + width - 1) != cell {
            // A row across an edge: a piece per cell.
            let mut at = start;
            while at < start + width {
                let edge = ((cell_of(at) + 1) * cells.cell).saturating_sub(cells.offset).min(start + width);
                out.push(Piece { src: at, dst: row * width + (at - start), rows: 1, width: edge - at, pitch });
                at = edge;
            }
            row += 1;
            continue;
        }
        // Rows from `row` on, as long as each ends before this cell does.
        let cell_end = (cell + 1).saturating_mul(cells.cell).saturating_sub(cells.offset);
        let fit = (cell_end - start - width).checked_div(pitch).map_or(rows - row, |more| more + 1);
        let run = fit.min(rows - row);
        out.push(Piece { src: start, dst: row * width, rows: run, width, pitch });
        row += run;
    }
    out
}

/// `block` of `bytes` as a tensor of `shape` and `dtype` on `device`, copied piece by piece
/// (`pieces`) and queued on the device's stream: the caller synchronizes before `bytes` may go.
/// `None` where these copies do not apply (not a CUDA GPU, turned off, or not a float dtype):
/// the caller gathers on the host.
pub fn to_device(
    bytes: &[u8],
    cells: Cells,
    block: Block,
    dtype: DType,
    shape: &[usize],
    device: &Device,
) -> Option<Result<Tensor>> {
    if !enabled() || !device.is_cuda() || !matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
        return None;
    }
    let elements: usize = shape.iter().product();
    if elements == 0 {
        return None; // nothing to copy, and no allocation to make
    }
    if block.end() > bytes.len() || block.rows * block.width != elements * dtype.size_in_bytes() {
        return Some(Err(candle_core::Error::Msg(format!(
            "{block:?} of {} bytes does not make a {dtype:?} tensor of shape {shape:?}",
            bytes.len()
        ))));
    }
    #[cfg(feature = "cuda")]
    {
        let copy = match dtype {
            DType::BF16 => cuda::copy::<half::bf16>,
            DType::F16 => cuda::copy::<half::f16>,
            _ => cuda::copy::<f32>,
        };
        Some(copy(bytes, &pieces(block, cells), block.width, shape, device))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cells; // off a GPU nothing is pinned, so nothing is cut
        None
    }
}

/// Copies what the pool would, from memory registered the way it registers it, and counts the
/// elements that differ from the host's own gather (0 when the copies are right). `register`
/// pins a slice (one registration) and `release` unpins it. Run at GPU boot.
pub fn self_check(
    device: &Device,
    register: &dyn Fn(&[u8]) -> std::result::Result<(), String>,
    release: &dyn Fn(&[u8]),
) -> Result<usize> {
    const PAGE: usize = 4096;
    const CELLS: usize = 4;
    let values: Vec<f32> = (0..(CELLS * PAGE / 4) as u32).map(|i| i as f32).collect();
    // Page-aligned memory, as the pool's is, faulted in writable and each page registered on its
    // own. The pool may register a cell before its readers write it, so the values are written
    // only after the registrations: the copies must see them.
    let mut memory = memmap2::MmapOptions::new().len(CELLS * PAGE).map_anon().map_err(candle_core::Error::wrap)?;
    memory.fill(0);
    let mut registered = 0;
    let outcome = (|| -> Result<usize> {
        for k in 0..CELLS {
            register(&memory[k * PAGE..(k + 1) * PAGE]).map_err(candle_core::Error::Msg)?;
            registered += 1;
        }
        memory.iter_mut().zip(values.iter().flat_map(|v| v.to_le_bytes())).for_each(|(m, b)| *m = b);
        let cells = Cells { offset: 0, cell: PAGE };
        // A span across every page, from inside the first to inside the last.
        let (start, len) = (100, CELLS * PAGE / 4 - 200);
        let span = Block::span(start * 4, len * 4);
        let mut wrong =
            compare(to_device(&memory, cells, span, DType::F32, &[len], device), &values[start..start + len])?;
        // Columns 50..300 of a [13, 300] matrix at byte 400: runs of rows in a page, rows across edges.
        let (rows, cols) = (13, 300);
        let matrix = &values[100..100 + rows * cols];
        let block = Block::columns([rows, cols], [50, 250], 4);
        let shifted = Cells { offset: 400, cell: PAGE };
        let expected: Vec<f32> = matrix.chunks(cols).flat_map(|r| r[50..].iter().copied()).collect();
        let bytes = &memory[400..400 + rows * cols * 4];
        wrong += compare(to_device(bytes, shifted, block, DType::F32, &[rows, 250], device), &expected)?;
        Ok(wrong)
    })();
    (0..registered).for_each(|k| release(&memory[k * PAGE..(k + 1) * PAGE]));
    outcome
}

fn compare(copied: Option<Result<Tensor>>, expected: &[f32]) -> Result<usize> {
    let Some(copied) = copied else { return Ok(0) };
    let copied = copied?.flatten_all()?.to_vec1::<f32>()?;
    Ok(copied.iter().zip(expected).filter(|(a, b)| a != b).count() + copied.len().abs_diff(expected.len()))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtrMut, sys};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{Device, Result, Storage, Tensor, bail};

    use super::Piece;

    /// Queues `pieces` of `bytes` into a new `[shape]` allocation whose rows are `width` bytes.
    pub fn copy<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        bytes: &[u8],
        pieces: &[Piece],
        width: usize,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let dev = device.as_cuda_device()?;
        let stream = dev.cuda_stream();
        let elements: usize = shape.iter().product();
        // SAFETY: every element is written by the pieces below (they tile the block) before
        // anything reads it.
        let mut dst = unsafe { dev.alloc::<T>(elements) }?;
        {
            let (base, _record) = dst.device_ptr_mut(&stream);
            stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
            for piece in pieces {
                let src = bytes[piece.src..].as_ptr();
                let dst = base + piece.dst as u64;
                // Contiguous rows (a span, or whole rows of a matrix) go as one plain copy.
                let plain = piece.rows == 1 || (piece.pitch == piece.width && piece.width == width);
                // SAFETY: each piece reads within `bytes` (`to_device` checked the block's end) and
                // writes within the allocation; the caller keeps `bytes` alive until the stream
                // has run these copies.
                let status = unsafe {
                    if plain {
                        sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), piece.rows * piece.width, stream.cu_stream())
                    } else {
                        let copy = sys::CUDA_MEMCPY2D {
                            srcXInBytes: 0,
                            srcY: 0,
                            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
                            srcHost: src.cast(),
                            srcDevice: 0,
                            srcArray: std::ptr::null_mut(),
                            srcPitch: piece.pitch,
                            dstXInBytes: 0,
                            dstY: 0,
                            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                            dstHost: std::ptr::null_mut(),
                            dstDevice: dst,
                            dstArray: std::ptr::null_mut(),
                            dstPitch: width,
                            WidthInBytes: piece.width,
                            Height: piece.rows,
                        };
                        sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream())
                    }
                };
                if status != sys::CUresult::CUDA_SUCCESS {
                    bail!("copying {} rows of {} bytes to the GPU: {status:?}", piece.rows, piece.width);
                }
            }
        }
        let storage = CudaStorage::wrap_cuda_slice(dst, dev.clone());
        Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the driver does with `pieces`, on the host.
    fn run(pieces: &[Piece], src: &[u8], width: usize, out: &mut [u8]) {
        for p in pieces {
            for r in 0..p.rows {
                let (s, d) = (p.src + r * p.pitch, p.dst + r * width);
                out[d..d + p.width].copy_from_slice(&src[s..s + p.width]);
            }
        }
    }

    #[test]
    fn pieces_tile_the_block_and_never_read_across_a_cell_edge() {
        let src: Vec<u8> = (0..6000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut cases = 0;
        for cell in [64, 100, 4096, usize::MAX] {
            for offset in [0, 1, 63, 999] {
                for block in [
                    Block::span(0, 6000),
                    Block::span(17, 130),
                    Block::columns([50, 120], [0, 120], 1), // whole rows
                    Block::columns([50, 30], [5, 20], 4),   // a part of each row
                    Block::columns([7, 300], [250, 50], 2), // rows wider than some cells
                    Block::columns([0, 10], [0, 10], 4),
                ] {
                    let pieces = pieces(block, Cells { offset, cell });
                    for p in &pieces {
                        let rows_end = p.src + (p.rows - 1) * p.pitch + p.width;
                        let (first, last) = ((offset + p.src) / cell, (offset + rows_end - 1) / cell);
                        assert_eq!(first, last, "{p:?} of {block:?} reads across an edge of {cell}-byte cells");
                    }
                    let mut out = vec![0u8; block.rows * block.width];
                    run(&pieces, &src, block.width, &mut out);
                    let expected: Vec<u8> = (0..block.rows)
                        .flat_map(|r| src[block.x + r * block.pitch..][..block.width].iter().copied())
                        .collect();
                    assert_eq!(out, expected, "{block:?} in {cell}-byte cells at {offset}");
                    let copied: usize = pieces.iter().map(|p| p.rows * p.width).sum();
                    assert_eq!(copied, block.rows * block.width, "each byte once");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 96);
    }

    #[test]
    fn a_block_inside_one_cell_is_one_piece() {
        let block = Block::columns([8, 16], [4, 8], 2);
        let pieces = pieces(block, Cells { offset: 4096, cell: 4096 });
        assert_eq!(pieces, vec![Piece { src: 8, dst: 0, rows: 8, width: 16, pitch: 32 }]);
        assert_eq!(super::pieces(block, Cells::WHOLE).len(), 1);
    }

    #[test]
    fn off_a_gpu_nothing_is_copied_here() {
        let bytes = [0u8; 16];
        assert!(to_device(&bytes, Cells::WHOLE, Block::span(0, 16), DType::F32, &[4], &Device::Cpu).is_none());
    }
}
