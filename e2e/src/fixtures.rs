//! What the end-to-end tests share: reading status, waiting for an
//! observation to be Ready or a policy Enforced (and Argo CD to call it
//! Healthy), and the two-node shop (web in zone-a, db in zone-b).

use std::time::Duration;

use flowlens_api::{
    FlowPolicy, NetworkObservation, flow_policy::FlowPolicyStatus,
    network_observation::NetworkObservationStatus,
};
use kube::Api;
use serde_json::json;

use crate::{
    cluster::unique_name,
    process::require_root,
    sim::{SimCluster, poll},
};

pub async fn observation(sim: &SimCluster, name: &str) -> NetworkObservationStatus {
    Api::<NetworkObservation>::all(sim.client.clone())
        .get(name)
        .await
        .ok()
        .and_then(|o| o.status)
        .unwrap_or_default()
}

pub async fn policy(sim: &SimCluster, ns: &str, name: &str) -> FlowPolicyStatus {
    Api::<FlowPolicy>::namespaced(sim.client.clone(), ns)
        .get(name)
        .await
        .ok()
        .and_then(|o| o.status)
        .unwrap_or_default()
}

pub fn condition<'a>(
    c: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    c.iter().find(|c| c.type_ == t)
}

/// Waits (30 s at most) until observation `name` is Ready.
pub async fn wait_ready(sim: &SimCluster, name: &str) {
    poll(
        Duration::from_secs(30),
        &format!("{name} Ready"),
        || async {
            let s = observation(sim, name).await;
            condition(&s.conditions, "Ready")
                .filter(|c| c.status == "True")
                .map(|_| ())
        },
    )
    .await
    .unwrap();
    let obj = Api::<NetworkObservation>::all(sim.client.clone())
        .get(name)
        .await
        .unwrap();
    assert_argo_healthy(&obj);
}

/// Argo CD's health check calls a Ready observation or an Enforced policy
/// (as the API server serves it) Healthy.
pub fn assert_argo_healthy(obj: &impl serde::Serialize) {
    let obj = serde_json::to_value(obj).unwrap();
    let health = crate::argocd::health(&obj).unwrap();
    assert_eq!(
        health.status, "Healthy",
        "Argo CD health of {obj}: {health:?}"
    );
}

/// Waits (30 s at most) until policy `ns/name` is Enforced.
pub async fn wait_enforced(sim: &SimCluster, ns: &str, name: &str) {
    poll(
        Duration::from_secs(30),
        &format!("{name} Enforced"),
        || async {
            let s = policy(sim, ns, name).await;
            condition(&s.conditions, "Enforced")
                .filter(|c| c.status == "True")
                .map(|_| ())
        },
    )
    .await
    .unwrap();
    let obj = Api::<FlowPolicy>::namespaced(sim.client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    assert_argo_healthy(&obj);
}

/// Waits until status shows a window that started at or after `t` (so
/// every window up to `t` is counted).
pub async fn status_after(sim: &SimCluster, name: &str, t: i64) -> NetworkObservationStatus {
    poll(
        Duration::from_secs(45),
        &format!("{name}: a window after {t}"),
        || async {
            let s = observation(sim, name).await;
            s.last_window
                .as_ref()
                .is_some_and(|w| w.start.0.as_second() >= t)
                .then_some(s)
        },
    )
    .await
    .unwrap()
}

/// Two nodes in two zones; web-1 on the first and db-1 on the second, in
/// namespace `<run>-shop`.
pub struct TwoNodes {
    pub sim: SimCluster,
    pub run: String,
    pub a1: String,
    pub b1: String,
    pub shop: String,
    pub web: usize,
    pub db: usize,
}

/// Waits until every connection `pod` makes to `addr` for half a second is
/// refused at `connect()` (none succeeds, more than 5 are denied); the
/// connect loop's report.
pub async fn wait_refused(
    sim: &SimCluster,
    pod: usize,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    poll(
        timeout,
        &format!("connections to {addr} refused"),
        || async {
            let r = crate::traffic::spawn_traffic(
                &sim.topo,
                pod,
                "connect-loop",
                addr,
                &["--duration-ms", "500", "--interval-ms", "20"],
            )
            .join()
            .unwrap();
            (r["successes"] == 0 && r["denied"].as_u64()? > 5).then_some(r)
        },
    )
    .await
}

/// FlowPolicy `deny-db` in `shop`: web pods may not connect to db:5432.
pub async fn deny_web_to_db(sim: &SimCluster, shop: &str) {
    sim.objects
        .policy(
            shop,
            "deny-db",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                               "ports": [{"port": 5432}]}]}),
        )
        .await
        .unwrap();
}

pub async fn two_nodes(prefix: &str) -> TwoNodes {
    require_root();
    let run = unique_name(prefix);
    let (a1, b1) = (format!("{run}-a1"), format!("{run}-b1"));
    let mut sim = SimCluster::new(&run, &[(&a1, "zone-a"), (&b1, "zone-b")])
        .await
        .unwrap();
    let shop = format!("{run}-shop");
    sim.objects.namespace(&shop, &[]).await.unwrap();
    let web = sim
        .add_pod(0, &shop, "web-1", &[("app", "web")], Some("web"))
        .await
        .unwrap();
    let db = sim
        .add_pod(1, &shop, "db-1", &[("app", "db")], Some("db"))
        .await
        .unwrap();
    TwoNodes {
        sim,
        run,
        a1,
        b1,
        shop,
        web,
        db,
    }
}
