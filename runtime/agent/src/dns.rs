//! The node's cluster DNS: `orc node-dns`, a process of the agent's that
//! listens on the pod bridge address (what pods' resolv.conf names), keeps
//! its own watch cache of Services and EndpointSlices, and feeds the zone of
//! `orc_dns`. It runs apart from the agent, like the container shims, so
//! that names keep resolving while the agent restarts; the agent starts it,
//! finds it again after a restart, and `--reset` stops it.
use crate::informer::Cache;
use crate::services::{Index, SERVICES, SLICES};
use orc_controllers::Api;
use orc_dns::{service_records, Zone};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast::error::RecvError;

fn records(cache: &Cache, idx: &Index, key: &str, domain: &str) -> Vec<(String, orc_dns::Data)> {
    let Some((svc, slices)) = idx.service(cache, key) else {
        return Vec::new();
    };
    let refs: Vec<&serde_json::Value> = slices.iter().map(|s| s.as_ref()).collect();
    service_records(&svc, &refs, domain)
}

/// Keep `zone` in step with the cache until the task is dropped.
async fn feed(cache: Arc<Cache>, zone: Arc<RwLock<Zone>>, domain: String) {
    let mut rx = cache.subscribe();
    cache.wait_synced(2).await;
    let mut idx = Index::default();
    let mut full = true;
    loop {
        if full {
            idx = Index::rebuild(&cache);
            let mut z = Zone::new(&domain);
            for s in cache.list(SERVICES) {
                let k = crate::informer::key_of(&s);
                z.set_service(&k, records(&cache, &idx, &k, &domain));
            }
            tracing::info!("dns zone {domain}: {} services", z.services());
            *zone.write().unwrap_or_else(|e| e.into_inner()) = z;
            full = false;
        }
        let first = rx.recv().await;
        if first == Err(RecvError::Closed) {
            return;
        }
        let Some(dirty) = crate::services::batch(first, &mut rx, &cache, &mut idx) else {
            full = true;
            continue;
        };
        let mut z = zone.write().unwrap_or_else(|e| e.into_inner());
        for k in dirty {
            let r = records(&cache, &idx, &k, &domain);
            z.set_service(&k, r);
        }
    }
}

/// Run the DNS server (the `orc node-dns` process) until it is killed.
pub async fn serve(
    api: Arc<dyn Api>,
    listen: SocketAddr,
    domain: String,
    upstreams: Vec<SocketAddr>,
) -> std::io::Result<()> {
    let cache = Cache::new();
    for r in [SERVICES, SLICES] {
        tokio::spawn(crate::informer::run(api.clone(), cache.clone(), r));
    }
    let zone = Arc::new(RwLock::new(Zone::new(&domain)));
    tokio::spawn(feed(cache, zone.clone(), domain));
    tracing::info!("cluster DNS on {listen}, upstream {upstreams:?}");
    orc_dns::serve(orc_dns::Handler { zone, upstreams }, listen).await
}

fn pid_file(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("dns.pid")
}

/// The pid of this data directory's DNS process, if it runs and listens on `listen`.
fn running(data_dir: &Path, listen: Option<&str>) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(data_dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let ours =
        args.iter().any(|a| a == "node-dns") && listen.is_none_or(|l| args.iter().any(|a| a == l));
    // Just forked by this agent and not yet exec'd: it shows our command line.
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
        });
    let our_child = ppid == Some(std::process::id())
        && std::fs::read("/proc/self/cmdline").ok() == Some(cmdline.clone());
    (ours || our_child).then_some(pid)
}

/// Start the DNS process unless one for `listen` already runs.
pub fn ensure(cfg: &crate::Config, listen: SocketAddr) -> std::io::Result<()> {
    // One caller at a time: two would both find none running and start two.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let data_dir = cfg.data_dir.as_path();
    let l = listen.to_string();
    if running(data_dir, Some(&l)).is_some() {
        return Ok(());
    }
    stop(data_dir);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("dns.log"))?;
    let mut cmd = std::process::Command::new(&cfg.exe);
    cmd.args([
        "node-dns",
        "--master",
        &cfg.masters,
        "--listen",
        &l,
        "--cluster-domain",
        &cfg.cluster_domain,
    ]);
    if !cfg.dns_upstream.is_empty() {
        cmd.args(["--upstream", &cfg.dns_upstream]);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session: the agent's death (or its terminal's) leaves it be.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    std::fs::write(pid_file(data_dir), child.id().to_string())?;
    tracing::info!("started cluster DNS on {listen} (pid {})", child.id());
    // Reap it if it ends while the agent lives.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(())
}

/// Stop this data directory's DNS process (a reset).
pub fn stop(data_dir: &Path) {
    if let Some(pid) = running(data_dir, None) {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let _ = std::fs::remove_file(pid_file(data_dir));
}
