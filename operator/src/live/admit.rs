//! What the operator takes from an agent's live records (pure): only what
//! the node can truthfully say. A record's pod must be a pod of the posting
//! node (a compromised node cannot show traffic of another node's pods),
//! its peer an address, its policy one in force on the node; the operator
//! then sets the node, the pod's workload and the peer's name.

use std::net::IpAddr;

use flowlens_api::live::{LiveDirection, LiveFlow, LivePush, LiveVerdict, MAX_LIVE_PUSH};

use crate::collect::attempts::PeerNames;

/// Longest string field accepted (as in reports).
const MAX_FIELD: usize = 320;
/// Records dated further than this from the operator's clock are dropped.
const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

/// What admission needs to know of the cluster.
pub(crate) trait LiveScope: PeerNames {
    /// The node of pod `namespace/name` and its workload (`Kind/name`).
    fn pod(&self, namespace: &str, name: &str) -> Option<(Option<&str>, String)>;
    /// Whether the policy `namespace/name` is in force on `node`.
    fn policy_on_node(&self, namespace: &str, name: &str, node: &str) -> bool;
    /// Whether `ip` is a pod some observation traces (its own node shows
    /// the connections it opens).
    fn traced(&self, ip: &IpAddr) -> bool;
}

/// Admitted records, and how many were dropped (with the first reason).
/// A connection is shown once: at its client when the client is traced
/// (as status counts it), so the server's node's record of it is left
/// out, not counted as dropped.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Admitted {
    pub records: Vec<LiveFlow>,
    pub dropped: usize,
    pub reason: Option<String>,
}

