//! OpenTelemetry: the results of observations and policies (what
//! [`ResultMetrics`] holds for Prometheus) pushed over OTLP/gRPC.
//!
//! On when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set, or with `--otlp-endpoint`.
//! The standard variables apply (`OTEL_EXPORTER_OTLP_*` for the endpoint,
//! headers, timeout, compression; `OTEL_METRIC_EXPORT_INTERVAL`, 60 s by
//! default; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`).
//!
//! Every counter is a cumulative OTLP sum with the same attributes as the
//! Prometheus series (`observation`, the flow's `source_*`,
//! `destination_*`, `port`, `protocol`, `service`; `namespace` and
//! `policy`). OpenTelemetry has no asynchronous histogram, so RTT is sent
//! as a gauge of the last window's percentiles (`quantile` 0.5, 0.95, 0.99)
//! rather than as buckets.

use opentelemetry::{
    KeyValue,
    metrics::{Meter, MeterProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider};

use crate::result_metrics::{
    CounterDef, FLOW_COUNTERS, Labels, OBSERVATION_COUNTERS, POLICY_COUNTERS, ResultMetrics,
};

/// True when the environment names an OTLP endpoint.
pub fn configured_by_env() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Starts exporting `results` (over gRPC, to `endpoint` or the one the
/// environment names). Shut the provider down to send the last values.
pub fn start(
    results: &ResultMetrics,
    endpoint: Option<&str>,
) -> Result<SdkMeterProvider, opentelemetry_otlp::ExporterBuildError> {
    let mut exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic();
    if let Some(e) = endpoint {
        exporter = exporter.with_endpoint(e);
    }
    let exporter = exporter.build()?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("flowlens-operator");
    }
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter)
        .with_resource(resource.build())
        .build();
    register(&provider.meter("flowlens"), results);
    Ok(provider)
}

fn flow_attributes(observation: &str, labels: &Labels) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(labels.len() + 1);
    a.push(KeyValue::new("observation", observation.to_owned()));
    a.extend(
        labels
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    a
}

/// What a family's callback reads: each series' attributes and counters.
type Visit<T> = fn(&ResultMetrics, &mut dyn FnMut(Vec<KeyValue>, &T));

/// One observable counter per definition, reading its series with `visit`.
fn counters<T: 'static>(
    meter: &Meter,
    defs: &'static [CounterDef<T>],
    results: &ResultMetrics,
    visit: Visit<T>,
) {
    for c in defs {
        let (r, value) = (results.clone(), c.value);
        meter
            .u64_observable_counter(c.otlp)
            .with_unit(c.unit)
            .with_description(c.help)
            .with_callback(move |o| visit(&r, &mut |attrs, t| o.observe(value(t), &attrs)))
            .build();
    }
}

/// Registers the instruments; their callbacks read `results` at each
/// export.
fn register(meter: &Meter, results: &ResultMetrics) {
    counters(meter, &OBSERVATION_COUNTERS, results, |r, f| {
        r.each_observation(|obs, t| f(vec![KeyValue::new("observation", obs.to_owned())], t))
    });
    counters(meter, &FLOW_COUNTERS, results, |r, f| {
        r.each_flow(|obs, labels, c| f(flow_attributes(obs, labels), c))
    });
    counters(meter, &POLICY_COUNTERS, results, |r, f| {
        r.each_policy(|(namespace, policy), c| {
            f(
                vec![
                    KeyValue::new("namespace", namespace.clone()),
                    KeyValue::new("policy", policy.clone()),
                ],
                c,
            )
        })
    });
    let r = results.clone();
    meter
        .f64_observable_gauge("flowlens.observation.rtt")
        .with_unit("s")
        .with_description(
            "TCP smoothed RTT percentiles of the observation's last window with samples",
        )
        .with_callback(move |o| {
            r.each_observation(|obs, t| {
                let Some(l) = &t.last_rtt else { return };
                for (q, micros) in [
                    ("0.5", l.p50_micros),
                    ("0.95", l.p95_micros),
                    ("0.99", l.p99_micros),
                ] {
                    o.observe(
                        micros as f64 / 1e6,
                        &[
                            KeyValue::new("observation", obs.to_owned()),
                            KeyValue::new("quantile", q),
                        ],
                    );
                }
            })
        })
        .build();
}

/// Sends what is left and stops (blocking: call off the async runtime).
pub fn shutdown(provider: SdkMeterProvider) {
    if let Err(e) = provider.shutdown() {
        tracing::warn!(error = %e, "OTLP export did not shut down cleanly");
    }
}
