//! Address and port prefixes, and the longest-prefix-match entries that make
//! rule matching exact in the kernel.
//!
//! The kernel keeps one LPM trie of peers and one of ports. A lookup returns
//! the value of the *longest* inserted prefix containing the key, so each
//! inserted prefix carries the bitmask of every rule slot whose set contains
//! that prefix, computed over all its ancestors (which is what makes
//! overlapping CIDRs of different rules, and `except`, come out right).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use flowlens_agent_common::NO_CLASS;
use ipnet::IpNet;

/// A prefix of the 128-bit address space; IPv4 is IPv4-mapped
/// (`a.b.c.d/n` is `::ffff:a.b.c.d/(96+n)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct AddrPrefix {
    pub addr: u128,
    pub len: u8,
}

const V4_MAPPED: u128 = 0xffff_u128 << 32;

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl AddrPrefix {
    pub(crate) fn new(addr: u128, len: u8) -> Self {
        let len = len.min(128);
        AddrPrefix {
            addr: addr & mask128(len),
            len,
        }
    }

    /// The prefix of a CIDR.
    pub(crate) fn from_net(net: &IpNet) -> Self {
        match net {
            IpNet::V4(n) => AddrPrefix::new(
                V4_MAPPED | u128::from(u32::from(n.network())),
                96 + n.prefix_len(),
            ),
            IpNet::V6(n) => AddrPrefix::new(u128::from(n.network()), n.prefix_len()),
        }
    }

    /// The full-length prefix of one address.
    #[cfg(test)]
    fn host(ip: IpAddr) -> Self {
        AddrPrefix::new(addr_u128(ip), 128)
    }

    /// True when every address of `other` is in `self`.
    pub(crate) fn contains(&self, other: &AddrPrefix) -> bool {
        other.len >= self.len && other.addr & mask128(self.len) == self.addr
    }

    pub(crate) fn truncate(&self, len: u8) -> AddrPrefix {
        AddrPrefix::new(self.addr, len.min(self.len))
    }

    pub(crate) fn bytes(&self) -> [u8; 16] {
        self.addr.to_be_bytes()
    }
}

/// An address as 128 bits (IPv4-mapped for IPv4).
pub(crate) fn addr_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => V4_MAPPED | u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// An address in the kernel's 16-byte form.
pub(crate) fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    addr_u128(ip).to_be_bytes()
}

/// A CIDR minus some sub-CIDRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AddrEntry {
    pub cidr: AddrPrefix,
    pub except: Vec<AddrPrefix>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tag {
    Include,
    Exclude,
}

/// The peer classes of some address sets, as LPM entries.
///
/// A class is one combination of sets: `members[c - 1]` lists the indices
/// (into the `sets` given) of the sets in class `c`. For every address `a`,
/// the class of the longest entry containing `a` is the one whose members
/// are exactly the sets containing `a`; addresses outside every entry, and
/// entries of class [`NO_CLASS`] (holes carved by `except`), are in no set.
/// Classes are numbered in the order of the sorted entries, so the same
/// sets always give the same numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerClasses {
    pub entries: Vec<(AddrPrefix, u32)>,
    pub members: Vec<Vec<u32>>,
}

impl PeerClasses {
    /// The classes that contain set `set`, for each set `0..sets`.
    pub(crate) fn classes_of_sets(&self, sets: usize) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); sets];
        for (i, m) in self.members.iter().enumerate() {
            for &s in m {
                if let Some(v) = out.get_mut(s as usize) {
                    v.push(i as u32 + 1);
                }
            }
        }
        out
    }
}

