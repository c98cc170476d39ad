//! Semantic validation of specs, naming the offending field.
//!
//! The CRD schema rejects most malformed objects at apply time. This module
//! repeats those checks and adds the cross-field ones that need CEL on the
//! server (unavailable before Kubernetes 1.25), so that the operator can set
//! `Ready=False, reason=InvalidSpec` with a precise message on any cluster,
//! and never acts on a spec it does not understand.

use std::{collections::BTreeSet, fmt};

use ipnet::IpNet;

use crate::{
    duration,
    flow_policy::{FlowPolicySpec, Peer, PortSpec},
    group_by::GroupBy,
    label_selector::{LabelSelector, LabelSelectorOperator},
    labels::{dns_label, label_key, label_value},
    network_observation::NetworkObservationSpec,
};

/// One problem in a spec: the JSON path of the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems of a spec; empty when it is valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

fn selector(errs: &mut FieldErrors, path: &str, s: &LabelSelector) {
    for (k, v) in &s.match_labels {
        if let Err(m) = label_key(k) {
            errs.push(format!("{path}.matchLabels"), m);
        }
        if let Err(m) = label_value(v) {
            errs.push(format!("{path}.matchLabels[{k}]"), m);
        }
    }
    for (i, r) in s.match_expressions.iter().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if let Err(m) = label_key(&r.key) {
            errs.push(format!("{p}.key"), m);
        }
        match r.operator {
            LabelSelectorOperator::In | LabelSelectorOperator::NotIn if r.values.is_empty() => {
                errs.push(format!("{p}.values"), "must be non-empty for In and NotIn");
            }
            LabelSelectorOperator::Exists | LabelSelectorOperator::DoesNotExist
                if !r.values.is_empty() =>
            {
                errs.push(
                    format!("{p}.values"),
                    "must be empty for Exists and DoesNotExist",
                );
            }
            _ => {}
        }
        for (j, v) in r.values.iter().enumerate() {
            if let Err(m) = label_value(v) {
                errs.push(format!("{p}.values[{j}]"), m);
            }
        }
    }
}

/// Validates a `NetworkObservation` spec.
pub fn network_observation(spec: &NetworkObservationSpec) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    if spec.namespaces.is_empty() && spec.namespace_selector.is_none() {
        errs.push(
            "spec.namespaces",
            "set namespaces, namespaceSelector or both: without them nothing is observed",
        );
    }
    for (i, ns) in spec.namespaces.iter().enumerate() {
        if !dns_label(ns) {
            errs.push(
                format!("spec.namespaces[{i}]"),
                format!("{ns:?} is not a namespace name"),
            );
        }
    }
    if let Some(s) = &spec.namespace_selector {
        selector(&mut errs, "spec.namespaceSelector", s);
    }
    if let Some(s) = &spec.pod_selector {
        selector(&mut errs, "spec.podSelector", s);
    }
    let mut kept = BTreeSet::new();
    for (i, k) in spec.keep_labels.iter().enumerate() {
        if let Err(m) = label_key(k) {
            errs.push(format!("spec.keepLabels[{i}]"), m);
        }
        if !kept.insert(k.as_str()) {
            errs.push(
                format!("spec.keepLabels[{i}]"),
                format!("{k:?} is listed twice"),
            );
        }
    }
    if spec.keep_labels.len() > 16 {
        errs.push("spec.keepLabels", "at most 16 label keys may be kept");
    }
    if spec.group_by.is_empty() || spec.group_by.len() > 8 {
        errs.push("spec.groupBy", "list 1 to 8 dimensions");
    }
    let mut seen = BTreeSet::new();
    for (i, g) in spec.group_by.iter().enumerate() {
        if !seen.insert(g) {
            errs.push(format!("spec.groupBy[{i}]"), format!("{g} is listed twice"));
        }
        if let GroupBy::Label(k) = g
            && !kept.contains(k.as_str())
        {
            errs.push(
                format!("spec.groupBy[{i}]"),
                format!("label:{k} needs {k:?} in spec.keepLabels"),
            );
        }
    }
    if let Err(e) = duration::parse_window(&spec.window) {
        errs.push("spec.window", e.to_string());
    }
    if !(1..=100).contains(&spec.top_n) {
        errs.push("spec.topN", format!("{} is outside 1..100", spec.top_n));
    }
    if !(1..=10_000).contains(&spec.max_series) {
        errs.push(
            "spec.maxSeries",
            format!("{} is outside 1..10000", spec.max_series),
        );
    }
    errs.into_result()
}

/// Parses a CIDR strictly: the address must be the network address
/// (`10.0.0.0/8`, not `10.1.2.3/8`), as NetworkPolicy's validation requires.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR such as 10.0.0.0/8 or fd00::/64"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set: did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn peer(errs: &mut FieldErrors, path: &str, p: &Peer) {
    if p.pod_selector.is_none() && p.namespace_selector.is_none() && p.ip_block.is_none() {
        errs.push(
            path,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        );
    }
    if p.ip_block.is_some() && (p.pod_selector.is_some() || p.namespace_selector.is_some()) {
        errs.push(
            format!("{path}.ipBlock"),
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        );
    }
    if let Some(s) = &p.pod_selector {
        selector(errs, &format!("{path}.podSelector"), s);
    }
    if let Some(s) = &p.namespace_selector {
        selector(errs, &format!("{path}.namespaceSelector"), s);
    }
    if let Some(b) = &p.ip_block {
        let cidr = match parse_cidr(&b.cidr) {
            Ok(c) => Some(c),
            Err(m) => {
                errs.push(format!("{path}.ipBlock.cidr"), m);
                None
            }
        };
        for (i, e) in b.except.iter().enumerate() {
            let f = format!("{path}.ipBlock.except[{i}]");
            match (parse_cidr(e), cidr) {
                (Err(m), _) => errs.push(f, m),
                (Ok(ex), Some(c)) => {
                    if !c.contains(&ex) || ex.prefix_len() <= c.prefix_len() {
                        errs.push(
                            f,
                            format!("{e:?} must lie strictly inside cidr {:?}", b.cidr),
                        );
                    }
                }
                (Ok(_), None) => {}
            }
        }
    }
}

