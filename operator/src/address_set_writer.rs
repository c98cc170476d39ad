//! Writes the `AddressSetSlice`s of the address sets that configs name
//! (server-side apply) when their content changed, and deletes the slices
//! no config names any more.
//!
//! Order, for agents that read a config and then its sets: slices are
//! written before the configs that name them, and deleted only after the
//! configs no longer do. A set cut differently (a slice split in two) has
//! its new slices written before the old one is deleted, so an agent sees
//! every address at every moment.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use flowlens_api::{AddressSetSlice, address_set_slice::SET_LABEL};
use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use tracing::{debug, warn};

use crate::{
    compile::{BuiltSet, content_hash, slices::Slice},
    config_writer::{FIELD_MANAGER, WRITE_CONCURRENCY},
    context::Context,
    error::Result,
};

const CONTROLLER: &str = "address-set-slice";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=flowlens-operator";

/// A slice as written: its set and content hash.
#[derive(Clone, PartialEq)]
struct WrittenSlice {
    set: String,
    hash: String,
}

/// Slice name -> the slice as written.
type Written = Arc<Mutex<HashMap<String, WrittenSlice>>>;

/// Node name -> the address sets its config on the API server names.
pub(crate) type NamedOnServer = BTreeMap<String, BTreeSet<String>>;

/// The slices as written.
pub(crate) struct SliceWriter {
    api: Api<AddressSetSlice>,
    written: Written,
}

impl SliceWriter {
    /// Lists the slices already written (by an earlier operator), so that
    /// only what changed since is written again.
    pub(crate) async fn load(ctx: &Context) -> Result<Self> {
        let api: Api<AddressSetSlice> = Api::all(ctx.client.clone());
        let listed = api.list(&ListParams::default().labels(MANAGED_BY)).await?;
        let written: Written = Arc::new(Mutex::new(
            listed
                .items
                .iter()
                .map(|s| (s.name_any(), as_written(s)))
                .collect(),
        ));
        Ok(Self { api, written })
    }

    /// Forgets the slices someone else changed, relabelled or deleted, so
    /// that the next pass writes them again (agents would miss their
    /// addresses). Runs until the process ends.
    pub(crate) fn watch_foreign(&self, ctx: Arc<Context>) -> impl Future<Output = ()> + use<> {
        let written = self.written.clone();
        let cfg = watcher::Config::default().labels(MANAGED_BY);
        watcher(self.api.clone(), cfg)
            .backoff(crate::feed::watch_backoff())
            .for_each(move |ev| {
                let foreign = match ev {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        let mut w = written.lock().expect("written lock");
                        let name = s.name_any();
                        let labelled = s.labels().get(SET_LABEL) == Some(&s.spec.address_set);
                        let seen = as_written(&s);
                        w.get(&name).is_some_and(|x| *x != seen || !labelled)
                            && w.remove(&name).is_some()
                    }
                    Ok(watcher::Event::Delete(s)) => written
                        .lock()
                        .expect("written lock")
                        .remove(&s.name_any())
                        .is_some(),
                    _ => false,
                };
                if foreign {
                    ctx.changed.notify_one();
                }
                futures::future::ready(())
            })
    }

    /// Writes the slices of `sets` that are not written as they are; true
    /// when every write succeeded.
    pub(crate) async fn write_changed(
        &self,
        ctx: &Context,
        sets: &BTreeMap<String, Arc<BuiltSet>>,
    ) -> bool {
        let todo: Vec<&Slice> = {
            let written = self.written.lock().expect("written lock");
            sets.values()
                .flat_map(|s| s.slices.iter())
                .filter(|s| written.get(&s.name).is_none_or(|w| w.hash != s.hash))
                .collect()
        };
        let api = &self.api;
        let done: Vec<(&Slice, bool)> = futures::stream::iter(todo)
            .map(|s| async move {
                let ok = match write(api, s).await {
                    Ok(()) => {
                        ctx.metrics.wrote("addresssetslices", "apply");
                        true
                    }
                    Err(e) => {
                        warn!(slice = %s.name, error = %e, "cannot write AddressSetSlice; will retry");
                        ctx.metrics.failed(CONTROLLER, e.metric_label());
                        false
                    }
                };
                ctx.metrics.reconciling(CONTROLLER);
                (s, ok)
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        let mut written = self.written.lock().expect("written lock");
        let mut all_ok = true;
        for (s, ok) in done {
            if ok {
                written.insert(
                    s.name.clone(),
                    WrittenSlice {
                        set: s.spec.address_set.clone(),
                        hash: s.hash.clone(),
                    },
                );
            }
            all_ok &= ok;
        }
        all_ok
    }

    /// Deletes the written slices that are not slices of `sets`: those of a
    /// set of `sets` (cut anew), and those of other sets once no config on
    /// the API server names them (`on_server`: a config whose rewrite
    /// failed still names its old sets, and its agent still reads them);
    /// true when every delete succeeded.
    pub(crate) async fn delete_unnamed(
        &self,
        ctx: &Context,
        sets: &BTreeMap<String, Arc<BuiltSet>>,
        on_server: &NamedOnServer,
    ) -> bool {
        let stale = {
            let written = self.written.lock().expect("written lock");
            deletable(&written, sets, on_server)
        };
        let mut all_ok = true;
        for name in stale {
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => ctx.metrics.wrote("addresssetslices", "delete"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    warn!(slice = %name, error = %e, "cannot delete AddressSetSlice; will retry");
                    ctx.metrics
                        .failed(CONTROLLER, crate::error::Error::from(e).metric_label());
                    all_ok = false;
                    continue;
                }
            }
            debug!(slice = %name, "deleted AddressSetSlice no config names");
            self.written.lock().expect("written lock").remove(&name);
        }
        all_ok
    }
}

