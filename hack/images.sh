#!/usr/bin/env bash
# Container images, built offline from Debian packages and this repository,
# saved as docker-archive tarballs in $FLOWLENS_CACHE_DIR/images and imported
# into the cluster's containerd.
#
#   hack/images.sh build-base         pause, flowlens-base (distroless/cc-like),
#                                     flowlens-testbox (cached: built once)
#   hack/images.sh build BIN_DIR      flowlens-operator:dev and flowlens-agent:dev
#                                     from the binaries in BIN_DIR (rebuilt when
#                                     a binary changed)
#   hack/images.sh import SOCKET      import every image into containerd (k8s.io)
#
# Image names: localhost/pause:3.2, flowlens-testbox:dev, flowlens-operator:dev,
# flowlens-agent:dev (docker.io/library/... to containerd).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="${FLOWLENS_CACHE_DIR:-/var/cache/flowlens}/images"
kube_src="${FLOWLENS_CACHE_DIR:-/var/cache/flowlens}/src/kubernetes-1.20.2"
mirror="${FLOWLENS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Bump to rebuild the cached base images.
base_version=2

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_tools() {
  local p missing=()
  for p in buildah mmdebstrap; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >&2
}

# build_image REF CONTAINERFILE CONTEXT OUT [buildah args...]: a tarball with REF.
build_image() {
  local ref=$1 file=$2 ctx=$3 out=$4; shift 4
  buildah bud --quiet --layers=false --pull-never -f "$file" -t "$ref" "$@" "$ctx" >/dev/null
  rm -f "$out.tmp"
  buildah push --quiet "$ref" "docker-archive:$out.tmp:$ref" >/dev/null
  buildah rmi "$ref" >/dev/null
  mv "$out.tmp" "$out"
}

build_base() {
  mkdir -p "$cache"
  [[ -f "$cache/stamp-base" && $(cat "$cache/stamp-base") == "$base_version" ]] && return 0
  ensure_tools
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN

  log "pause image (gcc -static, seconds)"
  [[ -f "$kube_src/build/pause/linux/pause.c" ]] || die "no Kubernetes source at $kube_src: run hack/build-kube.sh node"
  mkdir -p "$work/pause"
  gcc -Os -static -o "$work/pause/pause" -DVERSION=v3.2-flowlens "$kube_src/build/pause/linux/pause.c"
  build_image localhost/pause:3.2 "$repo/hack/images/pause.Containerfile" "$work/pause" "$cache/pause.tar"

  log "flowlens-base (libc6, libgcc-s1 from Debian; about 20 s)"
  mkdir -p "$work/base"
  # shellcheck disable=SC2016
  mmdebstrap --quiet --variant=extract --include=libc6,libgcc-s1 \
    --customize-hook='mkdir -p "$1/etc" "$1/tmp" && chmod 1777 "$1/tmp"' \
    --customize-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" > "$1/etc/passwd"' \
    --customize-hook='printf "root:x:0:\nnonroot:x:65532:\n" > "$1/etc/group"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$work/base/rootfs.tar" "$mirror" >&2
  build_image flowlens-base:dev "$repo/hack/images/base.Containerfile" "$work/base" "$cache/flowlens-base.tar"

  log "flowlens-testbox (Debian minbase + iperf3, netcat, curl, iproute2; about 40 s)"
  mkdir -p "$work/testbox"
  # shellcheck disable=SC2016
  mmdebstrap --quiet --variant=minbase --include=iperf3,netcat-openbsd,iproute2,procps,curl,iputils-ping \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm "$work/testbox/rootfs.tar" "$mirror" >&2
  build_image flowlens-testbox:dev "$repo/hack/images/testbox.Containerfile" "$work/testbox" "$cache/flowlens-testbox.tar"
  echo "$base_version" > "$cache/stamp-base"
}

build_flowlens() {
  local bin_dir=$1 name file
  build_base
  for name in flowlens-operator flowlens-agent; do
    [[ -x "$bin_dir/$name" ]] || die "$bin_dir/$name is missing: build it first (cargo build --release -p $name)"
    local sum
    sum=$(sha256sum "$bin_dir/$name" "$repo/operator/Containerfile" "$repo/node-agent/Containerfile" | sha256sum | cut -c1-16)
    [[ -f "$cache/$name.tar" && -f "$cache/stamp-$name" && $(cat "$cache/stamp-$name") == "$sum" ]] && continue
    local work
    work=$(mktemp -d)
    cp "$bin_dir/$name" "$work/"
    file="$repo/operator/Containerfile"; [[ $name == flowlens-agent ]] && file="$repo/node-agent/Containerfile"
    log "$name:dev"
    local base
    base=$(buildah pull --quiet "docker-archive:$cache/flowlens-base.tar")
    build_image "$name:dev" "$file" "$work" "$cache/$name.tar" --build-arg "BASE=$base"
    buildah rmi "$base" >/dev/null 2>&1 || true
    rm -rf "$work"
    echo "$sum" > "$cache/stamp-$name"
  done
}

import_all() {
  local sock=$1 tar n=0
  for tar in "$cache"/pause.tar "$cache"/flowlens-testbox.tar "$cache"/flowlens-operator.tar "$cache"/flowlens-agent.tar; do
    [[ -f "$tar" ]] || continue
    ctr --address "$sock" -n k8s.io images import "$tar" >/dev/null
    n=$((n + 1))
  done
  log "imported $n images into containerd"
}

case "${1:-}" in
  build-base) build_base ;;
  build) build_flowlens "${2:?usage: $0 build BIN_DIR}" ;;
  import) import_all "${2:?usage: $0 import SOCKET}" ;;
  *) echo "usage: $0 build-base | build BIN_DIR | import SOCKET" >&2; exit 2 ;;
esac
