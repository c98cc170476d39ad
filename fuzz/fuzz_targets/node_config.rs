//! A JSON `NodeAgentConfigSpec` through the agent's compiler of kernel
//! tables (`flowlens_agent::fuzz`, where the bounds are asserted).
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| flowlens_agent::fuzz::node_config(body));
