//! Who is reporting: agents present a ServiceAccount token bound to their
//! pod; the operator asks the API server (TokenReview) whose it is, checks
//! the ServiceAccount, and derives the node from the pod it is bound to.
//! Verdicts are cached (successes for [`SUCCESS_TTL`], refusals for
//! [`FAILURE_TTL`]) so a report costs no API call. While the API server
//! cannot be asked (an outage), a token it accepted before is still
//! accepted until the token expires, at most [`OUTAGE_TTL`] after the
//! review: reports keep arriving, and nothing is lost to the outage.

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

/// How long a reviewed token is trusted without asking again (at most
/// until its expiry).
pub(crate) const SUCCESS_TTL: Duration = Duration::from_secs(300);
/// While the API server cannot review tokens, how long after its last
/// review a token stays accepted (at most until its expiry).
pub(crate) const OUTAGE_TTL: Duration = Duration::from_secs(3600);
/// How long a refused token is refused without asking again.
pub(crate) const FAILURE_TTL: Duration = Duration::from_secs(10);
/// Tokens remembered as valid (about one per agent).
const SUCCESS_MAX: usize = 10_000;
/// Tokens remembered as refused: fewer, so that random tokens cannot push
/// the agents' out.
const FAILURE_MAX: usize = 1_000;

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
    /// A copy to cache: the API server's verdicts, not its outages.
    fn cached(&self) -> Option<AuthError> {
        match self {
            AuthError::Missing => Some(AuthError::Missing),
            AuthError::Rejected(m) => Some(AuthError::Rejected(m.clone())),
            AuthError::WrongAccount(a, b) => Some(AuthError::WrongAccount(a.clone(), b.clone())),
            AuthError::Unbound(u) => Some(AuthError::Unbound(u.clone())),
            AuthError::Api(_) => None,
        }
    }

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

/// The `exp` claim (unix seconds) of a JWT, read without checking the
/// signature: only used after the API server accepted the token, to stop
/// trusting it when it expires.
pub(crate) fn token_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}

/// Unpadded (or padded) base64url, as in JWTs.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// TokenReview verdicts by SHA-256 of the token, each until its own expiry.
#[derive(Default)]
pub(crate) struct TokenCache {
    /// Accepted tokens: the identity and until when it is fresh (asked
    /// again after), by until when it may stand in during an outage.
    ok: HashMap<[u8; 32], ((Identity, Instant), Instant)>,
    failed: HashMap<[u8; 32], (AuthError, Instant)>,
}

impl TokenCache {
    /// The cached verdict, if still valid at `now`.
    pub(crate) fn get(&self, key: &[u8; 32], now: Instant) -> Option<Result<Identity, AuthError>> {
        if let Some(((id, fresh), _)) = self.ok.get(key)
            && now < *fresh
        {
            return Some(Ok(id.clone()));
        }
        if let Some((e, until)) = self.failed.get(key)
            && now < *until
        {
            return e.cached().map(Err);
        }
        None
    }

    /// The identity of a token accepted before, when the API server cannot
    /// be asked now: until the token expires, at most [`OUTAGE_TTL`] after
    /// the review.
    pub(crate) fn during_outage(&self, key: &[u8; 32], now: Instant) -> Option<Identity> {
        self.ok
            .get(key)
            .filter(|(_, until)| now < *until)
            .map(|((id, _), _)| id.clone())
    }

    /// Remembers a verdict. `expires_in`: the token's remaining lifetime,
    /// when known (successes are not trusted past it). API errors are not
    /// remembered.
    pub(crate) fn put(
        &mut self,
        key: [u8; 32],
        verdict: &Result<Identity, AuthError>,
        expires_in: Option<Duration>,
        now: Instant,
    ) {
        match verdict {
            Ok(id) => {
                let ttl = expires_in.map_or(SUCCESS_TTL, |e| e.min(SUCCESS_TTL));
                if ttl.is_zero() {
                    return;
                }
                let outage_ttl = expires_in.map_or(SUCCESS_TTL, |e| e.min(OUTAGE_TTL));
                self.failed.remove(&key);
                make_room(&mut self.ok, SUCCESS_MAX, now);
                self.ok
                    .insert(key, ((id.clone(), now + ttl), now + outage_ttl));
            }
            Err(e) => {
                let Some(e) = e.cached() else { return };
                self.ok.remove(&key);
                make_room(&mut self.failed, FAILURE_MAX, now);
                self.failed.insert(key, (e, now + FAILURE_TTL));
            }
        }
    }
}

/// Below `max` entries: the expired ones go, then the one that expires
/// first.
fn make_room<V>(m: &mut HashMap<[u8; 32], (V, Instant)>, max: usize, now: Instant) {
    if m.len() < max {
        return;
    }
    m.retain(|_, (_, until)| now < *until);
    while m.len() >= max {
        let Some(first) = m
            .iter()
            .min_by_key(|(_, (_, until))| *until)
            .map(|(k, _)| *k)
        else {
            break;
        };
        m.remove(&first);
    }
}

pub struct Authenticator {
    client: Client,
    /// Audiences the token must be issued for (empty: the API server's).
    audiences: Vec<String>,
    /// `namespace/name` of the agents' ServiceAccount; `None` accepts any.
    service_account: Option<String>,
    cache: Mutex<TokenCache>,
}

