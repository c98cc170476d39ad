//! The operator against a real kube-apiserver (`just up`): objects in, exact
//! per-node configs and truthful status out.

use std::time::Duration;

use flowlens_api::{
    FlowPolicy, NetworkObservation, NodeAgentConfig,
    node_agent_config::{NodeAgentConfigSpec, NodeAgentConfigStatus},
};
use flowlens_e2e::{
    cluster::{client, unique_name},
    objects::{TestObjects, eventually},
    operator::Operator,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

async fn config(c: &Client, node: &str) -> Option<NodeAgentConfigSpec> {
    Api::<NodeAgentConfig>::all(c.clone())
        .get_opt(node)
        .await
        .ok()
        .flatten()
        .map(|n| n.spec)
}

/// The addresses of the sets `spec`'s rules name, from their
/// AddressSetSlices (configs carry only the names).
async fn set_cidrs(c: &Client, spec: &NodeAgentConfigSpec) -> Vec<String> {
    let named: std::collections::BTreeSet<&str> = spec
        .rules
        .iter()
        .filter_map(|r| r.address_set.as_deref())
        .collect();
    let slices = Api::<flowlens_api::AddressSetSlice>::all(c.clone())
        .list(&Default::default())
        .await
        .unwrap();
    let mut v: Vec<String> = slices
        .items
        .iter()
        .filter(|s| named.contains(s.spec.address_set.as_str()))
        .flat_map(|s| s.spec.entries().map(|e| e.cidr))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn endpoint_keys(spec: &NodeAgentConfigSpec) -> Vec<String> {
    spec.endpoints.iter().map(|e| e.key()).collect()
}

async fn apply_policy(
    c: &Client,
    ns: &str,
    name: &str,
    run: &str,
    spec: serde_json::Value,
) -> FlowPolicy {
    TestObjects::new(c.clone(), run)
        .policy(ns, name, spec)
        .await
        .unwrap()
}

async fn apply_observation(c: &Client, name: &str, run: &str, spec: serde_json::Value) {
    TestObjects::new(c.clone(), run)
        .observation(name, spec)
        .await
        .unwrap();
}

async fn condition(
    c: &Client,
    ns: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let p = Api::<FlowPolicy>::namespaced(c.clone(), ns)
        .get(name)
        .await
        .ok()?;
    p.status?
        .conditions
        .into_iter()
        .find(|x| x.type_ == type_)
        .map(|x| (x.status, x.reason, x.message))
}

struct Shop {
    t: TestObjects,
    n1: String,
    n2: String,
    shop: String,
    data: String,
}

async fn shop(prefix: &str) -> Shop {
    let c = client().await.unwrap();
    let run = unique_name(prefix);
    let t = TestObjects::new(c, &run);
    t.sweep_earlier_runs().await;
    let (n1, n2) = (format!("{run}-n1"), format!("{run}-n2"));
    let (shop, data) = (format!("{run}-shop"), format!("{run}-data"));
    t.node(&n1, "zone-a").await.unwrap();
    t.node(&n2, "zone-b").await.unwrap();
    // Label values unique to the run: selectors never reach other runs' objects.

    t.namespace(&shop, &[("team", &format!("{run}-store"))])
        .await
        .unwrap();
    t.namespace(&data, &[("team", &format!("{run}-data"))])
        .await
        .unwrap();
    t.pod(
        &shop,
        "web-1",
        &n1,
        &["10.201.1.1", "fd00:201::1:1"],
        &[("app", "web")],
        Some("web"),
    )
    .await
    .unwrap();
    t.pod(
        &shop,
        "api-1",
        &n1,
        &["10.201.1.2"],
        &[("app", "api")],
        None,
    )
    .await
    .unwrap();
    t.pod(
        &data,
        "db-1",
        &n2,
        &["10.201.2.1"],
        &[("app", "db"), ("version", "v3")],
        Some("db"),
    )
    .await
    .unwrap();
    Shop {
        t,
        n1,
        n2,
        shop,
        data,
    }
}

#[tokio::test]
async fn configs_track_pods_policies_and_observations() {
    let s = shop("cfg").await;
    let c = s.t.client.clone();
    apply_observation(
        &c,
        &s.t.run,
        &s.t.run,
        json!({"namespaces": [s.shop, s.data], "keepLabels": ["app"]}),
    )
    .await;
    apply_policy(
        &c,
        &s.shop,
        "web-no-db",
        &s.t.run,
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": format!("{}-data", s.t.run)}}, "podSelector": {"matchLabels": {"app": "db"}}}],
                           "ports": [{"port": 5432}]}]}),
    )
    .await;
    let op = Operator::start("cfg", &[]);

    // Node 1: both shop pods traced, web targeted, db's address as the peer.
    let n1 = eventually(WAIT, "node 1 config", || async {
        config(&c, &s.n1).await.filter(|s| !s.rules.is_empty())
    })
    .await;
    assert_eq!(
        endpoint_keys(&n1),
        vec![format!("{}/api-1", s.shop), format!("{}/web-1", s.shop)]
    );
    let web = n1.endpoints.iter().find(|e| e.pod == "web-1").unwrap();
    assert_eq!(web.workload.to_string(), "Deployment/web");
    assert_eq!(web.ips, vec!["10.201.1.1", "fd00:201::1:1"]);
    assert_eq!(
        web.labels.keys().collect::<Vec<_>>(),
        vec!["app"],
        "only keepLabels leave the operator"
    );
    assert_eq!(n1.zone.as_deref(), Some("zone-a"));
    assert_eq!(n1.observations.len(), 1);
    assert_eq!(n1.rules.len(), 1);
    let rule = &n1.rules[0];
    assert_eq!(rule.id, format!("{}/web-no-db/egress/0", s.shop));
    assert_eq!(rule.endpoints, vec![format!("{}/web-1", s.shop)]);
    assert_eq!((rule.ports[0].first, rule.ports[0].last), (5432, 5432));
    assert!(n1.address_sets.is_empty(), "sets are AddressSetSlices");
    let set = rule.address_set.clone().expect("a set of peers");
    assert_eq!(set_cidrs(&c, &n1).await, vec!["10.201.2.1/32"]);
    // A slice relabelled by hand (its content left as it is) is written
    // back: the agents selecting its set by label would miss its addresses.
    let slices = Api::<flowlens_api::AddressSetSlice>::all(c.clone());
    let slice = slices
        .list(&ListParams::default().labels(&format!(
            "{}={set}",
            flowlens_api::address_set_slice::SET_LABEL
        )))
        .await
        .unwrap()
        .items
        .remove(0);
    let edit = serde_json::json!({
        "metadata": {"labels": {flowlens_api::address_set_slice::SET_LABEL: "as-other"}},
    });
    slices
        .patch(
            &slice.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&edit),
        )
        .await
        .unwrap();
    eventually(WAIT, "the edited slice written back", || async {
        let s = slices.get(&slice.name_any()).await.ok()?;
        (s.labels().get(flowlens_api::address_set_slice::SET_LABEL) == Some(&set)
            && s.spec == slice.spec)
            .then_some(())
    })
    .await;
    // Node 2: only its own pod, no rule.
    let n2 = eventually(WAIT, "node 2 config", || async { config(&c, &s.n2).await }).await;

    assert_eq!(endpoint_keys(&n2), vec![format!("{}/db-1", s.data)]);
    assert!(n2.rules.is_empty());

    // A new peer reaches the rule; a deleted pod leaves every set.
    s.t.pod(
        &s.data,
        "db-2",
        &s.n1,
        &["10.201.1.9"],
        &[("app", "db")],
        None,
    )
    .await
    .unwrap();
    eventually(WAIT, "db-2 in the address set", || async {
        let x = config(&c, &s.n1).await?;
        set_cidrs(&c, &x)
            .await
            .contains(&"10.201.1.9/32".to_string())
            .then_some(x)
    })
    .await;
    // Without a kubelet, a bound pod only goes when deleted with no grace period.
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), &s.data)
        .delete(
            "db-1",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let n1 = eventually(WAIT, "db-1 gone from the address set", || async {
        let x = config(&c, &s.n1).await?;
        (set_cidrs(&c, &x).await == vec!["10.201.1.9/32"]).then_some(x)
    })
    .await;
    assert!(endpoint_keys(&n1).contains(&format!("{}/db-2", s.data)));
    eventually(WAIT, "db-1 gone from node 2", || async {
        config(&c, &s.n2).await.filter(|x| x.endpoints.is_empty())
    })
    .await;

    // A pod without an IP is skipped, then picked up when it gets one.
    s.t.pod(&s.shop, "late-1", &s.n2, &[], &[("app", "late")], None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(config(&c, &s.n2).await.unwrap().endpoints.is_empty());
    s.t.set_pod_ips(&s.shop, "late-1", &["10.201.2.7"])
        .await
        .unwrap();
    eventually(WAIT, "late-1 traced once it has an IP", || async {
        config(&c, &s.n2)
            .await
            .filter(|x| endpoint_keys(x) == vec![format!("{}/late-1", s.shop)])
    })
    .await;

    // Deleting the policy removes its rules.
    Api::<FlowPolicy>::namespaced(c.clone(), &s.shop)
        .delete("web-no-db", &DeleteParams::default())
        .await
        .unwrap();
    eventually(WAIT, "rules removed", || async {
        config(&c, &s.n1)
            .await
            .filter(|x| x.rules.is_empty() && x.address_sets.is_empty())
    })
    .await;
    // ... and, once no config names its set, the set's slices.
    let slices = Api::<flowlens_api::AddressSetSlice>::all(c.clone());
    let of_set = ListParams::default().labels(&format!(
        "{}={set}",
        flowlens_api::address_set_slice::SET_LABEL
    ));
    eventually(WAIT, "the set's slices deleted", || async {
        slices
            .list(&of_set)
            .await
            .ok()
            .filter(|l| l.items.is_empty())
    })
    .await;

    // Deleting a node deletes its config.
    Api::<k8s_openapi::api::core::v1::Node>::all(c.clone())
        .delete(&s.n2, &DeleteParams::default())
        .await
        .unwrap();
    eventually(WAIT, "node 2's config deleted", || async {
        config(&c, &s.n2).await.is_none().then_some(())
    })
    .await;
    drop(op);
    s.t.cleanup().await;
}

#[tokio::test]
async fn invalid_policies_are_named_and_enforced_follows_what_agents_report() {
    let s = shop("status").await;
    let c = s.t.client.clone();
    let op = Operator::start("status", &[]);

    // A cross-field error the 1.20 schema cannot catch (no CEL): the
    // operator reports it, naming the field.
    apply_policy(&c, &s.shop, "bad", &s.t.run, json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.9.0.0/24"]}}]}]})).await;
    let (st, reason, msg) = eventually(WAIT, "Ready=False", || async {
        condition(&c, &s.shop, "bad", "Ready")
            .await
            .filter(|x| x.0 == "False")
    })
    .await;
    assert_eq!((st.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(
        msg.contains("spec.egress[0].to[0].ipBlock.except[0]"),
        "{msg}"
    );

    // A valid policy: Ready, then Enforced once the node's agent reports it.
    let p = apply_policy(&c, &s.shop, "good", &s.t.run, json!({"podSelector": {"matchLabels": {"app": "web"}}, "egress": [{"ports": [{"port": 25}]}]})).await;
    let (_, reason, _) = eventually(WAIT, "Enforced=False/Pending", || async {
        condition(&c, &s.shop, "good", "Enforced")
            .await
            .filter(|x| x.1 == "Pending")
    })
    .await;
    assert_eq!(reason, "Pending");
    let status = Api::<FlowPolicy>::namespaced(c.clone(), &s.shop)
        .get("good")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.observed_generation, p.metadata.generation);
    assert_eq!(status.summary.unwrap().nodes, "0/1");
    let revision = status.revision.unwrap();
    // Play the agent of node 1.
    let nac = config(&c, &s.n1).await.unwrap();
    let agent_status = NodeAgentConfigStatus {
        applied_revision: Some(nac.revision.clone()),
        policies: nac.policies.clone(),
        ..Default::default()
    };
    assert!(
        nac.policies
            .iter()
            .any(|x| x.name == "good" && x.revision == revision)
    );
    Api::<NodeAgentConfig>::all(c.clone())
        .patch_status(&s.n1, &PatchParams::apply("flowlens-agent").force(), &Patch::Apply(&json!({"apiVersion": "flowlens.dev/v1alpha1", "kind": "NodeAgentConfig", "status": agent_status})))
        .await
        .unwrap();
    let (_, reason, msg) = eventually(WAIT, "Enforced=True", || async {
        condition(&c, &s.shop, "good", "Enforced")
            .await
            .filter(|x| x.0 == "True")
    })
    .await;
    assert_eq!(reason, "Enforced");
    assert!(msg.contains(&revision), "{msg}");
    let status = Api::<FlowPolicy>::namespaced(c.clone(), &s.shop)
        .get("good")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.summary.unwrap().nodes, "1/1");
    drop(op);
    s.t.cleanup().await;
}

#[tokio::test]
async fn an_idle_cluster_sees_no_writes_and_a_restarted_operator_writes_nothing_new() {
    let s = shop("quiet").await;
    let c = s.t.client.clone();
    apply_observation(&c, &s.t.run, &s.t.run, json!({"namespaces": [s.shop]})).await;
    apply_policy(
        &c,
        &s.shop,
        "p",
        &s.t.run,
        json!({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
    )
    .await;
    let op = Operator::start("quiet-1", &[]);
    eventually(WAIT, "status written", || async {
        condition(&c, &s.shop, "p", "Ready").await
    })
    .await;
    eventually(WAIT, "observation status", || async {
        Api::<NetworkObservation>::all(c.clone())
            .get(&s.t.run)
            .await
            .ok()?
            .status?
            .nodes
    })
    .await;
    // Settle, then measure an idle period.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = op.writes();
    let versions = |c: Client, s: &Shop| {
        let (n1, n2, shop, run) = (s.n1.clone(), s.n2.clone(), s.shop.clone(), s.t.run.clone());
        async move {
            let nacs = Api::<NodeAgentConfig>::all(c.clone());
            (
                nacs.get(&n1).await.unwrap().metadata.resource_version,
                nacs.get(&n2).await.unwrap().metadata.resource_version,
                Api::<FlowPolicy>::namespaced(c.clone(), &shop)
                    .get("p")
                    .await
                    .unwrap()
                    .metadata
                    .resource_version,
                Api::<NetworkObservation>::all(c.clone())
                    .get(&run)
                    .await
                    .unwrap()
                    .metadata
                    .resource_version,
            )
        }
    };
    let rv = versions(c.clone(), &s).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        op.writes(),
        before,
        "an idle operator wrote to the API server"
    );
    drop(op);

    let op2 = Operator::start("quiet-2", &[]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!("writes by the restarted operator: {}", op2.writes());
    assert_eq!(op2.writes(), 0.0, "a restarted operator rewrote something");
    assert_eq!(versions(c.clone(), &s).await, rv);
    drop(op2);
    s.t.cleanup().await;
}

#[tokio::test]
async fn an_operator_without_crds_says_how_to_install_them() {
    // Run against a namespace-less fake: a kubeconfig pointing at an API
    // server without the CRDs is hard to get on a shared server, so check
    // the message the error carries instead.
    let e = flowlens_operator::error::Error::CrdsMissing.to_string();
    assert!(e.contains("kubectl apply --server-side -f crds/"), "{e}");
    let _ = PostParams::default();
}
