//! `flowlens-bench datapath`: what observing a pod's traffic costs, side by
//! side with the other ways to get per-flow counters, in one interleaved run.
//!
//! Two pods on one simulated node (routed veths). Arms, in a fresh random
//! order every round, each set up, settled and torn down (teardown checked
//! with `bpftool net`, `bpftool prog` and `nft list ruleset`):
//! - `nothing`: no program, rule or conntrack hook at all;
//! - `tc-floor`: a TC program that only counts into a per-CPU array, on the
//!   same hooks as the agent's (the floor of any eBPF observer);
//! - `nftables`: per-flow counters in a dynamic set keyed by the 5-tuple,
//!   on the veths' netdev ingress and egress hooks;
//! - `conntrack`: connection tracking with `nf_conntrack_acct=1`;
//! - `flowlens`: the agent, both pods traced;
//! - `flowlens-10k`: the same plus 10,000 block rules (200 Enforce rules x
//!   50 peer addresses, on both pods and directions, none matching);
//! - `enforce-only`: the 10,000 rules on pods no observation traces (the
//!   packets are decided, not counted);
//! - `audit`: both pods traced and an Audit rule that matches the
//!   benchmark's traffic (every packet is counted against the rule).
//!
//! Per arm and round: a TCP stream (Gbit/s), 64-byte UDP at full rate
//! (packets/s received) and at a fixed 70% of the `nothing` rate (CPU
//! nanoseconds per packet from `/proc/stat`, receiver drops). Each is a
//! ratio to `nothing` of the same round; the summary is the median with a
//! bootstrap 95% interval.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flowlens_api::{
    flow_policy::{PolicyMode, Protocol},
    node_agent_config::{Direction, NodeAgentConfigSpec},
};
use flowlens_e2e::{
    agent::{Agent, cleanup_pins},
    config::SpecBuilder,
    process::Proc,
    resources::{busy_cpu_ns, process_cpu_ns, process_status_kb},
    stats::{Rng, median, median_with_ci},
    tc_floor::TcFloor,
    topology::Topology,
};

use super::arg;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Arm {
    Nothing,
    TcFloor,
    Nftables,
    Conntrack,
    Flowlens,
    FlowlensRules,
    EnforceOnly,
    Audit,
}

const ARMS: [Arm; 8] = [
    Arm::Nothing,
    Arm::TcFloor,
    Arm::Nftables,
    Arm::Conntrack,
    Arm::Flowlens,
    Arm::FlowlensRules,
    Arm::EnforceOnly,
    Arm::Audit,
];

/// The arms `--arms` names (comma-separated), in [`ARMS`]' order, "nothing"
/// first whether named or not (every ratio is to it); all when `list` is
/// empty.
fn parse_arms(list: &str) -> Result<Vec<Arm>, String> {
    if list.is_empty() {
        return Ok(ARMS.to_vec());
    }
    let mut named = vec![Arm::Nothing];
    for name in list.split(',').map(str::trim) {
        let arm = ARMS.into_iter().find(|a| a.name() == name).ok_or_else(|| {
            let known: Vec<&str> = ARMS.iter().map(|a| a.name()).collect();
            format!("no arm {name:?}; the arms are {}", known.join(", "))
        })?;
        named.push(arm);
    }
    Ok(ARMS.into_iter().filter(|a| named.contains(a)).collect())
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Nothing => "nothing",
            Arm::TcFloor => "tc-floor",
            Arm::Nftables => "nftables",
            Arm::Conntrack => "conntrack",
            Arm::Flowlens => "flowlens",
            Arm::FlowlensRules => "flowlens-10k",
            Arm::EnforceOnly => "enforce-only",
            Arm::Audit => "audit",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Arm::Nothing => "nothing attached",
            Arm::TcFloor => "minimal TC program (per-CPU count)",
            Arm::Nftables => "nftables per-flow counters (dynamic set)",
            Arm::Conntrack => "conntrack with nf_conntrack_acct=1",
            Arm::Flowlens => "Flowlens observe",
            Arm::FlowlensRules => "Flowlens observe + 10,000 block rules",
            Arm::EnforceOnly => "Flowlens 10,000 block rules, not observed",
            Arm::Audit => "Flowlens observe + an Audit rule matching the traffic",
        }
    }

    /// Whether the arm runs the Flowlens agent.
    fn is_agent(self) -> bool {
        matches!(
            self,
            Arm::Flowlens | Arm::FlowlensRules | Arm::EnforceOnly | Arm::Audit
        )
    }

    /// Whether the arm runs eBPF programs (profiled with `bpf_stats`).
    fn is_ebpf(self) -> bool {
        self == Arm::TcFloor || self.is_agent()
    }
}

