//! `orc up` / `orc down`: a local cluster of three masters as processes on this
//! machine, with the CLI configuration written to ~/.orc/config.
use anyhow::{bail, Context, Result};
use clap::Args;
use orc_api::request::Request;
use orc_client::Client;
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct UpArgs {
    /// Where the masters keep their data and logs.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Masters listen on 127.0.0.1:PORT+1 .. PORT+3.
    #[arg(long, default_value_t = 7000)]
    port: u16,
    /// Do not apply the demo workload.
    #[arg(long)]
    no_demo: bool,
    /// Also run this many simulated nodes (`orc node --simulate`: they report
    /// pods Running without running containers) so workloads get scheduled.
    /// Default: 2 without --nodes, 0 with it.
    #[arg(long)]
    simulated_nodes: Option<usize>,
    /// Run this many real node agents on this machine (needs root): each in
    /// its own network namespace with an address on the bridge `orcup0`
    /// (198.18.253.0/24, the masters on .254), plus a local registry
    /// (Debian's docker-registry) holding a busybox image made from
    /// busybox-static.
    #[arg(long, default_value_t = 0)]
    nodes: usize,
}

/// The local node network of `orc up --nodes`.
const UP_BRIDGE: &str = "orcup0";
const UP_HOST_IP: [u8; 4] = [198, 18, 253, 254];

fn up_node_ip(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(198, 18, 253, i as u8)
}

fn up_netns(i: usize) -> PathBuf {
    PathBuf::from(format!("/run/netns/orc-node-{i}"))
}

