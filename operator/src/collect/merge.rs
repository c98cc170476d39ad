//! Sums one final window's parts into what status shows.
//!
//! Counting rule (the agents apply it for pairs on one node, this applies it
//! across nodes): a packet counts at its sender's node when the sender is
//! traced by the observation, else at its receiver's. So when the remote
//! side of a series is traced, what the series *received* is dropped here
//! (the remote's agent reports it as sent), and a connection between two
//! traced pods counts once, at its client. Nothing is counted twice.
//!
//! Remote addresses are named as a pod, else as a node (a node address or
//! a host-network pod's: `node` and `hostNetwork`), else as external.
//!
//! A flow through a Service carries it (`service`) and is never merged with
//! direct traffic. Only the client's agent knows the Service: what the
//! server's side reports of such a connection (its replies, when the
//! client is traced too) is attached to the client's flow when the client
//! reported exactly one way of reaching that server and port.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use flowlens_api::{
    GroupBy,
    dns::{DnsStatus, DnsWindow},
    histogram::Histogram,
    network_observation::{FlowEndpoint, LatencyPercentiles, PodDimensions, TopFlow},
    report::{ObservationWindow, Role, Series, Traffic, protocol_name},
};

use super::Directory;
use crate::model::{NodeInfo, PodInfo};

/// One observation's window, summed over every node that reported it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct WindowResult {
    /// Unix seconds.
    pub start: i64,
    pub end: i64,
    pub nodes_reporting: u32,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub payload_bytes: u64,
    pub retransmits: u64,
    pub drops: u64,
    pub cross_zone_bytes: u64,
    pub latency: Option<LatencyPercentiles>,
    /// DNS of the traced pods, summed over the nodes.
    pub dns: Option<DnsWindow>,
    pub top_flows: Vec<TopFlow>,
    pub series: u64,
    pub max_series: u64,
    pub folded_series: u64,
}

/// The observation's aggregation parameters.
#[derive(Clone, Debug)]
pub(crate) struct MergeParams<'a> {
    pub group_by: &'a [GroupBy],
    pub keep_labels: &'a [String],
    pub top_n: usize,
    pub max_series: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowId {
    source: FlowEndpoint,
    destination: FlowEndpoint,
    port: u16,
    protocol: u8,
    /// The Service the client connected through.
    service: Option<String>,
}

impl FlowId {
    fn other() -> Self {
        FlowId {
            source: FlowEndpoint::other(),
            destination: FlowEndpoint::other(),
            port: 0,
            protocol: 0,
            service: None,
        }
    }

    /// The flow without its Service.
    fn direct(&self) -> (&FlowEndpoint, &FlowEndpoint, u16, u8) {
        (&self.source, &self.destination, self.port, self.protocol)
    }
}

#[derive(Clone, Debug, Default)]
struct FlowAcc {
    traffic: Traffic,
    flows: u64,
    rtt: Histogram,
    /// Some series speaks for the connections (not only the server's side
    /// of connections from a traced client, which cannot know the Service).
    speaks: bool,
}

impl FlowAcc {
    fn add(&mut self, o: &FlowAcc) {
        self.traffic.add(&o.traffic);
        self.flows = self.flows.saturating_add(o.flows);
        self.rtt.merge(&o.rtt);
        self.speaks |= o.speaks;
    }
}

/// A remote pod projected on the observation's dimensions (the same
/// projection the agents apply to local pods).
fn pod_endpoint(p: &PodInfo, zone: Option<&str>, params: &MergeParams) -> FlowEndpoint {
    FlowEndpoint::project(
        params.group_by,
        params.keep_labels,
        &PodDimensions {
            namespace: &p.namespace,
            workload: &p.workload,
            pod: &p.name,
            node: p.node.as_deref(),
            zone,
            labels: &p.labels,
        },
    )
}

