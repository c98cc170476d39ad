//! Compiles the eBPF programs (`flowlens-agent-ebpf`) with aya-build and
//! leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` (for `cargo check` and clippy) writes an empty
//! placeholder instead; such a binary refuses to start its datapath.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        fs::write(out.join("flowlens-agent-ebpf"), [])?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec()?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "flowlens-agent-ebpf")
        .ok_or_else(|| anyhow::anyhow!("flowlens-agent-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("manifest without a parent"))?
        .to_string();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
