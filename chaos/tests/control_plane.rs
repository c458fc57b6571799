//! Acceptance a, b, c, e, f, g of the control plane, against real master processes.
use orc_chaos::Cluster;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

fn followers(c: &Cluster, leader: u64) -> Vec<u64> {
    c.running_ids()
        .into_iter()
        .filter(|i| *i != leader)
        .collect()
}

/// a. Three masters elect one leader, and every master names the same one.
#[test]
fn a_every_master_names_the_same_leader() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20));
    for id in 1..=3 {
        let st = c.status(id).expect("status");
        assert_eq!(st["leader"].as_u64(), Some(leader), "master {id}: {st}");
        let members = st["members"].as_array().unwrap();
        assert_eq!(members.len(), 3);
        assert!(members.iter().all(|m| m["reachable"] == true));
        assert_eq!(members.iter().filter(|m| m["role"] == "leader").count(), 1);
        assert!(st["term"].as_u64().unwrap() >= 1);
    }
}

const MANIFEST: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
data:
  color: blue
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: busybox
";

/// b. apply through a follower; every other master returns the same objects.
#[test]
fn b_apply_through_follower_reads_the_same_everywhere() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20));
    let f = followers(&c, leader)[0];
    let file = c.dir.path().join("app.yaml");
    std::fs::write(&file, MANIFEST).unwrap();
    let out = c.orc(&c.addr(f), &["apply", "-f", file.to_str().unwrap()]);
    assert!(out.ok(), "{} {}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        vec![
            "namespace/shop created",
            "configmap/settings created",
            "deployment.apps/web created"
        ]
    );
    let again = c.orc(&c.addr(f), &["apply", "-f", file.to_str().unwrap()]);
    assert!(
        again.stdout.lines().all(|l| l.ends_with(" unchanged")),
        "{}",
        again.stdout
    );
    for (kind, name) in [("ns", "shop"), ("cm", "settings"), ("deploy", "web")] {
        let views: Vec<Value> = (1..=3)
            .filter(|i| *i != f)
            .chain([f])
            .map(|i| {
                let o = c.orc(&c.addr(i), &["get", kind, name, "-n", "shop", "-o", "json"]);
                assert!(o.ok(), "{kind}/{name} via {i}: {}", o.stderr);
                o.json()
            })
            .collect();
        assert!(
            views.windows(2).all(|w| w[0] == w[1]),
            "{kind}/{name} differs between masters: {views:?}"
        );
        assert!(
            views[0]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 0
        );
        assert!(views[0]["metadata"]["uid"].as_str().is_some());
    }
    let d = c
        .orc(
            &c.addr(leader),
            &["get", "deploy", "web", "-n", "shop", "-o", "json"],
        )
        .json();
    assert_eq!(d["metadata"]["generation"], 1);
    assert_eq!(d["spec"]["replicas"], 2);
}