/// A node, or a host-network pod on it, projected on the observation's
/// dimensions: always named (it is the identity of such a peer), its zone
/// when grouping by zone.
fn node_endpoint(n: &NodeInfo, params: &MergeParams) -> FlowEndpoint {
    FlowEndpoint {
        node: Some(n.name.clone()),
        zone: params
            .group_by
            .contains(&GroupBy::Zone)
            .then(|| n.zone.clone())
            .flatten(),
        host_network: true,
        ..Default::default()
    }
}

fn percentiles(h: &Histogram) -> LatencyPercentiles {
    LatencyPercentiles {
        samples: h.count(),
        p50_micros: h.quantile(0.50).unwrap_or(0),
        p95_micros: h.quantile(0.95).unwrap_or(0),
        p99_micros: h.quantile(0.99).unwrap_or(0),
    }
}

/// A window's DNS as status shows it.
pub(crate) fn dns_status(d: &DnsWindow) -> DnsStatus {
    DnsStatus {
        queries: d.queries,
        responses: d.responses.clone(),
        unanswered: d.unanswered,
        latency: (!d.latency.is_empty()).then(|| percentiles(&d.latency)),
        top_names: d.top_names.clone(),
    }
}

/// One flow of a final window within the series budget (or the `other`
/// bucket): what the observation's metrics export.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct MergedFlow {
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    pub port: u16,
    /// The IP protocol number (0 for the `other` bucket).
    pub protocol: u8,
    pub service: Option<String>,
    pub traffic: Traffic,
    /// Connections.
    pub flows: u64,
    pub rtt: Histogram,
}

/// Merges the parts (`(node, part)`) of the window `[start, end)`.
#[cfg(any(test, fuzzing))]
pub(crate) fn merge(
    start: i64,
    end: i64,
    parts: &[(String, ObservationWindow)],
    params: &MergeParams,
    dir: &impl Directory,
) -> WindowResult {
    merge_window(start, end, parts, params, dir).0
}

/// [`merge`], and every flow kept by the series budget (with `other`), by
/// bytes: their traffic sums to the window's.
pub(crate) fn merge_window(
    start: i64,
    end: i64,
    parts: &[(String, ObservationWindow)],
    params: &MergeParams,
    dir: &impl Directory,
) -> (WindowResult, Vec<MergedFlow>) {
    let mut r = WindowResult {
        start,
        end,
        max_series: params.max_series as u64,
        ..Default::default()
    };
    let (mut flows, agent_folded) = sum_parts(parts, params, dir, &mut r);
    attach_replies(&mut flows);
    let budget = apply_budget(flows, params.max_series);
    r.series = budget.series;
    r.folded_series = budget.folded.saturating_add(agent_folded);
    r.top_flows = top_flows(&budget.flows, params.top_n);
    let flows = budget
        .flows
        .into_iter()
        .map(|(id, acc)| MergedFlow {
            source: id.source,
            destination: id.destination,
            port: id.port,
            protocol: id.protocol,
            service: id.service,
            traffic: acc.traffic,
            flows: acc.flows,
            rtt: acc.rtt,
        })
        .collect();
    (r, flows)
}

