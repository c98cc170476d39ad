//! The dimensions an observation groups its results by.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::patterns;

/// One dimension of `groupBy`: `namespace`, `workload`, `pod`, `node`, `zone`,
/// `service`, `dnsName` or `label:<key>` (the key must also be listed in
/// `keepLabels`).
///
/// `service` is the Service a client connected through (none for direct
/// connections). It is not a pod dimension: top flows always carry it, so
/// traffic through a Service is never merged with direct traffic; alone
/// (`groupBy: [service]`) it groups traffic by Service without pod
/// dimensions.
///
/// `dnsName` groups external peers by the DNS name the traced pods resolved
/// to their addresses (from the answers the pods received), without the
/// address: a service behind many addresses is one row. Peers without a
/// name keep their address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupBy {
    Namespace,
    Workload,
    Pod,
    Node,
    Zone,
    Service,
    DnsName,
    Label(String),
}

impl GroupBy {
    /// The default grouping: `[namespace, workload]`.
    pub fn defaults() -> Vec<GroupBy> {
        vec![GroupBy::Namespace, GroupBy::Workload]
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupBy::Namespace => f.write_str("namespace"),
            GroupBy::Workload => f.write_str("workload"),
            GroupBy::Pod => f.write_str("pod"),
            GroupBy::Node => f.write_str("node"),
            GroupBy::Zone => f.write_str("zone"),
            GroupBy::Service => f.write_str("service"),
            GroupBy::DnsName => f.write_str("dnsName"),
            GroupBy::Label(k) => write!(f, "label:{k}"),
        }
    }
}

/// Why a `groupBy` item was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a groupBy dimension: use namespace, workload, pod, node, zone, service, dnsName or label:<key>"
)]
pub struct GroupByError(pub String);

impl FromStr for GroupBy {
    type Err = GroupByError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "namespace" => GroupBy::Namespace,
            "workload" => GroupBy::Workload,
            "pod" => GroupBy::Pod,
            "node" => GroupBy::Node,
            "zone" => GroupBy::Zone,
            "service" => GroupBy::Service,
            "dnsName" => GroupBy::DnsName,
            other => match other.strip_prefix("label:") {
                Some(key) if crate::labels::label_key(key).is_ok() => {
                    GroupBy::Label(key.to_owned())
                }
                _ => return Err(GroupByError(s.to_owned())),
            },
        })
    }
}

impl Serialize for GroupBy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GroupBy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GroupBy {
    fn schema_name() -> Cow<'static, str> {
        "GroupBy".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": 322,
            "pattern": patterns::GROUP_BY,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "namespace",
            "workload",
            "pod",
            "node",
            "zone",
            "service",
            "dnsName",
            "label:app.kubernetes.io/name",
        ] {
            let g: GroupBy = s.parse().unwrap();
            assert_eq!(g.to_string(), s);
            let json = serde_json::to_string(&g).unwrap();
            assert_eq!(serde_json::from_str::<GroupBy>(&json).unwrap(), g);
        }
    }

    #[test]
    fn rejects_unknown() {
        for s in ["services", "label:", "label:-bad", "Pod"] {
            assert!(s.parse::<GroupBy>().is_err(), "{s}");
        }
    }
}
