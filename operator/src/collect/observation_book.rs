//! The parts of every open observation window, and when a window is final.
//!
//! A window is final when every node the observation selects has sent a
//! part closed at the window's end (not closed early by a stopping agent),
//! or at its deadline (see [`Timing`]). Windows of one
//! observation are finalized in order, so the status watermark (the end of
//! `status.lastWindow`) always means "everything up to here is counted".

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flowlens_api::report::ObservationWindow;

use super::{Accepted, Timing};

/// A final window with every part received, ready to merge.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FinalWindow {
    pub uid: String,
    pub start: i64,
    pub end: i64,
    /// `(node, part)`; one node may have several parts (agent restarts).
    pub parts: Vec<(String, ObservationWindow)>,
}

#[derive(Debug, Default)]
struct OpenWindow {
    start: i64,
    first_seen_ms: i64,
    /// `(node, agent, part number)` -> part.
    parts: BTreeMap<(String, String, u64), ObservationWindow>,
}

impl OpenWindow {
    /// Nodes that sent a part closed at the window's end.
    fn closed_nodes(&self) -> BTreeSet<&str> {
        self.parts
            .iter()
            .filter(|(_, p)| !p.closed_early)
            .map(|((n, _, _), _)| n.as_str())
            .collect()
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// End of the last window finalized (or already in status).
    finalized_through: i64,
    /// End of the last window that was in status when tracking began.
    counted_through: i64,
    /// Open windows by end.
    windows: BTreeMap<i64, OpenWindow>,
}

pub(crate) struct ObservationBook {
    timing: Timing,
    entries: HashMap<String, Entry>,
}

impl ObservationBook {
    pub(crate) fn new(timing: Timing) -> Self {
        ObservationBook {
            timing,
            entries: HashMap::new(),
        }
    }

    /// Starts tracking an observation whose status already counts every
    /// window up to `counted_through` (the end of its `lastWindow`). Only the
    /// first call for an observation counts: later windows are this
    /// collector's own, and resent parts of them are `late`.
    pub(crate) fn track(&mut self, uid: &str, counted_through: i64) {
        self.entries.entry(uid.to_owned()).or_insert_with(|| Entry {
            finalized_through: counted_through,
            counted_through,
            windows: BTreeMap::new(),
        });
    }

    /// Adds a part sent by `agent` on `node`. Sending a part again replaces
    /// it; a node's parts of one window are bounded ([`super::part_fits`]).
    pub(crate) fn add(
        &mut self,
        node: &str,
        agent: &str,
        part: ObservationWindow,
        now_ms: i64,
    ) -> Accepted {
        let e = self.entries.entry(part.uid.clone()).or_default();
        let end = part.end();
        if end <= e.counted_through {
            return Accepted::Counted;
        }
        if end <= e.finalized_through {
            return Accepted::Late;
        }
        let w = e.windows.entry(end).or_insert_with(|| OpenWindow {
            start: part.start,
            first_seen_ms: now_ms,
            parts: BTreeMap::new(),
        });
        let of_node = w
            .parts
            .range((node.to_owned(), String::new(), 0)..)
            .take_while(|((n, _, _), _)| n == node)
            .map(|((_, a, p), _)| (a.as_str(), *p));
        if !super::part_fits(agent, part.part, of_node) {
            return Accepted::TooManyAgents;
        }
        w.parts
            .insert((node.to_owned(), agent.to_owned(), part.part), part);
        Accepted::Stored
    }

    /// Final windows, oldest first. `expected(uid)` gives the nodes the
    /// observation selects now.
    pub(crate) fn take_final<'a>(
        &mut self,
        now_ms: i64,
        expected: impl Fn(&str) -> Option<&'a BTreeSet<String>>,
    ) -> Vec<FinalWindow> {
        let mut out = Vec::new();
        for (uid, e) in &mut self.entries {
            let nodes = expected(uid);
            while let Some((&end, w)) = e.windows.first_key_value() {
                let all_in = nodes.is_some_and(|n| {
                    let closed = w.closed_nodes();
                    !n.is_empty() && n.iter().all(|x| closed.contains(x.as_str()))
                });
                if !all_in && now_ms < self.timing.deadline_ms(end, w.first_seen_ms) {
                    break;
                }
                let w = e.windows.remove(&end).expect("first window");
                e.finalized_through = end;
                out.push(FinalWindow {
                    uid: uid.clone(),
                    start: w.start,
                    end,
                    parts: w.parts.into_iter().map(|((n, _, _), p)| (n, p)).collect(),
                });
            }
        }
        out.sort_by(|a, b| (a.end, &a.uid).cmp(&(b.end, &b.uid)));
        out
    }

    /// Stops tracking a deleted observation.
    pub(crate) fn forget(&mut self, uid: &str) {
        self.entries.remove(uid);
    }

