//! Finalized observation windows waiting to be written to status.

use std::{collections::HashMap, sync::Mutex};

use flowlens_api::{
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
        });
        let total = s.total.get_or_insert_with(|| TrafficTotal {
            since: Some(time(self.start)),
            ..Default::default()
        });
        total.packets += self.packets;
        total.bytes += self.bytes;
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

/// The latest finalized window of each observation (by UID), until written.
#[derive(Default)]
pub struct ResultStore {
    inner: Mutex<HashMap<String, (WindowResult, Option<i64>)>>,
}

impl ResultStore {
    pub fn publish(&self, uid: &str, r: WindowResult) {
        let mut m = self.inner.lock().expect("results lock");
        let e = m.entry(uid.to_owned()).or_insert((r.clone(), None));
        if e.0.end <= r.end {
            e.0 = r;
        }
    }

    pub fn latest(&self, uid: &str) -> Option<WindowResult> {
        self.inner
            .lock()
            .expect("results lock")
            .get(uid)
            .map(|(r, _)| r.clone())
    }

    /// Records that the window ending at `end` is in status.
    pub fn committed(&self, uid: &str, end: i64) {
        if let Some(e) = self.inner.lock().expect("results lock").get_mut(uid) {
            e.1 = Some(e.1.map_or(end, |c| c.max(end)));
        }
    }

    /// The end of the last window written to status, if known.
    pub fn committed_end(&self, uid: &str) -> Option<i64> {
        self.inner
            .lock()
            .expect("results lock")
            .get(uid)
            .and_then(|(_, c)| *c)
    }

    pub fn forget(&self, uid: &str) {
        self.inner.lock().expect("results lock").remove(uid);
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
}
