//! Summaries of benchmark rounds: median, percentiles and a bootstrap
//! confidence interval of the median. Pure; no I/O.

/// The median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `q`-quantile (nearest rank) of an ascending slice; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A small deterministic generator (xorshift64*): shuffles arm orders and
/// draws bootstrap resamples. Not for anything secret.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A uniform index below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// The median of `samples` and a percentile-bootstrap 95% interval of it
/// (`resamples` draws with replacement): `(median, low, high)`.
pub fn median_with_ci(samples: &[f64], resamples: usize, rng: &mut Rng) -> (f64, f64, f64) {
    let mut v = samples.to_vec();
    let m = median(&mut v);
    if samples.len() < 2 {
        return (m, m, m);
    }
    let mut medians = Vec::with_capacity(resamples);
    let mut draw = vec![0.0; samples.len()];
    for _ in 0..resamples {
        for d in draw.iter_mut() {
            *d = samples[rng.below(samples.len())];
        }
        medians.push(median(&mut draw));
    }
    medians.sort_by(f64::total_cmp);
    (m, percentile(&medians, 0.025), percentile(&medians, 0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.99), 4.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
    }

    #[test]
    fn interval_contains_the_median_and_stays_within_the_samples() {
        let samples = [0.91, 0.95, 0.97, 0.93, 0.99, 0.96, 0.94];
        let (m, lo, hi) = median_with_ci(&samples, 2000, &mut Rng::new(7));
        assert_eq!(m, 0.95);
        assert!(lo <= m && m <= hi, "{lo} <= {m} <= {hi}");
        assert!(lo >= 0.91 && hi <= 0.99);
        assert!(hi > lo, "seven distinct samples give a nonzero interval");
    }

    #[test]
    fn identical_samples_give_a_point_interval() {
        let (m, lo, hi) = median_with_ci(&[1.0; 5], 100, &mut Rng::new(1));
        assert_eq!((m, lo, hi), (1.0, 1.0, 1.0));
    }

    #[test]
    fn shuffle_keeps_every_element() {
        let mut v: Vec<u32> = (0..6).collect();
        Rng::new(42).shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..6).collect::<Vec<_>>());
    }
}
