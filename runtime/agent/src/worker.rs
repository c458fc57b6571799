//! One task per pod: its sandbox (network namespace, address, DNS files,
//! volumes), its containers in order, restarts with back-off, status, and
//! teardown. What it started is recorded under the pod's directory.
use crate::node::{Config, Ipam};
use crate::pod::{self, Record, Sources};
use crate::probe::{self, Prober};
use orc_api::request::Request;
use orc_api::Reason;
use orc_container::State;
use orc_controllers::util;
use orc_controllers::Api;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub struct Shared {
    pub cfg: Config,
    pub api: Arc<dyn Api>,
    pub runtime: orc_container::Runtime,
    pub images: orc_image::Store,
    pub host: rtnetlink::Handle,
    pub ipam: Mutex<Option<Ipam>>,
    pub net_ready: watch::Sender<bool>,
    /// Container starts in progress at once (`Config::parallel_starts`),
    /// granted in the order asked.
    pub starts: tokio::sync::Semaphore,
    /// The pods' network namespaces the connect-time Service balancer acts
    /// for (`orc_proxy::socklb`); None without it.
    pub lb_pods: Option<orc_proxy::socklb::PodSet>,
}

impl Shared {
    /// Pod records and sandbox files (`hosts`, `resolv.conf`...), one
    /// directory per pod uid, in the agent's tmpfs.
    pub fn pods_dir(&self) -> PathBuf {
        crate::run_dir(&self.cfg.data_dir).join("pods")
    }
    /// What pod `uid` keeps on disk (`DIR/pods/UID`): its volumes, under
    /// `volumes` (an emptyDir outlives a reboot, as the kubelet's does).
    fn disk_dir(&self, uid: &str) -> PathBuf {
        self.cfg.data_dir.join("pods").join(uid)
    }
    fn volumes_dir(&self, uid: &str) -> PathBuf {
        self.disk_dir(uid).join("volumes")
    }
    /// Remove pod `uid`'s records (`dir`) and what it kept on disk.
    fn forget(&self, uid: &str, dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(self.disk_dir(uid));
    }
    fn netns(&self, uid: &str) -> PathBuf {
        crate::netns_dir(&self.cfg.data_dir).join(uid)
    }
}

pub fn pod_dir(pods: &Path, uid: &str) -> PathBuf {
    pods.join(uid)
}

/// Pods recorded under `pods` (a restarted agent adopts them).
pub fn recorded_pods(pods: &Path) -> Vec<(String, Value)> {
    std::fs::read_dir(pods)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let uid = e.file_name().to_string_lossy().into_owned();
            let pod =
                serde_json::from_slice(&std::fs::read(e.path().join("pod.json")).ok()?).ok()?;
            Some((uid, pod))
        })
        .collect()
}

