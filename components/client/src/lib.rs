//! The client side of the orc API: a connection to any of several masters that
//! moves to the next one when a master is unreachable, typed calls, watches that
//! resume on another master from the last resourceVersion seen, and kubectl-style
//! `apply` (create, or patch from the last applied configuration).
//!
//! Calls to one master share one long-lived `CallStream` (`orc_proto::link`),
//! so concurrent callers cost that master one HTTP/2 DATA frame each way per
//! call; a master of an older build gets unary `Call`s.
//!
//! Writes go to the Raft leader when the client knows it: it asks a master
//! (`MemberStatus`) in the background on its first write and every few seconds
//! after. Any master still takes any write (a follower forwards it), so a stale
//! answer costs a hop, never a write.
//!
//! It must not depend on the master's internals (Raft, RocksDB); only on the wire
//! types in `orc-api` and the envelope in `orc-proto`.
use futures::StreamExt;
use orc_api::request::{Request, WatchEvent, WatchRequest};
use orc_api::{ApiError, EventType, Reason};
use orc_proto::link::{Link, LinkError};
use orc_proto::orc_client::OrcClient;
use orc_proto::Blob;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("cannot reach any master ({servers}): {last}")]
    Unreachable { servers: String, last: String },
    #[error("bad answer from {server}: {why}")]
    Protocol { server: String, why: String },
    /// A streamed request (logs, exec) refused, in the master's or node's words.
    #[error("{0}")]
    Refused(String),
}

impl ClientError {}

pub struct Client {
    servers: Vec<String>,
    /// One lazily connected channel per server, shared by every call.
    channels: Vec<Result<OrcClient<Channel>, String>>,
    /// Per server, the stream that carries calls (opened on the first).
    links: Vec<Link>,
    current: AtomicUsize,
    timeout: Duration,
    /// Where writes go (see `LeaderHint`); None when routing is off.
    leader: Option<Arc<Mutex<LeaderHint>>>,
}

/// How long a learned leader is trusted before the client asks again ...
const LEADER_RECHECK: Duration = Duration::from_secs(3);
/// ... and how long after finding none (or failing to reach it).
const LEADER_RETRY: Duration = Duration::from_millis(500);

/// The leader as this client last learned it.
#[derive(Debug, Default)]
struct LeaderHint {
    /// Its index in `servers`.
    idx: Option<usize>,
    checked: Option<Instant>,
    asking: bool,
}

impl LeaderHint {
    /// Whether to ask a master who leads, at `now`.
    fn due(&self, now: Instant) -> bool {
        match (self.asking, self.idx, self.checked) {
            (true, _, _) => false,
            (false, _, None) => true,
            (false, Some(_), Some(t)) => now.duration_since(t) >= LEADER_RECHECK,
            (false, None, Some(t)) => now.duration_since(t) >= LEADER_RETRY,
        }
    }
}

/// The leader's index in `servers`, from the `MemberStatus` answer of the
/// master at `asked`; None when it knows no leader or the leader's address is
/// not one of `servers`.
fn leader_index(status: &Value, asked: usize, servers: &[String]) -> Option<usize> {
    if status["role"] == "leader" {
        return Some(asked);
    }
    let id = status["leader"].as_u64()?;
    let addr = status["members"][id.to_string()].as_str()?;
    let bare = |s: &str| {
        let s = s.split_once("://").map_or(s, |(_, rest)| rest);
        s.trim_end_matches('/').to_string()
    };
    servers.iter().position(|s| bare(s) == bare(addr))
}

fn connect(addr: &str) -> Result<OrcClient<Channel>, String> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ch = Endpoint::from_shared(uri)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_millis(700))
        .connect_with_connector_lazy(orc_proto::wire::connector());
    Ok(OrcClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

/// Connection failures mean "try another master"; anything else is an answer.
fn is_unreachable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
        && !s.message().contains("h2 protocol error")
}

/// Ask the master at `idx` who leads (its own `MemberStatus`); None if it
/// does not answer within a second or knows no leader among `servers`.
async fn ask_leader(mut c: OrcClient<Channel>, idx: usize, servers: &[String]) -> Option<usize> {
    let body = serde_json::to_vec(&Request::MemberStatus).ok()?;
    let mut r = tonic::Request::new(Blob { json: body });
    r.set_timeout(Duration::from_secs(1));
    let json = c.call(r).await.ok()?.into_inner().json;
    let status: Value = serde_json::from_slice::<Result<Value, ApiError>>(&json)
        .ok()?
        .ok()?;
    leader_index(&status, idx, servers)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Configured => "configured",
            ApplyOutcome::Unchanged => "unchanged",
        })
    }
}

