//! DNS of traced pods. The TC programs copy the queries a traced pod sends
//! to port 53 and the answers it receives (UDP and TCP, at most 512 bytes
//! of each, within a per-CPU budget) into a ring buffer; the control loop
//! reads it every 200 ms and before each drain ([`capture`]) and parses
//! each copy ([`message`]); the aggregator matches answers to queries and
//! learns names ([`tracker`]).
//!
//! What users get: per observation, queries, answers by response code,
//! query-to-answer latency and the names asked most; and the name a pod
//! resolved on every series to an external address (`name:` in status).

pub(crate) mod capture;
pub(crate) mod message;
pub(crate) mod tracker;
