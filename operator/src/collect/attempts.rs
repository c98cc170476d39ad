//! Blocked and audited attempts, named: what agents report (a local pod, a
//! peer address, a port) turned into `source -> destination:port` with the
//! peer named as the cluster knows it, and merged into a policy's
//! `status.topBlocked` (bounded: the [`MAX_TOP_ATTEMPTS`] with the most
//! attempts, each seen within [`TOP_ATTEMPT_TTL_S`]).

use std::{
    collections::{HashMap, hash_map::Entry},
    net::IpAddr,
};

use flowlens_api::{
    flow_policy::TopAttempt,
    report::{AttemptDirection, AttemptVerdict, NamedAttempt, protocol_name},
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

/// Attempts kept in `status.topBlocked`.
pub(crate) const MAX_TOP_ATTEMPTS: usize = 10;
/// An attempt not seen for this long leaves `status.topBlocked`.
pub(crate) const TOP_ATTEMPT_TTL_S: i64 = 3600;

/// How a peer address is named.
pub(crate) trait PeerNames {
    /// `namespace/pod`, `node/<name>`, `service/namespace/name`, or `None`
    /// for an address the cluster does not know.
    fn name(&self, ip: &IpAddr) -> Option<String>;
}

/// One final window's attempts of a policy, `(node, attempt)`, as status
/// shows them: merged per source, destination, port, protocol and verdict.
pub(crate) fn name_attempts(
    attempts: &[(String, NamedAttempt)],
    names: &impl PeerNames,
) -> Vec<TopAttempt> {
    let mut out: Vec<TopAttempt> = Vec::with_capacity(attempts.len());
    for (node, a) in attempts {
        let peer = match a.peer.parse::<IpAddr>() {
            Ok(ip) => names
                .name(&ip.to_canonical())
                .unwrap_or_else(|| ip.to_canonical().to_string()),
            // Admission refuses such a peer; never trusted as a name.
            Err(_) => continue,
        };
        let (source, destination) = match a.direction {
            AttemptDirection::Egress => (a.pod.clone(), peer),
            AttemptDirection::Ingress => (peer, a.pod.clone()),
        };
        let t = TopAttempt {
            verdict: match a.verdict {
                AttemptVerdict::Blocked => "Blocked".into(),
                AttemptVerdict::Audited => "Audited".into(),
            },
            source,
            destination,
            port: a.port,
            protocol: protocol_name(a.protocol),
            attempts: a.attempts,
            packets: a.packets,
            last_seen: time(a.last_seen),
            node: node.clone(),
        };
        out.push(t);
    }
    sum(out)
}

fn time(unix_s: i64) -> Time {
    Time(Timestamp::from_second(unix_s).unwrap_or(Timestamp::UNIX_EPOCH))
}

type Key<'a> = (&'a str, &'a str, &'a str, u16, &'a str);

fn key(t: &TopAttempt) -> Key<'_> {
    (&t.verdict, &t.source, &t.destination, t.port, &t.protocol)
}

/// The entries summed per key (attempts, packets; the latest `lastSeen`
/// and its node), in the order keys first appear. Hashed: a window brings
/// up to 16 attempts per policy from every node.
fn sum(items: impl IntoIterator<Item = TopAttempt>) -> Vec<TopAttempt> {
    type Owned = (String, String, String, u16, String);
    let owned = |t: &TopAttempt| -> Owned {
        let (v, s, d, p, pr) = key(t);
        (v.to_owned(), s.to_owned(), d.to_owned(), p, pr.to_owned())
    };
    let mut out: Vec<TopAttempt> = Vec::new();
    let mut index: HashMap<Owned, usize> = HashMap::new();
    for t in items {
        match index.entry(owned(&t)) {
            Entry::Occupied(i) => {
                let e = &mut out[*i.get()];
                e.attempts = e.attempts.saturating_add(t.attempts);
                e.packets = e.packets.saturating_add(t.packets);
                if t.last_seen.0 >= e.last_seen.0 {
                    e.last_seen = t.last_seen;
                    e.node = t.node;
                }
            }
            Entry::Vacant(v) => {
                v.insert(out.len());
                out.push(t);
            }
        }
    }
    out
}