/// Sums every series of the parts into `r`'s totals (applying the counting
/// rule) and into flows keyed by their dimensions. Returns the flows and
/// the series the agents already folded.
fn sum_parts(
    parts: &[(String, ObservationWindow)],
    params: &MergeParams,
    dir: &impl Directory,
    r: &mut WindowResult,
) -> (HashMap<FlowId, FlowAcc>, u64) {
    let mut flows: HashMap<FlowId, FlowAcc> = HashMap::new();
    let mut latency = Histogram::default();
    let mut dns = DnsWindow::default();
    let mut nodes = BTreeSet::new();
    let mut agent_folded: u64 = 0;
    for (node, part) in parts {
        nodes.insert(node.as_str());
        agent_folded = agent_folded.saturating_add(part.folded_series);
        if let Some(d) = &part.dns {
            dns.add(d);
        }
        let local_zone = dir.zone(node);
        for s in &part.series {
            let remote_ip: Option<IpAddr> = s.remote.as_deref().and_then(|a| a.parse().ok());
            let remote_pod = remote_ip.and_then(|ip| dir.pod(&ip));
            let remote_node = match remote_pod {
                Some(_) => None,
                None => remote_ip.and_then(|ip| dir.node(&ip)),
            };
            let remote_traced = remote_ip.is_some_and(|ip| dir.traced(&ip));
            let rx = if remote_traced {
                Traffic::default()
            } else {
                s.rx
            };
            // Between two traced pods the client's side speaks for the
            // connection: its flows count once, and its srtt is the flow's
            // RTT. The server's srtt also holds the time the client took to
            // send its next request (a request/response connection ACKs
            // replies with the next request), so it is used only when the
            // client is not traced.
            let client_side_counts = remote_traced && s.role == Role::Server;
            let connections = if client_side_counts { 0 } else { s.flows };
            let rtt = if client_side_counts {
                &Histogram::default()
            } else {
                &s.rtt
            };
            let mut traffic = s.tx;
            traffic.add(&rx);

            r.flows = r.flows.saturating_add(connections);
            r.packets = r.packets.saturating_add(traffic.packets);
            r.bytes = r.bytes.saturating_add(traffic.bytes);
            r.payload_bytes = r.payload_bytes.saturating_add(traffic.payload_bytes);
            r.retransmits = r.retransmits.saturating_add(s.retransmits);
            r.drops = r.drops.saturating_add(s.drops);
            latency.merge(rtt);
            let remote_zone = match remote_node {
                Some(n) => n.zone.as_deref(),
                None => remote_pod
                    .and_then(|p| p.node.as_deref())
                    .and_then(|n| dir.zone(n)),
            };
            if let (Some(a), Some(b)) = (local_zone, remote_zone)
                && a != b
            {
                r.cross_zone_bytes = r.cross_zone_bytes.saturating_add(traffic.bytes);
            }

            let remote = Remote {
                ip: remote_ip,
                pod: remote_pod,
                node: remote_node,
                zone: remote_zone,
            };
            let id = flow_id(s, &remote, params);
            let acc = flows.entry(id).or_default();
            acc.traffic.add(&traffic);
            acc.flows = acc.flows.saturating_add(connections);
            acc.rtt.merge(rtt);
            acc.speaks |= !client_side_counts;
        }
    }
    r.nodes_reporting = nodes.len() as u32;
    r.latency = (!latency.is_empty()).then(|| percentiles(&latency));
    r.dns = (!dns.is_empty()).then_some(dns);
    (flows, agent_folded)
}

/// What is known of a series' remote address.
struct Remote<'a> {
    ip: Option<IpAddr>,
    pod: Option<&'a PodInfo>,
    /// When it is no pod's: the node it belongs to.
    node: Option<&'a NodeInfo>,
    zone: Option<&'a str>,
}

/// The flow a series belongs to: client and server dimensions, port,
/// protocol and Service (the `other` flow for the agents' overflow bucket).
fn flow_id(s: &Series, remote: &Remote, params: &MergeParams) -> FlowId {
    if s.local.other || s.remote.is_none() {
        return FlowId::other();
    }
    let local = s.local.clone();
    let remote = match (remote.pod, remote.node) {
        (Some(p), _) => pod_endpoint(p, remote.zone, params),
        (None, Some(n)) => node_endpoint(n, params),
        (None, None) => {
            // Grouped by name, a named peer is its name alone: one row
            // for every address it resolved to.
            let by_name = s.remote_name.is_some() && params.group_by.contains(&GroupBy::DnsName);
            FlowEndpoint {
                address: if by_name {
                    None
                } else {
                    remote
                        .ip
                        .map(|i| i.to_string())
                        .or_else(|| s.remote.clone())
                },
                name: s.remote_name.clone(),
                external: true,
                ..Default::default()
            }
        }
    };
    let (source, destination) = match s.role {
        Role::Client => (local, remote),
        Role::Server => (remote, local),
    };
    FlowId {
        source,
        destination,
        port: s.port,
        protocol: s.protocol,
        service: s.service.clone(),
    }
}

