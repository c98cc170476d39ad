//! Label selector semantics (the same as Kubernetes').

use std::collections::BTreeMap;

use flowlens_api::label_selector::{LabelSelector, LabelSelectorOperator};

/// Whether `labels` satisfy `selector`. `{}` matches everything.
pub(crate) fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                LabelSelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                LabelSelectorOperator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                LabelSelectorOperator::Exists => value.is_some(),
                LabelSelectorOperator::DoesNotExist => value.is_none(),
            }
        })
}

/// A `(key, value)` pair every matching object must carry, if the selector
/// has one (used to look candidates up in a label index instead of scanning).
pub(crate) fn required_pair(selector: &LabelSelector) -> Option<(&str, &str)> {
    if let Some((k, v)) = selector.match_labels.iter().next() {
        return Some((k, v));
    }
    selector
        .match_expressions
        .iter()
        .find_map(|r| match (r.operator, r.values.as_slice()) {
            (LabelSelectorOperator::In, [v]) => Some((r.key.as_str(), v.as_str())),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(yaml: &str) -> LabelSelector {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn operators() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(matches(&sel("{}"), &l));
        assert!(matches(&sel("matchLabels: {app: web}"), &l));
        assert!(!matches(&sel("matchLabels: {app: db}"), &l));
        assert!(matches(
            &sel("matchExpressions: [{key: app, operator: In, values: [web, api]}]"),
            &l
        ));
        assert!(!matches(
            &sel("matchExpressions: [{key: app, operator: NotIn, values: [web]}]"),
            &l
        ));
        assert!(
            matches(
                &sel("matchExpressions: [{key: canary, operator: NotIn, values: [x]}]"),
                &l
            ),
            "NotIn matches a missing key"
        );
        assert!(matches(
            &sel("matchExpressions: [{key: tier, operator: Exists}]"),
            &l
        ));
        assert!(!matches(
            &sel("matchExpressions: [{key: tier, operator: DoesNotExist}]"),
            &l
        ));
        assert!(matches(
            &sel("matchExpressions: [{key: canary, operator: DoesNotExist}]"),
            &l
        ));
        assert!(
            !matches(
                &sel(
                    "matchLabels: {app: web}\nmatchExpressions: [{key: tier, operator: In, values: [back]}]"
                ),
                &l
            ),
            "ANDed"
        );
    }

    #[test]
    fn required_pairs_for_index_lookups() {
        assert_eq!(
            required_pair(&sel("matchLabels: {app: web}")),
            Some(("app", "web"))
        );
        assert_eq!(
            required_pair(&sel(
                "matchExpressions: [{key: app, operator: In, values: [web]}]"
            )),
            Some(("app", "web"))
        );
        assert_eq!(
            required_pair(&sel(
                "matchExpressions: [{key: app, operator: In, values: [a, b]}]"
            )),
            None
        );
        assert_eq!(required_pair(&sel("{}")), None);
    }
}
