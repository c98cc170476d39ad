//! A label selector with the wire shape of `metav1.LabelSelector`, but with a
//! schema that validates keys, values and operators at apply time (the
//! upstream type's schema accepts any string as an operator).
//!
//! Matching semantics live in the operator's selector module; this is the type.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::patterns;

/// Selects objects by their labels. `{}` selects everything; the requirements of
/// `matchLabels` and `matchExpressions` are ANDed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// `{key: value}` pairs; each is the requirement `key In [value]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "match_labels_schema")]
    pub match_labels: BTreeMap<String, String>,

    /// Label requirements, ANDed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One requirement of a label selector.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// The label key the requirement applies to.
    #[schemars(length(max = 316), regex(pattern = patterns::LABEL_KEY))]
    pub key: String,

    /// How the key relates to `values`.
    pub operator: LabelSelectorOperator,

    /// Values for `In` and `NotIn` (must be non-empty); must be empty for
    /// `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 63), regex(pattern = patterns::LABEL_VALUE)))]
    pub values: Vec<String>,
}

/// A label selector operator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum LabelSelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// A selector with only `matchLabels`.
    pub fn from_labels<I, K, V>(labels: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            match_labels: labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            match_expressions: Vec::new(),
        }
    }

    /// True for `{}`, which selects every object.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

fn match_labels_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 64,
        "additionalProperties": {
            "type": "string",
            "maxLength": 63,
            "pattern": patterns::LABEL_VALUE,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_matches_metav1() {
        let yaml = r#"
matchLabels: {app: web}
matchExpressions:
- {key: tier, operator: NotIn, values: [cache]}
- {key: canary, operator: DoesNotExist}
"#;
        let s: LabelSelector = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(s.match_labels["app"], "web");
        assert_eq!(
            s.match_expressions[1].operator,
            LabelSelectorOperator::DoesNotExist
        );
        assert!(s.match_expressions[1].values.is_empty());
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back["matchExpressions"][0]["values"][0], "cache");
        assert!(back["matchExpressions"][1].get("values").is_none());
    }

    #[test]
    fn unknown_operator_is_a_parse_error() {
        let err = serde_yaml::from_str::<LabelSelector>(
            "matchExpressions: [{key: a, operator: Contains, values: [x]}]",
        )
        .unwrap_err();
        assert!(err.to_string().contains("Contains"), "{err}");
    }

    #[test]
    fn empty_selector_is_empty() {
        let s: LabelSelector = serde_yaml::from_str("{}").unwrap();
        assert!(s.is_empty());
        assert!(!LabelSelector::from_labels([("a", "b")]).is_empty());
    }
}
