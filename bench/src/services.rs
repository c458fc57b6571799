//! Service data path: requests/s and p99 through a ClusterIP and through a
//! NodePort against the same two nginx backends by pod IP, in one run (wrk);
//! then the time to program one endpoint change with 1,000 and 10,000
//! Services in the table, and the first-request latency through a ClusterIP
//! at both sizes. The node is a network namespace with orc's real nftables
//! table, written by `orc_proxy::Proxy` (the agent's own code); backends and
//! client are namespaces on its bridge, the "outside" client one routed
//! through it. Everything lives in 198.18.200.0/23 and 198.19.0.0/16 and is
//! removed at the end, also on error. Needs root, wrk, nginx, curl.
use crate::startup::pct;
use anyhow::{bail, Context, Result};
use orc_proxy::{Backend, Proxy, Scheduler, VirtualServer};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const NODE: &str = "orcb-node";
const OUT: &str = "orcb-out";
const CLI: &str = "orcb-cli";
const EPS: [&str; 2] = ["orcb-ep1", "orcb-ep2"];
const VIP: &str = "198.19.0.1";
const NODE_PORT: u16 = 30080;
const DIRECT: &str = "pod IP (from a pod)";
const CLUSTER_IP: &str = "ClusterIP (from a pod)";
const CLUSTER_IP_NAT: &str = "ClusterIP, NAT (from a pod)";
const MIXED: &str = "ClusterIP, 2 endpoints";
const MIXED_NAT: &str = "ClusterIP, 2 endpoints, NAT";
const ROUTED: &str = "pod IP (routed, outside)";
const NODE_PORT_ROW: &str = "NodePort (outside)";

fn run(args: &[&str]) -> Result<()> {
    let s = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .status()
        .with_context(|| args[0].to_string())?;
    if !s.success() {
        bail!("{} failed", args.join(" "));
    }
    Ok(())
}

fn ip(ns: Option<&str>, args: &str) -> Result<()> {
    let mut v: Vec<&str> = vec!["ip"];
    if let Some(n) = ns {
        v.extend(["-n", n]);
    }
    v.extend(args.split_whitespace());
    run(&v)
}

/// Namespaces, links and processes made by the bench; removed on drop.
struct Lab {
    dir: tempfile::TempDir,
    procs: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            crate::stop_child(p);
        }
        for ns in [NODE, OUT, CLI, EPS[0], EPS[1]] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn setup() -> Result<Lab> {
    let mut lab = Lab {
        dir: tempfile::tempdir()?,
        procs: vec![],
    };
    for ns in [NODE, OUT, CLI, EPS[0], EPS[1]] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        ip(None, &format!("netns add {ns}"))?;
        ip(Some(ns), "link set lo up")?;
    }
    ip(Some(NODE), "link add orcb0 type bridge")?;
    ip(Some(NODE), "addr add 198.18.200.1/24 dev orcb0")?;
    ip(Some(NODE), "link set orcb0 up")?;
    for (i, (ns, addr)) in [
        (EPS[0], "198.18.200.2"),
        (EPS[1], "198.18.200.3"),
        (CLI, "198.18.200.10"),
    ]
    .into_iter()
    .enumerate()
    {
        ip(
            Some(NODE),
            &format!("link add orcbv{i} type veth peer name eth0 netns {ns}"),
        )?;
        ip(Some(NODE), &format!("link set orcbv{i} master orcb0 up"))?;
        ip(Some(ns), &format!("addr add {addr}/24 dev eth0"))?;
        ip(Some(ns), "link set eth0 up")?;
        ip(Some(ns), "route add default via 198.18.200.1")?;
    }
    ip(
        Some(NODE),
        &format!("link add orcbup type veth peer name eth0 netns {OUT}"),
    )?;
    ip(Some(NODE), "addr add 198.18.201.1/24 dev orcbup")?;
    ip(Some(NODE), "link set orcbup up")?;
    ip(Some(OUT), "addr add 198.18.201.2/24 dev eth0")?;
    ip(Some(OUT), "link set eth0 up")?;
    ip(Some(OUT), "route add 198.18.200.0/24 via 198.18.201.1")?;
    for sysctl in [
        "net.ipv4.ip_forward=1",
        "net.bridge.bridge-nf-call-iptables=1",
    ] {
        run(&["ip", "netns", "exec", NODE, "sysctl", "-q", "-w", sysctl])?;
    }
    for (i, ns) in EPS.iter().enumerate() {
        let conf = lab.dir.path().join(format!("nginx{i}.conf"));
        let d = lab.dir.path().display();
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx{i}.pid;\nerror_log {d}/nginx{i}.err;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 server {{ listen 8080 backlog=4096; location / {{ return 200 \"ep{i}\\n\"; }} }} }}\n"
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "nginx", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("nginx (apt-get install nginx-light)")?;
        lab.procs.push(child);
    }
    // The bench's own thread programs the node's table: enter the node.
    let f = std::fs::File::open(format!("/run/netns/{NODE}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    for addr in ["198.18.200.2:8080", "198.18.200.3:8080"] {
        crate::wait_port(addr, "nginx")?;
    }
    Ok(lab)
}

fn web() -> VirtualServer {
    let b = vec![
        Backend {
            ip: Ipv4Addr::new(198, 18, 200, 2),
            port: 8080,
        },
        Backend {
            ip: Ipv4Addr::new(198, 18, 200, 3),
            port: 8080,
        },
    ];
    VirtualServer {
        key: "bench/web/http".into(),
        proto: "tcp",
        cluster: Some((VIP.parse().unwrap(), 80)),
        external: vec![],
        node_port: Some(NODE_PORT),
        internal_backends: b.clone(),
        external_backends: b,
        external_local: false,
        affinity: None,
        scheduler: Scheduler::Random,
    }
}

/// The Service of backend `i` alone: ClusterIP 198.19.0.2+i, NodePort
/// 30081+i.
fn single(i: usize) -> VirtualServer {
    let mut v = web();
    v.key = format!("bench/web-{i}/http");
    v.cluster = Some((Ipv4Addr::new(198, 19, 0, 2 + i as u8), 80));
    v.node_port = Some(NODE_PORT + 1 + i as u16);
    v.internal_backends = vec![v.internal_backends[i]];
    v.external_backends = v.internal_backends.clone();
    v
}

fn single_url(i: usize) -> String {
    format!("http://198.19.0.{}/", 2 + i)
}

fn dummy(i: usize, gen: usize) -> (String, Vec<VirtualServer>) {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 1, 0)) + i as u32);
    let b = |n: usize| Backend {
        ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 202, 0)) + (n % 60_000) as u32),
        port: 8080,
    };
    let backends = vec![b(2 * i), b(2 * i + 1 + gen)];
    let key = format!("bench/svc-{i}");
    (
        key.clone(),
        vec![VirtualServer {
            key: format!("{key}/http"),
            proto: "tcp",
            cluster: Some((vip, 80)),
            external: vec![],
            node_port: None,
            internal_backends: backends.clone(),
            external_backends: backends,
            external_local: false,
            affinity: None,
            scheduler: Scheduler::Random,
        }],
    )
}

