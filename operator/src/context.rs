//! State shared by the operator's tasks.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU8, Ordering},
};

use flowlens_api::NodeAgentConfig;
use kube::{
    Client,
    runtime::{events::Recorder, reflector::Store},
};
use tokio::sync::{Notify, mpsc};

use crate::{compile::Compiler, metrics::Metrics};

/// Kinds fed into the compiler; all must finish their initial list before
/// the first config is written.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Node = 1,
    Namespace = 2,
    Pod = 4,
    Observation = 8,
    Policy = 16,
    Service = 32,
    EndpointSlice = 64,
}

const ALL_KINDS: u8 = 1 | 2 | 4 | 8 | 16 | 32 | 64;

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Observation,
        Kind::Policy,
        Kind::Service,
        Kind::EndpointSlice,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Observation => "NetworkObservation",
            Kind::Policy => "FlowPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// Tracks the initial sync of every watched kind.
#[derive(Default)]
pub struct SyncState {
    done: AtomicU8,
    /// Kinds whose watch fails now (their view may be stale).
    stale: AtomicU8,
    pub notify: Notify,
}

impl SyncState {
    /// Marks a kind synced; returns true when this completes the initial sync.
    pub(crate) fn mark(&self, kind: Kind) -> bool {
        let before = self.done.fetch_or(kind as u8, Ordering::SeqCst);
        let complete = before | kind as u8 == ALL_KINDS && before != ALL_KINDS;
        if complete {
            self.notify.notify_waiters();
        }
        complete
    }

    pub(crate) fn is_synced(&self) -> bool {
        self.done.load(Ordering::SeqCst) == ALL_KINDS
    }

    /// Records whether a kind's watch fails (its view may be stale).
    pub(crate) fn set_stale(&self, kind: Kind, stale: bool) {
        if stale {
            self.stale.fetch_or(kind as u8, Ordering::SeqCst);
        } else {
            self.stale.fetch_and(!(kind as u8), Ordering::SeqCst);
        }
    }

    /// The kinds whose watch fails now.
    pub(crate) fn stale_kinds(&self) -> Vec<&'static str> {
        let bits = self.stale.load(Ordering::SeqCst);
        Kind::ALL
            .into_iter()
            .filter(|k| bits & *k as u8 != 0)
            .map(Kind::name)
            .collect()
    }
}

/// Wake-ups for the status controllers.
pub struct Triggers {
    pub policies: mpsc::UnboundedSender<(String, String)>,
    pub observations: mpsc::UnboundedSender<String>,
}

pub struct Context {
    pub client: Client,
    pub compiler: Mutex<Compiler>,
    pub sync: SyncState,
    /// Wakes the config writer.
    pub changed: Notify,
    pub configs: Store<NodeAgentConfig>,
    /// Node -> revision of the config the writer last wrote.
    pub written: Mutex<std::collections::HashMap<String, String>>,

    pub metrics: Arc<Metrics>,
    pub results: crate::results::ResultStore,
    pub policy_results: crate::results::PolicyResults,
    /// Statuses written that the controllers' caches may not show yet.
    pub observation_statuses: crate::status_apply::StatusMemory<
        flowlens_api::network_observation::NetworkObservationStatus,
    >,
    pub policy_statuses:
        crate::status_apply::StatusMemory<flowlens_api::flow_policy::FlowPolicyStatus>,
    /// When each policy's status was last written (rollout progress is
    /// coalesced).
    pub policy_progress: crate::policy_status::ProgressThrottle,
    pub recorder: Recorder,
    pub triggers: Triggers,
}

impl Context {
    /// Runs `f` on the compiler, then wakes whoever its changes concern.
    pub fn with_compiler<T>(&self, f: impl FnOnce(&mut Compiler) -> T) -> T {
        let mut c = self.compiler.lock().expect("compiler lock");
        let out = f(&mut c);
        if self.sync.is_synced() {
            for p in c.take_dirty_policies() {
                let _ = self.triggers.policies.send(p);
            }
            for o in c.take_dirty_observations() {
                let _ = self.triggers.observations.send(o);
            }
        }
        drop(c);
        self.changed.notify_one();
        out
    }
}
