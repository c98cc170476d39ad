//! A simulated cluster for end-to-end tests and the demo: the local API
//! server, a real `flowlens-operator`, and simulated nodes (network
//! namespaces) each with a real `flowlens-agent` that, as in a cluster,
//! takes its config from the API server and reports to the operator.
//!
//! ```text
//!  root netns: kube-apiserver (127.0.0.1) <- proxy (10.250.0.1:P) <-+
//!              operator, report endpoint (10.250.0.1:C)  <----------+-- agents in node netns
//! ```
//!
//! Agents authenticate like in a cluster: each node has an agent Pod
//! object (host network), and the agent uses ServiceAccount tokens bound
//! to it (one for the API server, one with the report audience for the
//! operator). RBAC comes from `deploy/base/agent-rbac.yaml`.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use flowlens_api::{NodeAgentConfig, report::REPORT_AUDIENCE};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    agent::{Agent, AgentDump, cleanup_pins},
    cluster::{kubeconfig_path, repo_root},
    objects::TestObjects,
    operator::Operator,
    proxy::TcpProxy,
    topology::{GATEWAY, Topology},
};

pub struct SimCluster {
    pub topo: Topology,
    pub client: Client,
    pub objects: TestObjects,
    pub run: String,
    /// Where the agents' ServiceAccount and Pods live.
    pub agent_namespace: String,
    pub operator: Option<Operator>,
    /// One per node, once started.
    pub agents: Vec<Option<Agent>>,
    /// The report endpoint (root namespace, reachable from nodes).
    pub collector: SocketAddr,
    api_proxy: TcpProxy,
}

const AGENT_SA: &str = "flowlens-agent";

/// The admin kubeconfig's cluster entry and API server address.
fn admin_cluster() -> anyhow::Result<(serde_yaml::Value, SocketAddr)> {
    let path = kubeconfig_path();
    let kc: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let cluster = kc["clusters"][0]["cluster"].clone();
    let server = cluster["server"]
        .as_str()
        .context("the kubeconfig has no server")?;
    let hostport = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let addr = hostport
        .to_socket_addrs()?
        .next()
        .context("cannot resolve the API server address")?;
    Ok((cluster, addr))
}

