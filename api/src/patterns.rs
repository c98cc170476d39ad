//! Regular expressions embedded in the CRD schemas.
//!
//! They are written in the subset shared by Go's RE2 (the API server) and the
//! `regex` semantics users expect, and they are enforced by every API server
//! version, including ones without CEL. Checks a regex cannot express well
//! (lengths of label-key parts, exact IPv6 syntax) are repeated in
//! [`crate::validate`] and [`crate::labels`].

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of
/// alphanumerics, `-`, `_` and `.` that starts and ends alphanumeric.
pub const LABEL_KEY: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

/// A label value: empty, or alphanumerics, `-`, `_` and `.` starting and ending
/// alphanumeric (at most 63 characters, checked by `maxLength`).
pub const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

/// A namespace name (an RFC 1123 DNS label).
pub const NAMESPACE_NAME: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A `groupBy` item.
pub const GROUP_BY: &str = r"^(namespace|workload|pod|node|zone|service|dnsName|label:([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$";

/// An aggregation window of at least 5 seconds: `5s`..`59s`, `1m`, `1m30s`, `2h`, ...
/// (hours, minutes and seconds, in that order, each at most once).
pub const WINDOW: &str =
    r"^(([1-9][0-9]*h)([0-9]+m)?([0-9]+s)?|([1-9][0-9]*m)([0-9]+s)?|([5-9]|[1-9][0-9]+)s)$";

/// An IPv4 CIDR (`10.0.0.0/8`) or an IPv6 CIDR (`fd00::/64`). The IPv6 branch
/// only checks the alphabet; the exact syntax is checked by [`crate::validate`]
/// and, on Kubernetes 1.31+, by nothing more (the operator reports it).
pub const CIDR: &str = r"^((((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/(3[0-2]|[12]?[0-9]))|([0-9a-fA-F]{0,4}:[0-9a-fA-F:.]*/(12[0-8]|1[01][0-9]|[1-9]?[0-9])))$";

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn check(pattern: &str, good: &[&str], bad: &[&str]) {
        let re = Regex::new(pattern).unwrap();
        for g in good {
            assert!(re.is_match(g), "{pattern} should accept {g:?}");
        }
        for b in bad {
            assert!(!re.is_match(b), "{pattern} should reject {b:?}");
        }
    }

    #[test]
    fn label_keys() {
        check(
            LABEL_KEY,
            &[
                "app",
                "app.kubernetes.io/name",
                "team_x",
                "a",
                "k8s.io/A-b_c.d",
            ],
            &["", "-app", "app-", "Example.com/x", "a/b/c", "/x", "x/"],
        );
    }

    #[test]
    fn group_by_items() {
        check(
            GROUP_BY,
            &[
                "namespace",
                "workload",
                "pod",
                "node",
                "zone",
                "service",
                "dnsName",
                "label:app",
                "label:app.kubernetes.io/name",
            ],
            &["", "label:", "label:-x", "Namespace", "services", "pod "],
        );
    }

    #[test]
    fn windows_of_at_least_five_seconds() {
        check(
            WINDOW,
            &[
                "5s", "9s", "10s", "30s", "59s", "120s", "1m", "1m30s", "2h", "1h0m5s", "1h5s",
            ],
            &[
                "", "0s", "4s", "05s", "1", "1ms", "500ms", "1.5m", "-1m", "30s1m", "m", "0m", "0h",
            ],
        );
    }

    #[test]
    fn cidrs() {
        check(
            CIDR,
            &[
                "10.0.0.0/8",
                "0.0.0.0/0",
                "192.168.1.7/32",
                "fd00::/64",
                "::/0",
                "2001:db8::1/128",
            ],
            &[
                "10.0.0.0",
                "10.0.0.0/33",
                "256.0.0.0/8",
                "fd00::/129",
                "example.com/8",
                "10.0.0/8",
            ],
        );
    }

    #[test]
    fn namespaces_and_values() {
        check(
            NAMESPACE_NAME,
            &["default", "kube-system", "a1"],
            &["", "Default", "-a", "a_b"],
        );
        check(LABEL_VALUE, &["", "v1", "a-b_c.d"], &["-a", "a-", "a b"]);
    }
}
