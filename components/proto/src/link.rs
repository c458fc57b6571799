//! Requests multiplexed on one long-lived bidirectional stream (`ProposeStream`
//! between masters, `CallStream` from clients): each message is an 8-byte
//! request id (big-endian) and then the body; each answer carries the id of
//! its request, and answers may come in any order. Compared with one unary
//! call per request, a request costs one HTTP/2 DATA frame each way instead of
//! a new stream with its headers and trailers.
//!
//! A stream that fails fails every request waiting on it, and the next request
//! opens a new one. A server that does not serve the stream (an older build)
//! answers Unimplemented: [`Link::send`] then says [`LinkError::Unsupported`]
//! from then on, and the caller uses the unary call.
use crate::Blob;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// The id in front of a message, and the rest.
pub fn split_id(b: &[u8]) -> Option<(u64, &[u8])> {
    let (id, rest) = b.split_at_checked(8)?;
    Some((u64::from_be_bytes(id.try_into().ok()?), rest))
}

/// `body` behind the id `id`.
pub fn with_id(id: u64, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + body.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(body);
    b
}

#[derive(Debug)]
pub enum LinkError {
    /// The server does not serve this stream: use the unary call.
    Unsupported,
    Status(tonic::Status),
}

/// Where the answer to one request goes.
type Answer = oneshot::Sender<Result<Vec<u8>, tonic::Status>>;
/// The requests waiting on a stream, by id (None once it has failed).
type Waiting = Arc<Mutex<Option<HashMap<u64, Answer>>>>;

fn lock(w: &Waiting) -> MutexGuard<'_, Option<HashMap<u64, Answer>>> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

struct Conn {
    tx: mpsc::Sender<Blob>,
    waiting: Waiting,
    next: u64,
}

/// One multiplexed stream to one server, opened when first needed.
pub struct Link {
    /// Names the stream in errors ("the call stream failed: ...").
    what: &'static str,
    open: tokio::sync::Mutex<Option<Conn>>,
    unsupported: AtomicBool,
}

impl Link {
    pub fn new(what: &'static str) -> Self {
        Link {
            what,
            open: tokio::sync::Mutex::new(None),
            unsupported: AtomicBool::new(false),
        }
    }

    /// The server has said it does not serve the stream.
    pub fn unsupported(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    /// Send `body` and wait up to `timeout` for its answer (the time to open
    /// the stream and to queue the request on it included: a server that hangs
    /// makes callers fail, not wait). `connect` opens the stream (the messages
    /// to send in, the answers out) when none is open.
    pub async fn send<F, Fut>(
        &self,
        body: &[u8],
        timeout: Duration,
        connect: F,
    ) -> Result<Vec<u8>, LinkError>
    where
        F: FnOnce(ReceiverStream<Blob>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Streaming<Blob>, tonic::Status>>,
    {
        if self.unsupported() {
            return Err(LinkError::Unsupported);
        }
        let given_up = || {
            LinkError::Status(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            )))
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let (id, rx, waiting) =
            match tokio::time::timeout_at(deadline, self.enqueue(body, connect)).await {
                Err(_) => return Err(given_up()),
                Ok(r) => r?,
            };
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => {
                if let Some(w) = lock(&waiting).as_mut() {
                    w.remove(&id);
                }
                Err(given_up())
            }
            Ok(r) => r
                .unwrap_or_else(|_| {
                    Err(tonic::Status::unavailable(format!(
                        "the {} failed",
                        self.what
                    )))
                })
                .map_err(LinkError::Status),
        }
    }

