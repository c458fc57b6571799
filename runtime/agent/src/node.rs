//! The node side of the agent: registration, Lease, status, the pod network
//! of this node (bridge, routes to other nodes), and the pod workers.
use crate::worker::{self, Shared};
use orc_api::request::{Request, WatchRequest};
use orc_api::{EventType, Reason};
use orc_controllers::util;
use orc_controllers::Api;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    /// None: the address of the interface with the default route.
    pub node_ip: Option<Ipv4Addr>,
    pub data_dir: PathBuf,
    /// The `orc` binary (its `shim` subcommand supervises containers).
    pub exe: PathBuf,
    /// The DNS server pods are given; empty: this node's own (`orc
    /// node-dns` on the pod bridge address).
    pub cluster_dns: String,
    /// The masters (HOST:PORT,...), for the node's DNS process.
    pub masters: String,
    /// The DNS process's upstream resolvers (`--upstream`); empty: the node's.
    pub dns_upstream: String,
    pub cluster_domain: String,
    /// First restart back-off (10 s in Kubernetes).
    pub backoff_base: f64,
    pub lease_every: Duration,
    pub status_every: Duration,
    pub labels: Vec<(String, String)>,
    pub bridge: String,
    /// The port of the agent's `orc.Node` service (logs, exec) on the node address.
    pub port: u16,
    /// Registries (HOST[:PORT]) pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The cluster's pod CIDR: traffic from pods to outside it is masqueraded.
    pub cluster_cidr: String,
    /// The Service proxy rewrites its whole table this often.
    pub proxy_resync: Duration,
    /// At most this many containers are being started at once; the others
    /// wait their turn, first come first served. A burst of pods then runs
    /// in the order it came rather than all of it together at the end,
    /// since starting a container is mostly CPU. 0: four per CPU.
    pub parallel_starts: usize,
    /// Balance pods' TCP connections to ClusterIPs when they connect (a BPF
    /// program on the cgroup root), besides the nftables rules.
    pub socket_lb: bool,
}

impl Config {
    /// [`Config::parallel_starts`], 0 resolved.
    pub fn parallel_starts(&self) -> usize {
        match self.parallel_starts {
            0 => 4 * cpus(),
            n => n.min(tokio::sync::Semaphore::MAX_PERMITS),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Api(#[from] orc_api::ApiError),
    #[error("{0}")]
    Net(#[from] orc_netlink::Error),
    #[error("{0}")]
    Other(String),
}

/// The node's pod network: its podCIDR and the addresses in use.
pub struct Ipam {
    pub base: u32,
    pub prefix: u8,
    used: BTreeSet<u32>,
}

impl Ipam {
    pub fn new(base: u32, prefix: u8) -> Self {
        Ipam {
            base,
            prefix,
            used: BTreeSet::new(),
        }
    }
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }
    /// The next free address (.0 is the network, .1 the bridge, the last the broadcast).
    pub fn alloc(&mut self) -> Option<Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix as u32);
        let off = (2..size.saturating_sub(1)).find(|o| !self.used.contains(o))?;
        self.used.insert(off);
        Some(Ipv4Addr::from(self.base + off))
    }
    pub fn claim(&mut self, ip: Ipv4Addr) -> bool {
        let off = u32::from(ip).wrapping_sub(self.base);
        if off >> (32 - self.prefix as u32) != 0 {
            return false;
        }
        self.used.insert(off)
    }
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip).wrapping_sub(self.base));
    }
}

/// The CPUs this machine gives the agent.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn capacity() -> (String, String) {
    let cpu = cpus();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    (cpu.to_string(), format!("{mem_kib}Ki"))
}

pub fn node_object(cfg: &Config) -> Value {
    let mut labels = json!({"kubernetes.io/hostname": cfg.name, "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64"});
    for (k, v) in &cfg.labels {
        labels[k] = json!(v);
    }
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": cfg.name, "labels": labels}, "spec": {}})
}

