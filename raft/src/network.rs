//! The Raft network: masters send AppendEntries, Vote and InstallSnapshot to each
//! other as JSON inside the `orc.Orc` gRPC service (the same port as the API).
//! AppendEntries go on one long-lived stream per leader and follower
//! (`AppendStream`), so each costs one message each way rather than an HTTP/2
//! request with its headers and trailers.
use crate::{NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use orc_proto::orc_client::OrcClient;
use orc_proto::Blob;
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message masters exchange (snapshots are sent in chunks below this).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A lazily connecting channel to `addr` (`HOST:PORT`). TLS plugs in here.
pub fn channel(addr: &str, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(orc_proto::wire::connector()))
}

pub fn client(ch: Channel) -> OrcClient<Channel> {
    OrcClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub struct NetworkFactory;

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Network {
        let client = channel(&node.addr, Duration::from_millis(500))
            .ok()
            .map(client);
        Network {
            target,
            addr: node.addr.clone(),
            client,
            appends: None,
            unary_appends: false,
        }
    }
}

pub struct Network {
    target: NodeId,
    addr: String,
    client: Option<OrcClient<Channel>>,
    /// The AppendEntries stream to this peer: opened on first use, dropped after
    /// any failure or timeout (its next answer would belong to a call given up).
    appends: Option<Appends>,
    /// The peer does not serve `AppendStream` (an older build): use `AppendEntries`.
    unary_appends: bool,
}

struct Appends {
    tx: tokio::sync::mpsc::Sender<Blob>,
    rx: tonic::Streaming<Blob>,
    /// A request is out and its answer not read: set if a call was dropped mid-way.
    waiting: bool,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Network {
    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        req: &Req,
        ttl: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(format!("bad address {}", self.addr)),
            )));
        };
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(Blob { json: body });
        request.set_timeout(ttl);
        let reply = match method {
            Method::Append => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(rpc_error)?;
        let res: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.into_inner().json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// What a failed call tells openraft. Only a peer that cannot be reached is
/// `Unreachable`: openraft then stops replicating to it for half a second (no
/// heartbeats either, so a loaded follower would start an election). A call that
/// ran out of time (a large AppendEntries on a busy follower) is an ordinary
/// network error, sent again at once.
fn rpc_error<E: std::error::Error>(s: tonic::Status) -> RPCError<NodeId, BasicNode, E> {
    if s.code() == tonic::Code::Unavailable {
        RPCError::Unreachable(Unreachable::new(&s))
    } else {
        RPCError::Network(NetworkError::new(&s))
    }
}

impl Network {
    /// One AppendEntries on the stream, opening it if need be.
    async fn append_on_stream(&mut self, body: Vec<u8>) -> Result<Blob, tonic::Status> {
        if self.appends.as_ref().is_some_and(|a| a.waiting) {
            self.appends = None;
        }
        if self.appends.is_none() {
            let client = self
                .client
                .as_mut()
                .ok_or_else(|| tonic::Status::unavailable(format!("bad address {}", self.addr)))?;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let answers = client
                .append_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            self.appends = Some(Appends {
                tx,
                rx: answers,
                waiting: false,
            });
        }
        let a = self.appends.as_mut().expect("opened above");
        a.waiting = true;
        if a.tx.send(Blob { json: body }).await.is_err() {
            return Err(tonic::Status::unavailable(
                "the AppendEntries stream closed",
            ));
        }
        let answer =
            a.rx.message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("the AppendEntries stream ended"))?;
        a.waiting = false;
        Ok(answer)
    }

    async fn append(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        if self.unary_appends {
            return self.call(Method::Append, rpc, ttl).await;
        }
        let body = serde_json::to_vec(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = match tokio::time::timeout(ttl, self.append_on_stream(body)).await {
            Ok(Ok(a)) => a,
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                self.appends = None;
                self.unary_appends = true;
                return self.call(Method::Append, rpc, ttl).await;
            }
            Ok(Err(s)) => {
                self.appends = None;
                return Err(rpc_error(s));
            }
            Err(_) => {
                self.appends = None;
                return Err(rpc_error(tonic::Status::cancelled("Timeout expired")));
            }
        };
        let res: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            serde_json::from_slice(&answer.json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.append(&rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(
            Method::Snapshot,
            &rpc,
            option.hard_ttl().max(Duration::from_secs(10)),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::Vote, &rpc, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that ran out of time is retried at once; only a peer that cannot
    /// be reached puts replication to it in back-off.
    #[test]
    fn only_unreachable_peers_back_off() {
        let e = |s| rpc_error::<openraft::error::Infallible>(s);
        assert!(matches!(
            e(tonic::Status::cancelled("Timeout expired")),
            RPCError::Network(_)
        ));
        assert!(matches!(
            e(tonic::Status::deadline_exceeded("late")),
            RPCError::Network(_)
        ));
        assert!(matches!(
            e(tonic::Status::unavailable("tcp connect error")),
            RPCError::Unreachable(_)
        ));
    }
}
