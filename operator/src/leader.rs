//! Leader election: one operator replica works, the others wait.
//!
//! Replicas compete for a `coordination.k8s.io` Lease (the
//! `kube-lease-manager` crate: server-side apply, so two holders are
//! impossible). The holder labels its own pod `flowlens.dev/collector=leader`;
//! the collector Service selects that label, so agents' reports reach the
//! leader and only it. A replica starts its watches, writers and report
//! endpoint once it holds the lease, and exits when it loses it (its pod
//! restarts as a standby): no two replicas ever write. Agents keep every
//! window until a status write holds it, so a handover loses nothing and
//! counts nothing twice.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

/// The label the collector Service selects.
pub const LEADER_LABEL: &str = "flowlens.dev/collector";
pub const LEADER_VALUE: &str = "leader";

/// Where the lease lives and who competes for it.
pub struct LeaderOptions {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's pod (its identity, and what gets the leader label).
    pub pod_name: String,
    /// Seconds a lease holds without renewal: the longest a dead leader
    /// blocks a standby.
    pub lease_seconds: u64,
}

/// The lease, held.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

async fn label_own_pod(client: &Client, opts: &LeaderOptions, leader: bool) -> kube::Result<()> {
    let value = if leader {
        serde_json::Value::String(LEADER_VALUE.into())
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    Api::<Pod>::namespaced(client.clone(), &opts.namespace)
        .patch(
            &opts.pod_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
}

/// Waits until this replica holds the lease, then labels its pod.
pub async fn acquire(client: Client, opts: &LeaderOptions) -> anyhow::Result<Leadership> {
    // A restarted container of the former leader is a standby now.
    if let Err(e) = label_own_pod(&client, opts, false).await {
        warn!(pod = %opts.pod_name, error = %e, "cannot clear the leader label of this pod");
    }
    let grace = (opts.lease_seconds / 3).max(1);
    // One identity per process: a restarted container does not inherit its
    // predecessor's lease, it competes for it like any standby.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let identity = format!("{}_{started}", opts.pod_name);
    let manager = LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
        .with_namespace(&opts.namespace)
        .with_parameters(LeaseParams::new(
            identity.clone(),
            opts.lease_seconds,
            grace,
        ))
        .build()
        .await?;
    let (mut state, task) = manager.watch().await;
    info!(lease = %opts.lease_name, %identity, "waiting to become the leader");
    while !*state.borrow_and_update() {
        state.changed().await?;
    }
    info!(lease = %opts.lease_name, "became the leader");
    label_own_pod(&client, opts, true).await?;
    Ok(Leadership { state, task })
}

impl Leadership {
    /// Resolves when the lease is lost (or cannot be renewed).
    pub async fn lost(&mut self) {
        while *self.state.borrow_and_update() {
            if self.state.changed().await.is_err() {
                break;
            }
        }
        if self.task.is_finished() {
            warn!("the lease manager stopped");
        }
    }
}
