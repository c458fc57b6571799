//! Acceptance h: kill -9 of masters at random moments under a write load, 50
//! rounds. Afterwards every acknowledged write is present, and every master's store
//! passes its consistency check and holds the same objects.
use orc_chaos::Cluster;
use rand::Rng;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn h_random_kills_under_load_lose_nothing() {
    // Small snapshot interval: crashes also hit snapshot building and log purging.
    let mut c = Cluster::start(3, &["--snapshot-every", "100", "--keep-logs", "20"]);
    let servers = c.servers();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (stop, acked, servers) = (stop.clone(), acked.clone(), servers.clone());
        let home = c.dir.path().to_path_buf();
        writers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("w{w}-{i}");
                let doc = format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}},"data":{{"v":"{}"}}}}"#, "x".repeat(256));
                let out = orc_chaos::run_orc(&home, &["--server", &servers, "create", "-f", "-"], Some(&doc));
                if out.ok() {
                    acked.lock().unwrap().push(name);
                }
            }
        }));
    }
    let mut rng = rand::thread_rng();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        let victim = rng.gen_range(1..=3);
        c.kill(victim);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        c.restart(victim);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} writes were acknowledged: the load did not run",
        acked.len()
    );

    let leader = c.wait_leader(Duration::from_secs(30));
    let list = c.orc(&c.addr(leader), &["get", "cm", "-o", "json"]);
    assert!(list.ok(), "{}", list.stderr);
    let list = list.json();
    let have: std::collections::HashSet<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|n| !have.contains(n.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    println!(
        "{} acknowledged writes across 50 kill rounds, all present",
        acked.len()
    );

    let applied = c.member(leader, leader)["applied_index"].as_u64().unwrap();
    c.wait_applied(applied, Duration::from_secs(30));
    for id in 1..=3 {
        c.stop(id);
    }
    let reports: Vec<serde_json::Value> = (1..=3).map(|id| c.check_store(id)).collect();
    println!("stores: {reports:?}");
    assert!(
        reports.windows(2).all(|w| w[0]["digest"] == w[1]["digest"]),
        "stores differ: {reports:?}"
    );
}

/// Every master killed at once (a power cut): the objects' table files hold
/// only what was flushed (the state machine's writes skip RocksDB's WAL), so
/// on restart each master re-applies the rest from its log, and every
/// acknowledged write is there.
#[test]
fn all_masters_killed_at_once_lose_nothing() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(Duration::from_secs(20));
    let servers = c.servers();
    for i in 0..30 {
        let out = c.create_cm(&servers, "default", &format!("cut-{i}"), &i.to_string());
        assert!(out.ok(), "cut-{i}: {}", out.stderr);
    }
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.restart(id);
    }
    let leader = c.wait_leader(Duration::from_secs(30));
    for id in 1..=3 {
        let out = c.orc(&c.addr(id), &["get", "cm", "-o", "json"]);
        assert!(out.ok(), "master {id}: {}", out.stderr);
        let names: Vec<String> = out.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        for i in 0..30 {
            assert!(
                names.contains(&format!("cut-{i}")),
                "master {id} (leader {leader}) lost cut-{i}: {names:?}"
            );
        }
    }
    for id in 1..=3 {
        c.stop(id);
    }
    let reports: Vec<serde_json::Value> = (1..=3).map(|id| c.check_store(id)).collect();
    assert!(
        reports.windows(2).all(|w| w[0]["digest"] == w[1]["digest"]),
        "stores differ: {reports:?}"
    );
}
