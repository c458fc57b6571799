//! Simulated nodes (`orc node --simulate`), like Kubernetes' kubemark: many
//! hollow nodes in one process. They register, renew their Leases, report
//! status, and play the pods bound to them: an IP from the node's podCIDR,
//! Running, Ready after a delay, and an exit when an annotation asks for one.
use anyhow::{Context, Result};
use orc_api::request::{Request, WatchRequest};
use orc_api::{EventType, Reason};
use orc_controllers::util;
use orc_controllers::Api;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const EXIT_AFTER: &str = "sim.orc.dev/exit-after";
pub const EXIT_CODE: &str = "sim.orc.dev/exit-code";
pub const READY_AFTER: &str = "sim.orc.dev/ready-after";

#[derive(clap::Args, Clone)]
pub struct SimArgs {
    /// Run hollow nodes instead of a real node agent.
    #[arg(long)]
    pub simulate: bool,
    /// How many nodes this process runs.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Node names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "sim")]
    pub name_prefix: String,
    /// Name of a single node (instead of --name-prefix/--count).
    #[arg(long)]
    pub name: Option<String>,
    /// Masters, comma-separated (required unless --reset).
    #[arg(long, default_value = "")]
    pub master: String,
    #[arg(long, default_value = "4")]
    pub cpu: String,
    #[arg(long, default_value = "8Gi")]
    pub memory: String,
    #[arg(long, default_value_t = 110)]
    pub pods: u32,
    /// Extra node labels, k=v,k=v.
    #[arg(long, default_value = "")]
    pub labels: String,
    /// Lease renewal period (seconds).
    #[arg(long, default_value_t = 10.0)]
    pub lease_every: f64,
    /// Node status report period (seconds).
    #[arg(long, default_value_t = 10.0)]
    pub status_every: f64,
    /// Where the agent keeps images, containers, pod state and logs.
    #[arg(long, default_value = "/var/lib/orc/node")]
    pub data_dir: std::path::PathBuf,
    /// The node's address (default: the first non-loopback IPv4 address).
    #[arg(long)]
    pub node_ip: Option<Ipv4Addr>,
    /// Run the agent inside this network namespace (a bind-mounted nsfs file,
    /// e.g. /run/netns/NAME).
    #[arg(long)]
    pub netns: Option<std::path::PathBuf>,
    /// The DNS server pods are given (default: this node's own cluster DNS,
    /// which the agent runs on the pod bridge address).
    #[arg(long, default_value = "")]
    pub cluster_dns: String,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// First container restart back-off in seconds (doubles up to 300).
    #[arg(long, default_value_t = 10.0)]
    pub restart_backoff: f64,
    /// The pod bridge.
    #[arg(long, default_value = "orc0")]
    pub bridge: String,
    /// Registries (HOST[:PORT]) to pull from over plain HTTP, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub insecure_registry: Vec<String>,
    /// The cluster's pod CIDR (as given to the masters): pod traffic to
    /// anything outside it is masqueraded behind the node address.
    #[arg(long, default_value = "198.18.0.0/16")]
    pub cluster_cidr: String,
    /// Where the node's DNS sends names outside the cluster: HOST:PORT,
    /// comma-separated, or `none` (default: the nameservers of /etc/resolv.conf).
    #[arg(long, default_value = "")]
    pub dns_upstream: String,
    /// The Service proxy rewrites its whole nftables table this often
    /// (seconds); in between it changes only what changed.
    #[arg(long, default_value_t = 300.0)]
    pub proxy_resync: f64,
    /// Containers started at once at most; more wait their turn, in the
    /// order asked (0: four per CPU).
    #[arg(long, default_value_t = 0)]
    pub parallel_starts: usize,
    /// Do not balance pods' TCP connections to ClusterIPs at connect time
    /// (a BPF program on the cgroup root): every Service connection then
    /// goes through the nftables NAT rules.
    #[arg(long)]
    pub no_socket_lb: bool,
    /// Port of the agent's logs and exec service (on the node address).
    #[arg(long, default_value_t = 10250)]
    pub listen_port: u16,
    /// Remove everything the agent with this --data-dir made (containers,
    /// mounts, cgroups, pod namespaces, state; not images), then exit.
    #[arg(long)]
    pub reset: bool,
}

