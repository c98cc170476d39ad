//! Sends completed windows to the operator's collector.
//!
//! [`buffer`] decides what to send and what to forget (pure); [`client`]
//! speaks HTTP; [`Reporter`] loops: send what is pending, then a heartbeat
//! while anything is held (to learn what was committed, and to notice a
//! restarted collector), with capped exponential backoff on failure.

pub(crate) mod buffer;
pub(crate) mod client;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::{
    buffer::{BATCH_WINDOWS, BUFFER_WINDOWS, ReportBuffer},
    client::CollectorClient,
};
use crate::{
    control::Completed,
    metrics::{Metrics, ResultLabels},
    state::Shared,
};
use flowlens_api::node_agent_config::CollectorEndpoint;

/// How often to ask what was committed while windows are held.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(3);
/// Longest wait between two attempts while the collector is unreachable
/// (the operator waits longer than this for agents after it restarts).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ReporterOptions {
    pub node: String,
    /// Overrides `spec.collector.url` (and its CA bundle).
    pub collector_url: Option<String>,
    pub token_file: PathBuf,
}

pub struct Reporter {
    opts: ReporterOptions,
    agent: String,
    buffer: ReportBuffer,
    client: Option<CollectorClient>,
    /// Windows per request: [`BATCH_WINDOWS`], 1 while a refused request
    /// is narrowed down, doubling back after each accepted one.
    batch_limit: usize,
}

impl Reporter {
    pub fn new(opts: ReporterOptions) -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Reporter {
            agent: format!("{}-{started}", std::process::id()),
            opts,
            buffer: ReportBuffer::new(BUFFER_WINDOWS),
            client: None,
            batch_limit: BATCH_WINDOWS,
        }
    }

    fn endpoint(&self, shared: &Shared) -> Option<CollectorEndpoint> {
        match &self.opts.collector_url {
            Some(url) => Some(CollectorEndpoint {
                url: url.clone(),
                ca_bundle: shared.read().collector.and_then(|c| c.ca_bundle),
            }),
            None => shared.read().collector,
        }
    }

    /// One request (pending windows, or a heartbeat). `Ok(true)` when more
    /// is pending.
    async fn exchange(&mut self, shared: &Shared, metrics: &Metrics) -> Result<bool, String> {
        let Some(endpoint) = self.endpoint(shared) else {
            return Err("no collector configured yet (spec.collector is empty; is the operator running with --collector-url?)".into());
        };
        if self.client.as_ref().map(|c| c.endpoint()) != Some(&endpoint) {
            info!(url = %endpoint.url, "reporting to the collector");
            self.client = Some(CollectorClient::new(&endpoint).map_err(|e| e.to_string())?);
        }
        let client = self.client.as_ref().expect("client");
        let (batch, sending) = self
            .buffer
            .batch(&self.opts.node, &self.agent, self.batch_limit);
        match client.send(&batch, &self.opts.token_file).await {
            Ok(ack) => {
                metrics
                    .reports
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                self.buffer.sent(&sending);
                self.batch_limit = (self.batch_limit * 2).min(BATCH_WINDOWS);
                let committed = self.buffer.ack(&ack);
                metrics.windows_reported.inc_by(committed as u64);
                metrics.report_buffer.set(self.buffer.len() as i64);
                debug!(
                    sent = sending.windows,
                    committed,
                    held = self.buffer.len(),
                    "report exchanged"
                );
                Ok(self.buffer.has_pending())
            }
            Err(e) if e.is_permanent() => {
                metrics
                    .reports
                    .get_or_create(&ResultLabels { result: e.label() })
                    .inc();
                // Resending the same request would be refused forever, and
                // hold up every later window: narrow it down to single
                // items, and drop (and count) the one refused alone.
                if self.batch_limit > 1 || sending.windows + sending.policies > 1 {
                    self.batch_limit = 1;
                    warn!(error = %e, "report refused; sending its windows one at a time");
                } else {
                    let dropped = self.buffer.refused(&sending);
                    metrics.windows_dropped.inc_by(dropped as u64);
                    metrics.report_buffer.set(self.buffer.len() as i64);
                    warn!(error = %e, windows = dropped, policy_windows = sending.policies, "the collector refuses this window for good: dropped");
                    // Until the next config: on the node's config status.
                    let message = format!(
                        "the collector refused {dropped} window(s) and {} policy window(s) for good, which were dropped: {e} (see the operator's log and its report_refusals metric; an agent and operator of different versions, or a wrong node clock, are the usual causes)",
                        sending.policies
                    );
                    shared.update(|s| {
                        s.problems.retain(|p| {
                            p.reason != flowlens_api::conditions::reason::REPORT_REFUSED
                        });
                        s.problems.push(crate::state::Problem {
                            reason: flowlens_api::conditions::reason::REPORT_REFUSED.into(),
                            message,
                        });
                    });
                }
                Ok(self.buffer.has_pending())
            }
            Err(e) => {
                metrics
                    .reports
                    .get_or_create(&ResultLabels { result: e.label() })
                    .inc();
                Err(e.to_string())
            }
        }
    }

    pub async fn run(
        mut self,
        mut completed: tokio::sync::mpsc::UnboundedReceiver<Completed>,
        shared: Shared,
        metrics: Arc<Metrics>,
    ) {
        let mut next = Instant::now() + HEARTBEAT;
        let mut backoff = Duration::from_millis(500);
        let mut failing_since: Option<Instant> = None;
        let mut open = true;
        while open || self.buffer.has_pending() {
            shared.beat_reporter();
            tokio::select! {
                c = completed.recv(), if open => match c {
                    Some(c) => {
                        let dropped = self.buffer.push(c.windows, c.policies);
                        if dropped > 0 {
                            metrics.windows_dropped.inc_by(dropped as u64);
                            warn!(dropped, "report buffer full: dropped the oldest windows");
                        }
                        metrics.report_buffer.set(self.buffer.len() as i64);
                        if failing_since.is_none() {
                            next = Instant::now();
                        }
                    }
                    None => {
                        // Shutting down: one last attempt for the flushed windows.
                        open = false;
                        next = Instant::now();
                    }
                },
                _ = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() < next {
                continue;
            }
            if !self.buffer.has_pending() && !self.buffer.has_held() {
                next = Instant::now() + HEARTBEAT;
                continue;
            }
            match self.exchange(&shared, &metrics).await {
                Ok(more) => {
                    if let Some(since) = failing_since.take() {
                        info!(
                            after_secs = since.elapsed().as_secs(),
                            "reporting works again"
                        );
                    }
                    backoff = Duration::from_millis(500);
                    next = if more {
                        Instant::now()
                    } else {
                        Instant::now() + HEARTBEAT
                    };
                }
                Err(e) => {
                    if !open {
                        warn!(error = %e, windows = self.buffer.len(), "shutting down with unreported windows");
                        break;
                    }
                    // Log the first failure, then every minute.
                    let log = match failing_since {
                        None => {
                            failing_since = Some(Instant::now());
                            true
                        }
                        Some(s) => s.elapsed().as_secs() % 60 < backoff.as_secs().max(1),
                    };
                    if log {
                        warn!(error = %e, held = self.buffer.len(), "cannot report; retrying with backoff");
                    }
                    let jitter = Duration::from_millis(u64::from(std::process::id() % 250));
                    next = Instant::now() + backoff + jitter;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
