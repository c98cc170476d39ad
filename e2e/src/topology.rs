//! Simulated nodes and pods on one kernel, with real network namespaces.
//!
//! ```text
//!             root netns ── f<n>gw 10.250.0.1 ─┐ (optional, for agents to reach the API server)
//!                                               │
//!   pods ─ veth ─ node netns ─ uplink ─ fabric netns (router; delay line between zones)
//! ```
//!
//! Pods sit behind their node on routed veths (a /32 and /128 per pod, host
//! routes on the node, gateway 169.254.1.1 / fe80::1 on the host side), the
//! layout of Calico-like CNIs. Each pod's processes run in the pod's own
//! cgroup (`.../<node>/pod<uid>`), as kubelet lays them out.
//!
//! Every test takes a *slot* (a file lock) that gives it its own names and
//! addresses: 10.(100+n).<node>.<pod> and fd00:f1:<n>:<node>::<pod>.

use std::{
    fs::{File, OpenOptions},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::process::{Proc, require_root, run, run_quiet, workspace_bin};

/// The root-namespace address agents use to reach the API server and the
/// operator in end-to-end tests (a SAN of the local API server certificate).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const GATEWAY_PEER: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);

/// The pods' IPv4 gateway: the node's side of every pod veth.
const POD_GATEWAY4: &str = "169.254.1.1";
/// The IPv6 gateway of pods (on the node) and of nodes (in the fabric).
const GATEWAY6: &str = "fe80::1";
/// Host part of the fabric router's address, 10.<slot octet>.0.<this>.
const FABRIC_ROUTER_HOST: u8 = 254;

const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// An exclusive slot of names and addresses for one test.
pub(crate) struct Slot {
    pub n: u8,
    _lock: File,
}

impl Slot {
    pub(crate) fn acquire() -> Slot {
        let dir = Path::new("/run/flowlens-e2e-slots");
        std::fs::create_dir_all(dir).unwrap();
        for n in 0..100u8 {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("slot-{n}")))
                .unwrap();
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Slot { n, _lock: f };
            }
        }
        panic!("no free test slot under /run/flowlens-e2e-slots");
    }

    /// Second octet of this slot's IPv4 addresses.
    pub(crate) fn octet(&self) -> u8 {
        100 + self.n
    }
}

pub struct Node {
    pub name: String,
    pub zone: Option<String>,
    pub index: u8,
    pub netns: String,
    /// The cgroup under which this node's pods live (the agent's `--cgroup-root`).
    pub cgroup: PathBuf,
    pub uplink4: Ipv4Addr,
    pub uplink6: Ipv6Addr,
    pub pods: u8,
}

pub struct Pod {
    pub name: String,
    pub node: usize,
    pub netns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub uid: String,
    pub cgroup: PathBuf,
    /// The host-side interface (in the node's namespace).
    pub host_if: String,
}

pub struct Topology {
    pub(crate) slot: Slot,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    fabric: Option<String>,
    root_link: Option<String>,
    delay_lines: Vec<Proc>,
    cgroup_base: PathBuf,
    /// Where test artifacts (logs, configs) go.
    pub work_dir: PathBuf,
}

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

/// Moves the calling thread into network namespace `netns` (for a thread
/// that sends or serves traffic as a pod).
pub fn enter_netns(netns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(netns_path(netns))?;
    // SAFETY: a valid namespace descriptor; only this thread moves.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ],
    );
}

fn ip(ns: &str, args: &[&str]) {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    run("ip", &a);
}

/// The cgroup v2 mount of this host.
pub(crate) fn cgroup2_mount() -> PathBuf {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
        .expect("no cgroup v2 mount found")
}

/// Makes sure the root mount namespace has bpffs at /sys/fs/bpf.
pub(crate) fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split_whitespace();
            f.next();
            f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
        });
    if !mounted {
        std::fs::create_dir_all("/sys/fs/bpf").unwrap();
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
}

