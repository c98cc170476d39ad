//! Creating the cluster objects a test needs: Nodes, Namespaces and Pods
//! (with their IP set through the status subresource, as a kubelet would),
//! and cleaning them up by label.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use flowlens_api::{FlowPolicy, NetworkObservation, NodeAgentConfig};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// Every object a test creates carries this label (value: the test's run id).
pub const TEST_LABEL: &str = "flowlens.dev/test-run";

/// A test's objects, named and labelled with its run id.
pub struct TestObjects {
    pub client: Client,
    pub run: String,
}

impl TestObjects {
    pub fn new(client: Client, run: &str) -> Self {
        TestObjects {
            client,
            run: run.to_owned(),
        }
    }

    fn labels(&self, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut l: BTreeMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert(TEST_LABEL.into(), self.run.clone());
        l
    }

    pub async fn node(&self, name: &str, zone: &str) -> anyhow::Result<Node> {
        let mut labels = self.labels(&[]);
        labels.insert("topology.kubernetes.io/zone".into(), zone.into());
        let n: Node =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
        Ok(Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &n)
            .await?)
    }

    pub async fn namespace(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Namespace> {
        let n: Namespace = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": self.labels(labels)}}),
        )?;
        Ok(Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &n)
            .await?)
    }

    /// Creates a running pod on `node` with `ips`, owned by a ReplicaSet of
    /// Deployment `deployment` when given.
    pub async fn pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        ips: &[&str],
        labels: &[(&str, &str)],
        deployment: Option<&str>,
    ) -> anyhow::Result<Pod> {
        let mut l = self.labels(labels);
        let mut meta = json!({"name": name, "namespace": ns});
        if let Some(d) = deployment {
            l.insert("pod-template-hash".into(), "5d8f7c9b6".into());
            meta["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{d}-5d8f7c9b6"),
                "uid": "00000000-0000-0000-0000-000000000001", "controller": true
            }]);
        }
        meta["labels"] = json!(l);
        let p: Pod = serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        }))?;
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        api.create(&PostParams::default(), &p)
            .await
            .with_context(|| format!("creating pod {ns}/{name}"))?;
        self.set_pod_ips(ns, name, ips).await
    }

    /// Sets a pod's IPs (and phase Running) through the status subresource.
    pub async fn set_pod_ips(&self, ns: &str, name: &str, ips: &[&str]) -> anyhow::Result<Pod> {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let mut status = json!({"phase": "Running"});
        if let Some(first) = ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
        }
        Ok(api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?)
    }

    /// Creates or updates (server-side apply) a NetworkObservation.
    pub async fn observation(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> anyhow::Result<NetworkObservation> {
        let obj = json!({
            "apiVersion": "flowlens.dev/v1alpha1", "kind": "NetworkObservation",
            "metadata": {"name": name, "labels": {TEST_LABEL: self.run}},
            "spec": spec,
        });
        Ok(Api::<NetworkObservation>::all(self.client.clone())
            .patch(
                name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&obj),
            )
            .await?)
    }

    /// Creates or updates (server-side apply) a FlowPolicy.
    pub async fn policy(
        &self,
        ns: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> anyhow::Result<FlowPolicy> {
        let obj = json!({
            "apiVersion": "flowlens.dev/v1alpha1", "kind": "FlowPolicy",
            "metadata": {"name": name, "labels": {TEST_LABEL: self.run}},
            "spec": spec,
        });
        Ok(Api::<FlowPolicy>::namespaced(self.client.clone(), ns)
            .patch(
                name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&obj),
            )
            .await?)
    }

    /// Deletes what earlier runs left behind (a failed test skips its
    /// cleanup). Tests that share the API server run one at a time, so
    /// nothing of another live test is touched.
    pub async fn sweep_earlier_runs(&self) {
        let all = TestObjects {
            client: self.client.clone(),
            run: String::new(),
        };
        all.delete_matching(&ListParams::default().labels(TEST_LABEL))
            .await;
    }

    /// Deletes everything labelled with this run (pods, policies,
    /// observations, namespaces, nodes, and the configs of those nodes).
    pub async fn cleanup(&self) {
        self.delete_matching(&ListParams::default().labels(&format!("{TEST_LABEL}={}", self.run)))
            .await;
    }

    async fn delete_matching(&self, lp: &ListParams) {
        let lp = lp.clone();

        let dp = DeleteParams::default();
        if let Ok(pods) = Api::<Pod>::all(self.client.clone()).list(&lp).await {
            for p in pods.items {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let _ = Api::<Pod>::namespaced(self.client.clone(), &ns)
                    .delete(
                        p.metadata.name.as_deref().unwrap_or_default(),
                        &DeleteParams {
                            grace_period_seconds: Some(0),
                            ..dp.clone()
                        },
                    )
                    .await;
            }
        }
        if let Ok(list) = Api::<FlowPolicy>::all(self.client.clone()).list(&lp).await {
            for p in list.items {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let _ = Api::<FlowPolicy>::namespaced(self.client.clone(), &ns)
                    .delete(p.metadata.name.as_deref().unwrap_or_default(), &dp)
                    .await;
            }
        }
        let _ = Api::<NetworkObservation>::all(self.client.clone())
            .delete_collection(&dp, &lp)
            .await;
        let _ = Api::<flowlens_api::AddressSetSlice>::all(self.client.clone())
            .delete_collection(&dp, &lp)
            .await;
        if let Ok(list) = Api::<Namespace>::all(self.client.clone()).list(&lp).await {
            for n in list.items {
                let _ = crate::cluster::delete_namespace(
                    &self.client,
                    n.metadata.name.as_deref().unwrap_or_default(),
                )
                .await;
            }
        }
        if let Ok(list) = Api::<Node>::all(self.client.clone()).list(&lp).await {
            for n in list.items {
                let name = n.metadata.name.unwrap_or_default();
                let _ = Api::<Node>::all(self.client.clone())
                    .delete(&name, &dp)
                    .await;
                let _ = Api::<NodeAgentConfig>::all(self.client.clone())
                    .delete(&name, &dp)
                    .await;
            }
        }
    }
}

/// Polls `f` every `every` until it returns `Some`; an error after `timeout`.
pub(crate) async fn poll_every<T, F, Fut>(
    every: Duration,
    timeout: Duration,
    what: &str,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll_every(Duration::from_millis(100), timeout, what, f)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}
