//! Acceptance of the Services issue on two real node agents in their own
//! network namespaces, three real masters, real containers, real nftables
//! rules and real DNS packets. The test's own (host) namespace is the
//! "outside world": it sits on the lab bridge but is no node. Needs root.
use orc_chaos::lab::{Lab, MASTER_IP};
use orc_chaos::{wait_for, Cluster};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

/// One HTTP GET from this (outside) namespace; the body, or None when the
/// connection is refused, reset or times out.
fn http_get(addr: &str, path: &str, timeout: Duration) -> Option<String> {
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    // CGI headers may end lines with a bare newline.
    let (head, body) = out
        .split_once("\r\n\r\n")
        .or_else(|| out.split_once("\n\n"))?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// Run a shell command in pod `pod` of namespace demo.
fn exec(c: &Cluster, pod: &str, script: &str) -> (i32, String, String) {
    let o = c.orc(
        &c.servers(),
        &["-n", "demo", "exec", pod, "--", "sh", "-c", script],
    );
    (o.code, o.stdout, o.stderr)
}

fn count(out: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in out.lines().filter(|l| !l.trim().is_empty()) {
        *m.entry(l.trim().to_string()).or_default() += 1;
    }
    m
}

fn web_pods(c: &Cluster) -> Vec<Value> {
    c.ready_pods("demo", "app=web")
}

/// The rules of node `i`'s Service table.
fn table(lab: &Lab, i: usize) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.nodes[i].netns,
            "nft",
            "list",
            "table",
            "ip",
            "orc-svc",
        ])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Service in front of the web pods: NodePort 30002, plus `extra` spec lines.
