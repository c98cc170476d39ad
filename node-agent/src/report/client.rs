//! POSTs report batches to the operator's collector (HTTP or HTTPS, the
//! CA from the config), with the agent's ServiceAccount token.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use flowlens_api::{
    live::{LIVE_POLL_HOLD_SECONDS, LivePush, LiveReply},
    node_agent_config::CollectorEndpoint,
    report::{ReportAck, ReportBatch},
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// Longest a request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error(
        "cannot read the ServiceAccount token {path}: {source} (mount a projected token with audience {audience}, or set --token-file)"
    )]
    Token {
        path: String,
        audience: &'static str,
        source: std::io::Error,
    },
    #[error("spec.collector.caBundle is not a PEM certificate bundle: {0}")]
    CaBundle(String),
    #[error("invalid collector URL {0:?}: {1}")]
    Url(String, String),
    #[error("cannot reach the collector at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the collector at {url} refused the report ({status}): {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("the collector's answer does not parse: {0}")]
    Answer(String),
}

impl SendError {
    /// The collector will refuse the same request again whatever the
    /// retries: malformed (400), too large (413), or content it does not
    /// accept from this node (422).
    pub(crate) fn is_permanent(&self) -> bool {
        matches!(
            self,
            SendError::Refused {
                status: 400 | 413 | 422,
                ..
            }
        )
    }

    pub(crate) fn label(&self) -> &'static str {
        match self {
            SendError::Unreachable { .. } => "unreachable",
            SendError::Refused { status, .. } if *status >= 500 => "unavailable",
            SendError::Refused { .. } => "refused",
            _ => "error",
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for one collector endpoint (rebuilt when the endpoint changes).
pub(crate) struct CollectorClient {
    endpoint: CollectorEndpoint,
    url: hyper::Uri,
    /// `/v1/live` beside the report path.
    live_url: hyper::Uri,
    client: HttpsClient,
}

fn tls_config(ca_bundle: Option<&str>) -> Result<rustls::ClientConfig, SendError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    match ca_bundle {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| SendError::CaBundle(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| SendError::CaBundle(e.to_string()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| SendError::CaBundle(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

impl CollectorClient {
    pub(crate) fn new(endpoint: &CollectorEndpoint) -> Result<Self, SendError> {
        let base = endpoint.url.trim_end_matches('/');
        let full = if base.ends_with("/v1/reports") {
            base.to_owned()
        } else {
            format!("{base}/v1/reports")
        };
        let url: hyper::Uri = full.parse().map_err(|e: hyper::http::uri::InvalidUri| {
            SendError::Url(full.clone(), e.to_string())
        })?;
        let live = format!("{}/v1/live", full.trim_end_matches("/v1/reports"));
        let live_url: hyper::Uri = live
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| SendError::Url(live, e.to_string()))?;
        match url.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(SendError::Url(full, "use http:// or https://".into())),
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(endpoint.ca_bundle.as_deref())?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(CollectorClient {
            endpoint: endpoint.clone(),
            url,
            live_url,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(https),
        })
    }

    pub(crate) fn endpoint(&self) -> &CollectorEndpoint {
        &self.endpoint
    }

    /// Sends one batch; the answer says what the operator committed.
    pub(crate) async fn send(
        &self,
        batch: &ReportBatch,
        token_file: &Path,
    ) -> Result<ReportAck, SendError> {
        self.post(&self.url, batch, token_file, REQUEST_TIMEOUT)
            .await
    }

    /// Posts live records; the collector holds the request while nobody
    /// observes (up to [`LIVE_POLL_HOLD_SECONDS`]).
    pub(crate) async fn send_live(
        &self,
        push: &LivePush,
        token_file: &Path,
    ) -> Result<LiveReply, SendError> {
        let timeout = Duration::from_secs(LIVE_POLL_HOLD_SECONDS) + REQUEST_TIMEOUT;
        self.post(&self.live_url, push, token_file, timeout).await
    }

    async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        url: &hyper::Uri,
        body: &B,
        token_file: &Path,
        timeout: Duration,
    ) -> Result<R, SendError> {
        let token = std::fs::read_to_string(token_file).map_err(|source| SendError::Token {
            path: token_file.display().to_string(),
            audience: flowlens_api::report::REPORT_AUDIENCE,
            source,
        })?;
        let body = serde_json::to_vec(body).expect("a report serializes");
        let req = hyper::Request::post(url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let unreachable = |message: String| SendError::Unreachable {
            url: url.to_string(),
            message,
        };
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|e| unreachable(format!("{e:#}")))?;
        let status = resp.status();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| unreachable("the answer did not complete".into()))?
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(SendError::Refused {
                url: url.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(500).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| SendError::Answer(e.to_string()))
    }
}