impl Client {
    pub fn new(servers: Vec<String>) -> Self {
        let channels = servers.iter().map(|s| connect(s)).collect();
        let links = servers.iter().map(|_| Link::new("call stream")).collect();
        Client {
            servers,
            channels,
            links,
            current: AtomicUsize::new(0),
            timeout: Duration::from_secs(30),
            leader: Some(Arc::default()),
        }
    }

    /// Send writes to whichever master was asked first, like reads, instead
    /// of to the leader (`false`): it forwards them. For measuring that path.
    pub fn writes_to_leader(mut self, on: bool) -> Self {
        self.leader = on.then(Arc::default);
        self
    }

    /// Where a write goes first: the known leader, if any. Asks again in the
    /// background when the answer is old (never holding up this write).
    fn write_target(&self) -> Option<usize> {
        let hint = self.leader.as_ref()?;
        let mut h = hint.lock().unwrap_or_else(|e| e.into_inner());
        let known = h.idx;
        if h.due(Instant::now()) {
            let ask = known.unwrap_or_else(|| self.current.load(Ordering::Relaxed));
            if let (Ok(rt), Ok(c)) = (tokio::runtime::Handle::try_current(), &self.channels[ask]) {
                h.asking = true;
                let (hint, c, servers) = (hint.clone(), c.clone(), self.servers.clone());
                rt.spawn(async move {
                    let idx = ask_leader(c, ask, &servers).await;
                    let mut h = hint.lock().unwrap_or_else(|e| e.into_inner());
                    *h = LeaderHint {
                        idx,
                        checked: Some(Instant::now()),
                        asking: false,
                    };
                });
            }
        }
        known
    }

    /// The known leader did not answer: forget it until asked again.
    fn leader_lost(&self, idx: usize) {
        if let Some(hint) = &self.leader {
            let mut h = hint.lock().unwrap_or_else(|e| e.into_inner());
            if h.idx == Some(idx) {
                h.idx = None;
                h.checked = Some(Instant::now());
            }
        }
    }

    /// A streaming request on the first master that takes it: `open` makes
    /// the call on a client (given the server's index).
    async fn stream<T, F, Fut>(&self, mut open: F) -> Result<T, ClientError>
    where
        F: FnMut(OrcClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.servers.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no servers configured");
        for i in 0..n {
            let idx = (first + i) % n;
            let c = match &self.channels[idx] {
                Ok(c) => c.clone(),
                Err(e) => {
                    last = format!("{}: {e}", self.servers[idx]);
                    continue;
                }
            };
            match open(c).await {
                Ok(t) => return Ok(t),
                Err(s) if is_unreachable(&s) && !s.message().contains("node agent") => {
                    last = format!("{}: {}", self.servers[idx], s.message())
                }
                Err(s) => return Err(ClientError::Refused(s.message().to_string())),
            }
        }
        Err(ClientError::Unreachable {
            servers: self.servers.join(","),
            last,
        })
    }

