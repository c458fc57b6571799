//! The L7 ingress (`orc ingress`): a Pingora proxy that routes HTTP and
//! HTTPS by host and path straight to the pods behind a Service, from watches
//! on Ingress, IngressClass, Service, EndpointSlice and Secret.
//!
//! Routes, endpoints and certificates live in tables that are rebuilt from
//! the watch cache and swapped whole, so a change never reloads anything and
//! never touches a request or connection in flight. Binary upgrades use
//! Pingora's graceful restart: the new process takes the listening sockets
//! over the upgrade socket while the old one drains.
//!
//! `routes`, `balance` and `tls::Certs` are pure; `proxy` is the Pingora
//! shell around them. It talks to the cluster through the `Api` trait only
//! and must not depend on the agent, Raft or the apiserver.

pub mod balance;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod tls;

use orc_api::request::Request;
use orc_controllers::informer::{self, Cache};
use orc_controllers::Api;
use pingora::apps::http_app::ServeHttp;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use proxy::Shared;
use serde_json::{json, Value};
use std::sync::Arc;

pub const INGRESSES: &str = "ingresses";
pub const CLASSES: &str = "ingressclasses";
pub const SERVICES: &str = "services";
pub const SLICES: &str = "endpointslices";
pub const SECRETS: &str = "secrets";

#[derive(Debug, Clone)]
pub struct Config {
    /// Plain HTTP listen address (`0.0.0.0:80`).
    pub http: Option<String>,
    /// HTTPS listen address; certificates come from the Ingresses' `spec.tls`.
    pub https: Option<String>,
    /// Prometheus text endpoint (`/metrics`).
    pub metrics: Option<String>,
    /// The IngressClass this ingress serves.
    pub class: String,
    /// Written to `status.loadBalancer.ingress` of the Ingresses served.
    pub publish: Vec<String>,
    pub threads: usize,
    /// Take the listening sockets over from a running `orc ingress`.
    pub upgrade: bool,
    pub upgrade_sock: String,
    pub pid_file: String,
    /// How long open connections may finish after SIGQUIT or SIGTERM.
    pub drain: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Listen(String, String),
    #[error("starting the proxy: {0}")]
    Server(String),
}

/// The addresses written to Ingress status: `--publish-address`, else the
/// listen address when it names one.
pub fn publish_addresses(cfg: &Config) -> Vec<Value> {
    let from_listen: Vec<String> = [&cfg.http, &cfg.https]
        .into_iter()
        .flatten()
        .filter_map(|l| l.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .take(1)
        .collect();
    let list = if cfg.publish.is_empty() {
        &from_listen
    } else {
        &cfg.publish
    };
    list.iter()
        .map(|a| {
            if a.parse::<std::net::IpAddr>().is_ok() {
                json!({"ip": a})
            } else {
                json!({"hostname": a})
            }
        })
        .collect()
}

struct CacheObjects<'a>(&'a Cache);

impl routes::Objects for CacheObjects<'_> {
    fn service(&self, key: &str) -> Option<Arc<Value>> {
        self.0.get(SERVICES, key)
    }
    fn slices(&self, key: &str) -> Vec<Arc<Value>> {
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        self.0
            .list_ns(SLICES, ns)
            .into_iter()
            .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == name)
            .collect()
    }
}

/// Rebuild routes and certificates from the cache and swap them in.
fn rebuild(
    cache: &Cache,
    cfg: &Config,
    shared: &Shared,
    resolver: &tls::Resolver,
) -> (Vec<String>, routes::References) {
    let default_class = cache
        .get(CLASSES, &format!("/{}", cfg.class))
        .is_some_and(|c| routes::is_default_class(&c));
    let ings = cache.list(INGRESSES);
    let table = routes::build(&cfg.class, default_class, &ings, &CacheObjects(cache));
    let (certs, mut warnings) = tls::Certs::build(&table.tls, |k| cache.get(SECRETS, k));
    warnings.extend(table.warnings.iter().cloned());
    resolver.set(certs);
    let served = table.ingresses.clone();
    let refs = table.references();
    shared.swap(table);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    (served, refs)
}

/// Whether a watch announcement can change the tables.
fn affects(cache: &Cache, refs: &routes::References, (resource, key): &informer::Key) -> bool {
    let slice_service = (*resource == SLICES)
        .then(|| cache.get(SLICES, key))
        .flatten()
        .and_then(|s| {
            let ns = s["metadata"]["namespace"].as_str()?;
            let svc = s["metadata"]["labels"]["kubernetes.io/service-name"].as_str()?;
            Some(format!("{ns}/{svc}"))
        });
    refs.affected_by(resource, key, slice_service.as_deref())
}

