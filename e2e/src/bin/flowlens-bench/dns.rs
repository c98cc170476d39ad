//! `flowlens-bench dns`: what observing DNS costs. A traced pod sends
//! `--queries` DNS queries, paced at `--rate` per second (under the
//! kernel's per-CPU copy budget), to a responder in another pod, and the
//! same number of identical datagrams to port 5353, which is not copied.
//! Both arms run `--rounds` times in random order. Measured per arm:
//!
//! - the run time per packet of `fl_from_pod` and `fl_to_pod`
//!   (`bpf_stats`): the difference between the arms is the kernel's cost of
//!   copying a DNS packet to the ring buffer;
//! - the agent's CPU time (user + system, /proc) from the first query to
//!   the drain after the last, per message: the difference is what reading,
//!   parsing and matching a DNS message costs the agent;
//! - the agent's own counters: every query and answer copied, none
//!   dropped, none unreadable.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use flowlens_e2e::{
    agent::{Agent, cleanup_pins},
    config::SpecBuilder,
    resources::process_cpu_ns,
    stats::{Rng, median},
    topology::{Topology, enter_netns},
};

use super::{arg, datapath::program_stats};

/// A query for `api.example.` (A) with id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&[3, b'a', b'p', b'i', 7]);
    q.extend_from_slice(b"example");
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Answers every datagram on ports 53 and 5353 as a resolver would: the
/// query back with QR set and one A record (192.0.2.7, TTL 60).
fn responder(netns: String, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    [53u16, 5353]
        .into_iter()
        .map(|port| {
            let (netns, stop) = (netns.clone(), stop.clone());
            std::thread::spawn(move || {
                enter_netns(&netns).expect("entering the responder's network namespace");
                let s = UdpSocket::bind(("0.0.0.0", port)).expect("bind the responder");
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = s.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut a = buf[..n].to_vec();
                    if a.len() < 12 {
                        continue;
                    }
                    a[2] |= 0x80;
                    a[7] = 1;
                    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
                    let _ = s.send_to(&a, from);
                }
            })
        })
        .collect()
}

/// Sends `n` queries to `to`, `rate` per second, each awaiting its answer.
fn client(netns: &str, to: SocketAddr, n: u32, rate: u32) -> u32 {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the client's network namespace");
        let s = UdpSocket::bind("0.0.0.0:0").expect("client socket");
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let start = Instant::now();
        let mut answered = 0;
        let mut buf = [0u8; 512];
        for i in 0..n {
            let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(rate));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = s.send_to(&query(i as u16), to);
            if s.recv(&mut buf).is_ok() {
                answered += 1;
            }
        }
        answered
    })
    .join()
    .unwrap()
}

struct ArmRun {
    /// ns per run of fl_from_pod and fl_to_pod together, per packet.
    kernel_ns_per_packet: f64,
    /// Agent CPU ns per query (and its answer).
    agent_ns_per_query: f64,
}

