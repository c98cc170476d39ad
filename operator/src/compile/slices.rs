//! Cuts an address set into `AddressSetSlice`s of at most
//! [`MAX_SLICE_ENTRIES`] entries. Pure: the slices depend only on the set's
//! name and entries, so a restarted operator cuts the same ones.
//!
//! Each entry goes by a hash of its owner (the pod whose address it is, or
//! for an `ipBlock` its CIDR): a slice holds the entries whose hash starts
//! with its bit prefix, and a slice with too many entries is cut in two by
//! the next bit. A pod's addresses are always in one slice, so a pod getting
//! or changing addresses (both families) changes that slice alone (and,
//! when it crosses the limit, cuts it or joins it with its sibling).

use std::net::IpAddr;

use flowlens_api::{
    address_set_slice::{AddressSetSliceSpec, MAX_SLICE_ENTRIES},
    node_agent_config::CidrEntry,
};
use sha2::{Digest, Sha256};

use super::content_hash;

/// The deepest cut: 2^20 slices, far more than any set has entries for.
const MAX_DEPTH: u32 = 20;

/// One slice, with its object name and a hash of its content.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Slice {
    pub name: String,
    pub spec: AddressSetSliceSpec,
    /// Changes only when `spec` does (the writer compares it).
    pub hash: String,
}

/// The slices of set `set`, whose entries are given with their owner. A
/// set without entries still has one (empty) slice, so that an agent can
/// tell an empty set from one it has not read.
pub(crate) fn slices<'a>(
    set: &str,
    entries: impl IntoIterator<Item = (&'a str, &'a CidrEntry)>,
) -> Vec<Slice> {
    let mut keyed: Vec<(u64, &CidrEntry)> = entries
        .into_iter()
        .map(|(owner, e)| (key(owner), e))
        .collect();
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    keyed.dedup_by(|a, b| a.1 == b.1);
    let mut out = Vec::new();
    cut(set, &keyed, 0, 0, &mut out);
    out
}

