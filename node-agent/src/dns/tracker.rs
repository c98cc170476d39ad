//! What the traced pods' DNS says, pure: queries matched to their answers
//! (latency, response codes) and the names the pods resolved, per pod and
//! address, so that a flow to an external address can carry its name.
//!
//! An answer counts, and teaches names, only when it matches a query the
//! same pod sent to the same server from the same port with the same id
//! and was not answered yet: a forged or repeated answer teaches nothing.
//! Every table is bounded; past a bound the new entry is given up and
//! counted in [`DnsStats`].

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::dns::message::{DnsMessage, ParseError};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Queries awaiting their answer at most.
pub(crate) const MAX_PENDING: usize = 16_384;
/// (pod, address) names remembered at most.
pub(crate) const MAX_NAMES: usize = 65_536;
/// How long a query waits for its answer (then it is unanswered).
pub(crate) const ANSWER_WAIT_MS: i64 = 10_000;
/// A name is kept at least this long after its answer or its last use by a
/// connection, whatever the TTL: connections outlive short TTLs.
pub(crate) const MIN_NAME_MS: i64 = 5 * 60_000;

/// One DNS packet of a traced pod, as the capture read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DnsPacket {
    /// CLOCK_MONOTONIC nanoseconds at the hook.
    pub ts_ns: u64,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    /// Sent by the pod (a query); else received by it (an answer).
    pub from_pod: bool,
    pub message: Result<DnsMessage, ParseError>,
}

/// What one packet meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A query of `local`'s (with its name, when plain).
    Query { qname: Option<Arc<str>> },
    /// The answer to a query of `local`'s.
    Answer { rcode: u16, latency_us: u32 },
    /// Nothing to count: unreadable, unmatched, or not a query or answer.
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct QueryKey {
    local: [u8; 16],
    remote: [u8; 16],
    local_port: u16,
    protocol: u8,
    id: u16,
}

#[derive(Clone, Debug)]
struct Pending {
    ts_ns: u64,
    at_ms: i64,
    qname: Option<Arc<str>>,
}

#[derive(Clone, Debug)]
struct NameEntry {
    name: Arc<str>,
    until_ms: i64,
}

/// Counters of what was given up or refused (cumulative).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DnsStats {
    /// Messages that could not be read (malformed, cut TCP, too short).
    pub unreadable: u64,
    /// Answers matching no waiting query (forged, late or repeated).
    pub unmatched: u64,
    /// Queries not awaited because too many were waiting.
    pub pending_full: u64,
    /// Names not remembered because the table was full.
    pub names_full: u64,
}

#[derive(Clone, Default)]
pub(crate) struct DnsTracker {
    pending: FastMap<QueryKey, Pending>,
    names: FastMap<([u8; 16], [u8; 16]), NameEntry>,
    pub stats: DnsStats,
}

impl DnsTracker {
    /// Takes one packet seen at `now_ms`.
    pub(crate) fn observe(&mut self, p: &DnsPacket, now_ms: i64) -> Seen {
        let m = match &p.message {
            Ok(m) => m,
            Err(_) => {
                self.stats.unreadable = self.stats.unreadable.saturating_add(1);
                return Seen::Nothing;
            }
        };
        let key = QueryKey {
            local: p.local,
            remote: p.remote,
            local_port: p.local_port,
            protocol: p.protocol,
            id: m.id,
        };
        match (p.from_pod, m.response) {
            (true, false) => {
                let qname: Option<Arc<str>> = m.qname.as_deref().map(Arc::from);
                if self.pending.len() < MAX_PENDING || self.pending.contains_key(&key) {
                    self.pending.insert(
                        key,
                        Pending {
                            ts_ns: p.ts_ns,
                            at_ms: now_ms,
                            qname: qname.clone(),
                        },
                    );
                } else {
                    self.stats.pending_full = self.stats.pending_full.saturating_add(1);
                }
                Seen::Query { qname }
            }
            (false, true) => {
                let Some(q) = self.pending.remove(&key) else {
                    self.stats.unmatched = self.stats.unmatched.saturating_add(1);
                    return Seen::Nothing;
                };
                // The answer must be to the question asked.
                if m.qname.is_some() && m.qname.as_deref() != q.qname.as_deref() {
                    self.stats.unmatched = self.stats.unmatched.saturating_add(1);
                    return Seen::Nothing;
                }
                if let Some(name) = &q.qname {
                    for (ip, ttl) in &m.answers {
                        let ttl_ms = i64::from(*ttl).saturating_mul(1000);
                        self.learn(p.local, *ip, name, now_ms + ttl_ms.max(MIN_NAME_MS));
                    }
                }
                let latency_ns = p.ts_ns.saturating_sub(q.ts_ns);
                Seen::Answer {
                    rcode: m.rcode,
                    latency_us: (latency_ns / 1000).min(u64::from(u32::MAX)) as u32,
                }
            }
            _ => Seen::Nothing,
        }
    }

    fn learn(&mut self, local: [u8; 16], ip: IpAddr, name: &Arc<str>, until_ms: i64) {
        let key = (local, crate::tables::prefix::addr_bytes(ip));
        if self.names.len() >= MAX_NAMES && !self.names.contains_key(&key) {
            self.stats.names_full = self.stats.names_full.saturating_add(1);
            return;
        }
        let e = self.names.entry(key).or_insert_with(|| NameEntry {
            name: Arc::clone(name),
            until_ms,
        });
        // The latest answer names the address.
        e.name = Arc::clone(name);
        e.until_ms = e.until_ms.max(until_ms);
    }

