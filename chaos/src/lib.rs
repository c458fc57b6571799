//! Fault injection against real orc processes: start masters as child processes on
//! loopback ports, `kill -9` and restart them, drive them through the `orc` CLI as
//! a user would, and check what they answer. The tests in `tests/` use it.
//!
//! It depends on nothing of orc's but the built `orc` binary (found next to the test
//! executable, or at $ORC_BIN). Every process it starts is killed when the
//! `Cluster` is dropped, including when a test panics.
pub mod lab;

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `orc` binary under test.
pub fn orc_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ORC_BIN") {
        return PathBuf::from(p);
    }
    // target/debug/deps/<test> -> target/debug/orc
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("orc");
    assert!(
        p.exists(),
        "{} not found: build it first (cargo build -p orc) or set ORC_BIN",
        p.display()
    );
    p
}

/// A free loopback port (bound and released).
/// A port nothing listens on, for a server a test starts. It comes from
/// below Linux's ephemeral range (32768-60999), where a port the kernel
/// handed out with `bind(:0)` could be taken, before the server binds it,
/// as the local port of some other test's outgoing connection (a master
/// once failed with "Address already in use" that way). Ports are not
/// handed out twice in one test process.
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in 20000-31999");
}

pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

impl From<Output> for CliOutput {
    fn from(o: Output) -> Self {
        CliOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run the CLI with `HOME` set to `home` (so no user config is read), `args`, and
/// `stdin` piped in if given.
pub fn run_orc(home: &Path, args: &[&str], stdin: Option<&str>) -> CliOutput {
    use std::io::Write;
    let mut cmd = Command::new(orc_bin());
    cmd.args(args).env("HOME", home).env_remove("ORC_SERVER");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn orc");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("orc output").into()
}

pub struct Master {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl Master {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub masters: Vec<Master>,
    initial: String,
    extra: Vec<String>,
}

impl Cluster {
    /// Start `n` masters (ids 1..=n) with extra `orc master` flags, and wait until
    /// they have a leader that every one of them names.
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        Self::start_on("127.0.0.1", n, extra)
    }

    /// `start` with the masters listening on `host` (an address of this machine).
    pub fn start_on(host: &str, n: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("orc-chaos-")
            .tempdir()
            .expect("tempdir");
        let masters: Vec<Master> = (1..=n)
            .map(|id| Master {
                id,
                addr: format!("{host}:{}", free_port()),
                data_dir: dir.path().join(format!("m{id}")),
                child: None,
            })
            .collect();
        let initial = masters
            .iter()
            .map(|m| format!("{}={}", m.id, m.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            masters,
            initial,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n {
            c.spawn(id);
        }
        c.wait_leader(Duration::from_secs(30));
        c
    }

    fn master(&self, id: u64) -> &Master {
        self.masters
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no master {id}"))
    }

    fn master_mut(&mut self, id: u64) -> &mut Master {
        self.masters
            .iter_mut()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no master {id}"))
    }

    fn spawn(&mut self, id: u64) {
        let initial = self.initial.clone();
        let extra = self.extra.clone();
        let log_path = self.dir.path().join(format!("m{id}.log"));
        let m = self.master_mut(id);
        assert!(m.child.is_none(), "master {id} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let child = Command::new(orc_bin())
            .args([
                "master",
                "--id",
                &id.to_string(),
                "--listen",
                &m.addr,
                "--initial-cluster",
                &initial,
            ])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn orc master");
        m.child = Some(child);
    }

    /// Add a master process that is not in the initial cluster (to be joined with
    /// `cluster add-master`). Returns its address.
    pub fn spawn_new_master(&mut self, id: u64) -> String {
        let m = Master {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            data_dir: self.dir.path().join(format!("m{id}")),
            child: None,
        };
        let addr = m.addr.clone();
        self.masters.push(m);
        self.spawn(id);
        addr
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.master_mut(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (a clean stop, so the data dir can be opened offline).
    pub fn stop(&mut self, id: u64) {
        if let Some(mut c) = self.master_mut(id).child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, id: u64) {
        self.kill(id);
        self.spawn(id);
    }

    pub fn addr(&self, id: u64) -> String {
        self.master(id).addr.clone()
    }

    /// Every running master's address, comma-separated.
    pub fn servers(&self) -> String {
        self.masters
            .iter()
            .filter(|m| m.running())
            .map(|m| m.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.masters
            .iter()
            .filter(|m| m.running())
            .map(|m| m.id)
            .collect()
    }

    /// Run the CLI against `server` (one address or a list).
    pub fn orc(&self, server: &str, args: &[&str]) -> CliOutput {
        self.orc_stdin(server, args, None)
    }

    pub fn orc_stdin(&self, server: &str, args: &[&str], stdin: Option<&str>) -> CliOutput {
        let mut all = vec!["--server", server];
        all.extend_from_slice(args);
        run_orc(self.dir.path(), &all, stdin)
    }

    /// `cluster status -o json` through one master.
    pub fn status(&self, via: u64) -> Option<Value> {
        let o = self.orc(&self.addr(via), &["cluster", "status", "-o", "json"]);
        if o.ok() {
            serde_json::from_str(&o.stdout).ok()
        } else {
            None
        }
    }

    /// Master `id`'s entry in `cluster status`, asked through master `via`.
    pub fn member(&self, via: u64, id: u64) -> Value {
        let st = self.status(via).expect("status");
        st["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no member {id}: {st}"))
    }

    /// The leader every running master agrees on.
    pub fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<Option<u64>> = self
                .running_ids()
                .iter()
                .map(|id| self.status(*id).and_then(|s| s["leader"].as_u64()))
                .collect();
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l)) && self.running_ids().contains(l) {
                    return *l;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {timeout:?}: {leaders:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every running master has applied at least `index`.
    pub fn wait_applied(&self, index: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for id in self.running_ids() {
            loop {
                let applied = self.status(id).and_then(|s| {
                    s["members"].as_array()?.iter().find(|m| m["id"] == id)?["applied_index"]
                        .as_u64()
                });
                if applied.is_some_and(|a| a >= index) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "master {id} did not apply {index} in time (at {applied:?})"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Create a ConfigMap through `server`: true when acknowledged.
    pub fn create_cm(&self, server: &str, ns: &str, name: &str, value: &str) -> CliOutput {
        let doc = format!("{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{ns}\"}},\"data\":{{\"v\":\"{value}\"}}}}");
        self.orc_stdin(server, &["create", "-f", "-"], Some(&doc))
    }

    /// Every master's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.masters {
            let p = self.dir.path().join(format!("m{}.log", m.id));
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- master {} log (last lines)\n", m.id));
            for l in tail.iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Offline store check of a stopped master (see `orc debug check-store`).
    pub fn check_store(&self, id: u64) -> Value {
        let m = self.master(id);
        assert!(!m.running(), "stop master {id} first");
        let o: CliOutput = Command::new(orc_bin())
            .args(["debug", "check-store"])
            .arg(&m.data_dir)
            .output()
            .expect("orc debug")
            .into();
        assert!(
            o.ok(),
            "store of master {id} failed its check: {} {}",
            o.stdout,
            o.stderr
        );
        o.json()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.masters {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Process {
    pub(crate) child: Option<Child>,
}

impl Process {
    /// Own a spawned child: it is killed when this is dropped.
    pub fn from_child(child: Child) -> Process {
        Process { child: Some(child) }
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether it has exited (and been reaped).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Cluster {
    /// Start `orc node --simulate` with `count` nodes named `prefix-i` and extra flags.
    pub fn sim_nodes(&self, prefix: &str, count: usize, extra: &[&str]) -> Process {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("sim-{prefix}.log")))
            .expect("log file");
        let child = Command::new(orc_bin())
            .args(["node", "--simulate", "--name-prefix", prefix, "--count"])
            .arg(count.to_string())
            .args(["--master", &self.servers()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn orc node");
        Process { child: Some(child) }
    }

    /// `orc apply -f -` of `yaml` through any master; it must succeed.
    pub fn apply(&self, yaml: &str) {
        let o = self.orc_stdin(&self.servers(), &["apply", "-f", "-"], Some(yaml));
        assert!(o.ok(), "apply: {}", o.stderr);
    }

    /// Wait until `n` Nodes are Ready and have a podCIDR.
    pub fn wait_ready_nodes(&self, n: usize, timeout: Duration) {
        wait_for(&format!("{n} Ready nodes with podCIDRs"), timeout, || {
            let nodes = self.items(&["nodes"]);
            (nodes.len() == n
                && nodes.iter().all(|node| {
                    node["spec"]["podCIDR"].is_string()
                        && node["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                }))
            .then_some(())
        });
    }

    /// The pods of namespace `ns` matching `selector` that are Ready and
    /// not being deleted.
    pub fn ready_pods(&self, ns: &str, selector: &str) -> Vec<Value> {
        self.items(&["-n", ns, "pods", "-l", selector])
            .into_iter()
            .filter(|p| {
                p["metadata"]["deletionTimestamp"].is_null()
                    && p["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            })
            .collect()
    }

    /// `orc get RESOURCE -o json` items (any master), with extra args.
    pub fn items(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let o = self.orc(&self.servers(), &all);
        if !o.ok() {
            return Vec::new();
        }
        let v = o.json();
        match v["items"].as_array() {
            Some(a) => a.clone(),
            None if v.is_object() => vec![v],
            None => Vec::new(),
        }
    }

    /// Start a long-running CLI process (a watch) writing its stdout to a file.
    pub fn spawn_cli(&self, args: &[&str], out: &Path) -> Process {
        let f = std::fs::File::create(out).expect("out file");
        let child = Command::new(orc_bin())
            .args(["--server", &self.servers()])
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("ORC_SERVER")
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn orc");
        Process { child: Some(child) }
    }
}

/// Poll `f` every 200 ms until it gives a value; panic with `what` after `timeout`.
/// The last `n` lines of `s` (for failure messages).
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