/// See [`PeerClasses`].
pub(crate) fn peer_classes(sets: &[&[AddrEntry]]) -> PeerClasses {
    // prefix -> (entry id, set, tag)
    let mut tags: HashMap<AddrPrefix, Vec<(usize, u32, Tag)>> = HashMap::new();
    let mut entry_id = 0usize;
    for (set, entries) in sets.iter().enumerate() {
        for e in entries.iter() {
            tags.entry(e.cidr)
                .or_default()
                .push((entry_id, set as u32, Tag::Include));
            for x in &e.except {
                if e.cidr.contains(x) {
                    tags.entry(*x)
                        .or_default()
                        .push((entry_id, set as u32, Tag::Exclude));
                }
            }
            entry_id += 1;
        }
    }
    let lengths: BTreeSet<u8> = tags.keys().map(|p| p.len).collect();
    let mut prefixes: Vec<AddrPrefix> = tags.keys().copied().collect();
    prefixes.sort();
    let mut out = PeerClasses::default();
    let mut class_of: HashMap<Vec<u32>, u32> = HashMap::new();
    out.entries.reserve(prefixes.len());
    for p in prefixes {
        // entry id -> (set, included, excluded) over ancestors-or-self of p.
        let mut state: BTreeMap<usize, (u32, bool, bool)> = BTreeMap::new();
        for &l in lengths.range(..=p.len) {
            if let Some(ts) = tags.get(&p.truncate(l)) {
                for &(id, set, tag) in ts {
                    let s = state.entry(id).or_insert((set, false, false));
                    match tag {
                        Tag::Include => s.1 = true,
                        Tag::Exclude => s.2 = true,
                    }
                }
            }
        }
        let members: BTreeSet<u32> = state
            .values()
            .filter(|(_, inc, exc)| *inc && !*exc)
            .map(|(set, _, _)| *set)
            .collect();
        let class = if members.is_empty() {
            NO_CLASS
        } else {
            let members: Vec<u32> = members.into_iter().collect();
            let next = out.members.len() as u32 + 1;
            *class_of.entry(members).or_insert_with_key(|m| {
                out.members.push(m.clone());
                next
            })
        };
        out.entries.push((p, class));
    }
    out
}

/// A prefix of one protocol's 16-bit port space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PortPrefix {
    pub protocol: u8,
    pub port: u16,
    /// 0..=16 bits.
    pub len: u8,
}

impl PortPrefix {
    fn contains(&self, o: &PortPrefix) -> bool {
        self.protocol == o.protocol && o.len >= self.len && mask16(self.len) & o.port == self.port
    }
}

fn mask16(len: u8) -> u16 {
    if len == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(len))
    }
}

/// The minimal list of prefixes covering exactly `first..=last`.
pub(crate) fn range_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // Largest aligned block starting at lo that fits.
        let mut size_log2 = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1u32 << size_log2) - 1 > hi {
            size_log2 -= 1;
        }
        out.push((lo as u16, (16 - size_log2) as u8));
        lo += 1u32 << size_log2;
    }
    out
}

/// An inclusive port range of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortSpan {
    pub protocol: u8,
    pub first: u16,
    pub last: u16,
}

