//! The windows an agent holds for the operator: pure bookkeeping.
//!
//! A window is *pending* until a collector received it, then *held* until
//! the collector says it is committed (in status). Windows are forgotten
//! only when committed, so a collector that restarts (a new instance id)
//! gets everything it had not committed again. The buffer is bounded: when
//! full, the oldest windows go first (and are counted).

use std::collections::VecDeque;

use flowlens_api::report::{ObservationWindow, PolicyWindow, ReportAck, ReportBatch};

/// Windows kept while the collector is unreachable (per kind). With the
/// default 30 s windows that is two hours of one observation.
pub(crate) const BUFFER_WINDOWS: usize = 256;

/// Observation windows per request (each is at most `maxSeries` series).
pub(crate) const BATCH_WINDOWS: usize = 16;

#[derive(Default)]
pub(crate) struct ReportBuffer {
    pending: VecDeque<ObservationWindow>,
    held: VecDeque<ObservationWindow>,
    pending_policies: VecDeque<PolicyWindow>,
    held_policies: VecDeque<PolicyWindow>,
    collector: Option<String>,
    capacity: usize,
    /// Restored from a predecessor's spool: ask what is committed (an empty
    /// request) before sending any of it again.
    probe: bool,
}

/// An observation window part: UID, start, part number.
type WindowId = (String, i64, u64);
/// A policy window part: start, part number.
type PolicyId = (i64, u64);

fn window_id(w: &ObservationWindow) -> WindowId {
    (w.uid.clone(), w.start, w.part)
}

fn policy_id(w: &PolicyWindow) -> PolicyId {
    (w.start, w.part)
}

/// What one request carries, to be confirmed with [`ReportBuffer::sent`]
/// (by identity: windows may be pushed, or dropped, while it is in flight).
#[derive(Debug, Default)]
pub(crate) struct Sending {
    windows: Vec<WindowId>,
    policies: Vec<PolicyId>,
}

impl Sending {
    pub(crate) fn windows(&self) -> usize {
        self.windows.len()
    }

    pub(crate) fn policies(&self) -> usize {
        self.policies.len()
    }
}

impl ReportBuffer {
    pub(crate) fn new(capacity: usize) -> Self {
        ReportBuffer {
            capacity: capacity.max(1),
            ..Default::default()
        }
    }

    /// Adds completed windows; returns how many old ones were dropped.
    pub(crate) fn push(
        &mut self,
        windows: Vec<ObservationWindow>,
        policies: Vec<PolicyWindow>,
    ) -> usize {
        self.pending.extend(windows);
        self.pending_policies.extend(policies);
        let mut dropped = 0;
        while self.held.len() + self.pending.len() > self.capacity {
            if self.held.pop_front().is_none() {
                self.pending.pop_front();
            }
            dropped += 1;
        }
        while self.held_policies.len() + self.pending_policies.len() > self.capacity {
            if self.held_policies.pop_front().is_none() {
                self.pending_policies.pop_front();
            }
        }
        dropped
    }

    /// Adds what a predecessor's spool held (to be sent again: resending a
    /// part is harmless), after first asking what is already committed.
    pub(crate) fn restore(
        &mut self,
        windows: Vec<ObservationWindow>,
        policies: Vec<PolicyWindow>,
    ) -> usize {
        self.probe = !windows.is_empty() || !policies.is_empty();
        self.push(windows, policies)
    }

    /// Part numbers of every window not yet committed (what the spool must
    /// keep).
    pub(crate) fn uncommitted_parts(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.iter().chain(&self.held).map(|w| w.part).chain(
            self.pending_policies
                .iter()
                .chain(&self.held_policies)
                .map(|w| w.part),
        )
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.pending_policies.is_empty()
    }

    pub(crate) fn has_held(&self) -> bool {
        !self.held.is_empty() || !self.held_policies.is_empty()
    }

    /// Windows not yet committed.
    pub(crate) fn len(&self) -> usize {
        self.pending.len() + self.held.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0 && !self.has_pending() && !self.has_held()
    }

