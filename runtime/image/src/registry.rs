//! Pulls from (and pushes to) an OCI distribution registry: manifests and
//! indexes, blobs verified against their digests, bearer-token and basic
//! authentication, HTTPS (plain HTTP only for registries named insecure).
use crate::{diff_ids, digest_of, hex_of, normalize, same_count, Error, Image, Result, Store};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// A reference split into registry host, repository and tag or digest.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub host: String,
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl Reference {
    pub fn parse(r: &str) -> Result<Reference> {
        let n = normalize(r);
        let (name, reference) = match n.split_once('@') {
            Some((name, d)) => (name.to_string(), d.to_string()),
            None => {
                let slash = n.rfind('/').unwrap_or(0);
                let colon = n[slash..]
                    .rfind(':')
                    .map(|i| i + slash)
                    .ok_or_else(|| Error::Invalid(format!("image reference {r:?} has no tag")))?;
                (n[..colon].to_string(), n[colon + 1..].to_string())
            }
        };
        let (host, repository) = name
            .split_once('/')
            .ok_or_else(|| Error::Invalid(format!("image reference {r:?} has no repository")))?;
        // Docker Hub's API lives on another host than its name.
        let host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(Error::Invalid(format!(
                "image reference {r:?} is incomplete"
            )));
        }
        Ok(Reference {
            host: host.to_string(),
            repository: repository.to_string(),
            reference,
        })
    }
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Hosts (HOST or HOST:PORT) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Credentials by registry host (from imagePullSecrets).
    pub auths: BTreeMap<String, (String, String)>,
}

/// Credentials from a `.dockerconfigjson` Secret's decoded content.
pub fn docker_config_auths(config: &[u8]) -> BTreeMap<String, (String, String)> {
    let v: Value = serde_json::from_slice(config).unwrap_or(Value::Null);
    let mut out = BTreeMap::new();
    for (host, a) in v["auths"].as_object().into_iter().flatten() {
        let host = host
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let (user, pass) = match (a["username"].as_str(), a["password"].as_str()) {
            (Some(u), Some(p)) => (u.to_string(), p.to_string()),
            _ => {
                let decoded =
                    String::from_utf8(crate::base64_decode(a["auth"].as_str().unwrap_or("")))
                        .unwrap_or_default();
                match decoded.split_once(':') {
                    Some((u, p)) => (u.to_string(), p.to_string()),
                    None => continue,
                }
            }
        };
        out.insert(host, (user, pass));
    }
    out
}

/// The parts of a `WWW-Authenticate` challenge.
pub fn challenge(h: &str) -> (String, BTreeMap<String, String>) {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let (v, after) = if let Some(a) = after.strip_prefix('"') {
            let end = a.find('"').unwrap_or(a.len());
            (&a[..end], a.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(k.trim().to_ascii_lowercase(), v.to_string());
        rest = after.trim_start_matches(',').trim();
    }
    (scheme.to_ascii_lowercase(), params)
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        crate::base64_encode(format!("{user}:{pass}").as_bytes())
    )
}

/// The registry's own words from an error body ({"errors":[{"message":...}]}).
fn registry_message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let msgs: Vec<String> = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{}: {}",
                e["code"]
                    .as_str()
                    .unwrap_or("")
                    .to_ascii_lowercase()
                    .replace('_', " "),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    if msgs.is_empty() {
        String::from_utf8_lossy(body)
            .trim()
            .chars()
            .take(300)
            .collect()
    } else {
        msgs.join("; ")
    }
}

/// One session with one repository of one registry.
struct Session<'a> {
    agent: ureq::Agent,
    base: String,
    r: &'a Reference,
    creds: Option<(String, String)>,
    token: Option<String>,
}

type Resp = ureq::http::Response<ureq::Body>;