/// A `get -w -o json` process whose output lines arrive on a channel.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watcher {
    /// `get cm -n w -w -o json` plus `extra`, against `server`.
    fn start(c: &Cluster, server: &str, extra: &[&str]) -> Watcher {
        let mut args = vec![
            "--server", server, "get", "cm", "-n", "w", "-w", "-o", "json",
        ];
        args.extend_from_slice(extra);
        Watcher::spawn(c, &args)
    }

    /// The CLI with `args`, its output lines arriving on `lines`.
    fn spawn(c: &Cluster, args: &[&str]) -> Watcher {
        let mut child = Command::new(orc_chaos::orc_bin())
            .args(args)
            .env("HOME", c.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Watcher { child, lines: rx }
    }

    /// Values of data.i seen, with their resourceVersions, until `last` or timeout.
    fn collect_until(&self, last: u64, timeout: Duration) -> Vec<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
                    let i: u64 = v["data"]["i"].as_str().unwrap().parse().unwrap();
                    let rv: u64 = v["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    seen.push((i, rv));
                    if i == last {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        seen
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes master `id` has forwarded to a leader, by `cluster status`.
fn forwarded_writes(c: &Cluster, via: u64, id: u64) -> u64 {
    let m = c.member(via, id);
    m["forwarded_writes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no forwarded_writes for master {id}: {m}"))
}

/// A client given a follower first learns which master leads and sends its
/// writes there; given only the follower, the follower forwards every one.
#[test]
fn clients_send_writes_to_the_leader_they_learn() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20));
    let fs = followers(&c, leader);
    let f = fs[0];
    let manifest = |prefix: &str| {
        (0..40)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {prefix}-{i}, namespace: default}}\ndata: {{i: \"{i}\"}}\n"
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let apply = |servers: &str, prefix: &str| {
        let file = c.dir.path().join(format!("{prefix}.yaml"));
        std::fs::write(&file, manifest(prefix)).unwrap();
        let out = c.orc(servers, &["apply", "-f", file.to_str().unwrap()]);
        assert!(out.ok(), "{} {}", out.stdout, out.stderr);
        assert_eq!(out.stdout.lines().count(), 40, "{}", out.stdout);
    };
    // Only the follower: it forwards each write.
    let before = forwarded_writes(&c, leader, f);
    apply(&c.addr(f), "only-follower");
    assert_eq!(forwarded_writes(&c, leader, f) - before, 40);
    // The follower first, then the others: the client asks who leads while
    // its first write is forwarded, and sends the rest to the leader.
    let servers = format!("{},{},{}", c.addr(f), c.addr(fs[1]), c.addr(leader));
    let before = forwarded_writes(&c, leader, f);
    apply(&servers, "follower-first");
    let forwarded = forwarded_writes(&c, leader, f) - before;
    assert!(forwarded < 20, "{forwarded} of 40 writes were forwarded");
    for prefix in ["only-follower", "follower-first"] {
        let out = c.orc(
            &c.addr(fs[1]),
            &["get", "cm", &format!("{prefix}-39"), "-o", "json"],
        );
        assert!(out.ok(), "{prefix}-39: {}", out.stderr);
        assert_eq!(out.json()["data"]["i"], "39");
    }
}

fn set_i(c: &Cluster, server: &str, i: u64) {
    let patch = format!("{{\"data\":{{\"i\":\"{i}\"}}}}");
    let o = c.orc(server, &["patch", "cm", "counter", "-n", "w", "-p", &patch]);
    assert!(o.ok(), "update {i}: {}", o.stderr);
}

/// A patch starts from the patching master's own copy, which may lag the
/// leader: patches through each master in turn, and patches right after a
/// create elsewhere, must all land, none lost.
#[test]
fn patches_through_any_master_lose_nothing() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20));
    let cm = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"p"},"data":{}}"#;
    assert!(c
        .orc_stdin(&c.addr(leader), &["create", "-f", "-"], Some(cm))
        .ok());
    for i in 0..30u64 {
        let via = c.addr(1 + i % 3);
        let patch = format!(r#"{{"data":{{"k{i}":"{i}"}}}}"#);
        let o = c.orc(&via, &["patch", "cm", "p", "-p", &patch]);
        assert!(o.ok(), "patch {i} via {via}: {}", o.stderr);
    }
    for m in 1..=3 {
        let o = c.orc(&c.addr(m), &["get", "cm", "p", "-o", "json"]);
        assert!(o.ok(), "{}", o.stderr);
        let data = o.json()["data"].clone();
        let want: serde_json::Map<String, Value> = (0..30)
            .map(|i| (format!("k{i}"), json!(i.to_string())))
            .collect();
        assert_eq!(data, Value::Object(want), "on master {m}");
    }
    for f in followers(&c, leader) {
        for i in 0..5 {
            let name = format!("fresh-{f}-{i}");
            let cm = format!(
                r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}}}}"#
            );
            assert!(c
                .orc_stdin(&c.addr(leader), &["create", "-f", "-"], Some(&cm))
                .ok());
            let o = c.orc(
                &c.addr(f),
                &["patch", "cm", &name, "-p", r#"{"data":{"a":"b"}}"#],
            );
            assert!(
                o.ok(),
                "patch of {name} via {f} right after its create: {}",
                o.stderr
            );
        }
    }
}

fn assert_in_order(seen: &[(u64, u64)], from: u64, to: u64) {
    let values: Vec<u64> = seen.iter().map(|s| s.0).collect();
    assert_eq!(
        values,
        (from..=to).collect::<Vec<_>>(),
        "values out of order, missing or repeated"
    );
    assert!(
        seen.windows(2).all(|w| w[0].1 < w[1].1),
        "resourceVersions not increasing: {seen:?}"
    );
}

