//! The floor of any eBPF hook on a pod interface: a TC program that only
//! adds one to a per-CPU counter and passes the packet. The datapath
//! benchmark attaches it (tcx, first, like the agent's programs) to the
//! same hooks as the agent to show what any eBPF observer pays before it
//! does any work.
//!
//! Twelve instructions loaded with the `bpf()` system call, so that the
//! floor is exactly that and needs no second eBPF build; the links and maps
//! live as long as [`TcFloor`] (closing the last descriptor detaches them).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_PROG_LOAD: i64 = 5;
const BPF_LINK_CREATE: i64 = 28;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// `BPF_F_BEFORE`: the head of the chain, like the agent's `LinkOrder::first()`.
const BPF_F_BEFORE: u32 = 1 << 3;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8, // dst in the low nibble, src in the high
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// `key = 0; v = lookup(map, &key); if v { *v += 1 }; return TC_ACT_UNSPEC`.
fn program(map_fd: i32) -> [Insn; 12] {
    [
        insn(0x62, 10, 0, -4, 0),    // *(u32 *)(r10 - 4) = 0
        insn(0x18, 1, 1, 0, map_fd), // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
        insn(0x00, 0, 0, 0, 0),      //   (second half of ld_imm64)
        insn(0xbf, 2, 10, 0, 0),     // r2 = r10
        insn(0x07, 2, 0, 0, -4),     // r2 += -4
        insn(0x85, 0, 0, 0, 1),      // call bpf_map_lookup_elem
        insn(0x15, 0, 0, 3, 0),      // if r0 == 0 goto +3
        insn(0x79, 1, 0, 0, 0),      // r1 = *(u64 *)(r0 + 0)
        insn(0x07, 1, 0, 0, 1),      // r1 += 1
        insn(0x7b, 0, 1, 0, 0),      // *(u64 *)(r0 + 0) = r1
        insn(0xb7, 0, 0, 0, -1),     // r0 = TC_ACT_UNSPEC
        insn(0x95, 0, 0, 0, 0),      // exit
    ]
}

fn bpf(cmd: i64, attr: &mut [u64; 16]) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sets the `u32` at byte offset `off` of a `bpf_attr`.
fn put_u32(attr: &mut [u64; 16], off: usize, v: u32) {
    let bytes: &mut [u8; 128] = unsafe { &mut *(attr.as_mut_ptr() as *mut [u8; 128]) };
    bytes[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// The floor program attached to some interfaces, and its counter.
pub struct TcFloor {
    map: OwnedFd,
    _prog: OwnedFd,
    _links: Vec<OwnedFd>,
}

impl TcFloor {
    /// Loads the program and attaches it at tcx ingress and egress (first in
    /// the chain) of each of `ifaces` in the network namespace `netns`
    /// (a name under /var/run/netns).
    pub fn attach(netns: &str, ifaces: &[String]) -> io::Result<TcFloor> {
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, BPF_MAP_TYPE_PERCPU_ARRAY);
        put_u32(&mut attr, 4, 4); // key_size
        put_u32(&mut attr, 8, 8); // value_size
        put_u32(&mut attr, 12, 1); // max_entries
        let map = bpf(BPF_MAP_CREATE, &mut attr)?;

        let insns = program(map.as_raw_fd());
        let license = CString::new("GPL").unwrap();
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
        put_u32(&mut attr, 4, insns.len() as u32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        let name = b"bench_tc_floor\0\0";
        let bytes: &mut [u8; 128] = unsafe { &mut *(attr.as_mut_ptr() as *mut [u8; 128]) };
        bytes[48..64].copy_from_slice(name);
        let prog = bpf(BPF_PROG_LOAD, &mut attr)?;

        // Interface indexes are per namespace: resolve and attach from a
        // thread that has entered it (links stay with the devices).
        let netns = netns.to_owned();
        let prog_fd = prog.as_raw_fd();
        let ifaces = ifaces.to_vec();
        let links = std::thread::spawn(move || -> io::Result<Vec<OwnedFd>> {
            crate::topology::enter_netns(&netns)?;
            let mut links = Vec::new();
            for iface in &ifaces {
                let c = CString::new(iface.as_str()).unwrap();
                let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
                if ifindex == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no interface {iface} in network namespace {netns}"),
                    ));
                }
                for attach_type in [BPF_TCX_INGRESS, BPF_TCX_EGRESS] {
                    let mut attr = [0u64; 16];
                    put_u32(&mut attr, 0, prog_fd as u32);
                    put_u32(&mut attr, 4, ifindex);
                    put_u32(&mut attr, 8, attach_type);
                    put_u32(&mut attr, 12, BPF_F_BEFORE);
                    links.push(bpf(BPF_LINK_CREATE, &mut attr)?);
                }
            }
            Ok(links)
        })
        .join()
        .expect("attach thread")?;
        Ok(TcFloor {
            map,
            _prog: prog,
            _links: links,
        })
    }

    /// Packets counted so far (all CPUs).
    pub fn packets(&self) -> io::Result<u64> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .max(possible_cpus());
        let mut values = vec![0u64; cpus];
        let key = 0u32;
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, self.map.as_raw_fd() as u32);
        attr[1] = &key as *const u32 as u64;
        attr[2] = values.as_mut_ptr() as u64;
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(values.iter().sum())
    }
}

/// `/sys/devices/system/cpu/possible` (per-CPU values come in that many slots).
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        })
        .map_or(1, |last| last + 1)
}
