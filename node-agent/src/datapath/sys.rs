//! The `bpf(2)` commands aya 0.14 does not wrap: batched lookup, delete and
//! lookup-and-delete (to read and empty a swapped-out table in a few
//! syscalls) and
//! link update (to replace a pinned link's program atomically on upgrade).

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr`, large enough for every command used here (the kernel
/// reads `size` bytes and requires unused ones to be zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn zeroed() -> Self {
        Attr([0; 128])
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the declared size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            size_of::<Attr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned BPF object (map, program or link).
pub(crate) fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = Attr::zeroed();
    // struct { pathname: u64; bpf_fd, file_flags: u32 }
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Deletes every entry of a hash map, `chunk` entries per syscall, and
/// returns how many there were. The entries are read into one reused
/// buffer and discarded (the kernel has no "delete all"). Meant for maps
/// with no concurrent writer (swapped out of the datapath).
pub(crate) fn delete_all<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
) -> io::Result<usize> {
    let mut n = 0;
    batch_each::<K, V>(map, chunk, BPF_MAP_LOOKUP_AND_DELETE_BATCH, |_, _| n += 1)?;
    Ok(n)
}

/// Deletes `keys` from a hash map, `chunk` keys per syscall. Cheaper than
/// [`delete_all`] when the keys are known (nothing is copied back and empty
/// buckets are not visited). Fails with `ENOENT` at the first key the map
/// does not hold.
pub(crate) fn delete_keys<K: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    chunk: usize,
) -> io::Result<()> {
    for part in keys.chunks(chunk.max(1)) {
        let mut attr = Attr::zeroed();
        attr.put_u64(16, part.as_ptr() as u64);
        attr.put_u32(32, part.len() as u32);
        attr.put_u32(36, map.as_raw_fd() as u32);
        bpf(BPF_MAP_DELETE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Whether a map holds no entry (asks for its first key).
pub(crate) fn is_empty<K: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<bool> {
    let mut first = MaybeUninit::<K>::uninit();
    let mut attr = Attr::zeroed();
    // struct { map_fd: u32, pad; key, next_key: u64 }; a null key asks for the first.
    attr.put_u32(0, map.as_raw_fd() as u32);
    attr.put_u64(16, first.as_mut_ptr() as u64);
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Appends every entry of a hash map to `out`, without changing the map. A
/// racy snapshot when programs write concurrently: good for a debug view;
/// exact for a map no program writes.
pub(crate) fn lookup_into<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    out: &mut Vec<(K, V)>,
) -> io::Result<()> {
    batch_each(map, chunk, BPF_MAP_LOOKUP_BATCH, |k, v| out.push((k, v)))
}

/// Runs batch command `cmd` over the whole map, handing each entry to
/// `each`. One key and one value buffer of `chunk` entries serve every
/// syscall.
fn batch_each<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    cmd: libc::c_long,
    mut each: impl FnMut(K, V),
) -> io::Result<()> {
    let mut chunk = chunk.max(16);
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    let mut in_batch: u64 = 0;
    let mut out_batch: u64 = 0;
    let mut first = true;
    loop {
        // MaybeUninit needs no initialisation: only the length changes.
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize_with(chunk, MaybeUninit::uninit);
        let mut attr = Attr::zeroed();
        // struct { in_batch, out_batch, keys, values: u64; count, map_fd: u32; elem_flags, flags: u64 }
        attr.put_u64(
            0,
            if first {
                0
            } else {
                &in_batch as *const u64 as u64
            },
        );
        attr.put_u64(8, &mut out_batch as *mut u64 as u64);
        attr.put_u64(16, keys.as_mut_ptr() as u64);
        attr.put_u64(24, values.as_mut_ptr() as u64);
        attr.put_u32(32, chunk as u32);
        attr.put_u32(36, map.as_raw_fd() as u32);
        let res = bpf(cmd, &mut attr).map(|_| ());
        let n = (attr.get_u32(32) as usize).min(chunk);
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            // SAFETY: the kernel initialised the first `n` entries.
            each(unsafe { k.assume_init() }, unsafe { v.assume_init() });
        }
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // A bucket holds more entries than fit: retry it with more room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e),
        }
        in_batch = out_batch;
        first = false;
    }
}

/// Atomically replaces the program of a BPF link.
pub(crate) fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::zeroed();
    // struct { link_fd, new_prog_fd, flags, old_prog_fd: u32 }
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, new_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use aya::maps::{HashMap, IterableMap, MapData};

    use super::*;

    /// On the real kernel (needs CAP_BPF, as every system test): deleting by
    /// key empties exactly the keys given; a key the map does not hold stops
    /// it with ENOENT, and the map is then not empty.
    #[test]
    fn deleting_by_key_empties_exactly_the_keys_read() {
        let mut map = HashMap::<MapData, u32, u64>::create(4096, 0)
            .expect("creating a BPF hash map (run as root)");
        for k in 0..3000u32 {
            map.insert(k, u64::from(k), 0).unwrap();
        }
        let fd = map.map().fd().as_fd();
        let mut read = Vec::new();
        lookup_into::<u32, u64>(fd, 1024, &mut read).unwrap();
        assert_eq!(read.len(), 3000);
        let keys: Vec<u32> = read.iter().map(|(k, _)| *k).collect();
        delete_keys(fd, &keys, 1024).unwrap();
        assert!(is_empty::<u32>(fd).unwrap());

        for k in 0..10u32 {
            map.insert(k, 1, 0).unwrap();
        }
        let fd = map.map().fd().as_fd();
        let err = delete_keys(fd, &[0u32, 1, 99], 1024).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
        assert!(!is_empty::<u32>(fd).unwrap());
        assert_eq!(delete_all::<u32, u64>(fd, 16).unwrap(), 8);
        assert!(is_empty::<u32>(fd).unwrap());
    }
}
