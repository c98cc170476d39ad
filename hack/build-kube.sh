#!/usr/bin/env bash
# Builds Kubernetes 1.20.2 components offline from Debian bookworm's source
# package and caches them. Prints the directory holding them on stdout; progress
# goes to stderr. Recipe: ../shared/ENVIRONMENT.md ("A real Kubernetes API
# server, without downloads", "A real node").
#
#   hack/build-kube.sh apiserver   kube-apiserver (+ a link to Debian's etcd)
#   hack/build-kube.sh node        also kubelet, kube-proxy,
#                                  kube-controller-manager, kube-scheduler
#
#   FLOWLENS_CACHE_DIR   where binaries are cached (default /var/cache/flowlens)
set -euo pipefail

cache_dir="${FLOWLENS_CACHE_DIR:-/var/cache/flowlens}"
k8s_version="1.20.2"
deb_version="1.20.5+really1.20.2-1.1+deb12u1"
out_dir="$cache_dir/kube-$k8s_version"

log() { printf '[build-kube] %s\n' "$*" >&2; }

what="${1:-apiserver}"
node_bins=(kubelet kube-proxy kube-controller-manager kube-scheduler)
have_all() {
  [[ -x "$out_dir/kube-apiserver" && -x "$out_dir/etcd" ]] || return 1
  if [[ "$what" == node ]]; then
    local b
    for b in "${node_bins[@]}"; do [[ -x "$out_dir/$b" ]] || return 1; done
  fi
}
case "$what" in
  apiserver|node) ;;
  *) log "usage: $0 apiserver|node"; exit 2 ;;
esac

if have_all; then
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

mkdir -p "$out_dir"
if [[ ! -x "$out_dir/kube-apiserver" ]]; then
  log "compiling kube-apiserver (about 4 minutes on 2 cores, once per machine)"
  start=$(date +%s)
  GOPATH="$PWD/.go" CGO_ENABLED=0 make WHAT=cmd/kube-apiserver >&2
  log "compiled in $(( $(date +%s) - start ))s"
  cp _output/bin/kube-apiserver "$out_dir/kube-apiserver.tmp"
  mv "$out_dir/kube-apiserver.tmp" "$out_dir/kube-apiserver"
fi
ln -sf "$(command -v etcd)" "$out_dir/etcd"

if [[ "$what" == node ]]; then
  # providerless,dockerless: no cloud providers, no dockershim (containerd
  # speaks CRI itself).
  log "compiling ${node_bins[*]} (about 1-3 minutes after the API server, once per machine)"
  start=$(date +%s)
  whats=$(printf 'cmd/%s ' "${node_bins[@]}")
  GOPATH="$PWD/.go" CGO_ENABLED=0 make WHAT="${whats% }" GOFLAGS=-tags=providerless,dockerless >&2
  log "compiled in $(( $(date +%s) - start ))s"
  for b in "${node_bins[@]}"; do
    cp "_output/bin/$b" "$out_dir/$b.tmp"
    mv "$out_dir/$b.tmp" "$out_dir/$b"
  done
fi
log "cached in $out_dir"
echo "$out_dir"
