//! Attaching programs and keeping their links pinned.
//!
//! Every link is pinned, so enforcement and counting outlive the agent. A
//! restarted agent adopts existing pins: it moves each link to its own
//! program instance with `BPF_LINK_UPDATE` (atomic, no gap) instead of
//! attaching a second copy.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::AsFd,
    path::Path,
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, Program, SchedClassifier, SockOps,
        TcAttachType, TracePoint,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use tracing::{debug, info, warn};

use super::{
    error::{DatapathError, Result},
    pins::PinLayout,
    sys,
};

/// Program names in the eBPF object.
pub(crate) const PROG_FROM_POD: &str = "fl_from_pod";
pub(crate) const PROG_TO_POD: &str = "fl_to_pod";
pub(crate) const PROG_SOCKOPS: &str = "fl_sockops";
pub(crate) const PROG_TCP_PROBE: &str = "fl_tcp_probe";
pub(crate) const PROG_TCP_RETRANS: &str = "fl_tcp_retrans";
pub(crate) const PROG_KFREE_SKB: &str = "fl_kfree_skb";
pub(crate) const PROG_CONNECT4: &str = "fl_connect4";
pub(crate) const PROG_CONNECT6: &str = "fl_connect6";
pub(crate) const PROG_GETPEERNAME4: &str = "fl_getpeername4";
pub(crate) const PROG_GETPEERNAME6: &str = "fl_getpeername6";
pub(crate) const PROG_RECVMSG4: &str = "fl_recvmsg4";
pub(crate) const PROG_RECVMSG6: &str = "fl_recvmsg6";
pub(crate) const PROG_SENDMSG4: &str = "fl_sendmsg4";
pub(crate) const PROG_SENDMSG6: &str = "fl_sendmsg6";

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program> {
    ebpf.program_mut(name).ok_or(DatapathError::Unsupported {
        feature: "the program set of this build",
        hint: "the eBPF object lacks a program: rebuild the agent",
    })
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn link_err(path: &Path, e: impl std::error::Error) -> DatapathError {
    DatapathError::Link {
        path: path.to_path_buf(),
        message: super::results::error_chain(&e),
    }
}

/// Moves a pinned link to `prog`'s current instance. Returns false when the
/// pin is gone or cannot be updated (the caller then re-attaches).
fn adopt(path: &Path, prog: &Program) -> bool {
    let Ok(link) = sys::obj_get(path) else {
        return false;
    };
    let Ok(fd) = prog.fd() else {
        return false;
    };
    match sys::link_update(link.as_fd(), fd.as_fd()) {
        Ok(()) => true,
        Err(e) => {
            debug!(path = %path.display(), error = %e, "cannot update pinned link; re-attaching");
            false
        }
    }
}

fn pin(link: FdLink, path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    link.pin(path).map_err(|e| link_err(path, e))?;
    Ok(())
}

/// Loads every program of the object (the verifier runs here).
pub(crate) fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for name in [PROG_FROM_POD, PROG_TO_POD] {
        let p: &mut SchedClassifier = program(ebpf, name)?.try_into().map_err(prog_err(name))?;
        p.load().map_err(prog_err(name))?;
    }
    let p: &mut SockOps = program(ebpf, PROG_SOCKOPS)?
        .try_into()
        .map_err(prog_err(PROG_SOCKOPS))?;
    p.load().map_err(prog_err(PROG_SOCKOPS))?;
    for name in [PROG_TCP_PROBE, PROG_TCP_RETRANS, PROG_KFREE_SKB] {
        let p: &mut TracePoint = program(ebpf, name)?.try_into().map_err(prog_err(name))?;
        p.load().map_err(prog_err(name))?;
    }
    for name in [
        PROG_CONNECT4,
        PROG_CONNECT6,
        PROG_GETPEERNAME4,
        PROG_GETPEERNAME6,
        PROG_RECVMSG4,
        PROG_RECVMSG6,
        PROG_SENDMSG4,
        PROG_SENDMSG6,
    ] {
        let p: &mut CgroupSockAddr = program(ebpf, name)?.try_into().map_err(prog_err(name))?;
        p.load().map_err(prog_err(name))?;
    }
    Ok(())
}

