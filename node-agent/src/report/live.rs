//! Live records to the collector (see `flowlens_api::live`): a bounded
//! feed the control loop fills after each drain while someone observes,
//! and the task that posts it, long-polling while nobody does.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use flowlens_api::{
    live::{LiveFlow, LivePush, MAX_LIVE_PUSH},
    node_agent_config::CollectorEndpoint,
};
use tracing::{info, warn};

use super::client::CollectorClient;
use crate::{control::Event, state::Shared};

/// How long an answer "someone observes" keeps the agent draining every
/// second without another.
const WATCH_GRACE_MS: i64 = 3_000;
/// Longest wait for a drain's records while someone observes (drains come
/// every second then; the post follows each at once).
const PUSH_WAIT: Duration = Duration::from_millis(1500);
/// Until a collector is configured.
const UNCONFIGURED_WAIT: Duration = Duration::from_secs(1);
/// After a failed post, doubling up to [`RETRY_MAX`] (a collector without
/// `/v1/live` answers 404).
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Records waiting to be posted, newest kept.
#[derive(Default)]
pub struct LiveFeed {
    pending: Mutex<(VecDeque<LiveFlow>, u64)>,
    /// Unix ms until which someone observes.
    watching_until: AtomicI64,
    /// Notified when records are pushed.
    ready: tokio::sync::Notify,
}

impl LiveFeed {
    /// Someone observes: the control loop drains every second.
    pub fn watching(&self, now_ms: i64) -> bool {
        self.watching_until.load(Ordering::Relaxed) > now_ms
    }

    /// Adds one drain's records, dropping (and counting) the oldest past
    /// [`MAX_LIVE_PUSH`].
    pub fn push(&self, records: Vec<LiveFlow>) {
        let mut p = self.pending.lock().expect("live lock");
        p.0.extend(records);
        let excess = p.0.len().saturating_sub(MAX_LIVE_PUSH);
        if excess > 0 {
            p.0.drain(..excess);
            p.1 += excess as u64;
        }
        drop(p);
        self.ready.notify_one();
    }

    fn take(&self) -> (Vec<LiveFlow>, u64) {
        let mut p = self.pending.lock().expect("live lock");
        let lost = std::mem::take(&mut p.1);
        (p.0.drain(..).collect(), lost)
    }
}

/// Posts the feed: at once and then every second while the collector says
/// someone observes; otherwise the collector holds the request until
/// someone does (or [`flowlens_api::live::LIVE_POLL_HOLD_SECONDS`] pass).
pub async fn run(
    feed: Arc<LiveFeed>,
    node: String,
    collector_url: Option<String>,
    token_file: PathBuf,
    shared: Shared,
    events: std::sync::mpsc::Sender<Event>,
) {
    let mut client: Option<CollectorClient> = None;
    let mut failing = false;
    let mut retry = RETRY_FIRST;
    loop {
        let configured = shared.read().collector;
        let endpoint = match (&collector_url, configured) {
            (Some(url), c) => Some(CollectorEndpoint {
                url: url.clone(),
                ca_bundle: c.and_then(|c| c.ca_bundle),
            }),
            (None, c) => c,
        };
        let Some(endpoint) = endpoint else {
            tokio::time::sleep(UNCONFIGURED_WAIT).await;
            continue;
        };
        if client.as_ref().map(|c| c.endpoint()) != Some(&endpoint) {
            match CollectorClient::new(&endpoint) {
                Ok(c) => client = Some(c),
                Err(e) => {
                    warn!(error = %e, "live records: cannot reach the collector");
                    tokio::time::sleep(RETRY_MAX).await;
                    continue;
                }
            }
        }
        let c = client.as_ref().expect("client");
        let (records, lost) = feed.take();
        let push = LivePush {
            node: node.clone(),
            records,
            lost,
        };
        match c.send_live(&push, &token_file).await {
            Ok(reply) => {
                if failing {
                    info!("live records: the collector answers again");
                    failing = false;
                }
                retry = RETRY_FIRST;
                let now = crate::control::now_ms();
                if reply.watching {
                    let was = feed.watching(now);
                    feed.watching_until
                        .store(now + WATCH_GRACE_MS, Ordering::Relaxed);
                    if !was {
                        info!("someone observes live flows: draining every second");
                        let _ = events.send(Event::LiveWatched);
                    }
                    // The next drain's records (or, without traffic, a
                    // post that says this agent still listens).
                    let _ = tokio::time::timeout(PUSH_WAIT, feed.ready.notified()).await;
                } else {
                    feed.watching_until.store(0, Ordering::Relaxed);
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "live records: the collector refused or is unreachable; retrying (up to every {RETRY_MAX:?})");
                    failing = true;
                }
                // Nobody sees these: keep memory flat.
                drop(feed.take());
                feed.watching_until.store(0, Ordering::Relaxed);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlens_api::live::{LiveDirection, LiveVerdict};

    fn record(time: i64) -> LiveFlow {
        LiveFlow {
            time,
            node: String::new(),
            namespace: "ns".into(),
            pod: "p".into(),
            workload: None,
            direction: LiveDirection::Egress,
            peer: "10.0.0.1".into(),
            peer_name: None,
            port: 80,
            protocol: 6,
            service: None,
            verdict: LiveVerdict::Forwarded,
            policy: None,
            connections: 1,
            packets: 1,
            bytes: 60,
        }
    }

    #[test]
    fn the_feed_keeps_the_newest_and_counts_what_it_drops() {
        let feed = LiveFeed::default();
        feed.push((0..MAX_LIVE_PUSH as i64 + 10).map(record).collect());
        let (records, lost) = feed.take();
        assert_eq!(records.len(), MAX_LIVE_PUSH);
        assert_eq!(lost, 10);
        assert_eq!(records[0].time, 10, "the oldest went");
        assert_eq!(feed.take(), (Vec::new(), 0), "taken once");
    }

    #[test]
    fn watching_expires() {
        let feed = LiveFeed::default();
        assert!(!feed.watching(0));
        feed.watching_until.store(1_000, Ordering::Relaxed);
        assert!(feed.watching(999));
        assert!(!feed.watching(1_000));
    }
}