    /// The next request: the oldest pending windows, at most `max_windows`,
    /// and pending policy windows, as many. With `max_windows == 1` (a
    /// refused request being narrowed down), an observation window goes
    /// alone, so that a refusal names one item. Right after a restore, an
    /// empty request (what is committed?).
    pub(crate) fn batch(
        &self,
        node: &str,
        agent: &str,
        max_windows: usize,
    ) -> (ReportBatch, Sending) {
        let limit = max_windows.max(1);
        let (n, p) = if self.probe {
            (0, 0)
        } else {
            let n = self.pending.len().min(limit);
            let p = if limit == 1 && n == 1 {
                0
            } else if limit == 1 {
                self.pending_policies.len().min(1)
            } else {
                self.pending_policies.len()
            };
            (n, p)
        };
        let batch = ReportBatch {
            node: node.to_owned(),
            agent: agent.to_owned(),
            windows: self.pending.iter().take(n).cloned().collect(),
            policy_windows: self.pending_policies.iter().take(p).cloned().collect(),
        };
        let sending = Sending {
            windows: batch.windows.iter().map(window_id).collect(),
            policies: batch.policy_windows.iter().map(policy_id).collect(),
        };
        (batch, sending)
    }

    /// The collector refused what [`Self::batch`] returned, for good:
    /// forgets it (only ever one item: callers narrow a refused batch down
    /// to single items first). Returns the observation windows dropped.
    pub(crate) fn refused(&mut self, s: &Sending) -> usize {
        let before = self.pending.len();
        self.pending.retain(|w| !s.windows.contains(&window_id(w)));
        self.pending_policies
            .retain(|w| !s.policies.contains(&policy_id(w)));
        before - self.pending.len()
    }

    /// The collector received what [`Self::batch`] returned.
    pub(crate) fn sent(&mut self, s: &Sending) {
        let (sent, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|w| s.windows.contains(&window_id(w)));
        self.pending = kept;
        self.held.extend(sent);
        let (sent, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.pending_policies)
            .into_iter()
            .partition(|w| s.policies.contains(&policy_id(w)));
        self.pending_policies = kept;
        self.held_policies.extend(sent);
    }

    /// Applies an answer; returns the observation windows now committed.
    pub(crate) fn ack(&mut self, ack: &ReportAck) -> usize {
        self.probe = false;
        if self.collector.as_ref().is_some_and(|c| *c != ack.collector) {
            // A new collector process: it has none of the held windows.
            let held = std::mem::take(&mut self.held);
            for w in held.into_iter().rev() {
                self.pending.push_front(w);
            }
            let held = std::mem::take(&mut self.held_policies);
            for w in held.into_iter().rev() {
                self.pending_policies.push_front(w);
            }
        }
        self.collector = Some(ack.collector.clone());
        let committed =
            |w: &ObservationWindow| ack.committed.get(&w.uid).is_some_and(|&end| w.end() <= end);
        let before = self.held.len() + self.pending.len();
        self.held.retain(|w| !committed(w));
        self.pending.retain(|w| !committed(w));
        let policy_done = |w: &PolicyWindow| w.end() <= ack.policy_committed;
        self.held_policies.retain(|w| !policy_done(w));
        self.pending_policies.retain(|w| !policy_done(w));
        before - self.held.len() - self.pending.len()
    }
}

#[cfg(test)]
mod refusal_tests {
    use flowlens_api::report::{ObservationWindow, PolicyWindow};

    use super::ReportBuffer;

    fn w(start: i64) -> ObservationWindow {
        ObservationWindow {
            uid: "u".into(),
            start,
            window_seconds: 10,
            ..Default::default()
        }
    }

    fn p(start: i64) -> PolicyWindow {
        PolicyWindow {
            start,
            window_seconds: 10,
            ..Default::default()
        }
    }

