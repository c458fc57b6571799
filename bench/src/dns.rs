//! Cluster DNS: queries per second and latency of orc's DNS server (the
//! node's `orc_dns` zone and hickory-server handler, fed with N Services
//! exactly as the agent feeds it) against Debian's unbound serving the same
//! names as local data, both on loopback, measured by dnsperf with the same
//! query file and settings in one run. Needs dnsperf and unbound.
use crate::startup::pct;
use anyhow::{bail, Context, Result};
use orc_dns::{service_records, Handler, Zone};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::Duration;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 1, 0)) + i as u32)
}

/// One A question over UDP; true when the answer has records.
fn answers(addr: SocketAddr, name: &str) -> bool {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(300)));
    let mut buf = [0u8; 512];
    sock.send_to(&q, addr).is_ok()
        && sock
            .recv(&mut buf)
            .is_ok_and(|n| n > 12 && buf[3] & 0x0f == 0 && u16::from_be_bytes([buf[6], buf[7]]) > 0)
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Perf {
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
    lost: u64,
    answers: u64,
}

fn dnsperf(addr: SocketAddr, queries: &std::path::Path, secs: u64, clients: usize) -> Result<Perf> {
    let o = Command::new("dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(queries)
        .args([
            "-l",
            &secs.to_string(),
            "-c",
            &clients.to_string(),
            "-q",
            "200",
            "-v",
        ])
        .stderr(Stdio::null())
        .output()
        .context("dnsperf (apt-get install dnsperf)")?;
    let text = String::from_utf8_lossy(&o.stdout);
    let mut lat = Vec::new();
    let mut p = Perf {
        qps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        lost: 0,
        answers: 0,
    };
    for l in text.lines() {
        let t = l.trim();
        // "> NOERROR name A 0.000123" per response
        if let Some(rest) = t.strip_prefix("> ") {
            p.answers += 1;
            if let Some(s) = rest
                .split_whitespace()
                .last()
                .and_then(|v| v.parse::<f64>().ok())
            {
                lat.push(s * 1000.0);
            }
        } else if let Some(v) = t.strip_prefix("Queries per second:") {
            p.qps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("Queries lost:") {
            p.lost = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    lat.sort_by(f64::total_cmp);
    p.p50_ms = pct(&lat, 0.5);
    p.p99_ms = pct(&lat, 0.99);
    Ok(p)
}

pub async fn bench(services: usize, seconds: u64, clients: usize, rounds: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The same names for both: one ClusterIP Service each.
    let mut zone = Zone::new("cluster.local");
    let mut local_data = String::new();
    for i in 0..services {
        let svc = json!({"metadata": {"namespace": "bench", "name": format!("svc-{i}")},
            "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": 80}]}});
        zone.set_service(
            &format!("bench/svc-{i}"),
            service_records(&svc, &[], "cluster.local"),
        );
        local_data.push_str(&format!(
            "  local-data: \"svc-{i}.bench.svc.cluster.local. 5 IN A {}\"\n",
            vip(i)
        ));
    }
    let queries = dir.path().join("queries");
    let mut q = String::new();
    for k in 0..10_000usize {
        q.push_str(&format!(
            "svc-{}.bench.svc.cluster.local A\n",
            (k * 7919) % services
        ));
    }
    std::fs::write(&queries, q)?;
    let orc_addr: SocketAddr = format!("127.0.0.1:{}", crate::free_port()).parse()?;
    let unbound_addr: SocketAddr = format!("127.0.0.1:{}", crate::free_port()).parse()?;
    let handler = Handler {
        zone: Arc::new(RwLock::new(zone)),
        upstreams: vec![],
    };
    let server = tokio::spawn(orc_dns::serve(handler, orc_addr));
    let threads = crate::num_cpus();
    let conf = dir.path().join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: {}\n  port: {}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  num-threads: {threads}\n  so-reuseport: yes\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  verbosity: 0\n  local-zone: \"cluster.local.\" static\n{local_data}remote-control:\n  control-enable: no\n",
            unbound_addr.ip(),
            unbound_addr.port(),
            d = dir.path().display()
        ),
    )?;
    let _unbound = Kill(
        Command::new("unbound")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("unbound (apt-get install unbound)")?,
    );
    // Both answer before the measurement starts.
    for addr in [orc_addr, unbound_addr] {
        let mut ok = false;
        for _ in 0..100 {
            if answers(addr, "svc-0.bench.svc.cluster.local") {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ok {
            bail!("no answer from the DNS server at {addr}");
        }
    }
    println!("# DNS: {services} Services, dnsperf -c {clients} -q 200, {seconds} s per run, {rounds} rounds; unbound with {threads} threads");
    println!("server        qps      p50 ms   p99 ms   lost");
    let mut sums = [0.0f64; 2];
    for _ in 0..rounds {
        for (i, (name, addr)) in [("orc", orc_addr), ("unbound", unbound_addr)]
            .into_iter()
            .enumerate()
        {
            let q2 = queries.clone();
            let p =
                tokio::task::spawn_blocking(move || dnsperf(addr, &q2, seconds, clients)).await??;
            if p.answers == 0 {
                bail!("{name}: no answers");
            }
            println!(
                "{name:<10} {:>8.0} {:>8.3} {:>8.3} {:>6}",
                p.qps, p.p50_ms, p.p99_ms, p.lost
            );
            sums[i] += p.qps / rounds as f64;
        }
    }
    println!(
        "orc/unbound {:.3}x qps (mean over rounds)",
        sums[0] / sums[1]
    );
    server.abort();
    Ok(())
}
