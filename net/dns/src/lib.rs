//! orc-dns: the cluster DNS server of a node, on hickory-server. It answers
//! the cluster domain (and the reverse names of ClusterIPs and headless
//! endpoints) from a `Zone` that its owner keeps up to date, with TTL 5 s
//! and NXDOMAIN told from NODATA; every other question goes, as the client
//! sent it, to the node's upstream resolvers. It owns no watch and no API
//! client: the node agent feeds the zone. It must not depend on the agent or
//! the API server.
pub mod zone;

pub use zone::{service_records, Answer, Data, QType, Zone};

use hickory_server::net::{xfer::Protocol, NetError};
use hickory_server::proto::op::{
    Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, CNAME, PTR, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub const TTL: u32 = 5;

pub struct Handler {
    pub zone: Arc<RwLock<Zone>>,
    pub upstreams: Vec<SocketAddr>,
}

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap_or_else(|_| Name::root())
}

fn record(owner: &Name, d: &Data) -> Record {
    let rdata = match d {
        Data::A(ip) => RData::A(A(*ip)),
        Data::Srv {
            priority,
            weight,
            port,
            target,
        } => RData::SRV(SRV::new(*priority, *weight, *port, name(target))),
        Data::Cname(t) => RData::CNAME(CNAME(name(t))),
        Data::Ptr(t) => RData::PTR(PTR(name(t))),
    };
    Record::from_rdata(owner.clone(), TTL, rdata)
}

fn soa(domain: &str) -> Record {
    Record::from_rdata(
        name(domain),
        TTL,
        RData::SOA(SOA::new(
            name(&format!("ns.dns.{domain}")),
            name(&format!("hostmaster.{domain}")),
            1,
            7200,
            1800,
            86400,
            TTL,
        )),
    )
}

fn qtype(t: RecordType) -> QType {
    match t {
        RecordType::A => QType::A,
        RecordType::SRV => QType::Srv,
        RecordType::CNAME => QType::Cname,
        RecordType::PTR => QType::Ptr,
        RecordType::ANY => QType::Any,
        _ => QType::Other,
    }
}

/// The `nameserver`s of a resolv.conf, port 53, leaving out `except`.
pub fn upstreams_from(resolv_conf: &str, except: &[std::net::IpAddr]) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| !except.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Relay a question to the upstreams, first answer wins.
async fn forward(raw: &[u8], upstreams: &[SocketAddr]) -> Option<Message> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.send_to(raw, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
        {
            if let Ok(m) = Message::from_vec(&buf[..n]) {
                return Some(m);
            }
        }
    }
    None
}

