//! `kubectl flowlens top`: an observation's busiest flows of its last
//! window, as its status holds them.

use flowlens_api::{
    NetworkObservation, format,
    network_observation::{FlowEndpoint, TopFlow},
};
use kube::ResourceExt;

use crate::table::Table;

/// A line on the window the flows are from, then the flows by bytes.
pub fn top_flows(obs: &NetworkObservation) -> String {
    let name = obs.name_any();
    let Some(s) = obs.status.as_ref() else {
        return format!("{name}: no status yet: is the Flowlens operator running?\n");
    };
    let Some(w) = s.last_window.as_ref() else {
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == flowlens_api::conditions::READY)
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_default();
        return format!("{name}: no window completed yet ({ready})\n");
    };
    let seconds = (w.end.0.as_second() - w.start.0.as_second()).max(1);
    let mut out = format!(
        "{name}: window {} to {} ({seconds} s): {} in {} flows, {}, RTT p50 {} p99 {}\n",
        w.start.0,
        w.end.0,
        format::bytes(w.bytes),
        format::count(w.flows),
        format::rate(w.bytes_per_second as f64),
        s.summary.as_ref().map_or("-", |m| m.rtt_p50.as_str()),
        s.summary.as_ref().map_or("-", |m| m.rtt_p99.as_str()),
    );
    let mut t = Table::new(&[
        "SOURCE",
        "DESTINATION",
        "PORT",
        "PROTO",
        "BYTES",
        "RATE",
        "PACKETS",
        "FLOWS",
        "RTT P50",
        "RTT P99",
    ]);
    for f in &s.top_flows {
        t.row(flow_row(f, seconds));
    }
    if t.is_empty() {
        out.push_str("no flows in the window\n");
    } else {
        out.push_str(&t.to_string());
    }
    if let Some(d) = &s.dns {
        out.push_str(&dns_line(d));
    }
    out
}

/// The window's DNS in one line: queries, answers by code, latency, the
/// names asked most.
fn dns_line(d: &flowlens_api::dns::DnsStatus) -> String {
    let codes: Vec<String> = d
        .responses
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    let latency = d.latency.as_ref().map_or_else(String::new, |l| {
        format!(
            ", latency p50 {} p99 {}",
            format::micros(l.p50_micros),
            format::micros(l.p99_micros)
        )
    });
    let names: Vec<String> = d
        .top_names
        .iter()
        .take(3)
        .map(|n| format!("{} ({})", n.name, n.queries))
        .collect();
    format!(
        "DNS: {} queries ({}; {} unanswered){latency}; most asked: {}\n",
        format::count(d.queries),
        if codes.is_empty() {
            "no answers".into()
        } else {
            codes.join(", ")
        },
        d.unanswered,
        if names.is_empty() {
            "-".into()
        } else {
            names.join(", ")
        },
    )
}

fn flow_row(f: &TopFlow, seconds: i64) -> Vec<String> {
    let destination = match &f.service {
        Some(svc) => format!("{} (via {svc})", endpoint(&f.destination)),
        None => endpoint(&f.destination),
    };
    let rtt = |us: Option<u64>| us.map(format::micros).unwrap_or_else(|| "-".into());
    vec![
        endpoint(&f.source),
        destination,
        f.port.to_string(),
        f.protocol.clone(),
        format::bytes(f.bytes),
        format::rate(f.bytes as f64 / seconds as f64),
        format::count(f.packets),
        format::count(f.flows),
        rtt(f.rtt_p50_micros),
        rtt(f.rtt_p99_micros),
    ]
}

