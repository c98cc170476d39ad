#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, offline: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, containerd + runc,
# a CNI plugin (bridge or ptp), kubelet, kube-proxy (iptables mode) and a
# cluster DNS (dnsmasq, fed from Services). Kubernetes 1.20.2, built once from
# Debian's source package (hack/build-kube.sh node) and cached.
#
#   hack/cluster.sh up       start (idempotent); admin kubeconfig: .flowlens/kubeconfig
#   hack/cluster.sh down     stop everything, remove every mount, interface,
#                            iptables chain, cgroup and file it made, restore sysctls
#   hack/cluster.sh status   say whether it runs
#
#   FLOWLENS_CNI=bridge|ptp  the CNI plugin (default bridge: pods are ports of
#                            cni0, as with Flannel; ptp gives routed veths, as
#                            with Calico)
#   FLOWLENS_NODE_IP         the node's address (default: the first global IPv4)
#
# The simulated cluster (`just up`) uses the same .flowlens/kubeconfig: run one
# or the other. State: .flowlens/cluster/ (pki, logs, run), runtime state under
# /var/lib/flowlens-cluster and /run/flowlens-cluster.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="$repo/.flowlens"
top="$state/cluster"
pki="$top/pki"
logs="$top/logs"
run="$top/run"
kubeconfig="$state/kubeconfig"
var=/var/lib/flowlens-cluster
rundir=/run/flowlens-cluster
sock="$rundir/containerd.sock"
node_name="${FLOWLENS_NODE_NAME:-flowlens-node}"
cni="${FLOWLENS_CNI:-bridge}"
api_port=26443
etcd_port=24790  # below the ephemeral range (32768+): a client socket can hold any port there
etcd_peer_port=24800
service_cidr=10.97.0.0/16
api_service_ip=10.97.0.1
dns_service_ip=10.97.0.10
pod_cidr=10.244.0.0/24
cluster_domain=cluster.local
# Paths the node components (and Flowlens' hostPath spool) create outside
# our own directories.
system_paths=(/var/lib/cni /var/log/pods /var/log/containers /var/lib/flowlens)

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
export KUBECACHEDIR="$top/kubecache"