/// What `pod.json` must follow: the pod without its status and
/// resourceVersion (a restarted agent adopts the pod from it, and `exec` and
/// `logs` find the pod by name; neither needs the latest status).
fn recorded_key(p: &Value) -> Vec<u8> {
    let mut p = p.clone();
    if let Some(o) = p.as_object_mut() {
        o.remove("status");
    }
    if let Some(m) = p["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    serde_json::to_vec(&p).unwrap_or_default()
}

/// Pod addresses recorded under `pods`.
pub fn recorded_ips(pods: &Path) -> Vec<Ipv4Addr> {
    std::fs::read_dir(pods)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("ip"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// The id of container `name` of pod `p` if it is running now.
pub fn running_container(s: &Shared, p: &Value, name: &str) -> Option<String> {
    let dir = pod_dir(&s.pods_dir(), util::uid(p));
    let records: BTreeMap<String, Record> =
        serde_json::from_slice(&std::fs::read(dir.join("containers.json")).ok()?).ok()?;
    let r = records.get(name)?;
    running(s, r).then(|| r.id.clone())
}

/// The state of one pod worker (records persisted in `containers.json`).
#[derive(Default)]
struct PodState {
    dir: PathBuf,
    ip: Option<Ipv4Addr>,
    records: BTreeMap<String, Record>,
    last_status: Value,
    transitions: BTreeMap<String, (bool, String)>,
    start_time: String,
    /// The pod reached Succeeded or Failed: its sandbox is gone.
    done: bool,
    volumes_at: f64,
    /// Probe state per container, for its current instance.
    probes: BTreeMap<String, Probes>,
    /// Container instances running as of this sync (one runtime look per
    /// container and sync).
    live: std::collections::BTreeSet<String>,
    /// The pod as last written to `pod.json`, without its status and
    /// resourceVersion: the agent's own status writes do not rewrite it.
    saved_pod: Vec<u8>,
    /// `containers.json` as last written.
    saved_records: Vec<u8>,
    /// The DNS and hosts files as last written.
    files: BTreeMap<&'static str, String>,
    /// The cookie of the pod's network namespace, once the Service
    /// balancer acts for it.
    lb_cookie: Option<u64>,
    /// Registering with the balancer was tried (once per sandbox: a failure
    /// is logged once, and the pod keeps to the nftables rules).
    lb_tried: bool,
}

#[derive(Default)]
struct Probes {
    /// The container instance these results belong to.
    id: String,
    startup: Prober,
    liveness: Prober,
    readiness: Prober,
}

impl PodState {
    fn load(dir: PathBuf) -> Self {
        let records = std::fs::read(dir.join("containers.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let ip = std::fs::read_to_string(dir.join("ip"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let start_time = std::fs::read_to_string(dir.join("start-time")).unwrap_or_default();
        let done = dir.join("done").exists();
        PodState {
            dir,
            ip,
            records,
            start_time,
            done,
            ..Default::default()
        }
    }
    /// Write `containers.json` if the records changed. Each write is a new
    /// file renamed over the old one (`exec` and `logs` read it while the
    /// worker writes), and a new inode per sync and pod is what made a
    /// burst of pods slow on ext4 without a journal (each allocation scans
    /// past the recently deleted inodes).
    fn save(&mut self) {
        let bytes = serde_json::to_vec(&self.records).unwrap_or_default();
        if bytes != self.saved_records {
            let _ = orc_container::shim::write_atomic(&self.dir.join("containers.json"), &bytes);
            self.saved_records = bytes;
        }
    }
}

/// How long one container start may hold its turn (`Shared::starts`).
const START_TURN_MAX: Duration = Duration::from_secs(30);

fn now() -> f64 {
    util::now_secs()
}

fn running(s: &Shared, r: &Record) -> bool {
    !r.id.is_empty()
        && r.exited.is_none()
        && matches!(s.runtime.state(&r.id), State::Running { .. })
}

pub async fn run(s: Arc<Shared>, uid: String, mut rx: watch::Receiver<Option<Value>>) {
    let dir = pod_dir(&s.pods_dir(), &uid);
    let mut st = PodState::load(dir.clone());
    let mut last_pod: Option<Value> = None;
    loop {
        let pod = rx.borrow_and_update().clone();
        match pod {
            None => {
                let grace = last_pod
                    .as_ref()
                    .and_then(|p| p["spec"]["terminationGracePeriodSeconds"].as_f64())
                    .unwrap_or(30.0);
                teardown(&s, last_pod.as_ref(), &uid, &mut st, grace).await;
                s.forget(&uid, &dir);
                return;
            }
            // Graceful deletion: stop everything, then let the pod go.
            Some(p) if util::deleting(&p) => {
                let grace = p["metadata"]["deletionGracePeriodSeconds"]
                    .as_f64()
                    .unwrap_or(30.0);
                teardown(&s, Some(&p), &uid, &mut st, grace).await;
                s.forget(&uid, &dir);
                let done = Request::Delete {
                    resource: "pods".into(),
                    namespace: util::namespace(&p).into(),
                    name: util::name(&p).into(),
                    preconditions: orc_api::mutation::Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    },
                    propagation_policy: None,
                    grace_period_seconds: Some(0),
                };
                let mut wait = Duration::from_millis(100);
                loop {
                    match s.api.call(done.clone()).await {
                        Err(e) if e.reason == Reason::Unavailable => {
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(5));
                        }
                        // Done, gone, or a newer pod of that name: either way not ours.
                        _ => return,
                    }
                }
            }
            Some(p) => {
                // The 1 s relist brings the same version again: nothing to compare.
                let rv = |p: &Value| p["metadata"]["resourceVersion"].clone();
                if last_pod.as_ref().map(rv) != Some(rv(&p)) {
                    let key = recorded_key(&p);
                    if st.saved_pod != key && std::fs::create_dir_all(&dir).is_ok() {
                        let _ = orc_container::shim::write_atomic(
                            &dir.join("pod.json"),
                            &serde_json::to_vec(&p).unwrap_or_default(),
                        );
                        st.saved_pod = key;
                    }
                }
                if let Err(e) = sync(&s, &p, &mut st).await {
                    tracing::warn!("pod {}/{}: {e}", util::namespace(&p), util::name(&p));
                }
                last_pod = Some(p);
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            // Like the kubelet's relist: ends are noticed within a second.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn sync(s: &Arc<Shared>, p: &Value, st: &mut PodState) -> Result<(), String> {
    if st.done {
        return Ok(());
    }
    let uid = util::uid(p).to_string();
    if st.start_time.is_empty() {
        st.start_time = orc_api::now_rfc3339();
        let _ = std::fs::write(st.dir.join("start-time"), &st.start_time);
    }
    // The sandbox: an address, a network namespace, DNS and hosts files.
    let ip = match st.ip {
        Some(ip) => ip,
        None => {
            let ip = s.ipam.lock().unwrap().as_mut().map(|i| i.alloc());
            let Some(ip) = ip else {
                return write_status(s, p, st, false, "Pending").await;
            };
            let ip = ip.ok_or("no free address in the node's podCIDR")?;
            std::fs::write(st.dir.join("ip"), ip.to_string()).map_err(|e| e.to_string())?;
            st.ip = Some(ip);
            ip
        }
    };
    let netns = s.netns(&uid);
    if !st.dir.join("net.done").exists() {
        let (gw, prefix) = {
            let ipam = s.ipam.lock().unwrap();
            let i = ipam.as_ref().ok_or("pod network not ready")?;
            (i.gateway(), i.prefix)
        };
        // unshare(CLONE_NEWNET) takes milliseconds: off the async workers.
        let ns = netns.clone();
        tokio::task::spawn_blocking(move || orc_netlink::create_netns(&ns))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let link = orc_netlink::PodLink {
            host_veth: orc_netlink::veth_name(&uid),
            bridge: s.cfg.bridge.clone(),
            ip,
            prefix,
            gateway: gw,
        };
        // A connection of this pod's own: on the agent's shared one, each
        // request of a burst of pods queued behind all the others', and the
        // host end took about twice as long to set up.
        let host = orc_netlink::connect().map_err(|e| e.to_string())?;
        orc_netlink::attach(&host, &netns, &link)
            .await
            .map_err(|e| e.to_string())?;
        let _ = std::fs::write(st.dir.join("net.done"), b"");
    }
    if let (Some(pods), false) = (&s.lb_pods, st.lb_tried) {
        st.lb_tried = true;
        // ClusterIP connections from this pod are balanced as they connect
        // (also after an agent restart: the balancer starts empty).
        // Entering the namespace takes a thread of its own: off the async workers.
        let (ns, pods) = (netns.clone(), pods.clone());
        let added = tokio::task::spawn_blocking(move || {
            orc_proxy::socklb::netns_cookie(&ns).and_then(|c| pods.add(c).map(|()| c))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match added {
            Ok(c) => st.lb_cookie = Some(c),
            Err(e) => tracing::warn!(
                "pod {}/{}: socket balancer: {e}; its Service traffic takes the nftables rules",
                util::namespace(p),
                util::name(p)
            ),
        }
    }
    let files = [
        (
            "hosts",
            pod::hosts_file(p, &ip.to_string(), &s.cfg.cluster_domain),
        ),
        ("hostname", format!("{}\n", pod::pod_hostname(p))),
        (
            "resolv.conf",
            pod::resolv_conf(
                p,
                &crate::node::dns_address(s).unwrap_or_default(),
                &s.cfg.cluster_domain,
            ),
        ),
    ];
    for (f, content) in files {
        if st.files.get(f) != Some(&content) {
            std::fs::write(st.dir.join(f), &content).map_err(|e| e.to_string())?;
            st.files.insert(f, content);
        }
    }
    let volumes = volumes(s, p, st).await?;
    let phase = containers(s, p, st, ip, &netns, &volumes).await;
    write_status(s, p, st, true, phase).await?;
    if matches!(phase, "Succeeded" | "Failed") {
        // Nothing will run again: free the sandbox, keep records and logs.
        teardown_sandbox(s, Some(p), &uid, st, 0.0).await;
        st.done = true;
        let _ = std::fs::write(st.dir.join("done"), b"");
    }
    Ok(())
}

/// Volumes on the node, by name: emptyDir, hostPath, configMap, secret,
/// downwardAPI, persistentVolumeClaim (node-local volumes).
async fn volumes(
    s: &Arc<Shared>,
    p: &Value,
    st: &mut PodState,
) -> Result<pod::VolumePaths, String> {
    let mut out = pod::VolumePaths::new();
    let refresh = now() - st.volumes_at >= 5.0;
    let ns = util::namespace(p);
    for v in p["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or("").to_string();
        let dir = s.volumes_dir(util::uid(p)).join(&name);
        if let Some(path) = v["hostPath"]["path"].as_str() {
            if v["hostPath"]["type"] == "DirectoryOrCreate" {
                let _ = std::fs::create_dir_all(path);
            }
            out.insert(name, path.to_string());
            continue;
        }
        if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            let pvc = s
                .api
                .call(Request::Get {
                    resource: "persistentvolumeclaims".into(),
                    namespace: ns.into(),
                    name: claim.into(),
                })
                .await
                .map_err(|e| format!("volume {name}: {e}"))?;
            let pv_name = pvc["spec"]["volumeName"]
                .as_str()
                .ok_or(format!("volume {name}: claim {claim} is not bound yet"))?;
            let pv = s
                .api
                .call(Request::Get {
                    resource: "persistentvolumes".into(),
                    namespace: String::new(),
                    name: pv_name.into(),
                })
                .await
                .map_err(|e| format!("volume {name}: {e}"))?;
            let path = pv["spec"]["local"]["path"]
                .as_str()
                .or(pv["spec"]["hostPath"]["path"].as_str())
                .ok_or(format!("volume {name}: {pv_name} is not a local volume"))?;
            let _ = std::fs::create_dir_all(path);
            out.insert(name, path.to_string());
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("volume {name}: {e}"))?;
        let items = if v["configMap"].is_object() || v["secret"].is_object() {
            let (resource, src) = if v["configMap"].is_object() {
                ("configmaps", &v["configMap"])
            } else {
                ("secrets", &v["secret"])
            };
            let obj_name = src["name"]
                .as_str()
                .or(src["secretName"].as_str())
                .unwrap_or("");
            if !refresh && dir.join(".ready").exists() {
                out.insert(name, dir.display().to_string());
                continue;
            }
            match s
                .api
                .call(Request::Get {
                    resource: resource.into(),
                    namespace: ns.into(),
                    name: obj_name.into(),
                })
                .await
            {
                Ok(obj) => Some(data_files(&obj, resource == "secrets", src)),
                Err(e) if e.reason == Reason::NotFound && src["optional"] == true => {
                    Some(BTreeMap::new())
                }
                Err(e) => return Err(format!("volume {name}: {e}")),
            }
        } else if v["downwardAPI"].is_object() {
            let src = Sources::default();
            let mut files = BTreeMap::new();
            for it in v["downwardAPI"]["items"].as_array().into_iter().flatten() {
                let path = it["path"].as_str().unwrap_or("").to_string();
                if let Some(fp) = it["fieldRef"]["fieldPath"].as_str() {
                    let val = match fp {
                        "metadata.labels" | "metadata.annotations" => {
                            let key = fp.trim_start_matches("metadata.");
                            p["metadata"][key].as_object().map(|m| m.iter().map(|(k, v)| format!("{k}=\"{}\"\n", v.as_str().unwrap_or(""))).collect::<String>()).unwrap_or_default()
                        }
                        _ => pod::environment(p, &json!({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": fp}}}]}), &[], &src)
                            .map_err(|e| format!("volume {name}: {e}"))?
                            .pop()
                            .map(|kv| kv.trim_start_matches("X=").to_string())
                            .unwrap_or_default(),
                    };
                    files.insert(path, val.into_bytes());
                }
            }
            Some(files)
        } else {
            // emptyDir (and anything else): a directory of the pod; with
            // medium Memory a tmpfs (sizeLimit is its size).
            if v["emptyDir"]["medium"] == "Memory" && !is_mountpoint(&dir) {
                let size = v["emptyDir"]["sizeLimit"]
                    .as_str()
                    .map(|q| util::quantity(&json!(q), false))
                    .map(|b| format!(",size={b}"))
                    .unwrap_or_default();
                nix::mount::mount(
                    Some("tmpfs"),
                    &dir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(format!("mode=1777{size}").as_str()),
                )
                .map_err(|e| format!("volume {name}: tmpfs: {e}"))?;
            }
            None
        };
        if let Some(files) = items {
            write_files(&dir, &files).map_err(|e| format!("volume {name}: {e}"))?;
            let _ = std::fs::write(dir.join(".ready"), b"");
        }
        out.insert(name, dir.display().to_string());
    }
    if refresh {
        st.volumes_at = now();
    }
    Ok(out)
}

/// The files of a ConfigMap or Secret volume (all keys, or the listed items).
fn data_files(obj: &Value, secret: bool, src: &Value) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in obj["data"].as_object().into_iter().flatten() {
        let s = v.as_str().unwrap_or("");
        data.insert(
            k.clone(),
            if secret {
                orc_image::base64_decode(s)
            } else {
                s.as_bytes().to_vec()
            },
        );
    }
    for (k, v) in obj["binaryData"].as_object().into_iter().flatten() {
        data.insert(
            k.clone(),
            orc_image::base64_decode(v.as_str().unwrap_or("")),
        );
    }
    for (k, v) in obj["stringData"].as_object().into_iter().flatten() {
        data.insert(k.clone(), v.as_str().unwrap_or("").as_bytes().to_vec());
    }
    match src["items"].as_array() {
        Some(items) => items
            .iter()
            .filter_map(|it| {
                let key = it["key"].as_str()?;
                Some((
                    it["path"].as_str().unwrap_or(key).to_string(),
                    data.get(key)?.clone(),
                ))
            })
            .collect(),
        None => data,
    }
}

/// Replace a volume's files atomically: write a new timestamped directory,
/// then swap the `..data` link, as the kubelet's atomic writer does, so a
/// reader never sees half an update.
fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    let current = std::fs::read_link(dir.join("..data")).ok();
    if let Some(cur) = &current {
        let same = files.iter().all(|(k, v)| {
            std::fs::read(dir.join(cur).join(k)).ok().as_deref() == Some(v.as_slice())
        }) && std::fs::read_dir(dir.join(cur))
            .map(|d| d.count())
            .unwrap_or(0)
            == files.len();
        if same {
            return Ok(());
        }
    }
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let new = dir.join(&stamp);
    std::fs::create_dir_all(&new)?;
    for (k, v) in files {
        if k.split('/').any(|p| p == "..") || k.starts_with('/') {
            continue;
        }
        let f = new.join(k);
        if let Some(parent) = f.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(f, v)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for k in files.keys() {
        let top = k.split('/').next().unwrap_or(k);
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{top}"), &link)?;
        }
    }
    if let Some(old) = current {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// Run init containers in order, then the app containers; returns the phase.
async fn containers(
    s: &Arc<Shared>,
    p: &Value,
    st: &mut PodState,
    ip: Ipv4Addr,
    netns: &Path,
    volumes: &pod::VolumePaths,
) -> &'static str {
    let policy = p["spec"]["restartPolicy"]
        .as_str()
        .unwrap_or("Always")
        .to_string();
    // Collect ends.
    st.live.clear();
    for r in st.records.values_mut() {
        if r.id.is_empty() || r.exited.is_some() {
            continue;
        }
        match s.runtime.state(&r.id) {
            State::Running { .. } => {
                st.live.insert(r.id.clone());
            }
            State::Exited(info) => {
                r.exited = Some(info);
                r.ready = false;
                schedule_restart(s.cfg.backoff_base, r);
                let _ = s.runtime.remove(&r.id);
            }
            State::Unknown => {
                r.exited = Some(orc_container::ExitInfo {
                    exit_code: 255,
                    signal: None,
                    oom_killed: false,
                    started_at: r.started_at.clone(),
                    finished_at: orc_api::now_rfc3339(),
                });
                schedule_restart(s.cfg.backoff_base, r);
                let _ = s.runtime.remove(&r.id);
            }
        }
    }
    let empty = vec![];
    let inits = p["spec"]["initContainers"].as_array().unwrap_or(&empty);
    let apps = p["spec"]["containers"].as_array().unwrap_or(&empty);
    let mut inits_done = true;
    let mut failed = false;
    for c in inits {
        let name = c["name"].as_str().unwrap_or("").to_string();
        let r = st.records.entry(name.clone()).or_default().clone();
        if r.exited.as_ref().is_some_and(|e| e.exit_code == 0) {
            continue;
        }
        inits_done = false;
        if st.live.contains(&r.id) {
            break;
        }
        if let Some(e) = &r.exited {
            // An init container that failed restarts unless the pod never restarts.
            if policy == "Never" || !pod::restarts("OnFailure", e.exit_code) {
                failed = true;
                break;
            }
        }
        start_if_due(s, p, c, st, ip, netns, volumes).await;
        break;
    }
    if inits_done && !failed {
        for c in apps {
            let name = c["name"].as_str().unwrap_or("").to_string();
            let r = st.records.entry(name.clone()).or_default().clone();
            if st.live.contains(&r.id) {
                continue;
            }
            if let Some(e) = &r.exited {
                if !pod::restarts(&policy, e.exit_code) {
                    continue;
                }
            }
            start_if_due(s, p, c, st, ip, netns, volumes).await;
        }
    }
    if inits_done && !failed {
        for c in apps {
            probe_container(s, p, c, st, ip).await;
        }
    }
    st.save();
    if failed {
        return "Failed";
    }
    let recs: Vec<(Record, bool)> = apps
        .iter()
        .map(|c| {
            let r = st
                .records
                .get(c["name"].as_str().unwrap_or(""))
                .cloned()
                .unwrap_or_default();
            let run = st.live.contains(&r.id);
            (r, run)
        })
        .collect();
    let refs: Vec<(&Record, bool)> = recs.iter().map(|(r, b)| (r, *b)).collect();
    pod::phase(&policy, inits_done, &refs)
}

/// Run the due probes of a running app container: startup first; then
/// liveness (failure restarts the container) and readiness (drives Ready).
async fn probe_container(s: &Arc<Shared>, p: &Value, c: &Value, st: &mut PodState, ip: Ipv4Addr) {
    let name = c["name"].as_str().unwrap_or("").to_string();
    let Some(r) = st.records.get(&name).cloned() else {
        return;
    };
    if !st.live.contains(&r.id) {
        return;
    }
    let probes = st.probes.entry(name.clone()).or_default();
    if probes.id != r.id {
        *probes = Probes {
            id: r.id.clone(),
            ..Default::default()
        };
    }
    let started = util::parse_time(&r.started_at).unwrap_or_else(now);
    let mut kill = None;
    let mut ready = false;
    let startup_done = match probe::Spec::from(&c["startupProbe"]) {
        Some(spec) if probes.startup.verdict != Some(true) => {
            if probes.startup.due(&spec, started, now()) {
                let ok = run_probe(s, &c["startupProbe"], c, &r.id, ip, spec.timeout).await;
                if probes.startup.record(&spec, ok, now()) == Some(false) {
                    kill = Some("startup probe failed");
                }
            }
            probes.startup.verdict == Some(true)
        }
        _ => true,
    };
    if startup_done {
        if let Some(spec) = probe::Spec::from(&c["livenessProbe"]) {
            if probes.liveness.due(&spec, started, now()) {
                let ok = run_probe(s, &c["livenessProbe"], c, &r.id, ip, spec.timeout).await;
                if probes.liveness.record(&spec, ok, now()) == Some(false) {
                    kill = Some("liveness probe failed");
                }
            }
        }
        ready = match probe::Spec::from(&c["readinessProbe"]) {
            Some(spec) => {
                if probes.readiness.due(&spec, started, now()) {
                    let ok = run_probe(s, &c["readinessProbe"], c, &r.id, ip, spec.timeout).await;
                    probes.readiness.record(&spec, ok, now());
                }
                probes.readiness.verdict == Some(true)
            }
            None => true,
        };
    }
    if let Some(rec) = st.records.get_mut(&name) {
        rec.ready = ready && kill.is_none();
    }
    if let Some(why) = kill {
        tracing::info!(
            "pod {}/{} container {name}: {why}, restarting it",
            util::namespace(p),
            util::name(p)
        );
        let grace = c["livenessProbe"]["terminationGracePeriodSeconds"]
            .as_f64()
            .or(p["spec"]["terminationGracePeriodSeconds"].as_f64())
            .unwrap_or(30.0);
        let _ = s.runtime.kill(&r.id, libc::SIGTERM);
        let (s2, id) = (s.clone(), r.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(grace)).await;
            let _ = s2.runtime.kill(&id, libc::SIGKILL);
        });
    }
}

/// One probe run: true on success.
async fn run_probe(
    s: &Arc<Shared>,
    spec: &Value,
    c: &Value,
    id: &str,
    ip: Ipv4Addr,
    timeout: f64,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let action = match probe::action(spec, c) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("probe: {e}");
            return false;
        }
    };
    let work = async {
        match action {
            probe::Action::Tcp { port } => tokio::net::TcpStream::connect((ip, port)).await.is_ok(),
            // HTTPS probes check that the port accepts connections (the
            // kubelet does not verify certificates either).
            probe::Action::Http {
                https: true, port, ..
            } => tokio::net::TcpStream::connect((ip, port)).await.is_ok(),
            probe::Action::Http {
                port,
                path,
                headers,
                ..
            } => {
                let Ok(mut conn) = tokio::net::TcpStream::connect((ip, port)).await else {
                    return false;
                };
                let mut req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/orc\r\nAccept: */*\r\nConnection: close\r\n"
                );
                for (k, v) in headers {
                    req.push_str(&format!("{k}: {v}\r\n"));
                }
                req.push_str("\r\n");
                if conn.write_all(req.as_bytes()).await.is_err() {
                    return false;
                }
                let mut head = vec![0u8; 256];
                let mut n = 0;
                while n < head.len() {
                    match conn.read(&mut head[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if head[..n].contains(&b'\n') {
                        break;
                    }
                }
                probe::http_ok(&String::from_utf8_lossy(&head[..n]))
            }
            probe::Action::Exec { command } => {
                let mut cmd =
                    tokio::process::Command::from(s.runtime.exec_command(id, &command, false));
                cmd.stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true);
                cmd.status().await.map(|st| st.success()).unwrap_or(false)
            }
        }
    };
    tokio::time::timeout(Duration::from_secs_f64(timeout), work)
        .await
        .unwrap_or(false)
}

/// Start (or restart) container `c` unless its back-off has not run out.
async fn start_if_due(
    s: &Arc<Shared>,
    p: &Value,
    c: &Value,
    st: &mut PodState,
    ip: Ipv4Addr,
    netns: &Path,
    volumes: &pod::VolumePaths,
) {
    let name = c["name"].as_str().unwrap_or("").to_string();
    let mut r = st.records.get(&name).cloned().unwrap_or_default();
    let t = now();
    if t < r.not_before {
        if r.exited.is_some() {
            r.waiting = Some((
                "CrashLoopBackOff".into(),
                format!(
                    "back-off {:.0}s restarting failed container={name} pod={}",
                    pod::backoff(s.cfg.backoff_base, r.restart_count + 1),
                    util::name(p)
                ),
            ));
        } else if let Some((reason, _)) = &mut r.waiting {
            if reason == "ErrImagePull" {
                *reason = "ImagePullBackOff".into();
            }
        }
        st.records.insert(name, r);
        return;
    }
    let restart = r.exited.is_some();
    let attempt = if restart {
        r.restart_count + 1
    } else {
        r.restart_count
    };
    match start(s, p, c, ip, netns, volumes, &st.dir, attempt).await {
        Ok((id, image_id)) => {
            if restart {
                r.last = r.exited.take();
                r.restart_count = attempt;
            }
            st.live.insert(id.clone());
            r.id = id;
            r.image_id = image_id;
            r.exited = None;
            r.waiting = None;
            r.ready = c["readinessProbe"].is_null() && c["startupProbe"].is_null();
            r.started_at = orc_api::now_rfc3339();
            // The back-off the next crash waits for.
            r.not_before = 0.0;
        }
        Err((reason, message)) => {
            tracing::warn!(
                "pod {}/{} container {name}: {reason}: {message}",
                util::namespace(p),
                util::name(p)
            );
            let n = r.restart_count + 1;
            r.waiting = Some((reason, message));
            r.not_before = t + pod::backoff(s.cfg.backoff_base, n);
        }
    }
    st.records.insert(name, r);
}

/// After a container ends, when may it start again?
fn schedule_restart(base: f64, r: &mut Record) {
    let ran = r
        .exited
        .as_ref()
        .and_then(|e| Some(util::parse_time(&e.finished_at)? - util::parse_time(&e.started_at)?))
        .unwrap_or(0.0);
    // A container that ran for 10 minutes starts over from the first step.
    let delay = if ran >= 600.0 {
        base
    } else {
        pod::backoff(base, r.restart_count + 1)
    };
    let end = r
        .exited
        .as_ref()
        .and_then(|e| util::parse_time(&e.finished_at))
        .unwrap_or_else(now);
    r.not_before = end + delay;
}

#[allow(clippy::too_many_arguments)]
async fn start(
    s: &Arc<Shared>,
    p: &Value,
    c: &Value,
    ip: Ipv4Addr,
    netns: &Path,
    volumes: &pod::VolumePaths,
    pod_files: &Path,
    attempt: u32,
) -> Result<(String, String), (String, String)> {
    let name = c["name"].as_str().unwrap_or("");
    let image = c["image"].as_str().unwrap_or("");
    let pull = c["imagePullPolicy"].as_str().unwrap_or("IfNotPresent");
    let img = match (pull, s.images.resolve(image)) {
        ("Never", None) => {
            return Err((
                "ErrImageNeverPull".into(),
                format!("Container image \"{image}\" is not present with pull policy of Never"),
            ))
        }
        ("Never" | "IfNotPresent", Some(img)) => img,
        _ => {
            let opts = pull_options(s, p).await;
            let (s2, image2) = (s.clone(), image.to_string());
            tokio::task::spawn_blocking(move || s2.images.pull(&image2, &opts))
                .await
                .map_err(|e| ("ErrImagePull".to_string(), e.to_string()))?
                .map_err(|e| {
                    (
                        "ErrImagePull".to_string(),
                        format!("failed to pull image \"{image}\": {e}"),
                    )
                })?
        }
    };
    let config = s
        .images
        .config(&img)
        .map_err(|e| ("CreateContainerError".to_string(), e.to_string()))?;
    let run = orc_image::run_config(&config);
    let sources = sources(s, p, c, ip)
        .await
        .map_err(|e| ("CreateContainerConfigError".to_string(), e))?;
    let env = pod::environment(p, c, &run.env, &sources)
        .map_err(|e| ("CreateContainerConfigError".to_string(), e))?;
    let uid = util::uid(p);
    let id = format!("{uid}-{name}-{attempt}");
    let cfg = pod::container_config(
        p,
        c,
        &run,
        env,
        pod_files,
        volumes,
        format!("/orc/pod{uid}/{id}"),
    )
    .map_err(|e| ("CreateContainerConfigError".to_string(), e))?;
    let log = log_path(&s.cfg.data_dir, p, name, attempt);
    let (s2, id2, img2, netns2) = (s.clone(), id.clone(), img.clone(), netns.to_path_buf());
    // Closed only when the agent ends.
    let turn = s
        .starts
        .acquire()
        .await
        .map_err(|e| ("RunContainerError".to_string(), e.to_string()))?;
    let mut job = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let _ = s2.runtime.remove(&id2);
        let rw = s2.runtime.writable(&id2);
        // The shim mounts it, where only the container sees it.
        let options = s2
            .images
            .overlay_options(&img2, &rw.join("upper"), &rw.join("work"))
            .map_err(|e| e.to_string())?;
        let setup = orc_container::Setup {
            rootfs: Some(orc_container::RootfsMount {
                fstype: "overlay".into(),
                source: "overlay".into(),
                options,
            }),
            netns: Some(netns2),
            // One mount per pod: the shim needs none of them (it joined its
            // own pod's above), and each made every start slower.
            detach: vec![crate::netns_dir(&s2.cfg.data_dir)],
        };
        s2.runtime
            .write_setup(&id2, &setup)
            .map_err(|e| e.to_string())?;
        s2.runtime
            .write_spec(&id2, &cfg)
            .map_err(|e| e.to_string())?;
        s2.runtime.start(&id2, &log).map_err(|e| e.to_string())?;
        Ok(())
    });
    // A start that hangs (a mount that never returns) keeps its turn only
    // so long, then lets the next one go.
    let done = match tokio::time::timeout(START_TURN_MAX, &mut job).await {
        Ok(done) => done,
        Err(_) => {
            drop(turn);
            job.await
        }
    };
    done.map_err(|e| ("RunContainerError".to_string(), e.to_string()))?
        // A failed bundle stays for inspection until the next attempt or teardown.
        .map_err(|e| ("RunContainerError".to_string(), e))?;
    Ok((id, img.id))
}

/// Insecure registries from the flags, credentials from the pod's
/// imagePullSecrets (`kubernetes.io/dockerconfigjson`).
async fn pull_options(s: &Arc<Shared>, p: &Value) -> orc_image::registry::Options {
    let mut o = orc_image::registry::Options {
        insecure: s.cfg.insecure_registries.clone(),
        ..Default::default()
    };
    for r in p["spec"]["imagePullSecrets"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(name) = r["name"].as_str() else {
            continue;
        };
        let req = Request::Get {
            resource: "secrets".into(),
            namespace: util::namespace(p).into(),
            name: name.into(),
        };
        if let Ok(secret) = s.api.call(req).await {
            let cfg = secret["data"][".dockerconfigjson"]
                .as_str()
                .or(secret["data"][".dockercfg"].as_str())
                .unwrap_or("");
            o.auths.extend(orc_image::registry::docker_config_auths(
                &orc_image::base64_decode(cfg),
            ));
        }
    }
    o
}

/// `logs/NS_NAME_UID/CONTAINER/N.log`, as the kubelet lays them out.
pub fn log_path(data: &Path, p: &Value, container: &str, attempt: u32) -> PathBuf {
    data.join("logs")
        .join(format!(
            "{}_{}_{}",
            util::namespace(p),
            util::name(p),
            util::uid(p)
        ))
        .join(container)
        .join(format!("{attempt}.log"))
}

/// The ConfigMaps and Secrets a container's environment names.
async fn sources(s: &Arc<Shared>, p: &Value, c: &Value, ip: Ipv4Addr) -> Result<Sources, String> {
    let mut src = Sources {
        pod_ip: ip.to_string(),
        node_ip: s.cfg.node_ip.map(|i| i.to_string()).unwrap_or_default(),
        ..Default::default()
    };
    let ns = util::namespace(p);
    if p["spec"]["enableServiceLinks"] != false {
        let list = s
            .api
            .call(Request::List {
                resource: "services".into(),
                namespace: Some(ns.into()),
                label_selector: String::new(),
                field_selector: String::new(),
            })
            .await
            .map_err(|e| format!("listing services for their environment variables: {e}"))?;
        src.services = list["items"].as_array().cloned().unwrap_or_default();
    }
    let mut wanted: Vec<(bool, String)> = vec![];
    for f in c["envFrom"].as_array().into_iter().flatten() {
        if let Some(n) = f["configMapRef"]["name"].as_str() {
            wanted.push((false, n.into()));
        }
        if let Some(n) = f["secretRef"]["name"].as_str() {
            wanted.push((true, n.into()));
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        if let Some(n) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
            wanted.push((false, n.into()));
        }
        if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
            wanted.push((true, n.into()));
        }
    }
    for (secret, name) in wanted {
        let resource = if secret { "secrets" } else { "configmaps" };
        match s
            .api
            .call(Request::Get {
                resource: resource.into(),
                namespace: ns.into(),
                name: name.clone(),
            })
            .await
        {
            Ok(obj) => {
                let data: BTreeMap<String, String> = data_files(&obj, secret, &Value::Null)
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect();
                if secret {
                    src.secrets.insert(name, data);
                } else {
                    src.config_maps.insert(name, data);
                }
            }
            Err(e) if e.reason == Reason::NotFound => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(src)
}

async fn write_status(
    s: &Arc<Shared>,
    p: &Value,
    st: &mut PodState,
    sandbox: bool,
    phase: &str,
) -> Result<(), String> {
    let statuses = |list: &Value| -> Vec<Value> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let r = st
                    .records
                    .get(c["name"].as_str().unwrap_or(""))
                    .cloned()
                    .unwrap_or_default();
                pod::container_status(c, &r, sandbox && st.live.contains(&r.id))
            })
            .collect()
    };
    let apps = statuses(&p["spec"]["containers"]);
    let inits = statuses(&p["spec"]["initContainers"]);
    let inits_done = inits
        .iter()
        .all(|c| c["state"]["terminated"]["exitCode"] == 0);
    let ready = phase == "Running" && apps.iter().all(|c| c["ready"] == true);
    let ts = orc_api::now_rfc3339();
    let mut conds = vec![];
    for (t, v) in [
        ("PodScheduled", true),
        ("Initialized", inits_done),
        ("ContainersReady", ready),
        ("Ready", ready),
    ] {
        let e = st
            .transitions
            .entry(t.to_string())
            .or_insert((v, ts.clone()));
        if e.0 != v {
            *e = (v, ts.clone());
        }
        conds.push(
            json!({"type": t, "status": if v {"True"} else {"False"}, "lastTransitionTime": e.1}),
        );
    }
    let mut status = json!({"phase": phase, "conditions": conds, "hostIP": s.cfg.node_ip.map(|i| i.to_string()).unwrap_or_default(),
        "hostIPs": [{"ip": s.cfg.node_ip.map(|i| i.to_string()).unwrap_or_default()}], "startTime": st.start_time,
        "containerStatuses": apps, "qosClass": qos(p)});
    if !inits.is_empty() {
        status["initContainerStatuses"] = json!(inits);
    }
    if let Some(ip) = st.ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if status == st.last_status {
        return Ok(());
    }
    match s
        .api
        .call(Request::Patch {
            resource: "pods".into(),
            namespace: util::namespace(p).into(),
            name: util::name(p).into(),
            patch: json!({"status": status}),
            status: true,
        })
        .await
    {
        Ok(_) => {
            st.last_status = status;
            Ok(())
        }
        Err(e) if e.reason == Reason::NotFound => Ok(()),
        Err(e) => Err(format!("status: {e}")),
    }
}

fn qos(p: &Value) -> &'static str {
    let cs: Vec<&Value> = p["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let has = |c: &Value, k: &str| c["resources"][k].as_object().is_some_and(|m| !m.is_empty());
    if cs.iter().all(|c| !has(c, "requests") && !has(c, "limits")) {
        "BestEffort"
    } else if cs.iter().all(|c| {
        let (l, r) = (&c["resources"]["limits"], &c["resources"]["requests"]);
        !l["cpu"].is_null()
            && !l["memory"].is_null()
            && (r["cpu"].is_null() || r["cpu"] == l["cpu"])
            && (r["memory"].is_null() || r["memory"] == l["memory"])
    }) {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Stop every container of the pod (SIGTERM, then SIGKILL after `grace`
/// seconds), then remove containers, network and cgroups.
async fn teardown_sandbox(
    s: &Arc<Shared>,
    pod: Option<&Value>,
    uid: &str,
    st: &mut PodState,
    grace: f64,
) {
    let ids: Vec<String> = s
        .runtime
        .ids()
        .into_iter()
        .filter(|id| id.starts_with(uid))
        .collect();
    let deadline = now() + grace;
    // preStop hooks first, within the grace period.
    if let Some(p) = pod {
        let hooks = p["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let name = c["name"].as_str()?;
                let hook = &c["lifecycle"]["preStop"];
                let r = st.records.get(name)?;
                (hook.is_object() && running(s, r)).then(|| (c.clone(), hook.clone(), r.id.clone()))
            });
        let ip = st.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let runs = hooks.map(|(c, hook, id)| {
            let s = s.clone();
            async move {
                let ok = run_probe(&s, &hook, &c, &id, ip, grace.max(1.0)).await;
                if !ok {
                    tracing::warn!("pod {uid}: preStop hook of {} failed", c["name"]);
                }
            }
        });
        futures::future::join_all(runs).await;
    }
    for id in &ids {
        let _ = s.runtime.kill(id, libc::SIGTERM);
    }
    // As the kubelet does, a hook that used up the grace period leaves 2 s.
    let deadline = deadline.max(now() + 2.0_f64.min(grace));
    while now() < deadline
        && ids
            .iter()
            .any(|id| matches!(s.runtime.state(id), State::Running { .. }))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &ids {
        let (s2, id2) = (s.clone(), id.clone());
        let _ = tokio::task::spawn_blocking(move || s2.runtime.remove(&id2)).await;
    }
    for r in st.records.values_mut() {
        if r.exited.is_none() && !r.id.is_empty() {
            r.exited = Some(orc_container::ExitInfo {
                exit_code: 137,
                signal: Some(9),
                oom_killed: false,
                started_at: r.started_at.clone(),
                finished_at: orc_api::now_rfc3339(),
            });
        }
    }
    if let (Some(pods), Some(c)) = (&s.lb_pods, st.lb_cookie.take()) {
        let _ = pods.remove(c);
    }
    st.lb_tried = false;
    if let Err(e) = orc_netlink::detach(&s.host, &orc_netlink::veth_name(uid)).await {
        tracing::warn!("pod {uid}: {e}");
    }
    if let Err(e) = orc_netlink::delete_netns(&s.netns(uid)) {
        tracing::warn!("pod {uid}: {e}");
    }
    remove_cgroups(uid);
    unmount_under(&s.volumes_dir(uid));
    let _ = std::fs::remove_file(st.dir.join("net.done"));
    if let Some(ip) = st.ip.take() {
        if let Some(i) = s.ipam.lock().unwrap().as_mut() {
            i.release(ip);
        }
        let _ = std::fs::remove_file(st.dir.join("ip"));
    }
}

async fn teardown(s: &Arc<Shared>, pod: Option<&Value>, uid: &str, st: &mut PodState, grace: f64) {
    teardown_sandbox(s, pod, uid, st, grace).await;
    // Logs go with the pod.
    if let Ok(rd) = std::fs::read_dir(s.cfg.data_dir.join("logs")) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(uid) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

fn is_mountpoint(p: &Path) -> bool {
    mount_points().iter().any(|m| m == p)
}

/// Unmount everything mounted under `dir` (memory-backed emptyDirs), deepest first.
pub fn unmount_under(dir: &Path) {
    let mut mine: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    mine.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mine {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Remove the pod's cgroup in every hierarchy (containers' are gone by now).
pub fn remove_cgroups(uid: &str) {
    let pod = format!("orc/pod{uid}");
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for root in roots {
        let d = root.join(&pod);
        if d.is_dir() {
            // Leftover container cgroups first.
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&d);
        }
        // The shared parent goes when it is empty.
        let _ = std::fs::remove_dir(root.join("orc"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_json_follows_spec_and_metadata_not_status() {
        let p = serde_json::json!({
            "metadata": {"name": "a", "uid": "u", "resourceVersion": "5", "labels": {"x": "1"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending"},
        });
        let mut status_only = p.clone();
        status_only["status"]["phase"] = "Running".into();
        status_only["metadata"]["resourceVersion"] = "9".into();
        assert_eq!(recorded_key(&p), recorded_key(&status_only));
        let mut relabelled = p.clone();
        relabelled["metadata"]["labels"]["x"] = "2".into();
        assert_ne!(recorded_key(&p), recorded_key(&relabelled));
        let mut deleting = p.clone();
        deleting["metadata"]["deletionTimestamp"] = "2026-11-27T00:00:00Z".into();
        assert_ne!(recorded_key(&p), recorded_key(&deleting));
    }

    #[test]
    fn volume_files_swap_atomically() {
        let d = std::env::temp_dir().join(format!("orc-vol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        write_files(&d, &[("a".to_string(), b"1".to_vec())].into()).unwrap();
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"1");
        write_files(&d, &[("a".to_string(), b"2".to_vec())].into()).unwrap();
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"2");
        // One data directory remains.
        let dirs = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("..1"))
            .count();
        assert_eq!(dirs, 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
