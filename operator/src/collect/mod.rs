//! From agents' report parts to results: pure, no I/O, unit-tested.
//!
//! - [`observation_book`]: collects the parts of each observation window
//!   (one per node and agent process) and says when a window is final.
//! - [`policy_book`]: the same for policy-counter windows.
//! - [`admission`]: what a node may truthfully report; refuses the rest
//!   before it reaches the books.
//! - [`deadline_clock`]: the clock of window deadlines, which stands still
//!   while reports cannot be verified (an API-server outage).
//! - [`merge`]: sums a final window's parts into the figures written to
//!   status (dedup, groupBy, maxSeries, top flows, percentiles, zones).
//!
//! The I/O around it (HTTP, authentication, status writes) is in
//! [`crate::collector`].

pub(crate) mod admission;
pub(crate) mod attempts;
pub(crate) mod deadline_clock;
pub(crate) mod merge;
pub(crate) mod observation_book;
pub(crate) mod policy_book;

use std::net::IpAddr;

use crate::model::{NodeInfo, PodInfo};

/// What the merge needs to know about the cluster, for one observation.
pub(crate) trait Directory {
    /// The (non host-network) pod that has this address.
    fn pod(&self, ip: &IpAddr) -> Option<&PodInfo>;
    /// The node that has this address: one of its InternalIP and ExternalIP
    /// addresses, or the IP of a host-network pod on it.
    fn node(&self, ip: &IpAddr) -> Option<&NodeInfo>;
    /// Whether the observation traces the pod with this address (then that
    /// pod's own agent reports what it sends).
    fn traced(&self, ip: &IpAddr) -> bool;
    /// The zone of a node.
    fn zone(&self, node: &str) -> Option<&str>;
}

/// Whether a report part arrived in time to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Stored (or replaced an earlier copy of the same part).
    Stored,
    /// Its window is already final: dropped (and acknowledged, so the agent
    /// forgets it).
    Late,
    /// Its window was already in status when this collector started: a
    /// part sent again because the previous collector's acknowledgement
    /// never arrived. Nothing to add; acknowledged.
    Counted,
    /// Refused: the node already has parts of this window from
    /// [`admission::MAX_AGENTS_PER_WINDOW`] other agent processes, or
    /// [`admission::MAX_PARTS_PER_WINDOW`] parts.
    TooManyAgents,
}

impl Accepted {
    /// The `outcome` label of the report-parts metric.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Accepted::Stored => "stored",
            Accepted::Late => "late",
            Accepted::Counted => "counted",
            Accepted::TooManyAgents => "refused",
        }
    }
}

/// When a window may be finalized without every node's report: `grace`
/// after its end, after the collector first heard of it, and after the
/// collector started (agents resend what an earlier collector missed).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub started_ms: i64,
    /// Time given to agents after a collector start to resend.
    pub startup_grace_ms: i64,
    pub grace_ms: i64,
}

impl Timing {
    /// Saturating: window times come from reports, and a report must never
    /// overflow the operator's arithmetic.
    pub(crate) fn deadline_ms(&self, end_s: i64, first_seen_ms: i64) -> i64 {
        end_s
            .saturating_mul(1000)
            .max(first_seen_ms)
            .max(self.started_ms.saturating_add(self.startup_grace_ms))
            .saturating_add(self.grace_ms)
    }
}

/// Whether `agent` may add part `part` to a window whose parts came from
/// `parts` (the agent and number of each part of the reporting node): it
/// replaces one it sent, or the node stays within
/// [`admission::MAX_AGENTS_PER_WINDOW`] agents and
/// [`admission::MAX_PARTS_PER_WINDOW`] parts (more would only let a node
/// count its traffic again, or fill the operator's memory).
pub(crate) fn part_fits<'a>(
    agent: &str,
    part: u64,
    parts: impl Iterator<Item = (&'a str, u64)>,
) -> bool {
    let mut agents = std::collections::BTreeSet::new();
    let mut n = 0;
    for (a, p) in parts {
        if a == agent && p == part {
            return true;
        }
        agents.insert(a);
        n += 1;
    }
    let agent_ok = agents.contains(agent) || agents.len() < admission::MAX_AGENTS_PER_WINDOW;
    agent_ok && n < admission::MAX_PARTS_PER_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_future_window_does_not_overflow_the_deadline() {
        let t = Timing {
            started_ms: 1_000,
            startup_grace_ms: 15_000,
            grace_ms: 5_000,
        };
        assert_eq!(t.deadline_ms(100, 0), 105_000);
        assert_eq!(t.deadline_ms(9_300_000_000_000_000, 0), i64::MAX);
        assert_eq!(t.deadline_ms(i64::MAX, i64::MAX), i64::MAX);
    }
}
