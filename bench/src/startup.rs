//! Pod startup. End to end: a local cluster with one real node agent
//! (`orc up --nodes 1`, image present on the node), N pods created through
//! the API, time from each create to Running as a watch sees it. And the
//! runtime alone: create, start, wait and delete of a busybox container
//! through orc's libcontainer path (a shim forked by `orc shim-zygote`)
//! against Debian's runc, on the same bundle, in the same run.
use crate::orc_bin_or_default;
use anyhow::{bail, Context, Result};
use orc_api::request::{Request, WatchRequest};
use orc_api::EventType;
use orc_client::Client;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99, mean) = (
        pct(&v, 0.5),
        pct(&v, 0.99),
        v.iter().sum::<f64>() / v.len().max(1) as f64,
    );
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |",
        v.len(),
        p50 * 1e3,
        p99 * 1e3,
        mean * 1e3
    );
    (p50, p99, mean)
}

/// The cluster of `orc up --nodes 1` in a directory of its own, brought
/// down (and purged) on drop.
struct Up {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Up {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("HOME", self.home.path())
            .env_remove("ORC_SERVER");
        c
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        use std::os::unix::process::CommandExt;
        // In a process group of its own: the signal that interrupted the
        // bench (sent to its whole group) must not stop the clean-up too.
        let _ = self
            .cmd(&["down", "--purge"])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub async fn run(
    pods: usize,
    concurrency: usize,
    rate: f64,
    runs: usize,
    orc_bin: Option<PathBuf>,
    runc: PathBuf,
) -> Result<()> {
    let bin = orc_bin_or_default(orc_bin)?;
    println!(
        "pod startup, orc {}; runtime path vs {}",
        bin.display(),
        runc.display()
    );
    println!();
    if runs > 0 {
        runtime_path(&bin, &runc, runs)?;
        println!();
        if pods > 0 {
            runtime_burst(&bin, &runc, pods, concurrency)?;
            println!();
        }
    }
    if pods == 0 {
        // `--pods 0`: the runtime path alone.
        return Ok(());
    }
    // Interrupted (Ctrl-C, or `timeout`'s SIGTERM): the end-to-end future is
    // dropped, and with it the cluster it started (`orc down --purge`).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = end_to_end(&bin, pods, concurrency, rate) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the cluster is brought down"),
        _ = term.recv() => bail!("terminated; the cluster is brought down"),
    }
}

/// A read-only busybox root filesystem for the runtime comparison.
fn busybox_rootfs(dir: &Path) -> Result<()> {
    let archive = orc_image::busybox_archive(Path::new("/bin/busybox"), "busybox:bench")?;
    let store = orc_image::Store::new(dir.join("images"));
    let tar = dir.join("busybox.tar");
    std::fs::write(&tar, archive)?;
    let img = store.import(&tar)?.pop().context("imported image")?;
    // Copy the one layer into a plain directory (no overlay: the same rootfs for both runtimes).
    let layer = store.layer_dir(&img.layers[0])?;
    let ok = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", layer.display()))
        .arg(dir.join("rootfs"))
        .status()?;
    if !ok.success() {
        bail!("copying the rootfs");
    }
    Ok(())
}

/// What both runtime comparisons share: a directory with the busybox root
/// filesystem, orc's runtime over it, and runc's state; the containers'
/// parent cgroup `/orc-bench` goes when it is dropped.
struct RuntimeBench {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    rt: orc_container::Runtime,
    runc_root: PathBuf,
}

impl RuntimeBench {
    fn new(prefix: &str, bin: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(&rootfs)?;
        busybox_rootfs(dir.path())?;
        let rt = orc_container::Runtime::new(
            dir.path().join("containers"),
            dir.path().join("state"),
            bin,
        );
        let runc_root = dir.path().join("runc-state");
        Ok(RuntimeBench {
            dir,
            rootfs,
            rt,
            runc_root,
        })
    }

    /// A runc bundle for `id`: orc's spec for `cfg` over the same rootfs.
    fn runc_bundle(&self, id: &str, cfg: &orc_container::ContainerConfig) -> Result<PathBuf> {
        let rb = self.dir.path().join("runc").join(id);
        std::fs::create_dir_all(&rb)?;
        let mut spec = orc_container::spec::oci_spec(cfg);
        orc_container::spec::inline_seccomp(&mut spec);
        spec["root"]["path"] = json!(self.rootfs);
        std::fs::write(rb.join("config.json"), serde_json::to_vec(&spec)?)?;
        Ok(rb)
    }
}

impl Drop for RuntimeBench {
    fn drop(&mut self) {
        for d in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(d.path().join("orc-bench"));
        }
    }
}

