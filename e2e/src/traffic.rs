//! Real traffic between simulated pods: iperf3 for bulk transfers with an
//! independent byte count, and `flowlens-traffic` for RTT and connections.

use std::time::Duration;

use crate::{
    process::{Proc, workspace_bin},
    topology::Topology,
};

/// What iperf3 says it moved. `bytes` counts `write()`s; the wire payload is
/// that plus retransmitted segments (full-size, 1448 bytes with timestamps
/// on a 1500 MTU), minus whatever was still in flight when the server reset
/// the connection at the end of the test (iperf3's server closes with unread
/// data, which the kernel answers with an RST). `received` (the server's
/// count) is a floor for the wire payload.
#[derive(Clone, Copy, Debug)]
pub struct Iperf3 {
    pub bytes: u64,
    pub retransmits: u64,
    pub received: u64,
}

impl Iperf3 {
    pub fn wire_payload(&self) -> u64 {
        self.bytes + self.retransmits * 1448
    }
}

/// Runs an iperf3 TCP transfer of `bytes` (iperf3 syntax: `200M`) from
/// `client` to `server_ip:port`, paced at `rate` (`4G`: faster, this VM's
/// veths drop and TCP retransmits).
pub fn iperf3(
    topo: &Topology,
    server: usize,
    client: usize,
    server_ip: &str,
    port: u16,
    bytes: &str,
    rate: &str,
) -> Iperf3 {
    run_iperf3(
        topo,
        server,
        client,
        server_ip,
        port,
        &["-n", bytes, "-b", rate],
    )
}

fn run_iperf3(
    topo: &Topology,
    server: usize,
    client: usize,
    server_ip: &str,
    port: u16,
    how: &[&str],
) -> Iperf3 {
    let port_s = port.to_string();
    let srv = Proc::spawn(
        "iperf3-server",
        topo.pod_cmd(server, "iperf3", &["-s", "-1", "-p", &port_s]),
        None,
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut args = vec!["-c", server_ip, "-p", &port_s, "-J"];
    args.extend_from_slice(how);
    let out = topo.pod_output(client, "iperf3", &args);
    drop(srv);
    parse_iperf3(&out)
}

fn parse_iperf3(out: &std::process::Output) -> Iperf3 {
    assert!(
        out.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Iperf3 {
        bytes: v["end"]["sum_sent"]["bytes"]
            .as_u64()
            .expect("iperf3 JSON has end.sum_sent.bytes"),
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        received: v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0),
    }
}

/// Starts `flowlens-traffic echo-server` in a pod.
pub fn echo_server(topo: &Topology, pod: usize, port: u16) -> Proc {
    let p = Proc::spawn(
        "echo-server",
        topo.pod_cmd(
            pod,
            workspace_bin("flowlens-traffic"),
            &["echo-server", "--port", &port.to_string()],
        ),
        None,
    );
    std::thread::sleep(Duration::from_millis(200));
    p
}

/// Runs `flowlens-traffic <mode> --to <to> <args>` in a pod, in a
/// background thread (the test can watch status while it runs); `join()`
/// gives its JSON line.
pub fn spawn_traffic(
    topo: &Topology,
    pod: usize,
    mode: &str,
    to: &str,
    args: &[&str],
) -> std::thread::JoinHandle<serde_json::Value> {
    let mut a = vec![mode, "--to", to];
    a.extend_from_slice(args);
    let mut cmd = topo.pod_cmd(pod, workspace_bin("flowlens-traffic"), &a);
    let mode = mode.to_owned();
    std::thread::spawn(move || {
        let out = cmd.output().expect("running flowlens-traffic");
        assert!(
            out.status.success(),
            "flowlens-traffic {mode} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "flowlens-traffic {mode} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    })
}

/// Starts an iperf3 TCP transfer of `seconds` at `rate` in the background.
pub fn spawn_iperf3_timed(
    topo: &Topology,
    server: usize,
    client: usize,
    server_ip: &str,
    port: u16,
    seconds: u32,
    rate: &str,
) -> std::thread::JoinHandle<Iperf3> {
    let port_s = port.to_string();
    let srv = Proc::spawn(
        "iperf3-server",
        topo.pod_cmd(server, "iperf3", &["-s", "-1", "-p", &port_s]),
        None,
    );
    let secs = seconds.to_string();
    let mut cmd = topo.pod_cmd(
        client,
        "iperf3",
        &[
            "-c", server_ip, "-p", &port_s, "-J", "-t", &secs, "-b", rate,
        ],
    );
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let out = cmd.output().expect("running iperf3");
        drop(srv);
        parse_iperf3(&out)
    })
}
