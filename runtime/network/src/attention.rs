//! Attention over the paged cache. A step's index tensors (positions, cache slots to write, and
//! how each token reaches its keys) are built once per step on the host and shared by every
//! layer. On a GPU every token of the step attends through our paged kernel in one launch,
//! reading K/V in place (`KernelMeta`). Elsewhere K/V are gathered: grouped-query attention folds
//! the query heads of one K/V head into the row dimension, so K and V are never repeated per
//! query head; scores are at most `[heads, chunk, context]`, never `[prompt, prompt]` for a whole
//! long prompt, and a chunk whose scores would pass `MAX_SCORES` attends in passes of fewer
//! queries, so a long context never makes a step's transient memory grow with it.

use candle_core::{DType, Device, Tensor};

use super::config::NetConfig;
use super::{Batch, SeqChunk};
use crate::kv_cache::slots;

/// Elements one attention pass may make: `[heads, queries, keys]` scores of 128 Mi elements
/// (512 MiB in f32), with its softmax beside it. A 1,024-token chunk of a 32-head model fits in
/// one pass up to 4,096 keys; beyond, its queries attend in several passes. Gathered decode
/// groups count their gathered K and V as well.
pub const MAX_SCORES: usize = 128 << 20;

/// One sequence's view of the step.
pub struct SeqAttention {
    /// Offset of the sequence's tokens in the packed batch.
    offset: usize,
    /// Cache slots of the keys it attends to, in position order.
    read_slots: Tensor,
    /// The sequence's queries, split so each pass's scores stay under the step's budget.
    passes: Vec<QueryPass>,
}

/// Queries `start..start + len` of a sequence's chunk, attended together.
struct QueryPass {
    start: usize,
    len: usize,
    /// `[len, keys]` additive mask (0 or -inf); `None` when every key is visible to every query.
    mask: Option<Tensor>,
}

/// How a step's tokens reach their keys.
pub enum StepAttention {
    /// Every token of the step, decode and prefill alike, through the paged kernel in one launch:
    /// it reads K/V in place (`KernelMeta`).
    InPlace { meta: Tensor, table_width: usize },
    /// Gathered: the decode tokens at the front of the batch together, then the other sequences
    /// one by one.
    Gathered { decode: Option<DecodeGroup>, seqs: Vec<SeqAttention> },
}

/// The decode tokens at the front of the batch (one token each), gathered in groups of
/// consecutive sequences, each padded to its longest context and masked; a group's gathered K/V
/// and scores stay under `MAX_SCORES` elements.
pub struct DecodeGroup {
    groups: Vec<GatheredGroup>,
}

struct GatheredGroup {
    seqs: usize,
    keys: usize,
    /// `[seqs * keys]` cache slots, padding repeating a valid slot.
    read_slots: Tensor,
    /// `[1, seqs, 1, keys]` additive mask hiding the padding.
    mask: Option<Tensor>,
}

pub struct StepPlan {
    /// Position of each packed token, `[tokens]`.
    pub positions: Tensor,
    /// Cache slot of each packed token, `[tokens]`.
    pub slots: Tensor,
    /// Rows of the packed batch whose logits are wanted.
    pub sample_rows: Tensor,
    pub samples: usize,
    pub attention: StepAttention,
}

