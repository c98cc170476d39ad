//! Policy-counter windows: every node's matches per policy, summed once a
//! window is final (its deadline passed: nodes only report windows in
//! which a policy matched, so there is no "every node reported").

use std::collections::BTreeMap;

use flowlens_api::{
    flow_policy::TopAttempt,
    report::{Matches, NamedAttempt, PolicyWindow},
};

use super::{Accepted, Timing};

/// `(namespace, name)`.
pub(crate) type PolicyKey = (String, String);

/// What one policy matched in one final window, over every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PolicyDelta {
    /// End of the window (unix seconds).
    pub end: i64,
    pub blocked: Matches,
    pub audited: Matches,
    /// Nodes that reported matches.
    pub nodes: u32,
    /// Named attempts, `(node, attempt)`, as the agents reported them.
    pub attempts: Vec<(String, NamedAttempt)>,
    /// The same, named for status (by the finalizer, which knows the
    /// cluster).
    pub top: Vec<TopAttempt>,
}

#[derive(Debug, Default)]
struct OpenWindow {
    first_seen_ms: i64,
    /// `(node, agent, part number)` -> part.
    parts: BTreeMap<(String, String, u64), PolicyWindow>,
}

pub(crate) struct PolicyBook {
    timing: Timing,
    window_seconds: i64,
    finalized_through: i64,
    /// Open windows by start.
    windows: BTreeMap<i64, OpenWindow>,
}

impl PolicyBook {
    pub(crate) fn new(timing: Timing, window_seconds: u32) -> Self {
        PolicyBook {
            timing,
            window_seconds: i64::from(window_seconds),
            finalized_through: 0,
            windows: BTreeMap::new(),
        }
    }