/// Write the published addresses into the status of each Ingress served.
async fn publish(api: &dyn Api, cache: &Cache, served: &[String], addrs: &[Value]) {
    if addrs.is_empty() {
        return;
    }
    let want = Value::Array(addrs.to_vec());
    for key in served {
        let Some(ing) = cache.get(INGRESSES, key) else {
            continue;
        };
        if ing["status"]["loadBalancer"]["ingress"] == want {
            continue;
        }
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        let r = api
            .call(Request::Patch {
                resource: INGRESSES.into(),
                namespace: ns.into(),
                name: name.into(),
                patch: json!({"status": {"loadBalancer": {"ingress": want}}}),
                status: true,
            })
            .await;
        if let Err(e) = r {
            tracing::warn!("ingress {key}: writing status: {e}");
        }
    }
}

/// Keep the tables current until the process ends.
async fn watch(api: Arc<dyn Api>, cfg: Config, shared: Arc<Shared>, resolver: Arc<tls::Resolver>) {
    let cache = Cache::new();
    let mut rx = cache.subscribe();
    let resources = [INGRESSES, CLASSES, SERVICES, SLICES, SECRETS];
    for r in resources {
        tokio::spawn(informer::run(api.clone(), cache.clone(), r));
    }
    cache.wait_synced(resources.len()).await;
    let addrs = publish_addresses(&cfg);
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    while rx.try_recv().is_ok() {}
    loop {
        let (served, refs) = rebuild(&cache, &cfg, &shared, &resolver);
        tracing::debug!("routes swapped: {} ingresses", served.len());
        publish(api.as_ref(), &cache, &served, &addrs).await;
        // Wait for a change that can matter (a lagging receiver rebuilds).
        loop {
            let mut relevant = match rx.recv().await {
                Err(RecvError::Closed) => return,
                Err(RecvError::Lagged(_)) => true,
                Ok(k) => affects(&cache, &refs, &k),
            };
            // Let a burst of changes (a rollout) land as one swap.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            loop {
                match rx.try_recv() {
                    Ok(k) => relevant |= affects(&cache, &refs, &k),
                    Err(TryRecvError::Lagged(_)) => relevant = true,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return,
                }
            }
            if relevant {
                break;
            }
        }
    }
}

struct MetricsApp(Arc<Shared>);

#[async_trait::async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, _s: &mut ServerSession) -> http::Response<Vec<u8>> {
        let body = self.0.metrics.text().into_bytes();
        http::Response::builder()
            .status(200)
            .header(
                http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}

fn check_listen(flag: &str, addr: &Option<String>) -> Result<(), Error> {
    if let Some(a) = addr {
        a.parse::<std::net::SocketAddr>()
            .map_err(|e| Error::Listen(format!("{flag} {a:?}"), e.to_string()))?;
    }
    Ok(())
}

/// Run the ingress until it is told to stop; `api` is made on the watcher's
/// own runtime. Returns only on a configuration error (the server exits the
/// process when it stops).
pub fn run<F>(cfg: Config, api: F) -> Result<(), Error>
where
    F: FnOnce() -> Arc<dyn Api> + Send + 'static,
{
    check_listen("--http", &cfg.http)?;
    check_listen("--https", &cfg.https)?;
    check_listen("--metrics", &cfg.metrics)?;
    let https_port = cfg
        .https
        .as_ref()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port())
        .filter(|p| *p != 443);
    let shared = Arc::new(Shared::new(https_port));
    let resolver = Arc::new(tls::Resolver::default());

    let conf = ServerConf {
        threads: cfg.threads.max(1),
        // One runtime per thread, no stealing: a stealing runtime spent a
        // fifth of the CPU waking its other workers (measured with perf).
        work_stealing: false,
        upgrade_sock: cfg.upgrade_sock.clone(),
        pid_file: cfg.pid_file.clone(),
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(cfg.drain.as_secs().max(1)),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: cfg.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut svc = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        proxy::Router(shared.clone()),
        "ingress",
    );
    if let Some(a) = &cfg.http {
        svc.add_tcp(a);
    }
    if let Some(a) = &cfg.https {
        // Certificates come from the resolver; no files.
        let mut tls =
            TlsSettings::intermediate("", "").map_err(|e| Error::Server(e.to_string()))?;
        tls.set_cert_resolver(resolver.clone());
        tls.enable_h2();
        svc.add_tls_with_settings(a, None, tls);
    }
    server.add_service(svc);
    if let Some(a) = &cfg.metrics {
        let mut m = Service::new("metrics".into(), MetricsApp(shared.clone()));
        m.add_tcp(a);
        server.add_service(m);
    }

    let watch_shared = shared.clone();
    let watch_cfg = cfg.clone();
    std::thread::Builder::new()
        .name("ingress-watch".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let api = api();
                watch(api, watch_cfg, watch_shared, resolver).await
            });
        })
        .map_err(|e| Error::Server(e.to_string()))?;

    tracing::info!(
        "ingress class {}: http {:?}, https {:?}, metrics {:?}",
        cfg.class,
        cfg.http,
        cfg.https,
        cfg.metrics
    );
    server.run_forever()
}