/// "2s", "500ms", "1m", "3" (seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (n, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = n.trim().parse().ok()?;
    (v >= 0.0).then(|| Duration::from_secs_f64(v * mult))
}

/// What a simulated container is doing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Play {
    pub started: f64,
    pub ready: bool,
    pub restarts: i64,
    /// Exit code once the container has ended for good.
    pub exited: Option<i64>,
    pub last_exit: Option<i64>,
}

/// The pod status a simulated node reports.
pub fn pod_status(pod: &Value, node_ip: &str, pod_ip: &str, play: &Play) -> Value {
    let ts = util::rfc3339(play.started);
    let terminal = play
        .exited
        .map(|c| if c == 0 { "Succeeded" } else { "Failed" });
    let phase = terminal.unwrap_or("Running");
    let ready = play.ready && play.exited.is_none();
    let rs = if ready { "True" } else { "False" };
    let containers: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let state = match play.exited {
                Some(code) => json!({"terminated": {"exitCode": code,
                    "reason": if code == 0 {"Completed"} else {"Error"}, "startedAt": ts, "finishedAt": orc_api::now_rfc3339()}}),
                None => json!({"running": {"startedAt": ts}}),
            };
            let mut s = json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": ready,
                "started": play.exited.is_none(), "restartCount": play.restarts, "state": state});
            if let Some(code) = play.last_exit {
                s["lastState"] = json!({"terminated": {"exitCode": code, "reason": if code == 0 {"Completed"} else {"Error"}}});
            }
            s
        })
        .collect();
    json!({
        "phase": phase, "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "startTime": ts, "qosClass": "BestEffort",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": ts},
            {"type": "Initialized", "status": "True", "lastTransitionTime": ts},
            {"type": "ContainersReady", "status": rs, "lastTransitionTime": orc_api::now_rfc3339()},
            {"type": "Ready", "status": rs, "lastTransitionTime": orc_api::now_rfc3339()},
        ],
        "containerStatuses": containers,
    })
}

