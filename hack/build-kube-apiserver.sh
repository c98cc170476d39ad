#!/usr/bin/env bash
# Builds kube-apiserver 1.20.2 offline from Debian bookworm's source package and
# caches it. Prints the directory holding `kube-apiserver` and `etcd` on stdout;
# progress goes to stderr. Recipe: ../shared/ENVIRONMENT.md ("A real Kubernetes
# API server, without downloads").
#
#   FLOWLENS_CACHE_DIR   where binaries are cached (default /var/cache/flowlens)
set -euo pipefail

cache_dir="${FLOWLENS_CACHE_DIR:-/var/cache/flowlens}"
k8s_version="1.20.2"
deb_version="1.20.5+really1.20.2-1.1+deb12u1"
out_dir="$cache_dir/kube-$k8s_version"

log() { printf '[build-kube-apiserver] %s\n' "$*" >&2; }

if [[ -x "$out_dir/kube-apiserver" && -x "$out_dir/etcd" ]]; then
  echo "$out_dir"
  exit 0
fi

if [[ $EUID -ne 0 ]]; then
  log "building kube-apiserver needs root (apt-get); rerun as root or set KUBEBUILDER_ASSETS"
  exit 1
fi

ensure_deb_src() {
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    log "adding a deb-src entry for bookworm"
    cat > /etc/apt/sources.list.d/flowlens-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -q >&2
  fi
}

ensure_deb_src
log "installing build dependencies (golang-go, etcd-server, reflect2)"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev dpkg-dev >&2

work="$cache_dir/src"
mkdir -p "$work"
cd "$work"
tree="$work/kubernetes-$k8s_version"
if [[ ! -d "$tree" ]]; then
  log "downloading the Kubernetes $k8s_version source package from Debian"
  apt-get source --download-only "kubernetes=$deb_version" >&2
  orig=$(ls kubernetes_*.orig.tar.* | head -n1)
  rm -rf "$tree.tmp" && mkdir -p "$tree.tmp"
  log "unpacking $orig"
  tar -xf "$orig" -C "$tree.tmp" --strip-components=1
  mv "$tree.tmp" "$tree"
fi

cd "$tree"
# The vendored reflect2 1.0.1 crashes the apiserver under Go 1.19 (SIGSEGV in
# map iteration); Debian ships 1.0.2.
if ! grep -qs 'reflect2 1.0.2' .flowlens-patched 2>/dev/null; then
  log "replacing vendored modern-go/reflect2 with Debian's 1.0.2"
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  rm -f vendor/github.com/modern-go/reflect2/go.mod
  echo 'reflect2 1.0.2' > .flowlens-patched
fi
mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes

log "compiling kube-apiserver (about 4 minutes on 2 cores, once per machine)"
start=$(date +%s)
GOPATH="$PWD/.go" CGO_ENABLED=0 make WHAT=cmd/kube-apiserver >&2
log "compiled in $(( $(date +%s) - start ))s"

mkdir -p "$out_dir.tmp"
cp _output/bin/kube-apiserver "$out_dir.tmp/kube-apiserver"
ln -sf "$(command -v etcd)" "$out_dir.tmp/etcd"
rm -rf "$out_dir" && mv "$out_dir.tmp" "$out_dir"
log "cached in $out_dir"
echo "$out_dir"
