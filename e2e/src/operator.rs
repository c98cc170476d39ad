//! Running a real `flowlens-operator` against the test cluster.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use crate::{
    cluster::kubeconfig_path,
    process::{Proc, wait_for, workspace_bin},
};

/// An operator process; killed on drop.
pub struct Operator {
    pub proc: Proc,
    pub metrics: SocketAddr,
}

/// A free TCP port on the loopback interface.
pub(crate) fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    // Below the kernel's ephemeral range (32768 and up by default), so an
    // outgoing connection of a parallel test cannot take the port between
    // this check and the server's bind.
    const FIRST: u64 = 20_000;
    const LAST: u64 = 32_000;
    let random = RandomState::new();
    for attempt in 0u64.. {
        let port = (FIRST + random.hash_one(attempt) % (LAST - FIRST)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
        assert!(attempt < 1000, "no free port in {FIRST}..{LAST}");
    }
    unreachable!()
}

/// GET `path` from `addr` over plain HTTP/1.0; `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// POST a JSON `body` to `addr` over plain HTTP/1.0 with an optional
/// bearer token; `(status, body)`.
pub fn http_post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

impl Operator {
    /// Starts the operator with `extra` arguments and waits until it is ready.
    pub fn start(name: &str, extra: &[&str]) -> Operator {
        Self::start_with_env(name, extra, &[])
    }

    /// [`Self::start`] with more environment variables.
    pub fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Operator {
        let port = free_port();
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(workspace_bin("flowlens-operator"));
        cmd.arg("--metrics-addr").arg(metrics.to_string());
        if !extra.contains(&"--collector-addr") {
            cmd.arg("--collector-addr")
                .arg(format!("127.0.0.1:{}", free_port()));
        }
        cmd.args(extra)
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "info,flowlens_operator=debug")
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied());
        let log = std::env::temp_dir().join(format!("flowlens-operator-{name}-{port}.log"));
        let mut op = Operator {
            proc: Proc::spawn("operator", cmd, Some(log)),
            metrics,
        };
        let ready = wait_for(Duration::from_secs(30), || {
            http_get(metrics, "/readyz").filter(|(s, _)| *s == 200)
        });
        if ready.is_none() {
            panic!(
                "the operator did not become ready; running: {}\n{}",
                op.proc.is_running(),
                op.proc.log_text()
            );
        }
        op
    }

    /// The value of a counter family summed over labels matching `filter`.
    pub fn metric_sum(&self, name: &str, filter: &str) -> f64 {
        let Some((_, body)) = http_get(self.metrics, "/metrics") else {
            return f64::NAN;
        };
        crate::metrics::sum(&body, name, filter)
    }

    /// Writes made to the API server so far.
    pub fn writes(&self) -> f64 {
        self.metric_sum("flowlens_operator_api_writes_total", "")
    }
}
