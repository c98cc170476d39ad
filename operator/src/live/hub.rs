//! Where live records meet readers: the records of the last
//! [`RECENT_MS`] (for `--since`), a broadcast to every reader following,
//! and the count of readers, which agents wait on (see `flowlens_api::live`).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use flowlens_api::live::LiveFlow;
use tokio::sync::{broadcast, watch};

/// Records kept for `--since`, by age.
pub const RECENT_MS: i64 = 5 * 60 * 1000;
/// And by number (whichever bound is hit first).
pub const RECENT_MAX: usize = 50_000;
/// Records a following reader may fall behind by before it misses some
/// (and is told how many).
const READER_LAG: usize = 8192;

pub struct LiveHub {
    recent: Mutex<VecDeque<Arc<LiveFlow>>>,
    feed: broadcast::Sender<Update>,
    readers: watch::Sender<usize>,
}

/// What following readers get.
#[derive(Clone, Debug)]
pub enum Update {
    Flow(Arc<LiveFlow>),
    /// Records an agent's feed dropped (which namespaces they were of is
    /// unknown: every reader is told).
    Lost(u64),
}

impl Default for LiveHub {
    fn default() -> Self {
        LiveHub {
            recent: Mutex::new(VecDeque::new()),
            feed: broadcast::channel(READER_LAG).0,
            readers: watch::channel(0).0,
        }
    }
}

/// A reader's registration: agents drain every second while one exists.
pub struct Reading {
    hub: Arc<LiveHub>,
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.hub.readers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl LiveHub {
    /// Registers a reader until the returned guard drops.
    pub fn read(self: &Arc<Self>) -> Reading {
        self.readers.send_modify(|n| *n += 1);
        Reading { hub: self.clone() }
    }

    /// Readers now.
    pub fn readers(&self) -> usize {
        *self.readers.borrow()
    }

    /// Waits until someone reads, or `hold` passes; true when someone does.
    pub async fn wait_for_reader(&self, hold: std::time::Duration) -> bool {
        let mut rx = self.readers.subscribe();
        tokio::time::timeout(hold, rx.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// New records, from now on.
    pub fn follow(&self) -> broadcast::Receiver<Update> {
        self.feed.subscribe()
    }

    /// [`Self::recent`] and [`Self::follow`] at once: every record is in
    /// one of the two, none in both.
    pub fn recent_then_follow(
        &self,
        since_ms: i64,
        keep: impl Fn(&LiveFlow) -> bool,
    ) -> (Vec<Arc<LiveFlow>>, broadcast::Receiver<Update>) {
        let recent = self.recent.lock().expect("live lock");
        let rx = self.feed.subscribe();
        let head = recent
            .iter()
            .filter(|r| r.time >= since_ms && keep(r))
            .cloned()
            .collect();
        (head, rx)
    }

    /// Admitted records, at `now_ms`.
    pub fn publish(&self, records: Vec<LiveFlow>, now_ms: i64) {
        let mut recent = self.recent.lock().expect("live lock");
        for r in records {
            let r = Arc::new(r);
            let _ = self.feed.send(Update::Flow(r.clone()));
            recent.push_back(r);
        }
        while recent.len() > RECENT_MAX
            || recent.front().is_some_and(|r| r.time < now_ms - RECENT_MS)
        {
            recent.pop_front();
        }
    }

    /// Tells following readers that an agent dropped `n` records.
    pub fn publish_lost(&self, n: u64) {
        if n > 0 {
            let _ = self.feed.send(Update::Lost(n));
        }
    }

    /// Records newer than `since_ms` that `keep` accepts.
    pub fn recent(&self, since_ms: i64, keep: impl Fn(&LiveFlow) -> bool) -> Vec<Arc<LiveFlow>> {
        self.recent
            .lock()
            .expect("live lock")
            .iter()
            .filter(|r| r.time >= since_ms && keep(r))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlens_api::live::{LiveDirection, LiveVerdict};

    fn record(time: i64, namespace: &str) -> LiveFlow {
        LiveFlow {
            time,
            node: "n".into(),
            namespace: namespace.into(),
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
            packets: 2,
            bytes: 120,
        }
    }

    #[tokio::test]
    async fn readers_are_counted_and_wake_waiting_agents() {
        let hub = Arc::new(LiveHub::default());
        assert!(
            !hub.wait_for_reader(std::time::Duration::from_millis(10))
                .await
        );
        let waiting = {
            let hub = hub.clone();
            tokio::spawn(
                async move { hub.wait_for_reader(std::time::Duration::from_secs(5)).await },
            )
        };
        let reading = hub.read();
        assert!(waiting.await.unwrap());
        assert_eq!(hub.readers(), 1);
        drop(reading);
        assert_eq!(hub.readers(), 0);
    }

    #[tokio::test]
    async fn recent_records_age_out_and_followers_get_new_ones() {
        let hub = LiveHub::default();
        let mut follower = hub.follow();
        hub.publish(vec![record(0, "a"), record(1_000, "b")], 1_000);
        match follower.recv().await.unwrap() {
            Update::Flow(r) => assert_eq!(r.namespace, "a"),
            u => panic!("{u:?}"),
        }
        let _ = follower.recv().await.unwrap();
        hub.publish_lost(0);
        hub.publish_lost(3);
        assert!(
            matches!(follower.recv().await.unwrap(), Update::Lost(3)),
            "0 is not news"
        );
        assert_eq!(hub.recent(0, |r| r.namespace == "b").len(), 1);
        assert_eq!(hub.recent(500, |_| true).len(), 1, "since");
        hub.publish(vec![record(RECENT_MS + 500, "c")], RECENT_MS + 500);
        let left: Vec<_> = hub
            .recent(0, |_| true)
            .iter()
            .map(|r| r.namespace.clone())
            .collect();
        assert_eq!(left, ["b", "c"], "older than RECENT_MS went");
    }
}