/// First key position a query at `pos` may see.
fn first_visible(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// The keys a decode token at `chunk.start` attends to, as a range of positions.
fn decode_keys(chunk: &SeqChunk, window: Option<usize>) -> (usize, usize) {
    (first_visible(chunk.start, window), chunk.start + 1)
}

/// The paged kernel's metadata for a step: a row per query token, (first visible key, keys,
/// table index), then each chunk's block table padded with zeros (which the kernel never reads)
/// to `width` entries. A prefill token sees its sequence's keys up to its own position.
#[derive(Debug, PartialEq)]
pub struct KernelMeta {
    rows: Vec<u32>,
    tables: Vec<u32>,
    width: usize,
}

impl KernelMeta {
    pub fn new(width: usize) -> Self {
        Self { rows: Vec::new(), tables: Vec::new(), width }
    }

    /// Adds a chunk: its block table, and a row per token.
    pub fn push_chunk(&mut self, chunk: &SeqChunk, window: Option<usize>) {
        let table = (self.tables.len() / self.width.max(1)) as u32;
        self.tables.extend(chunk.block_table.iter().copied().chain(std::iter::repeat(0)).take(self.width));
        for pos in chunk.start..chunk.start + chunk.len {
            let lo = first_visible(pos, window);
            self.rows.extend([lo as u32, (pos + 1 - lo) as u32, table]);
        }
    }

    /// The rows, then the tables: what the kernel reads.
    pub fn into_values(self) -> Vec<u32> {
        let mut values = self.rows;
        values.extend(self.tables);
        values
    }
}

fn decode_group(
    chunks: &[SeqChunk],
    config: &NetConfig,
    device: &Device,
    max_scores: usize,
) -> candle_core::Result<DecodeGroup> {
    let window = config.sliding_window;
    // Per sequence and key: its scores (one per query head) and its gathered K and V.
    let per_key = config.num_heads + 2 * config.kv_dim();
    let mut groups = Vec::new();
    let mut rest = chunks;
    while !rest.is_empty() {
        // The longest prefix whose padded size fits (one sequence at least).
        let (mut n, mut keys) = (0, 0);
        while n < rest.len() {
            let (lo, hi) = decode_keys(&rest[n], window);
            let widest = keys.max(hi - lo);
            if n > 0 && (n + 1) * widest * per_key > max_scores {
                break;
            }
            (n, keys) = (n + 1, widest);
        }
        groups.push(gathered_group(&rest[..n], keys, window, device)?);
        rest = &rest[n..];
    }
    Ok(DecodeGroup { groups })
}

/// Decode tokens whose keys are gathered together, padded to `keys` (the longest).
fn gathered_group(
    chunks: &[SeqChunk],
    keys: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<GatheredGroup> {
    let mut slots_flat = Vec::with_capacity(chunks.len() * keys);
    let mut mask = Vec::with_capacity(chunks.len() * keys);
    let mut padded = false;
    for c in chunks {
        let (lo, hi) = decode_keys(c, window);
        let n = hi - lo;
        let first = slots(&c.block_table, lo..lo + 1).next().expect("one key at least");
        slots_flat.extend(slots(&c.block_table, lo..hi));
        slots_flat.extend(std::iter::repeat_n(first, keys - n));
        mask.extend((0..keys).map(|k| if k < n { 0f32 } else { f32::NEG_INFINITY }));
        padded |= n < keys;
    }
    Ok(GatheredGroup {
        seqs: chunks.len(),
        keys,
        read_slots: Tensor::from_vec(slots_flat, chunks.len() * keys, device)?,
        mask: if padded { Some(Tensor::from_vec(mask, (1, chunks.len(), 1, keys), device)?) } else { None },
    })
}

fn seq_attention(
    chunk: &SeqChunk,
    offset: usize,
    window: Option<usize>,
    heads: usize,
    max_scores: usize,
    device: &Device,
) -> candle_core::Result<SeqAttention> {
    let end = chunk.start + chunk.len;
    let key_start = first_visible(chunk.start, window);
    let read: Vec<u32> = slots(&chunk.block_table, key_start..end).collect();
    let keys = read.len();
    let per_pass = (max_scores / (keys * heads).max(1)).clamp(1, chunk.len.max(1));
    let mut passes = Vec::with_capacity(chunk.len.div_ceil(per_pass));
    for first in (0..chunk.len).step_by(per_pass) {
        let len = per_pass.min(chunk.len - first);
        let mask = if chunk.len > 1 {
            let mut m = Vec::with_capacity(len * keys);
            for pos in chunk.start + first..chunk.start + first + len {
                let lo = first_visible(pos, window);
                m.extend((key_start..end).map(|k| if k <= pos && k >= lo { 0f32 } else { f32::NEG_INFINITY }));
            }
            Some(Tensor::from_vec(m, (len, keys), device)?)
        } else {
            None
        };
        passes.push(QueryPass { start: first, len, mask });
    }
    Ok(SeqAttention { offset, read_slots: Tensor::from_vec(read, keys, device)?, passes })
}

impl StepPlan {
    /// A step of decode tokens only, every one sampled, whose inputs already lie on the device
    /// (a CUDA graph's fixed buffers): `positions` and `slots` `[seqs]`, `rows` `0..seqs`, and
    /// the paged kernel's `meta` (`KernelMeta`, tables `table_width` wide).
    pub fn decode_in_place(
        positions: Tensor,
        slots: Tensor,
        rows: Tensor,
        meta: Tensor,
        table_width: usize,
    ) -> candle_core::Result<Self> {
        let seqs = positions.dim(0)?;
        Ok(Self {
            positions,
            slots,
            sample_rows: rows,
            samples: seqs,
            attention: StepAttention::InPlace { meta, table_width },
        })
    }

    pub fn new(batch: &Batch, config: &NetConfig, device: &Device) -> candle_core::Result<Self> {
        Self::with_score_budget(batch, config, device, MAX_SCORES)
    }

    /// `new`, with prefill attention passes of at most `max_scores` score elements each.
    pub fn with_score_budget(
        batch: &Batch,
        config: &NetConfig,
        device: &Device,
        max_scores: usize,
    ) -> candle_core::Result<Self> {
        let n = batch.tokens.len();
        let mut positions = Vec::with_capacity(n);
        let mut write = Vec::with_capacity(n);
        let mut sample_rows = Vec::new();
        let (window, heads) = (config.sliding_window, config.num_heads);
        let in_place = super::paged_kernel::applies(config, device);
        let mut seqs = Vec::with_capacity(if in_place { 0 } else { batch.chunks.len() });
        let decoding = batch.chunks.iter().take_while(|c| c.len == 1).count();
        let width = batch.chunks.iter().map(|c| c.block_table.len()).max().unwrap_or(0);
        let mut meta = KernelMeta::new(width);
        let mut offset = 0;
        for (i, chunk) in batch.chunks.iter().enumerate() {
            let range = chunk.start..chunk.start + chunk.len;
            positions.extend(range.clone().map(|p| p as u32));
            write.extend(slots(&chunk.block_table, range));
            if in_place {
                meta.push_chunk(chunk, window);
            } else if i >= decoding {
                seqs.push(seq_attention(chunk, offset, window, heads, max_scores, device)?);
            }
            offset += chunk.len;
            if chunk.sample {
                sample_rows.push((offset - 1) as u32);
            }
        }
        if offset != n {
            candle_core::bail!("batch has {n} tokens but its chunks cover {offset}");
        }
        let attention = if in_place {
            let values = meta.into_values();
            let len = values.len();
            StepAttention::InPlace { meta: Tensor::from_vec(values, len, device)?, table_width: width }
        } else {
            let decode = match decoding {
                0 => None,
                _ => Some(decode_group(&batch.chunks[..decoding], config, device, max_scores)?),
            };
            StepAttention::Gathered { decode, seqs }
        };
        let samples = sample_rows.len();
        Ok(Self {
            positions: Tensor::from_vec(positions, n, device)?,
            slots: Tensor::from_vec(write, n, device)?,
            sample_rows: Tensor::from_vec(sample_rows, samples, device)?,
            samples,
            attention,
        })
    }
}

/// Attention of every sequence in the step: `q` is `[tokens, heads, head_dim]`, the caches
/// `[kv_heads, slots, head_dim]` (this step's keys and values already written); returns
/// `[tokens, q_dim]`. Batched matmuls run over (kv head, sequence) pairs with the query heads of
/// one K/V head as rows, so K and V are read as gathered: never repeated, never transposed.
pub fn paged(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    plan: &StepPlan,
    c: &NetConfig,
) -> candle_core::Result<Tensor> {
    let (kvh, hd, group) = (c.num_kv_heads, c.head_dim, c.num_heads / c.num_kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let (decode, seqs) = match &plan.attention {
        StepAttention::InPlace { meta, table_width } => {
            let tokens = q.dim(0)?;
            let out = in_place(&q.contiguous()?, k_cache, v_cache, meta, *table_width, scale as f32)?;
            return out.reshape((tokens, kvh * group * hd));
        }
        StepAttention::Gathered { decode, seqs } => (decode, seqs),
    };
    let mut outs = Vec::with_capacity(seqs.len() + 1);
    if let Some(DecodeGroup { groups }) = decode {
        let mut first = 0;
        let mut parts = Vec::with_capacity(groups.len());
        for g in groups {
            let (n, keys) = (g.seqs, g.keys);
            // q: [n, heads, hd] -> [kv_heads, n, group, hd]; keys: [kv_heads, n, keys, hd].
            let qd = q.narrow(0, first, n)?.reshape((n, kvh, group, hd))?.transpose(0, 1)?.contiguous()?;
            let gather = |cache: &Tensor| cache.index_select(&g.read_slots, 1)?.reshape((kvh, n, keys, hd));
            let (ks, vs) = (gather(k_cache)?, gather(v_cache)?);
            let mut scores = (qd.matmul(&ks.transpose(2, 3)?)?.to_dtype(DType::F32)? * scale)?;
            if let Some(mask) = &g.mask {
                scores = scores.broadcast_add(mask)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vs.dtype())?;
            // [kv_heads, n, group, hd] -> [n, heads * hd]
            parts.push(probs.matmul(&vs)?.transpose(0, 1)?.reshape((n, kvh * group * hd))?);
            first += n;
        }
        outs.push(Tensor::cat(&parts, 0)?);
    }
    for s in seqs {
        let keys = s.read_slots.dim(0)?;
        let (ks, vs) = (k_cache.index_select(&s.read_slots, 1)?, v_cache.index_select(&s.read_slots, 1)?);
        for pass in &s.passes {
            let len = pass.len;
            // [len, heads, hd] -> [kv_heads, group * len, hd]: the query heads of one K/V head as rows.
            let qs = q.narrow(0, s.offset + pass.start, len)?.transpose(0, 1)?.contiguous()?;
            let qs = qs.reshape((kvh, group * len, hd))?;
            let mut scores = (qs.matmul(&ks.transpose(1, 2)?)?.to_dtype(DType::F32)? * scale)?;
            if let Some(mask) = &pass.mask {
                scores =
                    scores.reshape((kvh, group, len, keys))?.broadcast_add(mask)?.reshape((kvh, group * len, keys))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vs.dtype())?;
            let out = probs
                .matmul(&vs)?
                .reshape((kvh * group, len, hd))?
                .transpose(0, 1)?
                .reshape((len, kvh * group * hd))?;
            outs.push(out);
        }
    }
    Tensor::cat(&outs, 0)
}

/// Attention by the paged kernel: `q` `[tokens, heads, hd]` -> `[tokens, heads, hd]`.
#[cfg(feature = "cuda")]
fn in_place(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &Tensor,
    table_width: usize,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let op = super::paged_kernel::PagedAttention { meta: meta.clone(), table_width, scale, parts: None };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// Without CUDA the kernel never applies (`paged_kernel::applies`), so this is unreachable.
#[cfg(not(feature = "cuda"))]
fn in_place(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: f32) -> candle_core::Result<Tensor> {
    candle_core::bail!("the paged attention kernel needs a build with the cuda feature")
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::kv_cache::KvStorage;
    use crate::test_support::{F32, config, dense, random_weights};
    use crate::{Batch, Network};

    #[test]
    fn long_chunks_attend_in_passes_that_give_the_same_logits() {
        // A 40-token chunk (three blocks) beside a 7-token one, with a budget that lets the long
        // one attend 3 queries per pass; with and without a sliding window.
        for extra in [serde_json::json!({}), serde_json::json!({"sliding_window": 8})] {
            let c = config("mistral", extra);
            let network = Network::new(c.clone(), dense(&random_weights(&c)), 64, F32, &Device::Cpu).unwrap();
            let kv = KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, 4, DType::F32, &Device::Cpu).unwrap();
            let chunk = |len, block_table| SeqChunk { start: 0, len, block_table, sample: true };
            let batch = Batch {
                tokens: (0..47).map(|t| (t * 7 + 3) % 96).collect(),
                chunks: vec![chunk(40, vec![0, 1, 2]), chunk(7, vec![3])],
            };
            let tokens = Tensor::new(batch.tokens.as_slice(), &Device::Cpu).unwrap();
            let run = |max_scores| {
                let plan = StepPlan::with_score_budget(&batch, &c, &Device::Cpu, max_scores).unwrap();
                let StepAttention::Gathered { seqs, .. } = &plan.attention else { panic!("the CPU gathers") };
                let passes: Vec<usize> = seqs.iter().map(|s| s.passes.len()).collect();
                let logits = network.forward_planned(&tokens, &plan, &kv).unwrap().to_vec2::<f32>().unwrap();
                (passes, logits)
            };
            let (one_pass, whole) = run(MAX_SCORES);
            let (passes, split) = run(3 * 40 * c.num_heads);
            assert_eq!((one_pass, passes), (vec![1, 1], vec![14, 1]));
            let worst = whole.iter().flatten().zip(split.iter().flatten()).map(|(a, b)| (a - b).abs());
            let worst = worst.fold(0f32, f32::max);
            assert!(worst < 1e-5, "{:?}: passes change the logits by {worst}", c.sliding_window);
        }
    }

    #[test]
    fn gathered_decode_groups_give_the_same_logits() {
        // Five decode tokens with 4 to 21 keys, gathered (the CPU has no paged kernel) in one
        // group, then in groups held to two sequences of 21 keys.
        let c = config("llama", serde_json::json!({}));
        let network = Network::new(c.clone(), dense(&random_weights(&c)), 64, F32, &Device::Cpu).unwrap();
        let kv = KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, 8, DType::F32, &Device::Cpu).unwrap();
        let seqs = [(3usize, vec![0u32]), (20, vec![1, 2]), (9, vec![3]), (1, vec![4]), (17, vec![5, 6])];
        let chunk = |start, len, table: &Vec<u32>| SeqChunk { start, len, block_table: table.clone(), sample: true };
        let prefill = Batch {
            tokens: seqs.iter().flat_map(|(len, _)| (0..*len as u32).map(|t| (t * 5 + 1) % 96)).collect(),
            chunks: seqs.iter().map(|(len, table)| chunk(0, *len, table)).collect(),
        };
        network.forward(&prefill, &kv).unwrap();
        let decode = Batch {
            tokens: vec![10, 20, 30, 40, 50],
            chunks: seqs.iter().map(|(len, table)| chunk(*len, 1, table)).collect(),
        };
        let tokens = Tensor::new(decode.tokens.as_slice(), &Device::Cpu).unwrap();
        let run = |max_scores| {
            let plan = StepPlan::with_score_budget(&decode, &c, &Device::Cpu, max_scores).unwrap();
            let StepAttention::Gathered { decode: Some(DecodeGroup { groups }), .. } = &plan.attention else {
                panic!("the CPU gathers decode keys")
            };
            let sizes: Vec<usize> = groups.iter().map(|g| g.seqs).collect();
            // Running the step again rewrites the same K/V, so both runs see the same cache.
            (sizes, network.forward_planned(&tokens, &plan, &kv).unwrap().to_vec2::<f32>().unwrap())
        };
        let (one, whole) = run(MAX_SCORES);
        let (split, grouped) = run(2 * 21 * (c.num_heads + 2 * c.kv_dim()));
        assert_eq!((one, split), (vec![5], vec![2, 2, 1]));
        let worst = whole.iter().flatten().zip(grouped.iter().flatten()).map(|(a, b)| (a - b).abs());
        let worst = worst.fold(0f32, f32::max);
        assert!(worst < 1e-5, "groups change the logits by {worst}");
    }

    #[test]
    fn kernel_meta_gives_each_token_its_causal_keys_and_its_table() {
        // A decode token, then a 3-token prefill chunk at positions 5..8, with a window of 4.
        let chunk = |start, len, block_table| SeqChunk { start, len, block_table, sample: true };
        let mut meta = KernelMeta::new(3);
        meta.push_chunk(&chunk(20, 1, vec![4, 2]), None);
        meta.push_chunk(&chunk(5, 3, vec![7]), Some(4));
        let rows = [0, 21, 0, 2, 4, 1, 3, 4, 1, 4, 4, 1];
        let tables = [4, 2, 0, 7, 0, 0];
        assert_eq!(meta.into_values(), [rows.as_slice(), tables.as_slice()].concat());
    }
}