pub fn node_status(cfg: &Config, images: &[orc_image::Image]) -> Value {
    let now = orc_api::now_rfc3339();
    let (cpu, memory) = capacity();
    let res = json!({"cpu": cpu, "memory": memory, "pods": "110"});
    let images: Vec<Value> = images
        .iter()
        .map(|i| json!({"names": i.names.iter().chain(std::iter::once(&i.id)).collect::<Vec<_>>(), "sizeBytes": i.size}))
        .collect();
    json!({"capacity": res, "allocatable": res,
        "addresses": [{"type": "InternalIP", "address": cfg.node_ip.map(|i| i.to_string()).unwrap_or_default()}, {"type": "Hostname", "address": cfg.name}],
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "orc node agent is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now},
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": now, "lastTransitionTime": now},
            {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": now, "lastTransitionTime": now},
            {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "images": images,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.port}},
        "nodeInfo": {"kubeletVersion": concat!("orc-", env!("CARGO_PKG_VERSION")), "containerRuntimeVersion": "orc://libcontainer",
                     "operatingSystem": "linux", "architecture": "amd64"}})
}

async fn register(api: &Arc<dyn Api>, cfg: &Config) -> Result<(), Error> {
    match api
        .call(Request::Create {
            object: node_object(cfg),
            namespace: None,
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.reason == Reason::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn report_status(api: &Arc<dyn Api>, s: &Shared) -> Result<Value, Error> {
    let status = node_status(&s.cfg, &s.images.list());
    Ok(api
        .call(Request::Patch {
            resource: "nodes".into(),
            namespace: String::new(),
            name: s.cfg.name.clone(),
            patch: json!({"status": status}),
            status: true,
        })
        .await?)
}

/// Renew (or create) node `name`'s Lease in kube-node-lease.
pub async fn renew_lease(api: &Arc<dyn Api>, name: &str) -> Result<(), Error> {
    let now = util::rfc3339_micro(util::now_secs());
    let patch =
        json!({"spec": {"holderIdentity": name, "renewTime": now, "leaseDurationSeconds": 40}});
    let ns = orc_controllers::nodes::LEASE_NAMESPACE;
    let r = api
        .call(Request::Patch {
            resource: "leases".into(),
            namespace: ns.into(),
            name: name.into(),
            patch: patch.clone(),
            status: false,
        })
        .await;
    match r {
        Err(e) if e.reason == Reason::NotFound => {
            let mut lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": ns}});
            lease["spec"] = patch["spec"].clone();
            lease["spec"]["acquireTime"] = json!(now);
            api.call(Request::Create {
                object: lease,
                namespace: None,
            })
            .await?;
            Ok(())
        }
        r => r.map(|_| ()).map_err(Into::into),
    }
}

/// Set up the bridge once the node has a podCIDR.
async fn network(s: &Arc<Shared>, node: &Value) -> Result<(), Error> {
    let Some((base, bits)) = node["spec"]["podCIDR"]
        .as_str()
        .and_then(orc_controllers::nodes::parse_cidr)
    else {
        return Ok(());
    };
    {
        let ipam = s.ipam.lock().unwrap();
        if ipam
            .as_ref()
            .is_some_and(|i| i.base == base && i.prefix == bits)
        {
            return Ok(());
        }
    }
    let mut ipam = Ipam::new(base, bits);
    orc_netlink::enable_forwarding()?;
    bridge_netfilter();
    orc_netlink::ensure_bridge(&s.host, &s.cfg.bridge, ipam.gateway(), bits).await?;
    let pod_cidr = format!("{}/{bits}", Ipv4Addr::from(base));
    crate::nat::apply(&pod_cidr, &s.cfg.cluster_cidr, &s.cfg.bridge).map_err(Error::Other)?;
    // Addresses of pods this agent already runs.
    for ip in worker::recorded_ips(&s.pods_dir()) {
        ipam.claim(ip);
    }
    tracing::info!(
        "pod network {}/{} on bridge {}",
        Ipv4Addr::from(base),
        bits,
        s.cfg.bridge
    );
    *s.ipam.lock().unwrap() = Some(ipam);
    s.net_ready.send_replace(true);
    Ok(())
}

/// The address pods send DNS questions to.
pub fn dns_address(s: &Shared) -> Option<String> {
    if !s.cfg.cluster_dns.is_empty() {
        return Some(s.cfg.cluster_dns.clone());
    }
    let g = s.ipam.lock().unwrap().as_ref().map(|i| i.gateway())?;
    Some(g.to_string())
}

/// Keep this node's DNS process running (when pods are given the node's own).
fn node_dns(s: &Shared) {
    if !s.cfg.cluster_dns.is_empty() {
        return;
    }
    let Some(g) = s.ipam.lock().unwrap().as_ref().map(|i| i.gateway()) else {
        return;
    };
    if let Err(e) = crate::dns::ensure(&s.cfg, std::net::SocketAddr::from((g, 53))) {
        tracing::warn!("cluster DNS: {e}");
    }
}

/// Bridged pod-to-pod packets must pass the IP hooks, or a reply from a pod
/// to a pod on the same bridge skips the Service DNAT's reverse translation.
fn bridge_netfilter() {
    let f = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if !std::path::Path::new(f).exists() {
        let _ = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .status();
    }
    if let Err(e) = std::fs::write(f, "1") {
        tracing::warn!("{f}: {e} (Services reached from a pod on the same node may not answer)");
    }
}

/// Routes to the podCIDRs of the other nodes, through their addresses.
async fn routes(s: &Arc<Shared>, nodes: &[Value]) {
    for n in nodes {
        if util::name(n) == s.cfg.name {
            continue;
        }
        let Some((base, bits)) = n["spec"]["podCIDR"]
            .as_str()
            .and_then(orc_controllers::nodes::parse_cidr)
        else {
            continue;
        };
        let ip = n["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == "InternalIP")
            .and_then(|a| a["address"].as_str())
            .and_then(|a| a.parse::<Ipv4Addr>().ok());
        if let Some(via) = ip {
            if let Err(e) =
                orc_netlink::ensure_route(&s.host, Ipv4Addr::from(base), bits, via).await
            {
                tracing::warn!("route to {}: {e}", util::name(n));
            }
        }
    }
}

/// Run the agent until the process ends.
pub async fn run(api: Arc<dyn Api>, mut cfg: Config) -> Result<(), Error> {
    for d in ["pods", "rw", "images", "logs"] {
        std::fs::create_dir_all(cfg.data_dir.join(d))
            .map_err(|e| Error::Other(format!("{}: {e}", cfg.data_dir.join(d).display())))?;
    }
    for d in ["rw", "logs"] {
        crate::spread_subdirs(&cfg.data_dir.join(d));
    }
    crate::mount_run_dir(&cfg.data_dir).map_err(Error::Other)?;
    orc_netlink::bind_netns_dir(&crate::netns_dir(&cfg.data_dir))?;
    let host = orc_netlink::connect()?;
    if cfg.node_ip.is_none() {
        cfg.node_ip = Some(orc_netlink::default_address(&host).await?.ok_or_else(|| {
            Error::Other("no default route to take the node address from: give --node-ip".into())
        })?);
    }
    let (net_ready, _) = watch::channel(false);
    let lb = if cfg.socket_lb {
        match orc_proxy::socklb::SockLb::attach() {
            Ok(lb) => Some(lb),
            Err(e) => {
                tracing::warn!("socket balancer: {e}; Services go through the nftables rules only");
                None
            }
        }
    } else {
        None
    };
    let s = Arc::new(Shared {
        lb_pods: lb.as_ref().map(|l| l.pods()),
        runtime: crate::runtime(&cfg.data_dir, &cfg.exe),
        images: orc_image::Store::new(cfg.data_dir.join("images")),
        api: api.clone(),
        host,
        ipam: Mutex::new(None),
        net_ready,
        starts: tokio::sync::Semaphore::new(cfg.parallel_starts()),
        cfg,
    });
    // Register, with retries while the masters come up.
    let mut wait = Duration::from_millis(200);
    loop {
        match register(&api, &s.cfg).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!("registering node {}: {e}", s.cfg.name);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    let _ = renew_lease(&api, &s.cfg.name).await;
    if let Ok(node) = report_status(&api, &s).await {
        network(&s, &node).await?;
        node_dns(&s);
    }
    {
        let addr = std::net::SocketAddr::from((
            s.cfg.node_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            s.cfg.port,
        ));
        let s2 = s.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::server::serve(s2, addr).await {
                tracing::error!("serving logs and exec on {addr}: {e}");
            }
        });
    }
    tracing::info!(
        "node {} registered ({})",
        s.cfg.name,
        s.cfg.node_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)
    );
    {
        let (api, s) = (api.clone(), s.clone());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(s.cfg.lease_every);
            loop {
                t.tick().await;
                if let Err(e) = renew_lease(&api, &s.cfg.name).await {
                    tracing::warn!("lease: {e}");
                }
            }
        });
    }
    {
        let (api, s) = (api.clone(), s.clone());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(s.cfg.status_every);
            loop {
                t.tick().await;
                match report_status(&api, &s).await {
                    Ok(node) => {
                        if let Err(e) = network(&s, &node).await {
                            tracing::warn!("pod network: {e}");
                        }
                        node_dns(&s);
                    }
                    Err(e) => tracing::warn!("node status: {e}"),
                }
                if let Ok(list) = api
                    .call(Request::List {
                        resource: "nodes".into(),
                        namespace: None,
                        label_selector: String::new(),
                        field_selector: String::new(),
                    })
                    .await
                {
                    routes(
                        &s,
                        list["items"]
                            .as_array()
                            .map(|v| v.as_slice())
                            .unwrap_or(&[]),
                    )
                    .await;
                }
            }
        });
    }
    {
        let cache = crate::informer::Cache::new();
        for r in [crate::services::SERVICES, crate::services::SLICES] {
            tokio::spawn(crate::informer::run(api.clone(), cache.clone(), r));
        }
        let cidr = Some(s.cfg.cluster_cidr.clone()).filter(|c| !c.is_empty());
        tokio::spawn(crate::services::announce(
            cache.clone(),
            s.host.clone(),
            s.cfg.name.clone(),
            s.cfg.node_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        ));
        tokio::spawn(crate::services::run(
            cache,
            s.cfg.name.clone(),
            cidr,
            s.cfg.proxy_resync,
            lb,
        ));
    }
    pods(api, s).await
}

