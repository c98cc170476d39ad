//! A sparse log-linear histogram of RTTs in microseconds, mergeable exactly.
//!
//! The bucket layout is the kernel's (`flowlens_agent_common::rtt_bucket`):
//! exact below 32 µs, then 32 linear sub-buckets per power of two, so any
//! value lies within 1/32 of its bucket's lower bound. Percentiles report the
//! bucket midpoint: at most 1.6% from the true sample value.

use std::collections::BTreeMap;

use flowlens_agent_common::{RTT_BUCKETS, rtt_bucket, rtt_bucket_lower, rtt_bucket_width};
use serde::{Deserialize, Serialize};

/// Bucket index -> sample count. Serialized as `[[bucket, count], ...]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u16, u64)>", into = "Vec<(u16, u64)>")]
pub struct Histogram {
    buckets: BTreeMap<u16, u64>,
}

impl From<Vec<(u16, u64)>> for Histogram {
    fn from(v: Vec<(u16, u64)>) -> Self {
        let mut h = Histogram::default();
        for (b, n) in v {
            h.add_bucket(b, n);
        }
        h
    }
}

impl From<Histogram> for Vec<(u16, u64)> {
    fn from(h: Histogram) -> Self {
        h.buckets.into_iter().collect()
    }
}

impl Histogram {
    /// Adds `n` samples to a bucket (ignored when the bucket does not exist).
    /// Saturating: counts come from reports, which must never overflow.
    pub fn add_bucket(&mut self, bucket: u16, n: u64) {
        if bucket < RTT_BUCKETS && n > 0 {
            let c = self.buckets.entry(bucket).or_default();
            *c = c.saturating_add(n);
        }
    }

    /// Adds one sample of `micros`.
    pub fn record(&mut self, micros: u32) {
        self.add_bucket(rtt_bucket(micros), 1);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (&b, &n) in &other.buckets {
            self.add_bucket(b, n);
        }
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.buckets
            .values()
            .fold(0u64, |a, n| a.saturating_add(*n))
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The non-empty buckets as `(lower, upper, samples)`, in order: the
    /// samples lie in `[lower, upper)` microseconds.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.buckets.iter().map(|(&b, &n)| {
            let lower = rtt_bucket_lower(b);
            (lower, lower + rtt_bucket_width(b), n)
        })
    }

    /// Number of non-empty buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// The `q`-quantile (0 < q <= 1) in microseconds: the midpoint of the
    /// bucket holding the sample of rank `ceil(q * count)`. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (&b, &n) in &self.buckets {
            seen = u64::saturating_add(seen, n);
            if seen >= rank {
                let width = rtt_bucket_width(b);
                return Some(rtt_bucket_lower(b) + width / 2);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn forged_counts_saturate() {
        let mut h = super::Histogram::default();
        h.add_bucket(3, u64::MAX);
        h.add_bucket(3, 5);
        h.add_bucket(40, u64::MAX);
        assert_eq!(h.count(), u64::MAX);
        assert!(h.quantile(0.99).is_some());
    }

    use super::*;

    #[test]
    fn quantiles_of_known_samples() {
        let mut h = Histogram::default();
        for v in 1..=100u32 {
            h.record(v * 100); // 100 µs .. 10 ms
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.04, "p50 {p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.04, "p99 {p99}");
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::default();
        h.record(3);
        h.record(3);
        h.record(7);
        assert_eq!(h.quantile(0.5), Some(3));
        assert_eq!(h.quantile(1.0), Some(7));
    }

    #[test]
    fn merge_is_exact_and_order_free() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for v in [120, 130, 5000, 20_000] {
            a.record(v);
        }
        for v in [125, 9000] {
            b.record(v);
        }
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.count(), 6);
    }

    #[test]
    fn serializes_as_pairs() {
        let mut h = Histogram::default();
        h.record(20);
        h.record(20);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, "[[20,2]]");
        assert_eq!(serde_json::from_str::<Histogram>(&json).unwrap(), h);
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