/// What one wrk run printed.
pub(crate) struct Wrk {
    pub rps: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Non-2xx responses and socket errors.
    pub errors: u64,
}

/// Read wrk's `--latency` summary.
pub(crate) fn parse_wrk(text: &str) -> Wrk {
    let mut w = Wrk {
        rps: 0.0,
        p99_ms: 0.0,
        requests: 0,
        errors: 0,
    };
    for l in text.lines() {
        let l = l.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("99%") {
            w.p99_ms = parse_ms(v).unwrap_or(0.0);
        } else if l.contains("requests in") {
            w.requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if l.starts_with("Non-2xx") || l.starts_with("Socket errors") {
            w.errors += l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    w
}

pub(crate) fn parse_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    for (suffix, mult) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0)] {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * mult);
        }
    }
    None
}

/// Two wrk processes at once (one per URL), from namespace `ns`.
fn wrk(ns: &str, urls: [&str; 2], conns: usize, secs: u64) -> Result<Wrk> {
    let children: Vec<Child> = urls
        .iter()
        .map(|u| {
            Command::new("ip")
                .args(["netns", "exec", ns, "wrk", "-t1"])
                .arg(format!("-c{}", conns / 2))
                .arg(format!("-d{secs}s"))
                .args(["--latency", u])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("wrk (apt-get install wrk)")
        })
        .collect::<Result<_>>()?;
    let mut out = Wrk {
        rps: 0.0,
        p99_ms: 0.0,
        requests: 0,
        errors: 0,
    };
    for c in children {
        let o = c.wait_with_output()?;
        let w = parse_wrk(&String::from_utf8_lossy(&o.stdout));
        out.rps += w.rps;
        out.p99_ms = out.p99_ms.max(w.p99_ms);
        out.requests += w.requests;
        out.errors += w.errors;
    }
    Ok(out)
}

/// Sequential new-connection requests through the ClusterIP: curl's own times.
fn first_requests(n: usize) -> Result<Vec<f64>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                CLI,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total}",
            ])
            .arg(format!("http://{VIP}/"))
            .output()
            .context("curl")?;
        let t: f64 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(f64::NAN);
        if !o.status.success() || t.is_nan() {
            bail!("a request through the ClusterIP failed");
        }
        v.push(t * 1000.0);
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

