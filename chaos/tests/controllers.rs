//! Acceptance of the controllers issue on three real masters and simulated nodes.
use orc_chaos::{wait_for, Cluster};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);

fn ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn running_ready(c: &Cluster, selector: &str) -> Vec<Value> {
    c.items(&["pods", "-l", selector])
        .into_iter()
        .filter(|p| p["status"]["phase"] == "Running" && ready(p))
        .collect()
}

fn per_node(pods: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in pods {
        *m.entry(p["spec"]["nodeName"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    m
}

fn deployment(name: &str, replicas: u32, image: &str, extra_template_meta: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      {extra_template_meta}
    spec:
      containers: [{{name: c, image: \"{image}\"}}]
"
    )
}

/// Replays a pod watch (`--output-watch-events` lines) and returns the largest
/// number of pods and the smallest number of ready pods seen once the initial
/// listing (`initial` ready pods) is in, and the number of events.
fn bounds(path: &std::path::Path, initial: usize) -> (usize, usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut pods: HashMap<String, bool> = HashMap::new();
    let (mut max, mut min_ready, mut events) = (0, usize::MAX, 0);
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let o = &ev["object"];
        let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
        match ev["type"].as_str() {
            Some("DELETED") => {
                pods.remove(&name);
            }
            Some("ADDED") | Some("MODIFIED") => {
                pods.insert(name, ready(o));
            }
            _ => continue,
        }
        events += 1;
        if events < initial {
            continue;
        }
        max = max.max(pods.len());
        min_ready = min_ready.min(pods.values().filter(|r| **r).count());
    }
    (max, min_ready, events)
}

fn rollout(c: &mut Cluster, kill_leader: bool) {
    let servers = c.servers();
    let _nodes = c.sim_nodes("n", 3, &["--lease-every", "1"]);
    wait_for("3 nodes", MIN, || {
        (c.items(&["nodes"]).len() == 3).then_some(())
    });
    // Pods take a second to become ready, so availability matters during the rollout.
    let meta = "annotations: {sim.orc.dev/ready-after: 1s}";
    let o = c.orc_stdin(
        &servers,
        &["apply", "-f", "-"],
        Some(&deployment("web", 6, "nginx:1.25", meta)),
    );
    assert!(o.ok(), "{}", o.stderr);
    let pods = wait_for("6 ready pods", MIN, || {
        Some(running_ready(c, "app=web")).filter(|p| p.len() == 6)
    });
    let spread = per_node(&pods);
    println!("6 replicas on 3 nodes: {spread:?}");
    assert!(spread.values().all(|n| *n == 2), "{spread:?}");

    let o = c.orc(&servers, &["scale", "deploy/web", "--replicas", "9"]);
    assert!(o.ok(), "{}", o.stderr);
    wait_for("9 ready pods", MIN, || {
        (running_ready(c, "app=web").len() == 9).then_some(())
    });

    // 9 replicas, 25% surge and unavailability: at most 12 pods, at least 7 ready.
    let watch_out = c.dir.path().join("watch.jsonl");
    let mut watch = c.spawn_cli(
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-w",
            "-o",
            "json",
            "--output-watch-events",
        ],
        &watch_out,
    );
    std::thread::sleep(Duration::from_secs(1));
    let o = c.orc(
        &servers,
        &[
            "patch",
            "deploy",
            "web",
            "-p",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"c","image":"nginx:1.26"}]}}}}"#,
        ],
    );
    assert!(o.ok(), "{}", o.stderr);
    if kill_leader {
        // In the middle of the rollout.
        wait_for("the rollout to start", MIN, || {
            c.items(&["rs"])
                .iter()
                .any(|rs| {
                    rs["status"]["readyReplicas"].as_u64().unwrap_or(0) > 0
                        && rs["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.26"
                })
                .then_some(())
        });
        let leader = c.wait_leader(Duration::from_secs(10));
        println!("killing leader {leader} mid-rollout");
        c.kill(leader);
    }
    let start = Instant::now();
    let o = c.orc(
        &servers,
        &[
            "rollout",
            "status",
            "deploy/web",
            "--timeout-seconds",
            "120",
        ],
    );
    assert!(o.ok(), "rollout status: {} {}", o.stdout, o.stderr);
    assert!(o.stdout.contains("successfully rolled out"), "{}", o.stdout);
    println!("rollout of 9 pods took {:?}", start.elapsed());
    let pods = running_ready(c, "app=web");
    assert_eq!(pods.len(), 9);
    assert!(pods
        .iter()
        .all(|p| p["spec"]["containers"][0]["image"] == "nginx:1.26"));
    std::thread::sleep(Duration::from_millis(500));
    watch.kill();
    let (max, min_ready, events) = bounds(&watch_out, 9);
    println!("rollout watched: {events} events, at most {max} pods, at least {min_ready} ready");
    assert!(events > 18, "the watch saw the rollout");
    assert!(max <= 12, "more than replicas+maxSurge pods: {max}");
    assert!(
        min_ready >= 7,
        "fewer than replicas-maxUnavailable ready: {min_ready}"
    );

    if !kill_leader {
        let o = c.orc(&servers, &["rollout", "undo", "deploy/web"]);
        assert!(o.ok(), "{}", o.stderr);
        let o = c.orc(
            &servers,
            &[
                "rollout",
                "status",
                "deploy/web",
                "--timeout-seconds",
                "120",
            ],
        );
        assert!(o.ok(), "{} {}", o.stdout, o.stderr);
        let pods = running_ready(c, "app=web");
        assert_eq!(pods.len(), 9);
        assert!(pods
            .iter()
            .all(|p| p["spec"]["containers"][0]["image"] == "nginx:1.25"));
        let h = c.orc(&servers, &["rollout", "history", "deploy/web"]);
        assert!(
            h.stdout.contains("\n2 ") && h.stdout.contains("\n3 "),
            "{}",
            h.stdout
        );
    }
}