impl SimCluster {
    /// Creates `nodes` (`(name, zone)`, names used as they are, so make
    /// them unique: tests prefix their run id), linked by a fabric, with
    /// Node objects, and the agents' namespace, ServiceAccount and RBAC.
    pub async fn new(run: &str, nodes: &[(&str, &str)]) -> anyhow::Result<SimCluster> {
        let client = crate::cluster::client().await?;
        let objects = TestObjects::new(client.clone(), run);
        objects.sweep_earlier_runs().await;
        let mut topo = Topology::new();
        topo.add_fabric();
        topo.connect_root();
        for (name, zone) in nodes {
            topo.add_node(name, Some(zone));
            objects.node(name, zone).await?;
        }
        let agent_namespace = format!("{run}-system");
        objects.namespace(&agent_namespace, &[]).await?;
        // Applied (not created): a namespace finalized without a namespace
        // controller leaves its contents behind.
        let sa = json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": AGENT_SA, "namespace": agent_namespace},
        });
        Api::<ServiceAccount>::namespaced(client.clone(), &agent_namespace)
            .patch(
                AGENT_SA,
                &PatchParams::apply("flowlens-e2e").force(),
                &Patch::Apply(&sa),
            )
            .await?;
        apply_agent_rbac(&client, run, &agent_namespace).await?;

        let (_, api_addr) = admin_cluster()?;
        let api_proxy = TcpProxy::start(SocketAddr::new(GATEWAY.into(), 0), api_addr)
            .context("starting the API server proxy on the gateway address")?;
        let collector = {
            let l = std::net::TcpListener::bind(SocketAddr::new(GATEWAY.into(), 0))?;
            l.local_addr()?
        };
        let agents = nodes.iter().map(|_| None).collect();
        Ok(SimCluster {
            topo,
            client,
            objects,
            run: run.to_owned(),
            agent_namespace,
            operator: None,
            agents,
            collector,
            api_proxy,
        })
    }

    /// Starts the operator, reporting endpoint on the gateway address.
    pub fn start_operator(&mut self, extra: &[&str]) {
        self.start_operator_with_env(extra, &[]);
    }

    /// [`Self::start_operator`] with more environment variables.
    pub fn start_operator_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let addr = self.collector.to_string();
        let url = format!("http://{addr}");
        let sa = format!("{}/{AGENT_SA}", self.agent_namespace);
        let mut args = vec![
            "--collector-addr",
            &addr,
            "--collector-url",
            &url,
            "--agent-service-account",
            &sa,
        ];
        args.extend_from_slice(extra);
        self.operator = Some(Operator::start_with_env(&self.run, &args, env));
    }

    /// Adds a pod: a network namespace behind `node` and a running Pod
    /// object with its IPv4 and IPv6 addresses (and the API's UID on its
    /// cgroup). Returns the topology's pod index.
    pub async fn add_pod(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        deployment: Option<&str>,
    ) -> anyhow::Result<usize> {
        let idx = self.topo.add_pod(node, name);
        let (ip4, ip6) = (
            self.topo.pods[idx].ip4.to_string(),
            self.topo.pods[idx].ip6.to_string(),
        );
        let node_name = self.topo.nodes[node].name.clone();
        let pod = self
            .objects
            .pod(
                namespace,
                name,
                &node_name,
                &[&ip4, &ip6],
                labels,
                deployment,
            )
            .await?;
        self.topo.set_pod_uid(idx, &pod.uid().unwrap_or_default());
        Ok(idx)
    }

    fn token_paths(&self, node: usize) -> (PathBuf, PathBuf, PathBuf) {
        let n = &self.topo.nodes[node].name;
        let d = &self.topo.work_dir;
        (
            d.join(format!("{n}-api-token")),
            d.join(format!("{n}-report-token")),
            d.join(format!("{n}-kubeconfig.yaml")),
        )
    }

    /// Writes fresh tokens for `node`'s agent (tokens last an hour; a
    /// long demo refreshes them like a kubelet would).
    pub async fn write_tokens(&self, node: usize) -> anyhow::Result<()> {
        let pod_name = format!("flowlens-agent-{}", self.topo.nodes[node].name);
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.agent_namespace)
            .get(&pod_name)
            .await?;
        let (api_token, report_token, _) = self.token_paths(node);
        for (path, audience) in [(api_token, None), (report_token, Some(REPORT_AUDIENCE))] {
            let token = request_token(&self.client, &self.agent_namespace, &pod, audience).await?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, token)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Starts `node`'s agent: its Pod object, tokens, kubeconfig, process.
    pub async fn start_agent(&mut self, node: usize, extra: &[&str]) -> anyhow::Result<()> {
        let n = &self.topo.nodes[node];
        let pod_name = format!("flowlens-agent-{}", n.name);
        let api = Api::<Pod>::namespaced(self.client.clone(), &self.agent_namespace);
        if api.get_opt(&pod_name).await?.is_none() {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": pod_name, "namespace": self.agent_namespace,
                             "labels": {crate::objects::TEST_LABEL: self.run, "app.kubernetes.io/name": "flowlens-agent"}},
                "spec": {"nodeName": n.name, "hostNetwork": true, "serviceAccountName": AGENT_SA,
                         "containers": [{"name": "agent", "image": "flowlens-agent"}]},
            }))?;
            api.create(&PostParams::default(), &pod).await?;
            api.patch_status(
                &pod_name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"status": {"phase": "Running", "podIP": n.uplink4.to_string(),
                    "podIPs": [{"ip": n.uplink4.to_string()}]}}),
                ),
            )
            .await?;
        }
        self.write_tokens(node).await?;
        let (api_token, report_token, kubeconfig) = self.token_paths(node);
        let (mut cluster, _) = admin_cluster()?;
        cluster["server"] = format!("https://{}", self.api_proxy.addr).into();
        let kc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "flowlens-local", "cluster": cluster}],
            "users": [{"name": "agent", "user": {"tokenFile": api_token.display().to_string()}}],
            "contexts": [{"name": "agent", "context": {"cluster": "flowlens-local", "user": "agent"}}],
            "current-context": "agent",
        });
        std::fs::write(&kubeconfig, serde_yaml::to_string(&kc)?)?;
        let agent = Agent::in_cluster(&self.topo, node, &kubeconfig, &report_token, extra);
        self.agents[node] = Some(agent);
        Ok(())
    }

    /// A kubeconfig (a file in the run's work directory) of a user who has
    /// no role yet: ServiceAccount `sa` of `namespace`, created here, with
    /// an hour's token from the TokenRequest API.
    pub async fn user_kubeconfig(&self, namespace: &str, sa: &str) -> anyhow::Result<PathBuf> {
        let path = self
            .topo
            .work_dir
            .join(format!("{namespace}-{sa}-kubeconfig.yaml"));
        crate::cluster::service_account_kubeconfig(&self.client, namespace, sa, &path).await?;
        Ok(path)
    }

    /// Applies the ClusterRoles of `file` (a path under the repository) and
    /// binds `role` of them to ServiceAccount `namespace/sa` cluster-wide
    /// (unbound at shutdown).
    pub async fn grant_cluster_role(
        &self,
        file: &str,
        role: &str,
        namespace: &str,
        sa: &str,
    ) -> anyhow::Result<()> {
        apply_cluster_role(&self.client, file, role).await?;
        let binding = format!("{}-user", self.run);
        bind_cluster_role(&self.client, &self.run, &binding, role, namespace, sa).await
    }

    /// Applies the ClusterRoles of `file` and binds `role` of them to
    /// ServiceAccount `namespace/sa` in `namespace` only (a RoleBinding).
    pub async fn grant_role_in_namespace(
        &self,
        file: &str,
        role: &str,
        namespace: &str,
        sa: &str,
    ) -> anyhow::Result<()> {
        apply_cluster_role(&self.client, file, role).await?;
        let binding = format!("{}-{sa}", self.run);
        let b: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": binding, "namespace": namespace,
                         "labels": {crate::objects::TEST_LABEL: self.run}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
        }))?;
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(self.client.clone(), namespace)
            .patch(
                &binding,
                &PatchParams::apply("flowlens-e2e").force(),
                &Patch::Apply(&b),
            )
            .await?;
        Ok(())
    }

    /// Starts the operator with its report endpoint (and the live API) on
    /// TLS: `tls`'s certificate, which agents verify with its CA.
    pub fn start_operator_tls(&mut self, tls: &crate::live::CollectorCerts, extra: &[&str]) {
        let addr = self.collector.to_string();
        let url = format!("https://{addr}");
        let sa = format!("{}/{AGENT_SA}", self.agent_namespace);
        let (cert, key, ca) = (
            tls.cert.display().to_string(),
            tls.key.display().to_string(),
            tls.ca.display().to_string(),
        );
        let mut args = vec![
            "--collector-addr",
            &addr,
            "--collector-url",
            &url,
            "--agent-service-account",
            &sa,
            "--collector-tls-cert",
            &cert,
            "--collector-tls-key",
            &key,
            "--collector-ca-file",
            &ca,
        ];
        args.extend_from_slice(extra);
        self.operator = Some(Operator::start_with_env(&self.run, &args, &[]));
    }

    /// Starts every node's agent and waits until each applies its config.
    pub async fn start_agents(&mut self) -> anyhow::Result<()> {
        self.start_agents_with(|_| Vec::new()).await
    }

    /// [`Self::start_agents`], with `extra(node)` added to each agent's
    /// arguments.
    pub async fn start_agents_with(
        &mut self,
        extra: impl Fn(usize) -> Vec<&'static str>,
    ) -> anyhow::Result<()> {
        for node in 0..self.topo.nodes.len() {
            self.start_agent(node, &extra(node)).await?;
        }
        for node in 0..self.topo.nodes.len() {
            self.wait_applied(node, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// Waits until `node`'s agent applies the current revision of its
    /// NodeAgentConfig.
    pub async fn wait_applied(
        &mut self,
        node: usize,
        timeout: Duration,
    ) -> anyhow::Result<AgentDump> {
        let name = self.topo.nodes[node].name.clone();
        let api = Api::<NodeAgentConfig>::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let want = api.get_opt(&name).await?.map(|n| n.spec.revision);
            let agent = self.agents[node].as_ref().context("agent not started")?;
            if let (Some(want), Some(d)) = (&want, agent.dump())
                && d.applied_revision.as_ref() == Some(want)
            {
                return Ok(d);
            }
            if tokio::time::Instant::now() >= deadline {
                let agent = self.agents[node].as_mut().unwrap();
                anyhow::bail!(
                    "the agent of {name} did not apply revision {want:?} within {timeout:?}; running: {}\n{}",
                    agent.proc.is_running(),
                    agent.proc.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn agent(&self, node: usize) -> &Agent {
        self.agents[node].as_ref().expect("agent started")
    }

    pub fn operator(&self) -> &Operator {
        self.operator.as_ref().expect("operator started")
    }

    /// Stops agents (SIGTERM: they flush and report), then the operator;
    /// deletes every object of this run and the agents' pins; checks
    /// nothing is left pinned.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for a in self.agents.iter_mut().flatten() {
            a.proc.stop(Duration::from_secs(10));
        }
        if let Some(mut op) = self.operator.take() {
            op.proc.stop(Duration::from_secs(10));
        }
        let _ = Api::<ServiceAccount>::namespaced(self.client.clone(), &self.agent_namespace)
            .delete(AGENT_SA, &DeleteParams::default())
            .await;
        self.objects.cleanup().await;
        for binding in ["agent", "user"] {
            let _ = Api::<ClusterRoleBinding>::all(self.client.clone())
                .delete(&format!("{}-{binding}", self.run), &DeleteParams::default())
                .await;
        }
        let mut left = Vec::new();
        for (node, a) in self.agents.iter().enumerate() {
            if a.is_none() {
                continue;
            }
            let root = self.topo.bpffs_root(node);
            // What is left is reported below.
            let _ = cleanup_pins(&root);
            if root.exists()
                && std::fs::read_dir(&root)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false)
            {
                left.push(root.display().to_string());
            }
        }
        drop(self.api_proxy);
        drop(self.topo);
        anyhow::ensure!(left.is_empty(), "pins left behind: {left:?}");
        Ok(())
    }
}

/// Applies (server-side) every ClusterRole of `file` (a path under the
/// repository) and returns their names.
async fn apply_cluster_roles(client: &Client, file: &str) -> anyhow::Result<Vec<String>> {
    let path = repo_root().join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut names = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if v["kind"].as_str() == Some("ClusterRole") {
            let role: ClusterRole = serde_yaml::from_value(v)?;
            let name = role.name_any();
            Api::<ClusterRole>::all(client.clone())
                .patch(
                    &name,
                    &PatchParams::apply("flowlens-e2e").force(),
                    &Patch::Apply(&role),
                )
                .await?;
            names.push(name);
        }
    }
    Ok(names)
}

/// Binds ClusterRole `role` to ServiceAccount `namespace/sa`, cluster-wide,
/// as ClusterRoleBinding `binding`.
async fn bind_cluster_role(
    client: &Client,
    run: &str,
    binding: &str,
    role: &str,
    namespace: &str,
    sa: &str,
) -> anyhow::Result<()> {
    let b: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": binding, "labels": {crate::objects::TEST_LABEL: run}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            binding,
            &PatchParams::apply("flowlens-e2e").force(),
            &Patch::Apply(&b),
        )
        .await?;
    Ok(())
}