/// The pod's side of its veth: its addresses, and default routes via the
/// node's link-local gateways.
fn configure_pod_side(netns: &str, ip4: Ipv4Addr, ip6: Ipv6Addr) {
    ip(netns, &["link", "set", "eth0", "up"]);
    ip(netns, &["addr", "add", &format!("{ip4}/32"), "dev", "eth0"]);
    ip(
        netns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip(
        netns,
        &["route", "add", POD_GATEWAY4, "dev", "eth0", "scope", "link"],
    );
    ip(
        netns,
        &[
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY4,
            "dev",
            "eth0",
        ],
    );
    ip(
        netns,
        &[
            "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
        ],
    );
}

/// The node's side of a pod's veth (`host_if`): the gateway addresses, and
/// host routes to the pod.
fn configure_pod_host_side(node_ns: &str, host_if: &str, ip4: Ipv4Addr, ip6: Ipv6Addr) {
    ip(
        node_ns,
        &["addr", "add", &format!("{POD_GATEWAY4}/32"), "dev", host_if],
    );
    ip(
        node_ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY6}/64"),
            "dev",
            host_if,
            "nodad",
        ],
    );
    ip(node_ns, &["link", "set", host_if, "up"]);
    ip(
        node_ns,
        &["route", "add", &format!("{ip4}/32"), "dev", host_if],
    );
    ip(
        node_ns,
        &["-6", "route", "add", &format!("{ip6}/128"), "dev", host_if],
    );
}

/// The node's side of its uplink: its addresses, and default routes via
/// the fabric router.
fn configure_uplink_node_side(nd: &Node, router4: Ipv4Addr) {
    ip(&nd.netns, &["link", "set", "uplink", "up"]);
    ip(
        &nd.netns,
        &[
            "addr",
            "add",
            &format!("{}/32", nd.uplink4),
            "dev",
            "uplink",
        ],
    );
    ip(
        &nd.netns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{}/128", nd.uplink6),
            "dev",
            "uplink",
            "nodad",
        ],
    );
    ip(
        &nd.netns,
        &[
            "route",
            "add",
            &router4.to_string(),
            "dev",
            "uplink",
            "scope",
            "link",
        ],
    );
    ip(
        &nd.netns,
        &[
            "route",
            "add",
            "default",
            "via",
            &router4.to_string(),
            "dev",
            "uplink",
        ],
    );
    ip(
        &nd.netns,
        &[
            "-6", "route", "add", "default", "via", GATEWAY6, "dev", "uplink",
        ],
    );
}

/// The fabric's side of node `nd`'s uplink (`up`): the router addresses and
/// a host route to the node.
fn configure_uplink_fabric_side(fabric: &str, up: &str, nd: &Node, router4: Ipv4Addr) {
    ip(fabric, &["link", "set", up, "up"]);
    ip(
        fabric,
        &["addr", "add", &format!("{router4}/32"), "dev", up],
    );
    ip(
        fabric,
        &[
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY6}/64"),
            "dev",
            up,
            "nodad",
        ],
    );
    ip(
        fabric,
        &["route", "add", &format!("{}/32", nd.uplink4), "dev", up],
    );
}

/// Routes node `nd`'s pod prefixes (`pods4`, `pods6`) in the fabric via
/// the node's uplink `up`; and its uplink's IPv6 address.
fn route_node_pods(fabric: &str, up: &str, nd: &Node, pods4: &str, pods6: &str) {
    ip(
        fabric,
        &[
            "route",
            "add",
            pods4,
            "via",
            &nd.uplink4.to_string(),
            "dev",
            up,
        ],
    );
    ip(
        fabric,
        &[
            "-6",
            "route",
            "add",
            &format!("{}/128", nd.uplink6),
            "dev",
            up,
        ],
    );
    ip(
        fabric,
        &[
            "-6",
            "route",
            "add",
            pods6,
            "via",
            &nd.uplink6.to_string(),
            "dev",
            up,
        ],
    );
}

fn uid_for(slot: u8, node: u8, pod: u8) -> String {
    format!(
        "00000000-0000-4000-8000-{:04x}{:04x}{:04x}",
        slot, node, pod
    )
}