fn failed(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

impl Handler {
    /// The generation of the zone (see `Zone::generation`).
    pub fn generation(&self) -> u64 {
        self.zone
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation()
    }

    /// Answer `request` through `response`. True when the answer depends on
    /// the question and the zone alone (the zone answered, or the question
    /// was malformed), so it may be kept until the zone changes; false when
    /// it came from an upstream or failed.
    async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> (ResponseInfo, bool) {
        let builder = MessageResponseBuilder::from_message_request(request);
        let Ok(info) = request.request_info() else {
            let r = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return match response.send_response(r).await {
                Ok(info) => (info, true),
                Err(_) => (failed(request, ResponseCode::FormErr), false),
            };
        };
        let owner: Name = info.query.name().into();
        // A LowerName is lower-case already.
        let mut fq = info.query.name().to_string();
        if !fq.ends_with('.') {
            fq.push('.');
        }
        let (answer, domain) = {
            let z = self.zone.read().unwrap_or_else(|e| e.into_inner());
            let a = z.lookup(&fq, qtype(info.query.query_type()));
            let d = match a {
                Answer::NoData | Answer::NxDomain => z.domain().to_string(),
                _ => String::new(),
            };
            (a, d)
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let local = answer != Answer::NotOurs;
        let result = match answer {
            Answer::NotOurs => match forward(request.as_slice(), &self.upstreams).await {
                Some(m) => {
                    metadata.response_code = m.metadata.response_code;
                    metadata.authoritative = m.metadata.authoritative;
                    let r = builder.build(
                        metadata,
                        m.answers.iter(),
                        m.authorities.iter(),
                        std::iter::empty(),
                        m.additionals
                            .iter()
                            .filter(|r| r.record_type() != RecordType::OPT),
                    );
                    response.send_response(r).await
                }
                None => {
                    let r = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                    response.send_response(r).await
                }
            },
            Answer::Records(recs) => {
                metadata.authoritative = true;
                let answers: Vec<Record> = recs.iter().map(|d| record(&owner, d)).collect();
                let r = builder.build(
                    metadata,
                    answers.iter(),
                    std::iter::empty(),
                    std::iter::empty(),
                    std::iter::empty(),
                );
                response.send_response(r).await
            }
            Answer::NoData | Answer::NxDomain => {
                metadata.authoritative = true;
                if answer == Answer::NxDomain {
                    metadata.response_code = ResponseCode::NXDomain;
                }
                let soa = [soa(&domain)];
                let r = builder.build(
                    metadata,
                    std::iter::empty(),
                    std::iter::empty(),
                    soa.iter(),
                    std::iter::empty(),
                );
                response.send_response(r).await
            }
        };
        match result {
            Ok(info) => (info, local),
            Err(e) => {
                tracing::debug!("dns response: {e}");
                (failed(request, ResponseCode::ServFail), false)
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.respond(request, response).await.0
    }
}

/// How many answers one serving thread keeps.
const CACHED_ANSWERS: usize = 10_000;

/// Encoded answers of one serving thread, by question: the query's bytes
/// after its ID (flags, question, EDNS), which are all an answer from the
/// zone depends on, for one zone generation. Like CoreDNS's cache in front
/// of its kubernetes plugin, but exact: a change of the zone empties it.
#[derive(Default)]
pub struct AnswerCache {
    generation: u64,
    answers: HashMap<Box<[u8]>, Box<[u8]>>,
}

impl AnswerCache {
    /// The kept answer to `query` (a whole DNS message) under zone
    /// `generation`, carrying the query's ID.
    pub fn get(&mut self, generation: u64, query: &[u8]) -> Option<&[u8]> {
        if generation != self.generation || query.len() < 12 {
            return None;
        }
        let a = self.answers.get_mut(&query[2..])?;
        a[..2].copy_from_slice(&query[..2]);
        Some(a)
    }

    /// Keep `answer` to `query`, computed under zone `generation`.
    pub fn put(&mut self, generation: u64, query: &[u8], answer: &[u8]) {
        if generation < self.generation || query.len() < 12 || answer.len() < 12 {
            return;
        }
        if generation > self.generation || self.answers.len() >= CACHED_ANSWERS {
            self.answers.clear();
            self.generation = generation;
        }
        self.answers.insert(query[2..].into(), answer.into());
    }
}

/// The answer to a query that does not parse (at least a header): its ID,
/// opcode and RD bit, FORMERR, no records.
fn form_error(query: &[u8]) -> Option<[u8; 12]> {
    let mut a = [0u8; 12];
    a[..2].copy_from_slice(query.get(..2)?);
    a[2] = 0x80 | (query.get(2)? & 0x79);
    a[3] = 0x01;
    (query.len() >= 12).then_some(a)
}

/// A response handler that keeps the encoded answer for its caller (which
/// sends it, and may cache it), encoding as hickory's own UDP handler does.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

impl Capture {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Without EDNS a UDP answer is at most 512 bytes (RFC 1035 4.2.1);
        // what does not fit is left out with TC set.
        let max = response.edns().map_or(512, |e| e.max_payload());
        let id = response.metadata().id;
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!("dns: encoding an answer: {e}");
                bytes.clear();
                let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                header
                    .emit(&mut BinEncoder::new(&mut bytes))
                    .map_err(|e| NetError::from(e.to_string()))?;
                ResponseInfo::from(header)
            }
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(info)
    }
}

/// Serve UDP questions on `sock` until it fails. A question asked before
/// under the current zone is answered from the thread's cache without
/// parsing; any other goes to the handler, inline when the zone answers
/// and as a task of its own when it waits for an upstream.
async fn serve_udp(sock: tokio::net::UdpSocket, handler: Arc<Handler>) -> std::io::Result<()> {
    use std::future::Future;
    use std::task::Poll;
    let sock = std::rc::Rc::new(sock);
    let mut cache = AnswerCache::default();
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let query = &buf[..n];
        // Too short for a header, or a response: not ours to answer.
        if n < 12 || query[2] & 0x80 != 0 {
            continue;
        }
        let generation = handler.generation();
        if let Some(a) = cache.get(generation, query) {
            let _ = sock.send_to(a, src).await;
            continue;
        }
        let request = match Request::from_bytes(query.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(_) => {
                if let Some(a) = form_error(query) {
                    let _ = sock.send_to(&a, src).await;
                }
                continue;
            }
        };
        let capture = Capture::default();
        let (h, c) = (handler.clone(), capture.clone());
        let mut answer = Box::pin(async move { h.respond(&request, c).await.1 });
        match std::future::poll_fn(|cx| Poll::Ready(answer.as_mut().poll(cx))).await {
            Poll::Ready(cacheable) => {
                if let Some(a) = capture.take() {
                    if cacheable {
                        cache.put(generation, query, &a);
                    }
                    let _ = sock.send_to(&a, src).await;
                }
            }
            Poll::Pending => {
                let sock = sock.clone();
                tokio::task::spawn_local(async move {
                    answer.await;
                    if let Some(a) = capture.take() {
                        let _ = sock.send_to(&a, src).await;
                    }
                });
            }
        }
    }
}

/// A UDP socket on `addr` that shares the port with its siblings (SO_REUSEPORT).
fn udp_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// One server of the set, sharing the handler.
struct Shared(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.0.handle_request::<R, T>(request, response).await
    }
}

