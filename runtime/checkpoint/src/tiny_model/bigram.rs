//! Embedding and output-head matrices for the tiny model from the corpus' bigram statistics,
//! so that an untrained two-layer network still writes corpus-like text: the token embeddings
//! and the LM head are a rank-r factorization of log P(next | current).

use super::SplitMix64;

/// Rank-`rank` factors `(embed, head)`, both `vocab × rank` row-major, with
/// `head · rmsnorm(embed[a])` ≈ the row-centered log P(· | a) of the corpus.
pub fn bigram_factors(sequences: &[Vec<u32>], vocab: usize, rank: usize, rng: &mut SplitMix64) -> (Vec<f32>, Vec<f32>) {
    let log_probs = centered_log_bigrams(sequences, vocab);
    let q = top_left_singular_vectors(&log_probs, vocab, rank, rng);
    // b = qᵀ L (rank × vocab), so L ≈ q b.
    let mut b = vec![0f64; rank * vocab];
    for a in 0..vocab {
        for k in 0..rank {
            let qa = q[a * rank + k];
            if qa != 0.0 {
                for (bv, lv) in b[k * vocab..(k + 1) * vocab].iter_mut().zip(&log_probs[a * vocab..(a + 1) * vocab]) {
                    *bv += qa * lv;
                }
            }
        }
    }
    // The network applies rmsnorm to the embedding; scale the head by the typical row rms of q
    // so the logits come out at the scale of the log-probabilities.
    let row_rms = |a: usize| (q[a * rank..(a + 1) * rank].iter().map(|v| v * v).sum::<f64>() / rank as f64).sqrt();
    let typical_rms = (0..vocab).map(row_rms).sum::<f64>() / vocab as f64;
    let embed_scale = 1.0 / typical_rms.max(1e-12);
    let embed = q.iter().map(|v| (v * embed_scale) as f32).collect();
    let mut head = vec![0f32; vocab * rank];
    for k in 0..rank {
        for v in 0..vocab {
            head[v * rank + k] = (b[k * vocab + v] * typical_rms) as f32;
        }
    }
    (embed, head)
}

/// log P(b | a) with add-0.1 smoothing, each row shifted to mean zero (logits are shift-free).
fn centered_log_bigrams(sequences: &[Vec<u32>], vocab: usize) -> Vec<f64> {
    let mut counts = vec![0f64; vocab * vocab];
    for seq in sequences {
        for pair in seq.windows(2) {
            counts[pair[0] as usize * vocab + pair[1] as usize] += 1.0;
        }
    }
    const ALPHA: f64 = 0.1;
    for row in counts.chunks_mut(vocab) {
        let total: f64 = row.iter().sum::<f64>() + ALPHA * vocab as f64;
        row.iter_mut().for_each(|c| *c = ((*c + ALPHA) / total).ln());
        let mean = row.iter().sum::<f64>() / vocab as f64;
        row.iter_mut().for_each(|c| *c -= mean);
    }
    counts
}

/// Orthonormal `n × rank` basis of L's dominant column space, by subspace iteration.
fn top_left_singular_vectors(l: &[f64], n: usize, rank: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let mut q: Vec<f64> = (0..n * rank).map(|_| f64::from(rng.normal())).collect();
    orthonormalize(&mut q, n, rank);
    for _ in 0..8 {
        // One step of power iteration on L Lᵀ: z = Lᵀ q, then q = L z.
        let z = multiply(l, n, rank, &q, true);
        q = multiply(l, n, rank, &z, false);
        orthonormalize(&mut q, n, rank);
    }
    q
}

/// `L x` (or `Lᵀ x` when `transpose`) for square `n × n` L and `n × rank` x, both row-major.
fn multiply(l: &[f64], n: usize, rank: usize, x: &[f64], transpose: bool) -> Vec<f64> {
    let mut out = vec![0f64; n * rank];
    for a in 0..n {
        for b in 0..n {
            let lab = l[a * n + b];
            if lab == 0.0 {
                continue;
            }
            let (dst, src) = if transpose { (b, a) } else { (a, b) };
            for k in 0..rank {
                out[dst * rank + k] += lab * x[src * rank + k];
            }
        }
    }
    out
}

/// Modified Gram-Schmidt on the columns of a row-major `n × rank` matrix.
fn orthonormalize(m: &mut [f64], n: usize, rank: usize) {
    for k in 0..rank {
        for j in 0..k {
            let dot: f64 = (0..n).map(|i| m[i * rank + k] * m[i * rank + j]).sum();
            (0..n).for_each(|i| m[i * rank + k] -= dot * m[i * rank + j]);
        }
        let norm = (0..n).map(|i| m[i * rank + k].powi(2)).sum::<f64>().sqrt().max(1e-12);
        (0..n).for_each(|i| m[i * rank + k] /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_prefer_the_observed_successor() {
        // Token 1 is always followed by 2, 2 by 3, 3 by 1.
        let seqs = vec![vec![1, 2, 3, 1, 2, 3, 1, 2, 3, 1]];
        let (vocab, rank) = (8, 4);
        let (embed, head) = bigram_factors(&seqs, vocab, rank, &mut SplitMix64(1));
        let logits = |a: usize| -> Vec<f32> {
            let e = &embed[a * rank..(a + 1) * rank];
            let rms = (e.iter().map(|v| v * v).sum::<f32>() / rank as f32).sqrt();
            (0..vocab).map(|v| (0..rank).map(|k| head[v * rank + k] * e[k] / rms).sum()).collect()
        };
        let argmax = |l: Vec<f32>| l.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
        assert_eq!(argmax(logits(1)), 2);
        assert_eq!(argmax(logits(2)), 3);
        assert_eq!(argmax(logits(3)), 1);
    }
}
