//! Acceptance of the node-agent issue: real containers (youki's libcontainer
//! under a shim forked by `orc shim-zygote`) on two real node agents, each in its own network
//! namespace, with three real masters. Needs root.
use orc_chaos::lab::{Lab, MASTER_IP};
use orc_chaos::{wait_for, Cluster};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

fn pod(c: &Cluster, name: &str) -> Option<Value> {
    c.items(&["pods"])
        .into_iter()
        .find(|p| p["metadata"]["name"] == name)
}

fn wait_phase(c: &Cluster, name: &str, want: &str, lab: &Lab) -> Value {
    let mut last = Value::Null;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(&format!("pod {name} {want}"), MIN, || {
            let p = pod(c, name)?;
            last = p.clone();
            (p["status"]["phase"] == want).then_some(p)
        })
    }));
    match r {
        Ok(p) => p,
        Err(_) => panic!(
            "pod {name} not {want}: {}\nagent logs:\n{}\n{}",
            serde_json::to_string_pretty(&last["status"]).unwrap_or_default(),
            orc_chaos::tail(&lab.agent_log(0), 30),
            orc_chaos::tail(&lab.agent_log(1), 30)
        ),
    }
}

/// The shim zygotes (`orc shim-zygote`) whose parent is `parent`.
fn zygotes_of(parent: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            if !String::from_utf8_lossy(&cmd).ends_with("shim-zygote\0") {
                return None;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let ppid: u32 = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))?
                .trim()
                .parse()
                .ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// The effective capabilities a container printed (`grep CapEff /proc/self/status`).
fn cap_eff(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|s| u64::from_str_radix(s.trim(), 16).unwrap())
        .unwrap_or_else(|| panic!("no CapEff line in {out}"))
}

/// Whether process `pid` has ended (gone, or a zombie not yet reaped).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(s) => s
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
    }
}

/// The log of a pod's container through its node's log file.
fn log_of(lab: &Lab, p: &Value, container: &str) -> String {
    let node = p["spec"]["nodeName"].as_str().unwrap_or("");
    let n = lab
        .nodes
        .iter()
        .find(|n| n.name == node)
        .expect("pod's node");
    let dir = n.data_dir.join("logs").join(format!(
        "{}_{}_{}",
        p["metadata"]["namespace"].as_str().unwrap_or(""),
        p["metadata"]["name"].as_str().unwrap_or(""),
        p["metadata"]["uid"].as_str().unwrap_or("")
    ));
    let mut out = String::new();
    let mut files: Vec<_> = std::fs::read_dir(dir.join(container))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap_or_default().lines() {
            // TIME STREAM TAG MESSAGE
            out.push_str(line.splitn(4, ' ').nth(3).unwrap_or(""));
            out.push('\n');
        }
    }
    out
}

fn single_pod(name: &str, node: &str, policy: &str, spec_extra: &str, container: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  restartPolicy: {policy}
  terminationGracePeriodSeconds: 2
{spec_extra}  containers:
{container}"
    )
}

