//! Sends completed windows to the operator's collector.
//!
//! [`buffer`] decides what to send and what to forget (pure); [`client`]
//! speaks HTTP; [`Reporter`] loops: send what is pending, then a heartbeat
//! while anything is held (to learn what was committed, and to notice a
//! restarted collector), with capped exponential backoff on failure.

pub(crate) mod buffer;
pub(crate) mod client;
pub mod live;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::{
    buffer::{BATCH_WINDOWS, BUFFER_WINDOWS, ReportBuffer},
    client::CollectorClient,
};
use crate::{
    metrics::{Metrics, ResultLabels},
    state::Shared,
};
use flowlens_api::{
    node_agent_config::CollectorEndpoint,
    report::{ObservationWindow, PolicyWindow},
};

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

/// The windows waiting for the collector, shared by the control loop
/// (which adds them, after spooling them) and the reporter (which sends
/// them and forgets what is committed). Locked briefly, never across I/O.
#[derive(Clone)]
pub struct Outbox(Arc<Mutex<ReportBuffer>>);

impl Default for Outbox {
    fn default() -> Self {
        Outbox(Arc::new(Mutex::new(ReportBuffer::new(BUFFER_WINDOWS))))
    }
}

impl Outbox {
    pub(crate) fn lock(&self) -> MutexGuard<'_, ReportBuffer> {
        self.0.lock().expect("outbox lock")
    }

    /// Adds what a predecessor's spool held (sent after asking the
    /// collector what is committed already).
    pub fn restore(&self, windows: Vec<ObservationWindow>, policies: Vec<PolicyWindow>) {
        self.lock().restore(windows, policies);
    }
}

pub struct Reporter {
    opts: ReporterOptions,
    /// Kept across restarts with a state directory (see `spool.rs`).
    agent: String,
    buffer: Outbox,
    client: Option<CollectorClient>,
    /// Windows per request: [`BATCH_WINDOWS`], 1 while a refused request
    /// is narrowed down, doubling back after each accepted one.
    batch_limit: usize,
}

/// A new agent id: the process id and start time.
pub fn new_agent_id() -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{}-{started}", std::process::id())
}

impl Reporter {
    pub fn new(opts: ReporterOptions, agent: String, buffer: Outbox) -> Self {
        Reporter {
            agent,
            opts,
            buffer,
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
        let (batch, sending) =
            self.buffer
                .lock()
                .batch(&self.opts.node, &self.agent, self.batch_limit);
        match client.send(&batch, &self.opts.token_file).await {
            Ok(ack) => {
                metrics
                    .reports
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                self.batch_limit = (self.batch_limit * 2).min(BATCH_WINDOWS);
                let mut buffer = self.buffer.lock();
                buffer.sent(&sending);
                let committed = buffer.ack(&ack);
                metrics.windows_reported.inc_by(committed as u64);
                metrics.report_buffer.set(buffer.len() as i64);
                debug!(
                    sent = sending.windows(),
                    committed,
                    held = buffer.len(),
                    "report exchanged"
                );
                Ok(buffer.has_pending())
            }
            Err(e) if e.is_permanent() => {
                metrics
                    .reports
                    .get_or_create(&ResultLabels { result: e.label() })
                    .inc();
                // Resending the same request would be refused forever, and
                // hold up every later window: narrow it down to single
                // items, and drop (and count) the one refused alone.
                if self.batch_limit > 1 || sending.windows() + sending.policies() > 1 {
                    self.batch_limit = 1;
                    warn!(error = %e, "report refused; sending its windows one at a time");
                } else {
                    let dropped = {
                        let mut buffer = self.buffer.lock();
                        let dropped = buffer.refused(&sending);
                        metrics.report_buffer.set(buffer.len() as i64);
                        dropped
                    };
                    metrics.windows_dropped.inc_by(dropped as u64);
                    warn!(error = %e, windows = dropped, policy_windows = sending.policies(), "the collector refuses this window for good: dropped");
                    // Until the next config: on the node's config status.
                    let message = format!(
                        "the collector refused {dropped} window(s) and {} policy window(s) for good, which were dropped: {e} (see the operator's log and its report_refusals metric; an agent and operator of different versions, or a wrong node clock, are the usual causes)",
                        sending.policies()
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
                Ok(self.buffer.lock().has_pending())
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

    /// Sends what the outbox holds; `wake` says the control loop added
    /// windows (and closes when it stops: one last attempt then).
    pub async fn run(
        mut self,
        mut wake: tokio::sync::mpsc::UnboundedReceiver<()>,
        shared: Shared,
        metrics: Arc<Metrics>,
    ) {
        let mut next = Instant::now();
        let mut backoff = Duration::from_millis(500);
        let mut failing_since: Option<Instant> = None;
        let mut open = true;
        while open || self.buffer.lock().has_pending() {
            shared.beat_reporter();
            tokio::select! {
                c = wake.recv(), if open => match c {
                    Some(()) => {
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
            let idle = {
                let b = self.buffer.lock();
                !b.has_pending() && !b.has_held()
            };
            if idle {
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
                        warn!(error = %e, windows = self.buffer.lock().len(), "shutting down with unreported windows");
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
                        warn!(error = %e, held = self.buffer.lock().len(), "cannot report; retrying with backoff");
                    }
                    let jitter = Duration::from_millis(u64::from(std::process::id() % 250));
                    next = Instant::now() + backoff + jitter;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