impl Topology {
    pub fn new() -> Topology {
        require_root();
        ensure_bpffs();
        let slot = Slot::acquire();
        let base = cgroup2_mount().join(format!("flowlens-e2e-f{}", slot.n));
        let work_dir = std::env::temp_dir().join(format!("flowlens-e2e-f{}", slot.n));
        let t = Topology {
            slot,
            nodes: Vec::new(),
            pods: Vec::new(),
            fabric: None,
            root_link: None,
            delay_lines: Vec::new(),
            cgroup_base: base,
            work_dir,
        };
        t.cleanup_leftovers();
        std::fs::create_dir_all(&t.cgroup_base).unwrap();
        std::fs::create_dir_all(&t.work_dir).unwrap();
        t
    }

    fn prefix(&self) -> String {
        format!("f{}", self.slot.n)
    }

    /// Removes what a crashed earlier test of this slot may have left.
    fn cleanup_leftovers(&self) {
        let prefix = format!("{}-", self.prefix());
        if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    run_quiet("ip", &["netns", "del", &name]);
                }
            }
        }
        run_quiet("ip", &["link", "del", &format!("{}gw", self.prefix())]);
        remove_cgroup_tree(&self.cgroup_base);
        let _ = std::fs::remove_dir_all(self.bpffs_base());
        self.prune_old_logs();
    }

    /// Removes what earlier tests of this slot left in its work directory
    /// (agent logs, Prometheus configs, kept for a post-mortem) once it is
    /// a day old: the slot is this test's alone, and nothing of a test
    /// still running is that old.
    fn prune_old_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.work_dir) else {
            return;
        };
        let day = std::time::Duration::from_secs(24 * 3600);
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
            if old {
                let path = e.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }

    /// Where agents of this test pin (one directory per node).
    pub(crate) fn bpffs_base(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/flowlens-e2e-{}", self.prefix()))
    }

    pub fn bpffs_root(&self, node: usize) -> PathBuf {
        self.bpffs_base().join(&self.nodes[node].name)
    }

    /// A node's agent spool (`--state-dir`): kept across agent restarts,
    /// removed with the topology.
    pub fn state_dir(&self, node: usize) -> PathBuf {
        self.work_dir
            .join(format!("{}-state", self.nodes[node].name))
    }

    /// Adds a node: a network namespace that routes for its pods.
    pub fn add_node(&mut self, name: &str, zone: Option<&str>) -> usize {
        let index = self.nodes.len() as u8 + 1;
        let netns = format!("{}-{name}", self.prefix());
        run("ip", &["netns", "add", &netns]);
        ip(&netns, &["link", "set", "lo", "up"]);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            sysctl(&netns, k, v);
        }
        let cgroup = self.cgroup_base.join(name);
        std::fs::create_dir_all(&cgroup).unwrap();
        let o = self.slot.octet();
        self.nodes.push(Node {
            name: name.to_owned(),
            zone: zone.map(str::to_owned),
            index,
            netns,
            cgroup,
            uplink4: Ipv4Addr::new(10, o, 0, index),
            uplink6: format!("fd00:f1:{}::{}", self.slot.n, index)
                .parse()
                .unwrap(),
            pods: 0,
        });
        if let Some(fabric) = self.fabric.clone() {
            self.link_node_to_fabric(&fabric, self.nodes.len() - 1);
        }
        self.nodes.len() - 1
    }

    /// Adds a pod behind `node`.
    pub fn add_pod(&mut self, node: usize, name: &str) -> usize {
        let o = self.slot.octet();
        let n = self.slot.n;
        let (k, p, node_ns, node_name) = {
            let nd = &mut self.nodes[node];
            nd.pods += 1;
            (nd.index, nd.pods, nd.netns.clone(), nd.name.clone())
        };
        let netns = format!("{}-{node_name}-{name}", self.prefix());
        let host_if = format!("f{n}n{k}p{p}");
        let ip4 = Ipv4Addr::new(10, o, k, p);
        let ip6: Ipv6Addr = format!("fd00:f1:{n}:{k}::{p}").parse().unwrap();
        run("ip", &["netns", "add", &netns]);
        ip(&netns, &["link", "set", "lo", "up"]);
        run(
            "ip",
            &[
                "link", "add", &host_if, "netns", &node_ns, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ],
        );
        configure_pod_side(&netns, ip4, ip6);
        configure_pod_host_side(&node_ns, &host_if, ip4, ip6);
        let uid = uid_for(n, k, p);
        let cgroup = self.nodes[node].cgroup.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            netns,
            ip4,
            ip6,
            uid,
            cgroup,
            host_if,
        });
        self.pods.len() - 1
    }

    /// Creates the fabric: a router namespace linking every node (existing
    /// and future). Needed for more than one node.
    pub fn add_fabric(&mut self) {
        if self.fabric.is_some() {
            return;
        }
        let fabric = format!("{}-fabric", self.prefix());
        run("ip", &["netns", "add", &fabric]);
        ip(&fabric, &["link", "set", "lo", "up"]);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            sysctl(&fabric, k, v);
        }
        self.fabric = Some(fabric.clone());
        for i in 0..self.nodes.len() {
            self.link_node_to_fabric(&fabric, i);
        }
    }

    fn link_node_to_fabric(&mut self, fabric: &str, node: usize) {
        let o = self.slot.octet();
        let n = self.slot.n;
        let nd = &self.nodes[node];
        let k = nd.index;
        let up = format!("f{n}up{k}");
        run(
            "ip",
            &[
                "link", "add", "uplink", "netns", &nd.netns, "type", "veth", "peer", "name", &up,
                "netns", fabric,
            ],
        );
        let router4 = Ipv4Addr::new(10, o, 0, FABRIC_ROUTER_HOST);
        configure_uplink_node_side(nd, router4);
        configure_uplink_fabric_side(fabric, &up, nd, router4);
        route_node_pods(
            fabric,
            &up,
            nd,
            &format!("10.{o}.{k}.0/24"),
            &format!("fd00:f1:{n}:{k}::/64"),
        );
    }

    /// Links the fabric to the root namespace at [`GATEWAY`], so that node
    /// processes (agents) reach servers of the test process and the API
    /// server proxy.
    pub(crate) fn connect_root(&mut self) {
        self.add_fabric();
        let fabric = self.fabric.clone().unwrap();
        let root_if = format!("{}gw", self.prefix());
        run(
            "ip",
            &[
                "link", "add", &root_if, "type", "veth", "peer", "name", "gw", "netns", &fabric,
            ],
        );
        run(
            "ip",
            &["addr", "add", &format!("{GATEWAY}/32"), "dev", &root_if],
        );
        run("ip", &["link", "set", &root_if, "up"]);
        run(
            "ip",
            &[
                "route",
                "add",
                &format!("{GATEWAY_PEER}/32"),
                "dev",
                &root_if,
            ],
        );
        run(
            "ip",
            &[
                "route",
                "add",
                &format!("10.{}.0.0/16", self.slot.octet()),
                "via",
                &GATEWAY_PEER.to_string(),
                "dev",
                &root_if,
            ],
        );
        run_quiet(
            "sysctl",
            &["-q", "-w", &format!("net.ipv4.conf.{root_if}.rp_filter=0")],
        );
        ip(&fabric, &["link", "set", "gw", "up"]);
        ip(
            &fabric,
            &["addr", "add", &format!("{GATEWAY_PEER}/32"), "dev", "gw"],
        );
        ip(
            &fabric,
            &["route", "add", &format!("{GATEWAY}/32"), "dev", "gw"],
        );
        self.root_link = Some(root_if);
    }

    /// Delays every packet between pods of `zone_a` and pods of `zone_b` by
    /// `one_way` in each direction (a round trip gains twice that), with a
    /// TUN delay line in the fabric.
    pub fn add_delay(&mut self, zone_a: &str, zone_b: &str, one_way: Duration) {
        self.add_fabric();
        let fabric = self.fabric.clone().unwrap();
        let dev = format!("dl{}", self.delay_lines.len());
        let table = (100 + self.delay_lines.len()).to_string();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&fabric)))
            .arg(workspace_bin("flowlens-delay-line"))
            .args([
                "--dev",
                &dev,
                "--delay-us",
                &one_way.as_micros().to_string(),
            ]);
        let log = self.work_dir.join(format!("{dev}.log"));
        self.delay_lines.push(Proc::spawn(&dev, cmd, Some(log)));
        let exists = crate::process::wait_for(Duration::from_secs(5), || {
            Command::new("ip")
                .args(["-n", &fabric, "link", "show", &dev])
                .output()
                .ok()
                .filter(|o| o.status.success())
        });
        assert!(exists.is_some(), "the delay line did not create {dev}");
        ip(&fabric, &["link", "set", &dev, "up"]);
        sysctl(&fabric, &format!("net.ipv4.conf.{dev}.rp_filter"), "0");
        ip(
            &fabric,
            &["route", "add", "default", "dev", &dev, "table", &table],
        );
        ip(
            &fabric,
            &[
                "-6", "route", "add", "default", "dev", &dev, "table", &table,
            ],
        );
        let (o, n) = (self.slot.octet(), self.slot.n);
        let zone = |z: &str| {
            self.nodes
                .iter()
                .filter(|nd| nd.zone.as_deref() == Some(z))
                .map(|nd| nd.index)
                .collect::<Vec<_>>()
        };
        let (a, b) = (zone(zone_a), zone(zone_b));
        for (from, to) in [(&a, &b), (&b, &a)] {
            for &k in from.iter() {
                for &k2 in to.iter() {
                    let iif = format!("f{n}up{k}");
                    ip(
                        &fabric,
                        &[
                            "rule",
                            "add",
                            "iif",
                            &iif,
                            "to",
                            &format!("10.{o}.{k2}.0/24"),
                            "table",
                            &table,
                        ],
                    );
                    ip(
                        &fabric,
                        &[
                            "-6",
                            "rule",
                            "add",
                            "iif",
                            &iif,
                            "to",
                            &format!("fd00:f1:{n}:{k2}::/64"),
                            "table",
                            &table,
                        ],
                    );
                }
            }
        }
    }

    /// A command in a pod: in the pod's network namespace and cgroup.
    pub fn pod_cmd(
        &self,
        pod: usize,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> Command {
        let p = &self.pods[pod];
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec ip netns exec {} \"$@\"",
                p.cgroup.display(),
                p.netns
            ))
            .arg("sh")
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs a command in a pod to completion.
    pub fn pod_output(
        &self,
        pod: usize,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> std::process::Output {
        self.pod_cmd(pod, program, args)
            .output()
            .expect("running a command in a pod")
    }

    /// A command in a node's network namespace (not its mount namespace, so
    /// /sys/fs/bpf and the cgroup hierarchy stay those of the host).
    pub fn node_cmd(
        &self,
        node: usize,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.nodes[node].netns)))
            .arg(program)
            .args(args);
        cmd
    }

    /// Gives a pod the UID the API server assigned to its Pod object: its
    /// cgroup becomes `pod<uid>`, where agents look for it. Call it before
    /// running anything in the pod.
    pub(crate) fn set_pod_uid(&mut self, pod: usize, uid: &str) {
        let p = &mut self.pods[pod];
        let to = p.cgroup.with_file_name(format!("pod{uid}"));
        // cgroup v2 has no rename: replace the (still empty) cgroup.
        std::fs::remove_dir(&p.cgroup)
            .and_then(|_| std::fs::create_dir(&to))
            .unwrap_or_else(|e| {
                panic!(
                    "replacing {} with {}: {e}",
                    p.cgroup.display(),
                    to.display()
                )
            });
        p.cgroup = to;
        p.uid = uid.to_owned();
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    // Kill whatever still runs inside, then remove leaves first.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    std::thread::sleep(Duration::from_millis(50));
    fn rm(d: &Path) {
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    rm(&e.path());
                }
            }
        }
        for _ in 0..20 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    rm(dir);
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.delay_lines.clear();
        remove_cgroup_tree(&self.cgroup_base);
        for p in &self.pods {
            run_quiet("ip", &["netns", "del", &p.netns]);
        }
        for n in &self.nodes {
            run_quiet("ip", &["netns", "del", &n.netns]);
        }
        if let Some(f) = &self.fabric {
            run_quiet("ip", &["netns", "del", f]);
        }
        if let Some(l) = &self.root_link {
            run_quiet("ip", &["link", "del", l]);
        }
        let _ = std::fs::remove_dir_all(self.bpffs_base());
        for node in 0..self.nodes.len() {
            let _ = std::fs::remove_dir_all(self.state_dir(node));
        }
    }
}
