//! The generated transactions against the real kernel and nft, inside a
//! network namespace this test makes (and removes, even on failure).
use orc_proxy::{rules, Backend, Plan, Scheduler, VirtualServer};
use std::io::Write;
use std::process::{Command, Stdio};

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn nft_in(ns: &str, script: &str) -> Result<(), String> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn list(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "table", "ip", "orc-svc"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vs(key: &str, ip: &str, backends: &[&str], affinity: Option<u32>) -> VirtualServer {
    let b: Vec<Backend> = backends
        .iter()
        .map(|a| Backend {
            ip: a.parse().unwrap(),
            port: 8080,
        })
        .collect();
    VirtualServer {
        key: key.into(),
        proto: "tcp",
        cluster: Some((ip.parse().unwrap(), 80)),
        external: vec![("198.18.252.1".parse().unwrap(), 80)],
        node_port: Some(30002),
        internal_backends: b.clone(),
        external_backends: b,
        external_local: false,
        affinity,
        scheduler: Scheduler::RoundRobin,
    }
}

#[test]
fn transactions_apply_to_the_kernel() {
    assert!(
        nix_is_root(),
        "this test makes a network namespace: run it as root"
    );
    let name = format!("orc-proxy-test-{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success());
    let ns = Netns(name);
    let a = rules::render(
        &vs(
            "demo/web/http",
            "198.19.0.10",
            &["198.18.1.2", "198.18.2.2"],
            Some(30),
        ),
        Some("198.18.0.0/16"),
    );
    nft_in(&ns.0, &rules::full(&a, Some("198.18.0.0/16"))).unwrap();
    let l = list(&ns.0);
    assert!(l.contains("198.19.0.10 . tcp . 80 : goto svc-"), "{l}");
    assert!(l.contains("numgen inc mod 2 vmap"), "{l}");
    assert!(l.contains("flags dynamic,timeout"), "{l}");
    // The dispatch rule through the bucket map is accepted by this kernel.
    assert!(l.contains("numgen random mod 720 map @backends"), "{l}");
    // One endpoint replaced, then every endpoint gone, then back.
    let b = rules::render(
        &vs(
            "demo/web/http",
            "198.19.0.10",
            &["198.18.1.2", "198.18.2.3"],
            Some(60),
        ),
        Some("198.18.0.0/16"),
    );
    let c = rules::render(&vs("demo/web/http", "198.19.0.10", &[], None), None);
    // Random scheduling without affinity: the bucket maps, no chains.
    let random = |eps: &[&str]| {
        let mut v = vs("demo/web/http", "198.19.0.10", eps, None);
        v.scheduler = Scheduler::Random;
        rules::render(&v, Some("198.18.0.0/16"))
    };
    let m1 = random(&["198.18.1.2", "198.18.2.2"]);
    let m2 = random(&["198.18.1.2", "198.18.2.3", "198.18.2.4"]);
    for (old, new) in [
        (&a, &b),
        (&b, &c),
        (&c, &a),
        (&a, &m1),
        (&m1, &m2),
        (&m2, &c),
        (&c, &m1),
    ] {
        let mut p = Plan::default();
        p.add(old, new);
        // One Service: its hairpin pairs come and go with it (Proxy counts
        // them across Services).
        let up: Vec<_> = new.hairpin.difference(&old.hairpin).copied().collect();
        let down: Vec<_> = old.hairpin.difference(&new.hairpin).copied().collect();
        p.hairpin(&up, &down);
        nft_in(&ns.0, &p.script()).unwrap();
        // What the kernel holds is what a full write of `new` holds.
        let incremental = list(&ns.0);
        nft_in(&ns.0, &rules::full(new, Some("198.18.0.0/16"))).unwrap();
        assert_eq!(blocks(&incremental), blocks(&list(&ns.0)));
    }
    assert!(!list(&ns.0).contains(
        "no-endpoints {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements"
    ));
}

/// The table's sets, maps and chains, in name order (the kernel lists them
/// in the order they were made).
fn blocks(listing: &str) -> Vec<String> {
    let body = listing
        .trim()
        .trim_start_matches("table ip orc-svc {")
        .trim_end_matches('}');
    let mut b: Vec<String> = body
        .split("\n\n")
        .map(|s| {
            // Elements in sorted order (the kernel lists them as it keeps them).
            let s = s.trim();
            match s.split_once("elements = {") {
                Some((head, rest)) => {
                    let (els, tail) = rest.split_once('}').unwrap_or((rest, ""));
                    let mut items: Vec<&str> = els
                        .split(',')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .collect();
                    items.sort();
                    format!("{head}elements = {{ {} }}{tail}", items.join(", "))
                }
                None => s.to_string(),
            }
        })
        .collect();
    b.sort();
    b
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `Proxy` itself, in a network namespace of this test's thread: two
/// Services claiming one external address and port must not break the
/// table for the others, and hairpin pairs shared by two Services stay
/// until the last one goes.
#[test]
fn proxy_keeps_the_table_valid_when_services_collide() {
    assert!(
        nix_is_root(),
        "this test makes a network namespace: run it as root"
    );
    std::thread::spawn(|| {
        // A thread's own network namespace, gone when the thread ends.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let list = || {
            let o = Command::new("nft")
                .args(["list", "table", "ip", "orc-svc"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let svc = |key: &str, vip: &str, ext: &str, ep: &str| {
            let mut v = vs(&format!("{key}/http"), vip, &[ep], None);
            v.scheduler = Scheduler::Random;
            v.external = vec![(ext.parse().unwrap(), 80)];
            v.node_port = None;
            (key.to_string(), vec![v])
        };
        let mut p = orc_proxy::Proxy::new(None);
        p.resync(vec![
            svc("demo/a", "198.19.0.1", "198.18.252.9", "198.18.1.2"),
            svc("demo/b", "198.19.0.2", "198.18.252.9", "198.18.1.2"),
            svc("demo/c", "198.19.0.3", "198.18.252.10", "198.18.1.3"),
        ])
        .expect("a valid table despite the collision");
        let l = list();
        assert!(l.contains("198.19.0.1 . tcp . 80 . 0-719"), "{l}");
        assert!(
            !l.contains("198.19.0.2 . tcp . 80"),
            "the loser gets nothing: {l}"
        );
        assert!(l.contains("198.19.0.3 . tcp . 80 . 0-719"), "{l}");
        // The winner goes: the other takes the address on its next change.
        p.update(vec![("demo/a".into(), vec![])]).unwrap();
        p.update(vec![svc(
            "demo/b",
            "198.19.0.2",
            "198.18.252.9",
            "198.18.1.2",
        )])
        .unwrap();
        let l = list();
        assert!(l.contains("198.19.0.2 . tcp . 80 . 0-719"), "{l}");
        assert!(l.contains("198.18.1.2 . 198.18.1.2"), "{l}");
        p.update(vec![("demo/b".into(), vec![])]).unwrap();
        assert!(!list().contains("198.18.1.2 . 198.18.1.2"));
    })
    .join()
    .unwrap();
}

#[test]
fn libnftables_runs_transactions_and_reports_errors() {
    assert!(
        nix_is_root(),
        "this test makes a network namespace: run it as root"
    );
    std::thread::spawn(|| {
        // A thread's own network namespace, gone when the thread ends.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let mut nft = orc_proxy::libnft::Nft::open().expect("libnftables.so.1 (apt: libnftables1)");
        nft.run("add table ip orc-t\nadd set ip orc-t s { type ipv4_addr; }\n")
            .unwrap();
        let e = nft
            .run("add element ip orc-t nosuch { 198.18.0.1 }\n")
            .unwrap_err();
        assert!(e.contains("nosuch") || e.contains("No such file"), "{e}");
        // A failed transaction leaves nothing half done, and the next works.
        let e = nft
            .run("add element ip orc-t s { 198.18.0.1 }\nadd element ip orc-t nosuch { 198.18.0.2 }\n")
            .unwrap_err();
        assert!(!e.is_empty());
        nft.run("add element ip orc-t s { 198.18.0.3 }\ndelete element ip orc-t s { 198.18.0.3 }\nadd element ip orc-t s { 198.18.0.4 }\n")
            .unwrap();
        let o = Command::new("nft")
            .args(["list", "set", "ip", "orc-t", "s"])
            .output()
            .unwrap();
        let l = String::from_utf8_lossy(&o.stdout);
        assert!(l.contains("198.18.0.4") && !l.contains("198.18.0.1"), "{l}");
    })
    .join()
    .unwrap();
}