pub fn run(args: &[String]) {
    let queries: u32 = arg(args, "--queries", 20_000);
    let rate: u32 = arg(args, "--rate", 2_000);
    let rounds: usize = arg(args, "--rounds", 3);
    let seed: u64 = arg(args, "--seed", 0);
    let json = args.iter().any(|a| a == "--json");

    let mut topo = Topology::new();
    let n = topo.add_node("bench", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let mut cfg = SpecBuilder::new(&topo, n);
    cfg.trace("obs", 5, &[a]);
    let spec = cfg.build();
    let agent = Agent::standalone(&topo, n, &spec, &["--max-drain-interval-secs", "1"]);
    let pid = agent.proc.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let responders = responder(topo.pods[b].netns.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let to = |port| SocketAddr::from((topo.pods[b].ip4, port));

    let was = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let copied =
        |agent: &Agent| agent.metric_sum("flowlens_agent_dns_messages_total", "outcome=\"copied\"");
    let mut rng = Rng::new(if seed == 0 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    } else {
        seed
    });
    let mut dns_runs = Vec::new();
    let mut plain_runs = Vec::new();
    let copied_before = copied(&agent);
    for _ in 0..rounds {
        let mut order = [53u16, 5353];
        if rng.next_u64() & 1 == 1 {
            order.swap(0, 1);
        }
        for port in order {
            let programs = |v: Vec<(String, u64, u64)>| {
                v.into_iter()
                    .filter(|(p, _, _)| p == "fl_from_pod" || p == "fl_to_pod")
                    .fold((0u64, 0u64), |(t, c), (_, ns, runs)| (t + ns, c + runs))
            };
            let (ns0, runs0) = programs(program_stats());
            let cpu0 = process_cpu_ns(pid);
            let answered = client(&topo.pods[a].netns, to(port), queries, rate);
            assert_eq!(answered, queries, "every query on port {port} answered");
            // The drain after the last query (at most a second later).
            std::thread::sleep(Duration::from_millis(1500));
            let cpu = process_cpu_ns(pid) - cpu0;
            let (ns1, runs1) = programs(program_stats());
            let r = ArmRun {
                kernel_ns_per_packet: (ns1 - ns0) as f64 / (runs1 - runs0).max(1) as f64,
                agent_ns_per_query: cpu / f64::from(queries),
            };
            if port == 53 {
                &mut dns_runs
            } else {
                &mut plain_runs
            }
            .push(r);
        }
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", was.trim());
    let copied_total = copied(&agent) - copied_before;
    let dropped = agent.metric_sum("flowlens_agent_dns_messages_total", "outcome=\"dropped");
    let unreadable = agent.metric_sum(
        "flowlens_agent_dns_messages_total",
        "outcome=\"unreadable\"",
    );
    stop.store(true, Ordering::Relaxed);
    for r in responders {
        r.join().unwrap();
    }
    drop(agent);
    if let Err(e) = cleanup_pins(&topo.bpffs_root(n)) {
        eprintln!("flowlens-agent cleanup: {e}");
    }

    let med_of =
        |v: &[ArmRun], f: fn(&ArmRun) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    let k_dns = med_of(&dns_runs, |r| r.kernel_ns_per_packet);
    let k_plain = med_of(&plain_runs, |r| r.kernel_ns_per_packet);
    let a_dns = med_of(&dns_runs, |r| r.agent_ns_per_query);
    let a_plain = med_of(&plain_runs, |r| r.agent_ns_per_query);
    let expected = 2.0 * f64::from(queries) * rounds as f64;
    println!(
        "| {queries} queries at {rate}/s, {rounds} rounds (medians) | port 53 (copied) | port 5353 (not copied) | DNS cost |"
    );
    println!("|---|---|---|---|");
    println!(
        "| fl_from_pod + fl_to_pod, ns per packet (bpf_stats) | {k_dns:.0} | {k_plain:.0} | {:.0} ns per DNS packet |",
        k_dns - k_plain
    );
    println!(
        "| agent CPU, ns per query and its answer | {a_dns:.0} | {a_plain:.0} | {:.1} µs per query/answer pair |",
        (a_dns - a_plain) / 1000.0
    );
    println!(
        "| messages copied / expected; dropped; unreadable | {copied_total:.0} / {expected:.0}; {dropped:.0}; {unreadable:.0} | | |"
    );
    let line = format!(
        "{{\"bench\":\"dns\",\"queries\":{queries},\"rate\":{rate},\"rounds\":{rounds},\"kernel_ns_per_packet_dns\":{k_dns:.1},\"kernel_ns_per_packet_plain\":{k_plain:.1},\"kernel_ns_per_dns_packet\":{:.1},\"agent_ns_per_query_dns\":{a_dns:.0},\"agent_ns_per_query_plain\":{a_plain:.0},\"agent_ns_per_dns_query\":{:.0},\"copied\":{copied_total:.0},\"expected\":{expected:.0},\"dropped\":{dropped:.0},\"unreadable\":{unreadable:.0}}}",
        k_dns - k_plain,
        a_dns - a_plain
    );
    if json {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
    assert_eq!(dropped, 0.0, "DNS messages dropped under the budget");
    assert_eq!(copied_total, expected, "every query and answer copied");
}
