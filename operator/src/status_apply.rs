//! Status writes: server-side apply of the whole status, under the
//! operator's field manager, counted in the write metric.

use std::fmt::Debug;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{config_writer::FIELD_MANAGER, metrics::Metrics};

/// Applies `status` to the object `name` of `api`; `resource` labels the
/// write metric (e.g. `flowpolicies/status`).
pub(crate) async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl Serialize,
    metrics: &Metrics,
    resource: &'static str,
) -> kube::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    metrics.wrote(resource, "apply");
    Ok(())
}

/// A status timestamp from Unix seconds.
pub(crate) fn time(unix: i64) -> Time {
    Time(Timestamp::from_second(unix).unwrap_or(Timestamp::UNIX_EPOCH))
}
