//! Running a real `flowlens-agent` for a simulated node, and reading it back.

use std::{collections::BTreeMap, path::PathBuf, process::Command, time::Duration};

use flowlens_api::{
    node_agent_config::{DatapathHooks, EndpointAttachment, NodeAgentConfigSpec},
    report::{ObservationWindow, PolicyMatches},
};
use serde::Deserialize;

use crate::{
    process::{Proc, wait_for, workspace_bin},
    topology::Topology,
};

/// The parts of `flowlens-agent dump --json` the tests read.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentDump {
    #[serde(default)]
    pub live: Vec<ObservationWindow>,
    #[serde(default)]
    pub live_policies: Vec<PolicyMatches>,
    #[serde(default)]
    pub last_windows: BTreeMap<String, ObservationWindow>,
    #[serde(default)]
    pub history: Vec<ObservationWindow>,
    pub applied_revision: Option<String>,
    #[serde(default)]
    pub hooks: DatapathHooks,
    #[serde(default)]
    pub endpoints: EndpointAttachment,
    /// Policies in force (their pods' programs verified attached).
    #[serde(default)]
    pub policies: Vec<flowlens_api::node_agent_config::PolicyRef>,
    #[serde(default)]
    pub policies_not_in_force: Vec<flowlens_api::node_agent_config::PolicyNotInForce>,
    #[serde(default)]
    pub problems: Vec<serde_json::Value>,
    #[serde(default)]
    pub kernel: serde_json::Value,
}

impl AgentDump {
    /// Live matches of one policy (namespace/name).
    pub fn policy(&self, namespace: &str, name: &str) -> PolicyMatches {
        self.live_policies
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .cloned()
            .unwrap_or_default()
    }
}

/// An agent process bound to one simulated node.
pub struct Agent {
    pub proc: Proc,
    pub node: usize,
    pub config_path: PathBuf,
    pub bpffs_root: PathBuf,
    netns: String,
    args: Vec<String>,
}

/// The HTTP address agents listen on inside their node namespace.
pub(crate) const AGENT_HTTP: &str = "127.0.0.1:9990";
/// Its port.
pub const AGENT_HTTP_PORT: u16 = 9990;

