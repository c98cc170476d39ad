//! Where the agent's config comes from: its own `NodeAgentConfig` on the API
//! server, or a YAML file (standalone mode). A bad or missing config never
//! stops the agent: the last good one stays in force.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, SystemTime},
};

use flowlens_api::node_agent_config::{NodeAgentConfig, NodeAgentConfigSpec};
use futures::StreamExt;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use crate::control::Event;

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

/// Watches the node's `NodeAgentConfig` (shared reflector-free watch: one
/// object, selected by name) and sends each version.
pub async fn watch_api(client: Client, node: String, tx: mpsc::Sender<Event>) {
    let api: Api<NodeAgentConfig> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        // Fail-static: a deleted or unreadable config changes nothing in
        // the kernel (removing Flowlens from a node is `flowlens-agent
        // cleanup`'s job); it is reported until a config arrives.
        let event = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let uid = o.metadata.uid.clone().unwrap_or_default();
                if tx.send(Event::ConfigUnavailable(None)).is_err()
                    || tx.send(Event::ConfigObject(uid)).is_err()
                {
                    return;
                }
                Event::Config(Arc::new(o.spec))
            }
            Ok(watcher::Event::Delete(_)) => Event::ConfigUnavailable(Some(format!(
                "NodeAgentConfig {node} was deleted (the operator recreates it; to remove Flowlens from the node, run `flowlens-agent cleanup`)"
            ))),
            Ok(_) => continue,
            Err(e) => {
                warn!(error = %e, "watching NodeAgentConfig (retrying with backoff)");
                Event::ConfigUnavailable(Some(format!("cannot watch NodeAgentConfig {node}: {e}")))
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
