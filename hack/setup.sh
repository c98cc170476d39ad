#!/usr/bin/env bash
# Installs what building and testing Flowlens needs on a Debian 12 machine,
# skipping whatever is already there (a warm run takes about a second):
# Debian packages (traffic tools, bpftool, etcd, openssl, Lua 5.1 for the
# Argo CD health checks, Prometheus for the metrics tests), the nightly Rust toolchain with rust-src,
# bpf-linker 0.10.1, cargo-nextest, cargo-fuzz.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

packages=(iperf3 iputils-ping netcat-openbsd nftables conntrack iproute2 bpftool
          etcd-server openssl curl jq socat ethtool hyperfine lua5.1 prometheus
          dnsmasq-base)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $EUID -eq 0 ]] || { log "need root to install: ${missing[*]}"; exit 1; }
  log "installing Debian packages: ${missing[*]}"
  aptlog=$(mktemp)
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >"$aptlog" 2>&1; then
    tail -n 20 "$aptlog" >&2; log "apt-get failed (log: $aptlog)"; exit 1
  fi
  rm -f "$aptlog"
fi

if ! command -v kubectl >/dev/null; then
  # Preinstalled on the project's machines; Debian's own is 1.20.
  [[ $EUID -eq 0 ]] || { log "need root to install kubectl (kubernetes-client)"; exit 1; }
  log "installing kubectl (Debian's kubernetes-client)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q kubernetes-client >&2
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  log "installing the nightly Rust toolchain (for the eBPF programs)"
  rustup toolchain install nightly --profile minimal --component rust-src >&2
elif ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly >&2
fi

if ! command -v bpf-linker >/dev/null || ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.'; then
  # 0.10.x links against the LLVM inside the Rust toolchain; 0.11+ needs a
  # system LLVM that Debian 12 does not have.
  log "installing bpf-linker 0.10.1 (about 1 minute)"
  cargo install bpf-linker@0.10.1 --locked >&2
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked >&2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked >&2
fi
