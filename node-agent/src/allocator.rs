//! How the agent uses glibc's allocator. A drain of a full flow table
//! allocates tens of megabytes for a moment (the batch, the per-connection
//! facts); glibc keeps freed memory per arena and rarely returns it, so the
//! resident set would stay at its peak. One arena (the agent allocates from
//! one control thread; the HTTP threads allocate little) and an explicit
//! trim after a large drain keep it near what is in use
//! (`flowlens-bench agent-at-64k-flows`, docs/benchmarks.md).

/// Drains of at least this many flow entries are large: see [`is_large_drain`].
const TRIM_AFTER_ENTRIES: usize = 4096;

/// Whether a drain of `entries` flow entries was large: then free memory
/// is returned to the kernel after it ([`release_after_drain`]), and its
/// buffers are kept for the next drain to read into (`datapath/results.rs`);
/// a small drain's are given back, so a quiet node returns the memory.
pub fn is_large_drain(entries: usize) -> bool {
    entries >= TRIM_AFTER_ENTRIES
}

/// At startup, before any thread: one malloc arena.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// After a drain of `entries` flow entries (its buffers freed): returns
/// free memory to the kernel if the drain was large.
pub fn release_after_drain(entries: usize) {
    if is_large_drain(entries) {
        release();
    }
}

/// Returns free memory to the kernel: after a large drain, and once the
/// datapath is loaded (parsing the kernel's BTF and the programs' object
/// takes tens of megabytes for a moment).
pub fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
