//! The `orc.Orc` gRPC service: Raft RPCs, forwarded proposals, read index, the API
//! and watches, all on one port.
use crate::api::Master;
use orc_api::request::{Request, WatchRequest};
use orc_api::{ApiError, Reason};
use orc_proto::link::{split_id, with_id};
use orc_proto::node_client::NodeClient;
use orc_proto::orc_server::{Orc, OrcServer};
use orc_proto::Blob;
use orc_raft::network::MAX_MESSAGE_BYTES;
use serde::{de::DeserializeOwned, Serialize};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::{Response, Status};

pub struct Service {
    master: Arc<Master>,
}

fn decode<T: DeserializeOwned>(b: &Blob) -> Result<T, Status> {
    serde_json::from_slice(&b.json)
        .map_err(|e| Status::invalid_argument(format!("bad request body: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<Blob>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(Blob { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<Blob, Status>> + Send>>;

/// Calls of one `CallStream` handled at once, at most.
const CALLS_PER_STREAM: usize = 256;

/// The answer to one API request (`Call`, or one call on a `CallStream`): the
/// JSON of the result or of the error.
async fn answer(master: &Master, body: &[u8]) -> Result<Vec<u8>, Status> {
    // The envelope adds a little to the object: allow for it, then judge the object.
    let res = if body.len() > orc_api::MAX_REQUEST_BYTES + 4096 {
        Err(ApiError::new(
            Reason::RequestEntityTooLarge,
            format!(
                "the request is {} bytes; the limit is {} bytes (3 MiB)",
                body.len(),
                orc_api::MAX_REQUEST_BYTES
            ),
        ))
    } else {
        match Request::from_json(body) {
            Ok(req) => master.handle(req).await,
            Err(e) => Err(ApiError::bad_request(format!("cannot decode request: {e}"))),
        }
    };
    serde_json::to_vec(&res).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl Orc for Service {
    async fn append_entries(&self, r: tonic::Request<Blob>) -> Result<Response<Blob>, Status> {
        let req = decode(r.get_ref())?;
        encode(&self.master.raft.append_entries(req).await)
    }

    type AppendStreamStream = WatchStream;

    /// AppendEntries from a leader on one stream, answered in order. The
    /// stream ends when the leader drops it (a timeout, a new term elsewhere).
    async fn append_stream(
        &self,
        r: tonic::Request<tonic::Streaming<Blob>>,
    ) -> Result<Response<WatchStream>, Status> {
        let raft = self.master.raft.clone();
        let out = r.into_inner().take_while(|m| m.is_ok()).then(move |m| {
            let raft = raft.clone();
            async move {
                let req = decode(&m.unwrap_or_default())?;
                serde_json::to_vec(&raft.append_entries(req).await)
                    .map(|json| Blob { json })
                    .map_err(|e| Status::internal(e.to_string()))
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn vote(&self, r: tonic::Request<Blob>) -> Result<Response<Blob>, Status> {
        let req = decode(r.get_ref())?;
        encode(&self.master.raft.vote(req).await)
    }

    async fn install_snapshot(&self, r: tonic::Request<Blob>) -> Result<Response<Blob>, Status> {
        let req = decode(r.get_ref())?;
        encode(&self.master.raft.install_snapshot(req).await)
    }

    /// Writes forwarded by a follower, as a batch: each is proposed here, and the
    /// answer lists each one's result in order.
    async fn propose(&self, r: tonic::Request<Blob>) -> Result<Response<Blob>, Status> {
        let cmds: Vec<orc_api::Command> = decode(r.get_ref())?;
        let results =
            futures::future::join_all(cmds.into_iter().map(|c| self.master.propose_local(c))).await;
        encode(&results)
    }

    type ProposeStreamStream = WatchStream;

    /// Batches forwarded by one follower on one stream; each is answered (with
    /// its id) as soon as all its commands are, so answers may overtake.
    async fn propose_stream(
        &self,
        r: tonic::Request<tonic::Streaming<Blob>>,
    ) -> Result<Response<WatchStream>, Status> {
        let master = self.master.clone();
        let out = r.into_inner().take_while(|m| m.is_ok()).map(move |m| {
            let master = master.clone();
            async move {
                let m = m.unwrap_or_default();
                let (id, json) = split_id(&m.json)
                    .ok_or_else(|| Status::invalid_argument("a batch without its id"))?;
                let cmds: Vec<orc_api::Command> = serde_json::from_slice(json)
                    .map_err(|e| Status::invalid_argument(format!("bad request body: {e}")))?;
                let results =
                    futures::future::join_all(cmds.into_iter().map(|c| master.propose_local(c)))
                        .await;
                serde_json::to_vec(&results)
                    .map(|json| Blob {
                        json: with_id(id, &json),
                    })
                    .map_err(|e| Status::internal(e.to_string()))
            }
        });
        Ok(Response::new(Box::pin(
            futures::StreamExt::buffer_unordered(out, 64),
        )))
    }

    async fn read_index(&self, _r: tonic::Request<Blob>) -> Result<Response<Blob>, Status> {
        encode(&self.master.read_index_local().await)
    }

    async fn call(&self, r: tonic::Request<Blob>) -> Result<Response<Blob>, Status> {
        Ok(Response::new(Blob {
            json: answer(&self.master, &r.get_ref().json).await?,
        }))
    }

    type CallStreamStream = WatchStream;

    /// Calls from one client on one stream (see `orc_proto::link`): each is
    /// handled in a task of its own, as a unary call is, and answered with its
    /// id as soon as it is done, so answers may overtake.
    async fn call_stream(
        &self,
        r: tonic::Request<tonic::Streaming<Blob>>,
    ) -> Result<Response<WatchStream>, Status> {
        let mut input = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(CALLS_PER_STREAM);
        let master = self.master.clone();
        tokio::spawn(async move {
            // At most this many calls of one stream in progress: beyond, the
            // stream is not read (HTTP/2 flow control holds the client).
            let slots = Arc::new(tokio::sync::Semaphore::new(CALLS_PER_STREAM));
            while let Ok(Some(m)) = input.message().await {
                let Some((id, _)) = split_id(&m.json) else {
                    let _ = tx
                        .send(Err(Status::invalid_argument("a call without its id")))
                        .await;
                    return;
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (master, tx) = (master.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let res = answer(&master, &m.json[8..]).await.map(|json| Blob {
                        json: with_id(id, &json),
                    });
                    let _ = tx.send(res).await;
                });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type WatchStream = WatchStream;
    type LogsStream = WatchStream;
    type ExecStream = WatchStream;

    /// Relayed to the pod's node.
    async fn logs(&self, r: tonic::Request<Blob>) -> Result<Response<WatchStream>, Status> {
        let req: orc_api::request::LogsRequest = decode(r.get_ref())?;
        let mut node = self.node_client(&req.namespace, &req.pod).await?;
        let out = node.logs(r.into_inner()).await?.into_inner();
        Ok(Response::new(Box::pin(out)))
    }

    /// Relayed to the pod's node: the request, then the input as it comes.
    async fn exec(
        &self,
        r: tonic::Request<tonic::Streaming<Blob>>,
    ) -> Result<Response<WatchStream>, Status> {
        let mut input = r.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("exec: no request"))?;
        let req: orc_api::request::ExecRequest = decode(&first)?;
        let mut node = self.node_client(&req.namespace, &req.pod).await?;
        let rest = input
            .take_while(|m| m.is_ok())
            .map(|m| m.unwrap_or_default());
        let out = node
            .exec(tokio_stream::once(first).chain(rest))
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(out)))
    }

    async fn watch(&self, r: tonic::Request<Blob>) -> Result<Response<WatchStream>, Status> {
        let req: WatchRequest = decode(r.get_ref())?;
        let rx = crate::watch::start(self.master.clone(), req);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|ev| {
            serde_json::to_vec(&ev)
                .map(|json| Blob { json })
                .map_err(|e| Status::internal(e.to_string()))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl Service {
    /// The address of the agent running pod `ns/name`.
    async fn node_of(&self, ns: &str, name: &str) -> Result<String, Status> {
        let get = |resource: &str, namespace: &str, name: &str| Request::Get {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        let pod = self
            .master
            .handle(get("pods", ns, name))
            .await
            .map_err(|e| Status::not_found(e.message))?;
        let node_name = pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "pod {ns}/{name} is not scheduled to a node yet"
                ))
            })?;
        let node = self
            .master
            .handle(get("nodes", "", node_name))
            .await
            .map_err(|e| Status::unavailable(e.message))?;
        let ip = node["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == "InternalIP")
            .and_then(|a| a["address"].as_str())
            .ok_or_else(|| Status::unavailable(format!("node {node_name} has no InternalIP")))?;
        let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
            .as_u64()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "node {node_name} serves no logs or exec (a simulated node?)"
                ))
            })?;
        Ok(format!("http://{ip}:{port}"))
    }

    async fn node_client(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<NodeClient<tonic::transport::Channel>, Status> {
        let uri = self.node_of(ns, name).await?;
        NodeClient::connect(uri.clone())
            .await
            .map_err(|e| Status::unavailable(format!("node agent at {uri}: {e}")))
    }
}

pub async fn serve(master: Arc<Master>, addr: SocketAddr) -> Result<(), crate::MasterError> {
    let svc = OrcServer::new(Service { master })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = orc_proto::wire::incoming(addr)
        .map_err(|source| crate::MasterError::Bind { addr, source })?;
    tonic::transport::Server::builder()
        // Clients cancel requests that time out under load; hyper's default (20
        // reset streams awaiting accept) then drops the whole connection with
        // every request on it, which turned a busy master into an unreachable one
        // with 1,000 simulated nodes.
        .http2_max_pending_accept_reset_streams(Some(4096))
        .add_service(svc)
        .serve_with_incoming(incoming)
        .await
        .map_err(|source| crate::MasterError::Serve { addr, source })
}
