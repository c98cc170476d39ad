//! The real cluster (`just cluster`) as a user drives it: `kubectl` with the
//! admin kubeconfig, for applying manifests, exec into pods and reading the
//! pods' own interface counters. Status is read through the API
//! ([`crate::cluster::client`]).

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::cluster::{kubeconfig_path, repo_root};

/// The image with iperf3, nc, curl, ip and bash (`hack/images.sh`).
pub const TESTBOX: &str = "flowlens-testbox:dev";

/// `kubectl <args>` against the test cluster: stdout, or the error with
/// stderr.
pub fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    kubectl_stdin(args, None)
}

/// `kubectl <args>` with `stdin` piped in (`apply -f -`).
pub fn kubectl_stdin(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .env("KUBECACHEDIR", repo_root().join(".flowlens/kubecache"))
        .current_dir(repo_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl apply -f -` of a YAML text.
pub fn apply(yaml: &str) -> anyhow::Result<()> {
    kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).map(|_| ())
}

/// `kubectl -n <ns> rollout status <what>` (a Deployment or DaemonSet, e.g.
/// `ds/flowlens-agent`), up to two minutes.
pub fn rollout_status(ns: &str, what: &str) -> anyhow::Result<()> {
    kubectl(&["-n", ns, "rollout", "status", what, "--timeout=120s"]).map(|_| ())
}

/// Runs the `kubectl-flowlens` plugin binary with `kubeconfig`:
/// (success, stdout, stderr).
pub fn kubectl_flowlens(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(crate::process::workspace_bin("kubectl-flowlens"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("running kubectl-flowlens");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl exec` in the first container of a pod.
pub fn exec(ns: &str, pod: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["-n", ns, "exec", pod, "--"];
    args.extend_from_slice(cmd);
    kubectl(&args)
}

/// Fails, with the command that fixes it, unless the real cluster runs with
/// Flowlens installed.
pub fn require_cluster() {
    let nodes = kubectl(&["get", "nodes", "-o", "name"]).unwrap_or_default();
    let installed = kubectl(&[
        "-n",
        "flowlens-system",
        "get",
        "ds",
        "flowlens-agent",
        "-o",
        "name",
    ]);
    if nodes.trim().is_empty() || installed.is_err() {
        panic!(
            "no real cluster with Flowlens at {}: run `just cluster cluster-install` \
             (or `just cluster-test`, which also runs these tests)",
            kubeconfig_path().display()
        );
    }
}

/// A namespace for one test, removed (with everything in it) on drop.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(prefix: &str, labels: &[(&str, &str)]) -> anyhow::Result<TestNamespace> {
        let name = crate::cluster::unique_name(prefix);
        let labels: String = labels
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect();
        apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    flowlens.dev/test: cluster\n{labels}"
        ))?;
        Ok(TestNamespace { name })
    }

    /// A one-replica Deployment of the test image running `command`, and
    /// its pod once it runs: (pod name, pod IP).
    pub fn deploy(&self, app: &str, command: &str) -> anyhow::Result<(String, String)> {
        self.deploy_with_ports(app, command, &[])
    }

    /// Like [`Self::deploy`], with named container ports (for Services'
    /// named target ports).
    pub fn deploy_with_ports(
        &self,
        app: &str,
        command: &str,
        ports: &[(&str, u16)],
    ) -> anyhow::Result<(String, String)> {
        let ports: String = if ports.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = ports
                .iter()
                .map(|(name, port)| format!("{{name: {name}, containerPort: {port}}}"))
                .collect();
            format!("        ports: [{}]\n", list.join(", "))
        };
        apply(&format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {app}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {app}}}}}
  template:
    metadata: {{labels: {{app: {app}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {TESTBOX}
        command: [bash, -c, {command:?}]
{ports}"#,
            ns = self.name
        ))?;
        rollout_status(&self.name, &format!("deploy/{app}"))?;
        let out = kubectl(&[
            "-n",
            &self.name,
            "get",
            "pod",
            "-l",
            &format!("app={app}"),
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[0].metadata.name} {.items[0].status.podIP}",
        ])?;
        let mut it = out.split_whitespace();
        match (it.next(), it.next()) {
            (Some(pod), Some(ip)) => Ok((pod.to_owned(), ip.to_owned())),
            _ => anyhow::bail!("deployment {app} has no running pod with an IP: {out:?}"),
        }
    }

    /// A pod's interface counters (its own eth0: the kernel's count of what
    /// it sent and received, Ethernet headers included).
    pub fn eth0(&self, pod: &str) -> anyhow::Result<InterfaceCounters> {
        let mut args = vec!["cat"];
        args.extend(InterfaceCounters::ETH0_FILES);
        InterfaceCounters::parse(&exec(&self.name, pod, &args)?)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A pod interface's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct InterfaceCounters {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

impl InterfaceCounters {
    /// The files of eth0's counters, in the order [`Self::parse`] reads.
    pub const ETH0_FILES: [&str; 4] = [
        "/sys/class/net/eth0/statistics/tx_bytes",
        "/sys/class/net/eth0/statistics/rx_bytes",
        "/sys/class/net/eth0/statistics/tx_packets",
        "/sys/class/net/eth0/statistics/rx_packets",
    ];

    /// The output of `cat` of [`Self::ETH0_FILES`].
    pub fn parse(out: &str) -> anyhow::Result<InterfaceCounters> {
        let v: Vec<u64> = out
            .split_whitespace()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(v.len() == 4, "unexpected counters {out:?}");
        Ok(InterfaceCounters {
            tx_bytes: v[0],
            rx_bytes: v[1],
            tx_packets: v[2],
            rx_packets: v[3],
        })
    }

    /// What flowed between two reads, both directions.
    pub fn since(&self, before: &InterfaceCounters) -> InterfaceCounters {
        InterfaceCounters {
            tx_bytes: self.tx_bytes - before.tx_bytes,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            tx_packets: self.tx_packets - before.tx_packets,
            rx_packets: self.rx_packets - before.rx_packets,
        }
    }
}

/// Polls `f` every `every` until it returns `Some`, or fails after `timeout`
/// (blocking: for kubectl-driven checks).
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}
