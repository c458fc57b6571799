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

/// Running and Ready pods, not counting those being deleted (Terminating).
fn running_ready(c: &Cluster, selector: &str) -> Vec<Value> {
    c.items(&["pods", "-l", selector])
        .into_iter()
        .filter(|p| {
            p["status"]["phase"] == "Running"
                && ready(p)
                && p["metadata"]["deletionTimestamp"].is_null()
        })
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
        // Terminating pods (being stopped by their node) count neither toward
        // the surge nor as ready, as in Kubernetes.
        let terminating = !o["metadata"]["deletionTimestamp"].is_null();
        match ev["type"].as_str() {
            Some("DELETED") => {
                pods.remove(&name);
            }
            Some("ADDED") | Some("MODIFIED") if terminating => {
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
    c.wait_ready_nodes(3, MIN);
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
    c.wait_ready_nodes(3, MIN);
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
    c.wait_ready_nodes(2, MIN);
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
    c.wait_ready_nodes(3, MIN);
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
    c.wait_ready_nodes(3, MIN);
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

/// c. StatefulSet (OrderedReady): NAME-0, -1, -2 strictly in order, scale-down in
/// reverse, and a deleted pod returns with its name and its claim.
#[test]
fn c_statefulset_order_and_identity() {
    let c = Cluster::start(3, &[]);
    let servers = c.servers();
    let _nodes = c.sim_nodes("s", 3, &[]);
    c.wait_ready_nodes(3, MIN);
    let watch_out = c.dir.path().join("stswatch.jsonl");
    let mut watch = c.spawn_cli(
        &[
            "get",
            "pods",
            "-l",
            "app=db",
            "-w",
            "-o",
            "json",
            "--output-watch-events",
        ],
        &watch_out,
    );
    std::thread::sleep(Duration::from_secs(1));
    let sts = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  replicas: 3\n  serviceName: db\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}, annotations: {sim.orc.dev/ready-after: 1s}}\n    spec:\n      containers: [{name: c, image: busybox}]\n  volumeClaimTemplates:\n  - metadata: {name: data}\n    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n";
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(sts)).ok());
    wait_for("3 ready pods", MIN, || {
        (running_ready(&c, "app=db").len() == 3).then_some(())
    });
    let o = c.orc(&servers, &["scale", "sts/db", "--replicas", "0"]);
    assert!(o.ok(), "{}", o.stderr);
    wait_for("no pods", MIN, || {
        c.items(&["pods", "-l", "app=db"]).is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    watch.kill();
    // Replay: each pod is ADDED only after the one before it is Ready; deletions run 2, 1, 0.
    let text = std::fs::read_to_string(&watch_out).unwrap();
    let (mut became_ready, mut added, mut deleted) = (
        Vec::<String>::new(),
        Vec::<String>::new(),
        Vec::<String>::new(),
    );
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let name = ev["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        match ev["type"].as_str() {
            Some("ADDED") => {
                let i: usize = name.trim_start_matches("db-").parse().unwrap();
                assert!(
                    i == 0 || became_ready.contains(&format!("db-{}", i - 1)),
                    "{name} created before db-{} was ready",
                    i - 1
                );
                added.push(name);
            }
            Some("MODIFIED") if ready(&ev["object"]) && !became_ready.contains(&name) => {
                became_ready.push(name)
            }
            Some("DELETED") => deleted.push(name),
            _ => {}
        }
    }
    println!("created {added:?}, ready {became_ready:?}, deleted {deleted:?}");
    assert_eq!(added, vec!["db-0", "db-1", "db-2"]);
    assert_eq!(deleted, vec!["db-2", "db-1", "db-0"]);
    // Back to 3; a deleted pod returns with the same name and claim, on the same node.
    assert!(c
        .orc(&servers, &["scale", "sts/db", "--replicas", "3"])
        .ok());
    wait_for("3 ready pods again", MIN, || {
        (running_ready(&c, "app=db").len() == 3).then_some(())
    });
    let before = c.items(&["pods", "db-1"]).pop().unwrap();
    let pvc = c
        .items(&["pvc", "data-db-1"])
        .pop()
        .expect("claim data-db-1");
    assert_eq!(pvc["status"]["phase"], "Bound", "{pvc}");
    assert_eq!(c.items(&["pvc"]).len(), 3);
    assert!(c.orc(&servers, &["delete", "pod", "db-1"]).ok());
    let after = wait_for("db-1 to come back", MIN, || {
        let p = c.items(&["pods", "db-1"]).pop()?;
        (p["metadata"]["uid"] != before["metadata"]["uid"] && ready(&p)).then_some(p)
    });
    assert_eq!(
        after["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "data-db-1"
    );
    assert_eq!(
        after["spec"]["nodeName"], before["spec"]["nodeName"],
        "pinned by its volume"
    );
    assert_eq!(after["spec"]["hostname"], "db-1");
    assert_eq!(
        c.items(&["pvc", "data-db-1"]).pop().unwrap()["metadata"]["uid"],
        pvc["metadata"]["uid"],
        "same claim"
    );
}

/// e. A CronJob every minute with Forbid: one Job a minute, never two at once.
#[test]
fn e_cronjob_forbid() {
    let c = Cluster::start(3, &[]);
    let servers = c.servers();
    let _nodes = c.sim_nodes("cj", 2, &[]);
    c.wait_ready_nodes(2, MIN);
    // Each run takes 70 s, longer than the period: Forbid must skip.
    let cj = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: tick}\nspec:\n  schedule: '* * * * *'\n  concurrencyPolicy: Forbid\n  jobTemplate:\n    spec:\n      template:\n        metadata: {annotations: {sim.orc.dev/exit-after: 70s}}\n        spec:\n          restartPolicy: Never\n          containers: [{name: c, image: busybox}]\n";
    let watch_out = c.dir.path().join("cjwatch.jsonl");
    let mut watch = c.spawn_cli(
        &["get", "jobs", "-w", "-o", "json", "--output-watch-events"],
        &watch_out,
    );
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(cj)).ok());
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(150));
    watch.kill();
    let text = std::fs::read_to_string(&watch_out).unwrap();
    let mut jobs: BTreeMap<String, (bool, String)> = BTreeMap::new();
    let mut most_active = 0;
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let o = &ev["object"];
        let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
        let done = o["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["status"] == "True"));
        let created = o["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or("")
            .to_string();
        jobs.insert(name, (!done && ev["type"] != "DELETED", created));
        most_active = most_active.max(jobs.values().filter(|(a, _)| *a).count());
    }
    println!(
        "cronjob over {:?}: jobs {jobs:?}, at most {most_active} active",
        start.elapsed()
    );
    assert!(!jobs.is_empty(), "a job was created");
    // A run due while another is active waits for it (as Kubernetes' controller
    // does), so over 150 s at most three start, one per scheduled minute.
    assert!(jobs.len() <= 3, "{jobs:?}");
    assert_eq!(most_active, 1);
    // One a minute at most: creation minutes differ.
    let minutes: Vec<&str> = jobs.values().map(|(_, c)| &c[..16]).collect();
    let mut uniq = minutes.clone();
    uniq.dedup();
    assert_eq!(minutes, uniq);
}

