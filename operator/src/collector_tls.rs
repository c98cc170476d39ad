//! TLS for the report endpoint, provisioned by the operator itself.
//!
//! The operator keeps a CA and a serving certificate for the collector
//! Service in the Secret `flowlens-collector-tls` of its namespace, creates
//! it when missing and renews what expires: the serving certificate 30 days
//! before its end (1 year), the CA (5 years) 90 days before, publishing the
//! old and the new CA together until the old one expires. Agents get the CA
//! bundle in their NodeAgentConfig (`spec.collector.caBundle`) and verify
//! the collector with it. Every replica reads the same Secret, so a leader
//! handover changes nothing agents trust.
//!
//! With cert-manager instead: issue a Certificate for
//! `flowlens-collector.<namespace>.svc` into a Secret, mount it, and pass
//! `--collector-tls-cert`, `--collector-tls-key` and `--collector-ca-file`.
//!
//! Generation and the renewal decision are pure (`generate`, `issue_serving`,
//! `renewal`); reading and writing the Secret is the thin shell (`ensure`).

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tracing::info;

/// The Secret holding the collector's certificates.
pub const SECRET_NAME: &str = "flowlens-collector-tls";
const CA_CN: &str = "flowlens-collector-ca";
const SERVING_DAYS: i64 = 365;
const CA_DAYS: i64 = 5 * 365;
/// Renew the serving certificate this long before it expires.
const SERVING_RENEW_BEFORE_DAYS: i64 = 30;
/// Renew the CA this long before it expires (agents get the new CA with the
/// old one first).
const CA_RENEW_BEFORE_DAYS: i64 = 90;
const DAY_SECONDS: i64 = 86_400;

/// Keys of the Secret (the `kubernetes.io/tls` layout, plus the CA's key).
const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
/// Annotations: validity ends (unix seconds) and the names the certificate
/// is for, so that renewal needs no X.509 parsing.
const ANN_CA_NOT_AFTER: &str = "flowlens.dev/ca-not-after";
const ANN_NOT_AFTER: &str = "flowlens.dev/not-after";
const ANN_NAMES: &str = "flowlens.dev/dns-names";

/// The collector's certificates, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectorTls {
    /// Every CA agents should trust (the current one first).
    pub ca_bundle: String,
    ca_cert: String,
    ca_key: String,
    ca_not_after: i64,
    pub cert: String,
    pub key: String,
    not_after: i64,
    dns_names: Vec<String>,
}

/// The names the collector Service answers to.
pub fn service_names(namespace: &str) -> Vec<String> {
    let svc = "flowlens-collector";
    vec![
        format!("{svc}.{namespace}.svc"),
        format!("{svc}.{namespace}.svc.cluster.local"),
        format!("{svc}.{namespace}"),
    ]
}

fn validity(params: &mut CertificateParams, now: i64, days: i64) -> anyhow::Result<i64> {
    let not_after = now + days * DAY_SECONDS;
    params.not_before = time::OffsetDateTime::from_unix_timestamp(now - 300)?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after)?;
    Ok(not_after)
}

fn ca_params(now: Option<i64>) -> anyhow::Result<(CertificateParams, i64)> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let not_after = match now {
        Some(now) => validity(&mut params, now, CA_DAYS)?,
        None => 0,
    };
    Ok((params, not_after))
}

/// A new CA and a serving certificate for `dns_names`, valid from `now`.
pub fn generate(dns_names: &[String], now: i64) -> anyhow::Result<CollectorTls> {
    let ca_key = KeyPair::generate()?;
    let (params, ca_not_after) = ca_params(Some(now))?;
    let ca_cert = params.self_signed(&ca_key)?.pem();
    let mut tls = CollectorTls {
        ca_bundle: ca_cert.clone(),
        ca_cert,
        ca_key: ca_key.serialize_pem(),
        ca_not_after,
        cert: String::new(),
        key: String::new(),
        not_after: 0,
        dns_names: dns_names.to_vec(),
    };
    issue_serving(&mut tls, now)?;
    Ok(tls)
}