pub(crate) fn admit(push: LivePush, node: &str, scope: &impl LiveScope, now_ms: i64) -> Admitted {
    let mut out = Admitted::default();
    let refuse = |out: &mut Admitted, why: String| {
        out.dropped += 1;
        out.reason.get_or_insert(why);
    };
    for (i, mut r) in push.records.into_iter().enumerate() {
        if i >= MAX_LIVE_PUSH {
            refuse(
                &mut out,
                format!("more than {MAX_LIVE_PUSH} records in one push"),
            );
            continue;
        }
        let too_long = [&r.namespace, &r.pod, &r.peer]
            .into_iter()
            .chain(r.policy.as_ref())
            .chain(r.service.as_ref())
            .any(|s| s.len() > MAX_FIELD);
        if too_long {
            refuse(&mut out, format!("a field longer than {MAX_FIELD} bytes"));
            continue;
        }
        if (r.time - now_ms).abs() > MAX_SKEW_MS {
            refuse(
                &mut out,
                format!("time {} is more than 5 minutes from now", r.time),
            );
            continue;
        }
        let Ok(peer) = r.peer.parse::<IpAddr>() else {
            refuse(&mut out, format!("peer {:?} is not an IP address", r.peer));
            continue;
        };
        let workload = match scope.pod(&r.namespace, &r.pod) {
            Some((Some(n), workload)) if n == node => workload,
            _ => {
                refuse(
                    &mut out,
                    format!("pod {}/{} is not a pod of node {node}", r.namespace, r.pod),
                );
                continue;
            }
        };
        match (&r.verdict, &r.policy) {
            (LiveVerdict::Forwarded, None) => {}
            (LiveVerdict::Blocked | LiveVerdict::Audited, Some(p))
                if p.split_once('/')
                    .is_some_and(|(ns, name)| scope.policy_on_node(ns, name, node)) => {}
            _ => {
                refuse(
                    &mut out,
                    format!(
                        "verdict {} with policy {:?}, which is not in force on node {node}",
                        r.verdict.as_str(),
                        r.policy
                    ),
                );
                continue;
            }
        }
        let peer = peer.to_canonical();
        if r.verdict == LiveVerdict::Forwarded
            && r.direction == LiveDirection::Ingress
            && scope.traced(&peer)
        {
            continue;
        }
        r.peer = peer.to_string();
        r.peer_name = scope.name(&peer);
        r.node = node.to_owned();
        r.workload = Some(workload);
        out.records.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cluster;

    impl PeerNames for Cluster {
        fn name(&self, ip: &IpAddr) -> Option<String> {
            (ip.to_string() == "10.0.0.2").then(|| "ns/db".to_owned())
        }
    }

    impl LiveScope for Cluster {
        fn pod(&self, namespace: &str, name: &str) -> Option<(Option<&str>, String)> {
            match (namespace, name) {
                ("ns", "web") => Some((Some("node-a"), "Deployment/web".into())),
                ("ns", "db") => Some((Some("node-b"), "StatefulSet/db".into())),
                _ => None,
            }
        }
        fn policy_on_node(&self, namespace: &str, name: &str, node: &str) -> bool {
            (namespace, name, node) == ("ns", "deny-db", "node-a")
        }
        fn traced(&self, ip: &IpAddr) -> bool {
            ip.to_string() == "10.0.0.1"
        }
    }

    fn record(pod: &str, peer: &str) -> LiveFlow {
        LiveFlow {
            time: 1_000,
            node: "spoofed".into(),
            namespace: "ns".into(),
            pod: pod.into(),
            workload: Some("spoofed".into()),
            direction: LiveDirection::Egress,
            peer: peer.into(),
            peer_name: Some("spoofed".into()),
            port: 5432,
            protocol: 6,
            service: None,
            verdict: LiveVerdict::Forwarded,
            policy: None,
            connections: 1,
            packets: 3,
            bytes: 180,
        }
    }

    fn push(records: Vec<LiveFlow>) -> LivePush {
        LivePush {
            node: "node-a".into(),
            records,
            lost: 0,
        }
    }

    #[test]
    fn the_operator_names_what_the_node_may_say() {
        let a = admit(
            push(vec![record("web", "::ffff:10.0.0.2")]),
            "node-a",
            &Cluster,
            1_000,
        );
        assert_eq!(a.dropped, 0);
        let r = &a.records[0];
        assert_eq!(r.node, "node-a");
        assert_eq!(r.workload.as_deref(), Some("Deployment/web"));
        assert_eq!(r.peer, "10.0.0.2", "canonical");
        assert_eq!(r.peer_name.as_deref(), Some("ns/db"));
    }

    #[test]
    fn another_nodes_pods_bad_peers_and_foreign_policies_are_dropped() {
        let mut blocked = record("web", "10.0.0.2");
        blocked.verdict = LiveVerdict::Blocked;
        blocked.policy = Some("ns/deny-db".into());
        let mut foreign_policy = blocked.clone();
        foreign_policy.policy = Some("other/allow-all".into());
        let mut no_policy = blocked.clone();
        no_policy.policy = None;
        let mut forwarded_with_policy = record("web", "10.0.0.2");
        forwarded_with_policy.policy = Some("ns/deny-db".into());
        let mut old = record("web", "10.0.0.2");
        old.time = 1_000 - MAX_SKEW_MS - 1;
        let mut long = record("web", "10.0.0.2");
        long.service = Some("x".repeat(MAX_FIELD + 1));
        let a = admit(
            push(vec![
                blocked,
                record("db", "10.0.0.9"),
                record("ghost", "10.0.0.9"),
                record("web", "not-an-ip"),
                foreign_policy,
                no_policy,
                forwarded_with_policy,
                old,
                long,
            ]),
            "node-a",
            &Cluster,
            1_000,
        );
        assert_eq!(a.records.len(), 1);
        assert_eq!(a.records[0].policy.as_deref(), Some("ns/deny-db"));
        assert_eq!(a.dropped, 8);
        assert!(a.reason.unwrap().contains("db is not a pod of node node-a"));
    }

    /// db (node-b) sees web's connection arrive; web (10.0.0.1) is traced,
    /// so node-a shows it: once, at the client. From an untraced client,
    /// the server's record is the only one.
    #[test]
    fn a_connection_is_shown_at_its_traced_client_only() {
        let at_server = |peer: &str| {
            let mut r = record("db", peer);
            r.direction = LiveDirection::Ingress;
            r
        };
        let a = admit(
            LivePush {
                node: "node-b".into(),
                records: vec![at_server("10.0.0.1"), at_server("10.9.9.9")],
                lost: 0,
            },
            "node-b",
            &Cluster,
            1_000,
        );
        assert_eq!(a.dropped, 0);
        assert_eq!(a.records.len(), 1);
        assert_eq!(a.records[0].peer, "10.9.9.9");
    }

    #[test]
    fn a_push_is_bounded() {
        let many = vec![record("web", "10.0.0.2"); MAX_LIVE_PUSH + 3];
        let a = admit(push(many), "node-a", &Cluster, 1_000);
        assert_eq!((a.records.len(), a.dropped), (MAX_LIVE_PUSH, 3));
    }
}
