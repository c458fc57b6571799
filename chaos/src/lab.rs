//! A lab of real node agents on this machine: a bridge in the host namespace
//! (the masters listen on its address) and one network namespace per node,
//! each with its own address on the bridge, all inside 198.18.254.0/24.
//! Dropping the lab kills the agents, resets what they made (containers,
//! mounts, cgroups, pod namespaces) and removes the namespaces and bridge,
//! also when a test fails. The harness itself uses iproute2; the product's
//! pod network does not.
use crate::{orc_bin, Process};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const MASTER_IP: &str = "198.18.254.254";

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn must(args: &[&str]) {
    assert!(ip(args), "ip {}", args.join(" "));
}

/// A busybox image tarball (`orc image busybox`) in `dir`, tagged
/// busybox:1.35: a tag other than latest, so the default pull policy is
/// IfNotPresent.
pub fn busybox_image(dir: &Path) -> PathBuf {
    let out = dir.join("busybox.tar");
    let s = Command::new(orc_bin())
        .args(["image", "busybox"])
        .arg(&out)
        .args(["--tag", "busybox:1.35"])
        .status()
        .expect("orc image busybox");
    assert!(s.success(), "building the busybox image");
    out
}

pub struct Node {
    pub name: String,
    pub netns: String,
    pub address: String,
    pub data_dir: PathBuf,
    pub agent: Option<Process>,
}

pub struct Lab {
    pub bridge: String,
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

impl Lab {
    /// A bridge and `n` node namespaces; data directories under `dir`.
    pub fn new(dir: &Path, n: usize) -> Lab {
        let tag = std::process::id() % 100_000;
        let bridge = format!("orclab{tag}");
        let mut lab = Lab {
            bridge: bridge.clone(),
            nodes: vec![],
            dir: dir.to_path_buf(),
        };
        must(&["link", "add", &bridge, "type", "bridge"]);
        must(&["addr", "add", &format!("{MASTER_IP}/24"), "dev", &bridge]);
        must(&["link", "set", &bridge, "up"]);
        for i in 1..=n {
            let netns = format!("orclab{tag}-n{i}");
            let host_end = format!("ol{tag}n{i}");
            let address = format!("198.18.254.{i}");
            lab.nodes.push(Node {
                name: format!("node-{i}"),
                netns: netns.clone(),
                address: address.clone(),
                data_dir: dir.join(format!("node-{i}")),
                agent: None,
            });
            must(&["netns", "add", &netns]);
            must(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ]);
            must(&["link", "set", &host_end, "master", &bridge, "up"]);
            must(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]);
            must(&["-n", &netns, "link", "set", "eth0", "up"]);
            must(&["-n", &netns, "link", "set", "lo", "up"]);
            must(&["-n", &netns, "route", "add", "default", "via", MASTER_IP]);
        }
        lab
    }

    /// Import an image tarball into node `i`'s store (0-based).
    pub fn import(&self, i: usize, tarball: &Path) {
        let out = Command::new(orc_bin())
            .args(["image", "import"])
            .arg(tarball)
            .arg("--data-dir")
            .arg(&self.nodes[i].data_dir)
            .output()
            .expect("orc image import");
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start (or restart) the agent of node `i` against `masters`.
    pub fn start_agent(&mut self, i: usize, masters: &str, extra: &[&str]) {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", n.name)))
            .expect("agent log");
        let child = Command::new(orc_bin())
            .args([
                "node",
                "--name",
                &n.name,
                "--master",
                masters,
                "--node-ip",
                &n.address,
            ])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--netns")
            .arg(format!("/run/netns/{}", n.netns))
            // Names outside the cluster must not leave the machine in tests.
            .args(["--dns-upstream", "none"])
            .args(extra)
            .env("ORC_LOG", "info,libcgroups=error,libcontainer=error")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn orc node");
        n.agent = Some(Process { child: Some(child) });
    }

    /// SIGKILL node `i`'s agent (its containers keep running).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill();
        }
    }

    /// Debian's `docker-registry` (the reference OCI distribution server)
    /// on the bridge address; returns it and its HOST:PORT.
    pub fn start_registry(&self) -> (Process, String) {
        let port = crate::free_port();
        let addr = format!("{MASTER_IP}:{port}");
        let cfg = self.dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                self.dir.join("registry").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(self.dir.join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        crate::wait_for("the registry", std::time::Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        });
        (Process { child: Some(child) }, addr)
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }

    /// Link names inside node `i`'s namespace.
    pub fn links(&self, i: usize) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.nodes[i].netns, "-o", "link"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                a.kill();
            }
            let _ = Command::new(orc_bin())
                .args(["node", "--reset", "--data-dir"])
                .arg(&n.data_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "del", &n.netns]);
        }
        ip(&["link", "del", &self.bridge]);
    }
}
