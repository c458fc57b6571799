//! `pods`: scheduling throughput on simulated nodes. Three masters, one
//! `orc node --simulate` process with N hollow nodes, Deployments totalling P
//! pods; a watch records when each pod is first seen, bound and Running.
use crate::{cpu_ticks, list_all, log_file, ms, orc_bin_or_default, start_orc, Procs};
use anyhow::{bail, Context, Result};
use orc_api::request::{Request, WatchRequest};
use orc_api::EventType;
use orc_client::Client;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default, Clone, Copy)]
struct Seen {
    added: Option<Instant>,
    bound: Option<Instant>,
    running: Option<Instant>,
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

pub async fn run(
    nodes: usize,
    pods: usize,
    deployments: usize,
    orc_bin: Option<PathBuf>,
    mut orc_args: Vec<String>,
    keep: bool,
) -> Result<()> {
    let orc_bin = orc_bin_or_default(orc_bin)?;
    let dir = tempfile::Builder::new()
        .prefix("orc-bench-pods-")
        .tempdir()?;
    let mut procs = Procs(Vec::new());
    // Room for 1,000+ nodes: a /26 of pod addresses each out of a /15.
    orc_args.extend(
        [
            "--cluster-cidr",
            "198.18.0.0/15",
            "--node-cidr-mask-size",
            "26",
        ]
        .map(String::from),
    );
    let addrs = start_orc(&orc_bin, &orc_args, dir.path(), &mut procs).await?;
    let masters: Vec<u32> = procs.0.iter().map(|c| c.id()).collect();
    let log = log_file(dir.path(), "sim.log")?;
    let sim = Command::new(&orc_bin)
        .args([
            "node",
            "--simulate",
            "--name-prefix",
            "sim",
            "--count",
            &nodes.to_string(),
        ])
        .args([
            "--master",
            &addrs.join(","),
            "--cpu",
            "64",
            "--memory",
            "256Gi",
            "--pods",
            "110",
        ])
        .args(["--lease-every", "10", "--status-every", "60"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting simulated nodes")?;
    let sim_pid = sim.id();
    procs.0.push(sim);
    let client = Arc::new(Client::new(addrs.clone()));
    let t_nodes = Instant::now();
    loop {
        let l = list_all(&client, "nodes").await?;
        let items = l["items"].as_array().map(Vec::len).unwrap_or(0);
        let with_cidr = l["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| n["spec"]["podCIDR"].is_string())
                    .count()
            })
            .unwrap_or(0);
        if items == nodes && with_cidr == nodes {
            break;
        }
        if t_nodes.elapsed() > Duration::from_secs(300) {
            bail!(
                "only {items} nodes ({with_cidr} with a podCIDR) after 300 s; logs in {}",
                dir.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{nodes} simulated nodes registered in {:.1} s",
        t_nodes.elapsed().as_secs_f64()
    );
    client
        .call(&Request::Create {
            object: json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}),
            namespace: None,
        })
        .await?;
    // Watch every pod in the namespace.
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let running = Arc::new(tokio::sync::Notify::new());
    let mut rx = client
        .watch(WatchRequest {
            resource: "pods".into(),
            namespace: Some("bench".into()),
            label_selector: String::new(),
            field_selector: String::new(),
            resource_version: None,
            bookmarks: true,
        })
        .await;
    let pod_events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (seen2, running2, events2) = (seen.clone(), running.clone(), pod_events.clone());
    let watcher = tokio::spawn(async move {
        let mut done = 0;
        while let Some(ev) = rx.recv().await {
            let Ok(ev) = ev else { break };
            if ev.event_type == EventType::Bookmark {
                continue;
            }
            let now = Instant::now();
            events2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = ev.object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let mut m = seen2.lock().unwrap();
            let s = m.entry(name).or_default();
            s.added.get_or_insert(now);
            if ev.object["spec"]["nodeName"].is_string() {
                s.bound.get_or_insert(now);
            }
            if ev.object["status"]["phase"] == "Running" && s.running.is_none() {
                s.running = Some(now);
                done += 1;
                if done == pods {
                    running2.notify_one();
                }
            }
        }
    });
    let index_before = applied_index(&client).await?;
    let t_cpu = cpu_ticks(&masters) + cpu_ticks(&[sim_pid]);
    let t_masters = cpu_ticks(&masters);
    let t_each: Vec<u64> = masters.iter().map(|m| cpu_ticks(&[*m])).collect();
    let start = Instant::now();
    let per = pods / deployments.max(1);
    let mut creates = Vec::new();
    for d in 0..deployments {
        let n = if d + 1 == deployments {
            pods - per * (deployments - 1)
        } else {
            per
        };
        let c = client.clone();
        creates.push(tokio::spawn(async move {
            c.call(&Request::Create {
                object: json!({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": format!("load-{d}"), "namespace": "bench"},
                    "spec": {"replicas": n, "selector": {"matchLabels": {"app": format!("load-{d}")}},
                        "template": {"metadata": {"labels": {"app": format!("load-{d}")}},
                            "spec": {"containers": [{"name": "c", "image": "registry.local/pause:3.9",
                                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}}),
                namespace: None,
            })
            .await
        }));
    }
    for c in creates {
        c.await??;
    }
    if tokio::time::timeout(Duration::from_secs(900), running.notified())
        .await
        .is_err()
    {
        let m = seen.lock().unwrap();
        bail!(
            "only {} of {pods} pods Running after 900 s ({} bound); logs in {}",
            m.values().filter(|s| s.running.is_some()).count(),
            m.values().filter(|s| s.bound.is_some()).count(),
            dir.path().display()
        );
    }
    let elapsed = start.elapsed();
    let cpu = cpu_ticks(&masters) + cpu_ticks(&[sim_pid]) - t_cpu;
    let cpu_masters = cpu_ticks(&masters) - t_masters;
    let each: Vec<String> = masters
        .iter()
        .zip(&t_each)
        .map(|(m, t)| format!("{:.1}", (cpu_ticks(&[*m]) - t) as f64 / 100.0))
        .collect();
    let writes = applied_index(&client).await?.saturating_sub(index_before);
    watcher.abort();
    let pod_events = pod_events.load(std::sync::atomic::Ordering::Relaxed);
    let m = seen.lock().unwrap().clone();
    let bound: Vec<Duration> = m
        .values()
        .filter_map(|s| Some(s.bound? - s.added?))
        .collect();
    let run: Vec<Duration> = m
        .values()
        .filter_map(|s| Some(s.running? - s.added?))
        .collect();
    let last_running = m.values().filter_map(|s| s.running).max().unwrap_or(start);
    let first = m.values().filter_map(|s| s.added).min().unwrap_or(start);
    let span = last_running - first;
    let hz = 100.0;
    println!();
    println!("| nodes | pods | deployments | pods/s (created → Running) | wall s | bound p50 ms | bound p99 ms | Running p50 ms | Running p99 ms | CPU s (masters) | CPU s (masters + sim) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {nodes} | {pods} | {deployments} | {:.0} | {:.1} | {} | {} | {} | {} | {:.1} | {:.1} |",
        pods as f64 / span.as_secs_f64(),
        elapsed.as_secs_f64(),
        ms(pct(bound.clone(), 0.5)),
        ms(pct(bound, 0.99)),
        ms(pct(run.clone(), 0.5)),
        ms(pct(run, 0.99)),
        cpu_masters as f64 / hz,
        cpu as f64 / hz,
    );
    println!();
    println!(
        "Raft log entries during the run: {writes} ({:.2} per pod); pod watch events: {pod_events} ({:.2} per pod)",
        writes as f64 / pods as f64,
        pod_events as f64 / pods as f64
    );
    println!("CPU s of each master: {}", each.join(" / "));
    println!("Anchors: kube-scheduler about 300 pods/s; the Kubernetes scale-test gate 100 pods/s; GKE's published 1,000 pods/s.");
    if keep {
        let p = dir.keep();
        println!("data and logs kept in {}", p.display());
    }
    Ok(())
}

/// The masters' applied Raft index, as a list's resourceVersion.
async fn applied_index(client: &Client) -> Result<u64> {
    let l = list_all(client, "namespaces").await?;
    l["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .context("a list without a numeric resourceVersion")
}
