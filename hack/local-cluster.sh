#!/usr/bin/env bash
# A real Kubernetes control plane on loopback: etcd + kube-apiserver with TLS
# (its own CA), client-certificate and service-account-token authentication,
# and RBAC. No kubelet, scheduler or controller-manager: tests and the demo
# create Nodes and Pods themselves.
#
#   hack/local-cluster.sh up      start (idempotent), install CRDs, print KUBECONFIG
#   hack/local-cluster.sh down    stop everything it started, remove its state
#   hack/local-cluster.sh status  say whether it runs
#
# Binaries: $KUBEBUILDER_ASSETS/{etcd,kube-apiserver} when set, otherwise built
# once from Debian's packages (hack/build-kube.sh) and cached in
# $FLOWLENS_CACHE_DIR (default /var/cache/flowlens).
# With USE_EXISTING_CLUSTER=true, `up` only installs the CRDs into the cluster
# $KUBECONFIG points at (the envtest convention) and starts nothing.
#
# State lives in .flowlens/ at the repository root (git-ignored):
#   kubeconfig, pki/, etcd/, logs/, run/*.pid
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="$repo/.flowlens"
pki="$state/pki"
logs="$state/logs"
run="$state/run"
kubeconfig="$state/kubeconfig"
etcd_port="${FLOWLENS_ETCD_PORT:-23790}"
etcd_peer_port="${FLOWLENS_ETCD_PEER_PORT:-23800}"
api_port="${FLOWLENS_APISERVER_PORT:-16443}"
# Extra IP SANs of the serving certificate: the end-to-end tests reach the API
# server from network namespaces through this gateway address.
extra_sans="${FLOWLENS_APISERVER_EXTRA_SANS:-10.250.0.1}"

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { [[ -f "$run/$1.pid" ]] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

tail_log() {
  log "last lines of $logs/$1.log:"
  tail -n 25 "$logs/$1.log" >&2 || true
}

find_binaries() {
  if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    [[ -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]] \
      || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks etcd or kube-apiserver"
    bin_dir="$KUBEBUILDER_ASSETS"
  else
    bin_dir=$("$repo/hack/build-kube.sh" apiserver)
  fi
}

make_pki() {
  [[ -f "$pki/admin.crt" ]] && return 0
  command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
  log "creating a CA, the serving certificate and the admin client certificate"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -days 3650 -subj "/CN=flowlens-local-ca" -out ca.crt 2>/dev/null
    local sans="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:::1,IP:10.96.0.1"
    local ip
    for ip in ${extra_sans//,/ }; do sans="$sans,IP:$ip"; done
    openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key 2>/dev/null
    openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$sans" > apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out admin.key 2>/dev/null
    openssl req -new -key admin.key -subj "/O=system:masters/CN=flowlens-admin" -out admin.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n' > admin.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile admin.ext -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
}

# API aggregation (the live flows API): the API server proxies to aggregated
# servers with a client certificate of this CA, which they trust for the
# X-Remote-User/X-Remote-Group headers naming the user.
make_front_proxy_pki() {
  [[ -f "$pki/front-proxy-client.crt" ]] && return 0
  log "creating the front-proxy CA and client certificate (API aggregation)"
  "$repo/hack/front-proxy-pki.sh" "$pki"
}

write_kubeconfig() {
  local b64="base64 -w0"
  cat > "$kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: flowlens-local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $($b64 < "$pki/ca.crt")
users:
- name: flowlens-admin
  user:
    client-certificate-data: $($b64 < "$pki/admin.crt")
    client-key-data: $($b64 < "$pki/admin.key")
contexts:
- name: flowlens-local
  context: {cluster: flowlens-local, user: flowlens-admin}
current-context: flowlens-local
EOF
  chmod 600 "$kubeconfig.tmp"
  mv "$kubeconfig.tmp" "$kubeconfig"
}

start_etcd() {
  pid_alive etcd && return 0
  log "starting etcd on 127.0.0.1:$etcd_port"
  mkdir -p "$state/etcd"
  setsid "$bin_dir/etcd" \
    --name flowlens-local \
    --data-dir "$state/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "flowlens-local=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync \
    > "$logs/etcd.log" 2>&1 < /dev/null &
  echo $! > "$run/etcd.pid"
  local i
  for i in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q true; then return 0; fi
    pid_alive etcd || { tail_log etcd; die "etcd exited"; }
    sleep 0.1
  done
  tail_log etcd
  die "etcd did not become healthy within 10s"
}

start_apiserver() {
  pid_alive kube-apiserver && return 0
  log "starting kube-apiserver on https://127.0.0.1:$api_port"
  setsid "$bin_dir/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --secure-port "$api_port" \
    --insecure-port 0 \
    --tls-cert-file "$pki/apiserver.crt" \
    --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --disable-admission-plugins ServiceAccount \
    --allow-privileged=true \
    --profiling=false \
    --cert-dir "$state/apiserver-certs" \
    --requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$pki/front-proxy-client.crt" \
    --proxy-client-key-file "$pki/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    > "$logs/kube-apiserver.log" 2>&1 < /dev/null &
  echo $! > "$run/kube-apiserver.pid"
}

wait_ready() {
  log "waiting for /readyz (usually 5-15 s)"
  local i
  for i in $(seq 1 600); do
    if curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
        "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      return 0
    fi
    pid_alive kube-apiserver || { tail_log kube-apiserver; die "kube-apiserver exited"; }
    sleep 0.1
  done
  tail_log kube-apiserver
  die "kube-apiserver was not ready within 60s"
}

install_crds() {
  local kc="$1"
  log "installing the Flowlens CRDs"
  # --validate=false: kubectl's client-side validation does not know the CEL
  # rules (x-kubernetes-validations) when the server is older than 1.25; such
  # a server drops them and enforces the rest of the schema.
  kubectl --kubeconfig "$kc" apply --validate=false -f "$repo/crds/" >&2
  kubectl --kubeconfig "$kc" wait --for condition=Established --timeout=30s \
    crd/networkobservations.flowlens.dev crd/flowpolicies.flowlens.dev crd/nodeagentconfigs.flowlens.dev \
    crd/addresssetslices.flowlens.dev >/dev/null
}

# The real cluster (hack/cluster.sh) shares .flowlens/kubeconfig.
real_cluster_runs() {
  [[ -f "$state/cluster/run/kube-apiserver.pid" ]] && kill -0 "$(cat "$state/cluster/run/kube-apiserver.pid")" 2>/dev/null
}

cmd_up() {
  if [[ "${USE_EXISTING_CLUSTER:-}" == "true" ]]; then
    [[ -n "${KUBECONFIG:-}" ]] || die "USE_EXISTING_CLUSTER=true needs KUBECONFIG"
    install_crds "$KUBECONFIG"
    echo "export FLOWLENS_KUBECONFIG=$KUBECONFIG"
    return 0
  fi
  real_cluster_runs && die "the real cluster (just cluster) runs and owns .flowlens/kubeconfig: stop it with 'just cluster-down' first"
  command -v kubectl >/dev/null || die "kubectl is missing"
  command -v curl >/dev/null || die "curl is missing (apt-get install curl)"
  mkdir -p "$logs" "$run"
  find_binaries
  make_pki
  make_front_proxy_pki
  start_etcd
  start_apiserver
  wait_ready
  write_kubeconfig
  install_crds "$kubeconfig"
  log "ready. Point kubectl at it with:"
  echo "export KUBECONFIG=$kubeconfig"
}

stop_pid() {
  local name=$1 pid
  [[ -f "$run/$name.pid" ]] || return 0
  pid=$(cat "$run/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    # The 1.20 API server can take many seconds to exit on SIGTERM.
    local i
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$run/$name.pid"
}

cmd_down() {
  stop_pid kube-apiserver
  stop_pid etcd
  if real_cluster_runs; then
    rm -rf "$pki" "$logs" "$run" "$state/etcd" "$state/apiserver-certs"
    log "stopped; the real cluster's files in $state stay"
  else
    rm -rf "$state"
    log "stopped; removed $state"
  fi
}

cmd_status() {
  if pid_alive kube-apiserver && pid_alive etcd; then
    echo "running: https://127.0.0.1:$api_port (KUBECONFIG=$kubeconfig)"
  else
    echo "not running"
    return 1
  fi
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
