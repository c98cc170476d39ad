//! Result tables (flows, overflow, RTT, rule counters), each a pair of pinned
//! hash maps behind a one-slot array of maps.
//!
//! Draining swaps the spare map into the slot. The kernel's map-in-map update
//! waits for every running BPF program (`synchronize_rcu`), so afterwards no
//! program writes the old map: it is read in batches, exactly. It is emptied
//! only at the next drain, just before it is swapped in again: until then
//! the agent's spool vouches for its records (see `spool.rs`), and a
//! successor that finds it named there empties it instead of counting it.

use std::{marker::PhantomData, os::fd::AsFd, path::Path};

use aya::{
    Ebpf, Pod,
    maps::{ArrayOfMaps, HashMap, Map, MapData, MapError},
};

use super::{
    error::{DatapathError, Result},
    pins::PinLayout,
    sys,
};
use crate::allocator::is_large_drain;

/// Entries read per batch syscall.
const BATCH: usize = 4096;

pub(crate) struct Swappable<K, V> {
    outer: &'static str,
    a: MapData,
    b: MapData,
    /// Whether `a` is the map in the datapath.
    a_active: bool,
    capacity: u32,
    spare: SpareContents,
    /// The keys the last drain read ([`SpareContents::Read`]); its memory
    /// is reused by the next drain, as [`Swappable::recycled`]'s is.
    keys: Vec<K>,
    /// A drained vector given back ([`Swappable::recycle`]): the next drain
    /// reads into its memory instead of faulting in fresh pages.
    recycled: Vec<(K, V)>,
    _p: PhantomData<(K, V)>,
}

/// What the agent knows of the spare map's contents.
enum SpareContents {
    /// Nothing (at start): it is emptied by walking it.
    Unknown,
    /// Exactly the keys in [`Swappable::keys`]: it was read whole after it
    /// left the datapath, and no program writes it since.
    Read,
    Empty,
}

