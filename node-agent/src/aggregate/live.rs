//! Live records (see `flowlens_api::live`): one drain's connections and
//! policy matches as `kubectl flowlens observe` shows them. Pure: called
//! after [`Aggregator::ingest`] with the same drain, only while someone
//! observes.

use std::collections::HashMap;

use flowlens_agent_common::{DIRECTION_EGRESS, FLOW_FLAG_SYN};
use flowlens_api::{
    live::{LiveDirection, LiveFlow, LiveVerdict},
    report::{AttemptVerdict, Role},
};

use super::{Aggregator, Drained, attempt_of, for_each_connection, ip_from_bytes, role};
use crate::tables::prefix::addr_bytes;

impl Aggregator {
    /// The drain `d`'s records at `now_ms`: one per connection of a local
    /// pod (a connection between two local pods once, at its client), one
    /// per blocked or audited (pod, peer, port, rule).
    pub(crate) fn live_records(&self, d: &Drained, now_ms: i64) -> Vec<LiveFlow> {
        let mut pods: HashMap<[u8; 16], (&str, &str)> = HashMap::new();
        for tables in self.generation_tables.iter().flatten() {
            for ep in &tables.endpoint_refs {
                let Some((namespace, pod)) = ep.key.split_once('/') else {
                    continue;
                };
                for ip in &ep.ips {
                    pods.insert(addr_bytes(*ip), (namespace, pod));
                }
            }
        }
        let mut out = Vec::new();
        for_each_connection(d, |id, facts| {
            let Some((namespace, pod)) = pods.get(&id.local) else {
                return;
            };
            let role = self.role_of(&id, facts);
            if role == Role::Server && pods.contains_key(&id.remote) {
                return;
            }
            let opened = match role {
                Role::Client => facts.tx_flags & FLOW_FLAG_SYN != 0,
                Role::Server => facts.rx_flags & FLOW_FLAG_SYN != 0,
            };
            let service = self.service_of(role, facts);
            out.push(LiveFlow {
                time: now_ms,
                node: String::new(),
                namespace: (*namespace).to_owned(),
                pod: (*pod).to_owned(),
                workload: None,
                direction: match role {
                    Role::Client => LiveDirection::Egress,
                    Role::Server => LiveDirection::Ingress,
                },
                peer: ip_from_bytes(&id.remote).to_string(),
                peer_name: None,
                port: role::server_port(role, id.local_port, id.remote_port),
                protocol: id.protocol,
                service,
                verdict: LiveVerdict::Forwarded,
                policy: None,
                connections: u64::from(opened),
                packets: facts.tx.packets.saturating_add(facts.rx.packets),
                bytes: facts.tx.bytes.saturating_add(facts.rx.bytes),
            });
        });
        for (k, a) in &d.attempts {
            let Some(of) = attempt_of(&self.generation_tables, k) else {
                continue;
            };
            let Some((namespace, pod)) = of.pod.split_once('/') else {
                continue;
            };
            let egress = of.direction == DIRECTION_EGRESS;
            let ago_ms = (d.read_at_ns.saturating_sub(a.last_ns) / 1_000_000).min(60_000) as i64;
            out.push(LiveFlow {
                time: now_ms - ago_ms,
                node: String::new(),
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                workload: None,
                direction: if egress {
                    LiveDirection::Egress
                } else {
                    LiveDirection::Ingress
                },
                peer: ip_from_bytes(&k.peer).to_string(),
                peer_name: None,
                port: of.port,
                protocol: k.protocol,
                service: None,
                verdict: match of.verdict {
                    AttemptVerdict::Blocked => LiveVerdict::Blocked,
                    AttemptVerdict::Audited => LiveVerdict::Audited,
                },
                policy: Some(format!("{}/{}", of.rule.namespace, of.rule.policy)),
                connections: a.attempts,
                packets: a.packets,
                bytes: 0,
            });
        }
        out
    }
}
