//! orc's benchmark harness. `writes`: write throughput and latency of a 3-master
//! orc cluster against a 3-member etcd cluster started side by side on this
//! machine, same value size, same concurrency, one run. Both fsync every write.
//!
//! Every process it starts is killed when it ends (also on error).
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use orc_api::request::Request;
use orc_client::Client;
use serde_json::json;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod dns;
mod ingress;
mod pods;
mod services;
mod startup;

#[derive(Parser)]
#[command(about = "orc benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// ConfigMap writes to 3 orc masters vs key writes to 3 etcd members.
    Writes {
        /// Concurrent clients, comma-separated (1 is run three times: at each
        /// system's leader, at a follower, and at a follower that forwards
        /// every write: orc's client then does not go to the leader itself).
        #[arg(long, default_value = "1,64,256")]
        clients: String,
        /// Seconds of load per system and concurrency.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Bytes in each written value.
        #[arg(long, default_value_t = 256)]
        value_bytes: usize,
        /// The orc binary (default: next to this one).
        #[arg(long)]
        orc_bin: Option<PathBuf>,
        /// The etcd binary.
        #[arg(long, default_value = "/usr/bin/etcd")]
        etcd_bin: PathBuf,
        /// Only orc (no etcd comparison).
        #[arg(long)]
        skip_etcd: bool,
        /// Many clients: all at each system's leader, instead of a third at
        /// each member.
        #[arg(long)]
        all_at_leader: bool,
        /// Extra flags for every `orc master` (repeatable), e.g. --orc-arg=--heartbeat-ms=100.
        #[arg(long = "orc-arg", allow_hyphen_values = true)]
        orc_args: Vec<String>,
        /// Keep the data dirs and logs (printed at the end).
        #[arg(long)]
        keep: bool,
    },
    /// Scheduling throughput: simulated nodes and Deployments on 3 masters; pods/s
    /// from creation to Running and creation-to-bound latency.
    Pods {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
        /// The pods are split evenly over this many Deployments.
        #[arg(long, default_value_t = 10)]
        deployments: usize,
        #[arg(long)]
        orc_bin: Option<PathBuf>,
        #[arg(long = "orc-arg", allow_hyphen_values = true)]
        orc_args: Vec<String>,
        #[arg(long)]
        keep: bool,
    },
    /// Service data path: req/s and p99 through a ClusterIP and a NodePort
    /// against the same nginx backends by pod IP (wrk), then programming
    /// latency and first-request latency at 1,000 and 10,000 Services.
    /// Needs root, wrk, nginx-light, curl.
    Services {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Table sizes (Services of 2 endpoints each), comma-separated.
        #[arg(long, default_value = "1000,10000")]
        sizes: String,
        /// Endpoint changes timed per size.
        #[arg(long, default_value_t = 200)]
        changes: usize,
    },
    /// L7 ingress against nginx as a reverse proxy to the same backends:
    /// requests/s and p99 (wrk, keepalive), then failed requests across
    /// configuration updates under load. Needs wrk, nginx and curl.
    Ingress {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 100)]
        updates: usize,
        /// Worker threads of orc's ingress and nginx's worker processes
        /// (default: one per CPU, both).
        #[arg(long)]
        workers: Option<usize>,
        /// The orc binary (default: next to this one).
        #[arg(long)]
        orc_bin: Option<PathBuf>,
    },
    /// The ingress bench's reference: Pingora's own proxy with no routing,
    /// balancing or headers of orc's, on the proxy settings `orc ingress`
    /// uses. Started by `ingress`; runs until stopped.
    #[command(hide = true)]
    BarePingora {
        #[arg(long)]
        listen: String,
        /// Backend addresses, comma-separated (taken in turn).
        #[arg(long)]
        backends: String,
        #[arg(long)]
        threads: usize,
    },
    /// Cluster DNS against unbound: QPS and latency with dnsperf. Needs
    /// dnsperf and unbound.
    Dns {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Pod startup: create -> Running of N pods on one real node agent
    /// (`orc up --nodes 1`), and create/start/delete of a busybox container
    /// through orc's libcontainer path against runc. Needs root.
    Startup {
        /// Pods of the end-to-end part and containers of the runtime
        /// burst (0: the runtime path alone).
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// Pods created at once.
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        /// Pods created per second (0: as fast as the API answers).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Runtime-path runs per runtime.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        #[arg(long)]
        orc_bin: Option<PathBuf>,
        #[arg(long, default_value = "/usr/sbin/runc")]
        runc: PathBuf,
    },
}