t0=$(date +%s)
log() { printf '[cluster %3ds] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

running() { [[ -e /proc/$1 ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }
alive() { [[ -f "$run/$1.pid" ]] && running "$(cat "$run/$1.pid")"; }

start() { # name cmd...
  local name=$1; shift
  alive "$name" && return 0
  setsid "$@" > "$logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$run/$name.pid"
}

wait_for() { # name seconds what cmd...
  local name=$1 secs=$2 what=$3; shift 3
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then tail -n 25 "$logs/$name.log" >&2; die "$name exited (log: $logs/$name.log)"; fi
    if (( $(date +%s) >= end )); then tail -n 25 "$logs/$name.log" >&2; die "$what within ${secs}s (log: $logs/$name.log)"; fi
    sleep 0.2
  done
}

K() { kubectl --kubeconfig "$kubeconfig" "$@"; }

node_ip() {
  if [[ -n "${FLOWLENS_NODE_IP:-}" ]]; then echo "$FLOWLENS_NODE_IP"; return; fi
  ip -4 -o addr show scope global | awk '{split($4, a, "/"); print a[1]; exit}'
}

install_packages() {
  local p missing=()
  for p in containerd runc containernetworking-plugins iptables conntrack dnsmasq-base buildah mmdebstrap; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]} (about a minute)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
    > "$logs/apt.log" 2>&1 || { tail -n 20 "$logs/apt.log" >&2; die "apt-get failed"; }
  # containerd's package starts nothing here (no systemd); make sure of it.
  pkill -x containerd 2>/dev/null || true
}

# API aggregation (the live flows API): its own CA, so that no user's client
# certificate can pass for the API server's proxy.
make_front_proxy_pki() {
  "$repo/hack/front-proxy-pki.sh" "$pki"
}

make_pki() {
  local ip=$1
  [[ -f "$pki/ca.crt" && -f "$pki/node-ip" && $(cat "$pki/node-ip") == "$ip" ]] && { make_front_proxy_pki; return 0; }
  log "creating a CA and the certificates of every component"
  rm -rf "$pki" && mkdir -p "$pki"
  (
    cd "$pki"
    echo "$ip" > node-ip
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -days 3650 -subj "/CN=flowlens-cluster-ca" -out ca.crt 2>/dev/null
    sign() { # name subject extensions
      openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
      printf '%s\n' "$3" > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    local client=$'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment'
    local server=$'extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment'
    sign apiserver "/CN=kube-apiserver" "subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$cluster_domain,IP:127.0.0.1,IP:$ip,IP:$api_service_ip
$server"
    sign kubelet-serving "/CN=$node_name" "subjectAltName=DNS:$node_name,IP:$ip
$server"
    sign admin "/O=system:masters/CN=flowlens-admin" "$client"
    sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
    sign kubelet "/O=system:nodes/CN=system:node:$node_name" "$client"
    sign kube-proxy "/CN=system:kube-proxy" "$client"
    sign controller-manager "/CN=system:kube-controller-manager" "$client"
    sign scheduler "/CN=system:kube-scheduler" "$client"
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    local u
    for u in admin kubelet kube-proxy controller-manager scheduler; do
      cat > "$u.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: flowlens-cluster
  cluster:
    server: https://$ip:$api_port
    certificate-authority-data: $(base64 -w0 < ca.crt)
users:
- name: $u
  user:
    client-certificate-data: $(base64 -w0 < "$u.crt")
    client-key-data: $(base64 -w0 < "$u.key")
contexts:
- name: flowlens-cluster
  context: {cluster: flowlens-cluster, user: $u}
current-context: flowlens-cluster
EOF
    done
    chmod 600 ./*.key ./*.kubeconfig
  )
  make_front_proxy_pki
}

write_configs() {
  local ip=$1 cfg="$top/config"
  mkdir -p "$cfg/net.d" "$var" "$rundir"
  cat > "$cfg/containerd.toml" <<EOF
version = 2
root = "$var/containerd"
state = "$rundir/containerd"
[grpc]
  address = "$sock"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "localhost/pause:3.2"
    # Processes here lack CAP_SYS_RESOURCE: a sandbox's oom_score_adj of -998 fails otherwise.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$cfg/net.d"
EOF
  local plugin
  if [[ "$cni" == bridge ]]; then
    plugin='{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "'"$pod_cidr"'", "gateway": "10.244.0.1"}]], "routes": [{"dst": "0.0.0.0/0"}]}}'
  elif [[ "$cni" == ptp ]]; then
    plugin='{"type": "ptp", "ipMasq": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "'"$pod_cidr"'"}]], "routes": [{"dst": "0.0.0.0/0"}]}}'
  else
    die "FLOWLENS_CNI=$cni: use bridge or ptp"
  fi
  # Written aside, then moved: containerd must never read a half-written file.
  cat > "$cfg/net.d/.10-flowlens.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "flowlens", "plugins": [$plugin, {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  mv "$cfg/net.d/.10-flowlens.conflist" "$cfg/net.d/10-flowlens.conflist"
  echo "$cni" > "$run/cni"

  cat > "$cfg/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: $cluster_domain
clusterDNS: [$dns_service_ip]
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
address: $ip
resolvConf: $top/config/resolv.conf
oomScoreAdj: 0
serializeImagePulls: false
volumePluginDir: $var/volume-plugins
evictionHard: {memory.available: "100Mi", nodefs.available: "2%", imagefs.available: "2%"}
# 1.20 reports Ready only at its first status update after registering.
nodeStatusUpdateFrequency: 1s
nodeStatusReportFrequency: 1m
EOF
  # Host-network pods resolve with the host's resolv.conf; the cluster is offline.
  echo "nameserver $dns_service_ip" > "$cfg/resolv.conf"

  cat > "$cfg/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $pki/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: 10.244.0.0/16
hostnameOverride: $node_name
bindAddress: $ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
# 0: leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# What the node changes on the host, recorded once so `down` restores exactly that.
record_host() {
  [[ -f "$run/host-recorded" ]] && return 0
  : > "$run/preexisting"
  local d
  for d in "${system_paths[@]}"; do [[ -e $d ]] && echo "$d" >> "$run/preexisting"; done
  sysctl -a 2>/dev/null | sort > "$run/sysctl.before"
  cat /proc/self/mountinfo > "$run/mountinfo.before"
  ip -o link | awk -F': ' '{sub(/@.*/,"",$2); print $2}' > "$run/links.before"
  iptables-save > "$run/iptables.before" 2>/dev/null || true
  ip6tables-save > "$run/ip6tables.before" 2>/dev/null || true
  touch "$run/host-recorded"
}

start_control_plane() {
  local ip=$1 kbin=$2
  if ! alive etcd; then
    log "starting etcd"
    mkdir -p "$top/etcd"
    start etcd "$kbin/etcd" --name flowlens-cluster --data-dir "$top/etcd" \
      --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
      --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
      --initial-cluster "flowlens-cluster=http://127.0.0.1:$etcd_peer_port" --unsafe-no-fsync
    wait_for etcd 20 "etcd was not healthy" sh -c "curl -fsS http://127.0.0.1:$etcd_port/health | grep -q true"
  fi
  if ! alive kube-apiserver; then
    log "starting kube-apiserver on https://$ip:$api_port (ready in 5-15 s)"
    # On the node's address, not loopback: pods reach it through the
    # `kubernetes` Service.
    start kube-apiserver "$kbin/kube-apiserver" \
      --etcd-servers "http://127.0.0.1:$etcd_port" \
      --bind-address "$ip" --advertise-address "$ip" --secure-port "$api_port" --insecure-port 0 \
      --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
      --client-ca-file "$pki/ca.crt" \
      --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
      --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
      --kubelet-preferred-address-types InternalIP \
      --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
      --service-account-issuer "https://kubernetes.default.svc.$cluster_domain" \
      --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
      --service-cluster-ip-range "$service_cidr" \
      --allow-privileged=true --profiling=false --cert-dir "$top/apiserver-certs" \
      --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
      --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
      --requestheader-extra-headers-prefix X-Remote-Extra- \
      --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
      --enable-aggregator-routing=true
  fi
  wait_for kube-apiserver 90 "kube-apiserver was not ready" \
    curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "https://$ip:$api_port/readyz"
  cp "$pki/admin.kubeconfig" "$kubeconfig.tmp" && mv "$kubeconfig.tmp" "$kubeconfig"

  start kube-controller-manager "$kbin/kube-controller-manager" \
    --kubeconfig "$pki/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$pki/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$pki/controller-manager.kubeconfig" \
    --use-service-account-credentials --service-account-private-key-file "$pki/sa.key" \
    --root-ca-file "$pki/ca.crt" --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --service-cluster-ip-range "$service_cidr" \
    --leader-elect=false --controllers='*' --port 0 --bind-address 127.0.0.1 --profiling=false
  start kube-scheduler "$kbin/kube-scheduler" \
    --kubeconfig "$pki/scheduler.kubeconfig" \
    --authentication-kubeconfig "$pki/scheduler.kubeconfig" --authorization-kubeconfig "$pki/scheduler.kubeconfig" \
    --leader-elect=false --port 0 --bind-address 127.0.0.1 --profiling=false
}

start_node() {
  local ip=$1 kbin=$2
  if [[ $(findmnt -no PROPAGATION /) != shared ]]; then
    # Bidirectional hostPath mounts (the agent's bpffs) need a shared mount.
    mount --make-rshared /
    touch "$run/made-rshared"
  fi
  if [[ $(stat -f -c %T /sys/fs/bpf 2>/dev/null) != bpf_fs ]]; then
    # What systemd does on most distributions: the agent's pins live here and
    # outlive its pods.
    mount -t bpf bpf /sys/fs/bpf
    touch "$run/mounted-bpffs"
  fi
  if ! alive containerd; then
    log "starting containerd"
    start containerd containerd --config "$top/config/containerd.toml"
  fi
  wait_for containerd 20 "containerd did not answer" ctr --address "$sock" version
  "$repo/hack/images.sh" import "$sock"

  if ! alive kubelet; then
    log "starting kubelet ($cni CNI) and kube-proxy"
    mkdir -p "$var/kubelet"
    start kubelet "$kbin/kubelet" --config "$top/config/kubelet.yaml" --kubeconfig "$pki/kubelet.kubeconfig" \
      --container-runtime=remote --container-runtime-endpoint="unix://$sock" \
      --node-ip "$ip" --hostname-override "$node_name" --pod-infra-container-image localhost/pause:3.2 \
      --root-dir "$var/kubelet" -v 1
  fi
  start kube-proxy "$kbin/kube-proxy" --config "$top/config/kube-proxy.yaml" -v 1

  wait_for kubelet 60 "the node did not register" K get node "$node_name"
  # podCIDR by hand: --allocate-node-cidrs' controller sleeps 10 s first.
  K patch node "$node_name" -p "{\"spec\":{\"podCIDR\":\"$pod_cidr\",\"podCIDRs\":[\"$pod_cidr\"]}}" >/dev/null 2>&1 || true
  log "waiting for the node to be Ready (about 10 s)"
  wait_for kubelet 120 "the node was not Ready" sh -c \
    "kubectl --kubeconfig '$kubeconfig' get node '$node_name' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
}

# Cluster DNS: dnsmasq on the node's address answers <svc>.<ns>.svc.<domain>
# from a hosts directory a small loop keeps in step with the Services; the
# `kube-dns` Service (10.97.0.10) points at it.
start_dns() {
  local ip=$1 hosts="$top/dns-hosts"
  mkdir -p "$hosts"
  if ! alive dnsmasq; then
    start dnsmasq dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces \
      --listen-address "$ip" --except-interface lo --port 53 --hostsdir "$hosts" --local-ttl 5 \
      --local "/$cluster_domain/" --pid-file="$run/dnsmasq.inner.pid" --user=root
  fi
  if ! alive dns-feeder; then
    # shellcheck disable=SC2016
    start dns-feeder bash -c '
      while sleep 1; do
        kubectl --kubeconfig "$0" get svc -A -o jsonpath="{range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.$2{\"\n\"}{end}" \
          2>/dev/null | grep -v "^None " > "$1/.services.tmp" && mv "$1/.services.tmp" "$1/services"
      done' "$kubeconfig" "$hosts" "$cluster_domain"
  fi
  K apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_service_ip
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: kube-dns, namespace: kube-system}
subsets: [{addresses: [{ip: "$ip"}], ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}]
EOF
}