/// One arm's figures in one round.
#[derive(Clone, Copy, Default)]
struct Sample {
    tcp_bps: f64,
    udp_pps: f64,
    udp_fixed_pps: f64,
    udp_fixed_drop: f64,
    cpu_ns_per_packet: f64,
    /// The agent's own CPU over the round's runs, in % of one core.
    agent_cpu_pct: f64,
    agent_rss_mb: f64,
}

/// The netdev table with per-flow counters (IPv4 and IPv6 5-tuples) on the
/// ingress and egress hooks of `ifaces`.
fn nftables_flow_counters(ifaces: &[String]) -> String {
    let devices = ifaces.join(", ");
    let mut s = String::from("table netdev flowlens_bench {\n");
    for (set, key) in [
        (
            "flows4",
            "ip saddr . ip daddr . meta l4proto . th sport . th dport",
        ),
        (
            "flows6",
            "ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport",
        ),
    ] {
        let _ = writeln!(
            s,
            "  set {set} {{ typeof {key}; size 262144; flags dynamic; counter; }}"
        );
    }
    for hook in ["ingress", "egress"] {
        let _ = writeln!(
            s,
            "  chain {hook} {{ type filter hook {hook} devices = {{ {devices} }} priority 0;\n    \
             update @flows4 {{ ip saddr . ip daddr . meta l4proto . th sport . th dport }}\n    \
             update @flows6 {{ ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport }}\n  }}"
        );
    }
    s.push_str("}\n");
    s
}

/// Conntrack in the node's namespace: a forward-hook rule on the connection
/// state makes every forwarded packet go through it.
const CONNTRACK_RULESET: &str = "table inet flowlens_bench_ct {\n  \
    chain forward { type filter hook forward priority 0; ct state established,related accept; }\n}\n";

struct Bench<'a> {
    topo: &'a Topology,
    node: usize,
    ifaces: Vec<String>,
    configs: Configs,
    agent: Option<Agent>,
    floor: Option<TcFloor>,
}

