//! Who is asking, for requests the API server proxies to the live API
//! (API aggregation): the API server authenticates and authorizes the user,
//! then connects with its front-proxy client certificate and names the user
//! in headers. Those headers are trusted only on a connection whose client
//! certificate the front-proxy CA signed, with an allowed common name: the
//! API server's `--requestheader-*` settings, which it publishes in the
//! ConfigMap `kube-system/extension-apiserver-authentication`.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

pub const CONFIGMAP_NAMESPACE: &str = "kube-system";
pub const CONFIGMAP_NAME: &str = "extension-apiserver-authentication";

/// The API server's front-proxy settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontProxy {
    /// CA bundle (PEM) that signs the API server's proxy client certificate.
    pub client_ca: String,
    /// Common names the proxy client certificate may have (any when empty).
    pub allowed_names: Vec<String>,
    /// Headers naming the user, the first present wins.
    pub user_headers: Vec<String>,
    /// Headers naming the user's groups.
    pub group_headers: Vec<String>,
}

/// The user a request is made for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

fn list(data: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match data.get(key) {
        None => Ok(Vec::new()),
        Some(v) if v.trim().is_empty() => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("{key} is not a JSON list: {e}")),
    }
}

impl FrontProxy {
    /// From the ConfigMap's data.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<FrontProxy, String> {
        let client_ca = data
            .get("requestheader-client-ca-file")
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                "the API server has no front-proxy CA (start kube-apiserver with --requestheader-client-ca-file and --proxy-client-cert-file/--proxy-client-key-file to enable API aggregation)".to_owned()
            })?
            .clone();
        let mut user_headers = list(data, "requestheader-username-headers")?;
        if user_headers.is_empty() {
            return Err("the API server names no --requestheader-username-headers".into());
        }
        user_headers
            .iter_mut()
            .for_each(|h| h.make_ascii_lowercase());
        let mut group_headers = list(data, "requestheader-group-headers")?;
        group_headers
            .iter_mut()
            .for_each(|h| h.make_ascii_lowercase());
        Ok(FrontProxy {
            client_ca,
            allowed_names: list(data, "requestheader-allowed-names")?,
            user_headers,
            group_headers,
        })
    }

    /// Reads the settings from the API server.
    pub async fn load(client: &Client) -> Result<FrontProxy, String> {
        let cm = Api::<ConfigMap>::namespaced(client.clone(), CONFIGMAP_NAMESPACE)
            .get(CONFIGMAP_NAME)
            .await
            .map_err(|e| {
                format!(
                    "cannot read ConfigMap {CONFIGMAP_NAMESPACE}/{CONFIGMAP_NAME} ({e}): bind the operator to the Role extension-apiserver-authentication-reader there"
                )
            })?;
        FrontProxy::from_data(&cm.data.unwrap_or_default())
    }

    /// The user of a request that came over a connection whose verified
    /// client certificate has common name `client_cn` (None: no
    /// certificate, so not from the API server).
    pub fn user(&self, client_cn: Option<&str>, headers: &HeaderMap) -> Result<User, String> {
        let Some(cn) = client_cn else {
            return Err("only the API server may call this API: use kubectl (or any client) through the API server, /apis/live.flowlens.dev/v1alpha1".into());
        };
        if !self.allowed_names.is_empty() && !self.allowed_names.iter().any(|n| n == cn) {
            return Err(format!(
                "client certificate {cn:?} is not one of the API server's --requestheader-allowed-names"
            ));
        }
        let name = self
            .user_headers
            .iter()
            .find_map(|h| headers.get(h.as_str()).and_then(|v| v.to_str().ok()))
            .filter(|v| !v.is_empty())
            .ok_or("the API server named no user")?
            .to_owned();
        let groups = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()))
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        Ok(User { name, groups })
    }
}

/// The common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn proxy() -> FrontProxy {
        FrontProxy::from_data(&data(&[
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-allowed-names", "[\"front-proxy-client\"]"),
            ("requestheader-username-headers", "[\"X-Remote-User\"]"),
            ("requestheader-group-headers", "[\"X-Remote-Group\"]"),
        ]))
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_api_servers_proxy_names_the_user() {
        let u = proxy()
            .user(
                Some("front-proxy-client"),
                &headers(&[
                    ("x-remote-user", "alice"),
                    ("x-remote-group", "dev"),
                    ("x-remote-group", "system:authenticated"),
                ]),
            )
            .unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, ["dev", "system:authenticated"]);
    }

    #[test]
    fn headers_without_the_proxys_certificate_are_not_trusted() {
        let h = headers(&[("x-remote-user", "system:admin")]);
        assert!(
            proxy()
                .user(None, &h)
                .unwrap_err()
                .contains("only the API server")
        );
        assert!(
            proxy()
                .user(Some("someone-else"), &h)
                .unwrap_err()
                .contains("allowed-names")
        );
        assert!(
            proxy()
                .user(Some("front-proxy-client"), &HeaderMap::new())
                .is_err()
        );
    }

    #[test]
    fn a_server_without_aggregation_is_explained() {
        let e = FrontProxy::from_data(&BTreeMap::new()).unwrap_err();
        assert!(e.contains("--requestheader-client-ca-file"));
        let e = FrontProxy::from_data(&data(&[
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-username-headers", "X-Remote-User"),
        ]))
        .unwrap_err();
        assert!(e.contains("not a JSON list"));
    }
}