/// Attaches what only the server's side reported (its half of connections
/// from a traced client) to the client's flow through a Service, when the
/// client reached that server and port one way only: through that one
/// Service. Otherwise (direct connections too, or several Services) it
/// stays a flow of its own without a Service.
fn attach_replies(flows: &mut HashMap<FlowId, FlowAcc>) {
    let mut ways: HashMap<(&FlowEndpoint, &FlowEndpoint, u16, u8), Vec<&FlowId>> = HashMap::new();
    for (id, acc) in flows.iter() {
        if acc.speaks {
            ways.entry(id.direct()).or_default().push(id);
        }
    }
    let moves: Vec<(FlowId, FlowId)> = flows
        .iter()
        .filter(|(id, acc)| !acc.speaks && id.service.is_none())
        .filter_map(|(id, _)| match ways.get(&id.direct())?.as_slice() {
            [only] if only.service.is_some() => Some((id.clone(), (*only).clone())),
            _ => None,
        })
        .collect();
    for (from, to) in moves {
        if let Some(acc) = flows.remove(&from) {
            flows.entry(to).or_default().add(&acc);
        }
    }
}

/// The cardinality budget: the biggest `max_series` flows stay, the rest
/// fold into `other`, which is ranked by its bytes among them.
fn apply_budget(flows: HashMap<FlowId, FlowAcc>, max_series: usize) -> Budgeted {
    let mut ranked: Vec<(FlowId, FlowAcc)> = flows.into_iter().collect();
    ranked.sort_by(|(ka, a), (kb, b)| {
        b.traffic
            .bytes
            .cmp(&a.traffic.bytes)
            .then_with(|| ka.cmp(kb))
    });
    let mut other: Option<FlowAcc> = None;
    let mut kept: Vec<(FlowId, FlowAcc)> = Vec::with_capacity(ranked.len().min(max_series + 1));
    let mut folded = 0u64;
    for (id, acc) in ranked {
        if id == FlowId::other() {
            other.get_or_insert_with(Default::default).add(&acc);
        } else if kept.len() < max_series {
            kept.push((id, acc));
        } else {
            folded += 1;
            other.get_or_insert_with(Default::default).add(&acc);
        }
    }
    let series = kept.len() as u64;
    if let Some(o) = other {
        let pos = kept
            .iter()
            .position(|(_, a)| a.traffic.bytes < o.traffic.bytes)
            .unwrap_or(kept.len());
        kept.insert(pos, (FlowId::other(), o));
    }
    Budgeted {
        series,
        folded,
        flows: kept,
    }
}

/// Flows within the budget.
struct Budgeted {
    /// Flows kept (without `other`).
    series: u64,
    /// Flows folded into `other`.
    folded: u64,
    /// The kept flows and `other`, by bytes.
    flows: Vec<(FlowId, FlowAcc)>,
}

/// The first `top_n` flows, as status shows them.
fn top_flows(kept: &[(FlowId, FlowAcc)], top_n: usize) -> Vec<TopFlow> {
    kept.iter()
        .take(top_n)
        .map(|(id, acc)| {
            let rtt = (!acc.rtt.is_empty()).then(|| percentiles(&acc.rtt));
            TopFlow {
                source: id.source.clone(),
                destination: id.destination.clone(),
                port: id.port,
                service: id.service.clone(),
                protocol: if id.protocol == 0 {
                    "-".into()
                } else {
                    protocol_name(id.protocol)
                },
                bytes: acc.traffic.bytes,
                packets: acc.traffic.packets,
                flows: acc.flows,
                rtt_p50_micros: rtt.as_ref().map(|l| l.p50_micros),
                rtt_p99_micros: rtt.as_ref().map(|l| l.p99_micros),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
