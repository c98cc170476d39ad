//! Compiles the eBPF programs (`flowlens-agent-ebpf`) with aya-build and
//! leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` (for `cargo check` and clippy) writes an empty
//! placeholder instead; such a binary refuses to start its datapath.
//!
//! aya-build turns every line the eBPF build prints into a `cargo:warning`
//! (about 40 `Compiling ...` lines). They are captured and shown only when
//! the eBPF build fails; its other directives (`rerun-if-changed`) pass
//! through.

use std::{
    env, fs,
    io::{Seek, Write},
    os::fd::AsRawFd,
    path::PathBuf,
};

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
    let (result, printed) = capture_stdout(|| {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: ebpf.name.as_str(),
                root_dir: &root_dir,
                ..Default::default()
            }],
            aya_build::Toolchain::default(),
        )
    })?;
    for line in printed.lines() {
        if result.is_err() || !line.starts_with("cargo:warning=") {
            println!("{line}");
        }
    }
    result
}

/// Runs `f` with the process's stdout (where build scripts print cargo
/// directives) going to a temporary file, and returns what it printed.
fn capture_stdout<T>(f: impl FnOnce() -> T) -> anyhow::Result<(T, String)> {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let path = out.join("aya-build.stdout");
    let mut file = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::io::stdout().flush()?;
    // SAFETY: plain descriptor duplication; `saved` is restored below.
    let saved = unsafe { libc::dup(libc::STDOUT_FILENO) };
    anyhow::ensure!(saved >= 0, "dup(stdout) failed");
    // SAFETY: `file` stays open while it replaces stdout.
    anyhow::ensure!(
        unsafe { libc::dup2(file.as_raw_fd(), libc::STDOUT_FILENO) } >= 0,
        "dup2(stdout) failed"
    );
    let value = f();
    std::io::stdout().flush()?;
    // SAFETY: restores the descriptor saved above, then closes the copy.
    unsafe {
        libc::dup2(saved, libc::STDOUT_FILENO);
        libc::close(saved);
    }
    file.rewind()?;
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut file, &mut printed)?;
    Ok((value, printed))
}