impl Authenticator {
    pub fn new(client: Client, audiences: Vec<String>, service_account: Option<String>) -> Self {
        Authenticator {
            client,
            audiences,
            service_account,
            cache: Mutex::new(TokenCache::default()),
        }
    }

    pub(crate) async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(v) = self
            .cache
            .lock()
            .expect("auth cache")
            .get(&key, Instant::now())
        {
            return v;
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = match api.create(&PostParams::default(), &review).await {
            Ok(r) => r,
            Err(e) => {
                // The API server cannot be asked: a token it accepted
                // before still stands (the report is not lost to the
                // outage).
                let known = self
                    .cache
                    .lock()
                    .expect("auth cache")
                    .during_outage(&key, Instant::now());
                return known.ok_or(AuthError::Api(e));
            }
        };
        let verdict = identity_from_review(
            &reviewed.status.unwrap_or_default(),
            self.service_account.as_deref(),
        );
        let expires_in = token_expiry(token).map(|exp| {
            let now = crate::collector::now_ms().div_euclid(1000);
            Duration::from_secs(exp.saturating_sub(now).max(0) as u64)
        });
        self.cache
            .lock()
            .expect("auth cache")
            .put(key, &verdict, expires_in, Instant::now());
        verdict
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

    fn agent() -> Identity {
        Identity {
            user: "system:serviceaccount:flowlens-system:flowlens-agent".into(),
            pod: None,
            node: Some("n1".into()),
        }
    }

    #[test]
    fn the_expiry_of_a_jwt() {
        // {"alg":"none"} . {"exp":1700000000,"sub":"x"} . (no signature)
        let token = "eyJhbGciOiJub25lIn0.eyJleHAiOjE3MDAwMDAwMDAsInN1YiI6IngifQ.";
        assert_eq!(token_expiry(token), Some(1_700_000_000));
        assert_eq!(token_expiry("not a jwt"), None);
        assert_eq!(token_expiry("a.!!!.c"), None);
        assert_eq!(base64url_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64url_decode("_-8").unwrap(), [0xff, 0xef]);
    }

    #[test]
    fn successes_are_cached_until_the_token_expires_or_the_ttl() {
        let t0 = Instant::now();
        let mut c = TokenCache::default();
        c.put([1; 32], &Ok(agent()), None, t0);
        c.put([2; 32], &Ok(agent()), Some(Duration::from_secs(30)), t0);
        c.put([3; 32], &Ok(agent()), Some(Duration::ZERO), t0);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(c.get(&[1; 32], at(299)).unwrap().unwrap(), agent());
        assert!(c.get(&[1; 32], at(300)).is_none(), "past the TTL");
        assert!(c.get(&[2; 32], at(29)).is_some());
        assert!(c.get(&[2; 32], at(30)).is_none(), "past the token's expiry");
        // During an outage, an accepted token stands until it expires, at
        // most OUTAGE_TTL after its review.
        assert!(c.during_outage(&[1; 32], at(299)).is_some());
        assert!(
            c.during_outage(&[1; 32], at(300)).is_none(),
            "expiry unknown: only the TTL"
        );
        assert!(c.during_outage(&[2; 32], at(29)).is_some());
        assert!(c.during_outage(&[2; 32], at(30)).is_none());
        c.put([4; 32], &Ok(agent()), Some(Duration::from_secs(7200)), t0);
        assert!(
            c.get(&[4; 32], at(300)).is_none(),
            "asked again after the TTL"
        );
        assert!(c.during_outage(&[4; 32], at(3599)).is_some());
        assert!(c.during_outage(&[4; 32], at(3600)).is_none());
        assert!(c.during_outage(&[9; 32], t0).is_none(), "never reviewed");
        assert!(
            c.get(&[3; 32], t0).is_none(),
            "an expired token is not cached"
        );
    }

    #[test]
    fn failures_are_cached_briefly_and_outages_not_at_all() {
        let t0 = Instant::now();
        let mut c = TokenCache::default();
        c.put(
            [1; 32],
            &Err(AuthError::Rejected("token expired".into())),
            None,
            t0,
        );
        let e = c
            .get(&[1; 32], t0 + Duration::from_secs(9))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.status(), 401);
        assert!(e.to_string().contains("token expired"));
        assert!(c.get(&[1; 32], t0 + FAILURE_TTL).is_none());

        let outage = AuthError::Api(kube::Error::LinesCodecMaxLineLengthExceeded);
        c.put([2; 32], &Err(outage), None, t0);
        assert!(c.get(&[2; 32], t0).is_none());
    }

    #[test]
    fn the_cache_is_bounded_and_failures_cannot_evict_successes() {
        let t0 = Instant::now();
        let mut c = TokenCache::default();
        c.put([0; 32], &Ok(agent()), None, t0);
        for i in 0..(FAILURE_MAX as u32 + 50) {
            let mut key = [9u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            c.put(
                key,
                &Err(AuthError::Missing),
                None,
                t0 + Duration::from_millis(i.into()),
            );
        }
        assert_eq!(c.failed.len(), FAILURE_MAX);
        assert!(c.get(&[0; 32], t0).is_some(), "the agent's token stays");
        assert_eq!(c.ok.len(), 1);
        // The oldest failures went first.
        let mut first = [9u8; 32];
        first[..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(c.get(&first, t0).is_none());
    }
}
