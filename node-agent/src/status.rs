//! Writes the agent's view into its `NodeAgentConfig` status (server-side
//! apply, field manager `flowlens-agent`), only when it changed.

use std::time::Duration;

use flowlens_api::{
    conditions::{self, reason},
    node_agent_config::{NodeAgentConfig, NodeAgentConfigStatus},
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Condition, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tracing::{debug, warn};

use crate::state::{AgentSnapshot, Shared};

/// The status to publish for a snapshot; `conditions` carries the previous
/// conditions so transition times move only on flips.
pub(crate) fn status_of(
    snap: &AgentSnapshot,
    conditions: &mut Vec<Condition>,
    now: Timestamp,
) -> NodeAgentConfigStatus {
    let applied = snap.applied_revision.is_some() && snap.applied_revision == snap.desired_revision;
    let (reason_, message) = match (&snap.apply_error, applied, &snap.desired_revision) {
        (Some(e), _, _) => (
            reason::APPLY_FAILED,
            format!(
                "revision {} not applied: {e}",
                snap.desired_revision.as_deref().unwrap_or("?")
            ),
        ),
        (None, true, Some(r)) => (reason::APPLIED, format!("revision {r} is in force")),
        _ => (reason::PENDING, "waiting for a configuration".to_owned()),
    };
    conditions::set(
        conditions,
        conditions::APPLIED,
        applied,
        reason_,
        message,
        None,
        now,
    );
    match snap.problems.first() {
        Some(first) => {
            let message = snap
                .problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            conditions::set(
                conditions,
                conditions::DEGRADED,
                true,
                &first.reason,
                message,
                None,
                now,
            );
        }
        None => {
            conditions::set(
                conditions,
                conditions::DEGRADED,
                false,
                reason::AS_EXPECTED,
                "everything in the config is in force",
                None,
                now,
            );
        }
    }
    NodeAgentConfigStatus {
        applied_revision: snap.applied_revision.clone(),
        conditions: conditions.clone(),
        hooks: Some(snap.hooks.clone()),
        policies: if snap.applied_revision.is_some() {
            snap.policies.clone()
        } else {
            Vec::new()
        },
        policies_not_in_force: if snap.applied_revision.is_some() {
            snap.policies_not_in_force.clone()
        } else {
            Vec::new()
        },
        observations: if snap.applied_revision.is_some() {
            snap.observations.clone()
        } else {
            Vec::new()
        },
        endpoints: Some(snap.endpoints.clone()),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    }
}

/// Publishes the status every second when it changed.
pub async fn run(client: Client, node: String, shared: Shared) {
    let api: Api<NodeAgentConfig> = Api::all(client);
    let params = PatchParams::apply("flowlens-agent").force();
    let mut conditions = Vec::new();
    let mut last: Option<NodeAgentConfigStatus> = None;
    // The object the last status went to: a recreated config has a new uid
    // and an empty status, written again even if nothing else changed.
    let mut last_uid: Option<String> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let snap = shared.read();
        if snap.desired_revision.is_none() {
            continue;
        }
        let status = status_of(&snap, &mut conditions, Timestamp::now());
        if last.as_ref() == Some(&status) && last_uid == snap.config_uid {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "flowlens.dev/v1alpha1",
            "kind": "NodeAgentConfig",
            "status": status,
        });
        match api
            .patch_status(&node, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                debug!(revision = ?status.applied_revision, "status written");
                last = Some(status);
                last_uid = snap.config_uid.clone();
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => warn!(error = %e, "cannot write NodeAgentConfig status (will retry)"),
        }
    }
}
