//! L7 ingress: requests/s and p99 through `orc ingress` (Pingora) against
//! Debian's nginx as a reverse proxy to the same two nginx backends, same
//! wrk settings (keepalive on both sides), in one run, with Pingora's own
//! proxy and nothing of orc's (`bare-pingora`) beside them: the most any
//! ingress built on Pingora's proxy can reach; then failed requests
//! across 100 configuration updates under load (Ingress changes through the
//! API for orc, `nginx -s reload` for nginx). A one-master orc cluster feeds
//! the ingress; the backends are a selector-less Service with its own
//! EndpointSlice. Everything listens on 127.0.0.0/8 and is stopped at the
//! end, also on error. Needs wrk and nginx.
use crate::services::{parse_wrk, Wrk};
use crate::startup::pct;
use crate::wait_port;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BACKENDS: [&str; 2] = ["127.0.0.2:18081", "127.0.0.3:18081"];
const ORC: &str = "127.0.0.1:18080";
const NGINX: &str = "127.0.0.1:18090";
const BARE: &str = "127.0.0.1:18070";
const HOST: &str = "bench.test";

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            crate::stop_child(c);
        }
    }
}

fn spawn(cmd: &mut Command, log: &Path, what: &str) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| what.to_string())
}

fn nginx_conf(dir: &Path, name: &str, workers: usize, body: &str) -> PathBuf {
    let d = dir.display();
    let conf = dir.join(format!("{name}.conf"));
    let text = format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n{body}\n}}\n",
    );
    std::fs::write(&conf, text).expect("nginx conf");
    conf
}

/// The reverse proxy nginx: the same two backends, upstream keepalive on;
/// `extra` adds locations (a configuration change).
fn proxy_body(extra: usize) -> String {
    let mut locs = String::new();
    for i in 0..extra {
        locs.push_str(&format!(
            "location /extra{i} {{ proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n"
        ));
    }
    format!(
        "upstream backends {{ server {}; server {}; keepalive 64; }}\n\
         server {{ listen {NGINX} backlog=4096; server_name {HOST};\n\
         location / {{ proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection \"\"; \
         proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }}\n{locs}}}",
        BACKENDS[0], BACKENDS[1]
    )
}

fn ingress_yaml(extra: usize) -> String {
    let mut paths = String::new();
    for i in 0..extra {
        paths.push_str(&format!(
            "      - {{path: /extra{i}, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n"
        ));
    }
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: bench, namespace: default}}\n\
         spec:\n  ingressClassName: orc\n  rules:\n  - host: {HOST}\n    http:\n      paths:\n\
         \x20     - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n{paths}"
    )
}

