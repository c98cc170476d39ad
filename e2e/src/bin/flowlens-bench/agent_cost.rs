//! `flowlens-bench agent-at-64k-flows`: the agent's own cost with a full
//! flow table. One traced pod sends one UDP datagram to each of `--flows`
//! ports of another pod every second, so every drain of the kernel table
//! holds that many flows; the agent's CPU (user + system, in % of one core)
//! and resident memory are read from /proc over `--seconds`. The table is
//! drained at window ends (`--window-seconds`: 5, the shortest allowed, by
//! default; NetworkObservation's default is 30), or every
//! second once it is over half full (`--flow-table-size 65536`, the
//! agent's default before 2026-12-05). The agent reports its windows (to a
//! sink that commits them all: `report_sink.rs`) and keeps its spool
//! (`--state-dir`), as the DaemonSet's does, so each drain's commit and
//! each report are in the figure; `--no-reports` runs it as a standalone
//! agent that only keeps its windows (no reports, no spool).

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
    report_sink::ReportSink,
    resources::{process_cpu_ns, process_status_kb},
    topology::{Topology, enter_netns},
};

use super::arg;

/// Sends one datagram to each of `flows` ports of `to` every second from a
/// thread inside network namespace `netns`, until `stop`.
fn spray(
    netns: String,
    to: std::net::Ipv4Addr,
    flows: u16,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the pod's network namespace");
        let sock = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            for i in 0..flows {
                let _ = sock.send_to(b"x", SocketAddr::from((to, 1024 + i)));
            }
            if let Some(rest) = Duration::from_secs(1).checked_sub(start.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    })
}

pub fn run(args: &[String]) {
    let flows: u16 = arg(args, "--flows", 64000).min(64000);
    let seconds: u64 = arg(args, "--seconds", 10);
    // The agent's default.
    let table: u32 = arg(args, "--flow-table-size", 131072);
    let window: u32 = arg(args, "--window-seconds", 5);
    if !(5..=3600).contains(&window) {
        // NetworkObservation's bounds (5 s to 1 h).
        eprintln!("flowlens-bench: --window-seconds: {window} is outside 5 to 3600");
        std::process::exit(2);
    }
    let json = args.iter().any(|a| a == "--json");
    let reporting = !args.iter().any(|a| a == "--no-reports");

    let mut topo = Topology::new();
    let n = topo.add_node("bench", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let mut cfg = SpecBuilder::new(&topo, n);
    // Only the sender is traced: one table entry per flow.
    cfg.trace("obs", window, &[a]);
    let spec = cfg.build();
    let table_arg = table.to_string();
    let state_dir = topo.state_dir(n).display().to_string();
    let token = topo.work_dir.join("bench-token");
    let token_arg = token.display().to_string();
    let sink = reporting.then(|| {
        std::fs::write(&token, "bench").expect("writing the agent's token file");
        ReportSink::start(&topo.nodes[n].netns).expect("starting the report sink")
    });
    let mut extra = vec!["--flow-table-size", &table_arg];
    if let Some(sink) = &sink {
        extra.extend([
            "--state-dir",
            &state_dir,
            "--collector-url",
            &sink.url,
            "--token-file",
            &token_arg,
        ]);
    }
    let agent = Agent::standalone(&topo, n, &spec, &extra);
    let pid = agent.proc.pid();
    let idle_from = (Instant::now(), process_cpu_ns(pid));
    std::thread::sleep(Duration::from_secs(seconds));
    let idle_pct =
        100.0 * (process_cpu_ns(pid) - idle_from.1) / idle_from.0.elapsed().as_nanos() as f64;

    let stop = Arc::new(AtomicBool::new(false));
    let sender = spray(
        topo.pods[a].netns.clone(),
        topo.pods[b].ip4,
        flows,
        stop.clone(),
    );
    // Let the table fill and one drain happen before measuring.
    std::thread::sleep(Duration::from_secs(6));
    // Nothing asks the agent anything meanwhile (a dump serialises every
    // window it keeps: its own cost, not the agent's at rest).
    // Drains of the flow tables (not those of the rule counters alone).
    let drains = || {
        agent.metric_sum(
            "flowlens_agent_drain_duration_seconds_count",
            "tables=\"all\"",
        )
    };
    let drains_before = drains();
    let from = (Instant::now(), process_cpu_ns(pid));
    std::thread::sleep(Duration::from_secs(seconds));
    let busy_pct = 100.0 * (process_cpu_ns(pid) - from.1) / from.0.elapsed().as_nanos() as f64;
    let drained = drains() - drains_before;
    let reports = sink.as_ref().map_or(0, |s| s.batches());
    // Memory before the dump below: serialising every window it keeps
    // takes the agent tens of megabytes for a moment.
    let rss_mb = process_status_kb(pid, "VmRSS") as f64 / 1024.0;
    let peak_mb = process_status_kb(pid, "VmHWM") as f64 / 1024.0;
    let last_entries = agent
        .dump()
        .and_then(|d| d.kernel["flowEntries"].as_u64())
        .unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    drop(agent);
    drop(sink);
    let _ = std::fs::remove_file(&token);
    if let Err(e) = cleanup_pins(&topo.bpffs_root(n)) {
        eprintln!("flowlens-agent cleanup: {e}");
    }

    let mode = if reporting {
        format!("reporting ({reports} batches in all) with a spool")
    } else {
        "no reports, no spool".to_owned()
    };
    println!("| agent | CPU (% of one core) | RSS | peak RSS | goal |");
    println!("|---|---|---|---|---|");
    println!("| no traffic | {idle_pct:.2}% | | | < 1% |");
    println!(
        "| {flows} flows every second, table of {table}, {window} s windows, {mode} ({drained} drains of it in {seconds} s, the last of {last_entries} entries) | {busy_pct:.2}% | {rss_mb:.0} MB | {peak_mb:.0} MB | < 1%, < 64 MB |"
    );
    let line = format!(
        "{{\"bench\":\"agent-at-64k-flows\",\"flows\":{flows},\"flow_table_size\":{table},\"window_seconds\":{window},\"reporting\":{reporting},\"report_batches\":{reports},\"seconds\":{seconds},\"drains\":{drained},\"idle_cpu_pct\":{idle_pct:.3},\"cpu_pct\":{busy_pct:.3},\"rss_mb\":{rss_mb:.1},\"peak_rss_mb\":{peak_mb:.1},\"last_drain_entries\":{last_entries}}}"
    );
    if json {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
}