cmd_up() {
  [[ $EUID -eq 0 ]] || die "the cluster needs root (containerd, kubelet, iptables)"
  [[ "$cni" == bridge || "$cni" == ptp ]] || die "FLOWLENS_CNI=$cni: use bridge (the default) or ptp"
  if [[ -f "$state/run/kube-apiserver.pid" ]] && kill -0 "$(cat "$state/run/kube-apiserver.pid")" 2>/dev/null; then
    die "the simulated control plane (just up) runs and owns .flowlens/kubeconfig: stop it with 'just down' first"
  fi
  mkdir -p "$logs" "$run"
  install_packages
  local ip kbin
  ip=$(node_ip)
  [[ -n "$ip" ]] || die "no global IPv4 address to use as the node's: set FLOWLENS_NODE_IP"
  kbin=$("$repo/hack/build-kube.sh" node)
  "$repo/hack/images.sh" build-base
  record_host
  make_pki "$ip"
  write_configs "$ip"
  start_control_plane "$ip" "$kbin"
  start_node "$ip" "$kbin"
  start_dns "$ip"
  log "waiting for the default ServiceAccount token (pods are refused before it)"
  wait_for kube-controller-manager 60 "no default ServiceAccount token" \
    sh -c "kubectl --kubeconfig '$kubeconfig' -n default get secret -o name | grep -q default-token"
  log "ready: node $node_name ($ip, $cni CNI). Point kubectl at it with:"
  echo "export KUBECONFIG=$kubeconfig"
}

