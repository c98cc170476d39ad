//! Relaxed atomic adds on map values. The BPF target has no `fetch_add` on
//! `core` atomics; the intrinsic compiles to a BPF atomic add whose result is
//! unused (supported by every kernel with BPF atomics).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// `*dst += v`, atomically.
#[inline(always)]
pub fn add_u64(dst: *mut u64, v: u64) {
    // SAFETY: callers pass pointers to values inside BPF map entries.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, v);
    }
}

/// `*dst += v`, atomically.
#[inline(always)]
pub fn add_u32(dst: *mut u32, v: u32) {
    // SAFETY: as above.
    unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(dst, v);
    }
}