    /// The name `local` resolved to `remote`, if any; a use keeps it at
    /// least [`MIN_NAME_MS`] longer.
    pub(crate) fn name_of(
        &mut self,
        local: &[u8; 16],
        remote: &[u8; 16],
        now_ms: i64,
    ) -> Option<Arc<str>> {
        if self.names.is_empty() {
            return None;
        }
        let e = self.names.get_mut(&(*local, *remote))?;
        e.until_ms = e.until_ms.max(now_ms + MIN_NAME_MS);
        Some(Arc::clone(&e.name))
    }

    /// Forgets expired names and gives up on queries waiting longer than
    /// [`ANSWER_WAIT_MS`]; returns the pods whose queries went unanswered
    /// (one entry per query).
    pub(crate) fn expire(&mut self, now_ms: i64) -> Vec<[u8; 16]> {
        self.names.retain(|_, e| e.until_ms > now_ms);
        let mut unanswered = Vec::new();
        self.pending.retain(|k, q| {
            let keep = now_ms - q.at_ms < ANSWER_WAIT_MS;
            if !keep {
                unanswered.push(k.local);
            }
            keep
        });
        unanswered
    }

    /// Names remembered and queries waiting.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.names.len(), self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 5];
    const RESOLVER: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 53];
    const WEB: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7];

    fn msg(id: u16, response: bool, qname: &str, answers: Vec<(IpAddr, u32)>) -> DnsMessage {
        DnsMessage {
            id,
            response,
            rcode: 0,
            qname: Some(qname.into()),
            answers,
            cut: false,
        }
    }

    fn packet(ts_ns: u64, from_pod: bool, port: u16, m: DnsMessage) -> DnsPacket {
        DnsPacket {
            ts_ns,
            local: POD,
            remote: RESOLVER,
            local_port: port,
            remote_port: 53,
            protocol: 17,
            from_pod,
            message: Ok(m),
        }
    }

    #[test]
    fn an_answer_to_a_query_gives_latency_and_names() {
        let mut t = DnsTracker::default();
        let web: IpAddr = "192.0.2.7".parse().unwrap();
        let q = t.observe(
            &packet(1_000_000, true, 4000, msg(7, false, "api.example", vec![])),
            0,
        );
        assert_eq!(
            q,
            Seen::Query {
                qname: Some("api.example".into())
            }
        );
        let a = t.observe(
            &packet(
                21_000_000,
                false,
                4000,
                msg(7, true, "api.example", vec![(web, 30)]),
            ),
            20,
        );
        assert_eq!(
            a,
            Seen::Answer {
                rcode: 0,
                latency_us: 20_000
            }
        );
        assert_eq!(t.name_of(&POD, &WEB, 30).as_deref(), Some("api.example"));
        // Another pod did not resolve it.
        let mut other = POD;
        other[15] = 6;
        assert_eq!(t.name_of(&other, &WEB, 30), None);
        // Kept past the TTL while connections use it, then forgotten.
        assert!(t.expire(MIN_NAME_MS).is_empty());
        assert!(t.name_of(&POD, &WEB, MIN_NAME_MS).is_some());
        t.expire(3 * MIN_NAME_MS);
        assert_eq!(t.name_of(&POD, &WEB, 3 * MIN_NAME_MS), None);
    }

    #[test]
    fn forged_repeated_or_mismatched_answers_teach_nothing() {
        let mut t = DnsTracker::default();
        let web: IpAddr = "192.0.2.7".parse().unwrap();
        // No query: forged.
        let forged = packet(
            5,
            false,
            4000,
            msg(7, true, "bank.example", vec![(web, 30)]),
        );
        assert_eq!(t.observe(&forged, 0), Seen::Nothing);
        // A query from another port, or with another id, does not match.
        t.observe(
            &packet(1, true, 4001, msg(7, false, "api.example", vec![])),
            0,
        );
        assert_eq!(t.observe(&forged, 0), Seen::Nothing);
        // The right port and id but another question.
        t.observe(
            &packet(1, true, 4000, msg(7, false, "api.example", vec![])),
            0,
        );
        assert_eq!(t.observe(&forged, 0), Seen::Nothing);
        assert_eq!(t.name_of(&POD, &WEB, 0), None);
        assert_eq!(t.stats.unmatched, 3);
        // An unreadable message is counted.
        let mut bad = forged.clone();
        bad.message = Err(ParseError::Short);
        assert_eq!(t.observe(&bad, 0), Seen::Nothing);
        assert_eq!(t.stats.unreadable, 1);
    }

    #[test]
    fn queries_without_answer_expire_and_tables_stay_bounded() {
        let mut t = DnsTracker::default();
        for id in 0..(MAX_PENDING as u32 + 10) {
            let port = 1024 + (id / 65536) as u16;
            t.observe(
                &packet(1, true, port, msg(id as u16, false, "x.example", vec![])),
                0,
            );
        }
        assert_eq!(t.sizes().1, MAX_PENDING);
        assert_eq!(t.stats.pending_full, 10);
        assert!(t.expire(ANSWER_WAIT_MS - 1).is_empty());
        assert_eq!(t.expire(ANSWER_WAIT_MS).len(), MAX_PENDING);
        assert_eq!(t.sizes().1, 0);
    }
}