stop() { # name [seconds]
  local name=$1 secs=${2:-10} pid i
  [[ -f "$run/$name.pid" ]] || return 0
  pid=$(cat "$run/$name.pid")
  if running "$pid"; then
    kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do running "$pid" || break; sleep 0.1; done
    running "$pid" && { kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; sleep 0.3; }
  fi
  rm -f "$run/$name.pid"
}

remove_pods() {
  alive kube-apiserver && alive kubelet || return 0
  log "removing every pod (the kubelet stops them, containerd runs CNI DEL)"
  K delete ds,deploy,rs,sts,job,pod --all -A --wait=false >/dev/null 2>&1 || true
  local i
  for i in $(seq 1 90); do
    [[ $(K get pods -A --no-headers 2>/dev/null | wc -l) == 0 ]] && break
    # 1.20 keeps deleted pods in the API for up to a minute after they are gone.
    [[ -z $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null) ]] && ! compgen -G '/run/netns/cni-*' >/dev/null && break
    sleep 1
  done
}

remove_sandboxes() {
  alive containerd || return 0
  local c
  for c in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$sock" -n k8s.io tasks kill -s KILL "$c" >/dev/null 2>&1 || true
  done
  sleep 0.5
  for c in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$sock" -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
  done
}

restore_iptables() {
  local t tbl cur fam
  for t in iptables ip6tables; do
    command -v "$t-save" >/dev/null || continue
    for tbl in filter nat mangle raw; do
      cur=$("$t-save" -t "$tbl" 2>/dev/null) || continue
      echo "$cur" | grep -qE 'KUBE-|CNI-' || continue
      echo "$cur" | grep -vE '^:(KUBE-|CNI-)|^-A (KUBE-|CNI-)|-j (KUBE-|CNI-)|-g (KUBE-|CNI-)' | "$t-restore" -T "$tbl" || true
    done
    fam=ip; [[ $t == ip6tables ]] && fam=ip6
    for tbl in filter nat mangle raw; do
      grep -q "^\*$tbl" "$run/$t.before" 2>/dev/null && continue
      nft list table "$fam" "$tbl" >/dev/null 2>&1 || continue
      [[ $("$t-save" -t "$tbl" | grep -c '^-A') == 0 ]] && nft delete table "$fam" "$tbl"
    done
  done
  conntrack -D -s 10.244.0.0/16 >/dev/null 2>&1 || true
  conntrack -D -d 10.244.0.0/16 >/dev/null 2>&1 || true
  conntrack -D -d "$service_cidr" >/dev/null 2>&1 || true
}