    /// UIDs tracked (to forget deleted observations).
    pub(crate) fn uids(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Parts held in open windows (a gauge).
    pub(crate) fn open_parts(&self) -> usize {
        self.entries
            .values()
            .flat_map(|e| e.windows.values())
            .map(|w| w.parts.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        started_ms: 0,
        startup_grace_ms: 0,
        grace_ms: 5_000,
    };

    /// A part; `at_end`: closed at the window's end (else early).
    fn part(uid: &str, start: i64, at_end: bool, n: u64) -> ObservationWindow {
        ObservationWindow {
            uid: uid.into(),
            observation: "o".into(),
            start,
            window_seconds: 10,
            complete: at_end,
            closed_early: !at_end,
            folded_series: n,
            part: n,
            ..Default::default()
        }
    }

    fn nodes(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn final_when_every_selected_node_sent_its_part() {
        let mut b = ObservationBook::new(T);
        let sel = nodes(&["a", "b"]);
        b.add("a", "x", part("u", 100, true, 1), 110_100);
        assert!(b.take_final(110_200, |_| Some(&sel)).is_empty());
        b.add("b", "y", part("u", 100, true, 2), 110_300);
        let f = b.take_final(110_400, |_| Some(&sel));
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].start, f[0].end, f[0].parts.len()), (100, 110, 2));
        assert_eq!(
            b.add("a", "x", part("u", 100, true, 1), 110_500),
            Accepted::Late
        );
    }

    #[test]
    fn final_at_the_deadline_without_every_node() {
        let mut b = ObservationBook::new(T);
        let sel = nodes(&["a", "b"]);
        b.add("a", "x", part("u", 100, true, 1), 110_100);
        assert!(b.take_final(114_999, |_| Some(&sel)).is_empty());
        assert_eq!(b.take_final(115_100, |_| Some(&sel)).len(), 1);
    }

    #[test]
    fn resent_parts_replace_and_restarted_agents_add() {
        let mut b = ObservationBook::new(T);
        let sel = nodes(&["a"]);
        b.add("a", "x", part("u", 100, false, 1), 105_000);
        b.add("a", "x", part("u", 100, false, 1), 106_000);
        b.add("a", "x2", part("u", 100, true, 7), 110_100);
        let f = b.take_final(110_200, |_| Some(&sel));
        let parts: Vec<u64> = f[0].parts.iter().map(|(_, p)| p.folded_series).collect();
        assert_eq!(parts, vec![1, 7], "one copy of each agent's part");
    }

    #[test]
    fn parts_closed_early_wait_for_the_rest() {
        let mut b = ObservationBook::new(T);
        let sel = nodes(&["a"]);
        // The observation changed mid-window: part 3 closed early, part 4
        // (same agent) at the end.
        b.add("a", "x", part("u", 100, false, 3), 104_000);
        assert!(
            b.take_final(110_500, |_| Some(&sel)).is_empty(),
            "an early part is not the node's last word"
        );
        b.add("a", "x", part("u", 100, true, 4), 110_600);
        let f = b.take_final(110_700, |_| Some(&sel));
        assert_eq!(f[0].parts.len(), 2, "both parts of one agent count");
    }

    #[test]
    fn windows_finalize_in_order() {
        let mut b = ObservationBook::new(Timing {
            grace_ms: 20_000,
            ..T
        });
        let sel = nodes(&["a", "b"]);
        b.add("a", "x", part("u", 100, true, 1), 110_100);
        b.add("a", "x", part("u", 110, true, 1), 120_100);
        b.add("b", "y", part("u", 110, true, 1), 120_100);
        assert!(
            b.take_final(120_200, |_| Some(&sel)).is_empty(),
            "110-120 is complete but 100-110 waits for its deadline"
        );
        let f = b.take_final(130_100, |_| Some(&sel));

        assert_eq!(f.iter().map(|w| w.end).collect::<Vec<_>>(), vec![110, 120]);
    }

    #[test]
    fn status_watermark_rejects_counted_windows() {
        let mut b = ObservationBook::new(T);
        b.track("u", 120);
        assert_eq!(
            b.add("a", "x", part("u", 110, true, 1), 0),
            Accepted::Counted
        );
        assert_eq!(
            b.add("a", "x", part("u", 120, true, 1), 0),
            Accepted::Stored
        );
    }

    #[test]
    fn a_restarted_collector_waits_for_agents_to_resend() {
        let t = Timing {
            started_ms: 200_000,
            startup_grace_ms: 15_000,
            grace_ms: 5_000,
        };
        let mut b = ObservationBook::new(t);
        let sel = nodes(&["a", "b"]);
        // An old window, received right after the restart.
        b.add("a", "x", part("u", 100, true, 1), 200_500);
        assert!(b.take_final(210_000, |_| Some(&sel)).is_empty());
        assert_eq!(b.take_final(220_000, |_| Some(&sel)).len(), 1);
    }

    #[test]
    fn a_window_resent_under_other_agent_ids_counts_at_most_four_times() {
        let mut b = ObservationBook::new(T);
        for agent in ["x1", "x2", "x3", "x4"] {
            assert_eq!(
                b.add("a", agent, part("u", 100, true, 1), 110_100),
                Accepted::Stored
            );
        }
        assert_eq!(
            b.add("a", "x5", part("u", 100, true, 1), 110_100),
            Accepted::TooManyAgents
        );
        // An agent already in may resend and add parts; other nodes are not
        // limited by this node's agents.
        assert_eq!(
            b.add("a", "x2", part("u", 100, true, 2), 110_200),
            Accepted::Stored
        );
        assert_eq!(
            b.add("b", "y", part("u", 100, true, 1), 110_200),
            Accepted::Stored
        );
        assert_eq!(b.open_parts(), 6);
    }
}
