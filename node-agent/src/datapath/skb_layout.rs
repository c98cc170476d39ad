//! Offsets of the `struct sk_buff` fields the drop hook reads, from the
//! running kernel's BTF. The layout of `sk_buff` changes between kernel
//! versions and configurations, so nothing here is hard-coded.

use std::path::Path;

use btf_rs::{Btf, Struct, Type};
use flowlens_agent_common::SkbLayout;

/// Where the kernel publishes its BTF.
pub(crate) const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Resolves the [`SkbLayout`] from the BTF file at `path`.
pub(crate) fn resolve(path: &Path) -> Result<SkbLayout, String> {
    let btf = Btf::from_file(path).map_err(|e| format!("reading BTF {}: {e}", path.display()))?;
    let skb = btf
        .resolve_types_by_name("sk_buff")
        .map_err(|e| format!("no struct sk_buff in {}: {e}", path.display()))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| format!("no struct sk_buff in {}", path.display()))?;
    let offset = |field: &str| {
        member_byte_offset(&btf, &skb, field, 0)
            .ok_or_else(|| format!("struct sk_buff has no field {field}"))
    };
    Ok(SkbLayout {
        head: offset("head")?,
        network_header: offset("network_header")?,
        transport_header: offset("transport_header")?,
        valid: 1,
    })
}

/// The byte offset of `field` in `s`, looking into anonymous structs and
/// unions (where `sk_buff` keeps most of its header fields).
fn member_byte_offset(btf: &Btf, s: &Struct, field: &str, base_bits: u32) -> Option<u32> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let bits = base_bits + m.bit_offset();
        if name == field {
            return bits.is_multiple_of(8).then_some(bits / 8);
        }
        if name.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(off) = member_byte_offset(btf, &inner, field, bits)
        {
            return Some(off);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the running kernel's own BTF: the three fields exist, are
    /// distinct, and sit where `sk_buff` keeps them (head after the header
    /// offsets; the header offsets are adjacent 16-bit fields).
    #[test]
    fn resolves_the_running_kernels_sk_buff() {
        let path = Path::new(KERNEL_BTF);
        assert!(
            path.exists(),
            "this kernel publishes no BTF ({KERNEL_BTF} is missing): run the tests on a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        );
        let l = resolve(path).expect("sk_buff layout");
        assert_eq!(l.valid, 1);
        assert_eq!(l.network_header, l.transport_header + 2, "{l:?}");
        assert!(l.head > l.network_header, "{l:?}");
        assert_eq!(l.head % 8, 0, "head is a pointer: {l:?}");
    }

    #[test]
    fn a_missing_file_says_which() {
        let e = resolve(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
    }
}