impl<'a> Session<'a> {
    fn new(r: &'a Reference, o: &Options) -> Session<'a> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .build()
            .into();
        let scheme = if o
            .insecure
            .iter()
            .any(|h| *h == r.host || r.host.split(':').next() == Some(h))
        {
            "http"
        } else {
            "https"
        };
        Session {
            agent,
            base: format!("{scheme}://{}/v2/{}", r.host, r.repository),
            r,
            creds: o.auths.get(&r.host).cloned(),
            token: None,
        }
    }

    fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Resp> {
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            format!("{}{url}", self.base)
        };
        for attempt in 0..2 {
            let mut req = ureq::http::Request::builder().method(method).uri(&url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(t) = &self.token {
                req = req.header("Authorization", t.as_str());
            }
            let req = req
                .body(body.map(|b| b.to_vec()).unwrap_or_default())
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let resp = self
                .agent
                .run(req)
                .map_err(|e| Error::Registry(format!("{url}: {e}")))?;
            if resp.status() == 401 && attempt == 0 {
                let h = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.authenticate(&h)?;
                continue;
            }
            return Ok(resp);
        }
        unreachable!("the loop returns")
    }

    /// Answer a challenge: a bearer token from the realm, or basic credentials.
    fn authenticate(&mut self, header: &str) -> Result<()> {
        let (scheme, p) = challenge(header);
        if scheme == "basic" {
            let (u, pw) = self.creds.clone().ok_or_else(|| {
                Error::Registry(format!(
                    "{} asks for credentials (imagePullSecrets)",
                    self.r.host
                ))
            })?;
            self.token = Some(basic(&u, &pw));
            return Ok(());
        }
        let realm = p.get("realm").ok_or_else(|| {
            Error::Registry(format!("{}: unsupported challenge {header:?}", self.r.host))
        })?;
        let scope = p
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.r.repository));
        let mut url = format!("{realm}?scope={}", scope.replace(' ', "%20"));
        if let Some(s) = p.get("service") {
            url.push_str(&format!("&service={s}"));
        }
        let mut req = self.agent.get(&url);
        if let Some((u, pw)) = &self.creds {
            req = req.header("Authorization", basic(u, pw));
        }
        let mut resp = req
            .call()
            .map_err(|e| Error::Registry(format!("token from {realm}: {e}")))?;
        let body = resp
            .body_mut()
            .read_to_vec()
            .map_err(|e| Error::Registry(e.to_string()))?;
        if resp.status() != 200 {
            return Err(Error::Registry(format!(
                "token from {realm}: {} {}",
                resp.status(),
                registry_message(&body)
            )));
        }
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| Error::Registry(format!("token: {e}")))?;
        let t = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .ok_or_else(|| Error::Registry("token response without a token".into()))?;
        self.token = Some(format!("Bearer {t}"));
        Ok(())
    }

    fn get_json(&mut self, url: &str, accept: &str, limit: u64) -> Result<(Vec<u8>, String)> {
        let mut resp = self.send("GET", url, &[("Accept", accept)], None)?;
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| Error::Registry(e.to_string()))?;
        if status != 200 {
            return Err(Error::Registry(format!(
                "{} {}",
                status.as_u16(),
                registry_message(&body)
            )));
        }
        Ok((body, ctype))
    }
}

impl Store {
    /// Pull `reference` into the store (layers already present are not
    /// fetched again) and return the image.
    pub fn pull(&self, reference: &str, o: &Options) -> Result<Image> {
        self.locked(|| self.pull_unlocked(reference, o))
    }

