//! `AddressSetSlice`: one slice of an address set that block rules name
//! (`NodeAgentConfig.spec.rules[].addressSet`). The operator writes them;
//! each node's agent watches the slices of the sets its config names.
//!
//! An address set is named after what selects its peers (the policy's
//! namespace and the rule's `to`/`from`), not after its content: a pod
//! getting an address rewrites one slice, not every config that names the
//! set. A set is cut into slices of at most [`MAX_SLICE_ENTRIES`] entries
//! the way Services are cut into EndpointSlices, by a hash of each entry,
//! so that the slices of a set depend only on its content.

// kube's `printcolumn(...)` attributes repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::node_agent_config::CidrEntry;

/// The label naming the address set a slice belongs to: agents select the
/// slices of their sets with it.
pub const SET_LABEL: &str = "flowlens.dev/address-set";

/// The most entries (addresses and blocks) in one slice.
pub const MAX_SLICE_ENTRIES: usize = 1000;

/// One slice of an address set. Cluster-scoped, written by the operator
/// only; labelled [`SET_LABEL`]`=<set>`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "flowlens.dev",
    version = "v1alpha1",
    kind = "AddressSetSlice",
    plural = "addresssetslices",
    shortname = "fass",
    category = "flowlens",
    doc = "A slice of an address set named by block rules, written by the Flowlens operator. Do not edit.",
    printcolumn(name = "Set", type_ = "string", json_path = ".spec.addressSet"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.addresses) ? size(self.addresses) : 0) + (has(self.blocks) ? size(self.blocks) : 0) <= 1000").message("a slice holds at most 1000 entries, addresses and blocks together"))]
pub struct AddressSetSliceSpec {
    /// The address set this slice belongs to (also its label).
    pub address_set: String,
    /// Single addresses (pod IPs), without a prefix length.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub addresses: Vec<String>,
    /// CIDRs, each minus some sub-CIDRs (`ipBlock` peers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub blocks: Vec<CidrEntry>,
}

impl AddressSetSliceSpec {
    /// Whether the slice can be used as it is: at most
    /// [`MAX_SLICE_ENTRIES`] entries, bare addresses, CIDRs (and their
    /// exceptions) that parse. The error names the field.
    pub fn check(&self) -> Result<(), String> {
        let n = self.addresses.len() + self.blocks.len();
        if n > MAX_SLICE_ENTRIES {
            return Err(format!(
                "{n} entries (addresses and blocks), more than {MAX_SLICE_ENTRIES}"
            ));
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if a.parse::<std::net::IpAddr>().is_err() {
                return Err(format!("addresses[{i}]: {a:?} is not an IP address"));
            }
        }
        for (i, b) in self.blocks.iter().enumerate() {
            crate::validate::parse_cidr(&b.cidr).map_err(|e| format!("blocks[{i}].cidr: {e}"))?;
            for (j, x) in b.except.iter().enumerate() {
                crate::validate::parse_cidr(x)
                    .map_err(|e| format!("blocks[{i}].except[{j}]: {e}"))?;
            }
        }
        Ok(())
    }

    /// The slice's entries as CIDRs (`/32` or `/128` for single addresses).
    /// An address that does not parse is passed on as it is (see
    /// [`Self::check`]).
    pub fn entries(&self) -> impl Iterator<Item = CidrEntry> + '_ {
        self.addresses
            .iter()
            .map(|a| {
                let len = match a.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(_)) => "/128",
                    Ok(std::net::IpAddr::V4(_)) => "/32",
                    Err(_) => "",
                };
                CidrEntry {
                    cidr: format!("{a}{len}"),
                    except: Vec::new(),
                }
            })
            .chain(self.blocks.iter().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_host_prefixes_and_blocks_stay() {
        let s = AddressSetSliceSpec {
            address_set: "as-1".into(),
            addresses: vec!["10.0.0.1".into(), "fd00::1".into(), "bogus".into()],
            blocks: vec![CidrEntry {
                cidr: "192.168.0.0/16".into(),
                except: vec!["192.168.1.0/24".into()],
            }],
        };
        let cidrs: Vec<String> = s.entries().map(|e| e.cidr).collect();
        assert_eq!(
            cidrs,
            ["10.0.0.1/32", "fd00::1/128", "bogus", "192.168.0.0/16"]
        );
    }

    #[test]
    fn check_names_the_field_that_cannot_be_used() {
        let good = AddressSetSliceSpec {
            address_set: "as-1".into(),
            addresses: vec!["10.0.0.1".into(), "fd00::1".into()],
            blocks: vec![CidrEntry {
                cidr: "192.168.0.0/16".into(),
                except: vec!["192.168.1.0/24".into()],
            }],
        };
        assert_eq!(good.check(), Ok(()));
        let mut s = good.clone();
        s.addresses[1] = "10.0.0.0/8".into();
        assert!(s.check().unwrap_err().starts_with("addresses[1]: "));
        let mut s = good.clone();
        s.blocks[0].except[0] = "nope".into();
        assert!(s.check().unwrap_err().starts_with("blocks[0].except[0]: "));
        let mut s = good.clone();
        s.blocks[0].cidr = "192.168.1.1/16".into();
        assert!(s.check().unwrap_err().starts_with("blocks[0].cidr: "));
        let mut s = good;
        s.addresses = vec!["10.0.0.1".into(); MAX_SLICE_ENTRIES];
        assert!(s.check().unwrap_err().contains("more than 1000"));
    }
}