fn open_or_create<K: Pod, V: Pod>(path: &Path, capacity: u32) -> Result<MapData> {
    if !path.exists() {
        let m = HashMap::<MapData, K, V>::create(capacity, 0)
            .map_err(|e| DatapathError::map(path.display().to_string(), e))?;
        m.pin(path).map_err(|e| DatapathError::Link {
            path: path.to_path_buf(),
            message: format!("pinning: {}", error_chain(&e)),
        })?;
    }
    MapData::from_pin(path).map_err(|e| DatapathError::map(path.display().to_string(), e))
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn map_id(m: &MapData) -> Result<u32> {
    Ok(m.info().map_err(|e| DatapathError::map("info", e))?.id())
}

impl<K: Pod, V: Pod> Swappable<K, V> {
    /// Opens (or creates) the two maps `<stem>_a` and `<stem>_b` and makes
    /// sure one of them is in the outer map `outer`.
    pub(crate) fn open(
        ebpf: &mut Ebpf,
        layout: &PinLayout,
        outer: &'static str,
        stem: &str,
        capacity: u32,
    ) -> Result<Self> {
        let a = open_or_create::<K, V>(&layout.map(&format!("{stem}_a")), capacity)?;
        let b = open_or_create::<K, V>(&layout.map(&format!("{stem}_b")), capacity)?;
        let capacity = a.info().map(|i| i.max_entries()).unwrap_or(capacity);
        let (a_id, b_id) = (map_id(&a)?, map_id(&b)?);
        let mut s = Swappable {
            outer,
            a,
            b,
            a_active: true,
            capacity,
            spare: SpareContents::Unknown,
            keys: Vec::new(),
            recycled: Vec::new(),
            _p: PhantomData,
        };
        let current = {
            let outer_map = outer_map(ebpf, outer)?;
            match outer_map.get(&0, 0) {
                Ok(m) => Some(map_id(&m)?),
                Err(MapError::KeyNotFound) => None,
                Err(e) => return Err(DatapathError::map(outer, e)),
            }
        };
        match current {
            Some(id) if id == a_id => s.a_active = true,
            Some(id) if id == b_id => s.a_active = false,
            _ => {
                let mut outer_map = outer_map(ebpf, outer)?;
                outer_map
                    .set(0, &s.a, 0)
                    .map_err(|e| DatapathError::map(outer, e))?;
                s.a_active = true;
            }
        }
        Ok(s)
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The map the datapath does not write.
    fn spare(&self) -> &MapData {
        if self.a_active { &self.b } else { &self.a }
    }

    /// The map in the datapath.
    fn active(&self) -> &MapData {
        if self.a_active { &self.a } else { &self.b }
    }

    /// The kernel id of the spare map.
    pub(crate) fn spare_id(&self) -> Result<u32> {
        map_id(self.spare())
    }

    /// Reads the spare map, leaving it as it is.
    pub(crate) fn read_spare(&self) -> Result<Vec<(K, V)>> {
        let mut read = Vec::new();
        self.read_into(self.spare(), &mut read, "the spare ")?;
        Ok(read)
    }

    /// Reads `map` (one of the pair, `which` naming it in an error) into
    /// `read`, emptied first and sized for the whole map up front (a drain
    /// reads tens of thousands of entries: growing the vector would copy
    /// them again).
    fn read_into(&self, map: &MapData, read: &mut Vec<(K, V)>, which: &str) -> Result<()> {
        read.clear();
        read.reserve(self.capacity as usize);
        sys::lookup_into(map.fd().as_fd(), BATCH, read)
            .map_err(|e| DatapathError::io(format!("reading {which}{}", self.outer), e))
    }

    /// Empties the spare map (its records are counted already). When the
    /// keys it holds are known (it was read since it left the datapath),
    /// they are deleted by key: nothing is copied back and empty buckets are
    /// not visited (at 64,000 entries, emptying went from ~26% to ~20% of
    /// the agent's time, of a smaller total: docs/benchmarks.md). A map
    /// that is not empty afterwards (which would mean a program wrote it
    /// after the swap) is walked and emptied anyway, so nothing is counted
    /// twice. Replacing the map with a new empty one was no cheaper at
    /// 64,000 entries and dearer when nearly empty (a new preallocated map
    /// is zeroed whole).
    pub(crate) fn clear_spare(&mut self) -> Result<()> {
        // Unknown until emptied: a failure below leaves it to be walked.
        let contents = std::mem::replace(&mut self.spare, SpareContents::Unknown);
        let fd = self.spare().fd().as_fd();
        let emptying = |e| DatapathError::io(format!("emptying the spare {}", self.outer), e);
        let walk = || sys::delete_all::<K, V>(fd, BATCH).map_err(emptying);
        match contents {
            SpareContents::Empty => {}
            SpareContents::Unknown => {
                walk()?;
            }
            SpareContents::Read => {
                let deleted = sys::delete_keys(fd, &self.keys, BATCH);
                let empty = deleted.is_ok() && sys::is_empty::<K>(fd).map_err(emptying)?;
                if !empty {
                    let left = walk()?;
                    tracing::warn!(
                        table = self.outer,
                        read = self.keys.len(),
                        left,
                        error = deleted.err().map(|e| e.to_string()),
                        "the spare table held other entries than the drain read; emptied it whole"
                    );
                }
            }
        }
        self.spare = SpareContents::Empty;
        Ok(())
    }

    /// Reads the active map without draining it.
    pub(crate) fn peek(&self) -> Result<Vec<(K, V)>> {
        let mut read = Vec::new();
        self.read_into(self.active(), &mut read, "")?;
        Ok(read)
    }

    /// Empties the spare map (the previous drain's records), swaps it in,
    /// and reads the one swapped out (which stays full until the next
    /// drain).
    pub(crate) fn swap_and_read(&mut self, ebpf: &mut Ebpf) -> Result<Vec<(K, V)>> {
        self.clear_spare()?;
        outer_map(ebpf, self.outer)?
            .set(0, self.spare(), 0)
            .map_err(|e| DatapathError::map(self.outer, e))?;
        self.a_active = !self.a_active;
        self.spare = SpareContents::Unknown;
        let mut read = std::mem::take(&mut self.recycled);
        self.read_into(self.spare(), &mut read, "the spare ")?;
        // BPF_MAP_DELETE_BATCH takes the keys contiguous: one copy of them,
        // into the last drain's memory when this one is large.
        self.keys.clear();
        if !is_large_drain(read.len()) {
            self.keys.shrink_to(read.len());
        }
        self.keys.extend(read.iter().map(|(k, _)| *k));
        self.spare = SpareContents::Read;
        Ok(read)
    }

    /// Gives back a vector [`Swappable::swap_and_read`] returned, once its
    /// records are counted: the next drain reads into it. Kept only after a
    /// large drain ([`is_large_drain`]), so that a quiet node returns the
    /// memory.
    pub(crate) fn recycle(&mut self, mut drained: Vec<(K, V)>) {
        if is_large_drain(drained.len()) {
            drained.clear();
            self.recycled = drained;
        }
    }

    /// Re-sets the active map: a no-op for the data, but the kernel waits for
    /// every running BPF program before returning (an RCU barrier).
    pub(crate) fn barrier(&self, ebpf: &mut Ebpf) -> Result<()> {
        outer_map(ebpf, self.outer)?
            .set(0, self.active(), 0)
            .map_err(|e| DatapathError::map(self.outer, e))
    }
}

fn outer_map<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<ArrayOfMaps<&'a mut MapData, MapData>> {
    let map: &mut Map = ebpf
        .map_mut(name)
        .ok_or_else(|| DatapathError::map(name, MapError::InvalidName { name: name.into() }))?;
    ArrayOfMaps::try_from(map).map_err(|e| DatapathError::map(name, e))
}
