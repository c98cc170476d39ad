//! `flowlens-agent dump`: prints a running agent's current windows, RTT
//! percentiles and block counters, from its `/debug/window` endpoint.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, bail};
use flowlens_api::{
    format,
    histogram::Histogram,
    report::{ObservationWindow, Role, protocol_name},
};

use crate::http::DebugWindow;

/// Fetches `/debug/window` from `addr` (`host:port`).
pub fn fetch(addr: &str) -> anyhow::Result<DebugWindow> {
    let mut s = TcpStream::connect(addr).with_context(|| {
        format!("connecting to the agent at {addr} (is it running? see --http-addr)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /debug/window HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let Some((head, json)) = body.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {addr}");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "{addr} answered: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    serde_json::from_str(json).context("decoding /debug/window")
}

fn endpoint(s: &flowlens_api::report::Series) -> String {
    let d = &s.local;
    if d.other {
        return "(other)".into();
    }
    let mut parts = Vec::new();
    for v in [&d.namespace, &d.workload, &d.pod, &d.node, &d.zone]
        .into_iter()
        .flatten()
    {
        parts.push(v.clone());
    }
    for (k, v) in &d.labels {
        parts.push(format!("{k}={v}"));
    }
    parts.join("/")
}

/// Prints a window as text.
pub(crate) fn print_window(
    w: &ObservationWindow,
    top: usize,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let (mut flows, mut packets, mut bytes, mut payload, mut retrans, mut drops) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut rtt = Histogram::default();
    for s in &w.series {
        flows = flows.saturating_add(s.flows);
        packets = packets.saturating_add(s.tx.packets.saturating_add(s.rx.packets));
        bytes = bytes.saturating_add(s.tx.bytes.saturating_add(s.rx.bytes));
        payload = payload.saturating_add(s.tx.payload_bytes.saturating_add(s.rx.payload_bytes));
        retrans = retrans.saturating_add(s.retransmits);
        drops = drops.saturating_add(s.drops);
        rtt.merge(&s.rtt);
    }
    writeln!(
        out,
        "observation {} ({}s window from {}, {})",
        w.observation,
        w.window_seconds,
        w.start,
        if w.complete { "complete" } else { "partial" }
    )?;
    let q = |p| quantile(&rtt, p);
    writeln!(
        out,
        "  flows {flows}  packets {}  bytes {} (payload {})  retransmits {retrans}  drops {drops}  rtt p50 {} p95 {} p99 {} ({} samples)",
        format::count(packets),
        format::bytes(bytes),
        format::bytes(payload),
        q(0.5),
        q(0.95),
        q(0.99),
        rtt.count()
    )?;
    if let Some(d) = &w.dns {
        let codes: Vec<String> = d
            .responses
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        writeln!(
            out,
            "  dns queries {}  answers {}  unanswered {}  latency p50 {} p99 {}",
            d.queries,
            if codes.is_empty() {
                "-".into()
            } else {
                codes.join(", ")
            },
            d.unanswered,
            quantile(&d.latency, 0.5),
            quantile(&d.latency, 0.99),
        )?;
    }
    if w.series.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "  {:<40} {:<28} {:>6} {:<6} {:>10} {:>9} {:>9} {:>9}",
        "LOCAL", "REMOTE", "PORT", "PROTO", "BYTES", "PACKETS", "RTT-P50", "RTT-P99"
    )?;
    for s in w.series.iter().take(top) {
        let arrow = match s.role {
            Role::Client => "->",
            Role::Server => "<-",
        };
        writeln!(
            out,
            "  {:<40} {:<28} {:>6} {:<6} {:>10} {:>9} {:>9} {:>9}",
            endpoint(s),
            match (&s.remote, &s.remote_name) {
                (Some(r), Some(n)) => format!("{arrow} {n} ({r})"),
                (Some(r), None) => format!("{arrow} {r}"),
                (None, _) => format!("{arrow} (other)"),
            },
            s.port,
            protocol_name(s.protocol),
            format::bytes(s.tx.bytes.saturating_add(s.rx.bytes)),
            s.tx.packets.saturating_add(s.rx.packets),
            quantile(&s.rtt, 0.5),
            quantile(&s.rtt, 0.99),
        )?;
    }
    Ok(())
}

/// A percentile of a histogram of microseconds, or `-` without samples.
fn quantile(h: &Histogram, p: f64) -> String {
    h.quantile(p)
        .map(format::micros)
        .unwrap_or_else(|| "-".into())
}

/// Prints the whole dump as text.
pub fn print(d: &DebugWindow, top: usize, out: &mut impl Write) -> std::io::Result<()> {
    let s = &d.snapshot;
    writeln!(
        out,
        "node {}  revision {}  hooks: flows={} rtt={} connect={} retransmits={} drops={}",
        s.node,
        s.applied_revision.as_deref().unwrap_or("(none)"),
        s.hooks.flows,
        s.hooks.rtt,
        s.hooks.connect,
        s.hooks.retransmits,
        s.hooks.drops
    )?;
    writeln!(
        out,
        "endpoints attached {}{}  flow table {}/{}  rtt samples {}  connects denied {}",
        s.endpoints.attached,
        if s.endpoints.missing.is_empty() {
            String::new()
        } else {
            format!(" (missing: {})", s.endpoints.missing.join(", "))
        },
        s.kernel.flow_entries,
        s.kernel.flow_capacity,
        s.kernel.rtt_samples,
        s.kernel.connect_denied
    )?;
    for p in &s.problems {
        writeln!(out, "problem {}: {}", p.reason, p.message)?;
    }
    writeln!(out, "\n== current windows (live)")?;
    for w in &d.live {
        print_window(w, top, out)?;
    }
    if !s.last_windows.is_empty() {
        writeln!(out, "\n== last completed windows")?;
        for w in s.last_windows.values() {
            print_window(w, top, out)?;
        }
    }
    writeln!(out, "\n== policies (since the agent started, live)")?;
    writeln!(
        out,
        "  {:<40} {:>16} {:>16} {:>16} {:>16}",
        "POLICY", "BLOCKED-PKTS", "BLOCKED-CONNS", "AUDITED-PKTS", "AUDITED-CONNS"
    )?;
    for p in &d.live_policies {
        writeln!(
            out,
            "  {:<40} {:>16} {:>16} {:>16} {:>16}",
            format!("{}/{}", p.namespace, p.name),
            p.blocked.packets,
            p.blocked.connections,
            p.audited.packets,
            p.audited.connections
        )?;
    }
    Ok(())
}
