//! `kubectl flowlens blocked`: who tried to reach whom and was blocked (or
//! audited), by policy, as the policies' `status.topBlocked` holds it.

use flowlens_api::{FlowPolicy, format};
use kube::ResourceExt;

use crate::table::Table;

/// One row per attempt of every policy, busiest first within a policy.
pub fn blocked_table(policies: &[FlowPolicy], now_s: i64) -> String {
    let mut t = Table::new(&[
        "NAMESPACE",
        "POLICY",
        "VERDICT",
        "SOURCE",
        "DESTINATION",
        "PORT",
        "PROTO",
        "ATTEMPTS",
        "LAST SEEN",
        "NODE",
    ]);
    for p in policies {
        let Some(s) = &p.status else { continue };
        for a in &s.top_blocked {
            t.row(vec![
                p.namespace().unwrap_or_default(),
                p.name_any(),
                a.verdict.clone(),
                a.source.clone(),
                a.destination.clone(),
                a.port.to_string(),
                a.protocol.clone(),
                format::count(a.attempts),
                ago(now_s - a.last_seen.0.as_second()),
                a.node.clone(),
            ]);
        }
    }
    if t.is_empty() {
        return "no blocked or audited attempts in the last hour\n".to_owned();
    }
    t.to_string()
}

/// `12s ago`, `3m ago`, `1h ago`.
fn ago(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use flowlens_api::flow_policy::{FlowPolicyStatus, TopAttempt};
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    use super::*;

    #[test]
    fn rows_name_both_sides() {
        let mut p = FlowPolicy::new(
            "deny-db",
            serde_json::from_value(serde_json::json!({
                "podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]
            }))
            .unwrap(),
        );
        p.metadata.namespace = Some("shop".into());
        p.status = Some(FlowPolicyStatus {
            top_blocked: vec![TopAttempt {
                verdict: "Blocked".into(),
                source: "shop/web-1".into(),
                destination: "shop/db-1".into(),
                port: 5432,
                protocol: "TCP".into(),
                attempts: 1234,
                packets: 1234,
                last_seen: Time(Timestamp::from_second(1_000).unwrap()),
                node: "n1".into(),
            }],
            ..Default::default()
        });
        let out = blocked_table(&[p.clone()], 1_130);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NAMESPACE   POLICY    VERDICT"),
            "{out}"
        );
        assert!(
            lines[1].contains("shop/web-1") && lines[1].contains("shop/db-1"),
            "{out}"
        );
        assert!(
            lines[1].contains("5432") && lines[1].contains("2m ago") && lines[1].contains("n1"),
            "{out}"
        );
        p.status = None;
        assert_eq!(
            blocked_table(&[p], 0),
            "no blocked or audited attempts in the last hour\n"
        );
    }
}