/// LPM entries of the port table for slots `(slot, spans)`, with the same
/// exactness as [`peer_masks`].
pub(crate) fn port_masks(slots: &[(u8, &[PortSpan])]) -> Vec<(PortPrefix, u64)> {
    let mut by_prefix: BTreeMap<PortPrefix, u64> = BTreeMap::new();
    for (slot, spans) in slots {
        for s in spans.iter() {
            for (port, len) in range_prefixes(s.first.min(s.last), s.last.max(s.first)) {
                *by_prefix
                    .entry(PortPrefix {
                        protocol: s.protocol,
                        port,
                        len,
                    })
                    .or_default() |= 1u64 << slot;
            }
        }
    }
    let prefixes: Vec<PortPrefix> = by_prefix.keys().copied().collect();
    prefixes
        .iter()
        .map(|p| {
            let mask = prefixes
                .iter()
                .filter(|q| q.contains(p))
                .fold(0u64, |m, q| m | by_prefix[q]);
            (*p, mask)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> AddrPrefix {
        AddrPrefix::from_net(&s.parse().unwrap())
    }

    fn ip(s: &str) -> AddrPrefix {
        AddrPrefix::host(s.parse().unwrap())
    }

    /// The slot masks the kernel finds for each entry, where slot `i`
    /// names set `i` (the class, then the slots of its sets).
    fn peer_masks(slots: &[(u8, &[AddrEntry])]) -> Vec<(AddrPrefix, u64)> {
        let sets: Vec<&[AddrEntry]> = slots.iter().map(|(_, e)| *e).collect();
        let c = peer_classes(&sets);
        c.entries
            .iter()
            .map(|&(p, class)| {
                let mask = match class {
                    NO_CLASS => 0,
                    c2 => c.members[c2 as usize - 1]
                        .iter()
                        .fold(0u64, |m, &set| m | (1 << slots[set as usize].0)),
                };
                (p, mask)
            })
            .collect()
    }

    /// What the kernel's LPM lookup would return for `a`.
    fn lookup(entries: &[(AddrPrefix, u64)], a: AddrPrefix) -> u64 {
        entries
            .iter()
            .filter(|(p, _)| p.contains(&a))
            .max_by_key(|(p, _)| p.len)
            .map(|(_, m)| *m)
            .unwrap_or(0)
    }

    fn entry(cidr: &str, except: &[&str]) -> AddrEntry {
        AddrEntry {
            cidr: net(cidr),
            except: except.iter().map(|e| net(e)).collect(),
        }
    }

    #[test]
    fn ipv4_is_mapped() {
        let p = net("10.1.0.0/16");
        assert_eq!(p.len, 112);
        assert_eq!(&p.bytes()[10..14], &[0xff, 0xff, 10, 1]);
        assert!(p.contains(&ip("10.1.2.3")));
        assert!(!p.contains(&ip("10.2.0.1")));
        // Mapped into ::ffff:0:0/96, IPv4 addresses lie inside IPv6
        // prefixes that cover it.
        assert!(net("::/1").contains(&ip("10.1.2.3")));
    }

    #[test]
    fn except_carves_holes() {
        let s0 = [entry("10.0.0.0/8", &["10.1.0.0/16"])];
        let e = peer_masks(&[(0, &s0)]);
        assert_eq!(lookup(&e, ip("10.2.3.4")), 1);
        assert_eq!(lookup(&e, ip("10.1.3.4")), 0);
        assert_eq!(lookup(&e, ip("11.0.0.1")), 0);
    }

    #[test]
    fn overlapping_rules_keep_every_slot() {
        let s0 = [entry("10.0.0.0/8", &["10.1.0.0/16"])];
        let s1 = [entry("10.1.2.0/24", &[])];
        let s2 = [entry("::/0", &[])];
        let e = peer_masks(&[(0, &s0), (1, &s1), (2, &s2)]);
        assert_eq!(lookup(&e, ip("10.9.0.1")), 0b101);
        assert_eq!(
            lookup(&e, ip("10.1.2.9")),
            0b110,
            "inside s0's hole but in s1"
        );
        assert_eq!(lookup(&e, ip("10.1.3.9")), 0b100);
        assert_eq!(lookup(&e, ip("fd00::1")), 0b100);
    }

    #[test]
    fn a_second_entry_of_the_same_slot_fills_a_hole() {
        let s0 = [
            entry("10.0.0.0/8", &["10.1.0.0/16"]),
            entry("10.1.5.0/24", &[]),
        ];
        let e = peer_masks(&[(0, &s0)]);
        assert_eq!(lookup(&e, ip("10.1.5.1")), 1);
        assert_eq!(lookup(&e, ip("10.1.6.1")), 0);
    }

    #[test]
    fn except_outside_cidr_is_ignored() {
        let s0 = [entry("10.0.0.0/16", &["192.168.0.0/16"])];
        let e = peer_masks(&[(0, &s0)]);
        assert_eq!(lookup(&e, ip("192.168.1.1")), 0);
        assert_eq!(lookup(&e, ip("10.0.1.1")), 1);
    }

    /// Brute force over a small space: every address gets exactly the slots
    /// whose sets contain it.
    #[test]
    fn exact_for_every_address_of_a_small_space() {
        let sets: Vec<Vec<AddrEntry>> = vec![
            vec![entry("10.0.0.0/28", &["10.0.0.4/30", "10.0.0.8/31"])],
            vec![
                entry("10.0.0.6/31", &[]),
                entry("10.0.0.12/30", &["10.0.0.13/32"]),
            ],
            vec![entry("10.0.0.0/29", &["10.0.0.0/30"])],
        ];
        let slots: Vec<(u8, &[AddrEntry])> = sets
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u8, s.as_slice()))
            .collect();
        let e = peer_masks(&slots);
        for last in 0..=20u8 {
            let a = ip(&format!("10.0.0.{last}"));
            let expected = sets.iter().enumerate().fold(0u64, |m, (i, set)| {
                let inside = set
                    .iter()
                    .any(|en| en.cidr.contains(&a) && !en.except.iter().any(|x| x.contains(&a)));
                if inside { m | (1 << i) } else { m }
            });
            assert_eq!(lookup(&e, a), expected, "10.0.0.{last}");
        }
    }

    #[test]
    fn ranges_to_prefixes() {
        assert_eq!(range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(range_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(range_prefixes(1000, 1003), vec![(1000, 14)]);
        let p = range_prefixes(1000, 2000);
        let covered: u32 = p.iter().map(|(_, l)| 1u32 << (16 - l)).sum();
        assert_eq!(covered, 1001);
        assert_eq!(range_prefixes(65535, 65535), vec![(65535, 16)]);
        assert_eq!(range_prefixes(30000, 65535).len(), 6);
    }

    #[test]
    fn port_masks_are_exact() {
        let a = [PortSpan {
            protocol: 6,
            first: 1000,
            last: 2000,
        }];
        let b = [
            PortSpan {
                protocol: 6,
                first: 1500,
                last: 1500,
            },
            PortSpan {
                protocol: 17,
                first: 53,
                last: 53,
            },
        ];
        let e = port_masks(&[(0, &a), (1, &b)]);
        let look = |proto: u8, port: u16| {
            e.iter()
                .filter(|(p, _)| p.protocol == proto && mask16(p.len) & port == p.port)
                .max_by_key(|(p, _)| p.len)
                .map(|(_, m)| *m)
                .unwrap_or(0)
        };
        for port in 0..=u16::MAX {
            let want = u64::from((1000..=2000).contains(&port)) | (u64::from(port == 1500) << 1);
            assert_eq!(look(6, port), want, "tcp {port}");
        }
        assert_eq!(look(17, 53), 0b10);
        assert_eq!(look(17, 1500), 0);
    }

    /// Pods of two teams, chosen by two overlapping selectors: one entry
    /// per pod address and one class per combination, however many rules
    /// or endpoints use the sets.
    #[test]
    fn classes_grow_with_combinations_not_with_addresses() {
        let host = |i: u32| {
            entry(
                &format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255),
                &[],
            )
        };
        let team_a: Vec<AddrEntry> = (0..500).map(host).collect();
        let everyone: Vec<AddrEntry> = (0..1000).map(host).collect();
        let c = peer_classes(&[&team_a, &everyone, &team_a]);
        assert_eq!(c.entries.len(), 1000);
        assert_eq!(c.members, vec![vec![0, 1, 2], vec![1]]);
        assert_eq!(c.classes_of_sets(3), vec![vec![1], vec![1, 2], vec![1]]);
        let again = peer_classes(&[&team_a, &everyone, &team_a]);
        assert_eq!(c, again, "numbering is deterministic");
    }
}
