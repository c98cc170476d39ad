//! Finalized observation windows waiting to be written to status.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use crate::collect::policy_book::{PolicyDelta, PolicyKey};
use flowlens_api::{
    flow_policy::FlowPolicyStatus,
    format,
    network_observation::{
        LatencyPercentiles, NetworkObservationStatus, ObservationSummary, SeriesUsage, TopFlow,
        TrafficTotal, WindowTraffic,
    },
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

/// One observation's window, summed over every node that reported it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowResult {
    /// Unix seconds.
    pub start: i64,
    pub end: i64,
    pub nodes_reporting: u32,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub payload_bytes: u64,
    pub retransmits: u64,
    pub drops: u64,
    pub cross_zone_bytes: u64,
    pub latency: Option<LatencyPercentiles>,
    pub top_flows: Vec<TopFlow>,
    pub series: u64,
    pub max_series: u64,
    pub folded_series: u64,
}

fn time(unix: i64) -> Time {
    Time(Timestamp::from_second(unix).unwrap_or(Timestamp::UNIX_EPOCH))
}

impl WindowResult {
    /// Writes this window into a status. `total` grows only when this window
    /// is newer than the one the status already shows, so rewriting (after
    /// an operator restart, or a retried write) never counts it twice.
    pub fn write_into(&self, s: &mut NetworkObservationStatus) {
        let shown_end = s.last_window.as_ref().map(|w| w.end.0.as_second());
        if shown_end.is_some_and(|e| e >= self.end) {
            return;
        }
        let secs = (self.end - self.start).max(1) as u64;
        s.last_window = Some(WindowTraffic {
            start: time(self.start),
            end: time(self.end),
            flows: self.flows,
            packets: self.packets,
            bytes: self.bytes,
            payload_bytes: self.payload_bytes,
            bytes_per_second: self.bytes / secs,
            packets_per_second: self.packets / secs,
            cross_zone_bytes: self.cross_zone_bytes,
            retransmits: self.retransmits,
            drops: self.drops,
        });
        let total = s.total.get_or_insert_with(|| TrafficTotal {
            since: Some(time(self.start)),
            ..Default::default()
        });
        total.packets += self.packets;
        total.bytes += self.bytes;
        total.payload_bytes += self.payload_bytes;
        total.cross_zone_bytes += self.cross_zone_bytes;
        total.windows += 1;
        s.latency = self.latency.clone();
        s.top_flows = self.top_flows.clone();
        s.series = Some(SeriesUsage {
            series: self.series,
            max_series: self.max_series,
            folded: self.folded_series,
        });
        let summary = s.summary.get_or_insert_with(ObservationSummary::default);
        summary.throughput = format::rate(self.bytes as f64 / secs as f64);
        match &self.latency {
            Some(l) if l.samples > 0 => {
                summary.rtt_p50 = format::micros(l.p50_micros);
                summary.rtt_p99 = format::micros(l.p99_micros);
            }
            _ => {
                summary.rtt_p50 = "-".into();
                summary.rtt_p99 = "-".into();
            }
        }
    }
}

/// Applies final windows (oldest first) to a status.
pub fn write_windows(results: &[WindowResult], s: &mut NetworkObservationStatus) {
    for r in results {
        r.write_into(s);
    }
}

#[derive(Default)]
struct ObservationResults {
    /// Final windows not yet in status, oldest first.
    pending: Vec<WindowResult>,
    /// End of the last window written to status.
    committed: Option<i64>,
}

/// Final windows of each observation (by UID) on their way to status.
#[derive(Default)]
pub struct ResultStore {
    inner: Mutex<HashMap<String, ObservationResults>>,
}

impl ResultStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ObservationResults>> {
        self.inner.lock().expect("results lock")
    }

    pub fn publish(&self, uid: &str, r: WindowResult) {
        let mut m = self.lock();
        let e = m.entry(uid.to_owned()).or_default();
        e.pending.push(r);
        e.pending.sort_by_key(|w| w.end);
    }

    /// Final windows not yet written, oldest first.
    pub fn pending(&self, uid: &str) -> Vec<WindowResult> {
        self.lock()
            .get(uid)
            .map(|e| e.pending.clone())
            .unwrap_or_default()
    }

    /// Records that every window up to `end` is in status.
    pub fn committed(&self, uid: &str, end: i64) {
        let mut m = self.lock();
        let e = m.entry(uid.to_owned()).or_default();
        e.pending.retain(|w| w.end > end);
        e.committed = Some(e.committed.map_or(end, |c| c.max(end)));
    }

    /// The end of the last window written to status, if known.
    pub fn committed_end(&self, uid: &str) -> Option<i64> {
        self.lock().get(uid).and_then(|e| e.committed)
    }

    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }
}

/// Applies final policy-counter windows to a status: windows that end after
/// `countedUntil` are added, so replaying one (after an operator restart)
/// never counts it twice.
pub fn write_policy_counts(deltas: &[PolicyDelta], s: &mut FlowPolicyStatus) {
    for d in deltas {
        let shown = s.counted_until.as_ref().map(|t| t.0.as_second());
        if shown.is_some_and(|e| e >= d.end) {
            continue;
        }
        let b = s.blocked.get_or_insert_with(Default::default);
        b.packets += d.blocked.packets;
        b.connections += d.blocked.connections;
        let a = s.audited.get_or_insert_with(Default::default);
        a.packets += d.audited.packets;
        a.connections += d.audited.connections;
        s.counted_until = Some(time(d.end));
    }
}

