//! Benchmarks (`just bench`). Each prints a table and a JSON line.
//!
//! `flowlens-bench datapath [--rounds N] [--seconds S] [--arms a,b]
//! [--json]`: what observing costs, side by side with nothing attached, a
//! minimal TC program, nftables per-flow counters and conntrack accounting
//! (`datapath.rs`); `--arms` runs only the arms named (and "nothing").
//!
//! `flowlens-bench agent-at-64k-flows [--flows N] [--seconds S]
//! [--flow-table-size N] [--window-seconds S] [--no-reports] [--json]`: the
//! agent's own CPU and memory while every drain holds 64,000 flows, as the
//! DaemonSet runs it (reporting, with a spool) unless `--no-reports`
//! (`agent_cost.rs`).
//!
//! `flowlens-bench propagation [--nodes 20] [--pods 1000] [--policies 50]
//! [--rate 50]`: against the local API server and a real operator, the time
//! from a pod getting its IP (status patch) to the NodeAgentConfig of its
//! node carrying it, and from a FlowPolicy being applied to every affected
//! NodeAgentConfig carrying its rules; pods get their IPs at `--rate` per
//! second, as a busy cluster would.
//!
//! `flowlens-bench scale [--nodes 100] [--pods 5000] [--policies 50]
//! [--shape namespace-wide|app-scoped] [--dual-stack] [--ip-changes 20]
//! [--idle-seconds 20] [--json]`: the largest NodeAgentConfig, the bytes written to the API
//! server for a pod IP change, a policy and a namespace label change, the
//! propagation to every affected config, the operator's memory, CPU and
//! compile times (`scale.rs`).

mod agent_cost;
mod datapath;
mod dns;
mod propagation;
mod scale;

/// The value of `--flag`, or `default` when it is absent. A value that
/// does not parse ends the run with a message naming the flag (a benchmark
/// run with a silently different setting would report the wrong thing).
fn arg<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    let Some(i) = args.iter().position(|a| a == flag) else {
        return default;
    };
    match args.get(i + 1).map(|v| (v, v.parse())) {
        Some((_, Ok(v))) => v,
        Some((v, Err(_))) => {
            eprintln!("flowlens-bench: {flag}: invalid value {v:?}");
            std::process::exit(2);
        }
        None => {
            eprintln!("flowlens-bench: {flag} needs a value");
            std::process::exit(2);
        }
    }
}

fn propagation(args: &[String]) {
    let nodes: usize = arg(args, "--nodes", 20);
    let pods: usize = arg(args, "--pods", 1000);
    let policies: usize = arg(args, "--policies", 50);
    let rate: u64 = arg(args, "--rate", 50);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(propagation::run(nodes, pods, policies, rate));
}

fn scale(args: &[String]) {
    let a = scale::Args {
        nodes: arg(args, "--nodes", 100),
        pods: arg(args, "--pods", 5000),
        policies: arg(args, "--policies", 50),
        shape: arg(args, "--shape", scale::Shape::NamespaceWide),
        dual_stack: args.iter().any(|a| a == "--dual-stack"),
        ip_changes: arg(args, "--ip-changes", 20),
        idle: std::time::Duration::from_secs(arg(args, "--idle-seconds", 20)),
        json: args.iter().any(|a| a == "--json"),
    };
    if a.nodes == 0 || a.pods == 0 || a.ip_changes == 0 {
        eprintln!("flowlens-bench scale: --nodes, --pods and --ip-changes must be at least 1");
        std::process::exit(2);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(scale::run(a));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("datapath") => datapath::run(&args),
        Some("agent-at-64k-flows") => agent_cost::run(&args),
        Some("propagation") => propagation(&args),
        Some("dns") => dns::run(&args),
        Some("scale") => scale(&args),
        _ => {
            eprintln!(
                "usage: flowlens-bench datapath [--rounds N] [--seconds S] [--seed N] [--arms a,b] [--profile-only] [--json]\n       flowlens-bench agent-at-64k-flows [--flows 64000] [--seconds 10] [--flow-table-size 131072] [--window-seconds 5] [--no-reports] [--json]\n       flowlens-bench propagation [--nodes 20] [--pods 1000] [--policies 50] [--rate 50]\n       flowlens-bench dns [--queries 20000] [--rate 2000] [--rounds 3] [--seed N] [--json]\n       flowlens-bench scale [--nodes 100] [--pods 5000] [--policies 50] [--shape namespace-wide|app-scoped] [--dual-stack] [--ip-changes 20] [--idle-seconds 20] [--json]"
            );
            std::process::exit(2);
        }
    }
}
