//! The live flows API in the simulated cluster: certificates for the
//! operator's TLS endpoint, the APIService through which the local API
//! server proxies to it, and a `kubectl flowlens observe --follow` reader
//! whose lines are timestamped as they arrive.

use std::{
    io::BufRead,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use flowlens_api::live::{LIVE_GROUP, LIVE_VERSION, LiveFlow, LiveLine};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// Now, in unix milliseconds (the clock live records carry).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// PEM files of a CA and a serving certificate it signed.
pub struct CollectorCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CollectorCerts {
    /// A new CA and a serving certificate for `names` (DNS names or IP
    /// addresses), written under `dir`.
    pub fn new(dir: &Path, names: &[String]) -> anyhow::Result<CollectorCerts> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "flowlens-e2e-collector-ca");
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer)?.pem();
        let c = CollectorCerts {
            ca: dir.join("collector-ca.pem"),
            cert: dir.join("collector.pem"),
            key: dir.join("collector-key.pem"),
        };
        std::fs::write(&c.ca, ca_pem)?;
        std::fs::write(&c.cert, cert)?;
        std::fs::write(&c.key, key.serialize_pem())?;
        Ok(c)
    }
}

/// The APIService of the live API, pointing at a Service (no selector)
/// whose Endpoints are the operator's address in the root namespace.
/// Deleted on drop (it is cluster-wide: one test at a time owns it).
pub struct LiveApiService {
    name: String,
}

impl LiveApiService {
    pub fn name() -> String {
        format!("{LIVE_VERSION}.{LIVE_GROUP}")
    }

    /// Registers the API: Service `service` in `namespace` with Endpoints
    /// `ip:port`, and the APIService (without a caBundle: the operator sets
    /// it).
    pub fn register(
        namespace: &str,
        service: &str,
        ip: IpAddr,
        port: u16,
    ) -> anyhow::Result<LiveApiService> {
        let name = Self::name();
        crate::kubectl::apply(&format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {service}, namespace: {namespace}}}
spec:
  ports: [{{name: https, port: {port}, targetPort: {port}, protocol: TCP}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {service}, namespace: {namespace}}}
subsets:
  - addresses: [{{ip: "{ip}"}}]
    ports: [{{name: https, port: {port}, protocol: TCP}}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: {name}}}
spec:
  group: {LIVE_GROUP}
  version: {LIVE_VERSION}
  service: {{name: {service}, namespace: {namespace}, port: {port}}}
  groupPriorityMinimum: 1000
  versionPriority: 15
"#
        ))
        .context("registering the live API")?;
        Ok(LiveApiService { name })
    }

    /// Waits until the API server finds the API available (its caBundle
    /// set by the operator, the endpoint answering discovery).
    pub fn wait_available(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let status = crate::kubectl::kubectl(&[
                "get",
                "apiservice",
                &self.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Available\")].status} {.status.conditions[?(@.type==\"Available\")].message}",
            ])
            .unwrap_or_default();
            if status.starts_with("True") {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "APIService {} not available after {timeout:?}: {status}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for LiveApiService {
    fn drop(&mut self) {
        let _ = crate::kubectl::kubectl(&[
            "delete",
            "apiservice",
            &self.name,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

/// A running `kubectl flowlens observe ... -o json`, its lines with their
/// arrival time. Killed on drop.
pub struct Observer {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, LiveLine)>>>,
    errors: Arc<Mutex<String>>,
}

impl Observer {
    pub fn start(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Observer> {
        let mut child = Command::new(crate::process::workspace_bin("kubectl-flowlens"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .args(["-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl-flowlens")?;
        let lines: Arc<Mutex<Vec<(Instant, LiveLine)>>> = Arc::default();
        let errors: Arc<Mutex<String>> = Arc::default();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(stdout).lines() {
                    let Ok(l) = l else { break };
                    let parsed: LiveLine = serde_json::from_str(&l).unwrap_or_else(|e| {
                        panic!("observe printed a line that is not JSON ({e}): {l}")
                    });
                    lines.lock().unwrap().push((Instant::now(), parsed));
                }
            });
        }
        {
            let errors = errors.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(stderr).lines() {
                    let Ok(l) = l else { break };
                    errors.lock().unwrap().push_str(&l);
                }
            });
        }
        Ok(Observer {
            child,
            lines,
            errors,
        })
    }

    /// The first record after `since` that `pred` accepts, with its arrival.
    pub fn wait_for(
        &self,
        since: Instant,
        timeout: Duration,
        pred: impl Fn(&LiveFlow) -> bool,
    ) -> anyhow::Result<(Instant, LiveFlow)> {
        let start = Instant::now();
        loop {
            if let Some((at, r)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|(at, l)| match l {
                    LiveLine::Flow(r) if *at >= since && pred(r) => Some((*at, r.clone())),
                    _ => None,
                })
            {
                return Ok((at, r));
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "no such live record within {timeout:?}; stderr: {}",
                self.errors.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every record received so far.
    pub fn records(&self) -> Vec<LiveFlow> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, l)| match l {
                LiveLine::Flow(r) => Some(r.clone()),
                LiveLine::Lost { .. } => None,
            })
            .collect()
    }

    /// Records missed (reported by the stream).
    pub fn lost(&self) -> u64 {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| match l {
                LiveLine::Lost { lost } => *lost,
                LiveLine::Flow(_) => 0,
            })
            .sum()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
