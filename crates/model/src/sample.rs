//! Choosing the next token from logits: repetition penalty, then top-k, top-p, min-p and
//! temperature, then a draw from a seeded generator — the order of llama.cpp's default
//! sampler chain. Temperature 0 is greedy (first maximum wins, as in llama.cpp).
//! Deterministic: the same seed gives the same tokens on any host.

/// Sampling settings; the neutral value of each filter turns it off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerParams {
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1.0: off.
    pub top_p: f32,
    /// 0.0: off.
    pub min_p: f32,
    /// 1.0: off.
    pub repeat_penalty: f32,
    pub repeat_last_n: u32,
    pub seed: u64,
}

impl SamplerParams {
    /// A readable complaint about the first setting out of range.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |v: f32| v.is_finite();
        if !finite(self.temperature) || self.temperature < 0.0 || self.temperature > 100.0 {
            return Err(format!(
                "temperature {} is outside 0..=100",
                self.temperature
            ));
        }
        if !finite(self.top_p) || !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top_p {} is outside 0..=1", self.top_p));
        }
        if !finite(self.min_p) || !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p {} is outside 0..=1", self.min_p));
        }
        if !finite(self.repeat_penalty) || self.repeat_penalty <= 0.0 || self.repeat_penalty > 100.0
        {
            return Err(format!(
                "repeat_penalty {} is outside (0, 100]",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and identical everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplerParams,
    rng: Rng,
    /// Scratch: (id, logit) candidates, reused between calls.
    cands: Vec<(u32, f32)>,
}

/// Every token's logits (tens of thousands) are scanned for their maximum, so the scans
/// below are loops of independent lanes without branches that compilers vectorize (SIMD128
/// in the guest): the largest value first, then what is asked of it.
const LANES: usize = 16;

/// The largest of `v`'s values (-inf when empty or all NaN: NaNs never win).
fn max_value(v: &[f32]) -> f32 {
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut m = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for j in 0..LANES {
            m[j] = if chunk[j] > m[j] { chunk[j] } else { m[j] };
        }
    }
    m.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a })
}

