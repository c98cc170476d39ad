//! Final windows (of observations and of policy counters) queued until a
//! status write includes them. What they change in status is written by
//! [`crate::observation_status`] and [`crate::policy_status`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use crate::collect::{
    merge::WindowResult,
    policy_book::{PolicyDelta, PolicyKey},
};

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

    pub(crate) fn publish(&self, uid: &str, r: WindowResult) {
        let mut m = self.lock();
        let e = m.entry(uid.to_owned()).or_default();
        e.pending.push(r);
        e.pending.sort_by_key(|w| w.end);
    }

    /// Final windows not yet written, oldest first.
    pub(crate) fn pending(&self, uid: &str) -> Vec<WindowResult> {
        self.lock()
            .get(uid)
            .map(|e| e.pending.clone())
            .unwrap_or_default()
    }

    /// Records that every window up to `end` is in status.
    pub(crate) fn committed(&self, uid: &str, end: i64) {
        let mut m = self.lock();
        let e = m.entry(uid.to_owned()).or_default();
        e.pending.retain(|w| w.end > end);
        e.committed = Some(e.committed.map_or(end, |c| c.max(end)));
    }

    /// The end of the last window written to status, if known.
    pub(crate) fn committed_end(&self, uid: &str) -> Option<i64> {
        self.lock().get(uid).and_then(|e| e.committed)
    }

    pub(crate) fn forget(&self, uid: &str) {
        self.lock().remove(uid);
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
    pub(crate) fn publish(&self, deltas: Vec<(PolicyKey, PolicyDelta)>, finalized_through: i64) {
        let mut i = self.lock();
        for (k, d) in deltas {
            i.pending.entry(k).or_default().push(d);
        }
        i.finalized_through = i.finalized_through.max(finalized_through);
    }

    pub(crate) fn pending(&self, key: &PolicyKey) -> Vec<PolicyDelta> {
        self.lock().pending.get(key).cloned().unwrap_or_default()
    }

    /// Records that `key`'s windows up to `end` are in status.
    pub(crate) fn committed(&self, key: &PolicyKey, end: i64) {
        let mut i = self.lock();
        if let Some(v) = i.pending.get_mut(key) {
            v.retain(|d| d.end > end);
            if v.is_empty() {
                i.pending.remove(key);
            }
        }
    }

    /// Policies with counts waiting.
    pub(crate) fn waiting(&self) -> Vec<PolicyKey> {
        self.lock().pending.keys().cloned().collect()
    }

    /// Drops the counts of policies that no longer exist (they would hold
    /// the acknowledgement watermark back forever).
    pub(crate) fn retain(&self, exists: impl Fn(&PolicyKey) -> bool) {
        self.lock().pending.retain(|k, _| exists(k));
    }

    /// The end of the last policy window that is fully in status: agents
    /// may forget their windows up to it.
    pub(crate) fn committed_through(&self) -> i64 {
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