/// Wait up to 20 s until something listens on `addr`.
pub(crate) fn wait_port(addr: &str, what: &str) -> Result<()> {
    let sa: std::net::SocketAddr = addr.parse()?;
    let t = Instant::now();
    while std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            anyhow::bail!("{what} at {addr} did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Stop a child the way its own tools do (SIGTERM: nginx's master then
/// stops its workers; SIGKILL would orphan them, still listening), then
/// SIGKILL after 5 s, and reap it.
pub(crate) fn stop_child(c: &mut Child) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    if kill(pid, Signal::SIGTERM).is_ok() {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if c.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Child processes killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    Ok(std::fs::File::create(dir.join(name))?)
}

async fn start_orc(
    bin: &Path,
    extra: &[String],
    dir: &Path,
    procs: &mut Procs,
) -> Result<Vec<String>> {
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let initial: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    for (i, a) in addrs.iter().enumerate() {
        let log = log_file(dir, &format!("orc-{}.log", i + 1))?;
        let child = Command::new(bin)
            .args([
                "master",
                "--id",
                &(i + 1).to_string(),
                "--listen",
                a,
                "--initial-cluster",
                &initial.join(","),
            ])
            .arg("--data-dir")
            .arg(dir.join(format!("orc-{}", i + 1)))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        procs.0.push(child);
    }
    let c = Client::new(addrs.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = c
            .call(&Request::Get {
                resource: "namespaces".into(),
                namespace: String::new(),
                name: "default".into(),
            })
            .await
            .is_ok();
        if ok {
            return Ok(addrs);
        }
        if Instant::now() > deadline {
            bail!("orc did not become ready; logs in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_etcd(bin: &Path, dir: &Path, procs: &mut Procs) -> Result<Vec<String>> {
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let initial: Vec<String> = peer
        .iter()
        .enumerate()
        .map(|(i, p)| format!("e{}=http://127.0.0.1:{p}", i + 1))
        .collect();
    for i in 0..3 {
        let log = log_file(dir, &format!("etcd-{}.log", i + 1))?;
        let child = Command::new(bin)
            .args(["--name", &format!("e{}", i + 1)])
            .arg("--data-dir")
            .arg(dir.join(format!("etcd-{}", i + 1)))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args([
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "orc-bench",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (apt install etcd-server)", bin.display()))?;
        procs.0.push(child);
    }
    let eps: Vec<String> = client
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect(&eps, None).await {
            if c.put("/bench/ready", "1", None).await.is_ok() {
                return Ok(eps);
            }
        }
        if Instant::now() > deadline {
            bail!("etcd did not become ready; logs in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Stats {
    writes: usize,
    errors: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn stats(mut lat: Vec<Duration>, errors: usize, elapsed: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        writes: lat.len(),
        errors,
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

/// `clients` tasks writing for `secs`; `write(task, seq)` performs one write.
async fn load<F, Fut>(clients: usize, secs: u64, write: F) -> Stats
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let write = Arc::new(write);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..clients {
        let write = write.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut seq) = (Vec::new(), 0, 0);
            while Instant::now() < end {
                seq += 1;
                let t0 = Instant::now();
                if write(t, seq).await {
                    lat.push(t0.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        all.extend(l);
        errors += e;
    }
    stats(all, errors, start.elapsed())
}

async fn orc_load(
    addrs: &[String],
    clients: usize,
    secs: u64,
    value: Arc<String>,
    round: usize,
    to_leader: bool,
) -> Stats {
    // One connection per master; client task i starts at master i % 3.
    let conns: Vec<Arc<Client>> = (0..addrs.len())
        .map(|i| {
            Arc::new(
                Client::new(addrs[i..].iter().chain(&addrs[..i]).cloned().collect())
                    .writes_to_leader(to_leader),
            )
        })
        .collect();
    load(clients, secs, move |t, seq| {
        let c = conns[t % conns.len()].clone();
        let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("b{round}-{t}-{seq}"), "namespace": "default"}, "data": {"v": value.as_str()}});
        async move {
            match c.call(&Request::Create { object: obj, namespace: None }).await {
                Ok(_) => true,
                Err(e) => {
                    static SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                    if SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 3 {
                        eprintln!("  orc write failed: {e}");
                    }
                    false
                }
            }
        }
    })
    .await
}

async fn etcd_load(
    eps: &[String],
    clients: usize,
    secs: u64,
    value: Arc<String>,
    round: usize,
) -> Result<Stats> {
    let mut conns = Vec::new();
    for e in eps {
        conns.push(
            etcd_client::Client::connect([e.as_str()], None)
                .await?
                .kv_client(),
        );
    }
    Ok(load(clients, secs, move |t, seq| {
        let mut c = conns[t % conns.len()].clone();
        let key = format!("/registry/configmaps/default/b{round}-{t}-{seq}");
        let value = value.clone();
        async move { c.put(key, value.as_bytes(), None).await.is_ok() }
    })
    .await)
}

/// orc's masters, the leader first (by `cluster status`).
async fn orc_leader_first(addrs: &[String]) -> Result<Vec<String>> {
    let status = Client::new(addrs.to_vec())
        .call(&Request::ClusterStatus)
        .await
        .map_err(|e| anyhow::anyhow!("orc cluster status: {e}"))?;
    let leader = status["leader"].as_u64().context("orc: no leader")?;
    let addr = status["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"].as_u64() == Some(leader)))
        .and_then(|m| m["address"].as_str())
        .context("orc: the leader's address")?;
    Ok(leader_first(addrs, addr))
}

/// etcd's members, the leader first (by each member's status).
async fn etcd_leader_first(eps: &[String]) -> Result<Vec<String>> {
    for e in eps {
        let st = etcd_client::Client::connect([e.as_str()], None)
            .await?
            .maintenance_client()
            .status()
            .await?;
        if st.header().map(|h| h.member_id()) == Some(st.leader()) {
            return Ok(leader_first(eps, e));
        }
    }
    bail!("etcd: no member says it is the leader")
}

/// `all`, starting with `leader`, the others in their order.
fn leader_first(all: &[String], leader: &str) -> Vec<String> {
    let mut v: Vec<String> = all.iter().filter(|a| *a != leader).cloned().collect();
    v.insert(0, leader.to_string());
    v
}

/// Every `resource` object in the cluster (a List through any master).
async fn list_all(client: &Client, resource: &str) -> Result<serde_json::Value> {
    Ok(client
        .call(&Request::List {
            resource: resource.into(),
            namespace: None,
            label_selector: String::new(),
            field_selector: String::new(),
        })
        .await?)
}

/// The CPUs this process may run on.
fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU time (user + system, clock ticks) the processes have used so far.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|stat| {
            // Fields after the command name (which is in parentheses): utime is the
            // 12th and stime the 13th of them.
            let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

/// Microseconds of CPU per write, from clock ticks (100 per second on Linux).
fn cpu_per_write(ticks: u64, writes: usize) -> String {
    if writes == 0 {
        return "-".into();
    }
    format!("{:.0}", ticks as f64 * 10_000.0 / writes as f64)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Writes {
            clients,
            seconds,
            value_bytes,
            orc_bin,
            etcd_bin,
            skip_etcd,
            all_at_leader,
            orc_args,
            keep,
        } => {
            writes(
                clients,
                seconds,
                value_bytes,
                orc_bin,
                etcd_bin,
                skip_etcd,
                all_at_leader,
                orc_args,
                keep,
            )
            .await
        }
        Cmd::Pods {
            nodes,
            pods,
            deployments,
            orc_bin,
            orc_args,
            keep,
        } => pods::run(nodes, pods, deployments, orc_bin, orc_args, keep).await,
        Cmd::Startup {
            pods,
            concurrency,
            rate,
            runs,
            orc_bin,
            runc,
        } => startup::run(pods, concurrency, rate, runs, orc_bin, runc).await,
        Cmd::Services {
            seconds,
            connections,
            rounds,
            sizes,
            changes,
        } => {
            let sizes: Vec<usize> = sizes
                .split(',')
                .map(|s| s.trim().parse().with_context(|| format!("--sizes: {s}")))
                .collect::<Result<_>>()?;
            services::bench(seconds, connections, rounds, &sizes, changes)
        }
        Cmd::Dns {
            services,
            seconds,
            clients,
            rounds,
        } => dns::bench(services, seconds, clients, rounds).await,
        Cmd::BarePingora {
            listen,
            backends,
            threads,
        } => ingress::bare_pingora(&listen, &backends, threads),
        Cmd::Ingress {
            seconds,
            connections,
            rounds,
            updates,
            workers,
            orc_bin,
        } => ingress::bench(
            orc_bin_or_default(orc_bin)?,
            seconds,
            connections,
            rounds,
            updates,
            workers,
        ),
    }
}

fn orc_bin_or_default(orc_bin: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match orc_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("bin dir")?
            .join("orc"),
    })
}

#[allow(clippy::too_many_arguments)]
async fn writes(
    clients: String,
    seconds: u64,
    value_bytes: usize,
    orc_bin: Option<PathBuf>,
    etcd_bin: PathBuf,
    skip_etcd: bool,
    all_at_leader: bool,
    orc_args: Vec<String>,
    keep: bool,
) -> Result<()> {
    let levels: Vec<usize> = clients
        .split(',')
        .map(|s| s.trim().parse().context("--clients: numbers"))
        .collect::<Result<_>>()?;
    let orc_bin = orc_bin_or_default(orc_bin)?;
    let dir = tempfile::Builder::new().prefix("orc-bench-").tempdir()?;
    let mut procs = Procs(Vec::new());
    let orc = start_orc(&orc_bin, &orc_args, dir.path(), &mut procs).await?;
    let etcd = if skip_etcd {
        None
    } else {
        Some(start_etcd(&etcd_bin, dir.path(), &mut procs).await?)
    };
    // Client task i starts at member i % 3 of this order. With many clients
    // each member gets a third of them; a single client is run at the leader
    // and at a follower, in both systems alike (the first member of each need
    // not be its leader: orc's never was, etcd's sometimes). orc's client
    // sends writes to the leader once it has learned which master that is;
    // the "forwarded" run turns that off, so a follower forwards every write,
    // as etcd's followers do for its client.
    let orc = orc_leader_first(&orc).await?;
    let etcd = match etcd {
        Some(eps) => Some(etcd_leader_first(&eps).await?),
        None => None,
    };
    let runs: Vec<(usize, &str)> = levels
        .iter()
        .flat_map(|&n| match n {
            1 => vec![(1, "leader"), (1, "follower"), (1, "follower, forwarded")],
            n => vec![(n, "")],
        })
        .collect();
    let value = Arc::new("x".repeat(value_bytes));
    println!("writes of {value_bytes}-byte values, {seconds} s per run, 3 members each on 127.0.0.1, fsync on; orc: {}", orc_bin.display());
    println!();
    println!("| clients | orc writes/s | orc p50 ms | orc p99 ms | orc CPU µs/write | etcd writes/s | etcd p50 ms | etcd p99 ms | etcd CPU µs/write | orc/etcd throughput | client CPU µs/write, orc / etcd |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // This process is the clients of both systems: its CPU during each run.
    let me = [std::process::id()];
    // The first three processes are orc's masters, the rest etcd's members.
    let orc_pids: Vec<u32> = procs.0.iter().take(3).map(Child::id).collect();
    let etcd_pids: Vec<u32> = procs.0.iter().skip(3).map(Child::id).collect();
    for (round, &(n, at)) in runs.iter().enumerate() {
        // A follower first: the leader's successor in the order.
        let rotated = |v: &[String]| {
            let mut v = v.to_vec();
            if at.starts_with("follower") {
                v.rotate_left(1);
            }
            v
        };
        let at = if at.is_empty() && all_at_leader {
            "leader"
        } else {
            at
        };
        let label = if at.is_empty() {
            n.to_string()
        } else {
            format!("{n} (at the {at})")
        };
        let orc = rotated(&orc);
        let etcd = etcd.as_deref().map(rotated);
        // At the leader: the leader alone, for every client task.
        let (orc, etcd) = if at == "leader" {
            (orc[..1].to_vec(), etcd.map(|e| e[..1].to_vec()))
        } else {
            (orc, etcd)
        };
        let (t0, c0) = (cpu_ticks(&orc_pids), cpu_ticks(&me));
        let route = !at.ends_with("forwarded");
        let o = orc_load(&orc, n, seconds, value.clone(), round, route).await;
        let orc_cpu = cpu_per_write(cpu_ticks(&orc_pids) - t0, o.writes);
        let orc_client_cpu = cpu_per_write(cpu_ticks(&me) - c0, o.writes);
        let (t0, c0) = (cpu_ticks(&etcd_pids), cpu_ticks(&me));
        let e = match &etcd {
            Some(eps) => Some(etcd_load(eps, n, seconds, value.clone(), round).await?),
            None => None,
        };
        let etcd_cpu = e
            .as_ref()
            .map(|e| cpu_per_write(cpu_ticks(&etcd_pids) - t0, e.writes))
            .unwrap_or_else(|| "-".into());
        let etcd_client_cpu = e
            .as_ref()
            .map(|e| cpu_per_write(cpu_ticks(&me) - c0, e.writes))
            .unwrap_or_else(|| "-".into());
        let (ew, ep50, ep99, ratio) = match &e {
            Some(e) => (
                format!("{:.0}", e.per_sec),
                ms(e.p50),
                ms(e.p99),
                format!("{:.2}x", o.per_sec / e.per_sec),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {label} | {:.0} | {} | {} | {orc_cpu} | {ew} | {ep50} | {ep99} | {etcd_cpu} | {ratio} | {orc_client_cpu} / {etcd_client_cpu} |",
            o.per_sec,
            ms(o.p50),
            ms(o.p99)
        );
        let errors = o.errors + e.as_ref().map(|e| e.errors).unwrap_or(0);
        if errors > 0 {
            eprintln!(
                "  ({n} clients: {} orc errors, {} etcd errors; {} + {} writes)",
                o.errors,
                e.as_ref().map(|e| e.errors).unwrap_or(0),
                o.writes,
                e.as_ref().map(|e| e.writes).unwrap_or(0)
            );
        }
    }
    drop(procs);
    if keep {
        println!("data and logs kept in {}", dir.keep().display());
    }
    Ok(())
}
