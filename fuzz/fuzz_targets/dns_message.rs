//! A DNS payload, as a hostile pod would send it, through the agent's
//! parser and query/answer tracker (`flowlens_agent::fuzz::dns_message`,
//! where the bounds are asserted).
#![no_main]

libfuzzer_sys::fuzz_target!(|payload: &[u8]| flowlens_agent::fuzz::dns_message(payload));