fn web_service(extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: NodePort
  selector: {{app: web}}
{extra}  ports: [{{name: http, port: 80, targetPort: http, nodePort: 30002}}]
"
    )
}

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata: {labels: {app: web}, annotations: {v: '1'}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: httpd
        image: busybox:1.35
        command: [sh, -c, 'mkdir -p /www/cgi-bin; hostname > /www/index.html; printf \"#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho \\$REMOTE_ADDR\\n\" > /www/cgi-bin/ip; chmod +x /www/cgi-bin/ip; touch /tmp/ready; exec httpd -f -p 8080 -h /www']
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {exec: {command: [test, -e, /tmp/ready]}, periodSeconds: 1, failureThreshold: 1}
        lifecycle: {preStop: {exec: {command: [sleep, '2']}}}
";

#[test]
fn services_on_two_nodes() {
    let dir = tempfile::Builder::new()
        .prefix("orc-svc-")
        .tempdir()
        .expect("tempdir");
    let t0 = std::time::Instant::now();
    let stage = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let mut lab = Lab::new(dir.path(), 2);
    let c = Cluster::start_on(
        MASTER_IP,
        3,
        &[
            "--cluster-cidr",
            "198.18.0.0/17",
            "--load-balancer-pool",
            "198.18.254.200-198.18.254.210",
        ],
    );
    let image = orc_chaos::lab::busybox_image(dir.path());
    lab.import(0, &image);
    lab.import(1, &image);
    let servers = c.servers();
    let agent_flags = ["--status-every", "2", "--cluster-cidr", "198.18.0.0/17"];
    for i in 0..2 {
        lab.start_agent(i, &servers, &agent_flags);
    }
    let logs = |lab: &Lab| {
        format!(
            "{}\n----\n{}",
            orc_chaos::tail(&lab.agent_log(0), 40),
            orc_chaos::tail(&lab.agent_log(1), 40)
        )
    };
    c.wait_ready_nodes(2, MIN);
    stage("nodes ready");
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    // e. A Service that exists before a pod gives the pod its variables.
    c.apply(
        "apiVersion: v1
kind: Service
metadata: {name: redis-master, namespace: demo}
spec:
  selector: {app: redis}
  ports: [{name: redis, port: 6379}]
",
    );
    c.apply(&web_service(""));
    c.apply(WEB);
    c.apply(
        "apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 0
  containers:
  - {name: c, image: busybox:1.35, command: [sleep, '100000']}
",
    );
    let redis = c
        .items(&["-n", "demo", "services"])
        .into_iter()
        .find(|s| s["metadata"]["name"] == "redis-master")
        .expect("redis-master");
    let rip = redis["spec"]["clusterIP"].as_str().unwrap().to_string();
    let web_svc = c
        .items(&["-n", "demo", "services"])
        .into_iter()
        .find(|s| s["metadata"]["name"] == "web")
        .expect("web");
    let vip = web_svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("3 ready web pods and a running client", MIN, || {
            let ok = web_pods(&c).len() == 3 && exec(&c, "client", "true").0 == 0;
            ok.then_some(())
        })
    }));
    assert!(r.is_ok(), "pods did not come up:\n{}", logs(&lab));
    let (_, env, _) = exec(&c, "client", "env | grep ^REDIS_MASTER_ | sort");
    for want in [
        format!("REDIS_MASTER_SERVICE_HOST={rip}"),
        "REDIS_MASTER_SERVICE_PORT=6379".into(),
        format!("REDIS_MASTER_PORT=tcp://{rip}:6379"),
        format!("REDIS_MASTER_PORT_6379_TCP=tcp://{rip}:6379"),
        "REDIS_MASTER_PORT_6379_TCP_PROTO=tcp".into(),
        "REDIS_MASTER_PORT_6379_TCP_PORT=6379".into(),
        format!("REDIS_MASTER_PORT_6379_TCP_ADDR={rip}"),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in:\n{env}");
    }
    // A Service without endpoints rejects at once (no timeout).
    let t = std::time::Instant::now();
    let (code, _, err) = exec(
        &c,
        "client",
        &format!("timeout 5 wget -q -O- http://{rip}:6379/"),
    );
    assert!(
        code != 0 && t.elapsed() < Duration::from_secs(4),
        "no endpoints: {code} {err} after {:?}",
        t.elapsed()
    );

    // The pod bridge keeps one MAC whatever pods come and go (the gateway's,
    // derived from its address like the pods' own).
    for n in &lab.nodes {
        let o = std::process::Command::new("ip")
            .args(["-n", &n.netns, "link", "show", "orc0"])
            .output()
            .expect("ip link");
        let l = String::from_utf8_lossy(&o.stdout);
        assert!(l.contains("link/ether 0a:58:c6:12:"), "{l}");
    }
    stage("pods up, env and reject checked");
    // d. DNS from a pod: a ClusterIP Service's A record, a headless one's
    // ready pod IPs, a StatefulSet pod's own name, SRV for a named port, a
    // CNAME for an ExternalName; a short name of another namespace fails
    // while the qualified name works.
    c.apply(
        "apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: demo}
spec:
  serviceName: db
  replicas: 2
  podManagementPolicy: Parallel
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - {name: c, image: busybox:1.35, command: [sleep, '100000'], ports: [{name: pg, containerPort: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: demo}
spec: {type: ExternalName, externalName: example.test}
---
apiVersion: v1
kind: Service
metadata: {name: peer, namespace: default}
spec: {ports: [{port: 80}]}
",
    );
    let db_ips: Vec<String> = wait_for("2 ready db pods", MIN, || {
        let pods: Vec<Value> = c
            .items(&["-n", "demo", "pods", "-l", "app=db"])
            .into_iter()
            .filter(|p| {
                p["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .collect();
        (pods.len() == 2).then(|| {
            let mut v: Vec<String> = pods
                .iter()
                .map(|p| p["status"]["podIP"].as_str().unwrap_or("").to_string())
                .collect();
            v.sort();
            v
        })
    });
    let db0_ip = c
        .items(&["-n", "demo", "pods"])
        .into_iter()
        .find(|p| p["metadata"]["name"] == "db-0")
        .and_then(|p| p["status"]["podIP"].as_str().map(String::from))
        .expect("db-0");
    let lookup = |args: &str| {
        let (code, out, err) = exec(&c, "client", &format!("nslookup {args}"));
        (code, format!("{out}{err}"))
    };
    // The node's DNS process starts with the agent; give it its first answer.
    let mut first = (0, String::new());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the A record of web", MIN, || {
            first = lookup("web.demo.svc.cluster.local");
            let ok = first.0 == 0 && first.1.contains(&vip);
            if !ok {
                stage(&format!("no A record yet: {}", first.1.replace('\n', " ")));
                let ns = &lab.nodes[0].netns;
                let o = std::process::Command::new("ip")
                    .args(["netns", "exec", ns, "sh", "-c", "ip neigh; grep 'port=53 ' /proc/net/nf_conntrack | head -5; nstat -az 2>/dev/null | grep -E 'UdpIn|UdpNoPorts|UdpInErrors|IpInAddrErrors|IpExtInNoRoutes|IpInDiscards|IpOutNoRoutes'"])
                    .output()
                    .unwrap();
                eprintln!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            ok.then_some(())
        })
    }));
    assert!(
        r.is_ok(),
        "A of web: {}\ndns.log: {}\n{}",
        first.1,
        std::fs::read_to_string(lab.nodes[0].data_dir.join("dns.log")).unwrap_or_default(),
        logs(&lab)
    );
    let (_, out) = wait_for("both db pods in DNS", MIN, || {
        let r = lookup("db.demo.svc.cluster.local");
        db_ips
            .iter()
            .all(|ip| r.1.contains(ip.as_str()))
            .then_some(r)
    });
    assert!(!out.contains(&vip), "{out}");
    let (code, out) = lookup("db-0.db.demo.svc.cluster.local");
    assert!(code == 0 && out.contains(&db0_ip), "db-0: {out}");
    let (code, out) = lookup("-type=SRV _http._tcp.web.demo.svc.cluster.local");
    assert!(
        code == 0 && out.contains(" 80 web.demo.svc.cluster.local"),
        "SRV: {out}"
    );
    let (_, out) = lookup("-type=CNAME ext.demo.svc.cluster.local");
    assert!(
        out.contains("canonical name = example.test"),
        "CNAME: {out}"
    );
    let (code, out) = lookup("peer");
    assert!(
        code != 0 && !out.contains("198.19."),
        "short name of another namespace: {out}"
    );
    let (code, out) = lookup("peer.default.svc.cluster.local");
    assert!(
        code == 0 && out.contains("198.19."),
        "qualified name: {out}"
    );
    let (code, out) = lookup(&vip);
    assert!(
        code == 0 && out.contains("web.demo.svc.cluster.local"),
        "PTR of the ClusterIP: {out}"
    );

    stage("DNS checked");
    // a. 300 requests through the ClusterIP reach each of the 3 pods >= 20 %.
    let many = |target: &str| {
        exec(&c, "client", &format!("i=0; while [ $i -lt 300 ]; do timeout 2 wget -q -O- {target} || echo FAIL; i=$((i+1)); done"))
    };
    let (_, out, err) = many("http://web.demo.svc.cluster.local/");
    let hits = count(&out);
    assert_eq!(hits.len(), 3, "3 backends: {hits:?} {err}\n{}", logs(&lab));
    for (pod, n) in &hits {
        assert!(*n >= 60, "{pod} got {n} of 300: {hits:?}");
    }
    // Those connections were balanced as the client's sockets connected
    // (orc_proxy::socklb): none of them went to the ClusterIP itself, so no
    // node tracked one with it as destination.
    let to_vip = |lab: &Lab| {
        let mut t = String::new();
        for n in &lab.nodes {
            let o = std::process::Command::new("ip")
                .args(["netns", "exec", &n.netns, "cat", "/proc/net/nf_conntrack"])
                .output()
                .expect("conntrack table");
            t.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        let hits: Vec<&str> = t
            .lines()
            .filter(|l| l.contains(&format!(" dst={vip} ")))
            .collect();
        (
            hits.len(),
            hits.iter().take(3).copied().collect::<Vec<_>>().join("\n"),
        )
    };
    let (n, t) = to_vip(&lab);
    assert_eq!(n, 0, "ClusterIP connections went through NAT:\n{t}");
    // ... and with sessionAffinity ClientIP they all reach one.
    c.apply(&web_service("  sessionAffinity: ClientIP\n"));
    std::thread::sleep(Duration::from_secs(1));
    let (_, out, _) = exec(
        &c,
        "client",
        &format!(
            "i=0; while [ $i -lt 50 ]; do timeout 2 wget -q -O- http://{vip}/; i=$((i+1)); done"
        ),
    );
    let hits = count(&out);
    assert_eq!(hits.len(), 1, "affinity: {hits:?}");
    assert_eq!(hits.values().sum::<usize>(), 50);
    // Affinity is the nftables rules' (the socket balancer leaves it to them).
    let (n, _) = to_vip(&lab);
    assert!(n > 0, "affinity: no connection to {vip} went through NAT");

    stage("ClusterIP and affinity checked");
    // b. NodePort 30002 at every node's address, from outside the cluster.
    c.apply(&web_service(""));
    for n in &lab.nodes {
        let addr = format!("{}:30002", n.address);
        let body = wait_for(&format!("NodePort at {addr}"), MIN, || {
            http_get(&addr, "/", Duration::from_secs(2))
        });
        assert!(body.starts_with("web-"), "{addr}: {body}");
    }
    let o = c.orc(&servers, &["-n", "demo", "get", "svc", "web"]);
    assert!(
        o.stdout.contains("NodePort") && o.stdout.contains("80:30002/TCP"),
        "{}",
        o.stdout
    );
    let o = c.orc(&servers, &["-n", "demo", "get", "endpointslices"]);
    assert!(
        o.stdout.contains("ENDPOINTS") && o.stdout.matches("(ready)").count() >= 3,
        "{}",
        o.stdout
    );
    stage("NodePort checked");
    // c. A LoadBalancer Service gets a pool address that answers from outside.
    c.apply(
        "apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{name: http, port: 8000, targetPort: http}]
",
    );
    let lb_ip = wait_for("a load-balancer address", MIN, || {
        c.items(&["-n", "demo", "services"])
            .into_iter()
            .find(|s| s["metadata"]["name"] == "lb")
            .and_then(|s| {
                s["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()
                    .map(String::from)
            })
    });
    assert!(lb_ip.starts_with("198.18.254.2"), "{lb_ip}");
    let mut last = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the load-balancer address to answer", MIN, || {
            last = http_get(&format!("{lb_ip}:8000"), "/", Duration::from_secs(2));
            last.clone().filter(|b| b.starts_with("web-"))
        })
    }));
    assert!(r.is_ok(), "{lb_ip}:8000 answered {last:?}\n{}", logs(&lab));
    let o = c.orc(&servers, &["-n", "demo", "get", "svc", "lb"]);
    assert!(
        o.stdout.contains(&lb_ip) && o.stdout.contains("8000:3"),
        "{}",
        o.stdout
    );
    let o = c.orc(&servers, &["-n", "demo", "delete", "service", "lb"]);
    assert!(o.ok(), "{}", o.stderr);
    wait_for("the load-balancer address withdrawn", MIN, || {
        http_get(&format!("{lb_ip}:8000"), "/", Duration::from_millis(500))
            .is_none()
            .then_some(())
    });

    stage("LoadBalancer checked");
    // With externalTrafficPolicy Local only nodes with a local endpoint
    // answer, and the backend sees the client's own address. Scale to one
    // pod so that one node has none.
    let o = c.orc(
        &servers,
        &["-n", "demo", "scale", "deployment/web", "--replicas", "1"],
    );
    assert!(o.ok(), "{}", o.stderr);
    c.apply(&web_service("  externalTrafficPolicy: Local\n"));
    let (with, without) = wait_for("one web pod", MIN, || {
        let pods = c.items(&["-n", "demo", "pods", "-l", "app=web"]);
        (pods.len() == 1 && web_pods(&c).len() == 1).then(|| {
            let node = pods[0]["spec"]["nodeName"].as_str().unwrap().to_string();
            let with = lab
                .nodes
                .iter()
                .find(|n| n.name == node)
                .unwrap()
                .address
                .clone();
            let without = lab
                .nodes
                .iter()
                .find(|n| n.name != node)
                .unwrap()
                .address
                .clone();
            (with, without)
        })
    });
    let mut last = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the client address through a Local NodePort", MIN, || {
            last = http_get(
                &format!("{with}:30002"),
                "/cgi-bin/ip",
                Duration::from_secs(2),
            );
            // busybox httpd listens on IPv6 and shows v4-mapped addresses.
            last.clone().filter(|b| {
                b.trim()
                    .trim_start_matches("[::ffff:")
                    .trim_end_matches(']')
                    == MASTER_IP
            })
        })
    }));
    assert!(
        r.is_ok(),
        "the backend saw {last:?}, not {MASTER_IP}\n{}\n{}",
        table(&lab, 0),
        logs(&lab)
    );
    wait_for("no answer from the node without an endpoint", MIN, || {
        http_get(&format!("{without}:30002"), "/", Duration::from_secs(1))
            .is_none()
            .then_some(())
    });
    // One node drops (no local endpoint), the other balances over its own.
    let t = format!("{}{}", table(&lab, 0), table(&lab, 1));
    assert!(
        t.contains("elements = { tcp . 30002 }") && t.contains("tcp . 30002 . 0-719 : "),
        "{t}"
    );

    stage("Local policy checked");
    // f. A pod failing readiness leaves rotation within 1 s of its status change.
    let o = c.orc(
        &servers,
        &["-n", "demo", "scale", "deployment/web", "--replicas", "3"],
    );
    assert!(o.ok(), "{}", o.stderr);
    c.apply(&web_service(""));
    let pods = wait_for("3 ready web pods", MIN, || {
        let p = web_pods(&c);
        (p.len() == 3).then_some(p)
    });
    let victim = pods[0]["metadata"]["name"].as_str().unwrap().to_string();
    let o = c.orc(
        &servers,
        &["-n", "demo", "exec", &victim, "--", "rm", "/tmp/ready"],
    );
    assert!(o.ok(), "{}", o.stderr);
    wait_for("the victim not ready", MIN, || {
        (!web_pods(&c)
            .iter()
            .any(|p| p["metadata"]["name"] == victim.as_str()))
        .then_some(())
    });
    // Within 1 s of the status change the victim gets no more requests.
    std::thread::sleep(Duration::from_secs(1));
    let (_, out, _) = exec(
        &c,
        "client",
        &format!(
            "i=0; while [ $i -lt 60 ]; do timeout 2 wget -q -O- http://{vip}/; i=$((i+1)); done"
        ),
    );
    let hits = count(&out);
    assert!(
        !hits.contains_key(&victim),
        "{victim} still in rotation: {hits:?}"
    );
    assert_eq!(hits.values().sum::<usize>(), 60, "{hits:?}");
    let o = c.orc(
        &servers,
        &["-n", "demo", "exec", &victim, "--", "touch", "/tmp/ready"],
    );
    assert!(o.ok(), "{}", o.stderr);
    wait_for("3 ready web pods again", MIN, || {
        (web_pods(&c).len() == 3).then_some(())
    });

    stage("readiness checked");
    // f. A rolling update of the backends under constant load fails no request.
    let load = dir.path().join("load.out");
    let stop = dir.path().join("load.stop");
    let script = format!(
        "while [ ! -e /tmp/stop ]; do if o=$(timeout 3 wget -q -O- http://{vip}/ 2>&1); then echo ok; else echo \"FAIL $(date +%T) $o\"; fi; done"
    );
    let loader = c.spawn_cli(
        &["-n", "demo", "exec", "client", "--", "sh", "-c", &script],
        &load,
    );
    std::thread::sleep(Duration::from_secs(2));
    c.apply(&WEB.replace("v: '1'", "v: '2'"));
    wait_for("the rollout to finish", Duration::from_secs(120), || {
        let pods = c.items(&["-n", "demo", "pods", "-l", "app=web"]);
        let new = pods
            .iter()
            .filter(|p| p["metadata"]["annotations"]["v"] == "2")
            .count();
        (pods.len() == 3 && new == 3 && web_pods(&c).len() == 3).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let _ = exec(&c, "client", "touch /tmp/stop");
    drop(loader);
    let _ = std::fs::write(&stop, "");
    let out = std::fs::read_to_string(&load).unwrap_or_default();
    let ok = out.lines().filter(|l| *l == "ok").count();
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(ok > 20, "the load ran: {ok} ok");
    assert!(
        failed.is_empty(),
        "{} failed requests during the rolling update ({ok} ok): {failed:?}\n{}",
        failed.len(),
        logs(&lab)
    );

    stage("rolling update checked");
    // g. With the agent of node 1 killed, its Services keep answering; after
    // its restart no stale or duplicate rule remains.
    let (_, resolv, _) = exec(&c, "client", "cat /etc/resolv.conf");
    let dns_ip = resolv
        .lines()
        .find_map(|l| l.strip_prefix("nameserver "))
        .expect("a nameserver")
        .trim()
        .to_string();
    lab.kill_agent(0);
    let addr = format!("{}:30002", lab.nodes[0].address);
    assert!(
        http_get(&addr, "/", Duration::from_secs(2)).is_some(),
        "NodePort with the agent down"
    );
    // The client pod is on node 1 (no exec without its agent): ask from the
    // node's own namespace instead.
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.nodes[0].netns,
            "busybox",
            "wget",
            "-q",
            "-O-",
        ])
        .arg(format!("http://{vip}/"))
        .output()
        .expect("busybox wget");
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("web-"),
        "ClusterIP with the agent down: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.nodes[0].netns,
            "busybox",
            "nslookup",
            "web.demo.svc.cluster.local",
            &dns_ip,
        ])
        .output()
        .expect("busybox nslookup");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&vip),
        "DNS with the agent down: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // A change while it is down: the restarted agent must catch up.
    let o = c.orc(
        &servers,
        &["-n", "demo", "delete", "service", "redis-master"],
    );
    assert!(o.ok(), "{}", o.stderr);
    lab.start_agent(0, &servers, &agent_flags);
    wait_for(
        "the restarted agent's table without redis-master",
        MIN,
        || {
            let t = table(&lab, 0);
            (!t.is_empty() && !t.contains(&format!("{rip} . tcp . 6379"))).then_some(())
        },
    );
    let t0 = table(&lab, 0);
    let t1 = table(&lab, 1);
    // Both nodes balance the same Services over the same endpoints.
    let elements = |t: &str| {
        let mut v: Vec<String> = t
            .split("map backends {")
            .nth(1)
            .and_then(|m| m.split_once("elements = {"))
            .and_then(|(_, e)| e.split_once('}'))
            .map(|(e, _)| e.split(',').map(|x| x.trim().to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    assert!(!elements(&t0).is_empty(), "{t0}");
    assert_eq!(
        elements(&t0),
        elements(&t1),
        "node tables differ:\n{t0}\n----\n{t1}"
    );
    assert_eq!(t0.matches("dnat to").count(), t1.matches("dnat to").count());
    assert_eq!(t0.matches("table ip orc-svc").count(), 1);
    assert!(http_get(&addr, "/", Duration::from_secs(2)).is_some());
}