    fn pull_unlocked(&self, reference: &str, o: &Options) -> Result<Image> {
        let r = Reference::parse(reference)?;
        let mut s = Session::new(&r, o);
        let accept = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST].join(", ");
        let (mut body, _) = s.get_json(&format!("/manifests/{}", r.reference), &accept, 4 << 20)?;
        let mut digest = digest_of(Sha256::new_with_prefix(&body));
        if r.reference.starts_with("sha256:") && digest != r.reference {
            return Err(Error::Digest {
                what: "manifest".into(),
                expected: r.reference.clone(),
                got: digest,
            });
        }
        let mut doc: Value =
            serde_json::from_slice(&body).map_err(|e| Error::Registry(format!("manifest: {e}")))?;
        if doc["manifests"].is_array() {
            let m = doc["manifests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| {
                    m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64"
                })
                .ok_or_else(|| {
                    Error::Registry(format!("{reference}: no linux/amd64 image in the index"))
                })?;
            let d = m["digest"].as_str().unwrap_or("").to_string();
            body = s.get_json(&format!("/manifests/{d}"), &accept, 4 << 20)?.0;
            digest = digest_of(Sha256::new_with_prefix(&body));
            if digest != d {
                return Err(Error::Digest {
                    what: "manifest".into(),
                    expected: d,
                    got: digest,
                });
            }
            doc = serde_json::from_slice(&body)
                .map_err(|e| Error::Registry(format!("manifest: {e}")))?;
        }
        self.put_blob(&digest, &body)?;
        let cfg_digest = doc["config"]["digest"]
            .as_str()
            .ok_or_else(|| Error::Registry(format!("manifest {digest} has no config")))?
            .to_string();
        let (cfg, _) = s.get_json(&format!("/blobs/{cfg_digest}"), "*/*", 16 << 20)?;
        self.put_blob(&cfg_digest, &cfg)?;
        let config: Value =
            serde_json::from_slice(&cfg).map_err(|e| Error::Registry(format!("config: {e}")))?;
        let diff_ids = diff_ids(&config);
        let layers: Vec<&Value> = doc["layers"].as_array().into_iter().flatten().collect();
        same_count(&format!("manifest {digest}"), layers.len(), diff_ids.len())?;
        for (l, diff) in layers.iter().zip(&diff_ids) {
            if self.has_layer(diff) {
                continue;
            }
            let ld = l["digest"].as_str().unwrap_or("").to_string();
            hex_of(&ld)?;
            let tmp = self
                .root
                .join(format!("download-{}.tmp", &hex_of(&ld)?[..16]));
            let mut resp = s.send("GET", &format!("/blobs/{ld}"), &[], None)?;
            if resp.status() != 200 {
                let body = resp.body_mut().read_to_vec().unwrap_or_default();
                return Err(Error::Registry(format!(
                    "layer {ld}: {} {}",
                    resp.status().as_u16(),
                    registry_message(&body)
                )));
            }
            let mut reader = resp.into_body().into_reader();
            let mut f = std::fs::File::create(&tmp).map_err(crate::io_err("download"))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(crate::io_err(format!("download {ld}")))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(crate::io_err("download"))?;
            }
            drop(f);
            let got = digest_of(h);
            if got != ld {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Digest {
                    what: format!("layer of {reference}"),
                    expected: ld,
                    got,
                });
            }
            let r = std::fs::File::open(&tmp)
                .map_err(crate::io_err("download"))
                .and_then(|f| self.add_layer(diff, f));
            let kept = self.blob_path(&ld).and_then(|p| {
                std::fs::create_dir_all(p.parent().unwrap()).map_err(crate::io_err("blobs"))?;
                std::fs::rename(&tmp, &p).map_err(crate::io_err("blobs"))
            });
            let _ = std::fs::remove_file(&tmp);
            r?;
            kept?;
        }
        let names: Vec<String> = if r.reference.starts_with("sha256:") {
            vec![]
        } else {
            vec![normalize(reference)]
        };
        let mut img = self.record(&cfg_digest, &names, Some(&digest))?;
        if img.layer_blobs.is_empty() {
            img.layer_blobs = layers
                .iter()
                .map(|l| {
                    (
                        l["digest"].as_str().unwrap_or("").to_string(),
                        l["mediaType"].as_str().unwrap_or(OCI_LAYER).to_string(),
                    )
                })
                .collect();
            self.update(&img)?;
        }
        Ok(img)
    }

    /// Push image `local` to `target` (a reference with a tag). Returns the
    /// manifest digest.
    pub fn push(&self, local: &str, target: &str, o: &Options) -> Result<String> {
        let img = self
            .resolve(local)
            .ok_or_else(|| Error::NotFound(local.to_string()))?;
        let r = Reference::parse(target)?;
        let mut s = Session::new(&r, o);
        let cfg = self.blob(&img.id)?;
        let mut blobs: Vec<(String, String, Vec<u8>)> = vec![];
        if img.layer_blobs.len() != img.layers.len() {
            return Err(Error::Invalid(format!(
                "{local}: the layer archives were not kept; re-import or re-pull it before pushing"
            )));
        }
        for (d, mt) in &img.layer_blobs {
            blobs.push((d.clone(), mt.clone(), self.blob(d)?));
        }
        let mut layers = vec![];
        for (d, mt, bytes) in blobs
            .iter()
            .map(|(d, mt, b)| (d, mt.as_str(), b))
            .chain(std::iter::once((&img.id, OCI_CONFIG, &cfg)))
        {
            if mt != OCI_CONFIG {
                layers.push(json!({"mediaType": mt, "digest": d, "size": bytes.len()}));
            }
            let head = s.send("HEAD", &format!("/blobs/{d}"), &[], None)?;
            if head.status() == 200 {
                continue;
            }
            let mut start = s.send("POST", "/blobs/uploads/", &[], Some(&[]))?;
            if start.status() != 202 {
                let body = start.body_mut().read_to_vec().unwrap_or_default();
                return Err(Error::Registry(format!(
                    "upload {d}: {} {}",
                    start.status().as_u16(),
                    registry_message(&body)
                )));
            }
            let loc = start
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let loc = if loc.starts_with('/') {
                format!("{}{loc}", s.base.split("/v2/").next().unwrap_or(""))
            } else {
                loc
            };
            let url = format!(
                "{loc}{}digest={d}",
                if loc.contains('?') { '&' } else { '?' }
            );
            let mut put = s.send(
                "PUT",
                &url,
                &[("Content-Type", "application/octet-stream")],
                Some(bytes),
            )?;
            if put.status() != 201 {
                let body = put.body_mut().read_to_vec().unwrap_or_default();
                return Err(Error::Registry(format!(
                    "upload {d}: {} {}",
                    put.status().as_u16(),
                    registry_message(&body)
                )));
            }
        }
        let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": img.id, "size": cfg.len()}, "layers": layers});
        let body = serde_json::to_vec(&manifest).expect("manifest serializes");
        let mut put = s.send(
            "PUT",
            &format!("/manifests/{}", r.reference),
            &[("Content-Type", OCI_MANIFEST)],
            Some(&body),
        )?;
        if put.status() != 201 {
            let b = put.body_mut().read_to_vec().unwrap_or_default();
            return Err(Error::Registry(format!(
                "manifest: {} {}",
                put.status().as_u16(),
                registry_message(&b)
            )));
        }
        Ok(digest_of(Sha256::new_with_prefix(&body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split() {
        let r = Reference::parse("127.0.0.1:5000/tools/busybox:1.36").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "tools/busybox", "1.36")
        );
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("registry-1.docker.io", "library/busybox", "latest")
        );
        let d = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        assert_eq!(
            Reference::parse(&format!("reg:5000/a@{d}"))
                .unwrap()
                .reference,
            d
        );
    }

    #[test]
    fn challenges_parse() {
        let (s, p) = challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["scope"], "repository:a/b:pull");
        assert_eq!(challenge(r#"Basic realm="x""#).0, "basic");
    }

    #[test]
    fn docker_config_credentials() {
        let cfg = br#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dXNlcjpwYXNz"},"other":{"username":"u","password":"p"}}}"#;
        let a = docker_config_auths(cfg);
        assert_eq!(
            a["reg.example:5000"],
            ("user".to_string(), "pass".to_string())
        );
        assert_eq!(a["other"], ("u".to_string(), "p".to_string()));
    }

    #[test]
    fn registry_errors_keep_their_words() {
        let b =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(registry_message(b), "manifest unknown: manifest unknown");
    }
}