/// The written slices to delete: not slices of `sets`, and either of a set
/// of `sets` (cut anew: its new slices are written) or of a set no config
/// on the server names any more.
fn deletable(
    written: &HashMap<String, WrittenSlice>,
    sets: &BTreeMap<String, Arc<BuiltSet>>,
    on_server: &NamedOnServer,
) -> Vec<String> {
    let wanted: std::collections::HashSet<&str> = sets
        .values()
        .flat_map(|s| s.slices.iter().map(|x| x.name.as_str()))
        .collect();
    let mut stale = written
        .iter()
        .filter(|(n, _)| !wanted.contains(n.as_str()))
        .peekable();
    if stale.peek().is_none() {
        return Vec::new();
    }
    let still_named: BTreeSet<&str> = on_server.values().flatten().map(String::as_str).collect();
    stale
        .filter(|(_, w)| sets.contains_key(&w.set) || !still_named.contains(w.set.as_str()))
        .map(|(n, _)| n.clone())
        .collect()
}

/// A slice read from the API server, as if written (its set, its content
/// hash as the compiler gives it; see `compile::slices`).
fn as_written(s: &AddressSetSlice) -> WrittenSlice {
    WrittenSlice {
        set: s.spec.address_set.clone(),
        hash: content_hash(&serde_json::to_vec(&s.spec).expect("a slice serializes")),
    }
}

async fn write(api: &Api<AddressSetSlice>, s: &Slice) -> Result<()> {
    let obj = serde_json::json!({
        "apiVersion": "flowlens.dev/v1alpha1",
        "kind": "AddressSetSlice",
        "metadata": {
            "name": s.name,
            "labels": {
                "app.kubernetes.io/managed-by": "flowlens-operator",
                SET_LABEL: s.spec.address_set,
            },
        },
        "spec": s.spec,
    });
    api.patch(
        &s.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::slices::slices;

    fn set(name: &str, n: usize) -> Arc<BuiltSet> {
        let entries: Vec<(String, flowlens_api::node_agent_config::CidrEntry)> = (0..n)
            .map(|i| {
                (
                    format!("ns/pod-{i}"),
                    flowlens_api::node_agent_config::CidrEntry {
                        cidr: format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255),
                        except: Vec::new(),
                    },
                )
            })
            .collect();
        Arc::new(BuiltSet {
            slices: slices(name, entries.iter().map(|(o, e)| (o.as_str(), e))),
        })
    }

    fn written(sets: &[&Arc<BuiltSet>]) -> HashMap<String, WrittenSlice> {
        sets.iter()
            .flat_map(|s| s.slices.iter())
            .map(|s| {
                (
                    s.name.clone(),
                    WrittenSlice {
                        set: s.spec.address_set.clone(),
                        hash: s.hash.clone(),
                    },
                )
            })
            .collect()
    }

    fn names(node: &str, sets: &[&str]) -> NamedOnServer {
        BTreeMap::from([(
            node.to_owned(),
            sets.iter().map(|s| (*s).to_owned()).collect(),
        )])
    }

    #[test]
    fn a_set_cut_anew_loses_its_old_slices_even_while_configs_name_it() {
        let big = set("as-a", 2500);
        assert!(big.slice_count() > 1);
        let small = set("as-a", 10);
        let was = written(&[&big]);
        let now = BTreeMap::from([("as-a".to_owned(), small.clone())]);
        let mut gone = deletable(&was, &now, &names("n1", &["as-a"]));
        gone.sort();
        let mut expected: Vec<String> = big
            .slices
            .iter()
            .map(|s| s.name.clone())
            .filter(|n| !small.slices.iter().any(|s| s.name == *n))
            .collect();
        expected.sort();
        assert_eq!(gone, expected);
        assert!(!gone.is_empty());
    }

    #[test]
    fn a_set_no_longer_compiled_stays_while_a_config_on_the_server_names_it() {
        let old = set("as-old", 3);
        let new = set("as-new", 3);
        let was = written(&[&old, &new]);
        let now = BTreeMap::from([("as-new".to_owned(), new)]);
        // n1's rewrite to as-new failed: its agent still reads as-old.
        assert!(deletable(&was, &now, &names("n1", &["as-old"])).is_empty());
        // Once it is rewritten, as-old goes.
        assert_eq!(
            deletable(&was, &now, &names("n1", &["as-new"])),
            old.slices
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
        );
    }
}
