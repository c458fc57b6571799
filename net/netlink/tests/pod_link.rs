//! A pod's link, made as the agent makes it, in network namespaces of the
//! test's own (a node holding the bridge, and a pod). Needs root.
use futures::TryStreamExt;
use orc_netlink::{attach, connect_in, create_netns, ensure_bridge, link_index, PodLink};
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::Handle;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// Removes the namespaces (and with them the bridge and the veth pair),
/// also when the test fails.
struct Namespaces(Vec<PathBuf>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = orc_netlink::delete_netns(p);
        }
        if let Some(dir) = self.0.first().and_then(|p| p.parent()) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

async fn families(h: &Handle, index: u32) -> Vec<AddressFamily> {
    let addrs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .expect("list addresses");
    addrs.iter().map(|a| a.header.family).collect()
}

#[tokio::test]
async fn a_pod_link_is_ipv4_only() {
    let dir = std::env::temp_dir().join(format!("orc-netlink-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = Namespaces(vec![dir.join("node"), dir.join("pod")]);
    let (node, pod) = (&ns.0[0], &ns.0[1]);
    create_netns(node).expect("node namespace");
    create_netns(pod).expect("pod namespace");
    let host = connect_in(node).unwrap();
    let gateway = Ipv4Addr::new(198, 18, 250, 1);
    ensure_bridge(&host, "orc-test0", gateway, 24)
        .await
        .expect("bridge");
    let link = PodLink {
        host_veth: "veth-test0".into(),
        bridge: "orc-test0".into(),
        ip: Ipv4Addr::new(198, 18, 250, 2),
        prefix: 24,
        gateway,
    };
    attach(&host, pod, &link).await.expect("attach");
    // Twice: the second replaces the pair an earlier attempt left.
    attach(&host, pod, &link).await.expect("attach again");
    let inside = connect_in(pod).unwrap();
    let eth0 = link_index(&inside, "eth0").await.unwrap().expect("eth0");
    let veth = link_index(&host, "veth-test0")
        .await
        .unwrap()
        .expect("host end");
    // Link-local addresses come (if they do) once the pair has a carrier,
    // from a kernel worker: give them the time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(families(&inside, eth0).await, vec![AddressFamily::Inet]);
    assert_eq!(families(&host, veth).await, vec![]);
    // lo keeps ::1.
    let lo = link_index(&inside, "lo").await.unwrap().expect("lo");
    assert!(families(&inside, lo).await.contains(&AddressFamily::Inet6));
}