/// a. Deployment: spread, scale, a rolling update within its bounds, undo.
#[test]
fn a_deployment_rolls_within_its_bounds() {
    let mut c = Cluster::start(3, &[]);
    rollout(&mut c, false);
}

/// g. kill -9 of the leader in the middle of a rollout.
#[test]
fn g_rollout_survives_the_leader() {
    let mut c = Cluster::start(3, &[]);
    rollout(&mut c, true);
}

/// j. Deleting a Deployment removes its ReplicaSets and pods; with Orphan they stay.
#[test]
fn j_cascading_and_orphaning_deletes() {
    let c = Cluster::start(3, &[]);
    let servers = c.servers();
    let _nodes = c.sim_nodes("n", 2, &[]);
    for (name, cascade) in [("keep", Some("Orphan")), ("gone", None)] {
        let o = c.orc_stdin(
            &servers,
            &["apply", "-f", "-"],
            Some(&deployment(name, 3, "nginx", "")),
        );
        assert!(o.ok(), "{}", o.stderr);
        let sel = format!("app={name}");
        wait_for("3 pods", MIN, || {
            (running_ready(&c, &sel).len() == 3).then_some(())
        });
        let mut args = vec!["delete", "deploy", name];
        if let Some(p) = cascade {
            args.extend(["--cascade", p]);
        }
        assert!(c.orc(&servers, &args).ok());
        if cascade.is_some() {
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(
                c.items(&["rs", "-l", &sel]).len(),
                1,
                "orphaned ReplicaSet stays"
            );
            assert_eq!(running_ready(&c, &sel).len(), 3, "orphaned pods stay");
            let rs = &c.items(&["rs", "-l", &sel])[0];
            assert!(
                rs["metadata"]["ownerReferences"]
                    .as_array()
                    .is_none_or(|a| a.is_empty()),
                "released: {rs}"
            );
        } else {
            wait_for("ReplicaSets and pods to go", MIN, || {
                (c.items(&["rs", "-l", &sel]).is_empty()
                    && c.items(&["pods", "-l", &sel]).is_empty())
                .then_some(())
            });
        }
    }
}