/// A bridge in this namespace and one namespace per node plugged into it.
async fn node_network(n: usize) -> Result<()> {
    let host = orc_netlink::connect()?;
    let gw = std::net::Ipv4Addr::from(UP_HOST_IP);
    orc_netlink::ensure_bridge(&host, UP_BRIDGE, gw, 24).await?;
    for i in 1..=n {
        let ns = up_netns(i);
        orc_netlink::create_netns(&ns)?;
        let veth = format!("orcupn{i}");
        if orc_netlink::link_index(&host, &veth).await?.is_none() {
            orc_netlink::attach(
                &host,
                &ns,
                &orc_netlink::PodLink {
                    host_veth: veth,
                    bridge: UP_BRIDGE.into(),
                    ip: up_node_ip(i),
                    prefix: 24,
                    gateway: gw,
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// Start a child of `exe` (or another program) with a log and a pidfile.
fn spawn_logged(dir: &Path, name: &str, cmd: &mut Command) -> Result<u32> {
    let pidfile = dir.join(format!("{name}.pid"));
    if let Some(pid) = read_pid(&pidfile).filter(|p| pid_alive(*p)) {
        println!("{name} already running (pid {pid})");
        return Ok(pid);
    }
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    std::fs::write(&pidfile, child.id().to_string())?;
    Ok(child.id())
}

/// The registry and its busybox image, then the node agents.
async fn start_nodes(
    dir: &Path,
    exe: &Path,
    n: usize,
    masters: &str,
    registry: &str,
) -> Result<()> {
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {registry}\n",
            dir.join("registry").display()
        ),
    )?;
    let pid = spawn_logged(
        dir,
        "registry",
        Command::new("docker-registry").arg("serve").arg(&cfg),
    )
    .context(
        "the local registry needs Debian's docker-registry (apt-get install docker-registry)",
    )?;
    println!("registry started on {registry} (pid {pid})");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(registry).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the registry did not start; see {}",
                dir.join("registry.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // busybox from busybox-static, pushed so the nodes pull it.
    let archive = orc_image::busybox_archive(Path::new("/bin/busybox"), "busybox:latest")?;
    let tarball = dir.join("busybox.tar");
    std::fs::write(&tarball, archive)?;
    let store = orc_image::Store::new(dir.join("node-1").join("images"));
    store.import(&tarball)?;
    let target = format!("{registry}/busybox:latest");
    let opts = orc_image::registry::Options {
        insecure: vec![registry.to_string()],
        ..Default::default()
    };
    let t2 = target.clone();
    tokio::task::spawn_blocking(move || store.push("busybox:latest", &t2, &opts)).await??;
    println!("image {target} pushed (busybox-static)");
    for i in 1..=n {
        let name = format!("node-{i}");
        let mut cmd = Command::new(exe);
        cmd.args(["node", "--name", &name, "--master", masters])
            .arg("--netns")
            .arg(up_netns(i))
            .args([
                "--node-ip",
                &up_node_ip(i).to_string(),
                "--insecure-registry",
                registry,
                "--cluster-cidr",
                "198.18.0.0/17",
            ])
            .arg("--data-dir")
            .arg(dir.join(&name))
            .env("ORC_LOG", "info,libcgroups=error,libcontainer=error");
        let pid = spawn_logged(dir, &name, &mut cmd)?;
        println!(
            "{name} started at {} (pid {pid}, log {})",
            up_node_ip(i),
            dir.join(format!("{name}.log")).display()
        );
    }
    // The ingress runs on node-1, where it reaches every pod directly.
    let ip = up_node_ip(1);
    let mut cmd = Command::new(exe);
    cmd.args(["ingress", "--master", masters])
        .arg("--netns")
        .arg(up_netns(1))
        .args([
            "--http",
            &format!("{ip}:80"),
            "--https",
            &format!("{ip}:443"),
            "--metrics",
            &format!("{ip}:10254"),
        ])
        .arg("--pid-file")
        .arg(dir.join("ingress.pingora.pid"))
        .arg("--upgrade-sock")
        .arg(dir.join("ingress-upgrade.sock"));
    let pid = spawn_logged(dir, "ingress", &mut cmd)?;
    println!(
        "ingress started on {ip}:80 and :443, metrics on :10254 (pid {pid}, log {})",
        dir.join("ingress.log").display()
    );
    Ok(())
}

#[derive(Args)]
pub struct DownArgs {
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also delete the cluster's data.
    #[arg(long)]
    purge: bool,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

pub fn config_path() -> PathBuf {
    home().join(".orc").join("config")
}

fn default_dir() -> PathBuf {
    home().join(".orc").join("local")
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn read_pid(p: &Path) -> Option<u32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

const DEMO: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: demo
data:
  greeting: hello from orc
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: httpd
        image: busybox
        command: ["sh", "-c", "mkdir -p /var/www; echo hello from $(hostname) > /var/www/index.html; exec httpd -f -p 80 -h /var/www"]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: LoadBalancer
  selector: {app: web}
  ports:
  - {name: http, port: 80, nodePort: 30002}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: orc
  annotations: {ingressclass.kubernetes.io/is-default-class: "true"}
spec:
  controller: orc.dev/ingress
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  namespace: demo
spec:
  rules:
  - host: web.demo.test
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
"#;

/// The masters' addresses a local cluster was made with, in its directory.
const MASTERS_FILE: &str = "masters";

/// Whether `orc up` may start masters on `now` (comma-separated addresses) over
/// the data of one whose masters were on `before` (None: no data yet, or data
/// older than `MASTERS_FILE`). Masters keep each other's addresses in their
/// logs: started on others, they would not find each other (and would call the
/// node bridge's address with no bridge there, i.e. outside this machine).
fn same_masters(before: Option<&str>, now: &str) -> Result<(), String> {
    let Some(before) = before.map(str::trim) else {
        return Ok(());
    };
    if before == now {
        return Ok(());
    }
    let host = |addrs: &str| addrs.split(':').next().unwrap_or("").to_string();
    let nodes = std::net::Ipv4Addr::from(UP_HOST_IP).to_string();
    let how = if host(before) == nodes && host(now) != nodes {
        "It was started with --nodes: to keep its data, run `orc up --nodes N` again"
    } else if host(before) != nodes && host(now) == nodes {
        "It was started without --nodes: to keep its data, run `orc up` without --nodes"
    } else {
        "To keep its data, run `orc up` with the --port it was started with"
    };
    Err(format!(
        "this cluster's masters are on {before}; started on {now} they would not find each other. \
         {how}; to start a new cluster instead, run `orc down --purge` first"
    ))
}

pub async fn up(a: UpArgs) -> Result<i32> {
    let dir = a.dir.unwrap_or_else(default_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("locating the orc binary")?;
    // Node agents live in namespaces of their own: the masters must be
    // reachable from there, on the node bridge.
    let host = if a.nodes > 0 {
        if !nix::unistd::geteuid().is_root() {
            bail!("--nodes runs containers and builds network namespaces: run it as root");
        }
        std::net::Ipv4Addr::from(UP_HOST_IP).to_string()
    } else {
        "127.0.0.1".to_string()
    };
    let addrs: Vec<String> = (1..=3).map(|i| format!("{host}:{}", a.port + i)).collect();
    let marker = dir.join(MASTERS_FILE);
    let before = if dir.join("master-1").exists() {
        std::fs::read_to_string(&marker).ok()
    } else {
        None
    };
    same_masters(before.as_deref(), &addrs.join(","))
        .map_err(|m| anyhow::anyhow!("{}: {m}", dir.display()))?;
    if a.nodes > 0 {
        node_network(a.nodes).await?;
    }
    std::fs::write(&marker, addrs.join(","))
        .with_context(|| format!("writing {}", marker.display()))?;
    let initial: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, ad)| format!("{}={ad}", i + 1))
        .collect();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let pidfile = dir.join(format!("master-{id}.pid"));
        if read_pid(&pidfile).is_some_and(pid_alive) {
            println!("master {id} already running ({addr})");
            continue;
        }
        let log = std::fs::File::create(dir.join(format!("master-{id}.log")))?;
        let child = Command::new(&exe)
            .args([
                "master",
                "--id",
                &id.to_string(),
                "--listen",
                addr,
                "--initial-cluster",
                &initial.join(","),
                "--cluster-cidr",
                "198.18.0.0/17",
                // LoadBalancer addresses on the node bridge's network.
                "--load-balancer-pool",
                "198.18.253.200-198.18.253.250",
            ])
            .arg("--data-dir")
            .arg(dir.join(format!("master-{id}")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting a master")?;
        std::fs::write(&pidfile, child.id().to_string())?;
        println!(
            "master {id} started on {addr} (pid {}, log {})",
            child.id(),
            dir.join(format!("master-{id}.log")).display()
        );
    }
    let cfg = config_path();
    std::fs::create_dir_all(cfg.parent().expect("config has a parent"))?;
    std::fs::write(
        &cfg,
        serde_json::to_string_pretty(&json!({"servers": addrs}))?,
    )?;
    let client = Client::new(addrs.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(st) = client.call(&Request::ClusterStatus).await {
            let all = st["members"]
                .as_array()
                .map(|m| m.len() == 3 && m.iter().all(|x| x["reachable"] == true))
                .unwrap_or(false);
            if !st["leader"].is_null() && all {
                // The bootstrap namespaces are created by the new leader.
                let ns = Request::Get {
                    resource: "namespaces".into(),
                    namespace: String::new(),
                    name: "default".into(),
                };
                if client.call(&ns).await.is_ok() {
                    println!("cluster healthy: leader is master {}", st["leader"]);
                    break;
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not become healthy within 60 s; see the logs in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let simulated = a.simulated_nodes.unwrap_or(if a.nodes > 0 { 0 } else { 2 });
    let registry = format!("{host}:{}", a.port + 10);
    if a.nodes > 0 {
        start_nodes(&dir, &exe, a.nodes, &addrs.join(","), &registry).await?;
    }
    if simulated > 0 {
        let pidfile = dir.join("sim-nodes.pid");
        if read_pid(&pidfile).is_some_and(pid_alive) {
            println!("simulated nodes already running");
        } else {
            let log = std::fs::File::create(dir.join("sim-nodes.log"))?;
            let child = Command::new(&exe)
                .args(["node", "--simulate", "--name-prefix", "sim", "--count"])
                .arg(simulated.to_string())
                .args(["--master", &addrs.join(",")])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .context("starting simulated nodes")?;
            std::fs::write(&pidfile, child.id().to_string())?;
            println!(
                "{} simulated node(s) started (pid {}; they run no containers)",
                simulated,
                child.id()
            );
        }
    }
    if !a.no_demo {
        // Real nodes pull the demo image from the local registry.
        let demo = if a.nodes > 0 {
            DEMO.replace(
                "image: busybox",
                &format!("image: {registry}/busybox:latest"),
            )
        } else {
            DEMO.to_string()
        };
        for o in orc_api::manifest::parse(&demo).map_err(anyhow::Error::msg)? {
            let (obj, outcome) = client.apply(&o, None).await?;
            let kind = obj["kind"].as_str().unwrap_or("").to_ascii_lowercase();
            println!(
                "demo: {kind}/{} {outcome}",
                obj["metadata"]["name"].as_str().unwrap_or("")
            );
        }
    }
    println!(
        "\nThe CLI now talks to {} (written to {}). Try:\n  orc cluster status\n  orc get deploy -n demo\n  orc get pods -n demo -o wide\n  orc get svc -n demo          # then: curl http://EXTERNAL-IP/ or a node address :30002\n  orc get ingress -n demo      # then: curl -H 'Host: web.demo.test' http://198.18.253.1/\n  orc get nodes\n  orc get cm web-config -n demo -o yaml\n  orc get cm -n demo -w        # then, elsewhere: orc apply -f your.yaml\n  orc down                     # stop (add --purge to delete the data)",
        addrs.join(","),
        cfg.display()
    );
    Ok(0)
}

pub async fn down(a: DownArgs) -> Result<i32> {
    let dir = a.dir.unwrap_or_else(default_dir);
    let mut stopped = 0;
    let nodes: Vec<usize> = (1..=64)
        .filter(|i| dir.join(format!("node-{i}")).exists() || up_netns(*i).exists())
        .collect();
    let mut names: Vec<String> = nodes.iter().map(|i| format!("node-{i}")).collect();
    names.extend(
        [
            "ingress",
            "registry",
            "sim-nodes",
            "master-1",
            "master-2",
            "master-3",
        ]
        .map(String::from),
    );
    for name in &names {
        let pidfile = dir.join(format!("{name}.pid"));
        let Some(pid) = read_pid(&pidfile) else {
            continue;
        };
        if pid_alive(pid) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if pid_alive(pid) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            println!("{} stopped (pid {pid})", name.replace('-', " "));
            stopped += 1;
        }
        let _ = std::fs::remove_file(&pidfile);
    }
    // What the agents made (containers, mounts, cgroups, pod namespaces),
    // then the node namespaces and the bridge.
    let exe = std::env::current_exe().context("locating the orc binary")?;
    for i in &nodes {
        let n = orc_agent::reset(&dir.join(format!("node-{i}")), &exe);
        let _ = orc_netlink::delete_netns(&up_netns(*i));
        println!("node-{i}: removed {n} container(s) and its network namespace");
    }
    if !nodes.is_empty() {
        if let Ok(h) = orc_netlink::connect() {
            for i in &nodes {
                let _ = orc_netlink::detach(&h, &format!("orcupn{i}")).await;
            }
            let _ = orc_netlink::detach(&h, UP_BRIDGE).await;
        }
    }
    if stopped == 0 {
        println!("no local masters were running");
    }
    if a.purge {
        std::fs::remove_dir_all(&dir).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        println!("removed {}", dir.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::same_masters;

    #[test]
    fn masters_restart_where_they_were() {
        let local = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";
        let bridge = "198.18.253.254:7001,198.18.253.254:7002,198.18.253.254:7003";
        assert!(same_masters(None, local).is_ok());
        assert!(same_masters(Some(&format!("{local}\n")), local).is_ok());
        let e = same_masters(Some(bridge), local).unwrap_err();
        assert!(e.contains("--nodes N") && e.contains(bridge), "{e}");
        let e = same_masters(Some(local), bridge).unwrap_err();
        assert!(e.contains("without --nodes"), "{e}");
        let e =
            same_masters(Some(local), "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003").unwrap_err();
        assert!(
            e.contains("--port") && e.contains("orc down --purge"),
            "{e}"
        );
    }
}
