//! Joins a `NodeAgentConfig` with the `AddressSetSlice`s of the address sets
//! its rules name. Pure; `config_source` watches the objects.
//!
//! Fail-closed for changes, fail-static for the kernel: a config is handed
//! on only once every set it names has been read, so a new config never
//! applies with a set missing (its rules would block nothing); until then,
//! the config in force stays.

use std::collections::{BTreeMap, BTreeSet};

use flowlens_api::{
    address_set_slice::{AddressSetSliceSpec, SET_LABEL},
    node_agent_config::{AddressSet, NodeAgentConfigSpec},
};

/// A slice as the agent read it: its spec, or why it cannot be used.
pub type ReadSlice = Result<AddressSetSliceSpec, String>;

/// Reads the slice `name` labelled `label` (the set the watch selected it
/// by): a slice whose spec names another set, or that [`AddressSetSliceSpec::check`]
/// rejects, cannot be used, and the message says why.
pub fn read_slice(name: &str, label: Option<&str>, spec: AddressSetSliceSpec) -> ReadSlice {
    if label != Some(spec.address_set.as_str()) {
        return Err(format!(
            "AddressSetSlice {name}: spec.addressSet {:?} is not its label {SET_LABEL}={:?}",
            spec.address_set,
            label.unwrap_or_default()
        ));
    }
    spec.check()
        .map_err(|e| format!("AddressSetSlice {name}: spec.{e}"))?;
    Ok(spec)
}

/// Why a config cannot be joined with its sets yet.
#[derive(Debug, PartialEq)]
pub enum Unjoined {
    /// Sets with no slice (not read yet, or deleted).
    Missing(Vec<String>),
    /// Slices that cannot be used (see [`read_slice`]): a set would be
    /// applied with part of its addresses.
    Bad(Vec<String>),
}

/// `spec` with every set it names inline, each the union of its slices'
/// entries (sorted, without duplicates); or why it cannot be, yet.
pub fn join<'a>(
    spec: &NodeAgentConfigSpec,
    slices: impl IntoIterator<Item = &'a ReadSlice>,
) -> Result<NodeAgentConfigSpec, Unjoined> {
    let named = spec.sets_in_slices();
    let mut entries: BTreeMap<&str, BTreeSet<_>> = BTreeMap::new();
    let mut bad = Vec::new();
    for s in slices {
        match s {
            Ok(s) if named.contains(&s.address_set) => {
                entries
                    .entry(s.address_set.as_str())
                    .or_default()
                    .extend(s.entries());
            }
            Ok(_) => {}
            Err(why) => bad.push(why.clone()),
        }
    }
    if !bad.is_empty() {
        return Err(Unjoined::Bad(bad));
    }
    let missing: Vec<String> = named
        .iter()
        .filter(|n| !entries.contains_key(n.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Unjoined::Missing(missing));
    }
    let mut joined = spec.clone();
    joined
        .address_sets
        .extend(entries.into_iter().map(|(name, e)| AddressSet {
            name: name.to_owned(),
            entries: e.into_iter().collect(),
        }));
    Ok(joined)
}

/// What the kernel records as the config it enforces: the revision, and,
/// since the sets' slices change under one revision, a hash of the sets
/// joined in. A restarted agent compares it to tell whether the tables it
/// compiles are the ones in force.
pub fn enforced_identity(spec: &NodeAgentConfigSpec) -> String {
    if spec.address_sets.is_empty() {
        return spec.revision.clone();
    }
    let json = serde_json::to_vec(&spec.address_sets).expect("address sets serialize");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&json, &mut h);
    format!(
        "{}+sets-{:016x}",
        spec.revision,
        std::hash::Hasher::finish(&h)
    )
}

/// The label selector of the slices of `sets`.
pub fn selector(sets: &BTreeSet<String>) -> String {
    let names: Vec<&str> = sets.iter().map(String::as_str).collect();
    format!("{SET_LABEL} in ({})", names.join(","))
}

#[cfg(test)]
mod tests {
    use flowlens_api::node_agent_config::{BlockRule, CidrEntry};

    use super::*;