impl Bench<'_> {
    fn node_output(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .topo
            .node_cmd(self.node, program, args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nft(&self, ruleset: &str) {
        let mut child = self
            .topo
            .node_cmd(self.node, "nft", &["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft -f:\n{ruleset}");
    }

    fn enter(&mut self, arm: Arm) {
        match arm {
            Arm::Nothing => {}
            Arm::TcFloor => {
                self.floor = Some(
                    TcFloor::attach(&self.topo.nodes[self.node].netns, &self.ifaces)
                        .expect("attaching the TC floor program"),
                );
            }
            Arm::Nftables => self.nft(&nftables_flow_counters(&self.ifaces)),
            Arm::Conntrack => {
                self.nft(CONNTRACK_RULESET);
                // The accounting extension is added to connections created
                // after this (the table loaded nf_conntrack).
                self.node_output("sysctl", &["-qw", "net.netfilter.nf_conntrack_acct=1"]);
                let _ = self.topo.node_cmd(self.node, "conntrack", &["-F"]).output();
            }
            Arm::Flowlens | Arm::FlowlensRules | Arm::EnforceOnly | Arm::Audit => {
                let spec = match arm {
                    Arm::Flowlens => &self.configs.observe,
                    Arm::FlowlensRules => &self.configs.observe_rules,
                    Arm::EnforceOnly => &self.configs.rules,
                    _ => &self.configs.audit,
                };
                let agent = Agent::standalone(self.topo, self.node, spec, &[]);
                // Interfaces are reconciled every 2 s.
                let attached = flowlens_e2e::process::wait_for(Duration::from_secs(10), || {
                    agent
                        .dump()
                        .filter(|d| d.endpoints.attached >= 2)
                        .map(|_| ())
                });
                assert!(attached.is_some(), "the agent attached to both pods");
                self.agent = Some(agent);
            }
        }
        // Settle: let the first packets' table inserts and any attach-time
        // work finish before measuring.
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Checks that the arm did what it claims (its counters moved), then
    /// removes it.
    fn leave(&mut self, arm: Arm) {
        match arm {
            Arm::Nothing => {}
            Arm::TcFloor => {
                let floor = self.floor.take().unwrap();
                let counted = floor.packets().expect("reading the floor counter");
                assert!(counted > 0, "the TC floor program counted nothing");
            }
            Arm::Nftables => {
                let set = self.node_output(
                    "nft",
                    &["list", "set", "netdev", "flowlens_bench", "flows4"],
                );
                assert!(
                    set.contains("counter packets"),
                    "nftables counted no flow:\n{set}"
                );
                self.node_output("nft", &["delete", "table", "netdev", "flowlens_bench"]);
            }
            Arm::Conntrack => {
                let flows = self.node_output("conntrack", &["-L"]);
                assert!(
                    flows.contains("packets="),
                    "conntrack accounted no connection:\n{flows}"
                );
                self.node_output("nft", &["delete", "table", "inet", "flowlens_bench_ct"]);
                self.node_output("sysctl", &["-qw", "net.netfilter.nf_conntrack_acct=0"]);
                let _ = self.topo.node_cmd(self.node, "conntrack", &["-F"]).output();
            }
            Arm::Flowlens | Arm::FlowlensRules | Arm::EnforceOnly | Arm::Audit => {
                let agent = self.agent.take().unwrap();
                let attached = agent.dump().map(|d| d.endpoints.attached).unwrap_or(0);
                assert!(attached > 0, "the agent lost its interfaces");
                drop(agent);
                if let Err(e) = cleanup_pins(&self.topo.bpffs_root(self.node)) {
                    panic!("flowlens-agent cleanup: {e}");
                }
            }
        }
        self.assert_clean();
    }

    /// Nothing of any arm is left: no program on the pod interfaces, no
    /// global Flowlens hook, no nftables rule, conntrack accounting off.
    /// Programs are freed a moment after their last reference goes: waits
    /// up to 10 s.
    fn assert_clean(&self) {
        let mut last = String::new();
        let clean =
            flowlens_e2e::process::wait_for(Duration::from_secs(10), || match self.leftover() {
                None => Some(()),
                Some(what) => {
                    last = what;
                    None
                }
            });
        assert!(clean.is_some(), "{last}");
    }

    /// What an arm left behind, if anything.
    fn leftover(&self) -> Option<String> {
        let net = self.node_output("bpftool", &["net", "show"]);
        for iface in &self.ifaces {
            if net.lines().any(|l| l.contains(iface.as_str())) {
                return Some(format!("a program is still attached to {iface}:\n{net}"));
            }
        }
        let progs = Command::new("bpftool")
            .args(["prog", "show"])
            .output()
            .expect("bpftool prog show");
        let progs = String::from_utf8_lossy(&progs.stdout);
        if let Some(l) = progs
            .lines()
            .find(|l| l.contains(" name fl_") || l.contains(" name bench_tc_floor"))
        {
            return Some(format!(
                "an eBPF program is still loaded ({l}): another Flowlens agent on this machine? \
                 Its global hooks would run in every arm; stop it (just cluster-down) and rerun"
            ));
        }
        let rules = self.node_output("nft", &["list", "ruleset"]);
        if !rules.trim().is_empty() {
            return Some(format!("nftables rules left:\n{rules}"));
        }
        let acct = self
            .topo
            .node_cmd(
                self.node,
                "sysctl",
                &["-n", "net.netfilter.nf_conntrack_acct"],
            )
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "1")
            .unwrap_or(false);
        acct.then(|| "conntrack accounting still on".to_owned())
    }

    fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.proc.pid())
    }
}

