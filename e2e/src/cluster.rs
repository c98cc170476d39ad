//! Access to the API server the tests run against.
//!
//! The kubeconfig comes from `FLOWLENS_KUBECONFIG`, else `.flowlens/kubeconfig`
//! at the repository root (written by `just up`). There is deliberately no
//! fallback to `~/.kube/config`: tests create and delete Nodes and CRDs, and
//! must never touch a cluster by accident.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// Path of the kubeconfig the tests use.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("FLOWLENS_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".flowlens/kubeconfig"))
}

/// Writes to `path` a kubeconfig of a user who has no role yet:
/// ServiceAccount `sa` of `namespace`, created here, with an hour's token
/// from the TokenRequest API; the cluster is the test kubeconfig's.
pub async fn service_account_kubeconfig(
    client: &Client,
    namespace: &str,
    sa: &str,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": sa}}))?;
    accounts.create(&PostParams::default(), &account).await?;
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = accounts
        .create_token_request(sa, &PostParams::default(), &req)
        .await?
        .status
        .and_then(|s| s.token)
        .context("the TokenRequest answer has no token")?;
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(kubeconfig_path())?)?;
    let kc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "cluster", "user": sa}}],
        "current-context": sa,
    });
    std::fs::write(path, serde_yaml::to_string(&kc)?)?;
    Ok(())
}

/// A client for the test cluster. Fails with the command to run when there is
/// no control plane: API-server tests never skip silently.
pub async fn client() -> anyhow::Result<Client> {
    let path = kubeconfig_path();
    if !path.exists() {
        bail!(
            "no kubeconfig at {}: start the local control plane with `just up` \
             (or set FLOWLENS_KUBECONFIG to an existing cluster's kubeconfig)",
            path.display()
        );
    }
    let kubeconfig =
        Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("building a client config")?;
    let client = Client::try_from(config).context("building a client")?;
    client.apiserver_version().await.with_context(|| {
        format!(
            "the API server of {} does not answer: is `just up` running?",
            path.display()
        )
    })?;
    Ok(client)
}

/// A name unique to this process and call, usable as a namespace or object name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 100_000;
    format!("{prefix}-{}-{t}-{n}", std::process::id() % 100_000)
}

/// Creates a namespace with the given labels.
pub async fn create_namespace(
    client: &Client,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<Namespace> {
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        },
    }))?;
    Ok(Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?)
}

/// Deletes a namespace and, since the local control plane runs no
/// namespace controller, finalizes it so that it really goes away.
/// Objects inside must be deleted by the caller first.
pub async fn delete_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    // PUT /api/v1/namespaces/{name}/finalize with no finalizers.
    if let Some(mut ns) = api.get_opt(name).await? {
        if let Some(spec) = ns.spec.as_mut() {
            spec.finalizers = Some(Vec::new());
        }
        match api
            .replace_subresource("finalize", name, &PostParams::default(), &ns)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
