//! Shared test harness for Flowlens' integration and end-to-end tests.
//!
//! - [`cluster`]: a client for the local control plane (`just up`), unique
//!   names, and cleanup that works without a controller-manager.

pub mod cluster;