/// The first 64 bits of the SHA-256 of `owner`: stable across versions and
/// platforms, unlike `std`'s hasher.
fn key(owner: &str) -> u64 {
    let d = Sha256::digest(owner.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Adds the slices of the entries under bit prefix `prefix` of length
/// `depth` (`keyed` is sorted by key and holds exactly those entries).
fn cut(set: &str, keyed: &[(u64, &CidrEntry)], depth: u32, prefix: u64, out: &mut Vec<Slice>) {
    if keyed.len() <= MAX_SLICE_ENTRIES || depth == MAX_DEPTH {
        out.push(slice(set, keyed, depth, prefix));
        return;
    }
    let bit = 1u64 << (63 - depth);
    let split = keyed.partition_point(|(k, _)| k & bit == 0);
    cut(set, &keyed[..split], depth + 1, prefix << 1, out);
    cut(set, &keyed[split..], depth + 1, (prefix << 1) | 1, out);
}

fn slice(set: &str, keyed: &[(u64, &CidrEntry)], depth: u32, prefix: u64) -> Slice {
    let mut spec = AddressSetSliceSpec {
        address_set: set.to_owned(),
        ..Default::default()
    };
    for (_, e) in keyed {
        match single_address(e) {
            Some(a) => spec.addresses.push(a.to_owned()),
            None => spec.blocks.push((*e).clone()),
        }
    }
    spec.addresses.sort_unstable();
    spec.blocks.sort_unstable();
    let hash = content_hash(&serde_json::to_vec(&spec).expect("a slice serializes"));
    Slice {
        name: format!("{set}-{depth}-{prefix:x}"),
        spec,
        hash,
    }
}

/// The address of a `/32` or `/128` entry without exceptions.
fn single_address(e: &CidrEntry) -> Option<&str> {
    if !e.except.is_empty() {
        return None;
    }
    let (addr, len) = e.cidr.split_once('/')?;
    match (addr.parse::<IpAddr>().ok()?, len) {
        (IpAddr::V4(_), "32") | (IpAddr::V6(_), "128") => Some(addr),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn pods(n: usize) -> Vec<CidrEntry> {
        (0..n)
            .map(|i| CidrEntry {
                cidr: format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255),
                except: Vec::new(),
            })
            .collect()
    }

    /// Each entry its own owner (as `ipBlock`s are).
    fn own(entries: &[CidrEntry]) -> impl Iterator<Item = (&str, &CidrEntry)> {
        entries.iter().map(|e| (e.cidr.as_str(), e))
    }

    fn union(slices: &[Slice]) -> BTreeSet<CidrEntry> {
        slices.iter().flat_map(|s| s.spec.entries()).collect()
    }

    #[test]
    fn slices_hold_every_entry_once_and_stay_under_the_limit() {
        let mut entries = pods(10_000);
        entries.push(CidrEntry {
            cidr: "192.168.0.0/16".into(),
            except: vec!["192.168.1.0/24".into()],
        });
        entries.push(CidrEntry {
            cidr: "fd00::7/128".into(),
            except: Vec::new(),
        });
        let s = slices("as-x", own(&entries));
        assert!(s.len() >= 11, "{} slices", s.len());
        for x in &s {
            let n = x.spec.addresses.len() + x.spec.blocks.len();
            assert!(n <= MAX_SLICE_ENTRIES, "{}: {n} entries", x.name);
            assert_eq!(x.spec.address_set, "as-x");
        }
        let total: usize = s
            .iter()
            .map(|x| x.spec.addresses.len() + x.spec.blocks.len())
            .sum();
        assert_eq!(total, entries.len());
        assert_eq!(union(&s), entries.into_iter().collect());
        let names: BTreeSet<&str> = s.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names.len(), s.len(), "slice names are unique");
    }

    #[test]
    fn one_entry_more_changes_one_slice() {
        let entries = pods(5_000);
        let before = slices("as-x", own(&entries));
        let mut more = entries.clone();
        more.push(CidrEntry {
            cidr: "10.200.0.1/32".into(),
            except: Vec::new(),
        });
        let after = slices("as-x", own(&more));
        let changed = after.iter().filter(|s| !before.contains(s)).count();
        let gone = before.iter().filter(|s| !after.contains(s)).count();
        // One slice rewritten; or, when it crossed the limit, cut in two.
        assert!(
            gone == 1 && (changed == 1 || changed == 2),
            "{changed} {gone}"
        );
    }

    #[test]
    fn a_pods_addresses_share_a_slice_so_its_new_addresses_change_one() {
        let v4 = pods(5_000);
        let v6: Vec<CidrEntry> = (0..5_000)
            .map(|i| CidrEntry {
                cidr: format!("fd00::{i:x}/128"),
                except: Vec::new(),
            })
            .collect();
        let owners: Vec<String> = (0..5_000).map(|i| format!("ns/p{i}")).collect();
        let pairs = |v4: &[CidrEntry], v6: &[CidrEntry]| -> Vec<Slice> {
            let both = owners.iter().zip(v4).chain(owners.iter().zip(v6));
            slices("as-x", both.map(|(o, e)| (o.as_str(), e)))
        };
        let before = pairs(&v4, &v6);
        assert!(before.len() >= 10);
        let (mut v4b, mut v6b) = (v4.clone(), v6.clone());
        v4b[7].cidr = "10.99.0.7/32".into();
        v6b[7].cidr = "fd00:99::7/128".into();
        let after = pairs(&v4b, &v6b);
        let changed = after.iter().filter(|s| !before.contains(s)).count();
        assert_eq!(changed, 1, "pod 7's both addresses are in one slice");
    }

    #[test]
    fn the_order_of_entries_does_not_matter() {
        let entries = pods(3_000);
        let mut reversed = entries.clone();
        reversed.reverse();
        assert_eq!(
            slices("as-x", own(&entries)),
            slices("as-x", own(&reversed))
        );
    }

    #[test]
    fn an_empty_set_has_one_empty_slice() {
        let s = slices("as-x", own(&[]));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "as-x-0-0");
        assert!(s[0].spec.addresses.is_empty() && s[0].spec.blocks.is_empty());
    }

    #[test]
    fn a_host_prefix_with_exceptions_or_a_shorter_prefix_is_a_block() {
        let entries = [
            CidrEntry {
                cidr: "10.0.0.0/8".into(),
                except: Vec::new(),
            },
            CidrEntry {
                cidr: "10.0.0.1/32".into(),
                except: Vec::new(),
            },
        ];
        let s = slices("as-x", own(&entries));
        assert_eq!(s[0].spec.addresses, ["10.0.0.1"]);
        assert_eq!(s[0].spec.blocks, [entries[0].clone()]);
    }
}
