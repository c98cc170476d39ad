//! Sends completed windows to the operator's collector.
//!
//! Windows wait in a bounded buffer until the operator acknowledges them as
//! committed; a full buffer drops the oldest window and counts it.

use std::{collections::VecDeque, path::PathBuf, sync::Arc};

use flowlens_api::report::{ObservationWindow, PolicyWindow};
use tracing::debug;

use crate::{control::Completed, metrics::Metrics, state::Shared};

/// Windows kept while the collector is unreachable.
pub const BUFFER_WINDOWS: usize = 256;

#[derive(Clone, Debug)]
pub struct ReporterOptions {
    pub node: String,
    pub collector_url: Option<String>,
    pub token_file: PathBuf,
    /// Standalone mode: nothing to report to (windows are served by `dump`).
    pub standalone: bool,
}

pub struct Reporter {
    opts: ReporterOptions,
    windows: VecDeque<ObservationWindow>,
    policies: VecDeque<PolicyWindow>,
}

impl Reporter {
    pub fn new(opts: ReporterOptions) -> Self {
        Reporter {
            opts,
            windows: VecDeque::new(),
            policies: VecDeque::new(),
        }
    }

    pub async fn run(
        mut self,
        mut completed: tokio::sync::mpsc::UnboundedReceiver<Completed>,
        _shared: Shared,
        metrics: Arc<Metrics>,
    ) {
        while let Some(c) = completed.recv().await {
            if self.opts.standalone && self.opts.collector_url.is_none() {
                debug!(
                    windows = c.windows.len(),
                    "standalone: windows are served by /debug/window only"
                );
                continue;
            }
            self.windows.extend(c.windows);
            self.policies.extend(c.policies);
            while self.windows.len() > BUFFER_WINDOWS {
                self.windows.pop_front();
                metrics.windows_dropped.inc();
            }
            while self.policies.len() > BUFFER_WINDOWS {
                self.policies.pop_front();
            }
        }
    }
}
