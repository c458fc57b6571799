//! Acceptance of the Ingress issue: three real masters, a real node agent
//! in its own network namespace with real busybox pods, and `orc ingress`
//! (Pingora) in that namespace, as a node runs it. The test's own (host)
//! namespace is the client. Needs root.
use orc_chaos::lab::{Lab, MASTER_IP};
use orc_chaos::{orc_bin, wait_for, Cluster, Process};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);
const NODE: &str = "198.18.254.1";
const HTTP: &str = "198.18.254.1:8080";
const HTTPS: &str = "198.18.254.1:8443";
const METRICS: &str = "198.18.254.1:10254";

struct Resp {
    status: u16,
    body: String,
    close: bool,
}

/// Read one HTTP/1.1 response (Content-Length, chunked, or until close).
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut len, mut chunked, mut close) = (None, false, false);
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((h, ""));
        let (k, v) = (k.to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "content-length" => len = v.parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.contains("chunked"),
            "connection" => close = v == "close",
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(std::io::Error::other)?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = len {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if status != 101 && status != 204 && status != 304 {
        r.read_to_end(&mut body)?;
        close = true;
    }
    Ok(Resp {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
    })
}

/// One request on a new connection.
fn get(host: &str, path: &str) -> std::io::Result<Resp> {
    let s = TcpStream::connect_timeout(&HTTP.parse().unwrap(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        &s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut BufReader::new(s))
}

fn metrics() -> String {
    let mut s = TcpStream::connect(METRICS).expect("metrics endpoint");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Requests on keepalive connections from `workers` threads until stopped;
/// every answer that is not a 200 from the right Service is a failure. A
/// reused connection the server closed before answering is opened again,
/// as every HTTP client does; anything else counts.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const TARGETS: [(&str, &str, &str); 3] = [
    ("foo.example.test", "/", "foo-"),
    ("example.test", "/bar", "bar-"),
    ("example.test", "/exact", "foo-"),
];

impl Load {
    fn start(workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..workers)
            .map(|w| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let (host, path, want) = TARGETS[i % TARGETS.len()];
                        i += 1;
                        let fresh = conn.is_none();
                        if conn.is_none() {
                            match TcpStream::connect_timeout(
                                &HTTP.parse().unwrap(),
                                Duration::from_secs(5),
                            ) {
                                Ok(s) => {
                                    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                                    conn = Some((BufReader::new(s.try_clone().unwrap()), s));
                                }
                                Err(e) => {
                                    failures.lock().unwrap().push(format!("connect: {e}"));
                                    std::thread::sleep(Duration::from_millis(100));
                                    continue;
                                }
                            }
                        }
                        let (r, s) = conn.as_mut().unwrap();
                        let sent = write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
                            .and_then(|_| r.fill_buf().map(|b| b.len()));
                        // A reused connection the server closed before
                        // answering (EOF, EPIPE, reset): open a new one and
                        // send again, as HTTP clients do for idempotent
                        // requests (RFC 9112 9.3.1).
                        if !fresh && !matches!(sent, Ok(n) if n > 0) {
                            conn = None;
                            continue;
                        }
                        let res = sent.and_then(|_| read_response(r));
                        match res {
                            Ok(resp) => {
                                if resp.status == 200 && resp.body.starts_with(want) {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    failures.lock().unwrap().push(format!(
                                        "{host}{path}: {} {:?}",
                                        resp.status,
                                        resp.body.chars().take(80).collect::<String>()
                                    ));
                                }
                                if resp.close {
                                    conn = None;
                                }
                            }
                            Err(e) => {
                                failures.lock().unwrap().push(format!("{host}{path}: {e}"));
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    fn stop(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (self.ok.load(Ordering::Relaxed), self.failures())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A websocket through the ingress: the upgrade, then frames echoed.
struct Ws(BufReader<TcpStream>, TcpStream);

impl Ws {
    fn open() -> Ws {
        let s = TcpStream::connect(HTTP).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        write!(
            w,
            "GET /chat HTTP/1.1\r\nHost: ws.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let resp = read_response(&mut r).expect("upgrade response");
        assert_eq!(resp.status, 101, "websocket upgrade: {}", resp.body);
        Ws(r, w)
    }

    /// Send a masked text frame and read the echo back.
    fn echo(&mut self, text: &str) -> std::io::Result<()> {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.1.write_all(&frame)?;
        let mut back = vec![0; frame.len()];
        self.0.read_exact(&mut back)?;
        if back != frame {
            return Err(std::io::Error::other("echo differs"));
        }
        Ok(())
    }
}

fn web(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: demo}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  strategy: {{rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
  template:
    metadata: {{labels: {{app: {name}}}, annotations: {{v: '1'}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: httpd
        image: busybox:1.35
        command: [sh, -c, 'mkdir -p /www/cgi-bin; hostname > /www/index.html; cp /www/index.html /www/bar; cp /www/index.html /www/exact; printf \"#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho \\$HTTP_X_FORWARDED_FOR \\$HTTP_X_FORWARDED_PROTO \\$HTTP_X_FORWARDED_HOST\\n\" > /www/cgi-bin/fwd; chmod +x /www/cgi-bin/fwd; touch /tmp/ready; exec httpd -f -p 8080 -h /www']
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{exec: {{command: [test, -e, /tmp/ready]}}, periodSeconds: 1, failureThreshold: 1}}
        lifecycle: {{preStop: {{exec: {{command: [sleep, '2']}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"
    )
}

const WS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: ws, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: ws}}
  template:
    metadata: {labels: {app: ws}}
    spec:
      containers:
      - name: echo
        image: busybox:1.35
        ports: [{name: ws, containerPort: 8080}]
        command:
        - sh
        - -c
        - |
          cat > /ws.sh <<'EOF'
          #!/bin/sh
          while read -r l; do [ ${#l} -le 1 ] && break; done
          printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'
          exec cat
          EOF
          chmod +x /ws.sh
          exec nc -ll -p 8080 -e /ws.sh
---
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: demo}
spec:
  selector: {app: ws}
  ports: [{port: 80, targetPort: ws}]
"#;

/// The Ingress under test; `extra` adds paths to example.test.
fn ingress(extra: &[String]) -> String {
    let mut paths = String::new();
    for p in extra {
        paths.push_str(&format!(
            "      - {{path: {p}, pathType: Prefix, backend: {{service: {{name: bar, port: {{number: 80}}}}}}}}\n"
        ));
    }
    format!(
        "apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: demo}}
spec:
  ingressClassName: orc
  tls:
  - {{hosts: [foo.example.test], secretName: foo-tls}}
  - {{hosts: [example.test], secretName: example-tls}}
  rules:
  - host: foo.example.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: foo, port: {{number: 80}}}}}}}}
  - host: example.test
    http:
      paths:
      - {{path: /bar, pathType: Prefix, backend: {{service: {{name: bar, port: {{name: http}}}}}}}}
      - {{path: /exact, pathType: Exact, backend: {{service: {{name: foo, port: {{number: 80}}}}}}}}
{paths}---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: ws
  namespace: demo
  annotations: {{nginx.ingress.kubernetes.io/proxy-read-timeout: '3600'}}
spec:
  rules:
  - host: ws.example.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: ws, port: {{number: 80}}}}}}}}
"
    )
}

/// The leaf certificate served, the ALPN protocol chosen, the body.
type Fetched = (Vec<u8>, Option<Vec<u8>>, String);

struct Pki {
    ca_pem: String,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "orc ingress test CA");
        let ca = p.self_signed(&key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    /// A TLS Secret for `host`; returns its YAML and the certificate's DER.
    fn secret(&self, name: &str, host: &str) -> (String, Vec<u8>) {
        use base64::Engine;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let b = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: demo}}\ntype: kubernetes.io/tls\n\
             data: {{tls.crt: {}, tls.key: {}}}\n",
            b(cert.pem()),
            b(key.serialize_pem())
        );
        (yaml, cert.der().to_vec())
    }

    /// Handshake with SNI `host` trusting only this CA; the served leaf
    /// certificate, the ALPN chosen, and the body of `GET /` (HTTP/1.1).
    fn fetch(&self, host: &str, alpn: &[&[u8]]) -> Result<Fetched, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut sock = TcpStream::connect(HTTPS).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
        let leaf = conn.peer_certificates().ok_or("no certificate")?[0].to_vec();
        let proto = conn.alpn_protocol().map(|p| p.to_vec());
        let mut body = String::new();
        if proto.as_deref() != Some(b"h2") {
            let mut tls = rustls::Stream::new(&mut conn, &mut sock);
            write!(
                tls,
                "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .map_err(|e| e.to_string())?;
            let _ = tls.read_to_string(&mut body);
        }
        Ok((leaf, proto, body))
    }
}

