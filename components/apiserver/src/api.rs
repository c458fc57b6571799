//! Request handling: admission, the decisions a master makes before proposing a
//! write, forwarding to the leader, linearizable reads, membership and status.
use crate::batch::{Batcher, Limits};
use crate::MasterConfig;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, ServerState};
use orc_api::mutation::{Change, Command, ObjectKey};
use orc_api::request::Request;
use orc_api::selector::{FieldSelector, LabelSelector};
use orc_api::{resources, validate, ApiError, Reason};
use orc_proto::link::{Link, LinkError};
use orc_proto::Blob;
use orc_raft::{NodeId, Raft, StateMachine};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Master {
    pub cfg: MasterConfig,
    pub raft: Raft,
    pub sm: StateMachine,
    /// Writes waiting to be proposed (see `proposer`).
    proposer: Arc<Batcher<Result<Change, Submit>>>,
    /// Per leader address: writes waiting to be forwarded (see `forwarder`).
    forwarders: std::sync::Mutex<std::collections::HashMap<String, Arc<Batcher<Forwarded>>>>,
    /// One HTTP/2 channel per peer address, reused by every forwarded request.
    peers: std::sync::Mutex<std::collections::HashMap<String, tonic::transport::Channel>>,
    /// ReadIndex rounds shared by concurrent reads (here, and for followers).
    reads: ReadRounds,
    forwarded_reads: ReadRounds,
    /// Writes this master has handed to a leader (shown by `MemberStatus`;
    /// a write sent again after a leader change counts again).
    forwarded_writes: std::sync::atomic::AtomicU64,
}

/// Concurrent linearizable reads share ReadIndex rounds: openraft confirms
/// leadership with a heartbeat to every follower per call, and one call per
/// read flooded followers (1,000 simulated nodes renewing leases). A read uses
/// the result of a round that *started after the read arrived*, so it is still
/// linearizable; rounds run one at a time.
#[derive(Default)]
pub struct ReadRounds {
    /// (rounds started, last round completed, its read index if it succeeded)
    state: std::sync::Mutex<(u64, u64, Option<u64>)>,
    turn: tokio::sync::Mutex<()>,
}

impl ReadRounds {
    pub async fn run<F, Fut>(&self, round: F) -> Result<Option<u64>, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<u64>, ApiError>>,
    {
        let arrived = self.state.lock().unwrap_or_else(|e| e.into_inner()).0;
        let _turn = self.turn.lock().await;
        let gen = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.1 > arrived {
                if let Some(i) = s.2 {
                    return Ok(Some(i));
                }
            }
            s.0 += 1;
            s.0
        };
        let r = round().await;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = gen;
        s.2 = r.as_ref().ok().copied().flatten();
        r
    }
}

type Forward = ForwardToLeader<NodeId, BasicNode>;

/// Why a submitted command was not committed here.
enum Submit {
    /// Not the leader: the command comes back (when Raft handed it back) to
    /// be sent to the leader.
    NotLeader(Forward, Option<Arc<Command>>),
    Api(ApiError),
}

/// Commands proposed together in one log entry, at most.
const MAX_BATCH: usize = 512;
/// Serialized bytes proposed together in one log entry, at most (a larger single
/// command still goes alone). openraft gives every AppendEntries one heartbeat
/// interval (100 ms) to be sent, parsed, appended and fsynced by a follower, and
/// retries the same payload when it does not make it: entries (and payloads,
/// see `max_payload_entries`) must stay small enough for a loaded machine.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Log entries proposed and not yet applied, at most: one. While it is in
/// flight new writes queue up and go together in the next entry, so
/// concurrent writes share an fsync, a replication round and openraft's work
/// per entry. openraft 0.9 keeps one AppendEntries in flight per follower, so a
/// second entry proposed meanwhile would not reach the followers any sooner: it
/// only split the waiting writes into smaller entries (measured: two in flight
/// cost 10 % more CPU per write and 6-15 % of the writes per second at 4 to
/// 256 clients, bench/README).
const MAX_IN_FLIGHT: usize = 1;
/// Batches one follower forwards to the leader and awaits at once, at most.
/// The leader's proposer merges them with its own queue, so a second batch
/// on the way costs no extra entry.
const MAX_FORWARDS_IN_FLIGHT: usize = 2;

/// The leader's answer to one forwarded command (`Propose` RPC).
#[derive(serde::Serialize, serde::Deserialize)]
pub enum ProposeReply {
    /// Committed (or refused by the apply rules): the command's result.
    Done(Result<Change, ApiError>),
    /// That master is not the leader (any more): find the new one.
    NotLeader,
}

/// A forwarded command's answer from the leader.
type Forwarded = Result<ProposeReply, tonic::Status>;

