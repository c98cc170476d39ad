//! Status writes: server-side apply of the whole status, under the
//! operator's field manager, counted in the write metric; and the memory of
//! what was written ([`StatusMemory`]), so a status is never computed from
//! an older one.

use std::{collections::HashMap, fmt::Debug, sync::Mutex};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{config_writer::FIELD_MANAGER, metrics::Metrics};

/// Applies `status` to the object `name` of `api`; `resource` labels the
/// write metric (e.g. `flowpolicies/status`).
pub(crate) async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl Serialize,
    metrics: &Metrics,
    resource: &'static str,
) -> kube::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    metrics.wrote(resource, "apply");
    Ok(())
}

/// A status timestamp from Unix seconds.
pub(crate) fn time(unix: i64) -> Time {
    Time(Timestamp::from_second(unix).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Objects whose written status the cache has not caught up with yet, at
/// most (beyond, the cache is trusted again: in practice it lags by
/// milliseconds, or by seconds after an API-server restart).
const MAX_REMEMBERED: usize = 100_000;

/// The status this operator last wrote to each object (by UID), until the
/// controller's cached copy of the object shows it.
///
/// Status figures grow from the status they are computed from (a total plus
/// the windows after the last one it shows). The cached object can be older
/// than the last write: its watch lags, or is broken for a while after an
/// API-server restart ("too old resource version", then a relist). A status
/// computed from such a stale base would silently drop every window written
/// since. Only this operator (the leader) writes these statuses, so what it
/// wrote last is the truth until the cache shows it.
pub struct StatusMemory<S> {
    written: Mutex<HashMap<String, S>>,
    /// How far a status has counted (the end of its last window): the
    /// newer of two statuses counted further.
    progress: fn(&S) -> Option<i64>,
}

impl<S: Clone> StatusMemory<S> {
    pub fn new(progress: fn(&S) -> Option<i64>) -> Self {
        StatusMemory {
            written: Mutex::new(HashMap::new()),
            progress,
        }
    }

    /// The status to compute the next one from: the cached object's, or the
    /// one written last when the cache does not show it yet.
    pub(crate) fn base(&self, uid: &str, cached: S) -> S {
        let mut m = self.written.lock().expect("status memory lock");
        match m.get(uid) {
            Some(w) if (self.progress)(w) > (self.progress)(&cached) => w.clone(),
            Some(_) => {
                // The cache caught up.
                m.remove(uid);
                cached
            }
            None => cached,
        }
    }

    /// Records a status written to the object `uid`.
    pub(crate) fn wrote(&self, uid: &str, status: S) {
        let mut m = self.written.lock().expect("status memory lock");
        if m.len() >= MAX_REMEMBERED && !m.contains_key(uid) {
            m.clear();
        }
        m.insert(uid.to_owned(), status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct S {
        end: Option<i64>,
        total: u64,
    }

    #[test]
    fn a_stale_cache_never_becomes_the_base() {
        let m = StatusMemory::new(|s: &S| s.end);
        let old = S {
            end: Some(100),
            total: 10,
        };
        let written = S {
            end: Some(200),
            total: 30,
        };
        m.wrote("u", written.clone());
        // The cache still shows the old status (its watch is broken).
        assert_eq!(m.base("u", old.clone()), written);
        assert_eq!(m.base("u", old), written);
        // Other objects are not affected.
        let other = S {
            end: Some(5),
            total: 1,
        };
        assert_eq!(m.base("v", other.clone()), other);
        // The cache caught up: it is the base again, and the memory is freed.
        let newer = S {
            end: Some(200),
            total: 30,
        };
        assert_eq!(m.base("u", newer.clone()), newer);
        assert!(m.written.lock().unwrap().is_empty());
    }
}