pub fn bench(
    seconds: u64,
    conns: usize,
    rounds: usize,
    sizes: &[usize],
    changes: usize,
) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (network namespaces, nftables)");
    }
    let _lab = setup()?;
    // The agent's connect-time balancer, acting for the client pod.
    let lb = orc_proxy::socklb::SockLb::attach().context("socket balancer (BPF)")?;
    let pods = lb.pods();
    let cookie =
        orc_proxy::socklb::netns_cookie(std::path::Path::new(&format!("/run/netns/{CLI}")))
            .context("netns cookie")?;
    let mut proxy = Proxy::new(Some("198.18.200.0/24".into())).with_socket_lb(lb);
    let mut services = vec![("bench/web".to_string(), vec![web()])];
    for i in 0..2 {
        services.push((format!("bench/web-{i}"), vec![single(i)]));
    }
    proxy.resync(services).map_err(anyhow::Error::msg)?;
    ip(Some(OUT), &format!("route add {VIP}/32 via 198.18.201.1"))?;
    println!("# Service throughput: wrk, {conns} connections in 2 processes, {seconds} s per run, {rounds} rounds");
    println!("path                          req/s    p99 ms  errors");
    let direct = ["http://198.18.200.2:8080/", "http://198.18.200.3:8080/"];
    // Each wrk process to one backend, directly or through a Service of its
    // own (one endpoint): the same connections on the same backends, only
    // the path differs. Then both processes through the one Service of two
    // endpoints, which mixes each process's connections over both backends.
    let own = [single_url(0), single_url(1)];
    let own = [own[0].as_str(), own[1].as_str()];
    let vip = format!("http://{VIP}/");
    let both = [vip.as_str(), vip.as_str()];
    let nps = [
        format!("http://198.18.201.1:{}/", NODE_PORT + 1),
        format!("http://198.18.201.1:{}/", NODE_PORT + 2),
    ];
    let nps = [nps[0].as_str(), nps[1].as_str()];
    let mut sums = std::collections::BTreeMap::<&str, (f64, f64)>::new();
    for _ in 0..rounds {
        for (name, ns, urls) in [
            (DIRECT, CLI, direct),
            (CLUSTER_IP, CLI, own),
            (CLUSTER_IP_NAT, CLI, own),
            (MIXED, CLI, both),
            (MIXED_NAT, CLI, both),
            (ROUTED, OUT, direct),
            (NODE_PORT_ROW, OUT, nps),
        ] {
            // The NAT rows: the client pod without the socket balancer, as
            // every pod is with `orc node --no-socket-lb`.
            if name.contains("NAT") {
                pods.remove(cookie)?;
            } else {
                pods.add(cookie)?;
            }
            let w = wrk(ns, urls, conns, seconds)?;
            println!(
                "{name:<28} {:>8.0} {:>8.2} {:>7}",
                w.rps, w.p99_ms, w.errors
            );
            let e = sums.entry(name).or_default();
            e.0 += w.rps / rounds as f64;
            e.1 = e.1.max(w.p99_ms);
        }
    }
    let r = |a: &str, b: &str| sums[a].0 / sums[b].0;
    println!(
        "ClusterIP/direct {:.3}x req/s (NAT rules alone: {:.3}x); two endpoints/direct {:.3}x (NAT: {:.3}x); NodePort/direct (routed) {:.3}x (means over rounds)",
        r(CLUSTER_IP, DIRECT),
        r(CLUSTER_IP_NAT, DIRECT),
        r(MIXED, DIRECT),
        r(MIXED_NAT, DIRECT),
        r(NODE_PORT_ROW, ROUTED)
    );
    pods.add(cookie)?;

    println!("\n# Programming latency: one endpoint change -> nft transaction committed");
    println!("services  resync ms  change p50 ms  change p99 ms  first request p50/p99 ms");
    for &n in sizes {
        let mut all: Vec<(String, Vec<VirtualServer>)> = (0..n).map(|i| dummy(i, 0)).collect();
        all.push(("bench/web".into(), vec![web()]));
        let t = Instant::now();
        proxy.resync(all).map_err(anyhow::Error::msg)?;
        let resync = t.elapsed().as_secs_f64() * 1000.0;
        let mut lat = Vec::with_capacity(changes);
        for k in 0..changes {
            let i = (k * 7919) % n;
            let t = Instant::now();
            proxy
                .update(vec![dummy(i, k + 1)])
                .map_err(anyhow::Error::msg)?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        lat.sort_by(f64::total_cmp);
        let first = first_requests(200)?;
        println!(
            "{n:>8} {resync:>10.1} {:>14.2} {:>14.2}  {:.3}/{:.3}",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&first, 0.5),
            pct(&first, 0.99)
        );
    }
    Ok(())
}
