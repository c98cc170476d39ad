//! The checked-in CRDs under `crds/` are exactly what `crdgen` generates, and
//! the schema keeps the properties that tests and docs outside the code rely on.

use std::path::PathBuf;

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

#[test]
fn checked_in_crds_match_the_types() {
    let mut stale = Vec::new();
    for (file, crd) in flowlens_api::crd::all() {
        let path = crds_dir().join(file);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        if on_disk != flowlens_api::crd::to_yaml(&crd) {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "crds/ is stale for {stale:?}: run `just generate` and commit the result"
    );
}

/// A snapshot of the user-facing shape: the property paths of each schema.
/// A change here is an API change; update the list deliberately.
#[test]
fn schema_shape_snapshot() {
    fn paths(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, child) in props {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(p.clone());
                paths(child, &p, out);
                if let Some(items) = child.get("items") {
                    paths(items, &format!("{p}[]"), out);
                }
            }
        }
    }
    let mut all = Vec::new();
    for (_, crd) in flowlens_api::crd::all() {
        let v = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut out = Vec::new();
        paths(&v["openAPIV3Schema"], "", &mut out);
        all.push(format!("{}: {}", crd.spec.names.kind, out.join(" ")));
    }
    let snapshot = all.join("\n");
    for required in [
        "NetworkObservation: ",
        "spec.namespaces spec.namespaceSelector",
        "spec.podSelector",
        "spec.keepLabels spec.groupBy spec.window spec.topN spec.maxSeries",
        "status.observedGeneration",
        "status.nodes.selected status.nodes.reporting",
        "status.lastWindow.start status.lastWindow.end status.lastWindow.flows status.lastWindow.packets status.lastWindow.bytes",
        "status.lastWindow.bytesPerSecond status.lastWindow.packetsPerSecond status.lastWindow.crossZoneBytes",
        "status.total.packets status.total.bytes",
        "status.latency.samples status.latency.p50Micros status.latency.p95Micros status.latency.p99Micros",
        "status.topFlows[].source",
        "status.topFlows[].destination",
        "status.topFlows[].port status.topFlows[].protocol status.topFlows[].bytes status.topFlows[].packets",
        "status.topFlows[].rttP50Micros status.topFlows[].rttP99Micros",
        "FlowPolicy: ",
        "spec.mode spec.podSelector",
        "spec.egress[].to[].podSelector",
        "spec.egress[].to[].namespaceSelector",
        "spec.egress[].to[].ipBlock.cidr spec.egress[].to[].ipBlock.except",
        "spec.egress[].ports[].protocol spec.egress[].ports[].port spec.egress[].ports[].endPort",
        "spec.ingress[].from[].ipBlock",
        "status.nodes.targeted status.nodes.enforcing",
        "status.revision",
        "status.blocked.packets status.blocked.connections",
        "status.audited.packets status.audited.connections",
        "NodeAgentConfig: ",
        "spec.revision",
        "status.appliedRevision",
        "status.hooks",
    ] {
        // Property order is alphabetical in the schema; compare per path.
        for path in required
            .split(' ')
            .filter(|p| !p.is_empty() && !p.ends_with(':'))
        {
            assert!(
                snapshot.split([' ', '\n']).any(|p| p == path),
                "schema lost {path}\n{snapshot}"
            );
        }
    }
}