/// c. A watch on one master sees 100 updates made through another, in order, once
/// each; a watch resumed on another master after its own died has no gap or duplicate.
#[test]
fn c_watch_sees_every_update_in_order_and_resumes_elsewhere() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20));
    let f = followers(&c, leader);
    let (watch_on, write_on, resume_on) = (f[0], leader, f[1]);
    assert!(c
        .orc_stdin(
            &c.addr(write_on),
            &["create", "-f", "-"],
            Some(r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"w"}}"#)
        )
        .ok());
    assert!(c.orc_stdin(&c.addr(write_on), &["create", "-f", "-"], Some(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"counter","namespace":"w"},"data":{"i":"0"}}"#)).ok());

    let w = Watcher::start(&c, &c.addr(watch_on), &[]);
    std::thread::sleep(Duration::from_millis(300));
    for i in 1..=100 {
        set_i(&c, &c.addr(write_on), i);
    }
    let seen = w.collect_until(100, Duration::from_secs(30));
    assert_in_order(&seen, 0, 100);
    drop(w);

    // Resume: a watch on `watch_on`, which is then killed; resume on `resume_on`.
    let w = Watcher::start(&c, &c.addr(watch_on), &[]);
    let first = w.collect_until(100, Duration::from_secs(10));
    assert_eq!(first.last().map(|s| s.0), Some(100));
    for i in 101..=150 {
        set_i(&c, &c.addr(write_on), i);
    }
    let part1 = w.collect_until(150, Duration::from_secs(30));
    assert_in_order(&part1, 101, 150);
    c.kill(watch_on);
    for i in 151..=200 {
        set_i(&c, &c.addr(write_on), i);
    }
    let last_rv = part1.last().unwrap().1.to_string();
    let w2 = Watcher::start(
        &c,
        &c.addr(resume_on),
        &["--watch-only", "--resource-version", &last_rv],
    );
    let part2 = w2.collect_until(200, Duration::from_secs(30));
    assert_in_order(&part2, 151, 200);

    // And the CLI moves a live watch to the next master by itself.
    c.restart(watch_on);
    c.wait_leader(Duration::from_secs(20));
    let servers = format!("{},{}", c.addr(watch_on), c.addr(resume_on));
    let w3 = Watcher::start(
        &c,
        &servers,
        &[
            "--watch-only",
            "--resource-version",
            &part2.last().unwrap().1.to_string(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    set_i(&c, &c.addr(write_on), 201);
    assert_in_order(&w3.collect_until(201, Duration::from_secs(20)), 201, 201);
    c.kill(watch_on);
    for i in 202..=220 {
        set_i(&c, &c.addr(write_on), i);
    }
    assert_in_order(&w3.collect_until(220, Duration::from_secs(30)), 202, 220);
}

/// e. With two of three masters down a write fails fast with a no-quorum error, and
/// works again once one is back.
#[test]
fn e_no_quorum_fails_clearly_then_recovers() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20));
    let survivor = followers(&c, leader)[0];
    for id in c.running_ids() {
        if id != survivor {
            c.kill(id);
        }
    }
    let t = Instant::now();
    let o = c.create_cm(&c.addr(survivor), "default", "lonely", "1");
    let took = t.elapsed();
    assert!(!o.ok(), "a write without quorum must fail");
    assert!(took < Duration::from_secs(10), "failing took {took:?}");
    assert!(
        o.stderr.contains("no quorum") || o.stderr.contains("Unavailable"),
        "unclear error: {}",
        o.stderr
    );
    // A read cannot be linearizable without a quorum either.
    let r = c.orc(&c.addr(survivor), &["get", "cm"]);
    assert!(!r.ok());

    c.restart(leader);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = c.create_cm(&c.addr(survivor), "default", "lonely", "1");
        if o.ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "write did not succeed after a master came back: {}",
            o.stderr
        );
    }
    let g = c.orc(&c.addr(leader), &["get", "cm", "lonely", "-o", "json"]);
    assert!(g.ok(), "{}", g.stderr);
}

