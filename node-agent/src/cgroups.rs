//! Finds pods' cgroups (for connect-time rejection) and the cgroup v2 root.
//!
//! Kubelet names a pod's cgroup after its UID: `pod<uid>` (cgroupfs driver)
//! or `kubepods-...-pod<uid_with_underscores>.slice` (systemd driver).
//! Containers are sub-cgroups of it; the kernel program walks up to it.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The cgroup v2 mount point (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from a mountinfo text: the last
/// mount of the whole hierarchy (root `/`). In a container, the runtime's own
/// cgroup mount (a subtree) comes first and the node's, from a hostPath
/// volume, is mounted over it.
pub(crate) fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut found = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount_point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut f = left.split_whitespace();
        let (root, mount_point) = (f.nth(3), f.next());
        if let Some(mp) = mount_point
            && (root == Some("/") || found.is_none())
        {
            found = Some(PathBuf::from(mp));
        }
    }
    found
}

/// The cgroup v2 root of this host, if mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    parse_cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// Where the kubelet puts pods under a cgroup v2 root: `kubepods.slice`
/// (systemd driver) or `kubepods` (cgroupfs driver), else the root itself.
/// Hooks attached there see the node's pods and nothing else of the host.
pub fn pod_cgroup_root(cgroup2: &Path) -> PathBuf {
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|d| cgroup2.join(d))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| cgroup2.to_path_buf())
}

/// The pod UID a cgroup directory name belongs to, if it is a pod cgroup.
pub(crate) fn pod_uid_of(dir_name: &str) -> Option<String> {
    let i = dir_name.rfind("pod")?;
    let rest = &dir_name[i + 3..];
    let rest = rest.strip_suffix(".slice").unwrap_or(rest);
    let uid = rest.replace('_', "-");
    let is_uid = uid.len() == 36
        && uid.chars().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    is_uid.then_some(uid)
}

/// Walks `root` (at most `max_depth` levels) and returns pod UID -> (cgroup
/// id, path) for every pod cgroup found. The cgroup id is the directory's
/// inode number, which is what `bpf_get_current_cgroup_id()` returns.
pub(crate) fn find_pod_cgroups(root: &Path, max_depth: usize) -> HashMap<String, (u64, PathBuf)> {
    let mut out = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let path = e.path();
            let name = e.file_name();
            if let Some(uid) = pod_uid_of(&name.to_string_lossy()) {
                if let Ok(md) = e.metadata() {
                    out.insert(uid, (md.ino(), path.clone()));
                }
                continue;
            }
            if depth + 1 < max_depth {
                stack.push((path, depth + 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_points() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n\
                      36 25 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / /proc rw - proc proc rw"),
            None
        );
        // A container: the runtime's subtree mount, then the node's over it.
        let container = "50 40 0:30 /kubepods/besteffort/pod1/c1 /sys/fs/cgroup/unified ro - cgroup2 cgroup2 rw\n\
                         60 40 0:30 / /sys/fs/cgroup/unified ro,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_cgroup2_mount(container),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn pods_live_under_kubepods() {
        let tmp = std::env::temp_dir().join(format!("flowlens-kp-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        assert_eq!(pod_cgroup_root(&tmp), tmp);
        std::fs::create_dir_all(tmp.join("kubepods")).unwrap();
        assert_eq!(pod_cgroup_root(&tmp), tmp.join("kubepods"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn pod_cgroup_names() {
        let uid = "0b8e6d2c-4f1a-4c3e-9d7b-1a2b3c4d5e6f";
        assert_eq!(pod_uid_of(&format!("pod{uid}")).as_deref(), Some(uid));
        assert_eq!(
            pod_uid_of("kubepods-burstable-pod0b8e6d2c_4f1a_4c3e_9d7b_1a2b3c4d5e6f.slice")
                .as_deref(),
            Some(uid)
        );
        assert_eq!(pod_uid_of("kubepods-burstable.slice"), None);
        assert_eq!(pod_uid_of("cri-containerd-abc.scope"), None);
    }

    #[test]
    fn finds_nested_pod_cgroups() {
        let tmp = std::env::temp_dir().join(format!("flowlens-cg-{}", std::process::id()));
        let uid = "0b8e6d2c-4f1a-4c3e-9d7b-1a2b3c4d5e6f";
        let pod = tmp.join("kubepods/burstable").join(format!("pod{uid}"));
        std::fs::create_dir_all(pod.join("container1")).unwrap();
        let found = find_pod_cgroups(&tmp, 4);
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[uid].1, pod);
    }
}
