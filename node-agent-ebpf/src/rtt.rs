//! Smoothed-RTT samples folded into a per-connection log-linear histogram.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::{bpf_ktime_get_ns, generated::bpf_sk_storage_get},
};
use flowlens_agent_common::{COUNTER_RTT_SAMPLES, COUNTER_RTT_TABLE_FULL, RttKey, rtt_bucket};

use crate::{
    atomic::add_u64,
    maps::{FL_RTT, FL_RTT_LAST, FL_RTT_SOCK, bump, config, generation, is_traced},
};

/// The per-socket rate limit of `sock_ops`: whether `sk` may give a sample
/// now (then the time is recorded in the socket's own storage). Checked
/// before anything else, as most RTT callbacks of a busy socket are
/// skipped; a socket whose storage cannot be had is sampled.
#[inline(always)]
pub fn due(sk: *mut bpf_sock) -> bool {
    let Some(cfg) = config() else {
        return false;
    };
    if cfg.rtt_sample_interval_ns == 0 || sk.is_null() {
        return true;
    }
    let map = core::ptr::from_ref(&FL_RTT_SOCK).cast_mut().cast();
    let last = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    } as *mut u64;
    if last.is_null() {
        return true;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // A new storage holds 0: due.
    if now.wrapping_sub(unsafe { *last }) < cfg.rtt_sample_interval_ns {
        return false;
    }
    unsafe { *last = now };
    true
}

/// Records `srtt_us` for the connection `local:lport <-> remote:rport` if the
/// local address is a traced endpoint of this node (global hooks see every
/// socket of the kernel, including other nodes' in tests). `cookie` is the
/// socket cookie used to rate-limit samples per socket (0 = no limit, or
/// limited by the caller: see [`due`]).
#[inline(always)]
pub fn record(
    local: &[u8; 16],
    remote: &[u8; 16],
    lport: u16,
    rport: u16,
    srtt_us: u32,
    cookie: u64,
) {
    let Some(cfg) = config() else {
        return;
    };
    if !is_traced(generation(cfg.epoch), local) {
        return;
    }
    if cookie != 0 && cfg.rtt_sample_interval_ns != 0 {
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(last) = unsafe { FL_RTT_LAST.get(&cookie) }
            && now.wrapping_sub(*last) < cfg.rtt_sample_interval_ns
        {
            return;
        }
        let _ = FL_RTT_LAST.insert(&cookie, &now, 0);
    }
    let Some(hist) = FL_RTT.get(0) else {
        return;
    };
    let key = RttKey {
        local_addr: *local,
        remote_addr: *remote,
        local_port: lport,
        remote_port: rport,
        bucket: rtt_bucket(srtt_us),
        _pad: 0,
    };
    bump(COUNTER_RTT_SAMPLES);
    if let Some(c) = hist.get_ptr_mut(&key) {
        add_u64(c, 1);
        return;
    }
    if hist.insert(&key, &1u64, BPF_NOEXIST as u64).is_err() {
        match hist.get_ptr_mut(&key) {
            Some(c) => add_u64(c, 1),
            None => bump(COUNTER_RTT_TABLE_FULL),
        }
    }
}