/// The proposer's batches: at most `MAX_BATCH` commands and `MAX_BATCH_BYTES`,
/// `MAX_IN_FLIGHT` at a time (see `batch`).
const LIMITS: Limits = Limits {
    max_in_flight: MAX_IN_FLIGHT,
    max_batch: MAX_BATCH,
    max_batch_bytes: MAX_BATCH_BYTES,
};

/// A forwarder's batches: the same bounds, `MAX_FORWARDS_IN_FLIGHT` at a time.
const FORWARD_LIMITS: Limits = Limits {
    max_in_flight: MAX_FORWARDS_IN_FLIGHT,
    ..LIMITS
};

/// `n` copies of one failure.
fn all_failed<T, E>(n: usize, e: impl Fn() -> E) -> Vec<Result<T, E>> {
    (0..n).map(|_| Err(e())).collect()
}

/// Batches a follower forwards to one leader travel on one long-lived
/// `ProposeStream` (an `orc_proto::link::Link`): each message is a batch id and
/// then the JSON list of commands; each answer the same id and the JSON list of
/// results, as batches commit. A stream that fails fails every batch waiting on
/// it, and the next batch opens a new one.
struct ProposeLink {
    ch: tonic::transport::Channel,
    link: Link,
}

impl ProposeLink {
    async fn send(&self, json: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, tonic::Status> {
        let open = |out| async {
            Ok(orc_raft::network::client(self.ch.clone())
                .propose_stream(out)
                .await?
                .into_inner())
        };
        match self.link.send(&json, timeout, open).await {
            Ok(r) => Ok(r),
            Err(LinkError::Status(s)) => Err(s),
            // The leader does not serve `ProposeStream` (an older build): use `Propose`.
            Err(LinkError::Unsupported) => self.send_unary(json, timeout).await,
        }
    }

    async fn send_unary(&self, json: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, tonic::Status> {
        let mut req = tonic::Request::new(Blob { json });
        req.set_timeout(timeout);
        let r = orc_raft::network::client(self.ch.clone())
            .propose(req)
            .await?;
        Ok(r.into_inner().json)
    }
}

/// The forwarder to one leader: writes that reach this follower go to the leader in
/// batches (a JSON list of commands each) on one `ProposeLink`.
fn forwarder(ch: tonic::transport::Channel, timeout: Duration) -> Arc<Batcher<Forwarded>> {
    let link = Arc::new(ProposeLink {
        ch,
        link: Link::new("propose stream"),
    });
    Batcher::new(FORWARD_LIMITS, move |cmds: Vec<Arc<Command>>| {
        let link = link.clone();
        async move {
            let n = cmds.len();
            let reply = match serde_json::to_vec(&cmds) {
                Ok(json) => link.send(json, timeout).await,
                Err(e) => Err(tonic::Status::internal(e.to_string())),
            };
            match reply {
                Ok(r) => match serde_json::from_slice::<Vec<ProposeReply>>(&r) {
                    Ok(v) if v.len() == n => v.into_iter().map(Ok).collect(),
                    Ok(v) => all_failed(n, || {
                        tonic::Status::internal(format!("{} results for {n} commands", v.len()))
                    }),
                    Err(e) => all_failed(n, || tonic::Status::internal(e.to_string())),
                },
                Err(s) => all_failed(n, || s.clone()),
            }
        }
    })
}

/// The proposer: every write this master commits goes through it, in batches of
/// one log entry each; each caller gets its own result.
fn proposer(
    raft: Raft,
    write_timeout: Duration,
    no_quorum: ApiError,
) -> Arc<Batcher<Result<Change, Submit>>> {
    Batcher::new(LIMITS, move |cmds: Vec<Arc<Command>>| {
        let (raft, no_quorum) = (raft.clone(), no_quorum.clone());
        async move {
            let n = cmds.len();
            // Callers hand their commands over (a copy only of one still
            // shared); one that Raft refuses comes back to its caller.
            let mut cmds: Vec<Command> = cmds.into_iter().map(Arc::unwrap_or_clone).collect();
            let cmd = if n == 1 {
                cmds.pop().expect("one command")
            } else {
                Command::Batch(cmds)
            };
            let entry = Arc::new(orc_raft::Logged::new(cmd));
            let handed_back = {
                let entry = entry.clone();
                move || -> Vec<Option<Arc<Command>>> {
                    match entry.into_command() {
                        Some(Command::Batch(cmds)) if n > 1 => {
                            cmds.into_iter().map(|c| Some(Arc::new(c))).collect()
                        }
                        Some(c) if n == 1 => vec![Some(Arc::new(c))],
                        _ => vec![None; n],
                    }
                }
            };
            match tokio::time::timeout(write_timeout, raft.client_write(entry)).await {
                Err(_) => all_failed(n, || Submit::Api(no_quorum.clone())),
                Ok(Ok(resp)) if resp.data.len() == n => resp
                    .data
                    .into_iter()
                    .map(|r| r.map_err(Submit::Api))
                    .collect(),
                Ok(Ok(resp)) => all_failed(n, || {
                    Submit::Api(ApiError::internal(format!(
                        "{} results for {n} commands",
                        resp.data.len()
                    )))
                }),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => handed_back()
                    .into_iter()
                    .map(|c| Err(Submit::NotLeader(f.clone(), c)))
                    .collect(),
                Ok(Err(e)) => {
                    let msg = format!("raft: {e}");
                    all_failed(n, || Submit::Api(ApiError::unavailable(msg.clone())))
                }
            }
        }
    })
}

fn unavailable_no_quorum(cfg: &MasterConfig) -> ApiError {
    ApiError::unavailable(format!(
        "no quorum: the cluster could not commit within {:?}; a majority of masters must be up and reachable",
        cfg.write_timeout
    ))
}

impl Master {
    pub fn new(cfg: MasterConfig, raft: Raft, sm: StateMachine) -> Self {
        let proposer = proposer(raft.clone(), cfg.write_timeout, unavailable_no_quorum(&cfg));
        Master {
            cfg,
            raft,
            sm,
            proposer,
            forwarders: Default::default(),
            peers: Default::default(),
            reads: Default::default(),
            forwarded_reads: Default::default(),
            forwarded_writes: Default::default(),
        }
    }

    fn leader_addr(&self, f: &Forward) -> Option<String> {
        if let Some(n) = &f.leader_node {
            return Some(n.addr.clone());
        }
        let id = f.leader_id?;
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// The shared channel to a peer master.
    fn peer_channel(&self, addr: &str) -> Result<tonic::transport::Channel, tonic::Status> {
        let mut peers = self.peers.lock().expect("peers lock");
        if let Some(ch) = peers.get(addr) {
            return Ok(ch.clone());
        }
        let ch = orc_raft::network::channel(addr, Duration::from_millis(300))
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        peers.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    async fn rpc(
        &self,
        addr: &str,
        method: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        let ch = self.peer_channel(addr)?;
        let mut c = orc_raft::network::client(ch);
        let mut req = tonic::Request::new(Blob { json: body });
        req.set_timeout(timeout);
        let r = match method {
            "read_index" => c.read_index(req).await,
            _ => c.call(req).await,
        }?;
        Ok(r.into_inner().json)
    }

    /// Commit `cmd` through Raft: locally if leader, else through the leader.
    /// Send `cmd` to the leader at `addr`, batched with the other writes this master
    /// forwards there meanwhile (one `Propose` RPC per batch).
    async fn forward(
        &self,
        addr: &str,
        cmd: Arc<Command>,
        timeout: Duration,
    ) -> Result<ProposeReply, tonic::Status> {
        self.forwarded_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let queue = {
            let mut f = self.forwarders.lock().expect("forwarders lock");
            match f.get(addr) {
                Some(q) => q.clone(),
                None => {
                    let q = forwarder(self.peer_channel(addr)?, self.cfg.write_timeout);
                    f.insert(addr.to_string(), q.clone());
                    q
                }
            }
        };
        match tokio::time::timeout(timeout, queue.submit(cmd)).await {
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "forwarded write timed out",
            )),
            Ok(r) => r.unwrap_or_else(|| Err(tonic::Status::unavailable("forwarder stopped"))),
        }
    }

    /// Hand `cmd` to the batching proposer of this master's Raft node.
    async fn submit(&self, cmd: Arc<Command>) -> Result<Change, Submit> {
        self.proposer.submit(cmd).await.unwrap_or_else(|| {
            Err(Submit::Api(ApiError::unavailable(
                "this master is shutting down",
            )))
        })
    }

    /// Commit `cmd` through Raft: locally if leader, else through the leader.
    pub async fn propose(&self, cmd: Command) -> Result<Change, ApiError> {
        let deadline = Instant::now() + self.cfg.write_timeout;
        // Handed to this master's proposer (which hands it back if this master
        // is not the leader after all), shared with a forward to the leader.
        let mut cmd = Arc::new(cmd);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable_no_quorum(&self.cfg));
            }
            // A master that knows another leader forwards straight away.
            let known = self.raft.metrics().borrow().current_leader;
            let forward = match known {
                Some(l) if l != self.cfg.id => Forward {
                    leader_id: Some(l),
                    leader_node: None,
                },
                _ => match self.submit(cmd).await {
                    Ok(change) => return Ok(change),
                    Err(Submit::Api(e)) => return Err(e),
                    Err(Submit::NotLeader(f, Some(back))) => {
                        cmd = back;
                        f
                    }
                    Err(Submit::NotLeader(..)) => return Err(ApiError::unavailable(
                        "this master stopped leading while it took the write; it was not committed",
                    )),
                },
            };
            if let Some(addr) = self
                .leader_addr(&forward)
                .filter(|_| forward.leader_id != Some(self.cfg.id))
            {
                match self.forward(&addr, cmd.clone(), left).await {
                    Ok(ProposeReply::Done(r)) => return r,
                    // The leader changed under us: find the new one.
                    Ok(ProposeReply::NotLeader) => {}
                    Err(s) if s.code() == tonic::Code::Unavailable => {}
                    Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
                        return Err(unavailable_no_quorum(&self.cfg))
                    }
                    Err(s) => {
                        return Err(ApiError::unavailable(format!(
                            "forwarding to the leader at {addr}: {}",
                            s.message()
                        )))
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader side of a forwarded write: commit here or say we are not the leader.
    pub async fn propose_local(&self, cmd: Command) -> ProposeReply {
        match self.submit(Arc::new(cmd)).await {
            Ok(c) => ProposeReply::Done(Ok(c)),
            Err(Submit::Api(e)) => ProposeReply::Done(Err(e)),
            Err(Submit::NotLeader(..)) => ProposeReply::NotLeader,
        }
    }

    /// The leader's read index: the commit index confirmed by a quorum.
    pub async fn read_index_local(&self) -> Result<u64, ApiError> {
        let round = || async {
            match tokio::time::timeout(self.cfg.write_timeout, self.raft.get_read_log_id()).await {
                Err(_) => Err(unavailable_no_quorum(&self.cfg)),
                Ok(Ok((read, _))) => Ok(Some(read.map(|l| l.index).unwrap_or(0))),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                    Err(ApiError::unavailable("not the leader"))
                }
                Ok(Err(e)) => Err(ApiError::unavailable(format!("raft: {e}"))),
            }
        };
        self.forwarded_reads
            .run(round)
            .await
            .map(|i| i.unwrap_or(0))
    }

    /// ReadIndex: wait until this master has applied everything committed before now.
    pub async fn read_barrier(&self) -> Result<u64, ApiError> {
        let deadline = Instant::now() + self.cfg.write_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable_no_quorum(&self.cfg));
            }
            let index = self.reads.run(|| self.obtain_read_index(left)).await?;
            if let Some(i) = index {
                let left = deadline.saturating_duration_since(Instant::now());
                return self
                    .raft
                    .wait(Some(left))
                    .applied_index_at_least(Some(i), "read barrier")
                    .await
                    .map(|_| i)
                    .map_err(|_| {
                        ApiError::unavailable(format!(
                            "this master could not catch up to index {i} in time"
                        ))
                    });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One ReadIndex round: from openraft on the leader, by RPC elsewhere; None
    /// when no leader is known yet.
    async fn obtain_read_index(&self, left: Duration) -> Result<Option<u64>, ApiError> {
        {
            let index = match tokio::time::timeout(left, self.raft.get_read_log_id()).await {
                Err(_) => return Err(unavailable_no_quorum(&self.cfg)),
                Ok(Ok((read, _))) => Some(read.map(|l| l.index).unwrap_or(0)),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => match self
                    .leader_addr(&f)
                {
                    Some(addr) if f.leader_id != Some(self.cfg.id) => {
                        match self.rpc(&addr, "read_index", b"{}".to_vec(), left).await {
                            Ok(b) => match serde_json::from_slice::<Result<u64, ApiError>>(&b) {
                                Ok(Ok(i)) => Some(i),
                                _ => None,
                            },
                            Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
                                return Err(unavailable_no_quorum(&self.cfg))
                            }
                            Err(_) => None,
                        }
                    }
                    _ => None,
                },
                Ok(Err(e)) => return Err(ApiError::unavailable(format!("raft: {e}"))),
            };
            Ok(index)
        }
    }

    fn namespace_for(
        info: &resources::ResourceInfo,
        obj: &Value,
        hint: Option<&str>,
    ) -> Result<String, ApiError> {
        if !info.namespaced {
            return Ok(String::new());
        }
        let in_obj = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        match (in_obj, hint) {
            (Some(a), Some(b)) if a != b => Err(ApiError::bad_request(format!(
                "the namespace of the provided object ({a}) does not match the namespace sent on the request ({b})"
            ))),
            (Some(a), _) => Ok(a.to_string()),
            (None, Some(b)) => Ok(b.to_string()),
            (None, None) => Ok("default".to_string()),
        }
    }

    async fn create(&self, mut obj: Value, ns_hint: Option<&str>) -> Result<Arc<Value>, ApiError> {
        let info = validate::resource_of(&obj)?;
        let ns = Self::namespace_for(info, &obj, ns_hint)?;
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::invalid("metadata: Required value"))?;
        if meta.get("resourceVersion").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request(
                "metadata.resourceVersion: must not be set for objects to be created",
            ));
        }
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = if name.is_empty() {
            match meta
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(ApiError::invalid(format!(
                        "{}: metadata.name: Required value: name or generateName is required",
                        info.kind
                    )))
                }
            }
        } else {
            name
        };
        meta.insert("name".into(), json!(name));
        if info.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        for f in orc_api::mutation::SYSTEM_METADATA {
            meta.remove(*f);
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(orc_api::now_rfc3339()));
        orc_api::defaults::apply(info.kind, &mut obj, &self.cfg.defaults);
        let obj = validate::admit(info, obj)?;
        let key = ObjectKey::new(info.plural, &ns, &name);
        if info.kind == "Service" {
            return self.create_service(key, obj).await;
        }
        Ok(self
            .propose(Command::Create { key, object: obj })
            .await?
            .into_object())
    }

    /// A Service gets a free ClusterIP and NodePorts, chosen here at random among
    /// those this master sees free; the apply rules refuse one that another
    /// Service already holds, and then another is chosen. So two Services never
    /// share one, whichever masters accepted them.
    async fn create_service(&self, key: ObjectKey, obj: Value) -> Result<Arc<Value>, ApiError> {
        let mut last = None;
        for _ in 0..16 {
            let mut o = obj.clone();
            crate::alloc::assign(
                &mut o,
                &self.cfg.service_cidr,
                self.cfg.node_ports,
                &|prefix| {
                    self.sm
                        .list(prefix)
                        .map(|(_, kv)| kv.into_iter().map(|(k, _)| k).collect())
                        .unwrap_or_default()
                },
            )?;
            match self
                .propose(Command::Create {
                    key: key.clone(),
                    object: o,
                })
                .await
            {
                Ok(ch) => return Ok(ch.into_object()),
                Err(e)
                    if e.message.contains("is already allocated")
                        && crate::alloc::was_chosen(&obj, &e) =>
                {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ApiError::internal("allocation failed")))
    }

    async fn update(
        &self,
        obj: Value,
        ns_hint: Option<&str>,
        status: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let info = validate::resource_of(&obj)?;
        if status && !info.has_status {
            return Err(ApiError::new(
                Reason::NotFound,
                format!("{} has no status subresource", info.plural),
            ));
        }
        let ns = Self::namespace_for(info, &obj, ns_hint)?;
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            return Err(ApiError::invalid(format!(
                "{}: metadata.name: Required value",
                info.kind
            )));
        }
        let mut obj = obj;
        if !status {
            orc_api::defaults::apply(info.kind, &mut obj, &self.cfg.defaults);
        }
        if info.kind == "Service" && !status {
            // Allocated fields stay when a request leaves them out (kubectl replace).
            if let Ok(Some(cur)) = self
                .sm
                .get_shared(&ObjectKey::new(info.plural, &ns, &name).encode())
            {
                crate::alloc::keep(&mut obj, &cur)?;
            }
        }
        let mut obj = validate::admit(info, obj)?;
        if info.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        let key = ObjectKey::new(info.plural, &ns, &name);
        Ok(self
            .propose(self.update_command(key, obj, status))
            .await?
            .into_object())
    }

    /// An update as the log carries it: when the request names the version
    /// this master holds (a read-modify-write, the usual case), only its
    /// difference from that version (bind: a node name; status: the status
    /// that changed), applied everywhere under the same version precondition;
    /// otherwise the whole object.
    fn update_command(&self, key: ObjectKey, obj: Value, status: bool) -> Command {
        let patch = self
            .sm
            .get_shared(&key.encode())
            .ok()
            .flatten()
            .and_then(|cur| orc_api::mutation::update_as_patch(&cur, &obj, status));
        match patch {
            Some((resource_version, patch)) => Command::Patch {
                key,
                patch,
                resource_version,
                status,
            },
            None => Command::Update {
                key,
                object: obj,
                status,
            },
        }
    }

    async fn patch(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Arc<Value>, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::bad_request("a merge patch must be a JSON object"));
        }
        let mut last = None;
        // As Kubernetes' GuaranteedUpdate: the first try patches what this
        // master has applied (no ReadIndex round); the stored version is the
        // precondition, so a stale copy only costs a Conflict, after which
        // (and after a miss, which may be a create not yet applied here) the
        // object is read linearizably.
        let mut fresh = false;
        for _ in 0..5 {
            let current = if fresh {
                self.get(resource, ns, name).await?
            } else {
                fresh = true;
                match self.get_applied(resource, ns, name)? {
                    Some(o) => o,
                    None => self.get(resource, ns, name).await?,
                }
            };
            let mut patched = (*current).clone();
            orc_api::merge_patch(&mut patched, patch);
            // The stored version is the precondition, whatever the patch said.
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
            for f in ["name", "namespace"] {
                if patched["metadata"][f] != current["metadata"][f] {
                    return Err(ApiError::bad_request(format!(
                        "metadata.{f} cannot be changed by a patch"
                    )));
                }
            }
            match self
                .update(patched, Some(ns).filter(|s| !s.is_empty()), status)
                .await
            {
                Err(e) if e.reason == Reason::Conflict => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ApiError::conflict("too many conflicts")))
    }

    /// The object as this master has applied it (no read barrier: it may be stale).
    fn get_applied(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
    ) -> Result<Option<Arc<Value>>, ApiError> {
        let info = resource_info(resource)?;
        let key = ObjectKey::new(info.plural, if info.namespaced { ns } else { "" }, name);
        self.sm
            .get_shared(&key.encode())
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    async fn get(&self, resource: &str, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        let info = resource_info(resource)?;
        self.read_barrier().await?;
        let key = ObjectKey::new(info.plural, if info.namespaced { ns } else { "" }, name);
        self.sm
            .get_shared(&key.encode())
            .map_err(|e| ApiError::internal(e.to_string()))?
            .ok_or_else(|| ApiError::not_found(format!("{} \"{}\" not found", info.plural, name)))
    }

    async fn list(
        &self,
        resource: &str,
        ns: Option<&str>,
        labels: &str,
        fields: &str,
    ) -> Result<Value, ApiError> {
        let info = resource_info(resource)?;
        let ls = LabelSelector::parse(labels)?;
        let fs = FieldSelector::parse(fields)?;
        self.read_barrier().await?;
        let prefix = ObjectKey::prefix(info.plural, ns.filter(|_| info.namespaced));
        let (index, objs) = self
            .sm
            .list(&prefix)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let items: Vec<Value> = objs
            .into_iter()
            .map(|(_, o)| o)
            .filter(|o| ls.matches(o) && fs.matches(o))
            .collect();
        Ok(list_of(
            info.api_version,
            &format!("{}List", info.kind),
            index,
            items,
        ))
    }

    async fn delete(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        pre: orc_api::mutation::Preconditions,
        policy: Option<String>,
        grace: Option<i64>,
    ) -> Result<Arc<Value>, ApiError> {
        let info = resource_info(resource)?;
        let key = ObjectKey::new(info.plural, if info.namespaced { ns } else { "" }, name);
        let cmd = Command::Delete {
            key,
            preconditions: pre,
            propagation: policy,
            now: orc_api::now_rfc3339(),
            grace,
        };
        Ok(self.propose(cmd).await?.into_object())
    }

    fn member_status(&self) -> Value {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let members: BTreeMap<String, String> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (id.to_string(), n.addr.clone()))
            .collect();
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        json!({
            "id": self.cfg.id, "role": role, "term": m.current_term, "leader": m.current_leader,
            "applied_index": m.last_applied.map(|l| l.index).unwrap_or(0),
            "last_log_index": m.last_log_index.unwrap_or(0),
            "snapshot_index": m.snapshot.map(|l| l.index),
            "purged_index": m.purged.map(|l| l.index),
            "members": members, "voters": voters,
            "forwarded_writes": self.forwarded_writes.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    async fn cluster_status(&self) -> Result<Value, ApiError> {
        let me = self.member_status();
        let members: BTreeMap<String, String> =
            serde_json::from_value(me["members"].clone()).unwrap_or_default();
        let voters: BTreeSet<u64> =
            serde_json::from_value(me["voters"].clone()).unwrap_or_default();
        let asks = members.iter().map(|(id, addr)| {
            let id: u64 = id.parse().unwrap_or(0);
            let addr = addr.clone();
            let me = me.clone();
            let voter = voters.contains(&id);
            async move {
                let st = if id == self.cfg.id {
                    Some(me)
                } else {
                    let body = serde_json::to_vec(&Request::MemberStatus).unwrap_or_default();
                    match self.rpc(&addr, "call", body, Duration::from_millis(800)).await {
                        Ok(b) => serde_json::from_slice::<Result<Value, ApiError>>(&b).ok().and_then(Result::ok),
                        Err(_) => None,
                    }
                };
                let role = match &st {
                    Some(s) => s["role"].as_str().unwrap_or("follower").to_string(),
                    None if voter => "follower".into(),
                    None => "learner".into(),
                };
                let field = |f: &str| st.as_ref().map(|s| s[f].clone()).unwrap_or(Value::Null);
                json!({"id": id, "address": addr, "role": role, "reachable": st.is_some(),
                       "applied_index": field("applied_index"), "snapshot_index": field("snapshot_index"),
                       "purged_index": field("purged_index"), "forwarded_writes": field("forwarded_writes")})
            }
        });
        let members: Vec<Value> = futures::future::join_all(asks).await;
        Ok(json!({"leader": me["leader"], "term": me["term"], "members": members}))
    }

    /// Membership changes run on the leader; a follower hands the request over.
    async fn on_leader(&self, req: &Request) -> Result<Option<Value>, ApiError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.cfg.id) {
            return Ok(None);
        }
        let Some(addr) = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        }) else {
            return Err(ApiError::unavailable(
                "no leader is known; is a majority of masters up?",
            ));
        };
        let body = serde_json::to_vec(req).map_err(|e| ApiError::internal(e.to_string()))?;
        let b = self
            .rpc(&addr, "call", body, Duration::from_secs(60))
            .await
            .map_err(|s| ApiError::unavailable(s.message().to_string()))?;
        serde_json::from_slice::<Result<Value, ApiError>>(&b)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map(Some)
    }

    /// The voting members, as this master knows them.
    fn voters(&self) -> BTreeSet<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    async fn add_master(&self, id: u64, address: &str) -> Result<Value, ApiError> {
        let voters = self.voters();
        if voters.contains(&id) {
            return Err(ApiError::new(
                Reason::AlreadyExists,
                format!("master {id} is already a member"),
            ));
        }
        let err = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| {
            ApiError::unavailable(format!("membership change: {e}"))
        };
        self.raft
            .add_learner(id, BasicNode::new(address), true)
            .await
            .map_err(err)?;
        let mut new_voters = voters.clone();
        new_voters.insert(id);
        self.raft
            .change_membership(new_voters, false)
            .await
            .map_err(err)?;
        Ok(json!({"added": id, "address": address}))
    }

    async fn remove_master(&self, id: u64) -> Result<Value, ApiError> {
        let voters = self.voters();
        if !voters.contains(&id) {
            return Err(ApiError::not_found(format!("master {id} is not a member")));
        }
        if voters.len() <= 1 {
            return Err(ApiError::bad_request("cannot remove the last master"));
        }
        let mut new_voters = voters;
        new_voters.remove(&id);
        self.raft
            .change_membership(new_voters, false)
            .await
            .map_err(|e| ApiError::unavailable(format!("membership change: {e}")))?;
        Ok(json!({"removed": id}))
    }

    async fn snapshot(&self) -> Result<Value, ApiError> {
        self.read_barrier().await?;
        let (index, data) = self.sm.export().map_err(ApiError::internal)?;
        let objects = orc_raft::store::decode_export(&data).map_err(ApiError::internal)?;
        let items: Vec<Value> = objects
            .into_iter()
            .filter(|(k, _)| !k.starts_with(orc_api::mutation::INDEX_PREFIX))
            .map(|(_, o)| o)
            .collect();
        Ok(list_of("v1", "List", index, items))
    }

    /// Handle one API request. A write's answer is the state machine's own
    /// copy of the object, shared.
    pub async fn handle(&self, req: Request) -> Result<Arc<Value>, ApiError> {
        match req {
            Request::Create { object, namespace } => {
                self.create(object, namespace.as_deref()).await
            }
            Request::Update {
                object,
                namespace,
                status,
            } => self.update(object, namespace.as_deref(), status).await,
            Request::Get {
                resource,
                namespace,
                name,
            } => self.get(&resource, &namespace, &name).await,
            Request::List {
                resource,
                namespace,
                label_selector,
                field_selector,
            } => self
                .list(
                    &resource,
                    namespace.as_deref(),
                    &label_selector,
                    &field_selector,
                )
                .await
                .map(Arc::new),
            Request::Patch {
                resource,
                namespace,
                name,
                patch,
                status,
            } => {
                self.patch(&resource, &namespace, &name, &patch, status)
                    .await
            }
            Request::Delete {
                resource,
                namespace,
                name,
                preconditions,
                propagation_policy,
                grace_period_seconds,
            } => {
                self.delete(
                    &resource,
                    &namespace,
                    &name,
                    preconditions,
                    propagation_policy,
                    grace_period_seconds,
                )
                .await
            }
            Request::MemberStatus => Ok(Arc::new(self.member_status())),
            Request::ClusterStatus => self.cluster_status().await.map(Arc::new),
            Request::AddMaster { id, ref address } => match self.on_leader(&req).await? {
                Some(v) => Ok(Arc::new(v)),
                None => self.add_master(id, address).await.map(Arc::new),
            },
            Request::RemoveMaster { id } => match self.on_leader(&req).await? {
                Some(v) => Ok(Arc::new(v)),
                None => self.remove_master(id).await.map(Arc::new),
            },
            Request::Snapshot => self.snapshot().await.map(Arc::new),
        }
    }
}

