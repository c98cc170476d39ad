//! Which workload a pod belongs to, from its owner references alone (no
//! extra API reads): Deployment via its ReplicaSet, StatefulSet, DaemonSet,
//! Job, CronJob via its Job, with a fallback.

use flowlens_api::node_agent_config::WorkloadRef;

/// The controlling owner of a pod: `(kind, name)`.
pub(crate) type Owner<'a> = (&'a str, &'a str);

/// The workload of a pod named `pod` with controlling owner `owner` and the
/// `pod-template-hash` label `template_hash`.
pub(crate) fn workload_of(
    pod: &str,
    owner: Option<Owner<'_>>,
    template_hash: Option<&str>,
) -> WorkloadRef {
    let w = |kind: &str, name: &str| WorkloadRef {
        kind: kind.to_owned(),
        name: name.to_owned(),
    };
    match owner {
        // A Deployment names its ReplicaSets `<deployment>-<pod-template-hash>`.
        Some(("ReplicaSet", rs)) => match template_hash
            .and_then(|h| rs.strip_suffix(h))
            .and_then(|p| p.strip_suffix('-'))
        {
            Some(deployment) if !deployment.is_empty() => w("Deployment", deployment),
            _ => w("ReplicaSet", rs),
        },
        // A CronJob names its Jobs `<cronjob>-<scheduled time in minutes>`.
        Some(("Job", job)) => match job.rsplit_once('-') {
            Some((cron, ts)) if ts.len() >= 8 && ts.bytes().all(|b| b.is_ascii_digit()) => {
                w("CronJob", cron)
            }
            _ => w("Job", job),
        },
        Some((kind, name)) => w(kind, name),
        None => w("Pod", pod),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(w: WorkloadRef) -> String {
        w.to_string()
    }

    #[test]
    fn owners() {
        assert_eq!(
            s(workload_of(
                "web-7d9c5b6f4-x2k8p",
                Some(("ReplicaSet", "web-7d9c5b6f4")),
                Some("7d9c5b6f4")
            )),
            "Deployment/web"
        );
        assert_eq!(
            s(workload_of("p", Some(("ReplicaSet", "bare-rs")), None)),
            "ReplicaSet/bare-rs"
        );
        assert_eq!(
            s(workload_of("db-0", Some(("StatefulSet", "db")), None)),
            "StatefulSet/db"
        );
        assert_eq!(
            s(workload_of("agent-x", Some(("DaemonSet", "agent")), None)),
            "DaemonSet/agent"
        );
        assert_eq!(
            s(workload_of("migrate-abc", Some(("Job", "migrate")), None)),
            "Job/migrate"
        );
        assert_eq!(
            s(workload_of(
                "backup-28412345-abcde",
                Some(("Job", "backup-28412345")),
                None
            )),
            "CronJob/backup"
        );
        assert_eq!(
            s(workload_of("x", Some(("Rollout", "canary")), None)),
            "Rollout/canary"
        );
        assert_eq!(s(workload_of("debug", None, None)), "Pod/debug");
    }
}