/// The orc-against-runc table of one comparison.
fn report(title: &str, count: &str, orc_t: Vec<f64>, runc_t: Vec<f64>) {
    println!("{title}");
    println!();
    println!("| runtime | {count} | p50 ms | p99 ms | mean ms |");
    println!("|---|---:|---:|---:|---:|");
    let (o50, _, _) = summary("orc (libcontainer, forked shim)", orc_t);
    let (r50, _, _) = summary("runc (Debian)", runc_t);
    println!();
    println!("orc/runc median time: {:.2}x", o50 / r50);
}

fn runtime_path(bin: &Path, runc: &Path, runs: usize) -> Result<()> {
    let b = RuntimeBench::new("orc-bench-rt-", bin)?;
    let (dir, rt) = (&b.dir, &b.rt);
    let cfg = orc_container::ContainerConfig {
        args: vec!["/bin/true".into()],
        env: vec!["PATH=/bin".into()],
        hostname: "bench".into(),
        readonly_rootfs: true,
        ..Default::default()
    };
    let mut orc_t = vec![];
    let mut runc_t = vec![];
    for i in 0..runs {
        // orc: bundle, shim start through libcontainer, exit, delete.
        let id = format!("orcbench{i}");
        let mut c = cfg.clone();
        c.cgroup_path = format!("/orc-bench/{id}");
        let t = Instant::now();
        let bundle = rt.write_spec(&id, &c)?;
        std::os::unix::fs::symlink(&b.rootfs, bundle.join("rootfs"))?;
        rt.start(&id, &dir.path().join("logs").join(format!("{id}.log")))?;
        while !matches!(rt.state(&id), orc_container::State::Exited(_)) {
            std::thread::sleep(Duration::from_micros(500));
        }
        std::fs::remove_file(bundle.join("rootfs"))?;
        rt.remove(&id)?;
        orc_t.push(t.elapsed().as_secs_f64());
        // runc: the same config.json and rootfs; `runc run` creates, starts, waits and deletes.
        let id = format!("runcbench{i}");
        let rb = b.runc_bundle(
            &id,
            &orc_container::ContainerConfig {
                cgroup_path: format!("/orc-bench/{id}"),
                ..cfg.clone()
            },
        )?;
        let t = Instant::now();
        let st = Command::new(runc)
            .arg("--root")
            .arg(&b.runc_root)
            .args(["run", "--bundle"])
            .arg(&rb)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !st.status.success() {
            bail!("runc run: {}", String::from_utf8_lossy(&st.stderr));
        }
        runc_t.push(t.elapsed().as_secs_f64());
    }
    report(
        &format!("runtime path: create, start, wait for exit and delete a busybox `true` container, {runs} runs each, alternating"),
        "runs",
        orc_t,
        runc_t,
    );
    Ok(())
}

