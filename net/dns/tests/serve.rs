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
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_str(name).unwrap(), t));
    m.metadata.id = 4242;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..50 {
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await
        {
            return Message::from_vec(&buf[..n]).unwrap();
        }
        sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    }
    panic!("no answer from {server}");
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
    let a = |m: &Message| -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect()
    };
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
