//! The Pingora side: a `ProxyHttp` that looks each request up in the current
//! table (swapped whole, never edited in place, so a request keeps the table
//! it started with), picks an endpoint, retries a refused connection on
//! another, and counts what happened.
use crate::balance::{InFlight, Pool, Registry};
use crate::metrics::{Metrics, RouteLabels, StatusLabels};
use crate::routes::{request_host, Table};
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A table with the endpoint pool of each route.
pub struct Live {
    pub table: Table,
    pools: Vec<Arc<Pool>>,
}

/// What the proxy threads and the watcher share.
pub struct Shared {
    live: RwLock<Arc<Live>>,
    registry: Registry,
    pub metrics: Metrics,
    /// The HTTPS port redirects point at (None: 443, left out of the URL).
    pub https_port: Option<u16>,
    epoch: Instant,
}

impl Shared {
    pub fn new(https_port: Option<u16>) -> Self {
        Shared {
            live: RwLock::new(Arc::new(Live {
                table: Table::default(),
                pools: Vec::new(),
            })),
            registry: Registry::default(),
            metrics: Metrics::default(),
            https_port,
            epoch: Instant::now(),
        }
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Swap in a new table. A target whose endpoints did not change keeps
    /// its pool; every endpoint keeps its counters and ejection.
    pub fn swap(&self, table: Table) {
        let old = self.live();
        let by_key: HashMap<String, &Arc<Pool>> = old
            .table
            .routes
            .iter()
            .zip(&old.pools)
            .map(|(r, p)| (r.target.key(), p))
            .collect();
        let mut made: HashMap<String, Arc<Pool>> = HashMap::new();
        let pools = table
            .routes
            .iter()
            .map(|r| {
                let key = r.target.key();
                made.entry(key.clone())
                    .or_insert_with(|| match by_key.get(&key) {
                        Some(p) if p.addrs().eq(r.target.endpoints.iter().copied()) => (*p).clone(),
                        prev => Arc::new(Pool {
                            endpoints: r
                                .target
                                .endpoints
                                .iter()
                                .map(|a| self.registry.endpoint(*a))
                                .collect(),
                            turn: AtomicUsize::new(
                                prev.map(|p| p.turn.load(Ordering::Relaxed)).unwrap_or(0),
                            ),
                        }),
                    })
                    .clone()
            })
            .collect();
        self.metrics.routes.set(table.routes.len() as i64);
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Live { table, pools });
        self.metrics.updates.inc();
    }
}

pub struct Router(pub Arc<Shared>);

pub struct Ctx {
    live: Option<Arc<Live>>,
    route: usize,
    labels: RouteLabels,
    start: Instant,
    tried: Vec<SocketAddr>,
    current: Option<InFlight>,
    tls: bool,
    host: String,
}

fn client_ip(session: &Session) -> Option<String> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
}

async fn respond(
    session: &mut Session,
    status: u16,
    extra: &[(header::HeaderName, String)],
    body: &str,
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(3))?;
    h.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    for (k, v) in extra {
        h.insert_header(k.clone(), v.as_str())?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
        .await
}

#[async_trait]
impl ProxyHttp for Router {
    type CTX = Ctx;

    /// No downstream modules: Pingora's default adds a (disabled)
    /// compression module to every request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            live: None,
            route: 0,
            labels: RouteLabels {
                ingress: String::new(),
                host: String::new(),
                path: String::new(),
            },
            start: Instant::now(),
            tried: Vec::new(),
            current: None,
            tls: false,
            host: String::new(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let req = session.req_header();
        let raw_host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(req.uri.authority().map(|a| a.as_str()))
            .unwrap_or("")
            .to_string();
        ctx.host = raw_host;
        let host = request_host(&ctx.host);
        let path = req.uri.path().to_string();
        let live = self.0.live();
        let Some((i, route)) = live.table.lookup(&host, &path) else {
            respond(
                session,
                404,
                &[],
                "404 no Ingress rule matches this host and path\n",
            )
            .await?;
            return Ok(true);
        };
        ctx.labels = RouteLabels {
            ingress: route.ingress.clone(),
            host: route.host.clone(),
            path: route.path.clone(),
        };
        if route.policy.ssl_redirect && !ctx.tls {
            let port = self
                .0
                .https_port
                .map(|p| format!(":{p}"))
                .unwrap_or_default();
            let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let to = format!("https://{host}{port}{pq}");
            respond(session, 308, &[(header::LOCATION, to)], "308 use https\n").await?;
            return Ok(true);
        }
        if live.pools[i].endpoints.is_empty() {
            let msg = format!(
                "503 Service {} port {} has no ready endpoints\n",
                route.target.service, route.target.port
            );
            respond(session, 503, &[], &msg).await?;
            return Ok(true);
        }
        ctx.route = i;
        ctx.live = Some(live);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let live = ctx
            .live
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route"))?;
        let route = &live.table.routes[ctx.route];
        let ep = live.pools[ctx.route]
            .choose(route.policy.balance, self.0.now_ms(), &ctx.tried)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "every endpoint failed"))?;
        ctx.tried.push(ep.addr);
        ctx.current = Some(InFlight::new(ep.clone()));
        let mut peer = HttpPeer::new(ep.addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(route.policy.connect_timeout);
        o.read_timeout = Some(route.policy.read_timeout);
        o.write_timeout = Some(route.policy.send_timeout);
        o.idle_timeout = Some(Duration::from_secs(60));
        // Each proxy thread reuses the upstream connections it made, as each
        // nginx worker keeps its own keepalive pool: a connection released on
        // one thread and taken on another woke its idle watcher across
        // threads (an eventfd write and a wake-up per request).
        peer.group_key = thread_key();
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Some(live) = ctx.live.as_ref() else {
            return e;
        };
        let route = &live.table.routes[ctx.route];
        if let Some(g) = ctx.current.take() {
            let until = self.0.now_ms() + route.policy.eject.as_millis() as u64;
            g.0.ejected_until.store(until, Ordering::Relaxed);
            tracing::info!(
                "endpoint {} refused a connection: ejected for {:?}",
                g.0.addr,
                route.policy.eject
            );
        }
        if ctx.tried.len() < live.pools[ctx.route].endpoints.len().min(4) {
            e.set_retry(true);
            self.0.metrics.retries.get_or_create(&ctx.labels).inc();
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(ip) = client_ip(session) {
            let xff = match up
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip.clone(),
            };
            up.insert_header("x-forwarded-for", xff)?;
            up.insert_header("x-real-ip", ip)?;
        }
        up.insert_header("x-forwarded-proto", if ctx.tls { "https" } else { "http" })?;
        if !ctx.host.is_empty() {
            up.insert_header("x-forwarded-host", ctx.host.as_str())?;
            if up.headers.get(header::HOST).is_none() {
                up.insert_header(header::HOST, ctx.host.as_str())?;
            }
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        ctx.current = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(if e.is_some() { 502 } else { 0 });
        let l = &ctx.labels;
        self.0
            .metrics
            .requests
            .get_or_create(&StatusLabels {
                ingress: l.ingress.clone(),
                host: l.host.clone(),
                path: l.path.clone(),
                status: status.to_string(),
            })
            .inc();
        self.0
            .metrics
            .latency
            .get_or_create(l)
            .observe(ctx.start.elapsed().as_secs_f64());
    }
}

/// A number of this thread's own, so that each proxy thread reuses only the
/// upstream connections it made (an `HttpPeer`'s `group_key`).
pub fn thread_key() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static KEY: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    KEY.with(|k| *k)
}