/// The most specific name the observation's groupBy kept.
fn endpoint(e: &FlowEndpoint) -> String {
    if e.other {
        return "(other)".into();
    }
    let ns = e.namespace.as_deref();
    let named = |n: &str| ns.map_or_else(|| n.to_owned(), |ns| format!("{ns}/{n}"));
    if let Some(pod) = &e.pod {
        return named(pod);
    }
    if let Some(w) = &e.workload {
        return named(w);
    }
    if e.host_network {
        return format!("node {}", e.node.as_deref().unwrap_or("?"));
    }
    if let Some(n) = &e.name {
        return match &e.address {
            Some(a) => format!("{n} ({a}, external)"),
            None => format!("{n} (external)"),
        };
    }
    if let Some(a) = &e.address {
        return if e.external {
            format!("{a} (external)")
        } else {
            a.clone()
        };
    }
    let mut parts: Vec<String> = ns.into_iter().map(str::to_owned).collect();
    parts.extend(e.labels.iter().map(|(k, v)| format!("{k}={v}")));
    parts.extend(e.node.iter().map(|n| format!("node {n}")));
    parts.extend(e.zone.iter().map(|z| format!("zone {z}")));
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn observation(status: serde_json::Value) -> NetworkObservation {
        serde_json::from_value(json!({
            "apiVersion": "flowlens.dev/v1alpha1",
            "kind": "NetworkObservation",
            "metadata": {"name": "shop"},
            "spec": {"namespaces": ["shop"]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn flows_are_named_by_what_the_grouping_kept() {
        let obs = observation(json!({
            "lastWindow": {"start": "2026-12-04T10:00:00Z", "end": "2026-12-04T10:01:00Z",
                           "flows": 3, "packets": 100, "bytes": 6000000,
                           "bytesPerSecond": 100000, "packetsPerSecond": 2},
            "summary": {"nodes": "2/2", "throughput": "100 kB/s", "rttP50": "1.2ms", "rttP99": "3.4ms"},
            "topFlows": [
                {"source": {"namespace": "shop", "pod": "web-1"},
                 "destination": {"namespace": "shop", "workload": "db"},
                 "service": "shop/db", "port": 5432, "protocol": "TCP",
                 "bytes": 6000000, "packets": 90, "flows": 2, "rttP50Micros": 1200},
                {"source": {"namespace": "shop", "labels": {"app": "web"}},
                 "destination": {"address": "203.0.113.9", "external": true},
                 "port": 443, "protocol": "TCP", "bytes": 600, "packets": 10, "flows": 1},
                {"source": {"namespace": "shop", "labels": {"app": "web"}},
                 "destination": {"address": "192.0.2.7", "name": "api.payments.example",
                                 "external": true},
                 "port": 443, "protocol": "TCP", "bytes": 500, "packets": 8, "flows": 1},
                {"source": {"namespace": "shop", "labels": {"app": "web"}},
                 "destination": {"name": "cdn.example", "external": true},
                 "port": 443, "protocol": "TCP", "bytes": 400, "packets": 6, "flows": 2},
            ],
        }));
        let out = top_flows(&obs);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0]
                .starts_with("shop: window 2026-12-04T10:00:00Z to 2026-12-04T10:01:00Z (60 s)"),
            "{out}"
        );
        assert!(lines[0].contains("RTT p50 1.2ms p99 3.4ms"), "{out}");
        assert!(lines[2].starts_with("shop/web-1 "), "{out}");
        assert!(lines[2].contains("shop/db (via shop/db)"), "{out}");
        assert!(lines[2].contains(&format::rate(100_000.0)), "{out}");
        assert!(lines[3].starts_with("shop app=web "), "{out}");
        assert!(lines[3].contains("203.0.113.9 (external)"), "{out}");
        assert!(
            lines[4].contains("api.payments.example (192.0.2.7, external)"),
            "{out}"
        );
        assert!(lines[5].contains("cdn.example (external)"), "{out}");
        assert!(!out.contains("DNS:"), "no DNS in this window: {out}");
        let mut with_dns = obs.clone();
        with_dns.status.as_mut().unwrap().dns = Some(
            serde_json::from_value(json!({
                "queries": 6, "responses": {"NOERROR": 3, "NXDOMAIN": 2, "REFUSED": 1},
                "latency": {"samples": 6, "p50Micros": 20224, "p95Micros": 20736, "p99Micros": 20736},
                "topNames": [{"name": "www.payments.example", "queries": 3}],
            }))
            .unwrap(),
        );
        let out = top_flows(&with_dns);
        let last = out.lines().last().unwrap();
        assert!(
            last.starts_with(
                "DNS: 6 queries (NOERROR 3, NXDOMAIN 2, REFUSED 1; 0 unanswered), latency p50 "
            ),
            "{out}"
        );
        assert!(
            last.ends_with("most asked: www.payments.example (3)"),
            "{out}"
        );
    }

    #[test]
    fn no_window_yet_says_why() {
        let obs = observation(json!({"conditions": [{"type": "Ready", "status": "False",
            "reason": "Deploying", "message": "0 of 1 node(s) run this observation",
            "lastTransitionTime": "2026-12-04T00:00:00Z"}]}));
        assert_eq!(
            top_flows(&obs),
            "shop: no window completed yet (Deploying: 0 of 1 node(s) run this observation)\n"
        );
    }
}
