//! What an agent reports to the operator (and prints with `flowlens-agent dump`).
//!
//! A report carries completed windows. A window *part* is identified by node,
//! agent (one id per agent process, or per state directory), observation
//! UID, window and part number, so resending it is harmless, and an agent
//! restarted within a window reports a second part that the operator adds
//! to the first. The agent keeps every part
//! until the operator answers that its window is committed (written to status);
//! the operator ignores parts of windows it has already committed.
//!
//! The operator accepts only what the node can truthfully say (see the
//! operator's `collect/admission.rs`): window starts aligned to their
//! length and at most a minute in the future, observations and policies in
//! force on the node, local pods of the node, at most `maxSeries` + 1
//! series, at most 4 agent processes per node and window, strings of at
//! most 320 bytes. A malformed batch is answered 422 and nothing of it is
//! stored; a part the cluster no longer agrees with is dropped alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{histogram::Histogram, network_observation::FlowEndpoint};

/// Reports from one node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportBatch {
    pub node: String,
    /// Identifies the agent: one per process, or, with a state directory,
    /// kept across restarts (the successor reports what its predecessor's
    /// spool held under the same id and part numbers).
    pub agent: String,
    /// Completed observation windows.
    #[serde(default)]
    pub windows: Vec<ObservationWindow>,
    /// Completed policy-counter windows.
    #[serde(default)]
    pub policy_windows: Vec<PolicyWindow>,
}

/// The operator's answer: what is committed, so the agent can forget it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportAck {
    /// Identifies the collector process (changes when the operator
    /// restarts): an agent resends what a previous collector received but
    /// did not commit.
    #[serde(default)]
    pub collector: String,

    /// Observation UID -> end (unix seconds) of the last committed window.
    #[serde(default)]
    pub committed: BTreeMap<String, i64>,
    /// End (unix seconds) of the last committed policy window of this node.
    #[serde(default)]
    pub policy_committed: i64,
}

/// One window of one observation on one node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservationWindow {
    pub observation: String,
    pub uid: String,
    pub generation: i64,
    /// Unix seconds, a multiple of `windowSeconds`.
    pub start: i64,
    pub window_seconds: u32,
    /// False when the agent did not run for the whole window.
    pub complete: bool,
    pub series: Vec<Series>,
    /// Series folded into `other` series because `maxSeries` was reached.
    pub folded_series: u64,
    /// Packets the kernel could not give their own flow entry (flow table
    /// full); they are still counted, in `other` series.
    #[serde(default)]
    pub overflow_packets: u64,
    /// Numbers the parts of one agent process: a resent part has the same
    /// number (and replaces itself), another part of the same window (the
    /// observation changed mid-window) a new one.
    #[serde(default)]
    pub part: u64,
    /// DNS of the observation's pods in the window (absent without any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::DnsWindow>,
    /// Closed before the window ended (agent stopping, observation
    /// changed): more parts of this window may follow from this node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed_early: bool,
}

impl ObservationWindow {
    pub fn end(&self) -> i64 {
        self.start + i64::from(self.window_seconds)
    }
}

/// Which side opened the connections of a series.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Role {
    /// The local pod opened them.
    #[default]
    Client,
    /// The remote peer opened them.
    Server,
}

/// Packets and bytes in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    pub packets: u64,
    /// IP-layer bytes.
    pub bytes: u64,
    /// Transport payload bytes.
    pub payload_bytes: u64,
}

impl Traffic {
    /// Saturating: counts come from reports, which must never overflow the
    /// operator's arithmetic.
    pub fn add(&mut self, o: &Traffic) {
        self.packets = self.packets.saturating_add(o.packets);
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.payload_bytes = self.payload_bytes.saturating_add(o.payload_bytes);
    }

    pub fn is_zero(&self) -> bool {
        self.packets == 0 && self.bytes == 0
    }
}