    fn config(sets: &[&str]) -> NodeAgentConfigSpec {
        NodeAgentConfigSpec {
            rules: sets
                .iter()
                .map(|s| BlockRule {
                    id: format!("ns/p/egress/{s}"),
                    address_set: Some((*s).into()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn spec(set: &str, addresses: &[&str]) -> AddressSetSliceSpec {
        AddressSetSliceSpec {
            address_set: set.into(),
            addresses: addresses.iter().map(|a| (*a).into()).collect(),
            blocks: Vec::new(),
        }
    }

    fn slice(set: &str, addresses: &[&str]) -> ReadSlice {
        read_slice(&format!("{set}-0-0"), Some(set), spec(set, addresses))
    }

    #[test]
    fn a_config_is_joined_with_the_union_of_its_sets_slices() {
        let spec = config(&["as-a", "as-b"]);
        let slices = [
            slice("as-a", &["10.0.0.2", "10.0.0.1"]),
            slice("as-a", &["10.0.0.3", "10.0.0.1"]),
            slice("as-b", &[]),
            slice("as-other", &["10.9.9.9"]),
        ];
        let joined = join(&spec, &slices).unwrap();
        let a = &joined.address_sets[0];
        assert_eq!(a.name, "as-a");
        let cidrs: Vec<&str> = a.entries.iter().map(|e| e.cidr.as_str()).collect();
        assert_eq!(cidrs, ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"]);
        assert_eq!(joined.address_sets[1].name, "as-b");
        assert!(joined.address_sets[1].entries.is_empty(), "empty, but read");
        assert_eq!(joined.address_sets.len(), 2, "only the sets it names");
    }

    #[test]
    fn a_config_naming_a_set_not_read_is_held_back() {
        let spec = config(&["as-a", "as-b"]);
        assert_eq!(
            join(&spec, &[slice("as-a", &["10.0.0.1"])]).unwrap_err(),
            Unjoined::Missing(vec!["as-b".into()])
        );
    }

    #[test]
    fn a_slice_that_cannot_be_used_holds_the_config_back_and_is_named() {
        let spec = config(&["as-a"]);
        let relabelled = read_slice("as-a-0-0", Some("as-a"), self::spec("as-b", &["10.0.0.9"]));
        assert_eq!(
            relabelled.clone().unwrap_err(),
            "AddressSetSlice as-a-0-0: spec.addressSet \"as-b\" is not its label flowlens.dev/address-set=\"as-a\""
        );
        let cidr_as_address = slice("as-a", &["10.0.0.0/8"]);
        assert_eq!(
            cidr_as_address.clone().unwrap_err(),
            "AddressSetSlice as-a-0-0: spec.addresses[0]: \"10.0.0.0/8\" is not an IP address"
        );
        let good = slice("as-a", &["10.0.0.1"]);
        let Err(Unjoined::Bad(why)) = join(&spec, [&good, &relabelled, &cidr_as_address]) else {
            panic!("joined with a slice that cannot be used");
        };
        assert_eq!(why.len(), 2);
    }

    #[test]
    fn the_identity_in_force_follows_the_sets_content_under_one_revision() {
        let spec = config(&["as-a"]);
        assert_eq!(enforced_identity(&spec), spec.revision);
        let one = join(&spec, &[slice("as-a", &["10.0.0.1"])]).unwrap();
        let two = join(&spec, &[slice("as-a", &["10.0.0.2"])]).unwrap();
        assert_ne!(enforced_identity(&one), enforced_identity(&two));
        assert_eq!(
            enforced_identity(&one),
            enforced_identity(&join(&spec, &[slice("as-a", &["10.0.0.1"])]).unwrap())
        );
    }

    #[test]
    fn inline_sets_are_not_read_from_slices() {
        let mut spec = config(&["inline", "as-a"]);
        spec.address_sets.push(AddressSet {
            name: "inline".into(),
            entries: vec![CidrEntry {
                cidr: "10.1.0.0/16".into(),
                except: Vec::new(),
            }],
        });
        assert_eq!(spec.sets_in_slices(), BTreeSet::from(["as-a".to_owned()]));
        assert_eq!(
            selector(&config(&["as-b", "as-a"]).sets_in_slices()),
            "flowlens.dev/address-set in (as-a,as-b)"
        );
        let joined = join(&spec, &[slice("as-a", &[])]).unwrap();
        assert_eq!(joined.address_sets.len(), 2);
    }
}
