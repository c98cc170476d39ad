//! Smoothed-RTT samples folded into a per-connection log-linear histogram.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use flowlens_agent_common::{COUNTER_RTT_SAMPLES, COUNTER_RTT_TABLE_FULL, RttKey, rtt_bucket};

use crate::{
    atomic::add_u64,
    maps::{FL_RTT, FL_RTT_LAST, bump, config, generation, is_traced},
};

/// Records `srtt_us` for the connection `local:lport <-> remote:rport` if the
/// local address is a traced endpoint of this node (global hooks see every
/// socket of the kernel, including other nodes' in tests). `cookie` is the
/// socket cookie used to rate-limit samples per socket (0 = no limit).
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