/// `status.topBlocked` after adding a window's named attempts: entries not
/// seen since `now_s - TOP_ATTEMPT_TTL_S` go, then the most attempts (then
/// packets, then the most recent) stay.
pub(crate) fn merge_top(
    current: &[TopAttempt],
    new: Vec<TopAttempt>,
    now_s: i64,
) -> Vec<TopAttempt> {
    let mut all = sum(current.iter().cloned().chain(new));
    all.retain(|t| t.last_seen.0.as_second() > now_s - TOP_ATTEMPT_TTL_S);
    all.sort_by(|a, b| {
        (b.attempts, b.packets, b.last_seen.0)
            .cmp(&(a.attempts, a.packets, a.last_seen.0))
            .then_with(|| key(a).cmp(&key(b)))
    });
    all.truncate(MAX_TOP_ATTEMPTS);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Names;
    impl PeerNames for Names {
        fn name(&self, ip: &IpAddr) -> Option<String> {
            (ip.to_string() == "10.0.0.2").then(|| "shop/db-1".to_owned())
        }
    }

    fn attempt(
        peer: &str,
        direction: AttemptDirection,
        attempts: u64,
        last_seen: i64,
    ) -> NamedAttempt {
        NamedAttempt {
            pod: "shop/web-1".into(),
            direction,
            peer: peer.into(),
            port: 5432,
            protocol: 6,
            verdict: AttemptVerdict::Blocked,
            attempts,
            packets: attempts,
            last_seen,
        }
    }

    #[test]
    fn peers_are_named_and_nodes_summed() {
        let a = [
            (
                "n1".to_string(),
                attempt("10.0.0.2", AttemptDirection::Egress, 3, 100),
            ),
            (
                "n2".to_string(),
                attempt("10.0.0.2", AttemptDirection::Egress, 4, 105),
            ),
            (
                "n1".to_string(),
                attempt("::ffff:203.0.113.9", AttemptDirection::Ingress, 1, 101),
            ),
            (
                "n1".to_string(),
                attempt("not an address", AttemptDirection::Egress, 9, 101),
            ),
        ];
        let t = name_attempts(&a, &Names);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(
            (t[0].source.as_str(), t[0].destination.as_str()),
            ("shop/web-1", "shop/db-1")
        );
        assert_eq!((t[0].attempts, t[0].node.as_str()), (7, "n2"));
        assert_eq!(t[0].last_seen.0.as_second(), 105);
        assert_eq!(
            (t[1].source.as_str(), t[1].destination.as_str()),
            ("203.0.113.9", "shop/web-1")
        );
        assert_eq!(t[1].protocol, "TCP");
    }

    #[test]
    fn status_keeps_the_busiest_recent_ones() {
        let now = 10_000;
        let many: Vec<TopAttempt> = (0..15)
            .map(|i| {
                let mut a = attempt(
                    &format!("10.1.0.{i}"),
                    AttemptDirection::Egress,
                    i + 1,
                    now - 10,
                );
                a.port = 1000 + i as u16;
                name_attempts(&[("n".into(), a)], &Names).remove(0)
            })
            .collect();
        let top = merge_top(&[], many, now);
        assert_eq!(top.len(), MAX_TOP_ATTEMPTS);
        assert_eq!(top[0].attempts, 15);
        assert_eq!(top[9].attempts, 6);
        // Again: summed, not repeated.
        let again = name_attempts(
            &[(
                "n".into(),
                attempt("10.1.0.14", AttemptDirection::Egress, 5, now),
            )],
            &Names,
        );
        let mut again = again;
        again[0].port = 1014;
        let top = merge_top(&top, again, now);
        assert_eq!(top[0].attempts, 20);
        assert_eq!(top.len(), MAX_TOP_ATTEMPTS);
        // An hour later, all are gone.
        assert!(merge_top(&top, Vec::new(), now + TOP_ATTEMPT_TTL_S).is_empty());
    }
}
