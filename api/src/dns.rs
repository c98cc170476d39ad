//! DNS as the traced pods' resolvers answered them: queries, answers by
//! response code, query-to-answer latency and the names asked most. The
//! agent reports one [`DnsWindow`] per observation window; the operator sums
//! the nodes' windows into [`DnsStatus`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{histogram::Histogram, network_observation::LatencyPercentiles};

/// Most names in a window's `topNames` (per agent, and in status).
pub const MAX_TOP_NAMES: usize = 10;
/// Most distinct response codes in one window (DNS has 16 in its header;
/// the agent names the rest `RCODE<n>`).
pub const MAX_RCODES: usize = 16;
/// The longest DNS name, in its dotted text form without the final dot.
pub const MAX_NAME_BYTES: usize = 253;

/// The DNS of one observation's pods on one node in one window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsWindow {
    /// Queries the pods sent (to port 53, UDP or TCP).
    pub queries: u64,
    /// Answers to those queries by response code (`NOERROR`, `NXDOMAIN`,
    /// `SERVFAIL`, ...).
    #[serde(default)]
    pub responses: BTreeMap<String, u64>,
    /// Queries given up on: no answer within the agent's wait (10 s).
    #[serde(default)]
    pub unanswered: u64,
    /// Query-to-answer time in microseconds, per answered query.
    #[serde(default, skip_serializing_if = "Histogram::is_empty")]
    pub latency: Histogram,
    /// The names queried most (at most [`MAX_TOP_NAMES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_names: Vec<NameCount>,
}

impl DnsWindow {
    pub fn is_empty(&self) -> bool {
        self.queries == 0 && self.responses.is_empty() && self.unanswered == 0
    }

    /// Adds another window (saturating: reports must never overflow).
    pub fn add(&mut self, o: &DnsWindow) {
        self.queries = self.queries.saturating_add(o.queries);
        self.unanswered = self.unanswered.saturating_add(o.unanswered);
        for (code, n) in &o.responses {
            let c = self.responses.entry(code.clone()).or_default();
            *c = c.saturating_add(*n);
        }
        self.latency.merge(&o.latency);
        let mut names: BTreeMap<String, u64> = self
            .top_names
            .drain(..)
            .map(|n| (n.name, n.queries))
            .collect();
        for n in &o.top_names {
            let c = names.entry(n.name.clone()).or_default();
            *c = c.saturating_add(n.queries);
        }
        self.top_names = top_names(names);
    }
}

/// The busiest [`MAX_TOP_NAMES`] names, most queried first (then by name).
pub fn top_names(counts: impl IntoIterator<Item = (String, u64)>) -> Vec<NameCount> {
    let mut v: Vec<NameCount> = counts
        .into_iter()
        .map(|(name, queries)| NameCount { name, queries })
        .collect();
    v.sort_by(|a, b| b.queries.cmp(&a.queries).then_with(|| a.name.cmp(&b.name)));
    v.truncate(MAX_TOP_NAMES);
    v
}

/// A name and how often it was queried.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NameCount {
    pub name: String,
    pub queries: u64,
}

/// DNS of the observation's pods in the last window, in status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsStatus {
    /// Queries the pods sent.
    pub queries: u64,
    /// Answers by response code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub responses: BTreeMap<String, u64>,
    /// Queries without an answer within 10 s.
    #[serde(default)]
    pub unanswered: u64,
    /// Query-to-answer time of the answered queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyPercentiles>,
    /// The names queried most. Each node reports its own busiest names, so
    /// a name busy on no single node may be missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_names: Vec<NameCount>,
}

/// The name of a DNS response code (RFC 1035 and RFC 2136), `RCODE<n>` for
/// the others.
pub fn rcode_name(code: u16) -> String {
    match code {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        6 => "YXDOMAIN".into(),
        7 => "YXRRSET".into(),
        8 => "NXRRSET".into(),
        9 => "NOTAUTH".into(),
        10 => "NOTZONE".into(),
        n => format!("RCODE{n}"),
    }
}

/// Why a string is not a DNS name Flowlens shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty")]
    Empty,
    #[error("{0} bytes, at most {MAX_NAME_BYTES}")]
    TooLong(usize),
    #[error("a label is empty or longer than 63 bytes")]
    BadLabel,
    #[error("{0:?} is not a letter, digit, '-', '_' or '.' in lower case")]
    BadCharacter(char),
}

/// Checks a name in the form the agent reports: lower case, dotted, no
/// final dot, labels of 1 to 63 letters, digits, `-` or `_`.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(NameError::BadLabel);
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(NameError::BadCharacter(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("api.payments.example").is_ok());
        assert!(check_name("_sip._tcp.example").is_ok());
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name("a..b"), Err(NameError::BadLabel));
        assert_eq!(check_name("a.b."), Err(NameError::BadLabel));
        assert_eq!(check_name("Api.example"), Err(NameError::BadCharacter('A')));
        assert_eq!(check_name("a b"), Err(NameError::BadCharacter(' ')));
        assert_eq!(
            check_name(&"x".repeat(64)),
            Err(NameError::BadLabel),
            "a label of 64"
        );
        let long = ["a"; 130].join(".");
        assert_eq!(check_name(&long), Err(NameError::TooLong(259)));
    }

    #[test]
    fn windows_add_and_keep_the_busiest_names() {
        let mut a = DnsWindow {
            queries: 3,
            responses: [("NOERROR".to_owned(), 2)].into(),
            top_names: vec![NameCount {
                name: "a.example".into(),
                queries: 3,
            }],
            ..Default::default()
        };
        let mut lat = Histogram::default();
        lat.record(20_000);
        let b = DnsWindow {
            queries: 12,
            responses: [("NOERROR".to_owned(), 1), ("NXDOMAIN".to_owned(), 4)].into(),
            unanswered: 1,
            latency: lat,
            top_names: (0..10)
                .map(|i| NameCount {
                    name: format!("n{i}.example"),
                    queries: 1,
                })
                .chain([NameCount {
                    name: "a.example".into(),
                    queries: 2,
                }])
                .collect(),
        };
        a.add(&b);
        assert_eq!(a.queries, 15);
        assert_eq!(a.unanswered, 1);
        assert_eq!(a.responses["NOERROR"], 3);
        assert_eq!(a.responses["NXDOMAIN"], 4);
        assert_eq!(a.latency.count(), 1);
        assert_eq!(a.top_names.len(), MAX_TOP_NAMES);
        assert_eq!(
            a.top_names[0],
            NameCount {
                name: "a.example".into(),
                queries: 5
            }
        );
    }

    #[test]
    fn response_codes_are_named() {
        assert_eq!(rcode_name(0), "NOERROR");
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(23), "RCODE23");
    }
}