pub(crate) fn resource_info(resource: &str) -> Result<&'static resources::ResourceInfo, ApiError> {
    resources::lookup(resource).ok_or_else(|| {
        ApiError::not_found(format!(
            "the server doesn't have a resource type \"{resource}\""
        ))
    })
}

/// A list object holding `items` (moved in: `json!` would copy each one
/// through serde, which for the informer's snapshot of 30,000 objects on a new
/// leader was a quarter of the copy's cost).
fn list_of(api_version: &str, kind: &str, index: u64, items: Vec<Value>) -> Value {
    let mut list = json!({"apiVersion": api_version, "kind": kind,
        "metadata": {"resourceVersion": index.to_string()}});
    list["items"] = Value::Array(items);
    list
}

/// A version 4 UUID from the thread's CSPRNG (`uuid::Uuid::new_v4` asks the
/// kernel for every one: a system call per create).
fn new_uid() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

fn random_suffix() -> String {
    // Kubernetes' alphabet for generated names: no vowels, no confusable characters.
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    rand::random::<[u8; 5]>()
        .iter()
        .map(|b| ALPHA[*b as usize % ALPHA.len()] as char)
        .collect()
}

/// The controllers' door into this master: requests are handled here (writes
/// still go through Raft), watches come from this master's apply stream.
struct InProcess(std::sync::Arc<Master>);