/// The runtime alone under the end-to-end burst: `n` long-running busybox
/// containers started `concurrency` at a time, through orc's path and through
/// `runc run -d`, one runtime after the other. Each container's time is from
/// the start of the burst until its runtime reports it started, which bounds
/// from below what any pod burst of the same size can reach on this machine.
fn runtime_burst(bin: &Path, runc: &Path, n: usize, concurrency: usize) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let b = RuntimeBench::new("orc-bench-burst-", bin)?;
    let (dir, rt) = (&b.dir, &b.rt);
    let cfg = |id: &str| orc_container::ContainerConfig {
        args: vec!["/bin/sleep".into(), "3600".into()],
        env: vec!["PATH=/bin".into()],
        hostname: "bench".into(),
        readonly_rootfs: true,
        cgroup_path: format!("/orc-bench/{id}"),
        ..Default::default()
    };
    // Bundles are written before the clock starts, for both runtimes.
    for i in 0..n {
        let id = format!("orcburst{i}");
        let bundle = rt.write_spec(&id, &cfg(&id))?;
        std::os::unix::fs::symlink(&b.rootfs, bundle.join("rootfs"))?;
        let id = format!("runcburst{i}");
        b.runc_bundle(&id, &cfg(&id))?;
    }
    let burst = |start: &(dyn Fn(usize) -> Result<()> + Sync)| -> Result<Vec<f64>> {
        let next = AtomicUsize::new(0);
        let times = Mutex::new(vec![]);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                return Ok(());
                            }
                            start(i)?;
                            times.lock().unwrap().push(t0.elapsed().as_secs_f64());
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("burst worker"))
        })?;
        Ok(times.into_inner().unwrap())
    };
    let logs = dir.path().join("logs");
    let orc_t = burst(&|i| {
        let id = format!("orcburst{i}");
        rt.start(&id, &logs.join(format!("{id}.log")))?;
        Ok(())
    });
    for i in 0..n {
        let id = format!("orcburst{i}");
        let _ = std::fs::remove_file(rt.bundle(&id).join("rootfs"));
        let _ = rt.remove(&id);
    }
    // A detached container inherits runc's stdio: errors go to runc's log file.
    let runc_cmd = |args: &[&str], id: &str, log: &Path| {
        Command::new(runc)
            .arg("--root")
            .arg(&b.runc_root)
            .arg("--log")
            .arg(log)
            .args(args)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    let runc_t = burst(&|i| {
        let id = format!("runcburst{i}");
        let rb = dir.path().join("runc").join(&id);
        let log = rb.join("runc.log");
        if !runc_cmd(&["run", "-d", "--bundle", &rb.to_string_lossy()], &id, &log)?.success() {
            bail!(
                "runc run -d: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    });
    for i in 0..n {
        let id = format!("runcburst{i}");
        let log = dir.path().join("runc").join(&id).join("runc.log");
        let _ = runc_cmd(&["delete", "--force"], &id, &log);
    }
    report(
        &format!(
            "runtime burst: {n} busybox `sleep` containers started {concurrency} at a time; \
             time from the start of the burst until each is started"
        ),
        "containers",
        orc_t?,
        runc_t?,
    );
    Ok(())
}

/// The image `orc up` pushes to its registry (`--port 7400`: registry on 7410).
const IMAGE: &str = "198.18.253.254:7410/busybox:latest";

fn pod_object(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"bench": "startup"}},
           "spec": {"terminationGracePeriodSeconds": 0, "containers": [{"name": "c", "image": IMAGE,
                    "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]}})
}

async fn end_to_end(bin: &Path, pods: usize, concurrency: usize, rate: f64) -> Result<()> {
    let up = Up {
        bin: bin.to_path_buf(),
        home: tempfile::Builder::new().prefix("orc-bench-up-").tempdir()?,
    };
    let out = up
        .cmd(&["up", "--nodes", "1", "--no-demo", "--port", "7400"])
        .output()?;
    if !out.status.success() {
        bail!(
            "orc up --nodes 1: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let servers: Vec<String> = (1..=3)
        .map(|i| format!("198.18.253.254:{}", 7400 + i))
        .collect();
    let client = Client::new(servers);
    // Wait for the node, then pull the image once with a warm-up pod.
    let start = Instant::now();
    loop {
        let nodes = crate::list_all(&client, "nodes").await?;
        if nodes["items"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["spec"]["podCIDR"].is_string()))
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the node did not register");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client
        .call(&Request::Create {
            object: pod_object("warmup"),
            namespace: None,
        })
        .await?;
    loop {
        let p = client
            .call(&Request::Get {
                resource: "pods".into(),
                namespace: "default".into(),
                name: "warmup".into(),
            })
            .await?;
        if p["status"]["phase"] == "Running" {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the warm-up pod did not run: {}", p["status"]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rx = client
        .watch(WatchRequest {
            resource: "pods".into(),
            namespace: Some("default".into()),
            label_selector: "bench=startup".into(),
            field_selector: String::new(),
            resource_version: None,
            bookmarks: false,
        })
        .await;
    let created: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    eprintln!("image present; creating {pods} pods");
    let cpu0 = machine_cpu();
    let t0 = Instant::now();
    let creator = {
        let (client, created) = (
            Client::new(
                (1..=3)
                    .map(|i| format!("198.18.253.254:{}", 7400 + i))
                    .collect(),
            ),
            created.clone(),
        );
        tokio::spawn(async move {
            let names: Vec<String> = (0..pods).map(|i| format!("p{i}")).collect();
            let gap = Duration::from_secs_f64(if rate > 0.0 {
                concurrency.max(1) as f64 / rate
            } else {
                0.0
            });
            let mut next = Instant::now();
            for chunk in names.chunks(concurrency.max(1)) {
                tokio::time::sleep_until(next.into()).await;
                next += gap;
                let reqs = chunk.iter().map(|n| {
                    let created = created.clone();
                    let client = &client;
                    let obj = pod_object(n);
                    async move {
                        created.lock().unwrap().insert(n.clone(), Instant::now());
                        client
                            .call(&Request::Create {
                                object: obj,
                                namespace: None,
                            })
                            .await
                    }
                });
                for r in futures::future::join_all(reqs).await {
                    r?;
                }
            }
            anyhow::Ok(t0.elapsed())
        })
    };
    let mut running: HashMap<String, f64> = HashMap::new();
    // When each pod was first seen bound to the node (for the timeline).
    let mut bound: HashMap<String, f64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while running.len() < pods {
        let ev = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .context("pods did not all run within 600 s")?;
        let Some(Ok(ev)) = ev else {
            bail!("the watch ended")
        };
        if ev.event_type == EventType::Error {
            bail!("watch error: {}", ev.object);
        }
        let name = ev.object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if ev.object["spec"]["nodeName"].is_string() && !bound.contains_key(&name) {
            bound.insert(name.clone(), t0.elapsed().as_secs_f64());
        }
        if ev.object["status"]["phase"] == "Running"
            && name != "warmup"
            && !running.contains_key(&name)
        {
            if let Some(t) = created.lock().unwrap().get(&name) {
                running.insert(name, t.elapsed().as_secs_f64());
            }
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let cpu = machine_cpu().zip(cpu0).map(|(b, a)| (b.0 - a.0, b.1 - a.1));
    let created_in = creator.await??;
    if std::env::var_os("ORC_BENCH_TIMELINE").is_some() {
        let created = created.lock().unwrap();
        let mut rows: Vec<(f64, f64, f64, &String)> = running
            .iter()
            .map(|(n, lat)| {
                let c = created[n].duration_since(t0).as_secs_f64();
                (c, bound.get(n).copied().unwrap_or(f64::NAN), c + lat, n)
            })
            .collect();
        rows.sort_by(|a, b| a.2.total_cmp(&b.2));
        for (c, b, r, n) in rows {
            eprintln!(
                "{n}: created {:.0} ms, bound {:.0} ms, Running {:.0} ms",
                c * 1e3,
                b * 1e3,
                r * 1e3
            );
        }
    }
    let pace = if rate > 0.0 {
        format!("{rate} pods/s")
    } else {
        "as fast as they are answered".to_string()
    };
    println!("end to end: {pods} busybox pods (`sleep 3600`, image present) created through the API, {concurrency} at a time, {pace}, onto one real node agent; time from create to Running on a watch");
    println!();
    println!("| measure | pods | p50 ms | p99 ms | mean ms |");
    println!("|---|---:|---:|---:|---:|");
    summary("create -> Running", running.into_values().collect());
    println!();
    println!(
        "all {pods} Running after {total:.1} s ({:.1} pods/s); the last create was answered after {:.2} s",
        pods as f64 / total,
        created_in.as_secs_f64()
    );
    if let Some((busy, steal)) = cpu {
        println!(
            "the machine's CPUs were busy for {busy:.2} CPU-s meanwhile ({:.1} ms per pod, {:.0} % of {} CPUs); the hypervisor took {:.0} ms of CPU time from this VM (steal)",
            busy * 1e3 / pods as f64,
            busy * 100.0 / total / crate::num_cpus() as f64,
            crate::num_cpus(),
            steal * 1e3
        );
    }
    Ok(())
}

/// CPU time the whole machine has spent busy (user, nice, system, irq,
/// softirq) and, in a VM, the time the hypervisor ran something else while
/// this machine had work (steal), in seconds, from `/proc/stat`.
fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let ticks = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    let steal = v.get(7).copied().unwrap_or(0);
    // USER_HZ, 100 on Linux (as `cpu_ticks` assumes).
    Some((ticks as f64 / 100.0, steal as f64 / 100.0))
}
