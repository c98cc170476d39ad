//! Keeps the live API servable (I/O): reads the API server's front-proxy
//! settings (and asks TLS clients for certificates of its CA), and keeps
//! the APIService's `caBundle` equal to the CA agents verify the collector
//! with. Both are rechecked every [`RECHECK`]: a rotated CA is picked up.

use std::{sync::Arc, time::Duration};

use flowlens_api::live::{LIVE_GROUP, LIVE_VERSION};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use tracing::{info, warn};

use super::front_proxy::FrontProxy;
use crate::{
    collector::{Collector, ServerTls},
    context::Context,
};

const RECHECK: Duration = Duration::from_secs(30);

/// The APIService registering the live API.
pub fn apiservice_name() -> String {
    format!("{LIVE_VERSION}.{LIVE_GROUP}")
}

pub async fn run(ctx: Arc<Context>, collector: Arc<Collector>, tls: Option<Arc<ServerTls>>) {
    let mut last_problem: Option<String> = None;
    let mut last_bundle: Option<String> = None;
    loop {
        let setting = match (&tls, FrontProxy::load(&ctx.client).await) {
            (None, _) => Err("the report endpoint serves plain HTTP; the API server only proxies to TLS (run the operator with TLS: the default in a cluster)".to_owned()),
            (Some(_), Err(e)) => Err(e),
            (Some(tls), Ok(p)) => match tls.set_client_ca(Some(&p.client_ca)) {
                Ok(()) => Ok(p),
                Err(e) => Err(format!("the API server's front-proxy CA is unusable: {e:#}")),
            },
        };
        match &setting {
            Ok(_) if last_problem.is_some() || last_bundle.is_none() => {
                info!("live flows API ready (requests proxied by the API server are accepted)");
                last_problem = None;
            }
            Err(why) if last_problem.as_ref() != Some(why) => {
                warn!("live flows are not served: {why}");
                last_problem = Some(why.clone());
            }
            _ => {}
        }
        *collector.front_proxy.write().expect("front proxy lock") = setting;

        let bundle = ctx
            .compiler
            .lock()
            .expect("compiler lock")
            .collector()
            .and_then(|c| c.ca_bundle.clone());
        if let Some(b) = bundle.filter(|b| last_bundle.as_ref() != Some(b)) {
            match patch_ca_bundle(&ctx.client, &b).await {
                Ok(true) => {
                    info!(apiservice = %apiservice_name(), "APIService caBundle set to the collector's CA");
                    last_bundle = Some(b);
                }
                Ok(false) => last_bundle = Some(b),
                Err(e) => {
                    warn!(apiservice = %apiservice_name(), "cannot set the APIService's caBundle: {e} (the operator needs get and patch on it; kubectl flowlens observe fails until it is set)")
                }
            }
        }
        tokio::time::sleep(RECHECK).await;
    }
}

/// Sets the APIService's `caBundle`; false when there is no APIService
/// (the live API is not installed) or it already has this bundle.
async fn patch_ca_bundle(client: &Client, bundle: &str) -> Result<bool, kube::Error> {
    let gvk = GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService");
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "apiservices"),
    );
    let name = apiservice_name();
    let Some(current) = api.get_opt(&name).await? else {
        return Ok(false);
    };
    // ByteString serializes as base64, as the field is.
    let encoded = serde_json::to_value(k8s_openapi::ByteString(bundle.as_bytes().to_vec()))
        .expect("bytes serialize");
    if current.data["spec"]["caBundle"] == encoded {
        return Ok(false);
    }
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"caBundle": encoded}})),
    )
    .await?;
    Ok(true)
}