/// Index of the first maximum (NaNs never win; a NaN first value is kept, as a scan that
/// replaces the best only by a larger value would).
pub fn argmax(logits: &[f32]) -> u32 {
    if logits.first().is_none_or(|l| l.is_nan()) {
        return 0;
    }
    let max = max_value(logits);
    // All -inf or NaN: the first value is -inf (it is not NaN), the answer 0.
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// The gap between the best and the second-best logit (0 unless both are finite; NaNs
/// ignored; 0 when the best is there twice).
pub fn top2_gap(logits: &[f32]) -> f32 {
    let a = max_value(logits);
    // How often the best is there, and the largest value below it.
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut below = [f32::NEG_INFINITY; LANES];
    let mut count = [0u32; LANES];
    for chunk in chunks {
        for j in 0..LANES {
            let x = chunk[j];
            below[j] = if x > below[j] && x < a { x } else { below[j] };
            count[j] += u32::from(x == a);
        }
    }
    let mut b = f32::NEG_INFINITY;
    let mut n: u32 = count.iter().sum();
    for &x in below.iter().chain(tail) {
        b = if x > b && x < a { x } else { b };
    }
    n += tail.iter().filter(|&&x| x == a).count() as u32;
    let b = if n >= 2 { a } else { b };
    if b.is_finite() { a - b } else { 0.0 }
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            cands: Vec::new(),
        }
    }

    /// Pick a token; `history` holds the tokens seen so far (prompt and output).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let start = history.len().saturating_sub(p.repeat_last_n as usize);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        // Candidates sorted by logit, highest first; top-k keeps the head.
        self.cands.clear();
        self.cands
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let k = if p.top_k == 0 {
            self.cands.len()
        } else {
            (p.top_k as usize).min(self.cands.len())
        };
        if k < self.cands.len() {
            self.cands
                .select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
            self.cands.truncate(k);
        }
        self.cands
            .sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));

        // Probabilities at temperature 1 for top-p and min-p (as llama.cpp's chain does).
        let probs = |cands: &[(u32, f32)], t: f32| -> Vec<f64> {
            let max = cands[0].1 as f64;
            let e: Vec<f64> = cands
                .iter()
                .map(|&(_, l)| ((l as f64 - max) / t as f64).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|x| x / sum).collect()
        };
        if p.top_p < 1.0 {
            let pr = probs(&self.cands, 1.0);
            let mut cum = 0.0;
            let mut keep = pr.len();
            for (i, q) in pr.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            self.cands.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let pr = probs(&self.cands, 1.0);
            let floor = pr[0] * p.min_p as f64;
            let keep = pr.iter().take_while(|&&q| q >= floor).count();
            self.cands.truncate(keep.max(1));
        }

        let pr = probs(&self.cands, p.temperature);
        let mut r = self.rng.next_f64();
        for (i, q) in pr.iter().enumerate() {
            if r < *q {
                return self.cands[i].0;
            }
            r -= q;
        }
        self.cands[self.cands.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplerParams {
        SamplerParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: 42,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    /// The plain scan `argmax` must agree with.
    fn first_max(logits: &[f32]) -> u32 {
        let mut best = 0usize;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn argmax_is_the_plain_scans_index() {
        // Lengths around the lanes, few distinct values (ties across lanes and the tail),
        // -inf and NaN anywhere, first value NaN.
        let mut rng = Rng::new(7);
        let specials = [f32::NEG_INFINITY, f32::NAN, f32::INFINITY];
        for len in (1..40).chain([49152, 49153, 151936]) {
            for case in 0..40 {
                let v: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = rng.next_f64();
                        if case % 4 == 0 && r < 0.1 {
                            specials[(r * 30.0) as usize % 3]
                        } else if case % 4 == 1 {
                            f32::NEG_INFINITY
                        } else {
                            (r * 5.0).floor() as f32 - 2.0
                        }
                    })
                    .collect();
                assert_eq!(argmax(&v), first_max(&v), "len {len}, case {case}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn top2_gap_is_the_plain_scans() {
        let plain = |v: &[f32]| {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &l in v {
                if l > a {
                    b = a;
                    a = l;
                } else if l > b {
                    b = l;
                }
            }
            if b.is_finite() { a - b } else { 0.0 }
        };
        let mut rng = Rng::new(11);
        for len in (0..40).chain([49152, 49155]) {
            for case in 0..40 {
                let v: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = rng.next_f64();
                        match case % 3 {
                            0 if r < 0.2 => [f32::NEG_INFINITY, f32::NAN, f32::INFINITY]
                                [(r * 15.0) as usize % 3],
                            1 => (r * 4.0).floor() as f32,
                            _ => (r * 1000.0) as f32 - 500.0,
                        }
                    })
                    .collect();
                assert_eq!(
                    top2_gap(&v).to_bits(),
                    plain(&v).to_bits(),
                    "len {len}, case {case}"
                );
            }
        }
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplerParams {
                seed,
                ..params(1.0)
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn filters_restrict_the_choice() {
        let mut logits = [5.0, 4.9, 0.0, -3.0, -10.0];
        let mut top1 = Sampler::new(SamplerParams {
            top_k: 1,
            ..params(1.5)
        });
        let mut min_p = Sampler::new(SamplerParams {
            min_p: 0.5,
            ..params(1.5)
        });
        let mut top_p = Sampler::new(SamplerParams {
            top_p: 0.5,
            ..params(1.5)
        });
        for _ in 0..200 {
            assert_eq!(top1.sample(&mut logits, &[]), 0);
            assert!(min_p.sample(&mut logits, &[]) <= 1);
            assert_eq!(top_p.sample(&mut logits, &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(SamplerParams {
            repeat_penalty: 2.0,
            repeat_last_n: 8,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [3.0, 2.0, -1.0], &[0]), 1);
    }

    #[test]
    fn out_of_range_settings_are_named() {
        assert!(
            SamplerParams {
                temperature: -1.0,
                ..params(0.0)
            }
            .validate()
            .expect_err("out of range")
            .contains("temperature")
        );
        assert!(
            SamplerParams {
                top_p: f32::NAN,
                ..params(0.0)
            }
            .validate()
            .expect_err("out of range")
            .contains("top_p")
        );
        assert!(params(0.7).validate().is_ok());
    }
}
