//! The Service tables in the kernel: written per generation like the rule
//! tables, and the record of translated connections read at each drain.

use std::collections::HashMap as StdHashMap;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use flowlens_agent_common::{
    BackendKey, FlowKey, FlowStats, ServiceBackendAddr, ServiceConnKey, ServiceInfo, ServiceKey,
};

use super::{DatapathError, Result, typed};
use crate::{aggregate::ConnService, tables::services::ServiceTables};

fn key(generation: u32, f: &crate::tables::services::Frontend) -> ServiceKey {
    ServiceKey {
        generation,
        addr: f.addr,
        port: f.port,
        protocol: f.protocol,
        _pad: 0,
    }
}

/// Writes `t` into generation `g` (backends first: a frontend never points
/// at a missing backend).
pub(super) fn write(ebpf: &mut Ebpf, g: u32, t: &ServiceTables) -> Result<()> {
    {
        let mut backends: HashMap<&mut MapData, BackendKey, ServiceBackendAddr> =
            typed(ebpf, "FL_SVC_BACKENDS")?;
        for (i, b) in t.backends.iter().enumerate() {
            let k = BackendKey {
                generation: g,
                index: i as u32,
            };
            backends
                .insert(k, *b, 0)
                .map_err(|e| DatapathError::map("FL_SVC_BACKENDS (is the table full?)", e))?;
        }
    }
    let mut frontends: HashMap<&mut MapData, ServiceKey, ServiceInfo> = typed(ebpf, "FL_SERVICES")?;
    for (f, info) in &t.frontends {
        frontends
            .insert(key(g, f), *info, 0)
            .map_err(|e| DatapathError::map("FL_SERVICES (is the table full?)", e))?;
    }
    Ok(())
}

/// Deletes generation `g`'s entries: those of `known` when this agent wrote
/// them, else every entry of the generation (written by a previous agent).
pub(super) fn clear(ebpf: &mut Ebpf, g: u32, known: Option<&ServiceTables>) -> Result<()> {
    {
        let mut frontends: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            typed(ebpf, "FL_SERVICES")?;
        let keys: Vec<ServiceKey> = match known {
            Some(t) => t.frontends.iter().map(|(f, _)| key(g, f)).collect(),
            None => frontends
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.generation == g)
                .collect(),
        };
        for k in keys {
            let _ = frontends.remove(&k);
        }
    }
    let mut backends: HashMap<&mut MapData, BackendKey, ServiceBackendAddr> =
        typed(ebpf, "FL_SVC_BACKENDS")?;
    let keys: Vec<BackendKey> = match known {
        Some(t) => (0..t.backends.len() as u32)
            .map(|index| BackendKey {
                generation: g,
                index,
            })
            .collect(),
        None => backends
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.generation == g)
            .collect(),
    };
    for k in keys {
        let _ = backends.remove(&k);
    }
    Ok(())
}

/// The Service each drained connection to a backend went through, from the
/// connect hook's record (only flows whose remote is a backend are looked up).
pub(super) fn services_of(
    ebpf: &Ebpf,
    flows: &[(FlowKey, FlowStats)],
    tables: &[&ServiceTables],
) -> Result<Vec<ConnService>> {
    let mut out = Vec::new();
    if tables.iter().all(|t| t.backend_set.is_empty()) {
        return Ok(out);
    }
    const NAME: &str = "FL_SVC_CONNS";
    let map = ebpf.map(NAME).ok_or_else(|| {
        DatapathError::map(NAME, aya::maps::MapError::InvalidName { name: NAME.into() })
    })?;
    let conns: HashMap<&MapData, ServiceConnKey, u64> =
        HashMap::try_from(map).map_err(|e| DatapathError::map(NAME, e))?;
    let mut asked: StdHashMap<ServiceConnKey, Option<u64>> = StdHashMap::new();
    for (k, _) in flows {
        let backend = crate::tables::services::Frontend {
            addr: k.remote_addr,
            port: k.remote_port,
            protocol: k.protocol,
        };
        if !tables.iter().any(|t| t.backend_set.contains(&backend)) {
            continue;
        }
        let ck = ServiceConnKey {
            client: k.local_addr,
            backend: k.remote_addr,
            port: k.remote_port,
            protocol: k.protocol,
            _pad: 0,
        };
        let id = *asked.entry(ck).or_insert_with(|| conns.get(&ck, 0).ok());
        if let Some(service_id) = id {
            out.push(ConnService {
                client: k.local_addr,
                backend: k.remote_addr,
                port: k.remote_port,
                protocol: k.protocol,
                service_id,
            });
        }
    }
    out.sort_by_key(|c| (c.client, c.backend, c.port, c.protocol));
    out.dedup();
    Ok(out)
}