    /// Adds a part. A part flushed by a stopping agent (or left in a
    /// killed agent's spool) covers the start of a window (it ends early);
    /// the window is identified by its start. Sending a part again replaces
    /// it; a node's parts of one window are bounded ([`super::part_fits`]).
    pub(crate) fn add(
        &mut self,
        node: &str,
        agent: &str,
        part: PolicyWindow,
        now_ms: i64,
    ) -> Accepted {
        let end = part.start.saturating_add(self.window_seconds);
        if end <= self.finalized_through {
            return Accepted::Late;
        }
        let w = self
            .windows
            .entry(part.start)
            .or_insert_with(|| OpenWindow {
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

    /// Per-policy sums of every window whose deadline passed, oldest first.
    pub(crate) fn take_final(&mut self, now_ms: i64) -> Vec<(PolicyKey, PolicyDelta)> {
        let mut out = Vec::new();
        while let Some((&start, w)) = self.windows.first_key_value() {
            let end = start.saturating_add(self.window_seconds);
            if now_ms < self.timing.deadline_ms(end, w.first_seen_ms) {
                break;
            }
            let w = self.windows.remove(&start).expect("first window");
            self.finalized_through = end;
            let mut sums: BTreeMap<PolicyKey, PolicyDelta> = BTreeMap::new();
            for ((node, _, _), part) in &w.parts {
                for p in &part.policies {
                    let d = sums
                        .entry((p.namespace.clone(), p.name.clone()))
                        .or_insert_with(|| PolicyDelta {
                            end,
                            ..Default::default()
                        });
                    d.blocked.add(&p.blocked);
                    d.audited.add(&p.audited);
                    d.attempts
                        .extend(p.attempts.iter().map(|a| (node.clone(), a.clone())));
                }
            }
            for (key, d) in &mut sums {
                d.nodes = w
                    .parts
                    .iter()
                    .filter(|(_, part)| {
                        part.policies
                            .iter()
                            .any(|p| p.namespace == key.0 && p.name == key.1)
                    })
                    .map(|((n, _, _), _)| n)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len() as u32;
            }
            out.extend(sums);
        }
        out
    }

    /// End of the last final window.
    pub(crate) fn finalized_through(&self) -> i64 {
        self.finalized_through
    }
}

#[cfg(test)]
mod tests {
    use flowlens_api::report::PolicyMatches;

    use super::*;

    fn part(start: i64, secs: u32, blocked: u64) -> PolicyWindow {
        numbered(start, secs, blocked, 1)
    }

    fn numbered(start: i64, secs: u32, blocked: u64, part: u64) -> PolicyWindow {
        PolicyWindow {
            start,
            window_seconds: secs,
            part,
            policies: vec![PolicyMatches {
                namespace: "ns".into(),
                name: "p".into(),
                blocked: Matches {
                    packets: blocked,
                    connections: blocked,
                },
                audited: Matches::default(),
                attempts: Vec::new(),
            }],
        }
    }

    #[test]
    fn sums_nodes_and_restarted_agents_once_per_part() {
        let t = Timing {
            started_ms: 0,
            startup_grace_ms: 0,
            grace_ms: 5_000,
        };
        let mut b = PolicyBook::new(t, 10);
        b.add("a", "x", part(100, 3, 1), 103_000); // flushed on shutdown
        b.add("a", "x2", part(100, 10, 2), 110_100); // the restarted agent
        b.add("b", "y", part(100, 10, 4), 110_100);
        b.add("b", "y", part(100, 10, 4), 111_000); // resent
        assert!(b.take_final(114_000).is_empty());
        let f = b.take_final(115_000);
        assert_eq!(f.len(), 1);
        let (key, d) = &f[0];
        assert_eq!(key, &("ns".to_string(), "p".to_string()));
        assert_eq!((d.end, d.blocked.packets, d.nodes), (110, 7, 2));
        assert_eq!(b.add("a", "x", part(100, 10, 1), 116_000), Accepted::Late);
        assert_eq!(b.finalized_through(), 110);
    }

    #[test]
    fn at_most_four_agent_processes_per_node_and_window() {
        let t = Timing {
            started_ms: 0,
            startup_grace_ms: 0,
            grace_ms: 5_000,
        };
        let mut b = PolicyBook::new(t, 10);
        for agent in ["x1", "x2", "x3", "x4"] {
            assert_eq!(
                b.add("a", agent, part(100, 10, 1), 110_100),
                Accepted::Stored
            );
        }
        assert_eq!(
            b.add("a", "x5", part(100, 10, 1), 110_100),
            Accepted::TooManyAgents
        );
        assert_eq!(
            b.add("a", "x1", part(100, 10, 1), 110_100),
            Accepted::Stored
        );
        assert_eq!(b.add("b", "y", part(100, 10, 1), 110_100), Accepted::Stored);
        let f = b.take_final(116_000);
        assert_eq!(f[0].1.blocked.packets, 5, "four agents of a, one of b");
    }

    /// One agent id across a `kill -9` (its spool): the part its
    /// predecessor left and the successor's own part add up; a part sent
    /// again replaces itself; a node's parts per window are bounded.
    #[test]
    fn parts_of_one_agent_add_up_and_resends_replace() {
        let t = Timing {
            started_ms: 0,
            startup_grace_ms: 0,
            grace_ms: 5_000,
        };
        let mut b = PolicyBook::new(t, 10);
        b.add("a", "x", numbered(100, 4, 3, 7), 104_500); // the spool's part
        b.add("a", "x", numbered(100, 4, 3, 7), 106_000); // resent by the successor
        b.add("a", "x", numbered(100, 10, 5, 9), 110_100); // the successor's own
        let f = b.take_final(116_000);
        assert_eq!(f[0].1.blocked.packets, 8);
        for n in 0..16 {
            assert_eq!(
                b.add("a", "x", numbered(200, 10, 1, n), 205_000),
                Accepted::Stored
            );
        }
        assert_eq!(
            b.add("a", "x", numbered(200, 10, 1, 16), 205_000),
            Accepted::TooManyAgents,
            "a node's parts per window are bounded"
        );
        assert_eq!(
            b.add("a", "x", numbered(200, 10, 2, 3), 205_000),
            Accepted::Stored,
            "a resend replaces"
        );
    }
}
