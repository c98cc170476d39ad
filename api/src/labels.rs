//! The syntax of Kubernetes label keys, label values and DNS labels, shared
//! by [`crate::validate`] and the parsers of the API types (`label:<key>` in
//! `groupBy`).

/// Checks a label key: `[prefix/]name`, prefix a DNS subdomain of at most 253
/// characters, name at most 63 characters of alphanumerics, `-`, `_`, `.`,
/// starting and ending alphanumeric.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 {
            return Err(format!("{key:?}: the prefix must be 1 to 253 characters"));
        }
        for label in p.split('.') {
            if !dns_label(label) {
                return Err(format!(
                    "{key:?}: the prefix must be a lowercase DNS subdomain such as example.com"
                ));
            }
        }
    }
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{key:?}: the name part must be 1 to 63 characters"));
    }
    let ok_inner = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    let bytes = name.as_bytes();
    if !bytes[0].is_ascii_alphanumeric()
        || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
        || !name.chars().all(ok_inner)
    {
        return Err(format!(
            "{key:?}: the name must use alphanumerics, '-', '_' or '.', and start and end alphanumeric"
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or at most 63 characters of alphanumerics,
/// `-`, `_`, `.`, starting and ending alphanumeric.
pub fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    if v.len() > 63 {
        return Err(format!("{v:?}: a label value is at most 63 characters"));
    }
    let b = v.as_bytes();
    let ok_inner = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    if !b[0].is_ascii_alphanumeric()
        || !b[b.len() - 1].is_ascii_alphanumeric()
        || !v.chars().all(ok_inner)
    {
        return Err(format!(
            "{v:?}: a label value uses alphanumerics, '-', '_' or '.', and starts and ends alphanumeric"
        ));
    }
    Ok(())
}

/// An RFC 1123 DNS label (also a valid namespace name).
pub fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys() {
        assert!(label_key("app").is_ok());
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key(&"a".repeat(63)).is_ok());
        assert!(label_key(&"a".repeat(64)).is_err());
        assert!(label_key("Example.com/app").is_err());
        assert!(label_key("-app").is_err());
        assert!(label_key("a/b/c").is_err());
    }
}