/// Issues a new serving certificate for `tls.dns_names` with the current CA.
pub fn issue_serving(tls: &mut CollectorTls, now: i64) -> anyhow::Result<()> {
    let ca_key = KeyPair::from_pem(&tls.ca_key)?;
    // The issuer is the CA's name and key: what a chain check compares.
    let (ca, _) = ca_params(None)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(tls.dns_names.clone())?;
    params.distinguished_name.push(
        DnType::CommonName,
        tls.dns_names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    tls.not_after = validity(&mut params, now, SERVING_DAYS)?;
    tls.cert = params.signed_by(&key, &issuer)?.pem();
    tls.key = key.serialize_pem();
    Ok(())
}

/// What an existing Secret needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    Nothing,
    /// New serving certificate, same CA.
    Serving,
    /// New CA (the old one stays in the bundle until it expires) and a new
    /// serving certificate.
    Ca,
}

/// Decides what `tls` needs at `now` to serve `dns_names`.
pub fn renewal(tls: &CollectorTls, dns_names: &[String], now: i64) -> Renewal {
    if tls.ca_not_after - now < CA_RENEW_BEFORE_DAYS * DAY_SECONDS {
        Renewal::Ca
    } else if tls.not_after - now < SERVING_RENEW_BEFORE_DAYS * DAY_SECONDS
        || tls.dns_names != dns_names
    {
        Renewal::Serving
    } else {
        Renewal::Nothing
    }
}

/// Applies a renewal decision.
pub fn renew(tls: &CollectorTls, what: &Renewal, now: i64) -> anyhow::Result<CollectorTls> {
    match what {
        Renewal::Nothing => Ok(tls.clone()),
        Renewal::Serving => {
            let mut next = tls.clone();
            issue_serving(&mut next, now)?;
            Ok(next)
        }
        Renewal::Ca => {
            let mut next = generate(&tls.dns_names, now)?;
            // The old CA stays trusted while certificates it signed may live.
            if tls.ca_not_after > now {
                next.ca_bundle = format!("{}{}", next.ca_cert, tls.ca_cert);
            }
            Ok(next)
        }
    }
}