impl Agent {
    /// Starts an agent in standalone mode (config from a file) for `node`.
    /// `extra` are more command-line arguments (e.g. `--rtt-hook tcp-probe`).
    pub fn standalone(
        topo: &Topology,
        node: usize,
        spec: &NodeAgentConfigSpec,
        extra: &[&str],
    ) -> Agent {
        let n = &topo.nodes[node];
        let config_path = topo.work_dir.join(format!("{}-config.yaml", n.name));
        write_config(&config_path, spec);
        let mut args = vec![
            "--config-file".to_owned(),
            config_path.display().to_string(),
            "--bpffs-root".to_owned(),
            topo.bpffs_root(node).display().to_string(),
            "--http-addr".to_owned(),
            AGENT_HTTP.to_owned(),
        ];
        if !extra.contains(&"--cgroup-root") {
            args.extend(["--cgroup-root".to_owned(), n.cgroup.display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Agent {
            proc: spawn(topo, node, &args, 0),
            node,
            config_path,
            bpffs_root: topo.bpffs_root(node),
            netns: n.netns.clone(),
            args,
        };
        agent.wait_revision(&spec.revision, Duration::from_secs(30));
        agent
    }

    /// Starts an agent that takes its config from the API server (as in a
    /// cluster): `kubeconfig` reaches the API server from the node's
    /// namespace, `token_file` holds the token it reports with.
    pub(crate) fn in_cluster(
        topo: &Topology,
        node: usize,
        kubeconfig: &std::path::Path,
        token_file: &std::path::Path,
        extra: &[&str],
    ) -> Agent {
        let n = &topo.nodes[node];
        let mut args = vec![
            "--node-name".to_owned(),
            n.name.clone(),
            "--bpffs-root".to_owned(),
            topo.bpffs_root(node).display().to_string(),
            // Every address of the node, as the DaemonSet's agent listens
            // (Prometheus scrapes it at the node's address).
            "--http-addr".to_owned(),
            format!("0.0.0.0:{AGENT_HTTP_PORT}"),
            "--cgroup-root".to_owned(),
            n.cgroup.display().to_string(),
            "--token-file".to_owned(),
            token_file.display().to_string(),
            // The node's spool: kept across restarts, as a hostPath is.
            "--state-dir".to_owned(),
            topo.state_dir(node).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Agent {
            proc: spawn_with_env(
                topo,
                node,
                &args,
                0,
                &[("KUBECONFIG", kubeconfig.as_os_str())],
            ),
            node,
            config_path: kubeconfig.to_path_buf(),
            bpffs_root: topo.bpffs_root(node),
            netns: n.netns.clone(),
            args,
        }
    }

    /// Rewrites the config file (the agent re-reads it).
    pub fn set_config(&self, spec: &NodeAgentConfigSpec) {
        write_config(&self.config_path, spec);
    }

    /// Reads `flowlens-agent dump --json`.
    pub fn dump(&self) -> Option<AgentDump> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg(workspace_bin("flowlens-agent"))
            .args(["dump", "--json", "--addr", AGENT_HTTP])
            .env("RUST_BACKTRACE", "0")
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The value of a metric of the agent (`/metrics`) summed over label
    /// sets whose line contains `filter`.
    pub fn metric_sum(&self, name: &str, filter: &str) -> f64 {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .args(["curl", "-sf", &format!("http://{AGENT_HTTP}/metrics")])
            .output()
            .expect("running curl");
        crate::metrics::sum(&String::from_utf8_lossy(&out.stdout), name, filter)
    }

    /// Waits until the agent enforces `revision`.
    pub fn wait_revision(&mut self, revision: &str, timeout: Duration) -> AgentDump {
        let got = wait_for(timeout, || {
            self.dump()
                .filter(|d| d.applied_revision.as_deref() == Some(revision))
        });
        got.unwrap_or_else(|| {
            panic!(
                "agent for node {} did not apply revision {revision} within {timeout:?}; running: {}\nlog:\n{}",
                self.node,
                self.proc.is_running(),
                self.proc.log_text()
            )
        })
    }

    /// Every completed window part of observation `uid` that started at or
    /// after `from` (unix seconds), waiting until one starts at or after
    /// `until` (so the period `[from, until)` is fully covered).
    pub fn windows(
        &self,
        uid: &str,
        from: i64,
        until: i64,
        timeout: Duration,
    ) -> Vec<ObservationWindow> {
        let d = wait_for(timeout, || {
            self.dump()
                .filter(|d| d.history.iter().any(|w| w.uid == uid && w.start >= until))
        })
        .unwrap_or_else(|| {
            panic!(
                "no window of {uid} starting at or after {until} within {timeout:?}\nlog:\n{}",
                self.proc.log_text()
            )
        });
        d.history
            .into_iter()
            .filter(|w| w.uid == uid && w.start >= from)
            .collect()
    }

    /// SIGKILL (no cleanup of any kind).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts the agent again with the same arguments.
    pub fn restart(&mut self, topo: &Topology) {
        self.proc = if self.args.iter().any(|a| a == "--node-name") {
            spawn_with_env(
                topo,
                self.node,
                &self.args,
                1,
                &[("KUBECONFIG", self.config_path.as_os_str())],
            )
        } else {
            spawn(topo, self.node, &self.args, 1)
        };
    }
}

/// `flowlens-agent cleanup` for the pins under `bpffs_root`: detaches every
/// program a (stopped) agent left and removes its maps. Its error output if
/// it failed.
pub fn cleanup_pins(bpffs_root: &std::path::Path) -> Result<(), String> {
    let out = Command::new(workspace_bin("flowlens-agent"))
        .arg("cleanup")
        .arg("--bpffs-root")
        .arg(bpffs_root)
        .output()
        .map_err(|e| format!("flowlens-agent cleanup: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn spawn(topo: &Topology, node: usize, args: &[String], run: u32) -> Proc {
    spawn_with_env(topo, node, args, run, &[])
}

fn spawn_with_env(
    topo: &Topology,
    node: usize,
    args: &[String],
    run: u32,
    env: &[(&str, &std::ffi::OsStr)],
) -> Proc {
    let n = &topo.nodes[node];
    let bin = workspace_bin("flowlens-agent");
    let str_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = topo.node_cmd(node, &bin, &str_args);
    cmd.env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "info,flowlens_agent=debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let log = topo.work_dir.join(format!("{}-agent-{run}.log", n.name));
    Proc::spawn(&format!("agent-{}", n.name), cmd, Some(log))
}

fn write_config(path: &std::path::Path, spec: &NodeAgentConfigSpec) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml::to_string(spec).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
