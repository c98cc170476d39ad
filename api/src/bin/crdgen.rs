//! Writes the Flowlens CRDs as YAML, one file per CRD.
//!
//! Usage: `crdgen [DIR]` (default `crds`); `crdgen -` prints all of them to stdout.

use std::{fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let target = std::env::args().nth(1).unwrap_or_else(|| "crds".to_owned());
    if target == "-" {
        for (_, crd) in flowlens_api::crd::all() {
            print!("---\n{}", flowlens_api::crd::to_yaml(&crd));
        }
        return ExitCode::SUCCESS;
    }
    let dir = PathBuf::from(target);
    if let Err(e) = fs::create_dir_all(&dir) {
        eprintln!("crdgen: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (file, crd) in flowlens_api::crd::all() {
        let path = dir.join(file);
        if let Err(e) = fs::write(&path, flowlens_api::crd::to_yaml(&crd)) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
