//! The connect-time balancer against the real kernel: the program loaded and
//! attached to the cgroup root, in network namespaces this test makes (and
//! removes, even on failure). Needs root.
use orc_proxy::socklb::{self, SockLb};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

struct Netns(String);
impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        let ns = Netns(name.into());
        let ok = Command::new("ip")
            .args(["-n", name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(ok.success());
        ns
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
    /// Run `f` on a thread inside this namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a descriptor we hold, for this thread only.
                assert_eq!(
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                    0
                );
                f()
            })
            .join()
            .unwrap()
        })
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

/// Connect to VIP:80 `n` times; for each, the index of the endpoint that
/// answered and the peer address the socket reports, or the error.
fn connects(n: usize) -> Vec<Result<(usize, SocketAddr), std::io::ErrorKind>> {
    (0..n)
        .map(|_| {
            TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(2))
                .and_then(|mut s| {
                    s.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)?;
                    Ok((b[0] as usize, s.peer_addr()?))
                })
                .map_err(|e| e.kind())
        })
        .collect()
}

#[test]
fn connect_to_a_cluster_ip_goes_to_an_endpoint() {
    assert!(
        nix_is_root(),
        "needs root: BPF programs, network namespaces"
    );
    let pod = Netns::new("orc-socklb-pod");
    let other = Netns::new("orc-socklb-other");
    let lb = SockLb::attach().expect("load and attach the connect4 program");
    let backends = [
        SocketAddr::from(([127, 0, 0, 2], 8080)),
        SocketAddr::from(([127, 0, 0, 3], 8080)),
    ];
    // Echo servers on both endpoints inside the pod's namespace.
    let listeners: Vec<TcpListener> = pod.run(|| {
        backends
            .iter()
            .map(|a| TcpListener::bind(a).unwrap())
            .collect()
    });
    let mut served = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        served.push(n.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                let mut b = [0u8; 1];
                // Each endpoint answers with its index.
                if s.read_exact(&mut b).is_ok() && s.write_all(&[i as u8]).is_ok() {
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
    }
    let (key, value) = socklb::entry(&web(&backends)).unwrap();
    lb.set(&key, &value).unwrap();

    // Not registered yet: the connect is left alone (no route to the VIP).
    assert!(pod.run(|| connects(1))[0].is_err());
    let cookie = socklb::netns_cookie(std::path::Path::new(&pod.path())).unwrap();
    lb.pods().add(cookie).unwrap();

    let got = pod.run(|| connects(40));
    for r in &got {
        let (_, peer) = r.as_ref().expect("connect through the ClusterIP");
        // getpeername shows what the socket asked for, as with NAT.
        assert_eq!(*peer, SocketAddr::from((VIP, 80)));
    }
    let counts: Vec<usize> = served
        .iter()
        .map(|n| n.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    assert_eq!(counts.iter().sum::<usize>(), 40);
    assert!(
        counts.iter().all(|&c| c > 0),
        "both endpoints used: {counts:?}"
    );

    // Another port of the same address, another namespace: untouched.
    let r = pod
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((VIP, 81)), Duration::from_secs(1)));
    assert!(r.is_err(), "port 81 has no entry");
    assert!(
        other.run(|| connects(1))[0].is_err(),
        "an unregistered namespace is left alone"
    );

    // Endpoint removed: only the other one is chosen.
    let (_, one) = socklb::entry(&web(&backends[1..])).unwrap();
    lb.set(&key, &one).unwrap();
    for r in pod.run(|| connects(10)) {
        assert_eq!(r.unwrap().0, 1, "only the endpoint left answers");
    }

    // Service gone, then the namespace: back to the kernel's own answer.
    lb.remove(&key).unwrap();
    assert!(pod.run(|| connects(1))[0].is_err());
    lb.set(&key, &value).unwrap();
    lb.pods().remove(cookie).unwrap();
    assert!(pod.run(|| connects(1))[0].is_err());
    // And with the balancer dropped, its link is gone from the cgroup.
    lb.pods().add(cookie).unwrap();
    assert!(pod.run(|| connects(1))[0].is_ok());
    drop(lb);
    assert!(pod.run(|| connects(1))[0].is_err());
}

/// The Service at VIP:80 with these endpoints.
fn web(backends: &[SocketAddr]) -> orc_proxy::VirtualServer {
    orc_proxy::VirtualServer {
        key: "t/web/".into(),
        proto: "tcp",
        cluster: Some((VIP, 80)),
        external: vec![],
        node_port: None,
        internal_backends: backends
            .iter()
            .map(|a| orc_proxy::Backend {
                ip: match a.ip() {
                    std::net::IpAddr::V4(ip) => ip,
                    ip => panic!("{ip} is not IPv4"),
                },
                port: a.port(),
            })
            .collect(),
        external_backends: vec![],
        external_local: false,
        affinity: None,
        scheduler: orc_proxy::Scheduler::Random,
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
