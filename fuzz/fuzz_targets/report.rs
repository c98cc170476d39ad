//! A JSON agent report body through the collector: decoded, admitted
//! against a fixed cluster, added to the books, merged and written to
//! status (`flowlens_operator::fuzz`, where the invariants are).
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| flowlens_operator::fuzz::report(body));
