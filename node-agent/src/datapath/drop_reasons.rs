//! Names of the kernel's drop reasons (`enum skb_drop_reason`), read from the
//! `skb:kfree_skb` tracepoint's format, which lists them with their values.
//! The values differ between kernel versions; the format file is the
//! running kernel's own table.

use std::collections::BTreeMap;

/// The tracepoint format file, relative to the tracefs mount.
pub(crate) const FORMAT: &str = "events/skb/kfree_skb/format";

/// Parses the `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)`
/// list of a format file into value → name.
pub(crate) fn parse(format: &str) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let Some(start) = format.find("__print_symbolic(REC->reason") else {
        return out;
    };
    let mut rest = &format[start..];
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find('}') else { break };
        let entry = &rest[..close];
        rest = &rest[close + 1..];
        let mut parts = entry.splitn(2, ',');
        let (Some(value), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<u32>() {
            out.insert(v, name.trim().trim_matches('"').to_owned());
        }
    }
    out
}

/// The metric label of a reason slot: its name, `UNKNOWN_<n>` for a value
/// the table does not list, `OTHER` for the last (shared) slot.
pub(crate) fn label(names: &BTreeMap<u32, String>, slot: u32, slots: u32) -> String {
    if slot + 1 == slots {
        return "OTHER".into();
    }
    names
        .get(&slot)
        .cloned()
        .unwrap_or_else(|| format!("UNKNOWN_{slot}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->rx_sk, REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 62, "TC_EGRESS" }, { 128, "MAX" })"#;

    #[test]
    fn reads_values_and_names() {
        let names = parse(SAMPLE);
        assert_eq!(names.len(), 4);
        assert_eq!(names[&3], "NO_SOCKET");
        assert_eq!(names[&62], "TC_EGRESS");
    }

    #[test]
    fn labels_unknown_and_shared_slots() {
        let names = parse(SAMPLE);
        assert_eq!(label(&names, 3, 256), "NO_SOCKET");
        assert_eq!(label(&names, 99, 256), "UNKNOWN_99");
        assert_eq!(label(&names, 255, 256), "OTHER");
    }

    #[test]
    fn a_format_without_reasons_gives_nothing() {
        assert!(parse("print fmt: \"skbaddr=%p\"").is_empty());
    }

    /// The running kernel's table, when tracefs is mounted.
    #[test]
    fn the_running_kernel_lists_no_socket() {
        // As the agent does: use tracefs where it is mounted, else mount it.
        let root = crate::datapath::pins::ensure_tracefs().unwrap_or_else(|e| {
            panic!(
                "tracefs is not mounted and mounting it failed ({e}): run `mount -t tracefs tracefs /sys/kernel/tracing` as root"
            )
        });
        let f = std::fs::read_to_string(root.join(FORMAT))
            .unwrap_or_else(|e| panic!("reading {}/{FORMAT}: {e}", root.display()));
        let names = parse(&f);
        assert!(names.values().any(|n| n == "NO_SOCKET"), "{names:?}");
    }
}
