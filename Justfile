# Flowlens developer commands. `just` lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]

export FLOWLENS_KUBECONFIG := env_var_or_default("FLOWLENS_KUBECONFIG", justfile_directory() / ".flowlens/kubeconfig")

# Where cargo builds (CI keeps it outside the clone, as a cache).
target := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")

# List the recipes.
default:
    @just --list

# Install build and test dependencies (Debian packages, nightly, bpf-linker, nextest).
setup:
    hack/setup.sh

# Regenerate the CRD YAML under crds/ from the Rust types.
generate:
    cargo run -q -p flowlens-api --bin crdgen -- crds

# Fail if crds/ is not what `just generate` writes.
check-generated: generate
    git diff --exit-code -- crds/ || (echo "crds/ is stale: run 'just generate' and commit" >&2; exit 1)

# Targets: `report` (an agent report through the collector, to status) and
# `node_config` (a NodeAgentConfig spec through the agent's table compiler).
# Nightly, no sanitizer (the code is safe Rust), debug assertions on (integer
# overflow panics). New corpus entries stay in fuzz/corpus/ (ignored by git);
# a crash is saved in fuzz/artifacts/ and fails the run.
# Fuzz every target for `seconds` each (cargo fuzz; see fuzz/).
fuzz seconds="300":
    #!/usr/bin/env bash
    set -euo pipefail
    for t in report node_config dns_message; do
        AYA_BUILD_SKIP=1 cargo +nightly fuzz run -s none -a --target-dir {{target}}/fuzz "$t" -- \
            -max_total_time={{seconds}} -dict={{justfile_directory()}}/fuzz/dict/"$t".dict
    done

# Every fuzz target for 30 s (part of `just test`).
fuzz-smoke: (fuzz "30")

# Print a merge patch of argocd-cm that installs the Argo CD health checks:
# kubectl -n argocd patch configmap argocd-cm --type merge -p "$(just argocd-cm)"
argocd-cm:
    #!/usr/bin/env bash
    set -euo pipefail
    dir={{justfile_directory()}}/deploy/argocd/resource_customizations/flowlens.dev
    jq -n --rawfile observation "$dir/NetworkObservation/health.lua" --rawfile policy "$dir/FlowPolicy/health.lua" \
        '{data: {"resource.customizations.health.flowlens.dev_NetworkObservation": $observation,
                 "resource.customizations.health.flowlens.dev_FlowPolicy": $policy}}'

# Start the local control plane (etcd + kube-apiserver) and install the CRDs.
up:
    hack/local-cluster.sh up

# Stop the local control plane and remove its state.
down:
    hack/local-cluster.sh down

# Say whether the local control plane runs.
status:
    hack/local-cluster.sh status

# Build every binary (the agent embeds its eBPF programs).
build:
    cargo build --workspace --exclude flowlens-agent-ebpf --bins

# Formatting and clippy, for userspace and for the eBPF crate.
lint:
    cargo fmt --all -- --check
    AYA_BUILD_SKIP=1 cargo clippy --workspace --exclude flowlens-agent-ebpf --all-targets -- -D warnings
    cd node-agent-ebpf && cargo +nightly clippy -Z build-std=core --target bpfel-unknown-none --release -- -D warnings

# Run every test: unit, API-server, kernel and end-to-end on the simulated
# cluster, then the real-cluster tests, plus lint and the generated-CRD check.
# Sets itself up.
test: setup up
    just lint
    just check-generated
    just fuzz-smoke
    cargo build --workspace --exclude flowlens-agent-ebpf --bins
    cargo nextest run --workspace --exclude flowlens-agent-ebpf --no-fail-fast -E 'not binary(cluster)'
    just down
    just cluster-test

# The real-cluster tests: start the cluster, build and install Flowlens from
# its images, run the `cluster` tests, stop the cluster.
cluster-test:
    #!/usr/bin/env bash
    set -euo pipefail
    trap 'just cluster-down' EXIT
    just cluster cluster-install
    cargo nextest run -p flowlens-e2e --no-fail-fast --success-output immediate -E 'binary(cluster)'

# Start a real one-node cluster (kubelet, containerd, CNI, kube-proxy, DNS);
# admin kubeconfig at .flowlens/kubeconfig. FLOWLENS_CNI=bridge|ptp.
cluster:
    hack/cluster.sh up

# Stop the real cluster and remove everything it made.
cluster-down:
    hack/cluster.sh down

