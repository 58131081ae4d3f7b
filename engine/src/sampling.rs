//! Next-token sampling: greedy, or temperature with top-k / top-p, from a seeded generator.

/// How to pick the next token.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let state = params.seed ^ 0x9E37_79B9_7F4A_7C15;
        Sampler { params, state }
    }

    /// SplitMix64: small, fast and good enough for sampling.
    fn next_f32(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut sum = 0.0;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        let mut cum = 0.0;
        let mut keep = None;
        for (i, c) in cand.iter_mut().enumerate() {
            c.1 /= sum;
            cum += c.1;
            if cum >= p.top_p && keep.is_none() {
                keep = Some(i + 1);
            }
        }
        let keep = keep.unwrap_or(cand.len());
        cand.truncate(keep);
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut r = self.next_f32() * total;
        for c in &cand {
            if r < c.1 {
                return c.0;
            }
            r -= c.1;
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// ln softmax(`logits`)[`id`]: the log-probability a next-token distribution gives `id`, over
/// the whole vocabulary, in f64 with the largest logit subtracted first (no overflow).
pub fn log_prob(logits: &[f32], id: u32) -> f32 {
    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    (f64::from(logits[id as usize]) - max - sum.ln()) as f32
}

/// [`log_prob`] of `targets[i]` under row `i` of `logits` (`vocab` values a row), the rows in
/// parallel (each row's value is computed alone, so it does not depend on the others).
pub fn log_probs(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f32> {
    use rayon::prelude::*;
    logits.par_chunks_exact(vocab).zip(targets.par_iter()).map(|(row, &id)| log_prob(row, id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_is_the_log_softmax() {
        // p = [1/4, 3/4]
        let logits = [0.0, 3f32.ln()];
        assert!((log_prob(&logits, 0) - 0.25f32.ln()).abs() < 1e-7);
        assert!((log_prob(&logits, 1) - 0.75f32.ln()).abs() < 1e-7);
        // Large logits do not overflow; tiny probabilities keep their digits.
        assert_eq!(log_prob(&[1000.0, 1000.0], 1), 0.5f32.ln());
        assert!((log_prob(&[0.0, -200.0], 1) - -200.0).abs() < 1e-4);
        // Over a vocabulary the probabilities sum to one; rows are independent.
        let row: Vec<f32> = (0..4096).map(|i| ((i * 7919) % 113) as f32 * 0.37 - 20.0).collect();
        let total: f64 = (0..4096).map(|i| f64::from(log_prob(&row, i)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        let two: Vec<f32> = row.iter().chain(&logits.repeat(2048)).copied().collect();
        assert_eq!(log_probs(&two, 4096, &[17, 1]), [log_prob(&row, 17), log_prob(&logits.repeat(2048), 1)]);
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed }
    }

    #[test]
    fn greedy_top_k_top_p_and_seed() {
        let logits = [0.1, 3.0, 2.9, -1.0, 0.0];
        assert_eq!(Sampler::new(params(0.0, 0, 1.0, 1)).sample(&logits), 1);
        // top-k 2 only ever yields the two best.
        let mut s = Sampler::new(params(1.0, 2, 1.0, 7));
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2));
        assert!(draws.contains(&1) && draws.contains(&2));
        // A tiny top-p keeps only the best.
        let mut s = Sampler::new(params(1.0, 0, 0.01, 7));
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // Same seed, same draws; another seed differs somewhere.
        let run = |seed| {
            let mut s = Sampler::new(params(2.0, 0, 1.0, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