impl orc_controllers::Api for InProcess {
    fn call(&self, req: Request) -> orc_controllers::api::BoxFuture<Result<Value, ApiError>> {
        let m = self.0.clone();
        Box::pin(async move { m.handle(req).await.map(Arc::unwrap_or_clone) })
    }
    fn watch(
        &self,
        req: orc_api::request::WatchRequest,
    ) -> orc_controllers::api::BoxFuture<tokio::sync::mpsc::Receiver<orc_api::WatchEvent>> {
        let m = self.0.clone();
        Box::pin(async move { crate::watch::start(m, req) })
    }
}

/// While this master leads: the bootstrap namespaces exist and the controllers
/// run; when it stops leading they stop.
pub async fn leader_duties(master: std::sync::Arc<Master>) {
    // Only the server's state: the full metrics change with every entry
    // appended or applied, and each change would wake this task.
    let mut metrics = master.raft.server_metrics();
    let mut running: Option<orc_controllers::Controllers> = None;
    loop {
        let is_leader = metrics.borrow().current_leader == Some(master.cfg.id);
        if is_leader && running.is_none() {
            for ns in orc_api::BOOTSTRAP_NAMESPACES {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                match master.create(obj, None).await {
                    Ok(_) => tracing::info!("created namespace {ns}"),
                    Err(e) if e.reason == Reason::AlreadyExists => {}
                    Err(e) => tracing::warn!("bootstrap namespace {ns}: {e}"),
                }
            }
            let api = std::sync::Arc::new(InProcess(master.clone()));
            match orc_controllers::start(api, master.cfg.controllers.clone()).await {
                Ok(c) => running = Some(c),
                Err(e) => tracing::error!("starting the controllers: {e}"),
            }
        } else if !is_leader {
            if let Some(c) = running.take() {
                tracing::info!("no longer leader: stopping the controllers");
                c.stop().await;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_random_version_4_uuids() {
        let a = new_uid();
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version(), Some(uuid::Version::Random));
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        let many: BTreeSet<String> = (0..1000).map(|_| new_uid()).collect();
        assert_eq!(many.len(), 1000);
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(s
            .bytes()
            .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)));
    }

    #[tokio::test]
    async fn reads_share_rounds_that_started_after_them() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let r = std::sync::Arc::new(ReadRounds::default());
        let rounds = std::sync::Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (r, rounds) = (r.clone(), rounds.clone());
            tasks.push(tokio::spawn(async move {
                r.run(|| async {
                    let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(Some(n))
                })
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap().is_some());
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!(n <= 3, "50 concurrent reads took {n} rounds");
        // A read that arrives after a round completed gets a new round.
        let before = rounds.load(Ordering::SeqCst);
        let got = r.run(|| async { Ok(Some(99)) }).await.unwrap();
        assert_eq!(got, Some(99));
        assert_eq!(rounds.load(Ordering::SeqCst), before);
    }

    #[test]
    fn generated_suffix() {
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(orc_api::validate::dns1123_label(&format!("x-{s}")).is_ok());
    }
}
