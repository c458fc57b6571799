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
    #[arg(long, default_value_t = 2)]
    simulated_nodes: usize,
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
        command: ["httpd", "-f", "-p", "80"]
"#;

pub async fn up(a: UpArgs) -> Result<i32> {
    let dir = a.dir.unwrap_or_else(default_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("locating the orc binary")?;
    let addrs: Vec<String> = (1..=3)
        .map(|i| format!("127.0.0.1:{}", a.port + i))
        .collect();
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
    if a.simulated_nodes > 0 {
        let pidfile = dir.join("sim-nodes.pid");
        if read_pid(&pidfile).is_some_and(pid_alive) {
            println!("simulated nodes already running");
        } else {
            let log = std::fs::File::create(dir.join("sim-nodes.log"))?;
            let child = Command::new(&exe)
                .args(["node", "--simulate", "--name-prefix", "sim", "--count"])
                .arg(a.simulated_nodes.to_string())
                .args(["--master", &addrs.join(",")])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .context("starting simulated nodes")?;
            std::fs::write(&pidfile, child.id().to_string())?;
            println!(
                "{} simulated node(s) started (pid {}; they run no containers: the node agent comes later)",
                a.simulated_nodes,
                child.id()
            );
        }
    }
    if !a.no_demo {
        for o in orc_api::manifest::parse(DEMO).map_err(anyhow::Error::msg)? {
            let (obj, outcome) = client.apply(&o, None).await?;
            let kind = obj["kind"].as_str().unwrap_or("").to_ascii_lowercase();
            println!(
                "demo: {kind}/{} {outcome}",
                obj["metadata"]["name"].as_str().unwrap_or("")
            );
        }
    }
    println!(
        "\nThe CLI now talks to {} (written to {}). Try:\n  orc cluster status\n  orc get deploy -n demo\n  orc get pods -n demo -o wide\n  orc get nodes\n  orc get cm web-config -n demo -o yaml\n  orc get cm -n demo -w        # then, elsewhere: orc apply -f your.yaml\n  orc down                     # stop (add --purge to delete the data)",
        addrs.join(","),
        cfg.display()
    );
    Ok(0)
}

pub fn down(a: DownArgs) -> Result<i32> {
    let dir = a.dir.unwrap_or_else(default_dir);
    let mut stopped = 0;
    for name in ["sim-nodes", "master-1", "master-2", "master-3"] {
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