    #[test]
    fn a_refused_batch_is_narrowed_to_single_items_and_only_the_culprit_is_dropped() {
        let mut b = ReportBuffer::new(16);
        b.push(vec![w(0), w(10), w(20)], vec![p(0), p(10)]);
        let (all, _) = b.batch("n", "a", 16);
        assert_eq!((all.windows.len(), all.policy_windows.len()), (3, 2));
        // Narrowed: one observation window, alone.
        let (one, sending) = b.batch("n", "a", 1);
        assert_eq!((one.windows.len(), one.policy_windows.len()), (1, 0));
        assert_eq!(one.windows[0].start, 0);
        assert_eq!(b.refused(&sending), 1);
        let (next, sending) = b.batch("n", "a", 1);
        assert_eq!(next.windows[0].start, 10, "the next window is kept");
        b.sent(&sending);
        let (_, sending) = b.batch("n", "a", 1);
        b.sent(&sending);
        // Then policy windows, one at a time.
        let (pol, sending) = b.batch("n", "a", 1);
        assert_eq!((pol.windows.len(), pol.policy_windows.len()), (0, 1));
        assert_eq!(b.refused(&sending), 0);
        let (pol, _) = b.batch("n", "a", 1);
        assert_eq!(pol.policy_windows[0].start, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(uid: &str, start: i64) -> ObservationWindow {
        ObservationWindow {
            uid: uid.into(),
            start,
            window_seconds: 10,
            complete: true,
            ..Default::default()
        }
    }

    fn ack(collector: &str, committed: &[(&str, i64)], policy: i64) -> ReportAck {
        ReportAck {
            collector: collector.into(),
            committed: committed.iter().map(|(u, e)| (u.to_string(), *e)).collect(),
            policy_committed: policy,
        }
    }

    #[test]
    fn windows_are_forgotten_only_when_committed() {
        let mut b = ReportBuffer::new(10);
        b.push(vec![w("u", 100), w("u", 110)], vec![]);
        let (batch, s) = b.batch("n", "a", 16);
        assert_eq!(batch.windows.len(), 2);
        b.sent(&s);
        assert!(!b.has_pending() && b.has_held());
        assert_eq!(
            b.ack(&ack("c1", &[("u", 110)], 0)),
            1,
            "100-110 is committed"
        );
        assert_eq!(b.len(), 1);
        assert_eq!(b.ack(&ack("c1", &[("u", 120)], 0)), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn a_new_collector_gets_held_windows_again() {
        let mut b = ReportBuffer::new(10);
        b.push(vec![w("u", 100)], vec![]);
        let (_, s) = b.batch("n", "a", 16);
        b.sent(&s);
        b.ack(&ack("c1", &[], 0));
        assert!(!b.has_pending());
        b.ack(&ack("c2", &[], 0));
        assert!(b.has_pending(), "the restarted collector lost what c1 held");
        let (batch, _) = b.batch("n", "a", 16);
        assert_eq!(batch.windows[0].start, 100);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest() {
        let mut b = ReportBuffer::new(3);
        let dropped = b.push((0..5).map(|i| w("u", i * 10)).collect(), vec![]);
        assert_eq!(dropped, 2);
        let (batch, _) = b.batch("n", "a", 16);
        assert_eq!(
            batch.windows.iter().map(|w| w.start).collect::<Vec<_>>(),
            vec![20, 30, 40]
        );
    }

    #[test]
    fn batches_are_bounded_and_policy_windows_follow_their_watermark() {
        let mut b = ReportBuffer::new(100);
        b.push(
            (0..20).map(|i| w("u", i * 10)).collect(),
            vec![PolicyWindow {
                start: 100,
                window_seconds: 10,
                policies: vec![],
                part: 1,
            }],
        );
        let (batch, s) = b.batch("n", "a", 16);
        assert_eq!((batch.windows.len(), batch.policy_windows.len()), (16, 1));
        b.sent(&s);
        assert!(b.has_pending(), "4 windows left for the next request");
        b.ack(&ack("c", &[], 109));
        assert!(b.has_held(), "policy window 100-110 not committed at 109");
        b.ack(&ack("c", &[], 110));
        assert_eq!(b.held_policies.len(), 0);
    }

    /// The agent's control loop pushes while a request is in flight; a full
    /// buffer then drops the oldest, which may be in the request.
    #[test]
    fn what_was_sent_is_known_by_identity_not_position() {
        let mut b = ReportBuffer::new(2);
        b.push(vec![w("u", 100), w("u", 110)], vec![]);
        let (_, s) = b.batch("n", "a", 16);
        assert_eq!(b.push(vec![w("u", 120)], vec![]), 1, "100 dropped");
        b.sent(&s);
        assert_eq!(
            b.held.iter().map(|w| w.start).collect::<Vec<_>>(),
            vec![110]
        );
        assert_eq!(
            b.pending.iter().map(|w| w.start).collect::<Vec<_>>(),
            vec![120]
        );
    }

    /// A successor first asks what is committed, then sends only the rest.
    #[test]
    fn restored_windows_wait_for_an_answer_before_they_are_sent() {
        let mut b = ReportBuffer::new(10);
        b.restore(vec![w("u", 100), w("u", 110)], vec![]);
        let (probe, s) = b.batch("n", "a", 16);
        assert!(probe.windows.is_empty() && probe.policy_windows.is_empty());
        b.sent(&s);
        b.ack(&ack("c", &[("u", 110)], 0));
        let (batch, _) = b.batch("n", "a", 16);
        assert_eq!(
            batch.windows.iter().map(|w| w.start).collect::<Vec<_>>(),
            vec![110]
        );
        assert_eq!(b.uncommitted_parts().count(), 1);
    }
}