fn orc_apply(orc: &Path, server: &str, yaml: &str) -> Result<()> {
    use std::io::Write;
    let mut c = Command::new(orc)
        .args(["--server", server, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    c.stdin
        .take()
        .context("stdin")?
        .write_all(yaml.as_bytes())?;
    let o = c.wait_with_output()?;
    if !o.status.success() {
        bail!("orc apply: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

fn wrk_start(url: &str, conns: usize, secs: u64) -> Result<Child> {
    Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
        ])
        .args(["-H", &format!("Host: {HOST}"), url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("wrk (apt-get install wrk)")
}

fn wrk_end(c: Child) -> Result<Wrk> {
    let o = c.wait_with_output()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let w = parse_wrk(&text);
    if w.requests == 0 {
        bail!("wrk made no requests:\n{text}");
    }
    Ok(w)
}

pub fn bench(
    orc: PathBuf,
    seconds: u64,
    connections: usize,
    rounds: usize,
    updates: usize,
    workers: Option<usize>,
) -> Result<()> {
    let workers = workers.unwrap_or_else(crate::num_cpus);
    for addr in [
        ORC,
        NGINX,
        BARE,
        BACKENDS[0],
        BACKENDS[1],
        "127.0.0.1:18254",
    ] {
        if std::net::TcpStream::connect(addr).is_ok() {
            bail!("{addr} is already in use (a bench left running?): the figures would not be this run's");
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("orc-bench-ing-")
        .tempdir()?;
    let d = dir.path();
    let mut procs = Procs(Vec::new());
    for (i, b) in BACKENDS.iter().enumerate() {
        let conf = nginx_conf(
            d,
            &format!("backend{i}"),
            1,
            &format!(
                "server {{ listen {b} backlog=4096; location / {{ return 200 \"ep{i}\\n\"; }} }}"
            ),
        );
        procs.0.push(spawn(
            Command::new("nginx").arg("-c").arg(&conf),
            &d.join(format!("backend{i}.log")),
            "nginx (apt-get install nginx-light)",
        )?);
    }
    let proxy_conf = nginx_conf(d, "proxy", workers, &proxy_body(0));
    procs.0.push(spawn(
        Command::new("nginx").arg("-c").arg(&proxy_conf),
        &d.join("proxy.log"),
        "nginx proxy",
    )?);
    procs.0.push(spawn(
        Command::new(std::env::current_exe()?)
            .args(["bare-pingora", "--listen", BARE])
            .args(["--backends", &BACKENDS.join(",")])
            .args(["--threads", &workers.to_string()]),
        &d.join("bare.log"),
        "bare Pingora proxy",
    )?);
    let port = crate::free_port();
    let master = format!("127.0.0.1:{port}");
    procs.0.push(spawn(
        Command::new(&orc)
            .args(["master", "--id", "1", "--listen", &master])
            .args(["--initial-cluster", &format!("1={master}")])
            .arg("--data-dir")
            .arg(d.join("m1")),
        &d.join("master.log"),
        "orc master",
    )?);
    wait_port(&master, "orc master")?;
    procs.0.push(spawn(
        Command::new(&orc)
            .args([
                "ingress", "--master", &master, "--http", ORC, "--https", "none",
            ])
            .args([
                "--metrics",
                "127.0.0.1:18254",
                "--threads",
                &workers.to_string(),
            ])
            .arg("--pid-file")
            .arg(d.join("ingress.pid"))
            .arg("--upgrade-sock")
            .arg(d.join("upgrade.sock"))
            .env("ORC_LOG", "warn"),
        &d.join("ingress.log"),
        "orc ingress",
    )?);
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 18081, protocol: TCP}}]\n\
         endpoints:\n- addresses: [{}]\n  conditions: {{ready: true}}\n- addresses: [{}]\n  conditions: {{ready: true}}\n",
        BACKENDS[0].split(':').next().unwrap_or(""),
        BACKENDS[1].split(':').next().unwrap_or("")
    );
    let t = Instant::now();
    loop {
        match orc_apply(&orc, &master, &format!("{svc}---\n{}", ingress_yaml(0))) {
            Ok(()) => break,
            Err(e) if t.elapsed() > Duration::from_secs(20) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    for (addr, what) in [
        (ORC, "orc ingress"),
        (NGINX, "nginx proxy"),
        (BARE, "bare Pingora proxy"),
    ] {
        wait_port(addr, what)?;
    }
    let t = Instant::now();
    loop {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-H", &format!("Host: {HOST}")])
            .arg(format!("http://{ORC}/"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!(
                "orc ingress never routed {HOST}; see {}",
                d.join("ingress.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    println!(
        "ingress: wrk -t2 -c{connections} -d{seconds}s, Host: {HOST}, 2 nginx backends, \
         keepalive on both sides, {workers} nginx workers and {workers} orc threads; \
         pingora: Pingora's proxy alone (no routing, balancing or headers of orc's; \
         orc's server settings)"
    );
    println!(
        "{:<8} {:>6} {:>12} {:>10} {:>8}",
        "proxy", "round", "req/s", "p99 ms", "errors"
    );
    let mut ratios = Vec::new();
    let mut against_bare = Vec::new();
    for round in 1..=rounds {
        let mut pair = Vec::new();
        for (name, addr) in [("nginx", NGINX), ("pingora", BARE), ("orc", ORC)] {
            let w = wrk_end(wrk_start(&format!("http://{addr}/"), connections, seconds)?)?;
            println!(
                "{name:<8} {round:>6} {:>12.0} {:>10.2} {:>8}",
                w.rps, w.p99_ms, w.errors
            );
            pair.push(w);
        }
        ratios.push((
            pair[2].rps / pair[0].rps,
            pair[2].p99_ms / pair[0].p99_ms.max(0.001),
        ));
        against_bare.push((pair[1].rps / pair[0].rps, pair[2].rps / pair[1].rps));
    }
    let mut rps: Vec<f64> = ratios.iter().map(|r| r.0).collect();
    let mut p99: Vec<f64> = ratios.iter().map(|r| r.1).collect();
    rps.sort_by(f64::total_cmp);
    p99.sort_by(f64::total_cmp);
    println!(
        "orc/nginx: req/s {:.2}x (median of {rounds} rounds), p99 {:.2}x",
        pct(&rps, 0.5),
        pct(&p99, 0.5)
    );
    let mut bare: Vec<f64> = against_bare.iter().map(|r| r.0).collect();
    let mut over: Vec<f64> = against_bare.iter().map(|r| r.1).collect();
    bare.sort_by(f64::total_cmp);
    over.sort_by(f64::total_cmp);
    println!(
        "pingora/nginx: req/s {:.2}x; orc/pingora: req/s {:.2}x (medians)",
        pct(&bare, 0.5),
        pct(&over, 0.5)
    );

    // Configuration updates under load.
    let secs = seconds.max(10);
    let gap = Duration::from_millis(secs * 1000 / (updates as u64 + 2));
    let w = wrk_start(&format!("http://{NGINX}/"), connections, secs)?;
    let t = Instant::now();
    for i in 0..updates {
        std::thread::sleep(gap);
        nginx_conf(d, "proxy", workers, &proxy_body(1 + i % 2));
        let o = Command::new("nginx")
            .arg("-c")
            .arg(&proxy_conf)
            .args(["-s", "reload"])
            .output()?;
        if !o.status.success() {
            bail!(
                "nginx -s reload: {}\n{}",
                String::from_utf8_lossy(&o.stderr),
                std::fs::read_to_string(d.join("proxy.err")).unwrap_or_default()
            );
        }
    }
    let nginx_took = t.elapsed();
    let nw = wrk_end(w)?;
    let w = wrk_start(&format!("http://{ORC}/"), connections, secs)?;
    let t = Instant::now();
    for i in 0..updates {
        std::thread::sleep(gap);
        orc_apply(&orc, &master, &ingress_yaml(1 + i % 2))?;
    }
    let orc_took = t.elapsed();
    let ow = wrk_end(w)?;
    println!(
        "{updates} updates under load: nginx (reloads, {:.1}s) {} of {} requests failed, {:.0} req/s; \
         orc (Ingress changes, {:.1}s) {} of {} failed, {:.0} req/s",
        nginx_took.as_secs_f64(),
        nw.errors,
        nw.requests,
        nw.rps,
        orc_took.as_secs_f64(),
        ow.errors,
        ow.requests,
        ow.rps
    );
    drop(procs);
    Ok(())
}

/// Pingora's proxy with nothing of orc's: every request goes to the next
/// backend in turn, unchanged. The ingress bench runs it beside nginx and
/// `orc ingress` so the figures show what Pingora itself costs.
struct Bare {
    backends: Vec<std::net::SocketAddr>,
    next: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl pingora::proxy::ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut pingora::proxy::Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<pingora::upstreams::peer::HttpPeer>> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.backends.len();
        let mut peer =
            pingora::upstreams::peer::HttpPeer::new(self.backends[i], false, String::new());
        // One keepalive pool per proxy thread, as `orc ingress` keeps them.
        peer.group_key = orc_ingress::proxy::thread_key();
        Ok(Box::new(peer))
    }
}

/// `orc-bench bare-pingora`: serve [`Bare`] on `listen` with the server
/// settings of `orc ingress` (`threads` runtimes without work stealing)
/// until stopped.
pub fn bare_pingora(listen: &str, backends: &str, threads: usize) -> Result<()> {
    let backends = backends
        .split(',')
        .map(|b| b.trim().parse().with_context(|| format!("--backends: {b}")))
        .collect::<Result<Vec<std::net::SocketAddr>>>()?;
    if backends.is_empty() {
        bail!("--backends: no address");
    }
    let listen = listen.to_string();
    // Pingora makes its own runtimes: not from inside this process's.
    let t = std::thread::spawn(move || {
        use pingora::server::configuration::{Opt, ServerConf};
        let conf = ServerConf {
            threads: threads.max(1),
            work_stealing: false,
            grace_period_seconds: Some(0),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        let mut server = pingora::server::Server::new_with_opt_and_conf(Opt::default(), conf);
        server.bootstrap();
        let mut svc = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            Bare {
                backends,
                next: Default::default(),
            },
            "bare",
        );
        svc.add_tcp(&listen);
        server.add_service(svc);
        server.run_forever()
    });
    let _ = t.join();
    bail!("the bare Pingora proxy stopped")
}