# Build the images (release binaries; pause, base and test images once) and
# import them into the real cluster's containerd when it runs.
images:
    cargo build --release -p flowlens-operator -p flowlens-agent --bins
    hack/images.sh build {{target}}/release
    if hack/cluster.sh status >/dev/null 2>&1; then hack/images.sh import /run/flowlens-cluster/containerd.sock; fi

# Install Flowlens into the real cluster as a user would (kubectl), from the
# images `just images` builds, and wait until it runs.
cluster-install: images
    # On 1.25+ clusters: `kubectl apply --server-side -f crds/`. The local
    # cluster is 1.20, which knows no CEL rules: a client-side apply without
    # validation lets it drop them and keep the rest of the schema.
    kubectl --kubeconfig "$FLOWLENS_KUBECONFIG" apply --validate=false -f crds/
    kubectl --kubeconfig "$FLOWLENS_KUBECONFIG" apply -k deploy/overlays/local
    kubectl --kubeconfig "$FLOWLENS_KUBECONFIG" -n flowlens-system rollout status deploy/flowlens-operator --timeout=120s
    kubectl --kubeconfig "$FLOWLENS_KUBECONFIG" -n flowlens-system rollout status ds/flowlens-agent --timeout=120s

# Only the end-to-end tests (simulated nodes with real agents and traffic).
e2e: setup up
    cargo build --workspace --exclude flowlens-agent-ebpf --bins
    cargo nextest run -p flowlens-e2e --no-fail-fast -E 'not binary(cluster)'

# Benchmarks (release build, root); figures and how to read them: docs/benchmarks.md.
bench: setup up
    cargo build --release --workspace --exclude flowlens-agent-ebpf --bins
    # Compile: 100 nodes x 10,000 pods x 200 policies; one-pod changes.
    cargo bench -p flowlens-operator --bench compile
    # A node's work per slice event: 100,000 peer addresses joined and compiled.
    cargo bench -p flowlens-agent --bench join
    # Propagation against the local API server: 1,000 pods on 20 nodes.
    {{target}}/release/flowlens-bench propagation
    # Issue 12's sizes (docs/benchmarks.md says what today's layout does there).
    {{target}}/release/flowlens-bench scale --nodes 100 --pods 5000 --policies 50 --shape namespace-wide
    {{target}}/release/flowlens-bench scale --nodes 100 --pods 5000 --policies 50 --shape app-scoped
    {{target}}/release/flowlens-bench scale --nodes 1000 --pods 50000 --policies 500 --shape namespace-wide --dual-stack
    {{target}}/release/flowlens-bench scale --nodes 1000 --pods 50000 --policies 500 --shape app-scoped --dual-stack
    # Datapath, side by side: nothing attached, a minimal TC program, nftables
    # per-flow counters, conntrack accounting, Flowlens, Flowlens + 10,000 rules.
    {{target}}/release/flowlens-bench datapath --rounds 7 --seconds 4
    # The agent's own CPU and memory with 64,000 flows per drain, reporting
    # (to a sink that commits everything) with its spool, as the DaemonSet's:
    # 5 s windows (the shortest allowed), NetworkObservation's default 30 s,
    # the table the agent had by default before (over half full: drained
    # every second), and a standalone agent (no reports, no spool).
    {{target}}/release/flowlens-bench agent-at-64k-flows
    {{target}}/release/flowlens-bench agent-at-64k-flows --window-seconds 30 --seconds 60
    {{target}}/release/flowlens-bench agent-at-64k-flows --flow-table-size 65536
    {{target}}/release/flowlens-bench agent-at-64k-flows --no-reports
    # What observing DNS costs: per DNS packet in the kernel, per message in the agent.
    {{target}}/release/flowlens-bench dns

# The demo: control plane, operator, agents on 3 simulated nodes, a shop app
# with traffic, live `kubectl get` every window. Ctrl-C (or DEMO_SECONDS=N)
# stops it and removes everything it started.
demo: setup
    #!/usr/bin/env bash
    set -euo pipefail
    started=""
    if ! hack/local-cluster.sh status >/dev/null 2>&1; then
        hack/local-cluster.sh up >/dev/null
        started=1
    fi
    trap '[[ -n "$started" ]] && hack/local-cluster.sh down >/dev/null' EXIT
    cargo build --workspace --exclude flowlens-agent-ebpf --bins
    {{target}}/debug/flowlens-demo
