//! The operator's error type. Every variant has a short label for the
//! failure counter, so errors are countable, not just loggable.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),

    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "the Flowlens CRDs are not installed in this cluster: install them with \
         `kubectl apply --server-side -f crds/` from the Flowlens repository (or `just up` for the local control plane)"
    )]
    CrdsMissing,
}

impl Error {
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(e)) if e.code == 422 => "invalid",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Serialize { .. } => "serialize",
            Error::CrdsMissing => "crds_missing",
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