/// What one iperf3 run measured.
struct Run {
    bits_per_second: f64,
    /// Datagrams the server received per second (UDP).
    received_pps: f64,
    /// Datagrams the server counted, received or lost.
    datagrams: f64,
    lost: f64,
}

/// iperf3 from pod `client` to pod `server`: TCP, or 64-byte UDP at
/// `udp_rate_pps` (0: as fast as it can).
fn iperf3(topo: &Topology, server: usize, client: usize, udp: Option<f64>, seconds: u32) -> Run {
    // Sender (and the forwarding softirqs it runs) on CPU 0, receiver on
    // CPU 1: the same placement in every arm.
    let _srv = Proc::spawn(
        "iperf3-server",
        topo.pod_cmd(server, "iperf3", &["-s", "-1", "-p", "5201", "-A", "1"]),
        None,
    );
    std::thread::sleep(Duration::from_millis(300));
    let ip = topo.pods[server].ip4.to_string();
    let secs = seconds.to_string();
    let mut args = vec![
        "-c",
        ip.as_str(),
        "-p",
        "5201",
        "-t",
        secs.as_str(),
        "-J",
        "-A",
        "0",
    ];
    let rate;
    if let Some(pps) = udp {
        rate = format!("{}", (pps * 64.0 * 8.0) as u64);
        args.extend(["-u", "-l", "64", "-b", rate.as_str()]);
    }
    let out = topo.pod_output(client, "iperf3", &args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    if udp.is_some() {
        let s = &v["end"]["sum"];
        let datagrams = s["packets"].as_f64().unwrap_or(0.0);
        let lost = s["lost_packets"].as_f64().unwrap_or(0.0);
        Run {
            bits_per_second: s["bits_per_second"].as_f64().unwrap_or(0.0),
            received_pps: (datagrams - lost) / s["seconds"].as_f64().unwrap_or(1.0),
            datagrams,
            lost,
        }
    } else {
        Run {
            bits_per_second: v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0),
            received_pps: 0.0,
            datagrams: 0.0,
            lost: 0.0,
        }
    }
}

/// The agent configs of the Flowlens arms.
struct Configs {
    /// Both pods traced.
    observe: NodeAgentConfigSpec,
    /// Both pods traced, with 10,000 block rules.
    observe_rules: NodeAgentConfigSpec,
    /// The 10,000 block rules alone.
    rules: NodeAgentConfigSpec,
    /// Both pods traced, an Audit rule matching the client's traffic.
    audit: NodeAgentConfigSpec,
}

/// The 10,000 block rules no packet of the benchmark matches (one of them
/// names the server itself, on another port, so the port tables are
/// consulted too).
fn add_block_rules(cfg: &mut SpecBuilder, a: usize, b: usize, server: &str) {
    cfg.rule(
        "unrelated",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[server],
        &[(Protocol::Tcp, 5432, 5432)],
    );
    let mut peer = 0u32;
    for (pod, direction) in [
        (a, Direction::Egress),
        (a, Direction::Ingress),
        (b, Direction::Egress),
        (b, Direction::Ingress),
    ] {
        for r in 0..50 {
            let peers: Vec<String> = (0..50)
                .map(|_| {
                    peer += 1;
                    // 100.64.0.0/10 (shared address space): no pod's.
                    format!(
                        "100.{}.{}.{}/32",
                        64 + (peer >> 16),
                        (peer >> 8) & 0xff,
                        peer & 0xff
                    )
                })
                .collect();
            let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
            cfg.rule(
                &format!("block-{r}"),
                direction,
                PolicyMode::Enforce,
                &[pod],
                &peers,
                &[(Protocol::Tcp, 1, 65535), (Protocol::Udp, 1, 65535)],
            );
        }
    }
}

