//! The server over real sockets: answers from the zone, NXDOMAIN with an
//! SOA, and a name outside the cluster relayed to an upstream, here a second
//! orc DNS server holding another domain.
use hickory_server::proto::op::{Message, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};
use orc_dns::{service_records, Handler, Zone};
use serde_json::json;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn zone(domain: &str, ip: &str) -> Arc<RwLock<Zone>> {
    let mut z = Zone::new(domain);
    let svc = json!({"metadata": {"namespace": "demo", "name": "web"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}});
    z.set_service("demo/web", service_records(&svc, &[], domain));
    Arc::new(RwLock::new(z))
}

async fn ask(server: SocketAddr, name: &str, t: RecordType) -> Message {
    ask_as(server, name, t, 4242).await
}

async fn ask_as(server: SocketAddr, name: &str, t: RecordType, id: u16) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_str(name).unwrap(), t));
    m.metadata.id = id;
    Message::from_vec(&exchange(server, &m.to_vec().unwrap()).await).unwrap()
}

/// Send `query` until an answer comes back; its bytes.
async fn exchange(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..50 {
        sock.send_to(query, server).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await
        {
            return buf[..n].to_vec();
        }
    }
    panic!("no answer from {server}");
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// Answers from the zone are kept per question, and a change of the zone
/// is seen by the very next question; each answer carries its query's ID;
/// a malformed query gets FORMERR; TCP answers too.
#[tokio::test]
async fn kept_answers_follow_the_zone() {
    let z = zone("cluster.local", "198.19.0.10");
    let server = free_udp();
    tokio::spawn(orc_dns::serve(
        Handler {
            zone: z.clone(),
            upstreams: vec![],
        },
        server,
    ));
    let name = "web.demo.svc.cluster.local.";
    for id in [1, 2, 3] {
        let m = ask_as(server, name, RecordType::A, id).await;
        assert_eq!(m.metadata.id, id);
        assert_eq!(a_records(&m), ["198.19.0.10"]);
    }
    let svc = json!({"metadata": {"namespace": "demo", "name": "web"},
        "spec": {"clusterIP": "198.19.0.11", "ports": [{"name": "http", "port": 80}]}});
    z.write()
        .unwrap()
        .set_service("demo/web", service_records(&svc, &[], "cluster.local"));
    let m = ask_as(server, name, RecordType::A, 4).await;
    assert_eq!(
        (m.metadata.id, a_records(&m)),
        (4, vec!["198.19.0.11".into()])
    );
    z.write().unwrap().set_service("demo/web", vec![]);
    let m = ask_as(server, name, RecordType::A, 5).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // A whole new zone (as the agent installs after a resync).
    let svc = json!({"metadata": {"namespace": "demo", "name": "web"},
        "spec": {"clusterIP": "198.19.0.12", "ports": [{"name": "http", "port": 80}]}});
    let mut fresh = Zone::new("cluster.local");
    fresh.set_service("demo/web", service_records(&svc, &[], "cluster.local"));
    *z.write().unwrap() = fresh;
    let m = ask_as(server, name, RecordType::A, 6).await;
    assert_eq!(a_records(&m), ["198.19.0.12"]);
    // A header that promises a question it does not carry: FORMERR, same ID.
    let bad = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
    let r = exchange(server, &bad).await;
    assert_eq!(&r[..2], &[0x12, 0x34]);
    assert_eq!(r[2] & 0x80, 0x80, "a response");
    assert_eq!(r[3] & 0x0f, 1, "FORMERR");
    // TCP: a length-prefixed question on a connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    q.metadata.id = 7;
    let q = q.to_vec().unwrap();
    let mut c = tokio::net::TcpStream::connect(server).await.unwrap();
    c.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    c.write_all(&q).await.unwrap();
    let len = c.read_u16().await.unwrap() as usize;
    let mut r = vec![0u8; len];
    c.read_exact(&mut r).await.unwrap();
    let m = Message::from_vec(&r).unwrap();
    assert_eq!(
        (m.metadata.id, a_records(&m)),
        (7, vec!["198.19.0.12".into()])
    );
}

#[tokio::test]
async fn answers_and_relays_over_udp() {
    let upstream = free_udp();
    tokio::spawn(orc_dns::serve(
        Handler {
            zone: zone("example.test", "198.19.9.9"),
            upstreams: vec![],
        },
        upstream,
    ));
    let cluster = free_udp();
    tokio::spawn(orc_dns::serve(
        Handler {
            zone: zone("cluster.local", "198.19.0.10"),
            upstreams: vec![upstream],
        },
        cluster,
    ));
    let a = a_records;
    let m = ask(cluster, "web.demo.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(a(&m), ["198.19.0.10"]);
    assert_eq!(m.answers[0].ttl, orc_dns::TTL);
    let m = ask(cluster, "nope.demo.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1, "an SOA for negative caching");
    let m = ask(cluster, "web.demo.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty(), "NODATA");
    // Not a cluster name: relayed to the upstream, answered as it answered.
    let m = ask(cluster, "web.demo.svc.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(a(&m), ["198.19.9.9"]);
    let m = ask(cluster, "gone.demo.svc.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}