#[test]
fn real_pods_on_two_nodes() {
    let dir = tempfile::Builder::new()
        .prefix("orc-node-")
        .tempdir()
        .expect("tempdir");
    let mut lab = Lab::new(dir.path(), 2);
    let c = Cluster::start_on(MASTER_IP, 3, &["--cluster-cidr", "198.18.0.0/17"]);
    let image = orc_chaos::lab::busybox_image(dir.path());
    lab.import(0, &image);
    lab.import(1, &image);
    let servers = c.servers();
    let (_registry, reg) = lab.start_registry();
    let agent_flags = [
        "--restart-backoff",
        "1",
        "--status-every",
        "2",
        "--insecure-registry",
        &reg,
        "--cluster-cidr",
        "198.18.0.0/17",
    ];
    for i in 0..2 {
        lab.start_agent(i, &servers, &agent_flags);
    }
    c.wait_ready_nodes(2, MIN);

    // a. A Deployment of 4 busybox httpd pods runs on both nodes, and a pod on
    // one node reaches a pod on the other by its IP.
    c.apply(
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: busybox:1.35
        command: [sh, -c, 'echo hello from $(hostname) > /var/www/index.html; exec httpd -f -p 8080 -h /var/www']
",
    );
    let pods = wait_for("4 Running web pods on both nodes", MIN, || {
        let pods: Vec<Value> = c
            .items(&["pods", "-l", "app=web"])
            .into_iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
            .collect();
        let nodes: std::collections::BTreeSet<&str> = pods
            .iter()
            .filter_map(|p| p["spec"]["nodeName"].as_str())
            .collect();
        (pods.len() == 4 && nodes.len() == 2).then_some(pods)
    });
    let target = pods
        .iter()
        .find(|p| p["spec"]["nodeName"] == "node-2")
        .expect("a pod on node-2");
    let target_ip = target["status"]["podIP"].as_str().unwrap();
    c.apply(
        &single_pod("wget", "node-1", "Never", "", &format!("  - {{name: c, image: busybox:1.35, command: [wget, -q, -O-, 'http://{target_ip}:8080/']}}\n")),
    );
    let p = wait_phase(&c, "wget", "Succeeded", &lab);
    assert!(
        log_of(&lab, &p, "c").contains(&format!(
            "hello from {}",
            target["metadata"]["name"].as_str().unwrap()
        )),
        "wget across nodes: {}",
        log_of(&lab, &p, "c")
    );

    // a. Traffic leaving the cluster is masqueraded: a pod reaches an address
    // outside it (the registry, in the lab's host namespace) and gets answers.
    c.apply(&single_pod(
        "egress",
        "node-1",
        "Never",
        "",
        &format!(
            "  - {{name: c, image: busybox:1.35, command: [wget, -q, -O-, 'http://{reg}/v2/']}}\n"
        ),
    ));
    wait_phase(&c, "egress", "Succeeded", &lab);

    // b (part). The hostname is the pod name; /etc/resolv.conf names the cluster DNS.
    c.apply(&single_pod("names", "node-2", "Never", "", "  - {name: c, image: busybox:1.35, command: [sh, -c, 'cat /etc/hostname; cat /etc/resolv.conf']}\n"));
    let p = wait_phase(&c, "names", "Succeeded", &lab);
    let out = log_of(&lab, &p, "c");
    assert!(out.starts_with("names\n"), "{out}");
    assert!(
        out.contains("search default.svc.cluster.local svc.cluster.local cluster.local")
            && out.contains("ndots:5"),
        "{out}"
    );

    // b. Logs and exec through any master.
    let web = target["metadata"]["name"].as_str().unwrap().to_string();
    let o = c.orc(&servers, &["exec", &web, "--", "cat", "/etc/hostname"]);
    assert!(o.ok(), "exec: {}", o.stderr);
    assert_eq!(o.stdout.trim(), web);
    let o = c.orc(
        &servers,
        &[
            "exec",
            &web,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(o.code, 3, "the command's exit code: {}", o.stderr);
    // exec runs in the pod's network namespace: its localhost is the pod's.
    let w = c.orc(
        &servers,
        &[
            "exec",
            &web,
            "--",
            "wget",
            "-q",
            "-O-",
            "http://127.0.0.1:8080/",
        ],
    );
    assert!(
        w.ok() && w.stdout.contains(&format!("hello from {web}")),
        "exec in the pod's network namespace: {} {}",
        w.stdout,
        w.stderr
    );
    // The pod network is IPv4: eth0 has no IPv6 address (no link-local
    // address, so no duplicate address detection or MLD on the bridge);
    // lo keeps ::1.
    let v6 = c.orc(&servers, &["exec", &web, "--", "cat", "/proc/net/if_inet6"]);
    assert!(
        v6.ok() && v6.stdout.contains(" lo\n") && !v6.stdout.contains("eth0"),
        "the pod's IPv6 addresses: {} {}",
        v6.stdout,
        v6.stderr
    );
    assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("out\n", "err\n"));
    let o = c.orc_stdin(
        &servers,
        &["exec", "-i", "-t", &web, "--", "sh"],
        Some("echo tty-$((40+2)); tty; exit\n"),
    );
    assert!(
        o.stdout.contains("tty-42") && o.stdout.contains("/dev/pts/"),
        "interactive shell on a terminal: {}",
        o.stdout
    );
    c.apply(
        &single_pod("ticker", "node-1", "Always", "", "  - {name: c, image: busybox:1.35, command: [sh, -c, 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done']}\n"),
    );
    wait_phase(&c, "ticker", "Running", &lab);
    let follow_out = dir.path().join("follow.out");
    let _follow = c.spawn_cli(&["logs", "-f", "ticker"], &follow_out);
    let seen = |n: usize| {
        let f = follow_out.clone();
        move || {
            let s = std::fs::read_to_string(&f).unwrap_or_default();
            (s.lines().filter(|l| l.starts_with("tick ")).count() >= n).then_some(())
        }
    };
    wait_for("logs -f shows output", MIN, seen(2));
    wait_for("logs -f keeps streaming", MIN, seen(8));
    let o = c.orc(&servers, &["logs", "ticker", "--tail", "1"]);
    assert!(
        o.ok() && o.stdout.lines().count() == 1 && o.stdout.starts_with("tick "),
        "{}",
        o.stdout
    );
    assert!(!c.orc(&servers, &["logs", "nonexistent"]).ok());

    // c. Exit 1 under Always: restartCount rises, CrashLoopBackOff, lastState.
    c.apply(&single_pod(
        "crash",
        "node-1",
        "Always",
        "",
        "  - {name: c, image: busybox:1.35, command: [sh, -c, 'echo try; exit 1']}\n",
    ));
    let p = wait_for("crash restarted twice and in CrashLoopBackOff", MIN, || {
        let p = pod(&c, "crash")?;
        let s = &p["status"]["containerStatuses"][0];
        (s["restartCount"].as_i64()? >= 2 && s["state"]["waiting"]["reason"] == "CrashLoopBackOff")
            .then_some(p)
    });
    assert_eq!(
        p["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        1
    );
    assert!(log_of(&lab, &p, "c").matches("try").count() >= 2);

    // c. Over its memory limit: OOMKilled.
    c.apply(&single_pod(
        "oom",
        "node-2",
        "Never",
        "",
        "  - name: c
    image: busybox:1.35
    resources: {limits: {memory: 16Mi}}
    command: [sh, -c, 'x=$(head -c 67108864 /dev/zero | tr \"\\0\" a); echo survived']
",
    ));
    let p = wait_phase(&c, "oom", "Failed", &lab);
    assert_eq!(
        p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"], "OOMKilled",
        "{}",
        p["status"]
    );

    // c. A failing liveness probe (exec) restarts the container; a failing
    // readiness probe (httpGet) turns the pod NotReady without a restart.
    c.apply(&single_pod(
        "live",
        "node-1",
        "Always",
        "",
        "  - name: c
    image: busybox:1.35
    command: [sh, -c, 'touch /tmp/healthy; sleep 3; rm /tmp/healthy; sleep 3600']
    livenessProbe: {exec: {command: [cat, /tmp/healthy]}, periodSeconds: 1, failureThreshold: 1}
",
    ));
    wait_for("a liveness restart", MIN, || {
        let p = pod(&c, "live")?;
        (p["status"]["containerStatuses"][0]["restartCount"].as_i64()? >= 1).then_some(())
    });
    c.apply(
        &single_pod(
            "ready",
            "node-2",
            "Always",
            "",
            "  - name: c
    image: busybox:1.35
    ports: [{name: http, containerPort: 8080}]
    command: [sh, -c, 'mkdir -p /www; echo ok > /www/ready; httpd -p 8080 -h /www; sleep 4; rm /www/ready; sleep 3600']
    readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: 1}
",
        ),
    );
    let is_ready = |p: &Value| {
        p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    };
    wait_for("ready turns Ready", MIN, || {
        pod(&c, "ready").filter(|p| is_ready(p)).map(|_| ())
    });
    let p = wait_for("ready turns NotReady", MIN, || {
        pod(&c, "ready").filter(|p| !is_ready(p))
    });
    assert_eq!(p["status"]["phase"], "Running");
    assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);

    // d. A Job of real containers with an init container completes; an
    // emptyDir carries the init container's work to the app container.
    c.apply(
        "apiVersion: batch/v1
kind: Job
metadata: {name: job}
spec:
  template:
    spec:
      restartPolicy: Never
      volumes: [{name: work, emptyDir: {}}]
      initContainers:
      - {name: init, image: busybox:1.35, command: [sh, -c, 'echo prepared > /work/file'], volumeMounts: [{name: work, mountPath: /work}]}
      containers:
      - {name: main, image: busybox:1.35, command: [sh, -c, 'cat /work/file'], volumeMounts: [{name: work, mountPath: /work}]}
",
    );
    wait_for("job complete", MIN, || {
        let j = c
            .items(&["jobs"])
            .into_iter()
            .find(|j| j["metadata"]["name"] == "job")?;
        (j["status"]["succeeded"] == 1).then_some(())
    });
    let jp = c
        .items(&["pods", "-l", "job-name=job"])
        .pop()
        .expect("job pod");
    assert_eq!(log_of(&lab, &jp, "main"), "prepared\n");

    // d. A ConfigMap volume follows the ConfigMap.
    c.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {greeting: one}\n");
    c.apply(
        &single_pod(
            "cm",
            "node-1",
            "Always",
            "  volumes: [{name: cfg, configMap: {name: cfg}}]\n",
            "  - {name: c, image: busybox:1.35, command: [sh, -c, 'while true; do cat /cfg/greeting; echo; sleep 0.5; done'], volumeMounts: [{name: cfg, mountPath: /cfg}]}\n",
        ),
    );
    let p = wait_phase(&c, "cm", "Running", &lab);
    wait_for("the first greeting", MIN, || {
        log_of(&lab, &p, "c").contains("one").then_some(())
    });
    c.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {greeting: two}\n");
    wait_for("the new greeting", MIN, || {
        log_of(&lab, &p, "c").contains("two").then_some(())
    });

    // f. Images from a registry, by tag and by digest; a wrong digest and a
    // missing image fail with the registry's message; an imported image runs
    // with imagePullPolicy Never.
    let o = std::process::Command::new(orc_chaos::orc_bin())
        .args([
            "image",
            "push",
            "busybox:1.35",
            &format!("{reg}/tools/busybox:1"),
            "--insecure-registry",
            &reg,
            "--data-dir",
        ])
        .arg(&lab.nodes[0].data_dir)
        .output()
        .expect("orc image push");
    assert!(
        o.status.success(),
        "push: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pushed = String::from_utf8_lossy(&o.stdout).to_string();
    let digest = pushed.trim().rsplit('@').next().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{pushed}");
    let pull_pod = |name: &str, image: &str, policy: &str| {
        single_pod(name, "node-2", "Never", "", &format!("  - {{name: c, image: '{image}', imagePullPolicy: {policy}, command: [echo, pulled]}}\n"))
    };
    c.apply(&pull_pod(
        "bytag",
        &format!("{reg}/tools/busybox:1"),
        "Always",
    ));
    c.apply(&pull_pod(
        "bydigest",
        &format!("{reg}/tools/busybox@{digest}"),
        "IfNotPresent",
    ));
    for name in ["bytag", "bydigest"] {
        let p = wait_phase(&c, name, "Succeeded", &lab);
        assert_eq!(log_of(&lab, &p, "c"), "pulled\n");
    }
    let wrong = format!("{reg}/tools/busybox@sha256:{}", "0".repeat(64));
    c.apply(&pull_pod("wrongdigest", &wrong, "IfNotPresent"));
    c.apply(&pull_pod(
        "missing",
        &format!("{reg}/tools/nothing:1"),
        "IfNotPresent",
    ));
    for (name, words) in [("wrongdigest", "manifest unknown"), ("missing", "unknown")] {
        let p = wait_for(&format!("{name}: ImagePullBackOff"), MIN, || {
            let p = pod(&c, name)?;
            (p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                == "ImagePullBackOff")
                .then_some(p)
        });
        assert_eq!(p["status"]["phase"], "Pending");
        let msg = p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .unwrap_or("");
        assert!(msg.contains(words), "{name}: the registry's message: {msg}");
    }
    c.apply(&pull_pod("never", "busybox:1.35", "Never"));
    wait_phase(&c, "never", "Succeeded", &lab);
    c.apply(&pull_pod("neverabsent", "nothing:1", "Never"));
    wait_for("ErrImageNeverPull", MIN, || {
        let p = pod(&c, "neverabsent")?;
        (p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImageNeverPull")
            .then_some(())
    });

    // Lifecycle: a preStop hook runs, then SIGTERM reaches the container, on
    // deletion; a memory-backed emptyDir is a tmpfs.
    let host_dir = dir.path().join("hostpath");
    std::fs::create_dir_all(&host_dir).unwrap();
    c.apply(
        &single_pod(
            "graceful",
            "node-1",
            "Always",
            &format!("  volumes: [{{name: host, hostPath: {{path: '{}'}}}}, {{name: mem, emptyDir: {{medium: Memory}}}}]\n", host_dir.display()),
            "  - name: c
    image: busybox:1.35
    volumeMounts: [{name: host, mountPath: /host}, {name: mem, mountPath: /mem}]
    lifecycle: {preStop: {exec: {command: [sh, -c, 'echo bye > /host/prestop']}}}
    command: [sh, -c, 'grep \" /mem \" /proc/mounts > /host/mounts; trap \"echo term > /host/term; exit 0\" TERM; while true; do sleep 0.2; done']
",
        ),
    );
    wait_phase(&c, "graceful", "Running", &lab);
    wait_for("the mount table", MIN, || {
        std::fs::read_to_string(host_dir.join("mounts"))
            .ok()
            .filter(|m| !m.is_empty())
    });
    assert!(
        std::fs::read_to_string(host_dir.join("mounts"))
            .unwrap()
            .contains("tmpfs"),
        "medium: Memory is a tmpfs"
    );
    assert!(c.orc(&servers, &["delete", "pod", "graceful"]).ok());
    wait_for("preStop and SIGTERM", MIN, || {
        (std::fs::read_to_string(host_dir.join("prestop")).ok()? == "bye\n"
            && std::fs::read_to_string(host_dir.join("term")).ok()? == "term\n")
            .then_some(())
    });

    // Graceful deletion through the API: the pod is Terminating while its
    // node stops it (a shell as PID 1 ignores SIGTERM: SIGKILL after the
    // 2 s grace period), then it is gone.
    c.apply(&single_pod(
        "slow",
        "node-2",
        "Always",
        "",
        "  - {name: c, image: busybox:1.35, command: [sleep, '3600']}\n",
    ));
    wait_phase(&c, "slow", "Running", &lab);
    let t = std::time::Instant::now();
    assert!(c.orc(&servers, &["delete", "pod", "slow"]).ok());
    let p = pod(&c, "slow").expect("still there while its node stops it");
    assert!(
        p["metadata"]["deletionTimestamp"].is_string(),
        "{}",
        p["metadata"]
    );
    assert_eq!(p["metadata"]["deletionGracePeriodSeconds"], 2);
    assert!(c
        .orc(&servers, &["get", "pods"])
        .stdout
        .contains("Terminating"));
    wait_for("slow gone", MIN, || pod(&c, "slow").is_none().then_some(()));
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "the grace period was given"
    );

    // g. Security defaults.
    c.apply(
        &single_pod(
            "sec",
            "node-2",
            "Never",
            "",
            "  - name: c
    image: busybox:1.35
    securityContext: {runAsUser: 1000}
    command: [sh, -c, 'echo uid=$(id -u); echo procs=$(ls -d /proc/[0-9]* | wc -l); grep CapEff /proc/self/status; mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo MOUNTED || echo mount-refused']
",
        ),
    );
    let p = wait_phase(&c, "sec", "Succeeded", &lab);
    let out = log_of(&lab, &p, "c");
    assert!(out.contains("uid=1000"), "{out}");
    assert!(
        out.contains("mount-refused") && !out.contains("MOUNTED"),
        "{out}"
    );
    let procs: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.trim().parse().ok())
        .expect("procs");
    assert!(
        procs <= 5,
        "the container sees only its own processes: {out}"
    );
    let cap = cap_eff(&out);
    assert_eq!(cap & (1 << 21), 0, "no CAP_SYS_ADMIN");
    assert_eq!(cap & (1 << 16), 0, "no CAP_SYS_MODULE");
    c.apply(
        &single_pod(
            "root",
            "node-2",
            "Never",
            "",
            "  - {name: c, image: busybox:1.35, command: [sh, -c, 'grep CapEff /proc/self/status; mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo MOUNTED || echo mount-refused']}\n",
        ),
    );
    let p = wait_phase(&c, "root", "Succeeded", &lab);
    let out = log_of(&lab, &p, "c");
    assert!(
        out.contains("mount-refused"),
        "root without CAP_SYS_ADMIN cannot mount: {out}"
    );
    // The default seccomp profile, on its own: CAP_SYS_ADMIN is granted,
    // mount and unshare are still refused (EPERM from the filter).
    c.apply(
        &single_pod(
            "filtered",
            "node-2",
            "Never",
            "",
            "  - {name: c, image: busybox:1.35, securityContext: {capabilities: {add: [SYS_ADMIN]}}, command: [sh, -c, 'grep -E \"CapEff|Seccomp:\" /proc/self/status; mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo MOUNTED || echo mount-refused; unshare -n true && echo UNSHARED || echo unshare-refused']}\n",
        ),
    );
    let p = wait_phase(&c, "filtered", "Succeeded", &lab);
    let out = log_of(&lab, &p, "c");
    let cap = cap_eff(&out);
    assert_ne!(cap & (1 << 21), 0, "CAP_SYS_ADMIN was asked for: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Seccomp:") && l.trim_end().ends_with('2')),
        "a seccomp filter is installed: {out}"
    );
    assert!(
        out.contains("mount-refused") && out.contains("unshare-refused"),
        "the default profile refuses mount and unshare: {out}"
    );

    // e. kill -9 of the agent: containers keep running; the restarted agent
    // adopts them with restartCount unchanged.
    let restarts = |c: &Cluster| -> Vec<(String, i64)> {
        c.items(&["pods", "-l", "app=web"])
            .iter()
            .map(|p| {
                (
                    p["metadata"]["uid"].as_str().unwrap().to_string(),
                    p["status"]["containerStatuses"][0]["restartCount"]
                        .as_i64()
                        .unwrap(),
                )
            })
            .collect()
    };
    let before = restarts(&c);
    let pids = |lab: &Lab| -> Vec<i32> {
        lab.nodes
            .iter()
            .flat_map(|n| {
                std::fs::read_dir(n.data_dir.join("run/containers"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|e| e.file_name().to_string_lossy().contains("-httpd-"))
            .filter_map(|e| {
                std::fs::read_to_string(e.path().join("pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    };
    let pids_before = pids(&lab);
    assert_eq!(pids_before.len(), 4);
    let agent_pid = |lab: &Lab, i: usize| lab.nodes[i].agent.as_ref().and_then(|a| a.id()).unwrap();
    let old_zygotes: Vec<i32> = (0..2)
        .flat_map(|i| zygotes_of(agent_pid(&lab, i)))
        .collect();
    assert_eq!(old_zygotes.len(), 2, "one shim zygote per agent");
    // Each shim (the parent of its container's init, a child of its agent's
    // zygote) sees none of its node's pod network namespace bindings: one
    // mount per pod there made every container start slower.
    let ppid = |pid: &str| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .unwrap()
            .trim()
            .to_string()
    };
    for pid in &pids_before {
        let shim = ppid(&pid.to_string());
        let comm = std::fs::read_to_string(format!("/proc/{shim}/comm")).unwrap();
        assert_eq!(comm.trim(), "orc-shim", "the parent of container {pid}");
        let agent = ppid(&ppid(&shim));
        let node = (0..2)
            .find(|i| agent_pid(&lab, *i).to_string() == agent)
            .expect("the shim's zygote is an agent's");
        let bound = format!("{}/run/netns/", lab.nodes[node].data_dir.display());
        let table = std::fs::read_to_string(format!("/proc/{shim}/mountinfo")).unwrap();
        assert!(
            !table.contains(&bound),
            "shim {shim} sees the bindings in {bound}:\n{table}"
        );
    }
    lab.kill_agent(0);
    lab.kill_agent(1);
    std::thread::sleep(Duration::from_secs(2));
    for pid in &pids_before {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "container {pid} died with its agent"
        );
    }
    for pid in &old_zygotes {
        assert!(gone(*pid), "shim zygote {pid} outlived its agent");
    }
    for i in 0..2 {
        lab.start_agent(i, &servers, &agent_flags);
    }
    std::thread::sleep(Duration::from_secs(5));
    let after = restarts(&c);
    assert_eq!(before, after, "same pods, same restart counts");
    assert_eq!(pids(&lab), pids_before, "the same container processes");
    assert_eq!(
        c.items(&["pods", "-l", "app=web"])
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count(),
        4
    );
    // A shim zygote that died is replaced on the next container start.
    let run_once = |name: &str| {
        c.apply(&single_pod(
            name,
            "node-1",
            "Never",
            "",
            "  - {name: c, image: busybox:1.35, command: [\"true\"]}\n",
        ));
        wait_phase(&c, name, "Succeeded", &lab);
    };
    run_once("zygote1");
    let z = zygotes_of(agent_pid(&lab, 0));
    assert_eq!(z.len(), 1, "the restarted agent's zygote");
    let _ = std::process::Command::new("kill")
        .args(["-9", &z[0].to_string()])
        .status();
    wait_for("the killed zygote gone", MIN, || gone(z[0]).then_some(()));
    run_once("zygote2");
    assert_eq!(zygotes_of(agent_pid(&lab, 0)).len(), 1, "a new zygote");

    // e. After deleting every pod nothing of orc's remains.
    assert!(c.orc(&servers, &["delete", "deployment", "web"]).ok());
    assert!(c.orc(&servers, &["delete", "job", "job"]).ok());
    for name in [
        "egress",
        "bytag",
        "bydigest",
        "wrongdigest",
        "missing",
        "never",
        "neverabsent",
        "wget",
        "names",
        "ticker",
        "crash",
        "oom",
        "live",
        "ready",
        "cm",
        "sec",
        "root",
        "filtered",
        "zygote1",
        "zygote2",
    ] {
        c.orc(&servers, &["delete", "pod", name]);
    }
    wait_for("no pods", MIN, || {
        c.items(&["pods"]).is_empty().then_some(())
    });
    wait_for("nothing left on the nodes", MIN, || {
        for (i, n) in lab.nodes.iter().enumerate() {
            let links: Vec<String> = lab
                .links(i)
                .into_iter()
                .filter(|l| l.starts_with("orc") && l != "orc0")
                .collect();
            if !links.is_empty() {
                return None;
            }
            for d in [
                "run/containers",
                "run/netns",
                "run/state",
                "run/pods",
                "rw",
                "pods",
            ] {
                if std::fs::read_dir(n.data_dir.join(d))
                    .map(|r| r.count())
                    .unwrap_or(0)
                    != 0
                {
                    return None;
                }
            }
            // The agent's own mounts stay while it runs: the tmpfs of its
            // `run` directory and the binding of `run/netns` (as /run/netns
            // is for `ip netns`).
            let dir = n.data_dir.to_str().unwrap();
            let own = [format!("{dir}/run"), format!("{dir}/run/netns")];
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            if mounts.lines().any(|l| {
                l.contains(dir) && !own.iter().any(|o| l.split(' ').nth(4) == Some(o.as_str()))
            }) {
                return None;
            }
        }
        let cgroups = std::fs::read_dir("/sys/fs/cgroup/memory/orc")
            .map(|r| r.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0);
        (cgroups == 0).then_some(())
    });
}