/// f. Replace a dead master by a new one with an empty data dir while writes go on.
#[test]
fn f_replace_a_dead_master_without_stopping_writes() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(Duration::from_secs(20));
    let dead = followers(&c, leader)[0];
    c.kill(dead);
    let servers = c.servers();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let home = c.dir.path().to_path_buf();
    let writer = {
        let (stop, ok, failed, servers) =
            (stop.clone(), ok.clone(), failed.clone(), servers.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let doc = format!("{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"f-{i}\"}}}}");
                let out = orc_chaos::run_orc(
                    &home,
                    &["--server", &servers, "create", "-f", "-"],
                    Some(&doc),
                );
                if out.ok() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(out.stderr);
                }
            }
            errors
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let via = c.addr(leader);
    let r = c.orc(&via, &["cluster", "remove-master", &dead.to_string()]);
    assert!(r.ok(), "remove-master: {}", r.stderr);
    let addr = c.spawn_new_master(4);
    let a = c.orc(&via, &["cluster", "add-master", "4", &addr]);
    assert!(a.ok(), "add-master: {} {}", a.stdout, a.stderr);
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let errors = writer.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "writes failed during the replacement: {errors:?}"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 5,
        "too few writes to prove anything"
    );

    let st = c.status(4).expect("status via the new master");
    let mut ids: Vec<u64> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![1, 2, 3, 4]
            .into_iter()
            .filter(|i| *i != dead)
            .collect::<Vec<_>>()
    );
    assert!(
        st["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["reachable"] == true),
        "{st}"
    );
    // The new master serves what was written before it joined.
    let g = c.orc(&c.addr(4), &["get", "cm", "f-1", "-o", "json"]);
    assert!(g.ok(), "{}", g.stderr);
    // And it survives the loss of one of the old ones.
    c.kill(leader);
    let l = c.wait_leader(Duration::from_secs(20));
    assert_ne!(l, leader);
    assert!(c.create_cm(&c.addr(4), "default", "after", "1").ok());
}