    /// Queue `body` on the open stream (opening one if needed): its id, where
    /// its answer will come, and the table it waits in.
    async fn enqueue<F, Fut>(
        &self,
        body: &[u8],
        connect: F,
    ) -> Result<
        (
            u64,
            oneshot::Receiver<Result<Vec<u8>, tonic::Status>>,
            Waiting,
        ),
        LinkError,
    >
    where
        F: FnOnce(ReceiverStream<Blob>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Streaming<Blob>, tonic::Status>>,
    {
        let mut open = self.open.lock().await;
        if open
            .as_ref()
            .is_none_or(|c| c.tx.is_closed() || lock(&c.waiting).is_none())
        {
            let (tx, rx) = mpsc::channel(256);
            match connect(ReceiverStream::new(rx)).await {
                Ok(answers) => *open = Some(self.start(tx, answers)),
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    self.unsupported.store(true, Ordering::Relaxed);
                    return Err(LinkError::Unsupported);
                }
                Err(s) => return Err(LinkError::Status(s)),
            }
        }
        let c = open.as_mut().expect("connected above");
        let id = c.next;
        c.next += 1;
        let (tx, rx) = oneshot::channel();
        match lock(&c.waiting).as_mut() {
            Some(w) => w.insert(id, tx),
            None => return Err(self.failed("failed")),
        };
        let msg = Blob {
            json: with_id(id, body),
        };
        if c.tx.send(msg).await.is_err() {
            return Err(self.failed("closed"));
        }
        Ok((id, rx, c.waiting.clone()))
    }

    fn failed(&self, how: &str) -> LinkError {
        LinkError::Status(tonic::Status::unavailable(format!(
            "the {} {how}",
            self.what
        )))
    }

    /// Read answers off `answers` and hand each to its request.
    fn start(&self, tx: mpsc::Sender<Blob>, mut answers: tonic::Streaming<Blob>) -> Conn {
        let waiting: Waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        let w = waiting.clone();
        let what = self.what;
        tokio::spawn(async move {
            let failure = loop {
                match answers.message().await {
                    Ok(Some(m)) => {
                        let Some((id, body)) = split_id(&m.json) else {
                            break tonic::Status::internal(format!(
                                "an answer on the {what} without its id"
                            ));
                        };
                        let tx = lock(&w).as_mut().and_then(|m| m.remove(&id));
                        if let Some(tx) = tx {
                            let _ = tx.send(Ok(body.to_vec()));
                        }
                    }
                    Ok(None) => break tonic::Status::unavailable(format!("the {what} ended")),
                    // The server could not read a request: say so.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::InvalidArgument | tonic::Code::Internal
                        ) =>
                    {
                        break s
                    }
                    // Whatever else broke the stream, the requests on it may be
                    // sent again (to another server).
                    Err(s) => {
                        break tonic::Status::unavailable(format!(
                            "the {what} failed: {}",
                            s.message()
                        ))
                    }
                }
            };
            if let Some(all) = lock(&w).take() {
                for (_, tx) in all {
                    let _ = tx.send(Err(failure.clone()));
                }
            }
        });
        Conn {
            tx,
            waiting,
            next: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_client::NodeClient;
    use crate::node_server::{Node, NodeServer};
    use std::pin::Pin;
    use tonic::{Request, Response, Status, Streaming};

    #[test]
    fn ids_round_trip() {
        let b = with_id(0x0102_0304_0506_0708, b"{\"a\":1}");
        assert_eq!(&b[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            split_id(&b),
            Some((0x0102_0304_0506_0708, &b"{\"a\":1}"[..]))
        );
        assert_eq!(split_id(b"short"), None);
    }

    type Out = Pin<Box<dyn tokio_stream::Stream<Item = Result<Blob, Status>> + Send>>;

    /// A server whose `Exec` stream answers each message with its body
    /// reversed, later ones often first; the body `die` breaks the stream.
    struct Reverse;

    #[tonic::async_trait]
    impl Node for Reverse {
        type LogsStream = Out;
        type ExecStream = Out;

        async fn logs(&self, _: Request<Blob>) -> Result<Response<Out>, Status> {
            Err(Status::unimplemented("no logs here"))
        }

        async fn exec(&self, r: Request<Streaming<Blob>>) -> Result<Response<Out>, Status> {
            let mut input = r.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(m)) = input.message().await {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let (id, body) = split_id(&m.json).expect("an id");
                        if body == b"die" {
                            let _ = tx.send(Err(Status::unavailable("told to die"))).await;
                            return;
                        }
                        if body == b"hang" {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(7 - id % 7)).await;
                        let mut out = body.to_vec();
                        out.reverse();
                        let _ = tx
                            .send(Ok(Blob {
                                json: with_id(id, &out),
                            }))
                            .await;
                    });
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    async fn server() -> NodeClient<tonic::transport::Channel> {
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
            .expect("bind 127.0.0.1:0");
        let addr = incoming.local_addr().expect("local address");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeServer::new(Reverse))
                .serve_with_incoming(incoming),
        );
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        NodeClient::new(ch)
    }