fn to_secret_data(tls: &CollectorTls) -> (BTreeMap<String, ByteString>, BTreeMap<String, String>) {
    let data = [
        (CA_CRT, &tls.ca_bundle),
        (CA_KEY, &tls.ca_key),
        (TLS_CRT, &tls.cert),
        (TLS_KEY, &tls.key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let annotations = [
        (ANN_CA_NOT_AFTER, tls.ca_not_after.to_string()),
        (ANN_NOT_AFTER, tls.not_after.to_string()),
        (ANN_NAMES, tls.dns_names.join(",")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    (data, annotations)
}

fn from_secret(s: &Secret) -> Option<CollectorTls> {
    let data = s.data.as_ref()?;
    let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    let ann = s.metadata.annotations.as_ref()?;
    let bundle = text(CA_CRT)?;
    // The current CA is the first certificate of the bundle.
    let end = "-----END CERTIFICATE-----";
    let ca_cert = bundle
        .find(end)
        .map(|i| bundle[..i + end.len()].trim().to_owned() + "\n")?;
    Some(CollectorTls {
        ca_cert,
        ca_bundle: bundle,
        ca_key: text(CA_KEY)?,
        ca_not_after: ann.get(ANN_CA_NOT_AFTER)?.parse().ok()?,
        cert: text(TLS_CRT)?,
        key: text(TLS_KEY)?,
        not_after: ann.get(ANN_NOT_AFTER)?.parse().ok()?,
        dns_names: ann
            .get(ANN_NAMES)?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// Reads the Secret, creates or renews what it needs, writes it back when it
/// changed, and returns the certificates to serve.
pub async fn ensure(client: &Client, namespace: &str, now: i64) -> anyhow::Result<CollectorTls> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let names = service_names(namespace);
    let current = api
        .get_opt(SECRET_NAME)
        .await?
        .as_ref()
        .and_then(from_secret);
    let next = match &current {
        None => {
            info!(
                secret = SECRET_NAME,
                "creating the collector's CA and certificate"
            );
            generate(&names, now)?
        }
        Some(tls) => {
            let what = renewal(tls, &names, now);
            if what != Renewal::Nothing {
                info!(secret = SECRET_NAME, renewal = ?what, "renewing the collector's certificates");
            }
            renew(tls, &what, now)?
        }
    };
    if current.as_ref() != Some(&next) {
        let (data, annotations) = to_secret_data(&next);
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(SECRET_NAME.into()),
                namespace: Some(namespace.into()),
                annotations: Some(annotations),
                labels: Some(
                    [(
                        "app.kubernetes.io/part-of".to_owned(),
                        "flowlens".to_owned(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        };
        api.patch(
            SECRET_NAME,
            &PatchParams::apply("flowlens-operator").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_new_secret_round_trips_and_needs_nothing() {
        let names = service_names("flowlens-system");
        let tls = generate(&names, NOW).unwrap();
        assert!(tls.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(renewal(&tls, &names, NOW), Renewal::Nothing);
        let (data, annotations) = to_secret_data(&tls);
        let secret = Secret {
            data: Some(data),
            metadata: kube::api::ObjectMeta {
                annotations: Some(annotations),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(from_secret(&secret).as_ref(), Some(&tls));
    }

    #[test]
    fn a_damaged_secret_is_replaced_not_trusted() {
        let tls = generate(&service_names("ns"), NOW).unwrap();
        let (mut data, annotations) = to_secret_data(&tls);
        let secret = |data, annotations| Secret {
            data: Some(data),
            metadata: kube::api::ObjectMeta {
                annotations: Some(annotations),
                ..Default::default()
            },
            ..Default::default()
        };
        // Someone edited the annotations away, or a key is missing.
        assert_eq!(from_secret(&secret(data.clone(), BTreeMap::new())), None);
        data.remove(TLS_KEY);
        assert_eq!(from_secret(&secret(data, annotations)), None);
    }

    #[test]
    fn renews_what_expires_and_keeps_the_old_ca_trusted() {
        let names = service_names("ns");
        let tls = generate(&names, NOW).unwrap();
        let near_serving_end = NOW + (SERVING_DAYS - 10) * DAY_SECONDS;
        assert_eq!(renewal(&tls, &names, near_serving_end), Renewal::Serving);
        let renewed = renew(&tls, &Renewal::Serving, near_serving_end).unwrap();
        assert_eq!(renewed.ca_bundle, tls.ca_bundle, "same CA");
        assert_ne!(renewed.cert, tls.cert);
        let near_ca_end = NOW + (CA_DAYS - 30) * DAY_SECONDS;
        assert_eq!(renewal(&tls, &names, near_ca_end), Renewal::Ca);
        let rotated = renew(&tls, &Renewal::Ca, near_ca_end).unwrap();
        assert!(
            rotated.ca_bundle.ends_with(&tls.ca_cert),
            "old CA still trusted"
        );
        assert!(rotated.ca_bundle.starts_with(&rotated.ca_cert));
        // Other names: a new serving certificate.
        assert_eq!(
            renewal(&tls, &service_names("other"), NOW),
            Renewal::Serving
        );
    }

    #[test]
    fn the_serving_certificate_verifies_against_the_ca() {
        use rustls::{
            client::danger::ServerCertVerifier,
            pki_types::{CertificateDer, pem::PemObject},
        };
        let names = service_names("flowlens-system");
        let tls = generate(&names, NOW).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(tls.ca_bundle.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let cert = CertificateDer::from_pem_slice(tls.cert.as_bytes()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from(names[0].clone()).unwrap();
        let now = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            NOW as u64 + 60,
        ));
        verifier
            .verify_server_cert(&cert, &[], &name, &[], now)
            .expect("the serving certificate chains to the CA");
    }
}