/// g. Bad input: a clear error naming the problem, a non-zero exit, nothing changed.
#[test]
fn g_bad_input_is_rejected_and_changes_nothing() {
    let c = Cluster::start(3, &[]);
    let s = c.servers();
    assert!(c.create_cm(&s, "default", "keep", "1").ok());
    let before = c.orc(&s, &["get", "cm", "-A", "-o", "json"]).json()["items"].clone();

    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"v":"{}"}}}}"#,
        "x".repeat(4 << 20)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("invalid name", r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"Bad_Name"}}"#.into(), "metadata.name"),
        ("invalid label", r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ok","labels":{"a":"b c"}}}"#.into(), "metadata.labels"),
        ("malformed YAML", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [unclosed\n".into(), "YAML"),
        ("unknown field", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ok\ndatta: {}\n".into(), "unknown field \"datta\""),
        ("nested unknown field", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: c, imagee: busybox}]\n".into(), "spec.template.spec.containers.0.imagee"),
        ("unknown kind", "apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n".into(), "Widget"),
        ("unknown apiVersion", "apiVersion: apps/v9\nkind: Deployment\nmetadata: {name: w}\n".into(), "apps/v9"),
        ("missing namespace", r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","namespace":"nowhere"}}"#.into(), "nowhere"),
        ("4 MiB ConfigMap", big, "RequestEntityTooLarge"),
    ];
    for (what, body, expect) in &cases {
        for verb in ["apply", "create"] {
            let o = c.orc_stdin(&s, &[verb, "-f", "-"], Some(body));
            assert!(!o.ok(), "{what} ({verb}) was accepted");
            assert!(
                o.stderr.contains(expect),
                "{what} ({verb}): error does not name {expect:?}: {}",
                o.stderr
            );
        }
    }
    // A stale resourceVersion.
    let cm = c.orc(&s, &["get", "cm", "keep", "-o", "json"]).json();
    assert!(c
        .orc(&s, &["patch", "cm", "keep", "-p", r#"{"data":{"v":"2"}}"#])
        .ok());
    let mut stale = cm.clone();
    stale["data"]["v"] = "3".into();
    let o = c.orc_stdin(&s, &["replace", "-f", "-"], Some(&stale.to_string()));
    assert!(!o.ok());
    assert!(
        o.stderr.contains("Conflict") && o.stderr.contains("modified"),
        "{}",
        o.stderr
    );
    // Bad selectors and types.
    for args in [
        vec!["get", "cm", "-l", "a in b"],
        vec!["get", "po", "--field-selector", "spec.foo=1"],
        vec!["get", "widgets"],
        vec!["get", "cm", "nope"],
    ] {
        let o = c.orc(&s, &args);
        assert!(!o.ok(), "{args:?} succeeded");
        assert!(!o.stderr.is_empty());
    }

    for id in 1..=3 {
        assert!(c.status(id).is_some(), "master {id} no longer answers");
    }
    let after = c.orc(&s, &["get", "cm", "-A", "-o", "json"]).json()["items"].clone();
    let keep_before: Vec<&Value> = before.as_array().unwrap().iter().collect();
    let after_names: Vec<&str> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        after_names,
        keep_before
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect::<Vec<_>>()
    );
    let kept = after
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["metadata"]["name"] == "keep")
        .unwrap();
    assert_eq!(
        kept["data"]["v"], "2",
        "the stale replace must not have changed the object"
    );
}

/// `cluster snapshot save` on one cluster, `cluster snapshot restore` into a new
/// one: the objects come back (namespaces first), and the restore is idempotent.
#[test]
fn snapshot_save_and_restore_into_a_new_cluster() {
    let c = Cluster::start(3, &[]);
    let s = c.servers();
    let file = c.dir.path().join("app.yaml");
    std::fs::write(&file, MANIFEST).unwrap();
    assert!(c.orc(&s, &["apply", "-f", file.to_str().unwrap()]).ok());
    // Outside the cluster's directory, which goes with the cluster.
    let keep = tempfile::tempdir().unwrap();
    let backup = keep.path().join("backup.json");
    let o = c.orc(
        &s,
        &["cluster", "snapshot", "save", backup.to_str().unwrap()],
    );
    assert!(o.ok(), "{}", o.stderr);
    assert!(o.stdout.contains("saved"), "{}", o.stdout);
    let original = c
        .orc(&s, &["get", "deploy", "web", "-n", "shop", "-o", "json"])
        .json();
    drop(c);

    let fresh = Cluster::start(3, &[]);
    let s2 = fresh.servers();
    assert!(!fresh.orc(&s2, &["get", "ns", "shop"]).ok());
    let r = fresh.orc(
        &s2,
        &["cluster", "snapshot", "restore", backup.to_str().unwrap()],
    );
    assert!(r.ok(), "{} {}", r.stdout, r.stderr);
    let restored = fresh
        .orc(&s2, &["get", "deploy", "web", "-n", "shop", "-o", "json"])
        .json();
    assert_eq!(restored["spec"], original["spec"]);
    assert_eq!(
        restored["metadata"]["labels"],
        original["metadata"]["labels"]
    );
    // (The deployment controller adds its revision annotation on its own time.)
    let applied = "kubectl.kubernetes.io/last-applied-configuration";
    assert_eq!(
        restored["metadata"]["annotations"][applied],
        original["metadata"]["annotations"][applied]
    );
    let cm = fresh
        .orc(&s2, &["get", "cm", "settings", "-n", "shop", "-o", "json"])
        .json();
    assert_eq!(cm["data"]["color"], "blue");
    // Restoring again changes nothing and says so.
    let again = fresh.orc(
        &s2,
        &["cluster", "snapshot", "restore", backup.to_str().unwrap()],
    );
    assert!(again.ok(), "{}", again.stderr);
    assert!(
        again.stdout.contains("restored 0 objects"),
        "{}",
        again.stdout
    );
}

/// A watch with a label selector sees an object leave the selection as DELETED
/// and come back as ADDED; changes outside the selection are not sent.
#[test]
fn label_selector_watch_sees_objects_enter_and_leave() {
    let c = Cluster::start(3, &[]);
    let s = c.servers();
    assert!(c
        .orc_stdin(&s, &["create", "-f", "-"], Some(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","labels":{"app":"a"}}}"#))
        .ok());
    let w = Watcher::spawn(
        &c,
        &[
            "--server",
            &s,
            "get",
            "cm",
            "-l",
            "app=a",
            "-w",
            "-o",
            "json",
            "--output-watch-events",
        ],
    );
    let rx = &w.lines;
    let next = || -> (String, String) {
        let l = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("a watch event");
        let v: Value = serde_json::from_str(&l).unwrap();
        (
            v["type"].as_str().unwrap().to_string(),
            v["object"]["metadata"]["labels"]["app"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    };
    assert_eq!(next(), ("ADDED".into(), "a".into()));
    for (label, expect) in [
        ("b", Some(("DELETED", "b"))),
        ("c", None),
        ("a", Some(("ADDED", "a"))),
    ] {
        let patch = format!(r#"{{"metadata":{{"labels":{{"app":"{label}"}}}}}}"#);
        assert!(c.orc(&s, &["patch", "cm", "x", "-p", &patch]).ok());
        if let Some((t, l)) = expect {
            assert_eq!(
                next(),
                (t.to_string(), l.to_string()),
                "after relabelling to {label}"
            );
        }
    }
    assert!(c.orc(&s, &["delete", "cm", "x"]).ok());
    assert_eq!(next(), ("DELETED".into(), "a".into()));
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "no other events"
    );
}
