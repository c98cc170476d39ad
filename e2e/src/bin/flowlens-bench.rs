//! Benchmarks (`just bench`). Each prints a table and a JSON line.
//!
//! `flowlens-bench datapath [--rounds N] [--seconds S]`: throughput of a veth
//! TCP stream and small-packet UDP packets/s with the agent's programs
//! attached (both pods traced, one with a rule that matches none of the
//! traffic, so every packet goes through parsing, the endpoint and
//! connection tables and flow accounting) against none, interleaved.

use std::time::Duration;

use flowlens_api::{
    flow_policy::{PolicyMode, Protocol},
    node_agent_config::Direction,
};
use flowlens_e2e::{agent::Agent, config::SpecBuilder, process::Proc, topology::Topology};

fn arg<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// iperf3 run from pod `client` to pod `server`; returns (bits/s, packets/s).
fn iperf3(topo: &Topology, server: usize, client: usize, udp: bool, seconds: u32) -> (f64, f64) {
    let _srv = Proc::spawn(
        "iperf3-server",
        topo.pod_cmd(server, "iperf3", &["-s", "-1", "-p", "5201"]),
        None,
    );
    std::thread::sleep(Duration::from_millis(300));
    let ip = topo.pods[server].ip4.to_string();
    let secs = seconds.to_string();
    let mut args = vec!["-c", ip.as_str(), "-p", "5201", "-t", secs.as_str(), "-J"];
    if udp {
        args.extend(["-u", "-l", "64", "-b", "0"]);
    }
    let out = topo.pod_output(client, "iperf3", &args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    if udp {
        let s = &v["end"]["sum"];
        let received =
            s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
        (
            s["bits_per_second"].as_f64().unwrap_or(0.0),
            received / s["seconds"].as_f64().unwrap_or(1.0),
        )
    } else {
        (
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0),
            0.0,
        )
    }
}

fn datapath(args: &[String]) {
    let rounds: usize = arg(args, "--rounds", 5);
    let seconds: u32 = arg(args, "--seconds", 3);
    let mut topo = Topology::new();
    let n = topo.add_node("bench", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let other = format!("{}/32", topo.pods[b].ip4);
    let mut cfg = SpecBuilder::new(&topo, n);
    cfg.trace("obs", 5, &[a, b]).rule(
        "unrelated",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&other],
        &[(Protocol::Tcp, 5432, 5432)],
    );
    let attached = cfg.build();
    let mut empty = cfg.spec.clone();
    empty.endpoints.clear();
    empty.observations.clear();
    empty.rules.clear();
    empty.address_sets.clear();
    empty.policies.clear();
    empty.revision = "detached".into();
    let mut agent = Agent::standalone(&topo, n, &attached, &[]);

    let mut set = |on: bool| {
        let spec = if on { &attached } else { &empty };
        agent.set_config(spec);
        agent.wait_revision(&spec.revision, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(2500)); // interfaces reconcile every 2 s
        let attached_now = agent.dump().map(|d| d.endpoints.attached).unwrap_or(0);
        assert_eq!(
            attached_now > 0,
            on,
            "programs {} as expected",
            if on { "not attached" } else { "still attached" }
        );
    };
    let (mut tcp_ratio, mut udp_ratio) = (Vec::new(), Vec::new());
    let (mut tcp_on, mut tcp_off, mut udp_on, mut udp_off) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which configuration goes first to cancel drift.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut r = [(0.0, 0.0); 2];
        let mut u = [(0.0, 0.0); 2];
        for on in order {
            set(on);
            r[on as usize] = iperf3(&topo, b, a, false, seconds);
            u[on as usize] = iperf3(&topo, b, a, true, seconds);
        }
        tcp_off.push(r[0].0);
        tcp_on.push(r[1].0);
        udp_off.push(u[0].1);
        udp_on.push(u[1].1);
        tcp_ratio.push(r[1].0 / r[0].0);
        udp_ratio.push(u[1].1 / u[0].1);
        eprintln!(
            "round {}: TCP {:.2} -> {:.2} Gbit/s ({:.3}), UDP 64 B {:.0} -> {:.0} pps ({:.3})",
            round + 1,
            r[0].0 / 1e9,
            r[1].0 / 1e9,
            r[1].0 / r[0].0,
            u[0].1,
            u[1].1,
            u[1].1 / u[0].1
        );
    }
    let (tr, ur) = (median(&mut tcp_ratio), median(&mut udp_ratio));
    println!(
        "| measure | without programs | with programs | ratio (median of {rounds} interleaved rounds) | goal |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| veth TCP stream | {:.2} Gbit/s | {:.2} Gbit/s | {tr:.3} | >= 0.97 |",
        median(&mut tcp_off) / 1e9,
        median(&mut tcp_on) / 1e9
    );
    println!(
        "| UDP 64-byte packets | {:.0} pps | {:.0} pps | {ur:.3} | >= 0.95 |",
        median(&mut udp_off),
        median(&mut udp_on)
    );
    println!(
        "{{\"bench\":\"datapath\",\"tcp_ratio\":{tr:.4},\"udp_ratio\":{ur:.4},\"rounds\":{rounds},\"seconds\":{seconds}}}"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("datapath") => datapath(&args),
        _ => {
            eprintln!("usage: flowlens-bench datapath [--rounds N] [--seconds S]");
            std::process::exit(2);
        }
    }
}
