//! Choosing the next token from one sequence's logits. Each sequence owns its sampler and its
//! random generator, so a seed replays the same text whatever else shares the batch. Top-p never
//! sorts the whole vocabulary: it sorts a top-k prefilter and widens it only when the nucleus
//! does not fit.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::params::SamplingParams;

/// Candidates sorted first for top-p; grown 8x while the nucleus is larger.
const TOP_P_PREFILTER: usize = 64;

pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: StdRng,
}

/// Index of the largest value, the first one on ties (as numpy's argmax); NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Self { temperature: params.temperature, top_p: params.top_p, rng }
    }

    /// Greedy: the token is the argmax, no randomness.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        let max = logits[argmax(logits) as usize];
        // Unnormalised probabilities; non-finite logits get none.
        let weights: Vec<f32> =
            logits.iter().map(|l| if l.is_finite() { ((l - max) * inv_t).exp() } else { 0.0 }).collect();
        let total: f32 = weights.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return argmax(logits);
        }
        if self.top_p >= 1.0 {
            return self.draw(weights.iter().enumerate().map(|(i, w)| (i as u32, *w)), total);
        }
        let nucleus = nucleus(&weights, total * self.top_p);
        let mass = nucleus.iter().map(|(_, w)| w).sum();
        self.draw(nucleus.into_iter(), mass)
    }

    fn draw(&mut self, candidates: impl Iterator<Item = (u32, f32)>, total: f32) -> u32 {
        let mut u = self.rng.random::<f32>() * total;
        let mut last = 0;
        for (id, w) in candidates {
            if w <= 0.0 {
                continue;
            }
            last = id;
            if u < w {
                return id;
            }
            u -= w;
        }
        last // rounding left a sliver past the end
    }
}

/// The smallest set of most likely tokens whose weights reach `mass`, most likely first.
fn nucleus(weights: &[f32], mass: f32) -> Vec<(u32, f32)> {
    let mut k = TOP_P_PREFILTER.min(weights.len());
    loop {
        let mut ids: Vec<u32> = (0..weights.len() as u32).collect();
        let by_weight = |a: &u32, b: &u32| weights[*b as usize].total_cmp(&weights[*a as usize]).then(a.cmp(b));
        if k < ids.len() {
            ids.select_nth_unstable_by(k - 1, by_weight);
            ids.truncate(k);
        }
        ids.sort_unstable_by(by_weight);
        let mut acc = 0.0;
        for (n, id) in ids.iter().enumerate() {
            acc += weights[*id as usize];
            if acc >= mass {
                return ids[..=n].iter().map(|i| (*i, weights[*i as usize])).collect();
            }
        }
        if k >= weights.len() {
            return ids.iter().map(|i| (*i, weights[*i as usize])).collect();
        }
        k = (k * 8).min(weights.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, seed: Some(seed), ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
        assert_eq!(Sampler::new(&params(0.0, 1.0, 1)).sample(&[0.0, 9.0, 1.0]), 1);
    }

    #[test]
    fn a_seed_replays_the_same_draws() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 0.9, seed));
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_draws_only_from_the_nucleus_even_past_the_prefilter() {
        // 200 equally likely tokens hold 0.8 of the mass: the nucleus for p = 0.5 is wider than the
        // 64-token prefilter, and nothing outside those 200 may ever be drawn.
        let mut logits = vec![-1e9f32; 1000];
        for l in logits.iter_mut().take(200) {
            *l = 0.0;
        }
        logits[500] = 1.0f32.ln() + (50.0f32).ln(); // weight 50 of 250 in total: 0.2 of the mass
        let mut s = Sampler::new(&params(1.0, 0.5, 3));
        for _ in 0..200 {
            let id = s.sample(&logits);
            assert!(id < 200 || id == 500, "{id} is outside the nucleus");
        }
        assert_eq!(nucleus(&[0.1, 0.6, 0.3], 0.65), vec![(1, 0.6), (2, 0.3)]);
    }
}