struct PodTask {
    tx: watch::Sender<Option<Value>>,
}

/// Keep one worker per pod bound here, fed with the latest object.
async fn pods(api: Arc<dyn Api>, s: Arc<Shared>) -> Result<(), Error> {
    let mut tasks: HashMap<String, PodTask> = HashMap::new();
    // Pods this agent ran before a restart: adopt them.
    for (uid, pod) in worker::recorded_pods(&s.pods_dir()) {
        let (tx, rx) = watch::channel(Some(pod));
        tokio::spawn(worker::run(s.clone(), uid.clone(), rx));
        tasks.insert(uid, PodTask { tx });
    }
    let selector = format!("spec.nodeName={}", s.cfg.name);
    loop {
        let list = match api
            .call(Request::List {
                resource: "pods".into(),
                namespace: None,
                label_selector: String::new(),
                field_selector: selector.clone(),
            })
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("list pods: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let listed: BTreeSet<String> = items.iter().map(|p| util::uid(p).to_string()).collect();
        for p in items {
            feed(&s, &mut tasks, p);
        }
        // Pods that are gone from the cluster.
        for (uid, t) in tasks.iter() {
            if !listed.contains(uid) {
                t.tx.send_replace(None);
            }
        }
        tasks.retain(|u, t| listed.contains(u) || !t.tx.is_closed());
        let mut rx = api
            .watch(WatchRequest {
                resource: "pods".into(),
                namespace: None,
                label_selector: String::new(),
                field_selector: selector.clone(),
                resource_version: Some(rv),
                bookmarks: true,
            })
            .await;
        while let Some(ev) = rx.recv().await {
            match ev.event_type {
                EventType::Error => break,
                EventType::Bookmark => continue,
                EventType::Deleted => {
                    if let Some(t) = tasks.get(util::uid(&ev.object)) {
                        t.tx.send_replace(None);
                    }
                }
                _ => feed(&s, &mut tasks, std::sync::Arc::unwrap_or_clone(ev.object)),
            }
            tasks.retain(|_, t| !t.tx.is_closed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn feed(s: &Arc<Shared>, tasks: &mut HashMap<String, PodTask>, pod: Value) {
    let uid = util::uid(&pod).to_string();
    match tasks.get(&uid) {
        Some(t) if !t.tx.is_closed() => {
            t.tx.send_replace(Some(pod));
        }
        _ => {
            if matches!(util::pod_phase(&pod), "Succeeded" | "Failed")
                && !worker::pod_dir(&s.pods_dir(), &uid).exists()
            {
                return;
            }
            let (tx, rx) = watch::channel(Some(pod));
            tokio::spawn(worker::run(s.clone(), uid.clone(), rx));
            tasks.insert(uid, PodTask { tx });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipam_hands_out_each_address_once() {
        let mut i = Ipam::new(u32::from(Ipv4Addr::new(198, 18, 3, 0)), 30);
        assert_eq!(i.gateway(), Ipv4Addr::new(198, 18, 3, 1));
        assert_eq!(i.alloc(), Some(Ipv4Addr::new(198, 18, 3, 2)));
        assert_eq!(i.alloc(), None);
        i.release(Ipv4Addr::new(198, 18, 3, 2));
        assert!(i.claim(Ipv4Addr::new(198, 18, 3, 2)));
        assert!(!i.claim(Ipv4Addr::new(198, 18, 4, 2)));
    }
}