/// f. A node that stops renewing its Lease turns Unknown within the grace
/// period; its pods are evicted after their toleration and run elsewhere.
#[test]
fn f_lost_node_pods_move() {
    let grace = 4.0;
    let c = Cluster::start(3, &["--node-monitor-grace-period", "4"]);
    let servers = c.servers();
    let _stay = c.sim_nodes("stay", 2, &["--lease-every", "1"]);
    let mut lost = c.sim_nodes("lost", 1, &["--lease-every", "1"]);
    wait_for("3 nodes", MIN, || {
        (c.items(&["nodes"]).len() == 3).then_some(())
    });
    let d = deployment("mover", 3, "nginx", "").replace(
        "    spec:\n",
        "    spec:\n      tolerations: [{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}]\n",
    );
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(&d)).ok());
    let pods = wait_for("3 pods", MIN, || {
        Some(running_ready(&c, "app=mover")).filter(|p| p.len() == 3)
    });
    assert_eq!(
        per_node(&pods).get("lost-0"),
        Some(&1),
        "{:?}",
        per_node(&pods)
    );
    lost.kill();
    let killed = Instant::now();
    wait_for("lost-0 to turn Unknown", MIN, || {
        let n = c.items(&["nodes", "lost-0"]).pop()?;
        let r = n["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        (r["status"] == "Unknown").then_some(())
    });
    let unknown = killed.elapsed();
    println!("node Unknown {unknown:?} after its process died (grace {grace} s)");
    assert!(unknown.as_secs_f64() <= grace + 1.5, "{unknown:?}");
    wait_for("the unreachable NoExecute taint", MIN, || {
        let n = c.items(&["nodes", "lost-0"]).pop()?;
        n["spec"]["taints"]
            .as_array()?
            .iter()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")
            .then_some(())
    });
    let pods = wait_for("3 pods off the lost node", MIN, || {
        let p = running_ready(&c, "app=mover");
        (p.len() == 3 && p.iter().all(|p| p["spec"]["nodeName"] != "lost-0")).then_some(p)
    });
    println!(
        "pods moved {:?} after the kill: {:?}",
        killed.elapsed(),
        per_node(&pods)
    );
    assert!(
        killed.elapsed().as_secs_f64() >= 2.0,
        "not before the toleration"
    );
}

/// i. A pod too big for every node is Pending with a FailedScheduling event
/// naming why, and binds when a big enough node joins.
#[test]
fn i_unschedulable_until_a_node_fits() {
    let c = Cluster::start(3, &[]);
    let servers = c.servers();
    let _small = c.sim_nodes("small", 2, &["--cpu", "2"]);
    wait_for("2 nodes", MIN, || {
        (c.items(&["nodes"]).len() == 2).then_some(())
    });
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers: [{name: c, image: nginx, resources: {requests: {cpu: '16'}}}]\n";
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(pod)).ok());
    let ev = wait_for("a FailedScheduling event", MIN, || {
        c.items(&["events"])
            .into_iter()
            .find(|e| e["reason"] == "FailedScheduling" && e["involvedObject"]["name"] == "big")
    });
    println!("event: {}", ev["message"]);
    assert!(
        ev["message"]
            .as_str()
            .unwrap()
            .contains("2 Insufficient cpu"),
        "{ev}"
    );
    let p = c.items(&["pods", "big"]).pop().unwrap();
    assert_eq!(p["status"]["phase"], "Pending");
    assert!(p["spec"]["nodeName"].is_null());
    let d = c.orc(&servers, &["describe", "pod", "big"]);
    assert!(
        d.stdout.contains("FailedScheduling"),
        "describe shows events: {}",
        d.stdout
    );
    let _big = c.sim_nodes("big", 1, &["--cpu", "32"]);
    let p = wait_for("the pod to bind", MIN, || {
        let p = c.items(&["pods", "big"]).pop()?;
        (p["status"]["phase"] == "Running").then_some(p)
    });
    assert_eq!(p["spec"]["nodeName"], "big-0");
}

/// b. A DaemonSet has one pod per node; a new node gets one; a removed node's pod goes.
#[test]
fn b_daemonset_follows_nodes() {
    let c = Cluster::start(3, &[]);
    let servers = c.servers();
    let _three = c.sim_nodes("d", 3, &[]);
    wait_for("3 nodes", MIN, || {
        (c.items(&["nodes"]).len() == 3).then_some(())
    });
    let ds = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec:\n      containers: [{name: c, image: busybox}]\n";
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(ds)).ok());
    let one_each = |n: usize| {
        let pods = running_ready(&c, "app=agent");
        let m = per_node(&pods);
        (pods.len() == n && m.len() == n && m.values().all(|v| *v == 1)).then_some(m)
    };
    let m = wait_for("one pod on each of 3 nodes", MIN, || one_each(3));
    println!("daemon pods: {m:?}");
    let _fourth = c.sim_nodes("e", 1, &[]);
    let m = wait_for("a pod on the fourth node", MIN, || one_each(4));
    assert!(m.contains_key("e-0"), "{m:?}");
    assert!(c.orc(&servers, &["delete", "node", "d-1"]).ok());
    let m = wait_for("the removed node's pod to go", MIN, || one_each(3));
    assert!(!m.contains_key("d-1"), "{m:?}");
    let st = c.items(&["ds", "agent"]).pop().unwrap();
    assert_eq!(
        st["status"]["desiredNumberScheduled"], 3,
        "{}",
        st["status"]
    );
}

