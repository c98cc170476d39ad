//! A real OTLP/gRPC metrics receiver, built from the official protocol
//! definitions (`opentelemetry-proto`'s generated tonic service): what an
//! OpenTelemetry Collector's `otlp` receiver accepts, without the collector
//! (no collector binary can be installed here).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    metrics::v1::{metric::Data, number_data_point::Value},
};
use tokio::sync::oneshot;

/// A data point's identity: metric name and sorted attributes.
pub type PointKey = (String, Vec<(String, String)>);

#[derive(Default)]
struct Received {
    requests: u64,
    /// The last value of every point (sums are cumulative, so the last is
    /// the total).
    points: BTreeMap<PointKey, f64>,
    /// `(metric, unit)` as sent.
    units: BTreeMap<String, String>,
    resource: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Service {
    received: Arc<Mutex<Received>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl MetricsService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut r = self.received.lock().unwrap();
        r.requests += 1;
        for rm in &request.get_ref().resource_metrics {
            if let Some(res) = &rm.resource {
                r.resource = res
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                    .collect();
            }
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    r.units.insert(m.name.clone(), m.unit.clone());
                    let points = match &m.data {
                        Some(Data::Sum(s)) => &s.data_points,
                        Some(Data::Gauge(g)) => &g.data_points,
                        _ => continue,
                    };
                    for p in points {
                        let mut attrs: Vec<(String, String)> = p
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect();
                        attrs.sort();
                        let v = match p.value {
                            Some(Value::AsInt(i)) => i as f64,
                            Some(Value::AsDouble(d)) => d,
                            None => continue,
                        };
                        r.points.insert((m.name.clone(), attrs), v);
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The receiver; stops on drop.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    service: Service,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// Listens on a free loopback port (call within a tokio runtime).
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = Service::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(service.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(server);
        Ok(OtlpReceiver {
            addr,
            service,
            _stop: stop,
        })
    }

    /// Export requests received.
    pub fn requests(&self) -> u64 {
        self.service.received.lock().unwrap().requests
    }

    /// The last values of `metric`'s points whose attributes include every
    /// `(key, value)` of `with`.
    pub fn values(&self, metric: &str, with: &[(&str, &str)]) -> Vec<(Vec<(String, String)>, f64)> {
        let r = self.service.received.lock().unwrap();
        r.points
            .iter()
            .filter(|((name, attrs), _)| {
                name == metric
                    && with
                        .iter()
                        .all(|(k, v)| attrs.iter().any(|(ak, av)| ak == k && av == v))
            })
            .map(|((_, attrs), v)| (attrs.clone(), *v))
            .collect()
    }

    /// The sum of [`Self::values`].
    pub fn sum(&self, metric: &str, with: &[(&str, &str)]) -> f64 {
        self.values(metric, with).iter().map(|(_, v)| v).sum()
    }

    /// The unit `metric` was sent with.
    pub fn unit(&self, metric: &str) -> Option<String> {
        self.service
            .received
            .lock()
            .unwrap()
            .units
            .get(metric)
            .cloned()
    }

    /// The resource attributes of the last export.
    pub fn resource(&self) -> Vec<(String, String)> {
        self.service.received.lock().unwrap().resource.clone()
    }
}