/// Serve DNS on `addr` (UDP and TCP) until the process ends. Thread per
/// core: each core's thread runs its own single-threaded runtime and UDP
/// loop on its own socket bound to the same port (SO_REUSEPORT), so the
/// kernel spreads questions over them and no question crosses threads; the
/// first thread also runs hickory's server for TCP.
pub async fn serve(handler: Handler, addr: SocketAddr) -> std::io::Result<()> {
    let handler = Arc::new(handler);
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    let mut tcp = Some(tcp);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<std::io::Result<()>>(n);
    for i in 0..n {
        let sock = std::net::UdpSocket::from(udp_socket(addr)?);
        let tcp = tcp.take();
        let (h, done) = (handler.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name(format!("dns-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = done.blocking_send(Err(e));
                        return;
                    }
                };
                let r = tokio::task::LocalSet::new().block_on(&rt, async move {
                    let udp = serve_udp(tokio::net::UdpSocket::from_std(sock)?, h.clone());
                    let Some(t) = tcp else {
                        return udp.await;
                    };
                    let mut server = hickory_server::Server::new(Shared(h));
                    server.register_listener(
                        tokio::net::TcpListener::from_std(t)?,
                        Duration::from_secs(5),
                        64,
                    );
                    tokio::select! {
                        r = udp => r,
                        r = server.block_until_done() => {
                            r.map_err(|e| std::io::Error::other(e.to_string()))
                        }
                    }
                });
                let _ = done.blocking_send(r);
            })?;
    }
    drop(done_tx);
    done_rx.recv().await.unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_leave_out_ourselves() {
        let r =
            "search x\nnameserver 198.18.1.1\nnameserver 127.0.0.53\n# nameserver 198.18.0.53\n";
        let u = upstreams_from(r, &["198.18.1.1".parse().unwrap()]);
        assert_eq!(u, vec!["127.0.0.53:53".parse().unwrap()]);
    }

    #[test]
    fn kept_answers_carry_the_query_id_and_die_with_their_generation() {
        let q1 = [
            0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 0, 0, 1, 0, 1,
        ];
        let mut q2 = q1;
        q2[..2].copy_from_slice(&[0xab, 0xcd]);
        let answer = [0, 1, 0x85, 0, 0, 1, 0, 1, 0, 0, 0, 0, 42];
        let mut c = AnswerCache::default();
        assert_eq!(c.get(5, &q1), None);
        c.put(5, &q1, &answer);
        let got = c.get(5, &q2).expect("kept").to_vec();
        assert_eq!(&got[..2], &[0xab, 0xcd]);
        assert_eq!(&got[2..], &answer[2..]);
        // Another question (here: other flags) is another entry.
        let mut q3 = q1;
        q3[2] = 0;
        assert_eq!(c.get(5, &q3), None);
        // A newer zone: nothing kept is served; an answer computed under an
        // older one is not kept.
        assert_eq!(c.get(6, &q1), None);
        c.put(4, &q3, &answer);
        assert_eq!(c.get(5, &q3), None);
        c.put(6, &q3, &answer);
        assert!(c.get(6, &q3).is_some());
        assert_eq!(c.get(6, &q1), None, "emptied for generation 6");
        assert_eq!(c.get(5, &q3), None);
        // Bounded.
        for i in 0..CACHED_ANSWERS + 1 {
            let mut q = q1.to_vec();
            q.extend_from_slice(&(i as u32).to_be_bytes());
            c.put(6, &q, &answer);
        }
        assert!(c.answers.len() <= CACHED_ANSWERS);
    }

    #[test]
    fn form_error_echoes_id_opcode_and_rd() {
        // ID 0x1234, opcode 2 (STATUS), RD.
        let q = [0x12, 0x34, 0x11, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let a = form_error(&q).unwrap();
        assert_eq!(a, [0x12, 0x34, 0x91, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(form_error(&q[..11]), None);
    }
}
