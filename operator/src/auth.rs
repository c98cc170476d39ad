//! Who is reporting: agents present a ServiceAccount token bound to their
//! pod; the operator asks the API server (TokenReview) whose it is, checks
//! the ServiceAccount, and derives the node from the pod it is bound to.
//! Results are cached for a minute so a report costs no API call.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest, Sha256};

/// Extra keys the API server sets for tokens bound to a pod (and, since
/// Kubernetes 1.30, to its node).
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;

/// An authenticated agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub user: String,
    /// The pod the token is bound to: namespace, name, UID.
    pub pod: Option<(String, String, String)>,
    /// The node the token is bound to (Kubernetes 1.30+).
    pub node: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("no bearer token: send the agent's ServiceAccount token in the Authorization header")]
    Missing,
    #[error("the API server rejected the token: {0}")]
    Rejected(String),
    #[error(
        "{0} may not report: only the agent ServiceAccount {1} may (see the operator's --agent-service-account)"
    )]
    WrongAccount(String, String),
    #[error(
        "the token of {0} is not bound to a pod, so its node is unknown: mount a projected ServiceAccount token (deploy/ does)"
    )]
    Unbound(String),
    #[error("TokenReview failed: {0}")]
    Api(#[from] kube::Error),
}

impl AuthError {
    /// 401 for bad credentials, 403 for a known but unauthorized agent, 503
    /// when the API server cannot tell.
    pub(crate) fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Rejected(_) => 401,
            AuthError::WrongAccount(..) | AuthError::Unbound(_) => 403,
            AuthError::Api(_) => 503,
        }
    }
}

/// Checks a TokenReview result: authenticated, the expected account (when
/// one is required), bound to a pod or node.
pub(crate) fn identity_from_review(
    status: &TokenReviewStatus,
    service_account: Option<&str>,
) -> Result<Identity, AuthError> {
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(
            status
                .error
                .clone()
                .unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    let user = status.user.clone().unwrap_or_default();
    let name = user.username.clone().unwrap_or_default();
    if let Some(sa) = service_account {
        let want = service_account_user(sa);
        if name != want {
            return Err(AuthError::WrongAccount(name, want));
        }
    }
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let namespace = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split(':').next())
        .map(str::to_owned);
    let pod = match (namespace, one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) {
        (Some(ns), Some(pod), Some(uid)) => Some((ns, pod, uid)),
        _ => None,
    };
    let node = one(EXTRA_NODE_NAME);
    if pod.is_none() && node.is_none() {
        return Err(AuthError::Unbound(name));
    }
    Ok(Identity {
        user: name,
        pod,
        node,
    })
}

/// `namespace/name` (or `namespace:name`) -> the account's user name.
pub(crate) fn service_account_user(sa: &str) -> String {
    let (ns, name) = sa.split_once(['/', ':']).unwrap_or(("default", sa));
    format!("system:serviceaccount:{ns}:{name}")
}

pub struct Authenticator {
    client: Client,
    /// Audiences the token must be issued for (empty: the API server's).
    audiences: Vec<String>,
    /// `namespace/name` of the agents' ServiceAccount; `None` accepts any.
    service_account: Option<String>,
    cache: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
}

impl Authenticator {
    pub fn new(client: Client, audiences: Vec<String>, service_account: Option<String>) -> Self {
        Authenticator {
            client,
            audiences,
            service_account,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((id, at)) = self.cache.lock().expect("auth cache").get(&key)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(id.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api.create(&PostParams::default(), &review).await?;
        let id = identity_from_review(
            &reviewed.status.unwrap_or_default(),
            self.service_account.as_deref(),
        )?;
        let mut cache = self.cache.lock().expect("auth cache");
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (id.clone(), Instant::now()));
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn review(user: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_bound_agent_token() {
        let r = review(
            "system:serviceaccount:flowlens-system:flowlens-agent",
            &[(EXTRA_POD_NAME, "flowlens-agent-x"), (EXTRA_POD_UID, "u1")],
        );
        let id = identity_from_review(&r, Some("flowlens-system/flowlens-agent")).unwrap();
        assert_eq!(
            id.pod,
            Some((
                "flowlens-system".into(),
                "flowlens-agent-x".into(),
                "u1".into()
            ))
        );
    }

    #[test]
    fn other_accounts_unbound_tokens_and_failures_are_refused() {
        let other = review(
            "system:serviceaccount:default:default",
            &[(EXTRA_POD_NAME, "p"), (EXTRA_POD_UID, "u")],
        );
        let e = identity_from_review(&other, Some("flowlens-system/flowlens-agent")).unwrap_err();
        assert_eq!(e.status(), 403);
        assert!(e.to_string().contains("--agent-service-account"), "{e}");

        let unbound = review("system:serviceaccount:flowlens-system:flowlens-agent", &[]);
        let e = identity_from_review(&unbound, None).unwrap_err();
        assert_eq!(e.status(), 403);
        assert!(matches!(e, AuthError::Unbound(_)), "{e}");

        let failed = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token expired".into()),
            ..Default::default()
        };
        let e = identity_from_review(&failed, None).unwrap_err();
        assert_eq!(e.status(), 401);
        assert!(e.to_string().contains("token expired"));
    }

    #[test]
    fn node_bound_tokens_name_their_node() {
        let r = review(
            "system:serviceaccount:flowlens-system:flowlens-agent",
            &[(EXTRA_NODE_NAME, "n1")],
        );
        let id = identity_from_review(&r, None).unwrap();
        assert_eq!(id.node.as_deref(), Some("n1"));
    }
}
