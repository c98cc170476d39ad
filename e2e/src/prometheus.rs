//! A real Prometheus (Debian's `prometheus`, which `hack/setup.sh` installs)
//! scraping the operator and the agents every second, with Flowlens' rules
//! loaded, queried over its HTTP API.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    operator::free_port,
    process::{Proc, wait_for},
};

/// The plain rules file (the PrometheusRule manifest carries the same groups).
pub const RULES_FILE: &str = "deploy/prometheus/flowlens-rules.yaml";
/// The PrometheusRule manifest (prometheus-operator).
pub const PROMETHEUS_RULE: &str = "deploy/prometheus/prometheusrule.yaml";
/// The Grafana dashboard.
pub const DASHBOARD: &str = "deploy/grafana/flowlens-dashboard.json";

/// The repository's root (for the files above).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Prometheus server, killed on drop (its data directory is removed).
pub struct Prometheus {
    proc: Proc,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// One sample of an instant vector.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus in `work_dir` scraping `jobs` (`(job, addresses)`)
    /// every second, with the rules file evaluated every second.
    pub fn start(work_dir: &Path, jobs: &[(&str, &[SocketAddr])]) -> anyhow::Result<Prometheus> {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let dir = work_dir.join(format!("prometheus-{port}"));
        std::fs::create_dir_all(&dir)?;
        let rules = repo_root().join(RULES_FILE).canonicalize()?;
        let mut scrape = String::new();
        for (job, targets) in jobs {
            let targets: Vec<String> = targets
                .iter()
                .map(|t| format!("{:?}", t.to_string()))
                .collect();
            scrape.push_str(&format!(
                "  - job_name: {job:?}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\nscrape_configs:\n{scrape}",
            rules.display().to_string()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", cmd, Some(dir.join("prometheus.log")));
        let p = Prometheus { proc, addr, dir };
        let ready = wait_for(Duration::from_secs(30), || {
            curl(&["-sf", &format!("http://{addr}/-/ready")]).ok()
        });
        if ready.is_none() {
            bail!("prometheus did not become ready: {}", p.log());
        }
        Ok(p)
    }

    /// Prometheus' own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates `promql` now: the instant vector, or an error naming the
    /// query and what Prometheus said.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let body = curl(&[
            "-s",
            &format!("http://{}/api/v1/query", self.addr),
            "--data-urlencode",
            &format!("query={promql}"),
        ])?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("{promql}: {body}"))?;
        if v["status"] != "success" {
            bail!("{promql}: {}", v["error"]);
        }
        let data = &v["data"];
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .context("result")?
                .iter()
                .map(|s| {
                    Ok(Sample {
                        labels: s["metric"].as_object().cloned().unwrap_or_default(),
                        value: s["value"][1].as_str().context("value")?.parse()?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: Default::default(),
                value: data["result"][1].as_str().context("value")?.parse()?,
            }]),
            other => bail!("{promql}: unexpected result type {other:?}"),
        }
    }

    /// The single value of `promql` (an error when it has none or several).
    pub fn value(&self, promql: &str) -> anyhow::Result<f64> {
        match self.query(promql)?.as_slice() {
            [one] => Ok(one.value),
            other => bail!("{promql}: {} samples: {other:?}", other.len()),
        }
    }

    /// Every scrape target's health, `(job, health, last error)`.
    pub fn targets(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let body = curl(&["-sf", &format!("http://{}/api/v1/targets", self.addr)])?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["activeTargets"]
            .as_array()
            .context("targets")?
            .iter()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or_default().to_owned(),
                    t["health"].as_str().unwrap_or_default().to_owned(),
                    t["lastError"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    /// Every loaded rule, `(name, health, last error)`.
    pub fn rules(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let body = curl(&["-sf", &format!("http://{}/api/v1/rules", self.addr)])?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["groups"]
            .as_array()
            .context("groups")?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or_default().to_owned(),
                    r["health"].as_str().unwrap_or_default().to_owned(),
                    r["lastError"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.proc.kill9();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
    }
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl").args(args).output()?;
    if !out.status.success() {
        bail!(
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Every PromQL expression of the Grafana dashboard, `(panel title, expr)`,
/// with its template variables replaced by `vars` (`$name` -> value) and
/// Grafana's `$__rate_interval` by `1m`.
pub fn dashboard_queries(dashboard: &Value, vars: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                let mut e = expr.replace("$__rate_interval", "1m");
                for (k, v) in vars {
                    e = e.replace(&format!("${k}"), v);
                }
                out.push((p["title"].as_str().unwrap_or_default().to_owned(), e));
            }
        }
    }
    out
}
