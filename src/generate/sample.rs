//! Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p
//! and a repetition penalty, from a seeded generator so runs repeat.

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep the k most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set whose probability reaches p (None: all).
    pub top_p: Option<f32>,
    /// Divide positive (multiply negative) logits of tokens already seen by this (1: off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Sampler {
        let rng = SplitMix64(config.seed);
        Sampler { config, rng }
    }

    /// The next token given the last position's `logits` `[vocab]` and the tokens so far.
    pub fn next(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let mut seen = seen.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repetition_penalty
                    } else {
                        *l * c.repetition_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates by descending logit.
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let k = c.top_k.unwrap_or(ids.len()).clamp(1, ids.len());
        if k < ids.len() {
            ids.select_nth_unstable_by(k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            ids.truncate(k);
        }
        ids.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let max = logits[ids[0] as usize];
        let mut probs: Vec<f32> = ids
            .iter()
            .map(|&i| ((logits[i as usize] - max) / c.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = c.top_p {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            ids.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.next_f32() * total;
        for (p, &id) in probs.iter().zip(&ids) {
            if r < *p {
                return id;
            }
            r -= p;
        }
        *ids.last().expect("at least one candidate")
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// A small, fast, seedable generator (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.next(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        // 3.0 / 2 = 1.5 < 2.9
        assert_eq!(s.next(&mut [0.1, 3.0, -1.0, 2.9], &[1]), 3);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_repeats_with_a_seed() {
        let logits = [0.5f32, 1.0, 0.2, 0.9, 0.0];
        let mut k1 = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(k1.next(&mut logits.clone(), &[]), 1);
        }
        let run = |seed| {
            let mut s = Sampler::new(SamplingConfig {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..50)
                .map(|_| s.next(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Every token has probability > 0 at temperature 1: several distinct ones appear.
        let mut distinct = run(7);
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() >= 3, "{distinct:?}");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // softmax([10, 0, 0]) puts > 0.99 on token 0.
        let mut s = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_p: Some(0.9),
            seed: 3,
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(s.next(&mut [10.0, 0.0, 0.0], &[]), 0);
        }
    }
}