/// Applies the ClusterRoles of `file`, which must define `role`.
async fn apply_cluster_role(client: &Client, file: &str, role: &str) -> anyhow::Result<()> {
    let roles = apply_cluster_roles(client, file).await?;
    anyhow::ensure!(
        roles.iter().any(|r| r == role),
        "{file} has no ClusterRole {role}"
    );
    Ok(())
}

/// The agents' ClusterRole from `deploy/base/agent-rbac.yaml`, bound to this
/// run's agent ServiceAccount.
async fn apply_agent_rbac(client: &Client, run: &str, namespace: &str) -> anyhow::Result<()> {
    let roles = apply_cluster_roles(client, "deploy/base/agent-rbac.yaml").await?;
    let role = roles
        .first()
        .context("deploy/base/agent-rbac.yaml has no ClusterRole")?;
    bind_cluster_role(
        client,
        run,
        &format!("{run}-agent"),
        role,
        namespace,
        AGENT_SA,
    )
    .await
}

use serde::Deserialize as _;

/// A token of the agent ServiceAccount bound to `pod`.
async fn request_token(
    client: &Client,
    namespace: &str,
    pod: &Pod,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let got = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(AGENT_SA, &PostParams::default(), &req)
        .await
        .context("TokenRequest for the agent ServiceAccount")?;
    got.status
        .and_then(|s| s.token)
        .context("the TokenRequest answer has no token")
}

/// Waits until `f` returns `Some`, polling every 500 ms.
pub async fn poll<T, F, Fut>(timeout: Duration, what: &str, f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    crate::objects::poll_every(Duration::from_millis(500), timeout, what, f).await
}