/// Attaches (or adopts) a cgroup program at `cgroup`, pinned as `pin_name`.
/// Link-based cgroup attachments take no mode flags (the kernel rejects
/// `BPF_F_ALLOW_MULTI` there) and coexist with other programs anyway.
pub(crate) fn cgroup_hook(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    name: &'static str,
    cgroup: &Path,
    pin_name: &str,
) -> Result<()> {
    let path = layout.link(pin_name);
    if adopt(&path, program(ebpf, name)?) {
        info!(program = name, cgroup = %cgroup.display(), "adopted pinned cgroup link");
        return Ok(());
    }
    let file = fs::File::open(cgroup)
        .map_err(|e| DatapathError::io(format!("opening cgroup {}", cgroup.display()), e))?;
    let link: FdLink = match program(ebpf, name)? {
        Program::SockOps(p) => {
            let id = p
                .attach(&file, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            p.take_link(id)
                .map_err(prog_err(name))?
                .try_into()
                .map_err(|e| link_err(&path, e))?
        }
        Program::CgroupSockAddr(p) => {
            let id = p
                .attach(&file, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            p.take_link(id)
                .map_err(prog_err(name))?
                .try_into()
                .map_err(|e| link_err(&path, e))?
        }
        _ => {
            return Err(DatapathError::Link {
                path,
                message: "not a cgroup program".into(),
            });
        }
    };
    pin(link, &path)?;
    info!(program = name, cgroup = %cgroup.display(), "attached");
    Ok(())
}

/// Attaches (or adopts) a tracepoint program, pinned as `pin_name`.
pub(crate) fn tracepoint_hook(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    name: &'static str,
    category: &str,
    event: &str,
    pin_name: &str,
) -> Result<()> {
    let path = layout.link(pin_name);
    if path.exists() {
        // Perf-event links cannot change program: replace the attachment.
        let _ = fs::remove_file(&path);
    }
    let p: &mut TracePoint = program(ebpf, name)?.try_into().map_err(prog_err(name))?;
    let id = p.attach(category, event).map_err(prog_err(name))?;
    let link: FdLink = p
        .take_link(id)
        .map_err(prog_err(name))?
        .try_into()
        .map_err(|e| link_err(&path, e))?;
    pin(link, &path)?;
    info!(program = name, tracepoint = %format!("{category}/{event}"), "attached");
    Ok(())
}

/// Removes a pinned link (detaching it when nothing else holds it).
pub(crate) fn unpin(layout: &PinLayout, pin_name: &str) {
    let _ = fs::remove_file(layout.link(pin_name));
}

/// One TC attachment: interface name and index.
pub(crate) type Interface = (String, u32);

/// The TC links of an interface as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcLinks {
    /// Link id on traffic leaving the pod (TCX ingress of the host side).
    pub from_pod: u32,
    /// Link id on traffic entering the pod (TCX egress).
    pub to_pod: u32,
    /// Whether Flowlens' programs run first in both directions: a program
    /// before them that redirects or accepts a packet ends the chain, and
    /// Flowlens never sees it.
    pub first: bool,
}

/// Makes the set of interfaces with TC programs equal to `wanted`:
/// attaches new ones (first in the TCX chain), adopts pinned ones, detaches
/// the rest (including pins of interfaces that no longer exist). Returns
/// the interfaces whose programs the kernel shows attached, with their
/// links; an interface that failed, or whose links the kernel does not
/// show, is absent.
///
/// Only TCX (Linux 6.6+) is used: its links are pinned and outlive the
/// agent. Older kernels get nothing attached (the caller reports them
/// unsupported) rather than netlink filters that would not.
pub(crate) fn sync_tc(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    wanted: &BTreeSet<Interface>,
) -> Result<BTreeMap<Interface, TcLinks>> {
    if !tcx_supported() {
        return Err(DatapathError::Unsupported {
            feature: "TCX attachments",
            hint: "Linux 6.6 or newer is needed to attach the per-pod programs: pods on this node are neither counted nor enforced by TC",
        });
    }
    let mut pinned: BTreeMap<Interface, BTreeSet<bool>> = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(layout.links()) {
        for e in entries.flatten() {
            if let Some((ifname, ifindex, ingress)) =
                PinLayout::parse_tc_link(&e.file_name().to_string_lossy())
            {
                pinned.entry((ifname, ifindex)).or_default().insert(ingress);
            }
        }
    }
    for (iface, dirs) in &pinned {
        if !wanted.contains(iface) {
            for ingress in dirs {
                let _ = fs::remove_file(layout.tc_link(&iface.0, iface.1, *ingress));
            }
            debug!(interface = %iface.0, ifindex = iface.1, "detached TC programs");
        }
    }
    let from_pod_id = program_id(ebpf, PROG_FROM_POD)?;
    let to_pod_id = program_id(ebpf, PROG_TO_POD)?;
    let mut attached = BTreeMap::new();
    for iface in wanted {
        for (ingress, name) in [(true, PROG_FROM_POD), (false, PROG_TO_POD)] {
            let path = layout.tc_link(&iface.0, iface.1, ingress);
            if pinned.get(iface).is_some_and(|d| d.contains(&ingress))
                && adopt(&path, program(ebpf, name)?)
            {
                continue;
            }
            let p: &mut SchedClassifier =
                program(ebpf, name)?.try_into().map_err(prog_err(name))?;
            let id = match p.attach_with_options(
                iface.0.as_str(),
                tc_direction(ingress),
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            ) {
                Ok(id) => id,
                Err(e) => {
                    warn!(interface = %iface.0, error = %e, "cannot attach TC program");
                    continue;
                }
            };
            let link = p.take_link(id).map_err(prog_err(name))?;
            let fd_link: FdLink = link.try_into().map_err(|_| DatapathError::Unsupported {
                feature: "TCX links",
                hint: "Linux 6.6 or newer is needed for attachments that survive the agent",
            })?;
            pin(fd_link, &path)?;
            debug!(interface = %iface.0, ifindex = iface.1, ingress, "attached TC program");
        }
        match verify(layout, iface, from_pod_id, to_pod_id) {
            Ok(links) => {
                attached.insert(iface.clone(), links);
            }
            Err(why) => {
                warn!(interface = %iface.0, ifindex = iface.1, problem = %why, "TC programs not attached");
            }
        }
    }
    Ok(attached)
}

fn tc_direction(ingress: bool) -> TcAttachType {
    if ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    }
}