fn ports(errs: &mut FieldErrors, path: &str, ports: &[PortSpec]) {
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{path}[{i}]");
        if p.port == Some(0) {
            errs.push(format!("{f}.port"), "must be 1..65535");
        }
        match (p.port, p.end_port) {
            (None, Some(_)) => errs.push(format!("{f}.endPort"), "endPort needs port"),
            (Some(a), Some(b)) if b < a => {
                errs.push(format!("{f}.endPort"), format!("{b} is below port {a}"))
            }
            _ => {}
        }
    }
}

/// Validates a `FlowPolicy` spec.
pub fn flow_policy(spec: &FlowPolicySpec) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    selector(&mut errs, "spec.podSelector", &spec.pod_selector);
    if spec.egress.is_empty() && spec.ingress.is_empty() {
        errs.push(
            "spec",
            "list at least one egress or ingress rule: this policy blocks nothing",
        );
    }
    for (i, r) in spec.egress.iter().enumerate() {
        for (j, p) in r.to.iter().enumerate() {
            peer(&mut errs, &format!("spec.egress[{i}].to[{j}]"), p);
        }
        ports(&mut errs, &format!("spec.egress[{i}].ports"), &r.ports);
    }
    for (i, r) in spec.ingress.iter().enumerate() {
        for (j, p) in r.from.iter().enumerate() {
            peer(&mut errs, &format!("spec.ingress[{i}].from[{j}]"), p);
        }
        ports(&mut errs, &format!("spec.ingress[{i}].ports"), &r.ports);
    }
    errs.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> FlowPolicySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn obs(yaml: &str) -> NetworkObservationSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn fields(r: Result<(), FieldErrors>) -> Vec<String> {
        r.err()
            .map(|e| e.0.into_iter().map(|e| e.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn valid_observation() {
        assert!(
            network_observation(&obs(
                "namespaces: [shop]\nkeepLabels: [app]\ngroupBy: [namespace, 'label:app']"
            ))
            .is_ok()
        );
    }

    #[test]
    fn observation_errors_name_fields() {
        assert_eq!(
            fields(network_observation(&obs("window: 30s"))),
            ["spec.namespaces"]
        );
        assert_eq!(
            fields(network_observation(&obs("namespaces: [shop]\nwindow: 4s"))),
            ["spec.window"]
        );
        assert_eq!(
            fields(network_observation(&obs(
                "namespaces: [shop]\ngroupBy: ['label:app']"
            ))),
            ["spec.groupBy[0]"]
        );
        assert_eq!(
            fields(network_observation(&obs(
                "namespaces: [Shop]\ntopN: 0\nmaxSeries: 20000"
            ))),
            ["spec.namespaces[0]", "spec.topN", "spec.maxSeries"]
        );
        assert_eq!(
            fields(network_observation(&obs(
                "namespaces: [a]\npodSelector: {matchExpressions: [{key: app, operator: In}]}"
            ))),
            ["spec.podSelector.matchExpressions[0].values"]
        );
    }

    #[test]
    fn valid_policy() {
        let p = policy(
            r#"
podSelector: {matchLabels: {app: api}}
egress:
- to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {podSelector: {}}]
  ports: [{port: 5432}, {protocol: UDP, port: 1000, endPort: 2000}]
ingress:
- from: [{ipBlock: {cidr: "fd00::/64", except: ["fd00::/96"]}}]
"#,
        );
        assert_eq!(flow_policy(&p), Ok(()));
    }

    #[test]
    fn except_outside_cidr_names_the_field() {
        let p = policy(
            "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24, 10.0.0.0/16]}}]}]",
        );
        let e = flow_policy(&p).unwrap_err();
        assert_eq!(e.0[0].field, "spec.egress[0].to[0].ipBlock.except[0]");
        assert!(e.0[0].message.contains("inside"), "{}", e);
        assert_eq!(e.0[1].field, "spec.egress[0].to[0].ipBlock.except[1]");
    }

    #[test]
    fn mixed_families_and_host_bits() {
        let p = policy(
            "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.1/8, except: ['fd00::/64']}}]}]",
        );
        let e = flow_policy(&p).unwrap_err();
        assert!(e.0[0].message.contains("did you mean 10.0.0.0/8"), "{e}");
    }

    #[test]
    fn peer_and_port_shape_errors() {
        let p = policy(
            r#"
podSelector: {}
egress:
- to: [{}, {ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]
  ports: [{endPort: 10}, {port: 20, endPort: 10}]
"#,
        );
        assert_eq!(
            fields(flow_policy(&p)),
            [
                "spec.egress[0].to[0]",
                "spec.egress[0].to[1].ipBlock",
                "spec.egress[0].ports[0].endPort",
                "spec.egress[0].ports[1].endPort"
            ]
        );
    }

    #[test]
    fn a_policy_without_rules_is_invalid() {
        assert_eq!(fields(flow_policy(&policy("podSelector: {}"))), ["spec"]);
    }
}
