use std::{io, path::PathBuf};

/// What can go wrong in the datapath, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this agent binary has no eBPF programs (it was built with AYA_BUILD_SKIP=1): \
         rebuild it with `cargo build -p flowlens-agent`"
    )]
    NoEbpfObject,

    #[error(
        "loading the eBPF object failed (is the agent running as root, on Linux 6.6+ with BTF?): {0}"
    )]
    Load(#[from] aya::EbpfError),

    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("eBPF map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: aya::maps::MapError,
    },

    #[error(
        "the spare tables still hold a predecessor's records: take them (take_leftovers) before draining"
    )]
    LeftoversNotTaken,

    #[error("eBPF link {path}: {message}")]
    Link { path: PathBuf, message: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("the kernel does not support {feature}: {hint}")]
    Unsupported {
        feature: &'static str,
        hint: &'static str,
    },
}

impl DatapathError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        DatapathError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn map(name: impl Into<String>, source: aya::maps::MapError) -> Self {
        DatapathError::Map {
            name: name.into(),
            source,
        }
    }

    /// A short label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            DatapathError::NoEbpfObject => "no_ebpf_object",
            DatapathError::Load(_) => "load",
            DatapathError::Program { .. } => "program",
            DatapathError::Map { .. } => "map",
            DatapathError::Link { .. } => "link",
            DatapathError::LeftoversNotTaken => "leftovers",
            DatapathError::Io { .. } => "io",
            DatapathError::Unsupported { .. } => "unsupported",
        }
    }
}

pub(crate) type Result<T, E = DatapathError> = std::result::Result<T, E>;
