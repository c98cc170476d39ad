//! `kubectl flowlens observe`: live flows, one line per connection and
//! drain interval (about a second), and per blocked or audited attempt with
//! its policy. Read through the API server (the aggregated API
//! `live.flowlens.dev/v1alpha1`, resource `flows`), so its RBAC decides who
//! sees which namespace. Filtering (beyond the namespace) and formatting are
//! here, pure.

use flowlens_api::{
    format,
    live::{
        LIVE_GROUP, LIVE_RESOURCE, LIVE_VERSION, LiveDirection, LiveFlow, LiveLine, LiveVerdict,
    },
    report::protocol_name,
};

/// The request path: cluster-wide or one namespace.
pub fn path(namespace: Option<&str>, follow: bool, since_s: Option<u64>) -> String {
    let scope = namespace.map_or(String::new(), |ns| format!("namespaces/{ns}/"));
    let mut query = Vec::new();
    if follow {
        query.push("watch=true".to_owned());
    }
    if let Some(s) = since_s {
        query.push(format!("sinceSeconds={s}"));
    }
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    format!("/apis/{LIVE_GROUP}/{LIVE_VERSION}/{scope}{LIVE_RESOURCE}{query}")
}

/// What to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// A pod name, on either side.
    pub pod: Option<String>,
    /// A workload (`Deployment/web` or `web`) of the local pod.
    pub workload: Option<String>,
    /// The server port.
    pub port: Option<u16>,
    pub verdict: Option<LiveVerdict>,
}

impl Filter {
    pub fn matches(&self, r: &LiveFlow) -> bool {
        let pod_ok = self.pod.as_deref().is_none_or(|p| {
            r.pod == p
                || r.peer_name.as_deref().is_some_and(|n| {
                    n.rsplit('/').next() == Some(p)
                        && !n.starts_with("node/")
                        && !n.starts_with("service/")
                })
        });
        let workload_ok = self.workload.as_deref().is_none_or(|w| {
            r.workload
                .as_deref()
                .is_some_and(|rw| rw == w || rw.rsplit('/').next() == Some(w))
        });
        pod_ok
            && workload_ok
            && self.port.is_none_or(|p| r.port == p)
            && self.verdict.is_none_or(|v| r.verdict == v)
    }
}

/// One record as a line: time, node, `source -> destination:port/proto`,
/// the verdict and policy, then what was counted.
pub fn line(r: &LiveFlow) -> String {
    let local = format!("{}/{}", r.namespace, r.pod);
    let peer = r.peer_name.clone().unwrap_or_else(|| r.peer.clone());
    let (source, destination) = match r.direction {
        LiveDirection::Egress => (local, peer),
        LiveDirection::Ingress => (peer, local),
    };
    let via = r
        .service
        .as_deref()
        .map_or(String::new(), |s| format!(" via service/{s}"));
    let what = match r.verdict {
        LiveVerdict::Forwarded => format!(
            "{} new, {} pkts, {}",
            r.connections,
            format::count(r.packets),
            format::bytes(r.bytes)
        ),
        _ => format!(
            "{} {}, {} pkts",
            r.connections,
            if r.connections == 1 {
                "attempt"
            } else {
                "attempts"
            },
            format::count(r.packets)
        ),
    };
    format!(
        "{:<14} {:<15} {} -> {}:{}/{}{}   {:<10}  {}   {}",
        clock(r.time),
        r.node,
        source,
        destination,
        r.port,
        protocol_name(r.protocol),
        via,
        r.verdict.as_str().to_uppercase(),
        r.policy.as_deref().unwrap_or("-"),
        what
    )
}

/// A line of the stream, as the user sees it (`None`: filtered out).
pub fn render(l: &LiveLine, filter: &Filter) -> Option<String> {
    match l {
        LiveLine::Flow(r) if filter.matches(r) => Some(line(r)),
        LiveLine::Flow(_) => None,
        LiveLine::Lost { lost } => Some(format!(
            "-- {lost} records missed (this reader or an agent fell behind)"
        )),
    }
}

/// `HH:MM:SS.mmm` (UTC) of unix milliseconds.
fn clock(ms: i64) -> String {
    let ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked() -> LiveFlow {
        LiveFlow {
            time: 45_296_789,
            node: "node-a".into(),
            namespace: "shop".into(),
            pod: "web-1".into(),
            workload: Some("Deployment/web".into()),
            direction: LiveDirection::Egress,
            peer: "10.0.0.2".into(),
            peer_name: Some("shop/db-0".into()),
            port: 5432,
            protocol: 6,
            service: None,
            verdict: LiveVerdict::Blocked,
            policy: Some("shop/deny-db".into()),
            connections: 3,
            packets: 3,
            bytes: 0,
        }
    }

    #[test]
    fn a_blocked_attempt_names_both_ends_and_the_policy() {
        let l = line(&blocked());
        assert!(l.starts_with("12:34:56.789"), "{l}");
        assert!(l.contains("shop/web-1 -> shop/db-0:5432/TCP"), "{l}");
        assert!(l.contains("BLOCKED"), "{l}");
        assert!(l.contains("shop/deny-db"), "{l}");
        assert!(l.contains("3 attempts"), "{l}");
    }

    #[test]
    fn ingress_puts_the_peer_first_and_services_are_shown() {
        let mut r = blocked();
        r.direction = LiveDirection::Ingress;
        r.peer_name = None;
        r.verdict = LiveVerdict::Forwarded;
        r.policy = None;
        r.service = Some("shop/web".into());
        let l = line(&r);
        assert!(
            l.contains("10.0.0.2 -> shop/web-1:5432/TCP via service/shop/web"),
            "{l}"
        );
        assert!(l.contains("FORWARDED"), "{l}");
    }

    #[test]
    fn filters_select_pods_on_either_side_workloads_ports_and_verdicts() {
        let r = blocked();
        let f = |f: Filter| f.matches(&r);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            pod: Some("web-1".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            pod: Some("db-0".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            pod: Some("other".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            workload: Some("web".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            workload: Some("Deployment/web".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            workload: Some("db".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            port: Some(5432),
            ..Default::default()
        }));
        assert!(!f(Filter {
            port: Some(80),
            ..Default::default()
        }));
        assert!(f(Filter {
            verdict: Some(LiveVerdict::Blocked),
            ..Default::default()
        }));
        assert!(!f(Filter {
            verdict: Some(LiveVerdict::Forwarded),
            ..Default::default()
        }));
        assert!(
            render(&LiveLine::Lost { lost: 4 }, &Filter::default())
                .unwrap()
                .contains("4 records missed")
        );
    }

    #[test]
    fn paths_scope_the_request() {
        assert_eq!(
            path(None, false, None),
            "/apis/live.flowlens.dev/v1alpha1/flows"
        );
        assert_eq!(
            path(Some("shop"), true, Some(30)),
            "/apis/live.flowlens.dev/v1alpha1/namespaces/shop/flows?watch=true&sinceSeconds=30"
        );
    }
}