#[derive(Default)]
struct PolicyInner {
    pending: BTreeMap<PolicyKey, Vec<PolicyDelta>>,
    finalized_through: i64,
}

/// Final policy-counter windows on their way to FlowPolicy status.
#[derive(Default)]
pub struct PolicyResults {
    inner: Mutex<PolicyInner>,
}

impl PolicyResults {
    fn lock(&self) -> std::sync::MutexGuard<'_, PolicyInner> {
        self.inner.lock().expect("policy results lock")
    }

    /// Adds the policies' sums of final windows up to `finalized_through`.
    pub fn publish(&self, deltas: Vec<(PolicyKey, PolicyDelta)>, finalized_through: i64) {
        let mut i = self.lock();
        for (k, d) in deltas {
            i.pending.entry(k).or_default().push(d);
        }
        i.finalized_through = i.finalized_through.max(finalized_through);
    }

    pub fn pending(&self, key: &PolicyKey) -> Vec<PolicyDelta> {
        self.lock().pending.get(key).cloned().unwrap_or_default()
    }

    /// Records that `key`'s windows up to `end` are in status.
    pub fn committed(&self, key: &PolicyKey, end: i64) {
        let mut i = self.lock();
        if let Some(v) = i.pending.get_mut(key) {
            v.retain(|d| d.end > end);
            if v.is_empty() {
                i.pending.remove(key);
            }
        }
    }

    /// Policies with counts waiting.
    pub fn waiting(&self) -> Vec<PolicyKey> {
        self.lock().pending.keys().cloned().collect()
    }

    pub fn forget(&self, key: &PolicyKey) {
        self.lock().pending.remove(key);
    }

    /// Drops the counts of policies that no longer exist (they would hold
    /// the acknowledgement watermark back forever).
    pub fn retain(&self, exists: impl Fn(&PolicyKey) -> bool) {
        self.lock().pending.retain(|k, _| exists(k));
    }

    /// The end of the last policy window that is fully in status: agents
    /// may forget their windows up to it.
    pub fn committed_through(&self) -> i64 {
        let i = self.lock();
        let oldest_pending = i
            .pending
            .values()
            .flat_map(|v| v.iter().map(|d| d.end))
            .min();
        match oldest_pending {
            Some(e) => i.finalized_through.min(e - 1),
            None => i.finalized_through,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_each_window_once() {
        let w = |start: i64, bytes: u64| WindowResult {
            start,
            end: start + 10,
            packets: 1,
            bytes,
            ..Default::default()
        };
        let mut s = NetworkObservationStatus::default();
        w(100, 1000).write_into(&mut s);
        w(100, 1000).write_into(&mut s);
        assert_eq!(
            s.total.as_ref().unwrap().bytes,
            1000,
            "a window written twice counts once"
        );
        w(110, 500).write_into(&mut s);
        let t = s.total.as_ref().unwrap();
        assert_eq!((t.bytes, t.packets, t.windows), (1500, 2, 2));
        assert_eq!(s.last_window.as_ref().unwrap().bytes_per_second, 50);
        assert_eq!(s.summary.as_ref().unwrap().throughput, "50 B/s");
        w(100, 9999).write_into(&mut s);
        assert_eq!(
            s.total.as_ref().unwrap().bytes,
            1500,
            "an older window is ignored"
        );
    }

    #[test]
    fn policy_counts_count_each_window_once() {
        let d = |end: i64, n: u64| PolicyDelta {
            end,
            blocked: flowlens_api::report::Matches {
                packets: n,
                connections: n,
            },
            ..Default::default()
        };
        let mut s = FlowPolicyStatus::default();
        write_policy_counts(&[d(110, 3), d(120, 4)], &mut s);
        write_policy_counts(&[d(120, 4)], &mut s);
        assert_eq!(s.blocked.as_ref().unwrap().connections, 7);
        assert_eq!(s.counted_until.as_ref().unwrap().0.as_second(), 120);
    }

    #[test]
    fn policy_ack_waits_for_status() {
        let r = PolicyResults::default();
        let key = ("ns".to_string(), "p".to_string());
        r.publish(
            vec![(
                key.clone(),
                PolicyDelta {
                    end: 110,
                    ..Default::default()
                },
            )],
            120,
        );
        assert_eq!(r.committed_through(), 109, "110 is not written yet");
        r.committed(&key, 110);
        assert_eq!(r.committed_through(), 120);
        // A policy deleted before its counts were written does not hold the
        // watermark back.
        let gone = ("ns".to_string(), "gone".to_string());
        r.publish(
            vec![(
                gone.clone(),
                PolicyDelta {
                    end: 130,
                    ..Default::default()
                },
            )],
            130,
        );
        assert_eq!(r.committed_through(), 129);
        r.retain(|k| *k != gone);
        assert_eq!(r.committed_through(), 130);
    }
}
