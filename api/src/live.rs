//! Live flows: what `kubectl flowlens observe` shows, seconds after the
//! packets.
//!
//! Path: while someone observes, each agent drains its kernel tables every
//! second and posts the records of each drain ([`LivePush`]) to the
//! operator's collector (`POST /v1/live`, authenticated like reports). When
//! nobody observes, the agent's request waits at the collector (a long
//! poll, [`LIVE_POLL_HOLD_SECONDS`]) until someone does, and the agent
//! drains at its usual pace. Users read through the API server: the
//! operator serves the aggregated API group [`LIVE_GROUP`] (resource
//! `flows`), so the API server authenticates and authorizes every reader
//! (`list`/`watch` on `flows.live.flowlens.dev`, per namespace or
//! cluster-wide) and the operator accepts only requests the API server
//! proxied to it.
//!
//! Records are display data: the operator admits only records of pods on
//! the posting node and names peers; counts in status come from reports.

use serde::{Deserialize, Serialize};

/// The aggregated API group serving live flows.
pub const LIVE_GROUP: &str = "live.flowlens.dev";
/// Its version.
pub const LIVE_VERSION: &str = "v1alpha1";
/// Its one resource.
pub const LIVE_RESOURCE: &str = "flows";
/// How long the collector holds an agent's poll while nobody observes.
pub const LIVE_POLL_HOLD_SECONDS: u64 = 25;
/// The most records one push may carry (the agent keeps the newest).
pub const MAX_LIVE_PUSH: usize = 4096;

/// What happened to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveVerdict {
    /// Traffic that flowed.
    Forwarded,
    /// Attempts a FlowPolicy blocked.
    Blocked,
    /// Attempts a FlowPolicy in `Audit` mode matched (and let through).
    Audited,
}

impl LiveVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            LiveVerdict::Forwarded => "forwarded",
            LiveVerdict::Blocked => "blocked",
            LiveVerdict::Audited => "audited",
        }
    }
}

/// Which way the connection goes, seen from the local pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveDirection {
    /// The local pod opened it (or sent it): the peer is the destination.
    Egress,
    /// The peer opened it: the local pod is the destination.
    Ingress,
}

/// One connection's activity during one drain interval (about a second
/// while someone observes), or one policy's matches of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveFlow {
    /// Unix milliseconds: end of the interval (the drain), or the last
    /// match for blocked and audited attempts.
    pub time: i64,
    /// The node that saw it (set by the operator from the agent's identity).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// The local pod.
    pub namespace: String,
    pub pod: String,
    /// The local pod's workload (set by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub direction: LiveDirection,
    /// The peer's address (through a Service, for blocked attempts, the
    /// Service's; for traffic, the backend's).
    pub peer: String,
    /// The peer by name (`namespace/pod`, `node/<name>`,
    /// `service/<namespace>/<name>`), set by the operator when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
    /// The server's port.
    pub port: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// The Service (`namespace/name`) a local client connected through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub verdict: LiveVerdict,
    /// The FlowPolicy (`namespace/name`) that matched, for blocked and
    /// audited attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Connections opened in the interval (a SYN seen), or attempts.
    pub connections: u64,
    /// Packets (both ways for traffic).
    pub packets: u64,
    /// IP-layer bytes (both ways; 0 for attempts).
    pub bytes: u64,
}

/// An agent's post: the records of its drains since the last one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LivePush {
    pub node: String,
    #[serde(default)]
    pub records: Vec<LiveFlow>,
    /// Records the agent dropped since its last post (its buffer was full).
    #[serde(default)]
    pub lost: u64,
}

/// The collector's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveReply {
    /// Someone observes: drain every second and post again in a second.
    pub watching: bool,
}

/// One line of the `flows` stream (newline-delimited JSON): a record, or
/// how many records this reader missed (it read too slowly, or an agent's
/// buffer overflowed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // one per line read; boxing buys nothing
pub enum LiveLine {
    Flow(LiveFlow),
    Lost { lost: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_tell_records_from_losses() {
        let flow = LiveFlow {
            time: 1,
            node: "n".into(),
            namespace: "ns".into(),
            pod: "web".into(),
            workload: None,
            direction: LiveDirection::Egress,
            peer: "10.0.0.2".into(),
            peer_name: Some("ns/db".into()),
            port: 5432,
            protocol: 6,
            service: None,
            verdict: LiveVerdict::Blocked,
            policy: Some("ns/deny-db".into()),
            connections: 3,
            packets: 3,
            bytes: 0,
        };
        for line in [LiveLine::Flow(flow), LiveLine::Lost { lost: 7 }] {
            let text = serde_json::to_string(&line).unwrap();
            assert_eq!(serde_json::from_str::<LiveLine>(&text).unwrap(), line);
        }
        assert!(
            serde_json::to_string(&LiveLine::Lost { lost: 7 })
                .unwrap()
                .contains("\"lost\":7")
        );
    }
}