fn job_yaml(name: &str, spec: &str, annotations: &str) -> String {
    format!("apiVersion: batch/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n{spec}  template:\n    metadata: {{annotations: {{{annotations}}}}}\n    spec:\n      restartPolicy: Never\n      containers: [{{name: c, image: busybox}}]\n")
}

fn condition(o: &Value, t: &str) -> bool {
    o["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == t && c["status"] == "True"))
}

/// d. Jobs: completions with bounded parallelism, backoffLimit, Indexed.
#[test]
fn d_jobs_complete_fail_and_index() {
    let c = Cluster::start(3, &["--job-backoff-seconds", "0.5"]);
    let servers = c.servers();
    let _nodes = c.sim_nodes("j", 3, &[]);
    wait_for("3 nodes", MIN, || {
        (c.items(&["nodes"]).len() == 3).then_some(())
    });
    // completions 5, parallelism 2: never more than 2 running.
    let watch_out = c.dir.path().join("jobwatch.jsonl");
    let mut watch = c.spawn_cli(
        &[
            "get",
            "pods",
            "-l",
            "job-name=five",
            "-w",
            "-o",
            "json",
            "--output-watch-events",
        ],
        &watch_out,
    );
    std::thread::sleep(Duration::from_secs(1));
    let y = job_yaml(
        "five",
        "  completions: 5\n  parallelism: 2\n",
        "sim.orc.dev/exit-after: 1s",
    );
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(&y)).ok());
    let j = wait_for("job five to complete", MIN, || {
        c.items(&["jobs", "five"])
            .pop()
            .filter(|j| condition(j, "Complete"))
    });
    assert_eq!(j["status"]["succeeded"], 5, "{}", j["status"]);
    std::thread::sleep(Duration::from_millis(500));
    watch.kill();
    let text = std::fs::read_to_string(&watch_out).unwrap();
    let mut running: HashMap<String, bool> = HashMap::new();
    let mut most = 0;
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let o = &ev["object"];
        let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
        let active = ev["type"] != "DELETED"
            && !matches!(
                o["status"]["phase"].as_str(),
                Some("Succeeded") | Some("Failed")
            );
        running.insert(name, active);
        most = most.max(running.values().filter(|a| **a).count());
    }
    println!("job five: {} pods, at most {most} at once", running.len());
    assert_eq!(running.len(), 5);
    assert!(most <= 2, "{most} pods ran at once");

    // A failing Job stops at backoffLimit with a Failed condition.
    let y = job_yaml(
        "fails",
        "  backoffLimit: 2\n",
        "sim.orc.dev/exit-after: 200ms, sim.orc.dev/exit-code: '1'",
    );
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(&y)).ok());
    let j = wait_for("job fails to fail", MIN, || {
        c.items(&["jobs", "fails"])
            .pop()
            .filter(|j| condition(j, "Failed"))
    });
    let reason = j["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .unwrap()["reason"]
        .clone();
    assert_eq!(reason, "BackoffLimitExceeded");
    assert_eq!(j["status"]["failed"], 3, "{}", j["status"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.items(&["pods", "-l", "job-name=fails"]).len(),
        3,
        "no retries after the limit"
    );

    // Indexed: each index exactly once.
    let y = job_yaml(
        "idx",
        "  completions: 4\n  parallelism: 4\n  completionMode: Indexed\n",
        "sim.orc.dev/exit-after: 500ms",
    );
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(&y)).ok());
    let j = wait_for("job idx to complete", MIN, || {
        c.items(&["jobs", "idx"])
            .pop()
            .filter(|j| condition(j, "Complete"))
    });
    assert_eq!(j["status"]["completedIndexes"], "0-3");
    let pods = c.items(&["pods", "-l", "job-name=idx"]);
    let mut ix: Vec<String> = pods
        .iter()
        .map(|p| {
            p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ix.sort();
    assert_eq!(ix, vec!["0", "1", "2", "3"]);
    for p in &pods {
        let env = &p["spec"]["containers"][0]["env"];
        assert_eq!(env[0]["name"], "JOB_COMPLETION_INDEX");
        assert_eq!(
            env[0]["value"],
            p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        );
    }
}