/// h. A Service gets a ClusterIP and its EndpointSlice lists exactly the ready
/// pods; Services created at once through different masters never share a
/// ClusterIP or a NodePort (a small range makes collisions likely).
#[test]
fn h_services_allocate_uniquely_and_list_ready_pods() {
    let c = Cluster::start(
        3,
        &[
            "--service-cidr",
            "198.19.0.0/27",
            "--service-node-port-range",
            "30000-30040",
        ],
    );
    let servers = c.servers();
    let _nodes = c.sim_nodes("h", 2, &[]);
    c.wait_ready_nodes(2, MIN);
    // Two pods ready, one never (its readiness comes after an hour).
    let d = deployment("web", 2, "nginx", "");
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(&d)).ok());
    let slow = "apiVersion: v1\nkind: Pod\nmetadata: {name: slow, labels: {app: web}, annotations: {sim.orc.dev/ready-after: 1h}}\nspec:\n  containers: [{name: c, image: nginx}]\n";
    assert!(c
        .orc_stdin(&servers, &["apply", "-f", "-"], Some(slow))
        .ok());
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n";
    assert!(c.orc_stdin(&servers, &["apply", "-f", "-"], Some(svc)).ok());
    let s = c.items(&["svc", "web"]).pop().unwrap();
    let ip = s["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(ip.starts_with("198.19.0."), "{ip}");
    let ready_ips = wait_for("2 ready pods", MIN, || {
        let mut ips: Vec<String> = running_ready(&c, "app=web")
            .iter()
            .map(|p| p["status"]["podIP"].as_str().unwrap().to_string())
            .collect();
        ips.sort();
        (ips.len() == 2).then_some(ips)
    });
    let slice = wait_for(
        "the EndpointSlice to list exactly the ready pods",
        MIN,
        || {
            let sl = c.items(&["endpointslices", "web"]).pop()?;
            let eps = sl["endpoints"].as_array()?.clone();
            let mut ready: Vec<String> = eps
                .iter()
                .filter(|e| e["conditions"]["ready"] == true)
                .map(|e| e["addresses"][0].as_str().unwrap().to_string())
                .collect();
            ready.sort();
            (ready == ready_ips && eps.len() == 3).then_some(sl)
        },
    );
    println!("service web {ip}: slice {}", slice["endpoints"]);
    assert_eq!(slice["ports"][0]["port"], 8080);
    let ep = c.items(&["endpoints", "web"]).pop().unwrap();
    assert_eq!(ep["subsets"][0]["addresses"].as_array().unwrap().len(), 2);
    assert_eq!(
        ep["subsets"][0]["notReadyAddresses"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Pairs of NodePort Services created at the same moment through two different masters.
    let (a, b) = (c.masters[0].addr.clone(), c.masters[1].addr.clone());
    for i in 0..12 {
        let mk = |m: String, n: String| {
            let doc = format!("{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{n}\"}},\"spec\":{{\"type\":\"NodePort\",\"ports\":[{{\"port\":80}}]}}}}");
            let home = c.dir.path().to_path_buf();
            std::thread::spawn(move || {
                orc_chaos::run_orc(&home, &["--server", &m, "create", "-f", "-"], Some(&doc))
            })
        };
        let (x, y) = (
            mk(a.clone(), format!("x{i}")),
            mk(b.clone(), format!("y{i}")),
        );
        let (x, y) = (x.join().unwrap(), y.join().unwrap());
        assert!(x.ok() && y.ok(), "{} {}", x.stderr, y.stderr);
    }
    let svcs = c.items(&["svc"]);
    let mut ips: Vec<&str> = svcs
        .iter()
        .map(|s| s["spec"]["clusterIP"].as_str().unwrap())
        .collect();
    let mut ports: Vec<i64> = svcs
        .iter()
        .filter_map(|s| s["spec"]["ports"][0]["nodePort"].as_i64())
        .collect();
    let (n_ips, n_ports) = (ips.len(), ports.len());
    ips.sort();
    ips.dedup();
    ports.sort();
    ports.dedup();
    println!(
        "{n_ips} services: {} distinct ClusterIPs, {n_ports} NodePorts, {} distinct",
        ips.len(),
        ports.len()
    );
    assert_eq!(n_ips, 25);
    assert_eq!(ips.len(), n_ips, "a ClusterIP was shared");
    assert_eq!(n_ports, 24);
    assert_eq!(ports.len(), n_ports, "a NodePort was shared");
    // A requested one that is taken is refused, naming the field.
    let taken = svcs
        .iter()
        .find_map(|s| s["spec"]["ports"][0]["nodePort"].as_i64())
        .unwrap();
    let doc = format!("{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"dup\"}},\"spec\":{{\"type\":\"NodePort\",\"ports\":[{{\"port\":80,\"nodePort\":{taken}}}]}}}}");
    let o = c.orc_stdin(&servers, &["create", "-f", "-"], Some(&doc));
    assert!(!o.ok());
    assert!(
        o.stderr.contains("spec.ports.nodePort") && o.stderr.contains("already allocated"),
        "{}",
        o.stderr
    );
}