fn configs(topo: &Topology, node: usize, a: usize, b: usize) -> Configs {
    let server = format!("{}/32", topo.pods[b].ip4);
    let mut cfg = SpecBuilder::new(topo, node);
    cfg.trace("obs", 5, &[a, b]);
    let observe = cfg.build();
    add_block_rules(&mut cfg, a, b, &server);
    let observe_rules = cfg.build();
    let mut cfg = SpecBuilder::new(topo, node);
    add_block_rules(&mut cfg, a, b, &server);
    let rules = cfg.build();
    let mut cfg = SpecBuilder::new(topo, node);
    cfg.trace("obs", 5, &[a, b]).rule(
        "audit-server",
        Direction::Egress,
        PolicyMode::Audit,
        &[a],
        &[&server],
        &[],
    );
    let audit = cfg.build();
    Configs {
        observe,
        observe_rules,
        rules,
        audit,
    }
}

pub fn run(args: &[String]) {
    let rounds: usize = arg(args, "--rounds", 5);
    let seconds: u32 = arg(args, "--seconds", 3);
    let json = args.iter().any(|a| a == "--json");
    let arms = parse_arms(&arg(args, "--arms", String::new())).unwrap_or_else(|e| {
        eprintln!("flowlens-bench: --arms: {e}");
        std::process::exit(2);
    });
    let seed: u64 = arg(
        args,
        "--seed",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut rng = Rng::new(seed);

    let mut topo = Topology::new();
    let n = topo.add_node("bench", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let mut bench = Bench {
        topo: &topo,
        node: n,
        ifaces: vec![topo.pods[a].host_if.clone(), topo.pods[b].host_if.clone()],
        configs: configs(&topo, n, a, b),
        agent: None,
        floor: None,
    };
    bench.assert_clean();
    if args.iter().any(|a| a == "--profile-only") {
        let profile = profile(&mut bench, &arms, &topo, a, b, seconds);
        drop(bench);
        let rows = print_profile(&profile);
        if json {
            println!(
                "{{\"bench\":\"datapath\",\"seconds\":{seconds},\"programs\":[{}]}}",
                rows.join(",")
            );
        }
        return;
    }

    // The fixed UDP rate: 70% of what the node forwards with nothing attached.
    let mut calib: Vec<f64> = (0..2)
        .map(|_| iperf3(&topo, b, a, Some(0.0), seconds).received_pps)
        .collect();
    let fixed_pps = 0.7 * median(&mut calib);
    eprintln!("fixed UDP rate: {fixed_pps:.0} pps (70% of nothing attached)");

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); arms.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..arms.len()).collect();
        rng.shuffle(&mut order);
        for &i in &order {
            let arm = arms[i];
            bench.enter(arm);
            let agent = bench.agent_pid();
            let started = Instant::now();
            let agent_cpu0 = agent.map(process_cpu_ns).unwrap_or(0.0);
            let tcp = iperf3(&topo, b, a, None, seconds);
            let udp = iperf3(&topo, b, a, Some(0.0), seconds);
            let cpu0 = busy_cpu_ns();
            let fixed = iperf3(&topo, b, a, Some(fixed_pps), seconds);
            let cpu1 = busy_cpu_ns();
            let s = Sample {
                tcp_bps: tcp.bits_per_second,
                udp_pps: udp.received_pps,
                udp_fixed_pps: fixed.received_pps,
                udp_fixed_drop: if fixed.datagrams > 0.0 {
                    fixed.lost / fixed.datagrams
                } else {
                    0.0
                },
                cpu_ns_per_packet: (cpu1 - cpu0) / fixed.datagrams.max(1.0),
                agent_cpu_pct: agent.map_or(0.0, |p| {
                    100.0 * (process_cpu_ns(p) - agent_cpu0) / started.elapsed().as_nanos() as f64
                }),
                agent_rss_mb: agent.map_or(0.0, |p| process_status_kb(p, "VmRSS") as f64 / 1024.0),
            };
            bench.leave(arm);
            eprintln!(
                "round {} {:>13}: TCP {:6.2} Gbit/s  UDP {:8.0} pps  at {:.0} pps: {:8.0} pps, {:.2}% lost, {:5.0} CPU-ns/packet{}",
                round + 1,
                arm.name(),
                s.tcp_bps / 1e9,
                s.udp_pps,
                fixed_pps,
                s.udp_fixed_pps,
                100.0 * s.udp_fixed_drop,
                s.cpu_ns_per_packet,
                if agent.is_some() {
                    format!(
                        "  agent {:.1}% CPU {:.0} MB",
                        s.agent_cpu_pct, s.agent_rss_mb
                    )
                } else {
                    String::new()
                }
            );
            samples[i].push(s);
        }
    }
    let profile = profile(&mut bench, &arms, &topo, a, b, seconds);
    drop(bench);

    report(
        &arms, &samples, &profile, rounds, seconds, fixed_pps, seed, json, &mut rng,
    );
}

