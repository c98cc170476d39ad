//! The Flowlens API against a real kube-apiserver: samples apply, printer
//! columns are served, malformed objects are rejected with the field named,
//! and a FlowPolicy's spec in force survives an operator restart.

use std::{collections::BTreeMap, time::Duration};

use flowlens_api::{FlowPolicy, NodeAgentConfig, node_agent_config::BlockRule};
use flowlens_e2e::{
    cluster,
    objects::{TestObjects, eventually},
    operator::Operator,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    discovery::{ApiCapabilities, ApiResource, Discovery, Scope},
};

const WAIT: Duration = Duration::from_secs(20);

async fn resolve(discovery: &Discovery, obj: &DynamicObject) -> (ApiResource, ApiCapabilities) {
    let types = obj.types.as_ref().expect("sample has apiVersion and kind");
    let gvk = GroupVersionKind::try_from(types).expect("valid apiVersion");
    discovery
        .resolve_gvk(&gvk)
        .unwrap_or_else(|| panic!("the API server does not serve {gvk:?}: are the CRDs installed?"))
}

fn api_for(
    client: &Client,
    ar: &ApiResource,
    caps: &ApiCapabilities,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), ns.unwrap_or("default"), ar),
        Scope::Cluster => Api::all_with(client.clone(), ar),
    }
}

fn read_samples() -> Vec<(String, DynamicObject)> {
    let dir = cluster::repo_root().join("config/samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject =
                serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), obj));
        }
    }
    docs
}

use serde::Deserialize as _;

#[tokio::test]
async fn every_sample_applies_and_kubectl_columns_are_served() {
    let client = cluster::client().await.unwrap();
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let samples = read_samples();
    let kinds: BTreeMap<_, _> = samples
        .iter()
        .map(|(_, o)| (o.types.as_ref().unwrap().kind.clone(), ()))
        .collect();
    for kind in ["NetworkObservation", "FlowPolicy", "NodeAgentConfig"] {
        assert!(kinds.contains_key(kind), "config/samples/ has no {kind}");
    }

    let pp = PatchParams::apply("flowlens-e2e").force();
    for (file, obj) in &samples {
        let (ar, caps) = resolve(&discovery, obj).await;
        let api = api_for(&client, &ar, &caps, obj.metadata.namespace.as_deref());
        api.patch(&obj.name_any(), &pp, &Patch::Apply(obj))
            .await
            .unwrap_or_else(|e| panic!("{file}: {} {} was rejected: {e}", ar.kind, obj.name_any()));
    }

    // `kubectl get` asks for a Table; the server builds it from the CRD's
    // additionalPrinterColumns.
    for (path, expected) in [
        (
            "/apis/flowlens.dev/v1alpha1/networkobservations",
            vec![
                "Name",
                "Nodes",
                "Flows",
                "Throughput",
                "RTT-P50",
                "RTT-P99",
                "Retransmits",
                "Drops",
                "Ready",
                "Age",
            ],
        ),
        (
            "/apis/flowlens.dev/v1alpha1/flowpolicies",
            vec![
                "Name",
                "Mode",
                "Enforcing",
                "Blocked",
                "Audited",
                "Blocked-Packets",
                "Ready",
                "Age",
            ],
        ),
    ] {
        let req = http::Request::get(path)
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .unwrap();
        let table: serde_json::Value = client.request(req).await.unwrap();
        let columns: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, expected, "{path}");
        assert!(
            !table["rows"].as_array().unwrap().is_empty(),
            "{path} lists no objects"
        );
    }

    // The defaults of the schema were applied by the server.
    let obs = samples
        .iter()
        .find(|(_, o)| o.name_any() == "cross-zone")
        .unwrap();
    let (ar, caps) = resolve(&discovery, &obs.1).await;
    let stored = api_for(&client, &ar, &caps, None)
        .get("cross-zone")
        .await
        .unwrap();
    assert_eq!(stored.data["spec"]["maxSeries"], 1000);

    // Clean up in reverse order (namespaces last).
    for (_, obj) in samples.iter().rev() {
        let (ar, caps) = resolve(&discovery, obj).await;
        if ar.kind == "Namespace" {
            cluster::delete_namespace(&client, &obj.name_any())
                .await
                .unwrap();
            continue;
        }
        let api = api_for(&client, &ar, &caps, obj.metadata.namespace.as_deref());
        let _ = api.delete(&obj.name_any(), &DeleteParams::default()).await;
    }
}

/// A malformed object, and the field the API server's error must name.
struct Malformed {
    what: &'static str,
    kind: &'static str,
    spec: serde_json::Value,
    field: &'static str,
}

