//! Prometheus metrics of the operator: its own workings
//! (`flowlens_operator_*`) and the results of observations and policies
//! ([`ResultMetrics`]: `flowlens_observation_*`, `flowlens_flow_*`,
//! `flowlens_policy_*`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::result_metrics::ResultMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WriteLabels {
    pub resource: &'static str,
    pub verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PartLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) reconciles: Family<ControllerLabels, Counter>,
    pub(crate) reconcile_errors: Family<ErrorLabels, Counter>,
    pub(crate) reconcile_seconds: Family<ControllerLabels, Histogram>,
    /// Every write the operator makes to the API server.
    pub(crate) api_writes: Family<WriteLabels, Counter>,
    pub(crate) compile_seconds: Histogram,
    pub(crate) watch_events: Family<KindLabels, Counter>,
    /// 1 while a kind's watch is failing (its view is stale), else 0.
    pub(crate) watch_stale: Family<KindLabels, Gauge>,
    /// 1 while window deadlines wait for reports that cannot be verified.
    pub(crate) deadlines_paused: Gauge,
    /// Report requests, by outcome.
    pub(crate) reports: Family<KindLabels, Counter>,
    /// Window parts received, by kind and outcome (stored, late, unknown).
    pub(crate) report_parts: Family<PartLabels, Counter>,
    /// Batches, parts and policy entries refused by admission, by reason.
    pub(crate) report_refusals: Family<RefusalLabels, Counter>,
    pub(crate) open_parts: Gauge,
    pub(crate) windows_finalized: Counter,
    pub(crate) merge_seconds: Histogram,
    /// Live records from agents, by outcome (admitted, dropped, lost: the
    /// agent's buffer overflowed).
    pub(crate) live_records: Family<KindLabels, Counter>,
    /// Readers of the live API now.
    pub(crate) live_readers: Gauge,
    /// Each observation's and policy's series.
    pub results: ResultMetrics,
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let results = ResultMetrics::default();
        root.register_collector(Box::new(results.clone()));
        let registry = root.sub_registry_with_prefix("flowlens_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_seconds = Family::<ControllerLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let api_writes = Family::<WriteLabels, Counter>::default();
        let compile_seconds = duration_histogram();
        let watch_events = Family::<KindLabels, Counter>::default();
        let watch_stale = Family::<KindLabels, Gauge>::default();
        let deadlines_paused = Gauge::default();
        let reports = Family::<KindLabels, Counter>::default();
        let report_parts = Family::<PartLabels, Counter>::default();
        let report_refusals = Family::<RefusalLabels, Counter>::default();
        for r in crate::collect::admission::Refusal::ALL {
            // Every reason is exported, at 0 until it happens.
            let _ = report_refusals.get_or_create(&RefusalLabels { reason: r.label() });
        }
        let open_parts = Gauge::default();
        let windows_finalized = Counter::default();
        let merge_seconds = duration_histogram();
        let live_records = Family::<KindLabels, Counter>::default();
        let live_readers = Gauge::default();
        registry.register(
            "live_records",
            "Live records from agents, by outcome (admitted, dropped by admission, lost in the agent's buffer)",
            live_records.clone(),
        );
        registry.register(
            "live_readers",
            "Readers of the live flows API now",
            live_readers.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciliations, by controller",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by controller and reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconciliation time, by controller",
            reconcile_seconds.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the API server, by resource and verb",
            api_writes.clone(),
        );
        registry.register(
            "compile_duration_seconds",
            "Time to compile the configs of the changed nodes",
            compile_seconds.clone(),
        );
        registry.register(
            "watch_events",
            "Watch events received, by kind",
            watch_events.clone(),
        );
        registry.register(
            "watch_stale",
            "1 while the watch of a kind fails and the operator's view of it may be stale (an API-server outage), else 0",
            watch_stale.clone(),
        );
        registry.register(
            "window_deadlines_paused",
            "1 while window deadlines wait because agents' reports cannot be verified (the API server cannot review tokens), else 0",
            deadlines_paused.clone(),
        );
        registry.register(
            "reports",
            "Agent reports received, by outcome",
            reports.clone(),
        );
        registry.register(
            "report_parts",
            "Window parts received from agents, by kind and outcome (late: after the window was final; counted: already in status, sent again after an operator restart)",
            report_parts.clone(),
        );
        registry.register(
            "report_refusals",
            "Report batches, window parts and policy entries refused, by reason (see operator/src/collect/admission.rs)",
            report_refusals.clone(),
        );
        registry.register(
            "open_window_parts",
            "Window parts held until their window is final",
            open_parts.clone(),
        );
        registry.register(
            "windows_finalized",
            "Observation windows merged across nodes",
            windows_finalized.clone(),
        );
        registry.register(
            "merge_duration_seconds",
            "Time to merge one observation window",
            merge_seconds.clone(),
        );
        Metrics {
            registry: root,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            api_writes,
            compile_seconds,
            watch_events,
            watch_stale,
            deadlines_paused,
            reports,
            report_parts,
            report_refusals,
            open_parts,
            windows_finalized,
            merge_seconds,
            live_records,
            live_readers,
            results,
        }
    }

    /// Counts a reconciliation of `controller`.
    pub(crate) fn reconciling(&self, controller: &'static str) {
        self.reconciles
            .get_or_create(&ControllerLabels { controller })
            .inc();
    }

    /// Records how long a reconciliation of `controller` took.
    pub(crate) fn reconciled(&self, controller: &'static str, started: std::time::Instant) {
        self.reconcile_seconds
            .get_or_create(&ControllerLabels { controller })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts a failed reconciliation of `controller`, by reason.
    pub(crate) fn failed(&self, controller: &'static str, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { controller, reason })
            .inc();
    }

    pub(crate) fn wrote(&self, resource: &'static str, verb: &'static str) {
        self.api_writes
            .get_or_create(&WriteLabels { resource, verb })
            .inc();
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
