//! Where the datapath pins its maps and links on the BPF file system, in one
//! place. The layout is versioned: a new layout gets a new directory, so an
//! agent never reinterprets maps of another layout.
//!
//! ```text
//! <root>/v5/maps/FL_*              maps of the eBPF object
//! <root>/v5/maps/flows_a|flows_b   swappable result tables (also rtt, overflow, rules)
//! <root>/v5/links/tc_<ifindex>_<ingress|egress>_<ifname>
//! <root>/v5/links/<hook>           cgroup and tracepoint links
//! ```
//!
//! bpffs reserves `.` in names, so interface names store it as `~`.
//!
//! After an upgrade, the layout of the previous version stays pinned (and its
//! programs keep enforcing) until the new agent has applied its first config;
//! then the agent removes it (`Datapath::remove_other_layouts`).

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

/// Bump when a map's key, value or meaning changes.
pub const LAYOUT_VERSION: &str = "v5";

/// The default pin root.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/flowlens";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const TRACEFS_MAGIC: i64 = 0x74726163;

#[derive(Clone, Debug)]
pub(crate) struct PinLayout {
    dir: PathBuf,
}

impl PinLayout {
    pub(crate) fn new(root: &Path) -> Self {
        PinLayout {
            dir: root.join(LAYOUT_VERSION),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Layouts of other versions under the same root (`v<N>` directories an
    /// agent of another version pinned).
    pub(crate) fn other_versions(&self) -> Vec<PinLayout> {
        let Some(root) = self.dir.parent() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let mut out: Vec<PinLayout> = entries
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name != LAYOUT_VERSION
                    && name.len() > 1
                    && name.starts_with('v')
                    && name[1..].bytes().all(|b| b.is_ascii_digit())
            })
            .map(|e| PinLayout { dir: e.path() })
            .collect();
        out.sort_by(|a, b| a.dir.cmp(&b.dir));
        out
    }

    pub(crate) fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub(crate) fn links(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub(crate) fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub(crate) fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }

    /// The pin of a TC link.
    pub(crate) fn tc_link(&self, ifname: &str, ifindex: u32, ingress: bool) -> PathBuf {
        let dir = if ingress { "ingress" } else { "egress" };
        self.links()
            .join(format!("tc_{ifindex}_{dir}_{}", ifname.replace('.', "~")))
    }

    /// Parses a TC link pin name back into (ifname, ifindex, ingress).
    pub(crate) fn parse_tc_link(name: &str) -> Option<(String, u32, bool)> {
        let mut parts = name.splitn(4, '_');
        if parts.next()? != "tc" {
            return None;
        }
        let ifindex = parts.next()?.parse().ok()?;
        let ingress = match parts.next()? {
            "ingress" => true,
            "egress" => false,
            _ => return None,
        };
        Some((parts.next()?.replace('~', "."), ifindex, ingress))
    }

    /// Creates the directories (mounting bpffs first if needed).
    pub(crate) fn prepare(&self) -> io::Result<()> {
        ensure_bpffs(&self.dir)?;
        std::fs::create_dir_all(self.maps())?;
        std::fs::create_dir_all(self.links())?;
        Ok(())
    }
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

fn mount(fstype: &str, target: &Path) -> io::Result<()> {
    let t = CString::new(target.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let f = CString::new(fstype).unwrap();
    // SAFETY: valid C strings; no data argument.
    if unsafe { libc::mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure `path` is on a BPF file system, mounting one at
/// `/sys/fs/bpf` when none is there.
pub(crate) fn ensure_bpffs(path: &Path) -> io::Result<()> {
    // Find the nearest existing ancestor and check its file system.
    let mut probe = path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if fs_magic(&probe).ok() == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let bpffs = Path::new("/sys/fs/bpf");
    if fs_magic(bpffs).ok() != Some(BPF_FS_MAGIC) {
        std::fs::create_dir_all(bpffs)?;
        mount("bpf", bpffs)
            .map_err(|e| io::Error::new(e.kind(), format!("mounting bpffs on /sys/fs/bpf: {e}")))?;
    }
    if !path.starts_with(bpffs) && fs_magic(&probe).ok() != Some(BPF_FS_MAGIC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not on a BPF file system: use a --bpffs-root under /sys/fs/bpf",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Makes sure tracefs is mounted (tracepoint attachment reads event ids from it).
pub(crate) fn ensure_tracefs() -> io::Result<PathBuf> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if fs_magic(Path::new(p)).ok() == Some(TRACEFS_MAGIC) {
            return Ok(PathBuf::from(p));
        }
    }
    let root = Path::new("/sys/kernel/tracing");
    mount("tracefs", root)?;
    Ok(root.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_link_names_round_trip() {
        let l = PinLayout::new(Path::new("/sys/fs/bpf/x"));
        let p = l.tc_link("veth.a_b", 42, true);
        assert_eq!(
            p,
            Path::new("/sys/fs/bpf/x")
                .join(LAYOUT_VERSION)
                .join("links/tc_42_ingress_veth~a_b")
        );
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            PinLayout::parse_tc_link(name),
            Some(("veth.a_b".into(), 42, true))
        );
        assert_eq!(PinLayout::parse_tc_link("sockops"), None);
    }
}