fn malformed() -> Vec<Malformed> {
    use serde_json::json;
    let obs = "NetworkObservation";
    let pol = "FlowPolicy";
    vec![
        Malformed {
            what: "window below 5s",
            kind: obs,
            spec: json!({"namespaces": ["a"], "window": "4s"}),
            field: "spec.window",
        },
        Malformed {
            what: "window in an unknown unit",
            kind: obs,
            spec: json!({"namespaces": ["a"], "window": "1d"}),
            field: "spec.window",
        },
        Malformed {
            what: "unknown groupBy dimension",
            kind: obs,
            spec: json!({"namespaces": ["a"], "groupBy": ["services"]}),
            field: "spec.groupBy",
        },
        Malformed {
            what: "topN above 100",
            kind: obs,
            spec: json!({"namespaces": ["a"], "topN": 101}),
            field: "spec.topN",
        },
        Malformed {
            what: "topN of 0",
            kind: obs,
            spec: json!({"namespaces": ["a"], "topN": 0}),
            field: "spec.topN",
        },
        Malformed {
            what: "maxSeries above budget",
            kind: obs,
            spec: json!({"namespaces": ["a"], "maxSeries": 20000}),
            field: "spec.maxSeries",
        },
        Malformed {
            what: "keepLabels with a bad key",
            kind: obs,
            spec: json!({"namespaces": ["a"], "keepLabels": ["Bad Key"]}),
            field: "spec.keepLabels",
        },
        Malformed {
            what: "namespace name with capitals",
            kind: obs,
            spec: json!({"namespaces": ["Shop"]}),
            field: "spec.namespaces",
        },
        Malformed {
            what: "too many groupBy items",
            kind: obs,
            spec: json!({"namespaces": ["a"], "groupBy": ["pod","pod","pod","pod","pod","pod","pod","pod","pod"]}),
            field: "spec.groupBy",
        },
        Malformed {
            what: "unknown mode",
            kind: pol,
            spec: json!({"podSelector": {}, "mode": "Block", "egress": [{}]}),
            field: "spec.mode",
        },
        Malformed {
            what: "missing podSelector",
            kind: pol,
            spec: json!({"egress": [{}]}),
            field: "spec.podSelector",
        },
        Malformed {
            what: "bad CIDR",
            kind: pol,
            spec: json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}),
            field: "spec.egress.to.ipBlock.cidr",
        },
        Malformed {
            what: "CIDR without prefix",
            kind: pol,
            spec: json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0", "except": []}}]}]}),
            field: "spec.ingress.from.ipBlock.cidr",
        },
        Malformed {
            what: "port above 65535",
            kind: pol,
            spec: json!({"podSelector": {}, "egress": [{"ports": [{"port": 70000}]}]}),
            field: "spec.egress.ports.port",
        },
        Malformed {
            what: "unsupported protocol",
            kind: pol,
            spec: json!({"podSelector": {}, "egress": [{"ports": [{"protocol": "ICMP"}]}]}),
            field: "spec.egress.ports.protocol",
        },
        Malformed {
            what: "unknown selector operator",
            kind: pol,
            spec: json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Contains", "values": ["x"]}]}, "egress": [{}]}),
            field: "spec.podSelector.matchExpressions.operator",
        },
        Malformed {
            what: "invalid label value",
            kind: pol,
            spec: json!({"podSelector": {"matchLabels": {"app": "not ok"}}, "egress": [{}]}),
            field: "spec.podSelector.matchLabels",
        },
    ]
}