/// Run time per invocation of every program of an arm (`bpf_stats`).
struct ProgramCost {
    arm: Arm,
    program: String,
    runs: u64,
    ns_per_run: f64,
}

/// `bpftool prog show -j` -> (name, run_time_ns, run_cnt) of the programs
/// of the benchmark (the agent's `fl_*` and the floor).
pub(super) fn program_stats() -> Vec<(String, u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool prog show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            (name.starts_with("fl_") || name == "bench_tc_floor").then(|| {
                (
                    name.to_owned(),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                )
            })
        })
        .collect()
}

/// After the rounds: each eBPF arm once more with the kernel's per-program
/// statistics on (they cost a clock read per run, so not during the
/// rounds), the TCP and UDP runs, and the time per program run.
fn profile(
    bench: &mut Bench,
    arms: &[Arm],
    topo: &Topology,
    a: usize,
    b: usize,
    seconds: u32,
) -> Vec<ProgramCost> {
    let was = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let mut costs = Vec::new();
    for &arm in arms.iter().filter(|a| a.is_ebpf()) {
        bench.enter(arm);
        let before = program_stats();
        iperf3(topo, b, a, None, seconds);
        iperf3(topo, b, a, Some(0.0), seconds);
        let after = program_stats();
        bench.leave(arm);
        for (name, ns, runs) in after {
            let (ns0, runs0) = before
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or((0, 0), |(_, ns, r)| (*ns, *r));
            let runs = runs.saturating_sub(runs0);
            if runs > 0 {
                costs.push(ProgramCost {
                    arm,
                    program: name,
                    runs,
                    ns_per_run: ns.saturating_sub(ns0) as f64 / runs as f64,
                });
            }
        }
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", was.trim());
    costs
}

/// Per round, `field` of arm `i` over `field` of `nothing` (arm 0).
fn ratios(samples: &[Vec<Sample>], i: usize, field: fn(&Sample) -> f64) -> Vec<f64> {
    samples[i]
        .iter()
        .zip(&samples[0])
        .map(|(s, base)| field(s) / field(base))
        .collect()
}

fn med(samples: &[Sample], field: fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(field).collect();
    median(&mut v)
}

#[allow(clippy::too_many_arguments)]
fn report(
    arms: &[Arm],
    samples: &[Vec<Sample>],
    profile: &[ProgramCost],
    rounds: usize,
    seconds: u32,
    fixed_pps: f64,
    seed: u64,
    json: bool,
    rng: &mut Rng,
) {
    const RESAMPLES: usize = 2000;
    println!(
        "| arm | TCP Gbit/s | TCP ratio [95% CI] | UDP 64 B pps | UDP ratio [95% CI] | CPU-ns/packet at {fixed_pps:.0} pps | CPU ratio | lost at fixed rate |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut arms_json = Vec::new();
    for (i, arm) in arms.iter().enumerate() {
        let (tr, tlo, thi) = median_with_ci(&ratios(samples, i, |s| s.tcp_bps), RESAMPLES, rng);
        let (ur, ulo, uhi) = median_with_ci(&ratios(samples, i, |s| s.udp_pps), RESAMPLES, rng);
        let (cr, clo, chi) =
            median_with_ci(&ratios(samples, i, |s| s.cpu_ns_per_packet), RESAMPLES, rng);
        let s = &samples[i];
        let ns = med(s, |s| s.cpu_ns_per_packet);
        println!(
            "| {} | {:.2} | {tr:.3} [{tlo:.3}, {thi:.3}] | {:.0} | {ur:.3} [{ulo:.3}, {uhi:.3}] | {ns:.0} | {cr:.3} [{clo:.3}, {chi:.3}] | {:.2}% |",
            arm.describe(),
            med(s, |s| s.tcp_bps) / 1e9,
            med(s, |s| s.udp_pps),
            100.0 * med(s, |s| s.udp_fixed_drop),
        );
        let mut o = format!(
            "\"{}\":{{\"tcp_ratio\":{tr:.4},\"tcp_ratio_ci\":[{tlo:.4},{thi:.4}],\"udp_ratio\":{ur:.4},\"udp_ratio_ci\":[{ulo:.4},{uhi:.4}],\"cpu_ns_per_packet\":{ns:.1},\"cpu_ratio\":{cr:.4},\"tcp_gbps\":{:.3},\"udp_pps\":{:.0},\"udp_fixed_lost\":{:.5}",
            arm.name(),
            med(s, |s| s.tcp_bps) / 1e9,
            med(s, |s| s.udp_pps),
            med(s, |s| s.udp_fixed_drop),
        );
        if arm.is_agent() {
            let cpu = med(s, |s| s.agent_cpu_pct);
            let rss = s.iter().map(|s| s.agent_rss_mb).fold(0.0, f64::max);
            println!(
                "|   agent under load | {cpu:.1}% of a core (median) | peak RSS {rss:.0} MB | | | | | |"
            );
            let _ = write!(o, ",\"agent_cpu_pct\":{cpu:.2},\"agent_rss_mb\":{rss:.1}");
        }
        o.push('}');
        arms_json.push(o);
    }
    println!();
    let programs_json = print_profile(profile);
    let line = format!(
        "{{\"bench\":\"datapath\",\"rounds\":{rounds},\"seconds\":{seconds},\"seed\":{seed},\"fixed_udp_pps\":{fixed_pps:.0},\"arms\":{{{}}},\"programs\":[{}]}}",
        arms_json.join(","),
        programs_json.join(",")
    );
    if json {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
}

/// The `bpf_stats` table; returns its rows as JSON objects.
fn print_profile(profile: &[ProgramCost]) -> Vec<String> {
    println!("| arm | program | runs (TCP + UDP run) | ns per run (bpf_stats) |");
    println!("|---|---|---|---|");
    let mut programs_json = Vec::new();
    for c in profile {
        println!(
            "| {} | {} | {} | {:.0} |",
            c.arm.name(),
            c.program,
            c.runs,
            c.ns_per_run
        );
        programs_json.push(format!(
            "{{\"arm\":\"{}\",\"program\":\"{}\",\"runs\":{},\"ns_per_run\":{:.1}}}",
            c.arm.name(),
            c.program,
            c.runs,
            c.ns_per_run
        ));
    }
    programs_json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nftables_counts_both_families_on_both_hooks_of_every_interface() {
        let r = nftables_flow_counters(&["fla".into(), "flb".into()]);
        assert!(r.contains("set flows4 { typeof ip saddr . ip daddr"));
        assert!(r.contains("set flows6 { typeof ip6 saddr"));
        assert_eq!(r.matches("devices = { fla, flb }").count(), 2);
        assert!(r.contains("hook ingress") && r.contains("hook egress"));
        assert_eq!(r.matches("update @flows4").count(), 2);
        assert_eq!(r.matches("update @flows6").count(), 2);
    }

    #[test]
    fn named_arms_run_with_nothing_first_in_the_table_order() {
        assert_eq!(parse_arms("").unwrap(), ARMS.to_vec());
        assert_eq!(
            parse_arms("flowlens-10k, flowlens").unwrap(),
            vec![Arm::Nothing, Arm::Flowlens, Arm::FlowlensRules]
        );
        assert_eq!(
            parse_arms("nothing,audit").unwrap(),
            vec![Arm::Nothing, Arm::Audit]
        );
        let e = parse_arms("flowlens,cilium").unwrap_err();
        assert!(e.contains("\"cilium\"") && e.contains("tc-floor"), "{e}");
    }
}
