//! Where the agent's config comes from: its own `NodeAgentConfig` on the API
//! server with the `AddressSetSlice`s of the sets it names, or a YAML file
//! (standalone mode, sets inline). A bad or missing config never
//! stops the agent: the last good one stays in force.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, SystemTime},
};

use flowlens_api::{
    AddressSetSlice,
    address_set_slice::SET_LABEL,
    node_agent_config::{NodeAgentConfig, NodeAgentConfigSpec},
};
use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use crate::{address_sets, control::Event};

/// Parses a config file: a whole `NodeAgentConfig` object (as written by the
/// operator, or `kubectl get -o yaml`) or just its spec. Errors name the
/// field (`rules[0]: missing field `policy``).
pub fn parse_config(text: &str) -> Result<NodeAgentConfigSpec, String> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let (spec, prefix) = match value.get("spec") {
        Some(spec) if value.get("kind").is_some() => (spec.clone(), "spec."),
        _ => (value, ""),
    };
    serde_path_to_error::deserialize(spec)
        .map_err(|e| format!("{prefix}{}: {}", e.path(), e.inner()))
}

/// Polls `path` and sends its config whenever the file changes.
pub fn watch_file(path: PathBuf, tx: mpsc::Sender<Event>) {
    std::thread::Builder::new()
        .name("config-file".into())
        .spawn(move || {
            let mut last: Option<(SystemTime, u64)> = None;
            loop {
                let stamp = std::fs::metadata(&path)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
                if stamp != last {
                    last = stamp;
                    let event = match stamp.map(|_| read_file(&path)) {
                        Some(Ok(spec)) => {
                            let _ = tx.send(Event::ConfigUnavailable(None));
                            Event::Config(Arc::new(spec))
                        }
                        Some(Err(why)) => Event::ConfigUnavailable(Some(why)),
                        None => Event::ConfigUnavailable(Some(format!(
                            "the config file {} is missing",
                            path.display()
                        ))),
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
        .expect("spawning the config-file thread");
}

/// The config in `path`, or why it cannot be used.
fn read_file(path: &Path) -> Result<NodeAgentConfigSpec, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let spec =
        parse_config(&text).map_err(|e| format!("invalid config file {}: {e}", path.display()))?;
    info!(path = %path.display(), revision = %spec.revision, "read config file");
    Ok(spec)
}

/// Watches the node's `NodeAgentConfig` (one object, selected by name) and
/// the `AddressSetSlice`s of the sets it names (one watch, selected by
/// label, started again when the names change), and sends the config with
/// its sets joined in, whenever either changes and every set is read.
pub async fn watch_api(client: Client, node: String, tx: mpsc::Sender<Event>) {
    let api: Api<NodeAgentConfig> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut configs = watcher(api, cfg).default_backoff().boxed();
    let mut sets = SetWatch::default();
    let mut config: Option<NodeAgentConfigSpec> = None;
    let mut sent: Option<Arc<NodeAgentConfigSpec>> = None;
    // A problem is reported (and is cleared by the next good config).
    let mut reported = false;
    loop {
        let event = tokio::select! {
            event = configs.next() => match event {
                // Fail-static: a deleted or unreadable config changes nothing
                // in the kernel (removing Flowlens from a node is
                // `flowlens-agent cleanup`'s job); it is reported until a
                // config arrives.
                Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => {
                    let uid = o.metadata.uid.clone().unwrap_or_default();
                    if tx.send(Event::ConfigObject(uid)).is_err() {
                        return;
                    }
                    sets.name(&client, o.spec.sets_in_slices());
                    config = Some(o.spec);
                    None
                }
                Some(Ok(watcher::Event::Delete(_))) => Some(format!(
                    "NodeAgentConfig {node} was deleted (the operator recreates it; to remove Flowlens from the node, run `flowlens-agent cleanup`)"
                )),
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    warn!(error = %e, "watching NodeAgentConfig (retrying with backoff)");
                    Some(format!("cannot watch NodeAgentConfig {node}: {e}"))
                }
                None => return,
            },
            problem = sets.next() => match problem {
                None => sets.absorb_burst().await,
                problem => problem,
            },
        };
        let event = match (event, &config) {
            (Some(problem), _) => Event::ConfigUnavailable(Some(problem)),
            (None, None) => continue,
            (None, Some(_)) if !sets.synced() => continue,
            (None, Some(spec)) => match address_sets::join(spec, sets.slices.values()) {
                Ok(joined) if sent.as_deref() == Some(&joined) => {
                    if !std::mem::take(&mut reported) {
                        continue;
                    }
                    Event::ConfigUnavailable(None)
                }
                Ok(joined) => {
                    reported = false;
                    if tx.send(Event::ConfigUnavailable(None)).is_err() {
                        return;
                    }
                    let joined = Arc::new(joined);
                    sent = Some(joined.clone());
                    Event::Config(joined)
                }
                Err(address_sets::Unjoined::Missing(missing)) => {
                    Event::ConfigUnavailable(Some(format!(
                        "revision {} names address sets without AddressSetSlices: {} (the operator writes them before the config; waiting for them)",
                        spec.revision,
                        missing.join(", ")
                    )))
                }
                Err(address_sets::Unjoined::Bad(bad)) => {
                    warn!(revision = %spec.revision, slices = %bad.join("; "), "AddressSetSlices cannot be used; the config in force stays");
                    Event::ConfigUnavailable(Some(format!(
                        "revision {} is held: {} (only the operator writes AddressSetSlices; it rewrites a slice changed by hand)",
                        spec.revision,
                        bad.join("; ")
                    )))
                }
            },
        };
        reported |= matches!(event, Event::ConfigUnavailable(Some(_)));
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// A burst of slice events ends after this long without one (see
/// `SetWatch::absorb_burst`)...
const ABSORB_QUIET: Duration = Duration::from_millis(20);
/// ...or after this long in all: a steady stream still joins twice a second.
const ABSORB_FOR: Duration = Duration::from_millis(500);

/// The watch of the slices of the sets the config names.
#[derive(Default)]
struct SetWatch {
    /// The sets watched.
    named: BTreeSet<String>,
    stream: Option<BoxStream<'static, watcher::Result<watcher::Event<AddressSetSlice>>>>,
    /// Slices by object name, as of the last complete list.
    slices: BTreeMap<String, address_sets::ReadSlice>,
    /// A list in progress (the watch's first, or a relist).
    listing: Option<BTreeMap<String, address_sets::ReadSlice>>,
    listed: bool,
}

impl SetWatch {
    /// Watches the slices of `named`, starting over when they changed.
    fn name(&mut self, client: &Client, named: BTreeSet<String>) {
        if named == self.named && (self.stream.is_some() || self.listed) {
            return;
        }
        self.slices.clear();
        self.listing = None;
        self.listed = named.is_empty();
        self.stream = (!named.is_empty()).then(|| {
            let cfg = watcher::Config::default().labels(&address_sets::selector(&named));
            watcher(Api::<AddressSetSlice>::all(client.clone()), cfg)
                .default_backoff()
                .boxed()
        });
        self.named = named;
    }

    /// Every named set's slices have been listed once.
    fn synced(&self) -> bool {
        self.listed
    }

    /// Takes in the events that follow within `ABSORB_QUIET` of each other
    /// (for at most `ABSORB_FOR` in all): a rollout rewrites many slices at
    /// once, and one join and one config serve them all. Not merely the
    /// events already decoded: the watch's connection is read by another
    /// task, which needs a moment to hand over what arrived during the last
    /// join. A problem stops it.
    async fn absorb_burst(&mut self) -> Option<String> {
        let until = tokio::time::Instant::now() + ABSORB_FOR;
        loop {
            let quiet =
                ABSORB_QUIET.min(until.saturating_duration_since(tokio::time::Instant::now()));
            if quiet.is_zero() {
                return None;
            }
            match tokio::time::timeout(quiet, self.next()).await {
                Ok(None) => {}
                Ok(problem) => return problem,
                Err(_) => return None,
            }
        }
    }

    /// Takes in the next event of the watch: `None` when the slices changed
    /// (or nothing needs saying), else a problem to report.
    async fn next(&mut self) -> Option<String> {
        let Some(stream) = &mut self.stream else {
            return std::future::pending().await;
        };
        match stream.next().await {
            Some(Ok(watcher::Event::Init)) => self.listing = Some(BTreeMap::new()),
            Some(Ok(watcher::Event::InitApply(s))) => {
                if let Some(l) = &mut self.listing {
                    l.insert(s.name_any(), read(s));
                }
            }
            Some(Ok(watcher::Event::InitDone)) => {
                self.slices = self.listing.take().unwrap_or_default();
                self.listed = true;
            }
            Some(Ok(watcher::Event::Apply(s))) => {
                self.slices.insert(s.name_any(), read(s));
            }
            Some(Ok(watcher::Event::Delete(s))) => {
                self.slices.remove(&s.name_any());
            }
            Some(Err(e)) => {
                warn!(error = %e, "watching AddressSetSlices (retrying with backoff)");
                return Some(format!("cannot watch AddressSetSlices: {e}"));
            }
            None => self.stream = None,
        }
        None
    }
}

/// A slice as read, checked against the label that selected it.
fn read(s: AddressSetSlice) -> address_sets::ReadSlice {
    let name = s.name_any();
    let label = s.labels().get(SET_LABEL).cloned();
    address_sets::read_slice(&name, label.as_deref(), s.spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, address: &str) -> AddressSetSlice {
        let mut s = AddressSetSlice::new(
            name,
            flowlens_api::address_set_slice::AddressSetSliceSpec {
                address_set: "as-x".into(),
                addresses: vec![address.into()],
                ..Default::default()
            },
        );
        s.metadata.labels = Some([(SET_LABEL.to_owned(), "as-x".to_owned())].into());
        s
    }

    #[tokio::test]
    async fn a_burst_of_slice_events_is_taken_in_at_once() {
        use futures::stream;
        let ready = vec![
            Ok(watcher::Event::Apply(slice("as-x-0-0", "10.0.0.1"))),
            Ok(watcher::Event::Apply(slice("as-x-0-0", "10.0.0.2"))),
            Ok(watcher::Event::Apply(slice("as-x-0-1", "10.0.0.3"))),
            Ok(watcher::Event::Delete(slice("as-x-0-1", "10.0.0.3"))),
            Ok(watcher::Event::Apply(slice("as-x-0-2", "10.0.0.4"))),
        ];
        let mut w = SetWatch {
            named: ["as-x".to_owned()].into(),
            // Then nothing more for now: the watch stays open.
            stream: Some(stream::iter(ready).chain(stream::pending()).boxed()),
            listed: true,
            ..Default::default()
        };
        assert_eq!(w.absorb_burst().await, None);
        let addresses: Vec<(&str, &str)> = w
            .slices
            .iter()
            .map(|(name, s)| (name.as_str(), s.as_ref().unwrap().addresses[0].as_str()))
            .collect();
        assert_eq!(
            addresses,
            [("as-x-0-0", "10.0.0.2"), ("as-x-0-2", "10.0.0.4")],
            "every waiting event taken in, in order"
        );
        assert!(w.stream.is_some(), "the watch stays open");

        // Events still arriving a few milliseconds apart belong to the burst.
        let trickle: Vec<_> = (0..5)
            .map(|i| {
                Ok(watcher::Event::Apply(slice(
                    &format!("as-x-1-{i}"),
                    "10.0.1.1",
                )))
            })
            .collect();
        let mut w = SetWatch {
            named: ["as-x".to_owned()].into(),
            stream: Some(
                stream::iter(trickle)
                    .then(|e| async {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        e
                    })
                    .chain(stream::pending())
                    .boxed(),
            ),
            listed: true,
            ..Default::default()
        };
        assert_eq!(w.absorb_burst().await, None);
        assert_eq!(w.slices.len(), 5, "every event of the trickle taken in");

        // A watch error stops taking in and is reported; what came before
        // it is kept.
        let mut w = SetWatch {
            named: ["as-x".to_owned()].into(),
            stream: Some(
                stream::iter(vec![
                    Ok(watcher::Event::Apply(slice("as-x-0-0", "10.0.0.5"))),
                    Err(watcher::Error::NoResourceVersion),
                    Ok(watcher::Event::Apply(slice("as-x-0-0", "10.0.0.6"))),
                ])
                .chain(stream::pending())
                .boxed(),
            ),
            listed: true,
            ..Default::default()
        };
        let problem = w.absorb_burst().await.expect("the error is reported");
        assert!(
            problem.contains("cannot watch AddressSetSlices"),
            "{problem}"
        );
        assert_eq!(
            w.slices["as-x-0-0"].as_ref().unwrap().addresses,
            ["10.0.0.5"]
        );
    }

    #[test]
    fn accepts_objects_and_bare_specs() {
        let obj = "apiVersion: flowlens.dev/v1alpha1\nkind: NodeAgentConfig\nmetadata: {name: n}\nspec: {nodeName: n, revision: r1}\n";
        assert_eq!(parse_config(obj).unwrap().revision, "r1");
        assert_eq!(
            parse_config("nodeName: n\nrevision: r2\n")
                .unwrap()
                .revision,
            "r2"
        );
        let err = parse_config("nodeName: n\nrevision: r\nrules: [{id: x}]\n").unwrap_err();
        assert!(err.starts_with("rules[0]: missing field `policy`"), "{err}");
    }

    #[test]
    fn the_sample_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/nodeagentconfig-example.yaml"
        ))
        .unwrap();
        let spec = parse_config(&text).unwrap();
        assert_eq!(spec.rules.len(), 1);
        assert!(
            crate::tables::compile(&spec, &[], crate::tables::Capacity::UNLIMITED)
                .problems
                .is_empty()
        );
    }
}
