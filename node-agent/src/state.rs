//! What the control loop publishes for HTTP, `dump` and the status writer.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, Ordering},
    },
};

use flowlens_api::{
    node_agent_config::{
        CollectorEndpoint, DatapathHooks, EndpointAttachment, ObservationRef, PolicyRef,
    },
    report::{ObservationWindow, PolicyMatches},
};
use serde::{Deserialize, Serialize};

/// A snapshot of the agent, served at `/debug/window` and printed by `dump`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentSnapshot {
    pub node: String,
    /// The config revision the datapath enforces.
    pub applied_revision: Option<String>,
    /// The revision last received (may differ while applying or on error).
    pub desired_revision: Option<String>,
    /// The uid of the NodeAgentConfig object read last (a recreated object
    /// has a new one, and an empty status to fill).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_uid: Option<String>,
    pub apply_error: Option<String>,
    pub hooks: DatapathHooks,
    pub generation: u32,
    /// Open (partial) windows, one per observation.
    pub open_windows: Vec<ObservationWindow>,
    /// The last completed window of each observation, by UID.
    pub last_windows: BTreeMap<String, ObservationWindow>,
    /// The most recent completed windows (parts) of every observation,
    /// oldest first, at most [`HISTORY`].
    pub history: Vec<ObservationWindow>,
    /// Policy matches since the agent started.
    pub policy_totals: Vec<PolicyMatches>,
    /// Policies in force (verified), at their revision.
    pub policies: Vec<PolicyRef>,
    /// Policies of the applied revision not fully in force, and why.
    #[serde(default)]
    pub policies_not_in_force: Vec<flowlens_api::node_agent_config::PolicyNotInForce>,
    /// Observations running, at their generation.
    #[serde(default)]
    pub observations: Vec<ObservationRef>,
    pub endpoints: EndpointAttachment,
    /// Where completed windows are reported (from the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<CollectorEndpoint>,
    /// Problems of the current config (compile problems, missing interfaces, full tables).
    pub problems: Vec<Problem>,
    pub kernel: KernelState,
}

/// Completed windows kept in [`AgentSnapshot::history`].
pub(crate) const HISTORY: usize = 64;

/// A problem with a reason usable in a condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Problem {
    pub reason: String,
    pub message: String,
}

/// Kernel table state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KernelState {
    pub flow_entries: usize,
    pub flow_capacity: u32,
    pub rtt_entries: usize,
    pub rtt_capacity: u32,
    pub flow_table_full: u64,
    pub rtt_table_full: u64,
    pub conn_table_full: u64,
    pub rtt_samples: u64,
    pub connect_denied: u64,
    /// Kernel drops of traced pods by reason, since the maps were created.
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub drops_without_flow: u64,
    /// Connections to Services translated to a backend at `connect()`.
    #[serde(default)]
    pub service_translated: u64,
    pub last_drain_micros: u64,
}

/// The snapshot, shared between the control loop (writer) and readers.
#[derive(Clone, Default)]
pub struct Shared {
    inner: Arc<RwLock<AgentSnapshot>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    beats: Arc<Heartbeats>,
}

/// When the agent's loops last went round (ms since the Unix epoch; 0: not
/// running): `/healthz` fails when one of them is stuck.
#[derive(Default)]
struct Heartbeats {
    control: AtomicI64,
    reporter: AtomicI64,
}

/// The control loop wakes at least every reconcile interval (2 s).
pub const CONTROL_STUCK_MS: i64 = 30_000;
/// The reporter wakes at least every heartbeat or backoff (at most 30 s).
pub const REPORTER_STUCK_MS: i64 = 120_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Shared {
    pub(crate) fn read(&self) -> AgentSnapshot {
        self.inner.read().expect("snapshot lock").clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut AgentSnapshot)) {
        f(&mut self.inner.write().expect("snapshot lock"));
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The control loop went round.
    pub fn beat_control(&self) {
        self.beats.control.store(now_ms(), Ordering::Relaxed);
    }

    /// The reporter went round.
    pub fn beat_reporter(&self) {
        self.beats.reporter.store(now_ms(), Ordering::Relaxed);
    }

    /// Why the agent is unhealthy, if it is: a loop that started and then
    /// stopped going round.
    pub fn stuck(&self) -> Option<&'static str> {
        let now = now_ms();
        let stale = |t: i64, limit: i64| t != 0 && now - t > limit;
        if stale(self.beats.control.load(Ordering::Relaxed), CONTROL_STUCK_MS) {
            Some("the control loop is stuck")
        } else if stale(
            self.beats.reporter.load(Ordering::Relaxed),
            REPORTER_STUCK_MS,
        ) {
            Some("the reporter is stuck")
        } else {
            None
        }
    }
}