/// Whether the kernel has TCX (multi-program TC links).
pub(crate) fn tcx_supported() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= super::TCX_SINCE)
}

/// The kernel's id of a loaded program of the object.
fn program_id(ebpf: &mut Ebpf, name: &'static str) -> Result<u32> {
    let p: &mut SchedClassifier = program(ebpf, name)?.try_into().map_err(prog_err(name))?;
    Ok(p.info().map_err(prog_err(name))?.id())
}

/// Reads back an interface's attachments: each pinned link must run our
/// program, and the kernel's list of programs on the interface must hold
/// it.
fn verify(
    layout: &PinLayout,
    iface: &Interface,
    from_pod_id: u32,
    to_pod_id: u32,
) -> std::result::Result<TcLinks, String> {
    let mut links = [0u32; 2];
    let mut first = true;
    for (i, (ingress, prog_id)) in [(true, from_pod_id), (false, to_pod_id)]
        .into_iter()
        .enumerate()
    {
        let path = layout.tc_link(&iface.0, iface.1, ingress);
        let link = PinnedLink::from_pin(&path)
            .map_err(|e| format!("link {} cannot be read: {e}", path.display()))?;
        let info = FdLink::from(link)
            .info()
            .map_err(|e| format!("link {} has no info: {e}", path.display()))?;
        if info.program_id() != prog_id {
            return Err(format!(
                "link {} runs program {}, not this agent's {prog_id}",
                info.id(),
                info.program_id()
            ));
        }
        let (_, programs) = SchedClassifier::query_tcx(&iface.0, tc_direction(ingress))
            .map_err(|e| format!("cannot list the programs of {}: {e}", iface.0))?;
        let Some(pos) = programs.iter().position(|p| p.id() == prog_id) else {
            return Err(format!(
                "program {prog_id} is not on {} ({})",
                iface.0,
                if ingress { "ingress" } else { "egress" }
            ));
        };
        first &= pos == 0;
        links[i] = info.id();
    }
    Ok(TcLinks {
        from_pod: links[0],
        to_pod: links[1],
        first,
    })
}

/// Detaches everything this layout pinned and removes its maps: used by
/// `flowlens-agent cleanup` when Flowlens is removed from a node.
pub(crate) fn remove_all(layout: &PinLayout) -> std::io::Result<usize> {
    let mut n = 0;
    for dir in [layout.links(), layout.maps()] {
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                fs::remove_file(e.path())?;
                n += 1;
            }
        }
        let _ = fs::remove_dir(&dir);
    }
    let _ = fs::remove_dir(layout.dir());
    if let Some(root) = layout.dir().parent() {
        let _ = fs::remove_dir(root);
    }
    Ok(n)
}