    async fn send(
        link: &Link,
        c: &NodeClient<tonic::transport::Channel>,
        body: &str,
    ) -> Result<Vec<u8>, LinkError> {
        send_within(link, c, body, Duration::from_secs(10)).await
    }

    async fn send_within(
        link: &Link,
        c: &NodeClient<tonic::transport::Channel>,
        body: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let open = |out| {
            let mut c = c.clone();
            async move { Ok(c.exec(out).await?.into_inner()) }
        };
        link.send(body.as_bytes(), timeout, open).await
    }

    /// Many requests at once on one stream, answered out of order: each
    /// caller gets the answer to its own request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_get_their_own_answers() {
        let c = server().await;
        let link = Arc::new(Link::new("test stream"));
        let calls = (0..200).map(|i| {
            let (link, c) = (link.clone(), c.clone());
            tokio::spawn(async move {
                let body = format!("request {i}");
                let got = send(&link, &c, &body).await.expect("an answer");
                (body, String::from_utf8(got).unwrap())
            })
        });
        for r in futures_join(calls).await {
            let (body, got) = r;
            assert_eq!(got.chars().rev().collect::<String>(), body);
        }
    }

    /// A request the server never answers fails after the timeout, is
    /// forgotten, and the stream goes on serving the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unanswered_request_times_out_and_the_stream_goes_on() {
        let c = server().await;
        let link = Link::new("test stream");
        match send_within(&link, &c, "hang", Duration::from_millis(300)).await {
            Err(LinkError::Status(s)) => {
                assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}")
            }
            other => panic!("an unanswered request gave {other:?}"),
        }
        assert_eq!(send(&link, &c, "ok").await.unwrap(), b"ko");
        let open = link.open.lock().await;
        let waiting = lock(&open.as_ref().expect("a stream").waiting)
            .as_ref()
            .map(|w| w.len());
        assert_eq!(waiting, Some(0), "the timed-out request is still waiting");
    }

    /// A stream that breaks fails the requests on it as Unavailable, and the
    /// next request opens a new stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_stream_fails_its_requests_and_the_next_reopens() {
        let c = server().await;
        let link = Link::new("test stream");
        assert_eq!(send(&link, &c, "ab").await.unwrap(), b"ba");
        match send(&link, &c, "die").await {
            Err(LinkError::Status(s)) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(s.message().contains("test stream failed"), "{s:?}");
            }
            other => panic!("the broken stream answered {other:?}"),
        }
        assert_eq!(send(&link, &c, "xyz").await.unwrap(), b"zyx");
    }

    /// A server without the stream (Unimplemented) makes the link say so, once
    /// and for good, so the caller uses the unary call.
    #[tokio::test]
    async fn unimplemented_means_unsupported_from_then_on() {
        let link = Link::new("test stream");
        let refuse = |_out| async { Err(Status::unimplemented("not here")) };
        assert!(matches!(
            link.send(b"x", Duration::from_secs(1), refuse).await,
            Err(LinkError::Unsupported)
        ));
        assert!(link.unsupported());
        // Were it asked again, this would answer Internal, not Unsupported.
        let never = |_out| async { Err(Status::internal("a second attempt")) };
        assert!(matches!(
            link.send(b"x", Duration::from_secs(1), never).await,
            Err(LinkError::Unsupported)
        ));
    }

    async fn futures_join<T: Send + 'static>(
        handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("task"));
        }
        out
    }
}
