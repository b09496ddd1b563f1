//! The paged KV cache: one allocation per layer for K and one for V, carved into fixed-size
//! blocks; a sequence owns a list of blocks (its block table) and its keys and values are written
//! in place at their slots. Blocks come from and go back to one free list, so memory is never
//! fragmented by sequences of different lengths and a finished sequence's memory is reusable at
//! the very next step.

use candle_core::{DType, Device, Tensor};

use crate::error::{NetworkError, Result};

/// Tokens per block.
pub const BLOCK_SIZE: usize = 16;

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

/// The free list. Pure bookkeeping: the scheduler uses it without touching tensors.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        // Popped from the end: hand out low block numbers first (easier to read in a debugger).
        Self { free: (0..total as u32).rev().collect(), total }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Grows `table` until it covers `tokens` tokens; all or nothing.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..));
        true
    }

    /// Returns every block of `table` to the free list.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        debug_assert!(table.iter().all(|b| (*b as usize) < self.total && !self.free.contains(b)));
        self.free.append(table);
    }
}

/// The cache slot (block * BLOCK_SIZE + offset) of each position `0..len` of a sequence.
pub fn slots(table: &[u32], range: std::ops::Range<usize>) -> impl Iterator<Item = u32> + '_ {
    range.map(move |pos| table[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32)
}

/// The device memory behind the blocks: per layer, K and V as `[kv_heads, blocks * BLOCK_SIZE,
/// head_dim]`, so the keys a sequence gathers come out head-major, in the layout attention's
/// batched matmuls read, with no transposing copy.
pub struct KvStorage {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub blocks: usize,
}

impl KvStorage {
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let alloc =
            || Tensor::zeros((kv_heads, blocks * BLOCK_SIZE, head_dim), dtype, device).map_err(NetworkError::load);
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(Self { k, v, blocks })
    }

    /// Bytes the storage holds on its device.
    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_is_all_or_nothing_and_release_returns_every_block() {
        let mut a = BlockAllocator::new(4);
        let mut t1 = Vec::new();
        assert!(a.grow(&mut t1, BLOCK_SIZE + 1));
        assert_eq!((t1.len(), a.free()), (2, 2));
        assert!(a.grow(&mut t1, 2 * BLOCK_SIZE), "already covered");
        assert_eq!(t1.len(), 2);
        let mut t2 = Vec::new();
        assert!(!a.grow(&mut t2, 3 * BLOCK_SIZE));
        assert!(t2.is_empty() && a.free() == 2, "a failed grow takes nothing");
        a.release(&mut t1);
        assert_eq!((a.free(), a.used()), (4, 0));
        assert!(t1.is_empty());
    }

    #[test]
    fn slots_follow_the_block_table() {
        let table = [3, 0];
        let s: Vec<u32> = slots(&table, 14..18).collect();
        let b = BLOCK_SIZE as u32;
        assert_eq!(s, [3 * b + 14, 3 * b + 15, 0, 1]);
    }
}
