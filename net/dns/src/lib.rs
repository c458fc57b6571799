//! orc-dns: the cluster DNS server of a node, on hickory-server. It answers
//! the cluster domain (and the reverse names of ClusterIPs and headless
//! endpoints) from a `Zone` that its owner keeps up to date, with TTL 5 s
//! and NXDOMAIN told from NODATA; every other question goes, as the client
//! sent it, to the node's upstream resolvers. It owns no watch and no API
//! client: the node agent feeds the zone. It must not depend on the agent or
//! the API server.
pub mod zone;

pub use zone::{service_records, Answer, Data, QType, Zone};

use hickory_server::proto::op::{Header, HeaderCounts, Message, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, CNAME, PTR, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
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

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let Ok(info) = request.request_info() else {
            let r = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return response
                .send_response(r)
                .await
                .unwrap_or_else(|_| failed(request, ResponseCode::FormErr));
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
        result.unwrap_or_else(|e| {
            tracing::debug!("dns response: {e}");
            failed(request, ResponseCode::ServFail)
        })
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
/// core: each core's thread runs its own single-threaded runtime and
/// hickory server on its own UDP socket bound to the same port
/// (SO_REUSEPORT), so the kernel spreads questions over them and no
/// question crosses threads; TCP is served by the first.
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
                let r = rt.block_on(async move {
                    let mut server = hickory_server::Server::new(Shared(h));
                    server.register_socket(tokio::net::UdpSocket::from_std(sock)?);
                    if let Some(t) = tcp {
                        server.register_listener(
                            tokio::net::TcpListener::from_std(t)?,
                            Duration::from_secs(5),
                            64,
                        );
                    }
                    server
                        .block_until_done()
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))
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
}