/// After an exit with `code`, does the container start again?
pub fn restarts(restart_policy: &str, code: i64) -> bool {
    match restart_policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

struct NodeSim {
    name: String,
    ip: String,
    cidr: Mutex<Option<(u32, u32)>>,
    used: Mutex<BTreeSet<u32>>,
}

impl NodeSim {
    fn alloc(&self) -> Option<String> {
        let (base, size) = (*self.cidr.lock().unwrap())?;
        let mut used = self.used.lock().unwrap();
        // .0 is the network, .1 the node's gateway.
        let off = (2..size.saturating_sub(1)).find(|o| !used.contains(o))?;
        used.insert(off);
        Some(Ipv4Addr::from(base + off).to_string())
    }
    fn free(&self, ip: &str) {
        if let (Ok(ip), Some((base, _))) = (ip.parse::<Ipv4Addr>(), *self.cidr.lock().unwrap()) {
            self.used
                .lock()
                .unwrap()
                .remove(&(u32::from(ip).wrapping_sub(base)));
        }
    }
}

fn node_object(a: &SimArgs, n: &NodeSim) -> Value {
    let mut labels = json!({"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64", "orc.dev/simulated": "true"});
    for kv in a.labels.split(',').filter(|s| !s.is_empty()) {
        if let Some((k, v)) = kv.split_once('=') {
            labels[k] = json!(v);
        }
    }
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": labels}, "spec": {}})
}

fn node_status(a: &SimArgs, n: &NodeSim) -> Value {
    let now = orc_api::now_rfc3339();
    let res = json!({"cpu": a.cpu, "memory": a.memory, "pods": a.pods.to_string()});
    json!({"capacity": res, "allocatable": res,
        "addresses": [{"type": "InternalIP", "address": n.ip}, {"type": "Hostname", "address": n.name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "orc simulated node is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "nodeInfo": {"kubeletVersion": "orc-sim", "operatingSystem": "linux", "architecture": "amd64"}})
}

async fn register(api: &Arc<dyn Api>, a: &SimArgs, n: &NodeSim) -> Result<()> {
    match api
        .call(Request::Create {
            object: node_object(a, n),
            namespace: None,
        })
        .await
    {
        Ok(_) => {}
        Err(e) if e.reason == Reason::AlreadyExists => {}
        Err(e) => return Err(e).context(format!("registering node {}", n.name)),
    }
    report_status(api, a, n).await
}

async fn report_status(api: &Arc<dyn Api>, a: &SimArgs, n: &NodeSim) -> Result<()> {
    let patch = json!({"status": node_status(a, n)});
    let node = api
        .call(Request::Patch {
            resource: "nodes".into(),
            namespace: String::new(),
            name: n.name.clone(),
            patch,
            status: true,
        })
        .await
        .with_context(|| format!("node {} status", n.name))?;
    if let Some((base, bits)) = node["spec"]["podCIDR"]
        .as_str()
        .and_then(orc_controllers::nodes::parse_cidr)
    {
        *n.cidr.lock().unwrap() = Some((base, 1u32 << (32 - bits)));
    }
    Ok(())
}

async fn renew_lease(api: &Arc<dyn Api>, n: &NodeSim) -> Result<()> {
    orc_agent::node::renew_lease(api, &n.name)
        .await
        .context("lease")
}

/// Play one pod on node `n` until it is deleted (the task is aborted then).
async fn play(api: Arc<dyn Api>, n: Arc<NodeSim>, pod: Value) {
    let (ns, name) = (
        util::namespace(&pod).to_string(),
        util::name(&pod).to_string(),
    );
    let ip = match pod["status"]["podIP"].as_str() {
        Some(ip) if !ip.is_empty() => ip.to_string(),
        _ => loop {
            if let Some(ip) = n.alloc() {
                break ip;
            }
            // No podCIDR yet: ask for the node again.
            if let Ok(node) = api
                .call(Request::Get {
                    resource: "nodes".into(),
                    namespace: String::new(),
                    name: n.name.clone(),
                })
                .await
            {
                if let Some((base, bits)) = node["spec"]["podCIDR"]
                    .as_str()
                    .and_then(orc_controllers::nodes::parse_cidr)
                {
                    *n.cidr.lock().unwrap() = Some((base, 1u32 << (32 - bits)));
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        },
    };
    let ready_after = util::annotation(&pod, READY_AFTER)
        .and_then(parse_duration)
        .or_else(|| {
            pod["spec"]["containers"][0]["readinessProbe"]["initialDelaySeconds"]
                .as_f64()
                .map(Duration::from_secs_f64)
        });
    let exit_after = util::annotation(&pod, EXIT_AFTER).and_then(parse_duration);
    let code: i64 = util::annotation(&pod, EXIT_CODE)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let policy = pod["spec"]["restartPolicy"]
        .as_str()
        .unwrap_or("Always")
        .to_string();
    let mut st = Play {
        started: util::now_secs(),
        ready: ready_after.is_none(),
        ..Default::default()
    };
    let write = |st: Play| {
        let api = api.clone();
        let (ns, name, ip, node_ip, pod) = (
            ns.clone(),
            name.clone(),
            ip.clone(),
            n.ip.clone(),
            pod.clone(),
        );
        async move {
            let status = pod_status(&pod, &node_ip, &ip, &st);
            // Until it is written or the pod is gone (a busy cluster answers
            // Unavailable for a while; the task ends when the pod is deleted).
            let mut wait = Duration::from_millis(100);
            loop {
                let r = api
                    .call(Request::Patch {
                        resource: "pods".into(),
                        namespace: ns.clone(),
                        name: name.clone(),
                        patch: json!({"status": status}),
                        status: true,
                    })
                    .await;
                match r {
                    Ok(_) => return true,
                    Err(e) if e.reason == Reason::NotFound => return false,
                    Err(_) => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    };
    loop {
        if !write(st.clone()).await {
            return;
        }
        // Ready after the delay; exit after its delay; whichever comes first.
        let since = Duration::from_secs_f64((util::now_secs() - st.started).max(0.0));
        let to_ready = ready_after
            .filter(|_| !st.ready)
            .map(|d| d.saturating_sub(since));
        let to_exit = exit_after.map(|d| d.saturating_sub(since));
        match (to_ready, to_exit) {
            (Some(r), e) if e.is_none_or(|e| r < e) => {
                tokio::time::sleep(r).await;
                st.ready = true;
            }
            (_, Some(e)) => {
                tokio::time::sleep(e).await;
                if restarts(&policy, code) {
                    st.restarts += 1;
                    st.last_exit = Some(code);
                    st.started = util::now_secs();
                    st.ready = ready_after.is_none();
                } else {
                    st.exited = Some(code);
                    st.ready = false;
                    write(st.clone()).await;
                    return;
                }
            }
            _ => return,
        }
    }
}

fn masters(a: &SimArgs) -> Result<Vec<String>> {
    master_list(&a.master)
}

/// `--master A,B,...`: the masters' HOST:PORT addresses.
pub fn master_list(list: &str) -> Result<Vec<String>> {
    let m: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if m.is_empty() {
        anyhow::bail!("--master: give the masters' HOST:PORT addresses, comma-separated");
    }
    Ok(m)
}

/// Enter the network namespace at `path`: call before any thread starts.
pub fn enter_netns(path: &std::path::Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("--netns {}", path.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("--netns {}: setns", path.display()))
}

/// The real node agent.
async fn agent(a: SimArgs) -> Result<i32> {
    if a.reset {
        let exe = std::env::current_exe().context("own executable")?;
        let n = orc_agent::reset(&a.data_dir, &exe);
        eprintln!("removed {n} container(s) of {}", a.data_dir.display());
        return Ok(0);
    }
    let name = match &a.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("hostname")?
            .trim()
            .to_string(),
    };
    let labels = a
        .labels
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--labels: \"{kv}\" is not KEY=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    let api: Arc<dyn Api> = Arc::new(orc_controllers::ClientApi(Arc::new(
        orc_client::Client::new(masters(&a)?),
    )));
    let master_list = masters(&a)?.join(",");
    let cfg = orc_agent::Config {
        name,
        node_ip: a.node_ip,
        data_dir: a.data_dir,
        exe: std::env::current_exe().context("own executable")?,
        cluster_dns: a.cluster_dns,
        masters: master_list,
        dns_upstream: a.dns_upstream,
        cluster_domain: a.cluster_domain,
        backoff_base: a.restart_backoff.max(0.1),
        lease_every: Duration::from_secs_f64(a.lease_every.max(0.1)),
        status_every: Duration::from_secs_f64(a.status_every.max(0.1)),
        labels,
        bridge: a.bridge,
        port: a.listen_port,
        insecure_registries: a.insecure_registry,
        cluster_cidr: a.cluster_cidr,
        proxy_resync: Duration::from_secs_f64(a.proxy_resync.max(1.0)),
        parallel_starts: a.parallel_starts,
        socket_lb: !a.no_socket_lb,
    };
    tokio::select! {
        r = orc_agent::run(api, cfg) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(0)
}

pub async fn run(a: SimArgs) -> Result<i32> {
    if !a.simulate {
        return agent(a).await;
    }
    let api: Arc<dyn Api> = Arc::new(orc_controllers::ClientApi(Arc::new(
        orc_client::Client::new(masters(&a)?),
    )));
    let names: Vec<String> = match &a.name {
        Some(n) => vec![n.clone()],
        None => (0..a.count)
            .map(|i| format!("{}-{i}", a.name_prefix))
            .collect(),
    };
    let nodes: HashMap<String, Arc<NodeSim>> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            // Node addresses are loopback aliases: nothing leaves the machine.
            let ip =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 100, 0, 1)) + i as u32).to_string();
            (
                name.clone(),
                Arc::new(NodeSim {
                    name: name.clone(),
                    ip,
                    cidr: Mutex::new(None),
                    used: Mutex::new(BTreeSet::new()),
                }),
            )
        })
        .collect();
    let nodes = Arc::new(nodes);
    // Register (a few at a time) before anything else.
    for chunk in names.chunks(64) {
        let regs = chunk.iter().map(|n| register(&api, &a, &nodes[n]));
        for r in futures::future::join_all(regs).await {
            r?;
        }
        let leases = chunk.iter().map(|n| renew_lease(&api, &nodes[n]));
        futures::future::join_all(leases).await;
    }
    eprintln!("{} simulated node(s) registered", names.len());
    // Leases and status, spread over the period.
    for (every, lease) in [(a.lease_every, true), (a.status_every, false)] {
        let (api, a2, nodes, names) = (api.clone(), a.clone(), nodes.clone(), names.clone());
        tokio::spawn(async move {
            let gap = Duration::from_secs_f64(every.max(0.1) / names.len().max(1) as f64);
            loop {
                for n in &names {
                    let (api, a2, node) = (api.clone(), a2.clone(), nodes[n].clone());
                    tokio::spawn(async move {
                        let r = if lease {
                            renew_lease(&api, &node).await
                        } else {
                            report_status(&api, &a2, &node).await
                        };
                        if let Err(e) = r {
                            tracing::warn!("{}: {e:#}", node.name);
                        }
                    });
                    tokio::time::sleep(gap).await;
                }
            }
        });
    }
    // Pods bound to our nodes.
    let mut playing: HashMap<String, (tokio::task::JoinHandle<()>, String, String)> =
        HashMap::new();
    loop {
        let mut rx = api
            .watch(WatchRequest {
                resource: "pods".into(),
                namespace: None,
                label_selector: String::new(),
                field_selector: String::new(),
                resource_version: None,
                bookmarks: true,
            })
            .await;
        while let Some(ev) = rx.recv().await {
            if ev.event_type == EventType::Error {
                break;
            }
            if ev.event_type == EventType::Bookmark {
                continue;
            }
            let p = std::sync::Arc::unwrap_or_clone(ev.object);
            let uid = util::uid(&p).to_string();
            let node = p["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            let node = node.as_str();
            let gone = ev.event_type == EventType::Deleted || util::deleting(&p);
            if gone {
                if let Some((task, node, _)) = playing.remove(&uid) {
                    task.abort();
                    if let Some(n) = nodes.get(&node) {
                        n.free(p["status"]["podIP"].as_str().unwrap_or(""));
                    }
                }
                if util::deleting(&p) && nodes.contains_key(node) {
                    // Nothing to stop in a hollow node: let the pod go.
                    let api = api.clone();
                    let uid = util::uid(&p).to_string();
                    let (ns, name) = (util::namespace(&p).to_string(), util::name(&p).to_string());
                    tokio::spawn(async move {
                        let _ = api
                            .call(Request::Delete {
                                resource: "pods".into(),
                                namespace: ns,
                                name,
                                preconditions: orc_api::mutation::Preconditions {
                                    uid: Some(uid),
                                    resource_version: None,
                                },
                                propagation_policy: None,
                                grace_period_seconds: Some(0),
                            })
                            .await;
                    });
                }
                continue;
            }
            if playing.contains_key(&uid) || matches!(util::pod_phase(&p), "Succeeded" | "Failed") {
                continue;
            }
            let Some(n) = nodes.get(node).cloned() else {
                continue;
            };
            let ip = p["status"]["podIP"].as_str().unwrap_or("").to_string();
            let node = node.to_string();
            let task = tokio::spawn(play(api.clone(), n, p));
            playing.insert(uid, (task, node, ip));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("x"), None);
    }

    #[test]
    fn statuses() {
        let pod = json!({"spec": {"containers": [{"name": "c", "image": "i"}]}});
        let running = pod_status(
            &pod,
            "127.0.0.1",
            "198.18.0.2",
            &Play {
                ready: true,
                ..Default::default()
            },
        );
        assert_eq!(running["phase"], "Running");
        assert_eq!(
            util::condition(&json!({"status": running}), "Ready").unwrap()["status"],
            "True"
        );
        let failed = pod_status(
            &pod,
            "h",
            "p",
            &Play {
                exited: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(failed["phase"], "Failed");
        assert_eq!(
            failed["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            1
        );
        assert!(!restarts("Never", 1));
        assert!(restarts("OnFailure", 1));
        assert!(!restarts("OnFailure", 0));
        assert!(restarts("Always", 0));
    }
}
