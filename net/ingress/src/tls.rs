//! Certificates by SNI: `kubernetes.io/tls` Secrets turned into rustls keys,
//! and a resolver whose set of keys is swapped whole when a Secret or an
//! Ingress changes (handshakes in progress keep the set they started with).
use crate::routes::TlsHost;
use base64::Engine;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TlsError {
    #[error("secret {0}: data.{1} is missing or not base64")]
    Missing(String, &'static str),
    #[error("secret {0}: data.tls.crt holds no PEM certificate")]
    NoCertificate(String),
    #[error("secret {0}: data.tls.key holds no PEM private key")]
    NoKey(String),
    #[error("secret {0}: data.tls.key: {1}")]
    BadKey(String, String),
}

fn data(secret: &Value, key: &str, field: &'static str) -> Result<Vec<u8>, TlsError> {
    secret["data"][field]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or_else(|| TlsError::Missing(key.to_string(), field))
}

/// The key and chain of a `kubernetes.io/tls` Secret (`data.tls.crt`,
/// `data.tls.key`, PEM).
pub fn certified_key(secret: &Value) -> Result<CertifiedKey, TlsError> {
    let key = format!(
        "{}/{}",
        secret["metadata"]["namespace"].as_str().unwrap_or(""),
        secret["metadata"]["name"].as_str().unwrap_or("")
    );
    let crt = data(secret, &key, "tls.crt")?;
    let pem_key = data(secret, &key, "tls.key")?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut crt.as_slice())
        .filter_map(|c| c.ok())
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(key));
    }
    let der = rustls_pemfile::private_key(&mut pem_key.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey(key.clone()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| TlsError::BadKey(key.clone(), e.to_string()))?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Keys by host name: exact names, `*.` wildcards, and one for clients that
/// send no name we know.
#[derive(Default, Debug)]
pub struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl Certs {
    /// Build from the Ingresses' TLS hosts; `secret` finds a Secret by
    /// `namespace/name`. Errors name the Secret and field; those hosts get
    /// no certificate.
    pub fn build(
        hosts: &[TlsHost],
        secret: impl Fn(&str) -> Option<Arc<Value>>,
    ) -> (Certs, Vec<String>) {
        let mut c = Certs::default();
        let mut warnings = Vec::new();
        let mut parsed: HashMap<&str, Option<Arc<CertifiedKey>>> = HashMap::new();
        for h in hosts {
            let k = parsed.entry(h.secret.as_str()).or_insert_with(|| {
                let Some(s) = secret(&h.secret) else {
                    warnings.push(format!("secret {} does not exist", h.secret));
                    return None;
                };
                match certified_key(&s) {
                    Ok(k) => Some(Arc::new(k)),
                    Err(e) => {
                        warnings.push(e.to_string());
                        None
                    }
                }
            });
            let Some(k) = k.clone() else { continue };
            if h.host.is_empty() {
                c.fallback.get_or_insert(k);
            } else if let Some(rest) = h.host.strip_prefix("*.") {
                c.wildcard.entry(rest.to_string()).or_insert(k);
            } else {
                c.exact.entry(h.host.clone()).or_insert(k);
            }
        }
        if c.fallback.is_none() {
            // Like ingress-nginx, a client without SNI still gets a certificate.
            c.fallback = c
                .exact
                .iter()
                .min_by(|a, b| a.0.cmp(b.0))
                .map(|(_, k)| k.clone());
        }
        (c, warnings)
    }

    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()) else {
            return self.fallback.clone();
        };
        self.exact
            .get(&name)
            .or_else(|| {
                name.split_once('.')
                    .and_then(|(_, rest)| self.wildcard.get(rest))
            })
            .or(self.fallback.as_ref())
            .cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.fallback.is_none()
    }
}

/// The rustls resolver the HTTPS listener asks at each handshake.
#[derive(Debug, Default)]
pub struct Resolver(RwLock<Arc<Certs>>);

impl Resolver {
    pub fn set(&self, certs: Certs) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certs);
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        certs.lookup(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// A self-signed `kubernetes.io/tls` Secret for `hosts`, and its DER.
    fn secret(name: &str, hosts: &[&str]) -> (Value, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let s = json!({"metadata": {"namespace": "ns", "name": name},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": b64(&cert.pem()), "tls.key": b64(&key.serialize_pem())}});
        (s, cert.der().to_vec())
    }

    #[test]
    fn certificates_by_sni_exact_wildcard_and_fallback() {
        let (a, a_der) = secret("a", &["a.test"]);
        let (w, w_der) = secret("w", &["*.w.test"]);
        let secrets = [("ns/a", a), ("ns/w", w)];
        let host = |h: &str, s: &str| TlsHost {
            host: h.into(),
            secret: s.into(),
        };
        let (c, warnings) =
            Certs::build(&[host("a.test", "ns/a"), host("*.w.test", "ns/w")], |k| {
                secrets
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, s)| Arc::new(s.clone()))
            });
        assert!(warnings.is_empty(), "{warnings:?}");
        let der = |sni: Option<&str>| c.lookup(sni).map(|k| k.cert[0].to_vec());
        assert_eq!(der(Some("A.test.")), Some(a_der.clone()));
        assert_eq!(der(Some("x.w.test")), Some(w_der));
        // Unknown names and clients without SNI get the fallback.
        assert_eq!(der(Some("y.x.w.test")), Some(a_der.clone()));
        assert_eq!(der(None), Some(a_der));
    }

    #[test]
    fn secrets_that_are_not_tls_are_named() {
        let s = json!({"metadata": {"namespace": "ns", "name": "s"}, "data": {}});
        assert_eq!(
            certified_key(&s).unwrap_err(),
            TlsError::Missing("ns/s".into(), "tls.crt")
        );
        let s = json!({"metadata": {"namespace": "ns", "name": "s"},
            "data": {"tls.crt": b64("not pem"), "tls.key": b64("nope")}});
        assert_eq!(
            certified_key(&s).unwrap_err(),
            TlsError::NoCertificate("ns/s".into())
        );
        let (c, w) = Certs::build(
            &[TlsHost {
                host: "a.test".into(),
                secret: "ns/missing".into(),
            }],
            |_| None,
        );
        assert!(c.is_empty());
        assert_eq!(w, vec!["secret ns/missing does not exist".to_string()]);
    }
}