/// Traffic between local pods with the same dimensions and one remote
/// address, on one server port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Series {
    /// The local pods' dimensions ([`FlowEndpoint::project`]); `other` for
    /// the overflow bucket of `maxSeries`.
    pub local: FlowEndpoint,
    /// The remote address; `None` for the `other` bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The DNS name the local pods resolved to the remote address (from
    /// the answers they received), when they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_name: Option<String>,
    /// The server port (0 without ports).
    pub port: u16,
    /// IP protocol number.
    pub protocol: u8,
    pub role: Role,
    /// The Service (`namespace/name`) the local pods' connections went
    /// through; `remote` and `port` are then the backend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Connections seen in the window.
    pub flows: u64,
    /// From the local pods.
    pub tx: Traffic,
    /// To the local pods.
    pub rx: Traffic,
    #[serde(default)]
    pub retransmits: u64,
    /// Packets the kernel dropped (either direction).
    #[serde(default)]
    pub drops: u64,
    #[serde(default, skip_serializing_if = "Histogram::is_empty")]
    pub rtt: Histogram,
}

/// Packets and connection attempts matched by a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Matches {
    pub packets: u64,
    pub connections: u64,
}

impl Matches {
    /// Saturating, like [`Traffic::add`].
    pub fn add(&mut self, o: &Matches) {
        self.packets = self.packets.saturating_add(o.packets);
        self.connections = self.connections.saturating_add(o.connections);
    }
}

/// Per-policy match counters of one node over one policy window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyWindow {
    /// Unix seconds, a multiple of `windowSeconds`.
    pub start: i64,
    pub window_seconds: u32,
    pub policies: Vec<PolicyMatches>,
    /// Numbers the parts of one agent (the same counter as observation
    /// windows' `part`): a resent part replaces itself; another part of the
    /// same window (flushed by a stopping agent, or left in a killed
    /// agent's spool) adds to it.
    #[serde(default)]
    pub part: u64,
}

impl PolicyWindow {
    pub fn end(&self) -> i64 {
        self.start + i64::from(self.window_seconds)
    }
}

/// Matches of one policy on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMatches {
    pub namespace: String,
    pub name: String,
    pub blocked: Matches,
    pub audited: Matches,
    /// Who tried to reach whom: the busiest of the window's blocked and
    /// audited attempts (at most [`MAX_NAMED_ATTEMPTS`]; the counts above
    /// hold every match, named or not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<NamedAttempt>,
}

/// Most named attempts per policy in one window of one agent.
pub const MAX_NAMED_ATTEMPTS: usize = 16;

/// Whether a rule blocked or only audited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AttemptVerdict {
    Blocked,
    Audited,
}

/// Which side opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AttemptDirection {
    /// The local pod tried to reach `peer` (its egress rules matched).
    Egress,
    /// `peer` tried to reach the local pod (its ingress rules matched).
    Ingress,
}

/// Attempts of one local pod with one peer on one port, matched by one
/// policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamedAttempt {
    /// The local pod whose rules matched (`namespace/pod`).
    pub pod: String,
    pub direction: AttemptDirection,
    /// The peer's IP address (through a Service, the Service's address).
    pub peer: String,
    /// The server's port.
    pub port: u16,
    /// IP protocol number.
    pub protocol: u8,
    pub verdict: AttemptVerdict,
    /// Connection attempts (TCP SYNs, `connect()` calls).
    pub attempts: u64,
    /// Packets matched (for a protocol without connections, what was dropped).
    pub packets: u64,
    /// Unix seconds of the last match.
    pub last_seen: i64,
}

/// The audience of the ServiceAccount tokens agents present to the
/// operator's report endpoint (a token for it is useless elsewhere).
pub const REPORT_AUDIENCE: &str = "flowlens.dev/collector";

/// The length of policy-counter windows, in seconds.
pub const POLICY_WINDOW_SECONDS: u32 = 10;

/// Protocol name for display: `TCP`, `UDP`, ... or the number.
pub fn protocol_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}