restore_sysctls() {
  [[ -f "$run/sysctl.before" ]] || return 0
  sysctl -a 2>/dev/null | sort > "$run/sysctl.after"
  local volatile='^(fs\.(dentry|file-nr|inode|quota)|kernel\.(random|ns_last_pid|pty\.nr|sched_domain)|net\.netfilter\.nf_conntrack_count|vm\.stat)'
  local key val cur
  # ip_forward first: writing it resets every conf.*.forwarding.
  for key in net.ipv4.ip_forward $(diff <(grep -vE "$volatile" "$run/sysctl.before") <(grep -vE "$volatile" "$run/sysctl.after") | awk '/^</ {print $2}'); do
    val=$(awk -v k="$key" '$1==k {sub(/^[^=]*= /,""); print; exit}' "$run/sysctl.before")
    cur=$(sysctl -n "$key" 2>/dev/null) || continue
    [[ "$cur" == "$val" ]] || sysctl -qw "$key=$val" 2>/dev/null || true
  done
}

restore_propagation() {
  [[ -f "$run/made-rshared" ]] || return 0
  local before="$run/mountinfo.before" shared m sm rec
  shared=$(awk '{s=0; for (i=7;i<=NF && $i!="-";i++) if ($i ~ /^shared:/) s=1; if (s) print $5}' "$before")
  awk '{s=0; for (i=7;i<=NF && $i!="-";i++) if ($i ~ /^shared:/) s=1; if (!s) print $5}' "$before" | awk '!seen[$0]++' |
    while read -r m; do
      rec=1
      for sm in $shared; do [[ $m == / || $sm == "$m"/* ]] && rec=0; done
      if [[ $rec == 1 ]]; then mount --make-rprivate "$m" 2>/dev/null; else mount --make-private "$m" 2>/dev/null; fi
    done
  rm -f "$run/made-rshared"
}

cmd_down() {
  [[ -d "$run" ]] || { log "not running"; return 0; }
  remove_pods
  stop dns-feeder; stop dnsmasq
  stop kube-proxy
  local kbin="${FLOWLENS_CACHE_DIR:-/var/cache/flowlens}/kube-1.20.2"
  [[ -x "$kbin/kube-proxy" ]] && "$kbin/kube-proxy" --cleanup > "$logs/kube-proxy-cleanup.log" 2>&1 || true
  stop kubelet
  remove_sandboxes
  stop kube-scheduler; stop kube-controller-manager; stop kube-apiserver 20; stop etcd
  stop containerd 15
  local p
  for p in $(pgrep -f containerd-shim-runc-v2 2>/dev/null); do
    grep -qa "$sock" "/proc/$p/cmdline" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
  done
  local pass m
  for pass in 1 2 3; do
    { findmnt -rn -o TARGET | grep -E "^($rundir|$var|/run/netns/cni-)" || true; } | sort -r |
      while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  done
  rm -f /run/netns/cni-*
  ip link show cni0 >/dev/null 2>&1 && ip link del cni0
  local l
  for l in $(ip -o link | awk -F': ' '{sub(/@.*/,"",$2); print $2}' | grep '^veth' || true); do
    grep -qx "$l" "$run/links.before" 2>/dev/null || ip link del "$l" 2>/dev/null || true
  done
  restore_iptables
  # Flowlens' pins (deploy/: --bpffs-root=/sys/fs/bpf/flowlens): programs
  # stay attached while pinned, whatever happened to the agent.
  rm -rf /sys/fs/bpf/flowlens
  if [[ -f "$run/mounted-bpffs" ]]; then umount /sys/fs/bpf 2>/dev/null || true; fi
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -d $h/kubepods ]] && find "$h/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  local d
  for d in "${system_paths[@]}"; do
    [[ -e $d ]] || continue
    grep -qx "$d" "$run/preexisting" 2>/dev/null || rm -rf "$d"
  done
  rm -rf "$var" "$rundir"
  restore_sysctls
  restore_propagation
  rm -rf "$top" "$state/kubecache"
  rm -f "$kubeconfig"
  rmdir "$state" 2>/dev/null || true
  log "stopped; the machine is as it was"
}

cmd_status() {
  if alive kube-apiserver && alive kubelet; then
    echo "running: node $node_name, $(cat "$run/cni" 2>/dev/null) CNI (KUBECONFIG=$kubeconfig)"
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
