//! RTT sampling against a known injected delay and against `ss -ti` (the
//! kernel's own smoothed RTT read over netlink), for each hook this kernel
//! offers.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flowlens_api::histogram::Histogram;
use flowlens_e2e::{
    agent::Agent,
    config::SpecBuilder,
    process::{Proc, workspace_bin},
    topology::Topology,
};

const ONE_WAY: Duration = Duration::from_millis(10);

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Parses `rtt:<srtt>/<rttvar>` (milliseconds) from `ss -tin` output.
fn ss_rtt_us(text: &str) -> Option<f64> {
    let i = text.find(" rtt:")?;
    let v = &text[i + 5..];
    let end = v.find('/')?;
    v[..end].parse::<f64>().ok().map(|ms| ms * 1000.0)
}

struct PingPong {
    p50_us: f64,
    ss_srtt_us: f64,
}

/// Ping-pong from `client` to `server_ip:7000`, reading `ss -ti` for the
/// connection while it is still open.
fn ping_pong(topo: &Topology, client: usize, server_ip: &str) -> PingPong {
    let to = if server_ip.contains(':') {
        format!("[{server_ip}]:7000")
    } else {
        format!("{server_ip}:7000")
    };
    let mut cmd = topo.pod_cmd(
        client,
        workspace_bin("flowlens-traffic"),
        &[
            "ping-pong",
            "--to",
            &to,
            "--count",
            "60",
            "--interval-ms",
            "20",
            "--hold-ms",
            "3000",
        ],
    );
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("ping-pong printed {line:?}: {e}"));
    let ss = topo.pod_output(client, "ss", &["-tin", "dst", &to]);
    let ss_text = String::from_utf8_lossy(&ss.stdout).to_string();
    let _ = child.wait();
    PingPong {
        p50_us: v["p50_us"].as_f64().unwrap(),
        ss_srtt_us: ss_rtt_us(&ss_text).unwrap_or_else(|| panic!("no rtt in `ss -tin`: {ss_text}")),
    }
}

fn rtt_case(extra_args: &[&str], expected_hook: &str) {
    let mut topo = Topology::new();
    topo.add_fabric();
    let n1 = topo.add_node("n1", Some("z1"));
    let n2 = topo.add_node("n2", Some("z2"));
    let a = topo.add_pod(n1, "a");
    let c = topo.add_pod(n1, "c");
    let b = topo.add_pod(n2, "b");
    topo.add_delay("z1", "z2", ONE_WAY);
    let _srv_b = Proc::spawn(
        "echo-b",
        topo.pod_cmd(
            b,
            workspace_bin("flowlens-traffic"),
            &["echo-server", "--port", "7000"],
        ),
        None,
    );
    let _srv_c = Proc::spawn(
        "echo-c",
        topo.pod_cmd(
            c,
            workspace_bin("flowlens-traffic"),
            &["echo-server", "--port", "7000"],
        ),
        None,
    );
    let spec = SpecBuilder::new(&topo, n1).trace("obs", 5, &[a, c]).build();
    let agent = Agent::standalone(&topo, n1, &spec, extra_args);
    assert_eq!(agent.dump().unwrap().hooks.rtt, expected_hook);
    std::thread::sleep(Duration::from_millis(300));
    let injected = 2.0 * ONE_WAY.as_micros() as f64;

    // This machine is shared: a stall of the delay line raises the kernel's
    // own srtt (ss -ti) far above the injected delay, and then neither can
    // be compared with it. Measure again (at most three times) until the
    // ground truth itself shows the injected delay.
    let mut attempt = 1;
    let (far, near, windows) = loop {
        let from = now_s() - now_s() % 5;
        let far = ping_pong(&topo, a, &topo.pods[b].ip4.to_string());
        let near = ping_pong(&topo, a, &topo.pods[c].ip4.to_string());
        let windows = agent.windows("obs", from, now_s() + 1, Duration::from_secs(20));
        if (far.ss_srtt_us - injected).abs() / injected < 0.10 || attempt == 3 {
            break (far, near, windows);
        }
        println!(
            "{expected_hook}: attempt {attempt}: ss -ti srtt {:.0} µs is off the injected {injected:.0} µs (the delay line stalled); measuring again",
            far.ss_srtt_us
        );
        attempt += 1;
    };

    let hist = |remote: &str| {
        let mut h = Histogram::default();
        for s in windows.iter().flat_map(|w| &w.series) {
            if s.local.pod.as_deref() == Some("a")
                && s.remote.as_deref() == Some(remote)
                && s.port == 7000
            {
                h.merge(&s.rtt);
            }
        }
        h
    };
    let far_h = hist(&topo.pods[b].ip4.to_string());
    let near_h = hist(&topo.pods[c].ip4.to_string());
    let p50 = far_h
        .quantile(0.5)
        .expect("RTT samples for the cross-zone connection") as f64;
    println!(
        "{expected_hook}: cross-zone p50 {p50:.0} µs over {} samples; injected round trip {injected:.0} µs; ss -ti srtt {:.0} µs; application ping-pong p50 {:.0} µs",
        far_h.count(),
        far.ss_srtt_us,
        far.p50_us
    );
    assert!(
        (p50 - injected).abs() / injected < 0.10,
        "p50 {p50} µs vs injected {injected} µs"
    );
    assert!(
        (p50 - far.ss_srtt_us).abs() / far.ss_srtt_us < 0.10,
        "p50 {p50} µs vs ss {} µs",
        far.ss_srtt_us
    );
    let near_p50 = near_h
        .quantile(0.5)
        .expect("RTT samples for the same-node connection") as f64;
    println!(
        "{expected_hook}: same-node p50 {near_p50:.0} µs over {} samples (ss -ti srtt {:.0} µs)",
        near_h.count(),
        near.ss_srtt_us
    );
    assert!(
        near_p50 < 1000.0,
        "same-node p50 {near_p50} µs should be sub-millisecond"
    );
}

#[test]
fn rtt_from_sock_ops_matches_the_injected_delay_and_ss() {
    rtt_case(&[], "sock_ops");
}

#[test]
fn rtt_from_the_tcp_probe_fallback_matches_the_injected_delay_and_ss() {
    rtt_case(&["--rtt-hook", "tcp-probe"], "tracepoint/tcp/tcp_probe");
}