    /// `orc logs`: a container's output, relayed from its node by a master.
    pub async fn logs(
        &self,
        req: &orc_api::request::LogsRequest,
    ) -> Result<tonic::Streaming<Blob>, ClientError> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        self.stream(|mut c| {
            let body = body.clone();
            async move { Ok(c.logs(Blob { json: body }).await?.into_inner()) }
        })
        .await
    }

    /// `orc exec`: run a command in a container; `stdin` chunks go to it (an
    /// empty chunk closes its input). Output arrives as frames (see
    /// `orc_api::request::EXEC_STDOUT`).
    pub async fn exec(
        &self,
        req: &orc_api::request::ExecRequest,
        mut stdin: mpsc::Receiver<Vec<u8>>,
    ) -> Result<tonic::Streaming<Blob>, ClientError> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        let mut feed = None;
        let out = self
            .stream(|mut c| {
                let (tx, rx) = mpsc::channel::<Blob>(16);
                let _ = tx.try_send(Blob { json: body.clone() });
                feed = Some(tx);
                async move {
                    Ok(c.exec(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner())
                }
            })
            .await?;
        if let Some(tx) = feed {
            tokio::spawn(async move {
                while let Some(chunk) = stdin.recv().await {
                    let end = chunk.is_empty();
                    if tx.send(Blob { json: chunk }).await.is_err() || end {
                        break;
                    }
                }
                // Keep the request stream open until the command ends.
                tx.closed().await;
            });
        }
        Ok(out)
    }

    /// One request to master `idx`: on its call stream, or as a unary call
    /// to a master that does not serve the stream (an older build).
    async fn call_on(
        &self,
        idx: usize,
        c: &OrcClient<Channel>,
        body: &[u8],
    ) -> Result<Vec<u8>, tonic::Status> {
        // Called only when the stream has to be opened.
        let open = |out| {
            let mut c = c.clone();
            async move { Ok(c.call_stream(out).await?.into_inner()) }
        };
        match self.links[idx].send(body, self.timeout, open).await {
            Ok(json) => Ok(json),
            Err(LinkError::Status(s)) => Err(s),
            Err(LinkError::Unsupported) => {
                let mut r = tonic::Request::new(Blob {
                    json: body.to_vec(),
                });
                r.set_timeout(self.timeout);
                Ok(c.clone().call(r).await?.into_inner().json)
            }
        }
    }

    /// One request, answered by the first reachable master.
    pub async fn call(&self, req: &Request) -> Result<Value, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
            server: String::new(),
            why: e.to_string(),
        })?;
        let n = self.servers.len();
        let first = self.current.load(Ordering::Relaxed);
        let leader = if req.is_write() {
            self.write_target()
        } else {
            None
        };
        // The leader (for a write, when known), then every master in turn.
        let order = leader.into_iter().chain(
            (0..n)
                .map(|i| (first + i) % n)
                .filter(|&i| Some(i) != leader),
        );
        let mut last = String::from("no servers configured");
        for idx in order {
            let server = &self.servers[idx];
            let c = match &self.channels[idx] {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{server}: {e}");
                    continue;
                }
            };
            match self.call_on(idx, c, &body).await {
                Ok(json) => {
                    if Some(idx) != leader {
                        self.current.store(idx, Ordering::Relaxed);
                    }
                    let res: Result<Value, ApiError> =
                        serde_json::from_slice(&json).map_err(|e| ClientError::Protocol {
                            server: server.clone(),
                            why: e.to_string(),
                        })?;
                    return res.map_err(ClientError::Api);
                }
                Err(s) if is_unreachable(&s) => {
                    if Some(idx) == leader {
                        self.leader_lost(idx);
                    }
                    last = format!("{server}: {}", s.message())
                }
                Err(s) => {
                    return Err(ClientError::Protocol {
                        server: server.clone(),
                        why: s.message().to_string(),
                    })
                }
            }
        }
        Err(ClientError::Unreachable {
            servers: self.servers.join(","),
            last,
        })
    }

    /// Watch events. When the serving master goes away the watch moves to the next
    /// master, resuming from the last resourceVersion received, so nothing is
    /// missed or repeated. An `ERROR` event (Expired) ends the stream.
    pub async fn watch(
        &self,
        req: WatchRequest,
    ) -> mpsc::Receiver<Result<WatchEvent, ClientError>> {
        let (tx, rx) = mpsc::channel(1024);
        let servers = self.servers.clone();
        let first = self.current.load(Ordering::Relaxed);
        tokio::spawn(async move {
            let mut req = req;
            req.bookmarks = true;
            let n = servers.len();
            let mut idx = first;
            let mut failures = 0;
            let mut last_err = String::new();
            while failures < n * 3 {
                let server = &servers[idx % n];
                let stream = match connect(server) {
                    Ok(mut c) => {
                        let body = serde_json::to_vec(&req).unwrap_or_default();
                        c.watch(tonic::Request::new(Blob { json: body })).await
                    }
                    Err(e) => Err(tonic::Status::unavailable(e)),
                };
                let mut stream = match stream {
                    Ok(s) => s.into_inner(),
                    Err(s) => {
                        last_err = format!("{server}: {}", s.message());
                        failures += 1;
                        idx += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                while let Some(item) = stream.next().await {
                    let blob = match item {
                        Ok(b) => b,
                        Err(s) => {
                            last_err = format!("{server}: {}", s.message());
                            break;
                        }
                    };
                    failures = 0;
                    let ev: WatchEvent = match serde_json::from_slice(&blob.json) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = tx
                                .send(Err(ClientError::Protocol {
                                    server: server.clone(),
                                    why: e.to_string(),
                                }))
                                .await;
                            return;
                        }
                    };
                    if ev.event_type == EventType::Error {
                        let e: ApiError = ApiError::new(
                            if ev.object["reason"] == "Expired" {
                                Reason::Expired
                            } else {
                                Reason::InternalError
                            },
                            ev.object["message"]
                                .as_str()
                                .unwrap_or("watch error")
                                .to_string(),
                        );
                        let _ = tx.send(Err(ClientError::Api(e))).await;
                        return;
                    }
                    if let Some(rv) = ev
                        .object
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                    {
                        req.resource_version = Some(rv.to_string());
                    }
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                // The stream ended: this master went away. Resume elsewhere.
                idx += 1;
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = tx
                .send(Err(ClientError::Unreachable {
                    servers: servers.join(","),
                    last: last_err,
                }))
                .await;
        });
        rx
    }

    /// kubectl-style apply: create the object, or patch it from the configuration
    /// applied last time (fields removed from the manifest are removed).
    pub async fn apply(
        &self,
        obj: &Value,
        namespace: Option<&str>,
    ) -> Result<(Value, ApplyOutcome), ClientError> {
        let info = orc_api::validate::resource_of(obj)?;
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if name.is_empty() {
            return Err(ApiError::invalid(format!(
                "{}: metadata.name: Required value (apply needs a name)",
                info.kind
            ))
            .into());
        }
        let ns = if info.namespaced {
            obj.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .or(namespace)
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let mut desired = obj.clone();
        if let Some(a) = desired
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            a.remove(LAST_APPLIED);
        }
        let last_applied = serde_json::to_string(&desired).unwrap_or_default();
        let meta = desired["metadata"]
            .as_object_mut()
            .expect("metadata checked above");
        let ann = meta.entry("annotations").or_insert_with(|| json!({}));
        ann[LAST_APPLIED] = json!(last_applied);
        let get = Request::Get {
            resource: info.plural.into(),
            namespace: ns.clone(),
            name: name.into(),
        };
        match self.call(&get).await {
            Err(ClientError::Api(e)) if e.reason == Reason::NotFound => {
                let created = self
                    .call(&Request::Create {
                        object: desired,
                        namespace: Some(ns).filter(|s| !s.is_empty()),
                    })
                    .await?;
                Ok((created, ApplyOutcome::Created))
            }
            Err(e) => Err(e),
            Ok(current) => {
                let previous: Value = current
                    .pointer(&format!(
                        "/metadata/annotations/{}",
                        LAST_APPLIED.replace('/', "~1")
                    ))
                    .and_then(Value::as_str)
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(json!({}));
                let patch = orc_api::manifest::apply_patch(&previous, &desired);
                let req = Request::Patch {
                    resource: info.plural.into(),
                    namespace: ns,
                    name: name.into(),
                    patch,
                    status: false,
                };
                let updated = self.call(&req).await?;
                let rv = |o: &Value| o.pointer("/metadata/resourceVersion").cloned();
                let outcome = if rv(&updated) == rv(&current) {
                    ApplyOutcome::Unchanged
                } else {
                    ApplyOutcome::Configured
                };
                Ok((updated, outcome))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<String> {
        ["127.0.0.1:7001", "http://127.0.0.1:7002", "127.0.0.1:7003"]
            .map(String::from)
            .to_vec()
    }

    fn status(role: &str, leader: Option<u64>) -> Value {
        json!({"id": 1, "role": role, "leader": leader,
               "members": {"1": "127.0.0.1:7001", "2": "127.0.0.1:7002", "3": "127.0.0.1:7003"}})
    }

    #[test]
    fn the_leader_is_found_among_the_servers() {
        // The master asked leads.
        assert_eq!(
            leader_index(&status("leader", Some(1)), 0, &servers()),
            Some(0)
        );
        // It names another, by an address given with a scheme here.
        assert_eq!(
            leader_index(&status("follower", Some(2)), 0, &servers()),
            Some(1)
        );
        assert_eq!(
            leader_index(&status("follower", Some(3)), 1, &servers()),
            Some(2)
        );
        // No leader known, or one the client was not given.
        assert_eq!(
            leader_index(&status("candidate", None), 0, &servers()),
            None
        );
        assert_eq!(
            leader_index(&status("follower", Some(9)), 0, &servers()),
            None
        );
        let only_two = servers()[..2].to_vec();
        assert_eq!(
            leader_index(&status("follower", Some(3)), 0, &only_two),
            None
        );
    }

    #[test]
    fn the_leader_is_asked_again_when_its_answer_is_old() {
        let t = Instant::now();
        let mut h = LeaderHint::default();
        assert!(h.due(t), "never asked");
        h.asking = true;
        assert!(!h.due(t + LEADER_RECHECK * 10), "one question at a time");
        h = LeaderHint {
            idx: Some(2),
            checked: Some(t),
            asking: false,
        };
        assert!(!h.due(t + LEADER_RECHECK / 2));
        assert!(h.due(t + LEADER_RECHECK));
        // No leader found (or it stopped answering): sooner.
        h.idx = None;
        assert!(!h.due(t + LEADER_RETRY / 2));
        assert!(h.due(t + LEADER_RETRY));
    }
}
