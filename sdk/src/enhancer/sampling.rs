//! Choosing the next token from the decoder's logits: greedy, or seeded sampling with
//! temperature, top-k and top-p.
//!
//! Sampling is reproducible across platforms for a given seed: the random numbers come from
//! SplitMix64 (Steele, Lea & Flood 2014; the constants of Java's `SplittableRandom`), one
//! 64-bit draw per generated token turned into a uniform in [0, 1) from its top 53 bits. The
//! filters run in transformers' order (temperature, then top-k, then top-p) in f64, and the token
//! is found by walking the kept tokens from most to least likely. Greedy decoding does not
//! touch the generator. (Seeds do not reproduce transformers' sampled outputs: torch's
//! multinomial uses its own generator.)

use crate::error::{Error, Result};

/// How the enhancer picks each token.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampling {
    /// The most likely token (the lowest id on a tie, as `torch.argmax`).
    #[default]
    Greedy,
    Random(RandomSampling),
}

/// Seeded sampling. `top_k = 0` and `top_p = 1.0` turn those filters off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomSampling {
    /// > 0; below 1 sharpens the distribution, above 1 flattens it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches top_p, in (0, 1].
    pub top_p: f32,
    /// `None` draws a seed, reported in the result.
    pub seed: Option<u64>,
}

impl Default for RandomSampling {
    /// Qwen3's recommended non-thinking setting.
    fn default() -> Self {
        RandomSampling { temperature: 0.7, top_k: 20, top_p: 0.8, seed: None }
    }
}

pub const MAX_TEMPERATURE: f32 = 100.0;

impl Sampling {
    pub fn check(&self) -> Result<()> {
        if let Sampling::Random(r) = self {
            if !(r.temperature.is_finite() && r.temperature > 0.0 && r.temperature <= MAX_TEMPERATURE) {
                return Err(Error::invalid(format!(
                    "temperature must be in (0, {MAX_TEMPERATURE}] (got {}); use greedy decoding for temperature 0",
                    r.temperature
                )));
            }
            if !(r.top_p.is_finite() && r.top_p > 0.0 && r.top_p <= 1.0) {
                return Err(Error::invalid(format!("top_p must be in (0, 1] (got {})", r.top_p)));
            }
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and fully specified, so a seed means the same thing everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks tokens for one generation.
pub(crate) struct TokenPicker {
    sampling: Sampling,
    rng: SplitMix64,
}

impl TokenPicker {
    pub fn new(sampling: Sampling, seed: u64) -> Self {
        TokenPicker { sampling, rng: SplitMix64::new(seed) }
    }

    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Random(r) => sample(logits, &r, self.rng.next_f64()),
        }
    }
}

/// Index of the largest value; the first one on a tie. NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// One draw given a uniform `u` in [0, 1).
pub fn sample(logits: &[f32], r: &RandomSampling, u: f64) -> u32 {
    let t = r.temperature as f64;
    // Most likely first; equal logits keep the lower id first, so the order is total.
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut kept: Vec<(u32, f64)> =
        logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v as f64 / t)).collect();
    if kept.is_empty() {
        return argmax(logits);
    }
    if r.top_k > 0 && r.top_k < kept.len() {
        kept.select_nth_unstable_by(r.top_k - 1, order);
        kept.truncate(r.top_k);
    }
    kept.sort_unstable_by(order);
    let max = kept[0].1;
    let mut probs: Vec<f64> = kept.iter().map(|(_, l)| (l - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if r.top_p < 1.0 {
        let mut cumulative = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= r.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    let mass: f64 = probs[..keep].iter().sum();
    let target = u * mass;
    let mut cumulative = 0.0;
    for (i, p) in probs[..keep].iter().enumerate() {
        cumulative += p;
        if target < cumulative {
            return kept[i].0;
        }
    }
    kept[keep - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // First outputs for seed 0 (published with the algorithm; also Java's SplittableRandom).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn filters() {
        let logits = [1.0, 3.0, 2.0, 0.0];
        let r = |k, p| RandomSampling { temperature: 1.0, top_k: k, top_p: p, seed: None };
        // top_k 1 is greedy whatever u is.
        assert!((0..10).all(|i| sample(&logits, &r(1, 1.0), i as f64 / 10.0) == 1));
        // A tiny top_p keeps only the best token too.
        assert_eq!(sample(&logits, &r(0, 0.01), 0.99), 1);
        // top_k 2 never returns tokens outside {1, 2}.
        assert!((0..100).all(|i| [1, 2].contains(&sample(&logits, &r(2, 1.0), i as f64 / 100.0))));
        // u walks the sorted distribution: p(1) = e^3 / (e^0 + e^1 + e^2 + e^3) = 0.6439.
        assert_eq!(sample(&logits, &r(0, 1.0), 0.64), 1);
        assert_eq!(sample(&logits, &r(0, 1.0), 0.65), 2);
    }
}