/// Strips list indices so that `spec.egress[0].to[0].ipBlock.cidr` (newer
/// servers) and `spec.egress.to.ipBlock.cidr` (1.20) compare equal.
fn without_indices(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0;
    for c in s.chars() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn malformed_objects_are_rejected_naming_the_field() {
    let client = cluster::client().await.unwrap();
    let ns = cluster::unique_name("malformed");
    cluster::create_namespace(&client, &ns, &[]).await.unwrap();
    let cases = malformed();
    assert!(cases.len() >= 8);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (plural, namespaced) = match case.kind {
            "NetworkObservation" => ("networkobservations", false),
            _ => ("flowpolicies", true),
        };
        let ar = ApiResource {
            group: "flowlens.dev".into(),
            version: "v1alpha1".into(),
            api_version: "flowlens.dev/v1alpha1".into(),
            kind: case.kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(client.clone(), &ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        let name = format!("{ns}-{i}");
        let mut obj = DynamicObject::new(&name, &ar);
        obj.data = serde_json::json!({ "spec": case.spec });
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {
                let _ = api.delete(&name, &DeleteParams::default()).await;
                failures.push(format!("{}: accepted", case.what));
            }
            Err(kube::Error::Api(e)) => {
                if e.code != 422 || !without_indices(&e.message).contains(case.field) {
                    failures.push(format!(
                        "{}: expected 422 naming {}, got {}: {}",
                        case.what, case.field, e.code, e.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.what)),
        }
    }
    cluster::delete_namespace(&client, &ns).await.unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The policy `p` of namespace `ns`, and the rules of it in `node`'s config.
async fn policy_and_its_rules(
    client: &Client,
    ns: &str,
    node: &str,
) -> Option<(FlowPolicy, Vec<BlockRule>)> {
    let policy = Api::<FlowPolicy>::namespaced(client.clone(), ns)
        .get("p")
        .await
        .ok()?;
    let config = Api::<NodeAgentConfig>::all(client.clone())
        .get(node)
        .await
        .ok()?;
    let rules = config
        .spec
        .rules
        .into_iter()
        .filter(|r| r.policy.namespace == ns && r.policy.name == "p")
        .collect();
    Some((policy, rules))
}

/// A restarted operator's first view of a policy can be an invalid edit:
/// the spec in force before it (kept in `status.inForce`) must stay in
/// force, not drop out of every node's config.
#[tokio::test]
async fn an_invalid_edit_keeps_the_valid_spec_in_force_across_an_operator_restart() {
    let client = cluster::client().await.unwrap();
    let run = cluster::unique_name("inforce");
    let t = TestObjects::new(client.clone(), &run);
    t.sweep_earlier_runs().await;
    let (node, ns) = (format!("{run}-n1"), format!("{run}-shop"));
    t.node(&node, "zone-a").await.unwrap();
    t.namespace(&ns, &[]).await.unwrap();
    t.pod(
        &ns,
        "web-1",
        &node,
        &["10.202.1.1"],
        &[("app", "web")],
        None,
    )
    .await
    .unwrap();
    let valid = serde_json::json!({"podSelector": {}, "egress": [{"ports": [{"port": 5432}]}]});
    t.policy(&ns, "p", valid).await.unwrap();

    let op = Operator::start("inforce-1", &[]);
    let (before, rules) = eventually(WAIT, "generation 1 in force and in status", || async {
        let (p, rules) = policy_and_its_rules(&client, &ns, &node).await?;
        let in_force = p.status.as_ref()?.in_force.as_ref()?;
        (in_force.generation == 1 && !rules.is_empty()).then_some((p, rules))
    })
    .await;
    drop(op);

    // An error the 1.20 schema cannot catch: the operator alone refuses it.
    let invalid = serde_json::json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.9.0.0/24"]}}]}]});
    t.policy(&ns, "p", invalid).await.unwrap();
    let op = Operator::start("inforce-2", &[]);
    let after = eventually(WAIT, "Ready=False for generation 2", || async {
        let p = Api::<FlowPolicy>::namespaced(client.clone(), &ns)
            .get("p")
            .await
            .ok()?;
        let s = p.status.as_ref()?;
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
        (s.observed_generation == Some(2) && ready.status == "False").then_some(p)
    })
    .await;
    // Time for the restarted operator to have rewritten the config, had it
    // dropped the rules.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, rules_after) = policy_and_its_rules(&client, &ns, &node).await.unwrap();
    assert_eq!(
        rules_after, rules,
        "the node's rules are those of generation 1"
    );
    let (status_before, status) = (before.status.unwrap(), after.status.clone().unwrap());
    assert_eq!(status.revision, status_before.revision);
    assert_eq!(status.in_force.map(|f| f.generation), Some(1));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "InvalidSpec");
    assert!(
        ready.message.contains("stays in force"),
        "{}",
        ready.message
    );
    // Argo CD shows it Degraded, with the operator's message.
    let argo = flowlens_e2e::argocd::health(&serde_json::to_value(&after).unwrap()).unwrap();
    assert_eq!(argo.status, "Degraded");
    assert_eq!(argo.message, ready.message);
    drop(op);
    t.cleanup().await;
}

/// `flowlens-bench scale` at a reduced size (`just bench` runs the full
/// size): it runs against the API server and a real operator, every config
/// is written once, and what it prints holds together.
#[test]
fn the_scale_benchmark_runs_at_a_reduced_size() {
    let out = std::process::Command::new(flowlens_e2e::process::workspace_bin("flowlens-bench"))
        .args([
            "scale",
            "--nodes",
            "10",
            "--pods",
            "400",
            "--policies",
            "10",
            "--ip-changes",
            "3",
            "--idle-seconds",
            "5",
            "--dual-stack",
            "--json",
        ])
        .output()
        .expect("flowlens-bench (cargo build --workspace --bins)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(r["settled"], true, "{r}");
    assert_eq!(r["failed_reconciles"], 0, "{r}");
    assert!(num("max_object_bytes") > 1000.0, "{r}");
    // Only the pod's own node's config carries its IP (the observation
    // traces it); the nodes whose rules name it as a peer get the slice of
    // the set that holds it, not a new config.
    assert_eq!(num("configs_per_pod_ip_change"), 1.0, "{r}");
    assert!(
        (1.0..=4.0).contains(&num("slices_per_pod_ip_change")),
        "{r}"
    );
    assert!(num("bytes_per_pod_ip_change") > 0.0, "{r}");
    assert!(num("bytes_per_policy_applied") > 0.0, "{r}");
    assert!(
        num("propagation_p99_ms") >= num("propagation_p50_ms"),
        "{r}"
    );
    assert!(
        num("operator_rss_mb") > 0.0 && num("full_compile_ms") >= 0.0,
        "{r}"
    );
}