fn spawn_ingress(lab: &Lab, c: &Cluster, dir: &std::path::Path, upgrade: bool) -> Process {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ingress.log"))
        .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.nodes[0].netns])
        .arg(orc_bin())
        .args(["ingress", "--master", &c.servers()])
        .args(["--http", HTTP, "--https", HTTPS, "--metrics", METRICS])
        .arg("--upgrade-sock")
        .arg(dir.join("ingress-upgrade.sock"))
        .arg("--pid-file")
        .arg(dir.join("ingress.pid"))
        .args(["--drain-seconds", "3"]);
    if upgrade {
        cmd.arg("--upgrade");
    }
    let child = cmd
        .env("ORC_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn orc ingress");
    Process::from_child(child)
}

fn ready_pods(c: &Cluster, app: &str) -> Vec<String> {
    c.ready_pods("demo", &format!("app={app}"))
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The host pid of the httpd serving pod `pod` (its /www/index.html holds
/// the pod's hostname).
fn httpd_pid(pod: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.starts_with("httpd -f -p 8080") {
            return None;
        }
        let host = std::fs::read_to_string(format!("/proc/{pid}/root/www/index.html")).ok()?;
        (host.trim() == pod).then_some(pid)
    })
}

#[test]
fn ingress_routes_tls_updates_and_failures() {
    let dir = tempfile::Builder::new()
        .prefix("orc-ing-")
        .tempdir()
        .expect("tempdir");
    let t0 = Instant::now();
    let stage = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let mut lab = Lab::new(dir.path(), 1);
    let c = Cluster::start_on(MASTER_IP, 3, &["--cluster-cidr", "198.18.0.0/17"]);
    let image = orc_chaos::lab::busybox_image(dir.path());
    lab.import(0, &image);
    lab.start_agent(
        0,
        &c.servers(),
        &["--status-every", "2", "--cluster-cidr", "198.18.0.0/17"],
    );
    c.wait_ready_nodes(1, MIN);
    stage("cluster and node ready");

    let pki = Pki::new();
    let (foo_secret, foo_der) = pki.secret("foo-tls", "foo.example.test");
    let (ex_secret, ex_der) = pki.secret("example-tls", "example.test");
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    c.apply(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: orc\n  \
         annotations: {ingressclass.kubernetes.io/is-default-class: 'true'}\nspec: {controller: orc.dev/ingress}\n",
    );
    c.apply(&format!("{}---\n{}---\n{WS}", web("foo", 2), web("bar", 2)));
    c.apply(&format!("{foo_secret}---\n{ex_secret}"));
    c.apply(&ingress(&[]));
    let mut ing = spawn_ingress(&lab, &c, dir.path(), false);
    let ing_log = || std::fs::read_to_string(dir.path().join("ingress.log")).unwrap_or_default();
    wait_for("2 foo, 2 bar and 1 ws pods ready", 3 * MIN, || {
        (ready_pods(&c, "foo").len() == 2
            && ready_pods(&c, "bar").len() == 2
            && ready_pods(&c, "ws").len() == 1)
            .then_some(())
    });
    stage("pods ready");

    // a. Hosts and paths reach the right pods.
    let foo = ready_pods(&c, "foo");
    let bar = ready_pods(&c, "bar");
    let body_of = |host: &str, path: &str| {
        get(host, path)
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.body.trim().to_string())
    };
    wait_for("foo.example.test/ answered by a foo pod", MIN, || {
        body_of("foo.example.test", "/").filter(|b| foo.contains(b))
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let b = body_of("foo.example.test", "/").expect("foo answers");
        assert!(
            foo.contains(&b),
            "foo.example.test/ reached {b}, not a foo pod"
        );
        seen.insert(b);
        let b = body_of("example.test", "/bar").expect("/bar answers");
        assert!(
            bar.contains(&b),
            "example.test/bar reached {b}, not a bar pod"
        );
        let b = body_of("example.test", "/exact").expect("/exact answers");
        assert!(
            foo.contains(&b),
            "example.test/exact reached {b}, not a foo pod"
        );
    }
    // The second pod may join the slice a moment after it turned Ready.
    wait_for("both foo pods answering", MIN, || {
        seen.insert(body_of("foo.example.test", "/")?);
        (seen.len() == 2).then_some(())
    });
    for (host, path) in [
        ("example.test", "/barx"),
        ("example.test", "/exact/more"),
        ("nowhere.test", "/"),
    ] {
        let r = get(host, path).expect("answer");
        assert_eq!(
            r.status, 404,
            "{host}{path} must not match: {} {}",
            r.status, r.body
        );
    }
    // The pods see who asked, how and for which host.
    let r = get("foo.example.test:8080", "/cgi-bin/fwd").unwrap();
    assert_eq!(
        (r.status, r.body.trim()),
        (
            200,
            format!("{MASTER_IP} http foo.example.test:8080").as_str()
        ),
        "X-Forwarded-For/-Proto/-Host"
    );
    // Ingress status carries the ingress address.
    wait_for("status.loadBalancer of demo/web", MIN, || {
        let i = c.items(&["-n", "demo", "ingress", "web"]);
        (i.first()?["status"]["loadBalancer"]["ingress"][0]["ip"] == NODE).then_some(())
    });
    let table = c
        .orc(&c.servers(), &["-n", "demo", "get", "ingress", "web"])
        .stdout;
    for col in [
        "CLASS",
        "orc",
        "foo.example.test,example.test",
        NODE,
        "80, 443",
    ] {
        assert!(table.contains(col), "orc get ingress lacks {col}:\n{table}");
    }
    // A default backend catches what no rule matches.
    c.apply(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: fallback, namespace: demo}\n\
         spec: {defaultBackend: {service: {name: bar, port: {number: 80}}}}\n",
    );
    wait_for("the default backend answers nowhere.test", MIN, || {
        body_of("nowhere.test", "/bar").filter(|b| bar.contains(b))
    });
    c.orc(
        &c.servers(),
        &["-n", "demo", "delete", "ingress", "fallback"],
    );
    wait_for("404 again without the default backend", MIN, || {
        (get("nowhere.test", "/").ok()?.status == 404).then_some(())
    });
    stage("a: host and path routing");

    // b. TLS by SNI, HTTP/2, and a rotated certificate without a restart.
    let (leaf, _, body) = wait_for("TLS for foo.example.test", MIN, || {
        pki.fetch("foo.example.test", &[b"http/1.1"]).ok()
    });
    assert_eq!(leaf, foo_der, "foo.example.test gets its own certificate");
    assert!(
        foo.iter().any(|p| body.contains(p.as_str())),
        "https reaches foo: {body}"
    );
    let (leaf, _, _) = pki.fetch("example.test", &[b"http/1.1"]).unwrap();
    assert_eq!(leaf, ex_der, "example.test gets its own certificate");
    let (_, alpn, _) = pki
        .fetch("foo.example.test", &[b"h2", b"http/1.1"])
        .unwrap();
    assert_eq!(
        alpn.as_deref(),
        Some(&b"h2"[..]),
        "HTTP/2 offered to clients"
    );
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let curl = Command::new("curl")
        .args(["-sS", "--http2", "--cacert"])
        .arg(dir.path().join("ca.pem"))
        .args(["--resolve", &format!("example.test:8443:{NODE}")])
        .args([
            "-w",
            "\n%{http_version} %{http_code}",
            "https://example.test:8443/bar",
        ])
        .output()
        .expect("curl (apt-get install curl)");
    let out = String::from_utf8_lossy(&curl.stdout);
    assert!(
        out.ends_with("\n2 200"),
        "curl over HTTP/2: {out} {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let pid = ing.id();
    let (foo_secret2, foo_der2) = pki.secret("foo-tls", "foo.example.test");
    assert_ne!(foo_der, foo_der2);
    c.apply(&foo_secret2);
    wait_for("the rotated certificate served", MIN, || {
        pki.fetch("foo.example.test", &[b"http/1.1"])
            .ok()
            .filter(|(l, _, _)| *l == foo_der2)
    });
    assert!(
        !ing.exited() && ing.id() == pid,
        "rotation without a restart"
    );
    stage("b: TLS by SNI, h2, rotation");

    // c. 100 changes under load; a websocket opened before stays open.
    let mut ws = Ws::open();
    ws.echo("before").expect("websocket echo");
    let load = Load::start(4);
    std::thread::sleep(Duration::from_secs(2));
    let mut extra = Vec::new();
    let scale = |n: u32| {
        let n = n.to_string();
        c.orc(
            &c.servers(),
            &["-n", "demo", "scale", "deployment", "foo", "--replicas", &n],
        )
    };
    let mut changes = 0;
    for i in 0..100 {
        match i {
            10 => scale(3),
            30 => c.orc(
                &c.servers(),
                &[
                    "-n",
                    "demo",
                    "patch",
                    "deployment",
                    "bar",
                    "-p",
                    r#"{"spec":{"template":{"metadata":{"annotations":{"v":"2"}}}}}"#,
                ],
            ),
            60 => scale(2),
            _ => {
                if i % 2 == 0 || extra.is_empty() {
                    extra.push(format!("/extra{i}"));
                } else {
                    extra.remove(0);
                }
                c.orc_stdin(&c.servers(), &["apply", "-f", "-"], Some(&ingress(&extra)))
            }
        };
        changes += 1;
    }
    wait_for("bar rolled out and foo back to 2", 3 * MIN, || {
        let bars = c.items(&["-n", "demo", "pods", "-l", "app=bar"]);
        (ready_pods(&c, "foo").len() == 2
            && bars.len() == 2
            && bars
                .iter()
                .all(|p| p["metadata"]["annotations"]["v"] == "2")
            && ready_pods(&c, "bar").len() == 2)
            .then_some(())
    });
    ws.echo("after")
        .expect("the websocket opened before the changes is still open");
    // A binary upgrade: the new process takes the sockets, the old drains
    // (for --drain-seconds; a websocket lives on the old one till then).
    let mut new = spawn_ingress(&lab, &c, dir.path(), true);
    std::thread::sleep(Duration::from_secs(2));
    signal(ing.id().unwrap() as i32, libc::SIGQUIT);
    wait_for("the old ingress exits after handing over", MIN, || {
        ing.exited().then_some(())
    });
    changes += 1;
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !new.exited(),
        "the upgraded ingress runs:\n{}",
        orc_chaos::tail(&ing_log(), 30)
    );
    let (ok, failures) = load.stop();
    eprintln!(
        "c: {changes} changes, {ok} requests, {} failed",
        failures.len()
    );
    assert!(ok > 100, "load ran: {ok} requests");
    assert!(
        failures.is_empty(),
        "failed requests across the changes: {failures:#?}\n{}",
        orc_chaos::tail(&ing_log(), 30)
    );
    stage("c: 100 changes and an upgrade under load");

    // d. Kill a backend pod's server under load: retried on the others.
    let before = retries_total(&metrics());
    let load = Load::start(4);
    std::thread::sleep(Duration::from_secs(2));
    let victim = ready_pods(&c, "foo").into_iter().next().expect("a foo pod");
    let pid = wait_for("the victim's httpd", MIN, || httpd_pid(&victim));
    signal(pid, libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(8));
    let (ok, failures) = load.stop();
    let after = retries_total(&metrics());
    eprintln!(
        "d: {ok} requests, {} failed, {} retried",
        failures.len(),
        after - before
    );
    let fivexx: Vec<&String> = failures.iter().filter(|f| !f.contains(": 404")).collect();
    assert!(
        fivexx.len() <= 4,
        "at most the requests in flight on the pod may fail: {failures:#?}"
    );
    assert!(
        after > before,
        "connections refused by the killed pod were retried on another"
    );
    stage("d: a killed backend");

    assert_eq!(get("nowhere.test", "/").unwrap().status, 404);
    let m = metrics();
    for want in [
        r#"orc_ingress_requests_total{ingress="demo/web",host="foo.example.test",path="/",status="200"}"#,
        r#"orc_ingress_requests_total{ingress="",host="",path="",status="404"}"#,
        r#"orc_ingress_request_duration_seconds_count{ingress="demo/web",host="foo.example.test",path="/"}"#,
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    drop(new);
}

fn retries_total(m: &str) -> u64 {
    m.lines()
        .filter(|l| l.starts_with("orc_ingress_upstream_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid this test found; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill -{sig} {pid}");
}
