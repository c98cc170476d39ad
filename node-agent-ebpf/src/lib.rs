//! This library target only exists so that the agent can name this crate as a
//! build dependency (see `node-agent/build.rs`); the programs are in `main.rs`.
#![no_std]
