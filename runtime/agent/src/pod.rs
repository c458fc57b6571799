//! Pure decisions of the node agent: what a container runs with, when it
//! restarts, and what the pod's status says. No I/O, no tokio.
use orc_container::{ContainerConfig, ExitInfo, Mount};
use orc_controllers::util;
use orc_image::RunConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Back-off before restart number `n` (1-based): 10 s doubling to 300 s, as
/// the kubelet does. `base` is 10 s in production; tests may shrink it.
pub fn backoff(base: f64, n: u32) -> f64 {
    let cap = 300.0_f64.max(base);
    (base * 2f64.powi(n.saturating_sub(1).min(30) as i32)).min(cap)
}

/// Does a container that exited with `code` start again?
pub fn restarts(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

/// What the agent remembers about one container of a pod (kept on disk so a
/// restarted agent adopts it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Runtime id of the current (or last) instance.
    pub id: String,
    pub restart_count: u32,
    /// The previous instance's end.
    pub last: Option<ExitInfo>,
    /// The current instance's end, once it ended.
    pub exited: Option<ExitInfo>,
    /// When the next start may happen (seconds since the epoch).
    pub not_before: f64,
    /// Waiting reason and message (ContainerCreating, ErrImagePull,
    /// CrashLoopBackOff, CreateContainerError...).
    pub waiting: Option<(String, String)>,
    pub started_at: String,
    pub ready: bool,
    pub image_id: String,
}

/// Why a container ended, in Kubernetes' words.
pub fn exit_reason(e: &ExitInfo) -> &'static str {
    if e.oom_killed {
        "OOMKilled"
    } else if e.exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

fn terminated(e: &ExitInfo, id: &str) -> Value {
    let mut t = json!({"exitCode": e.exit_code, "reason": exit_reason(e),
        "startedAt": e.started_at, "finishedAt": e.finished_at, "containerID": format!("orc://{id}")});
    if let Some(s) = e.signal {
        t["signal"] = json!(s);
    }
    t
}

/// One entry of `containerStatuses`.
pub fn container_status(spec: &Value, r: &Record, running: bool) -> Value {
    let state = if running {
        json!({"running": {"startedAt": r.started_at}})
    } else if let Some((reason, message)) = &r.waiting {
        json!({"waiting": {"reason": reason, "message": message}})
    } else if let Some(e) = &r.exited {
        json!({"terminated": terminated(e, &r.id)})
    } else {
        json!({"waiting": {"reason": "ContainerCreating"}})
    };
    let mut s = json!({"name": spec["name"], "image": spec["image"], "imageID": r.image_id,
        "ready": running && r.ready, "started": running, "restartCount": r.restart_count, "state": state});
    if !r.id.is_empty() {
        s["containerID"] = json!(format!("orc://{}", r.id));
    }
    // Waiting to restart: the last end is the one that just happened.
    let last = if !running && r.waiting.is_some() {
        r.exited.as_ref().or(r.last.as_ref())
    } else {
        r.last.as_ref()
    };
    if let Some(e) = last {
        s["lastState"] = json!({"terminated": terminated(e, "")});
    }
    s
}

/// The pod phase from its containers' records and whether each runs.
pub fn phase(policy: &str, inits_done: bool, apps: &[(&Record, bool)]) -> &'static str {
    if !inits_done {
        return "Pending";
    }
    if apps.is_empty() {
        return "Pending";
    }
    let running = apps.iter().any(|(_, r)| *r);
    let all_ended = apps.iter().all(|(r, run)| {
        !run && r
            .exited
            .as_ref()
            .is_some_and(|e| !restarts(policy, e.exit_code))
    });
    if all_ended {
        let failed = apps
            .iter()
            .any(|(r, _)| r.exited.as_ref().is_some_and(|e| e.exit_code != 0));
        return if failed { "Failed" } else { "Succeeded" };
    }
    let started = apps
        .iter()
        .all(|(r, run)| *run || r.exited.is_some() || r.last.is_some());
    if running || started {
        "Running"
    } else {
        "Pending"
    }
}

/// Values that `env` and volumes draw from, fetched by the agent.
#[derive(Default, Debug, Clone)]
pub struct Sources {
    /// ConfigMaps and Secrets by name (Secret values already decoded).
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    pub pod_ip: String,
    pub node_ip: String,
    /// The Services of the pod's namespace when the container starts
    /// (empty with `enableServiceLinks: false`).
    pub services: Vec<Value>,
}

/// Docker-link style variables for Services, as the kubelet makes them:
/// `{SVC}_SERVICE_HOST`, `{SVC}_SERVICE_PORT[_{PORTNAME}]`, `{SVC}_PORT`,
/// `{SVC}_PORT_{PORT}_{PROTO}[_PROTO|_PORT|_ADDR]`. Services without a
/// ClusterIP (headless, ExternalName) have none.
pub fn service_env(services: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut sorted: Vec<&Value> = services.iter().collect();
    sorted.sort_by_key(|s| s["metadata"]["name"].as_str().unwrap_or(""));
    for svc in sorted {
        let ip = svc["spec"]["clusterIP"].as_str().unwrap_or("");
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let Some(first) = ports.first() else {
            continue;
        };
        let name = svc["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_uppercase()
            .replace('-', "_");
        out.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{name}_SERVICE_PORT"), first["port"].to_string()));
        for p in &ports {
            if let Some(pn) = p["name"].as_str().filter(|n| !n.is_empty()) {
                out.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p["port"].to_string(),
                ));
            }
        }
        let proto = |p: &Value| p["protocol"].as_str().unwrap_or("TCP").to_lowercase();
        out.push((
            format!("{name}_PORT"),
            format!("{}://{ip}:{}", proto(first), first["port"]),
        ));
        for p in &ports {
            let (pr, port) = (proto(p), &p["port"]);
            let base = format!("{name}_PORT_{port}_{}", pr.to_uppercase());
            out.push((base.clone(), format!("{pr}://{ip}:{port}")));
            out.push((format!("{base}_PROTO"), pr.clone()));
            out.push((format!("{base}_PORT"), port.to_string()));
            out.push((format!("{base}_ADDR"), ip.to_string()));
        }
    }
    out
}

fn field_ref(pod: &Value, path: &str, src: &Sources) -> Option<String> {
    Some(match path {
        "metadata.name" => pod["metadata"]["name"].as_str()?.to_string(),
        "metadata.namespace" => pod["metadata"]["namespace"].as_str()?.to_string(),
        "metadata.uid" => pod["metadata"]["uid"].as_str()?.to_string(),
        "spec.nodeName" => pod["spec"]["nodeName"].as_str()?.to_string(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        "status.podIP" => src.pod_ip.clone(),
        "status.hostIP" => src.node_ip.clone(),
        p => {
            // metadata.labels['k'] / metadata.annotations['k']
            let (map, key) = p.split_once("['")?;
            let key = key.strip_suffix("']")?;
            let field = map.strip_prefix("metadata.")?;
            pod["metadata"][field][key].as_str()?.to_string()
        }
    })
}

/// The environment of a container: image env, then envFrom, then env, in
/// Kubernetes' order of precedence. An error names the missing reference.
pub fn environment(
    pod: &Value,
    c: &Value,
    image_env: &[String],
    src: &Sources,
) -> Result<Vec<String>, String> {
    let mut env: Vec<(String, String)> = image_env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(e) = env.iter_mut().find(|(x, _)| *x == k) {
            e.1 = v;
        } else {
            env.push((k, v));
        }
    };
    for (k, v) in service_env(&src.services) {
        set(&mut env, k, v);
    }
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = from["prefix"].as_str().unwrap_or("");
        let (kind, map, r) = if from["configMapRef"].is_object() {
            ("ConfigMap", &src.config_maps, &from["configMapRef"])
        } else {
            ("Secret", &src.secrets, &from["secretRef"])
        };
        let name = r["name"].as_str().unwrap_or("");
        match map.get(name) {
            Some(data) => {
                for (k, v) in data {
                    set(&mut env, format!("{prefix}{k}"), v.clone());
                }
            }
            None if r["optional"] == true => {}
            None => return Err(format!("{kind} \"{name}\" not found")),
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or("").to_string();
        let vf = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(p) = vf["fieldRef"]["fieldPath"].as_str() {
            field_ref(pod, p, src)
                .ok_or_else(|| format!("env {name}: unsupported fieldPath {p}"))?
        } else if vf["configMapKeyRef"].is_object() || vf["secretKeyRef"].is_object() {
            let (kind, map, r) = if vf["configMapKeyRef"].is_object() {
                ("ConfigMap", &src.config_maps, &vf["configMapKeyRef"])
            } else {
                ("Secret", &src.secrets, &vf["secretKeyRef"])
            };
            let (n, k) = (
                r["name"].as_str().unwrap_or(""),
                r["key"].as_str().unwrap_or(""),
            );
            match map.get(n).and_then(|d| d.get(k)) {
                Some(v) => v.clone(),
                None if r["optional"] == true => continue,
                None => {
                    return Err(format!(
                        "env {name}: key \"{k}\" of {kind} \"{n}\" not found"
                    ))
                }
            }
        } else if let Some(res) = vf["resourceFieldRef"]["resource"].as_str() {
            let (kind, what) = res.split_once('.').unwrap_or(("", res));
            let q = &c["resources"][kind][what];
            if q.is_null() {
                String::new()
            } else if what == "cpu" {
                (util::quantity(q, true).max(1) as u64)
                    .div_ceil(1000)
                    .to_string()
            } else {
                util::quantity(q, false).to_string()
            }
        } else {
            String::new()
        };
        set(&mut env, name, value);
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// `$(VAR)` references to variables defined before; `$$` escapes.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(j) => {
                    let var = &inner[..j];
                    match env.iter().rev().find(|(k, _)| k == var) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&format!("$({var})")),
                    }
                    rest = &inner[j + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The process: Kubernetes' command/args over the image's entrypoint/cmd.
pub fn process_args(c: &Value, img: &RunConfig, env: &[String]) -> Vec<String> {
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
    };
    let vars: Vec<(String, String)> = env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let command = strings(&c["command"]);
    let args = strings(&c["args"]);
    let (cmd, args) = match (command, args) {
        (Some(c), Some(a)) => (c, a),
        (Some(c), None) => (c, vec![]),
        (None, Some(a)) => (img.entrypoint.clone(), a),
        (None, None) => (img.entrypoint.clone(), img.cmd.clone()),
    };
    cmd.into_iter()
        .chain(args)
        .map(|a| expand(&a, &vars))
        .collect()
}

/// Where each volume of the pod lives on the node.
pub type VolumePaths = BTreeMap<String, String>;

/// The runtime configuration of container `c` of `pod`.
#[allow(clippy::too_many_arguments)]
pub fn container_config(
    pod: &Value,
    c: &Value,
    img: &RunConfig,
    env: Vec<String>,
    pod_files: &std::path::Path,
    volumes: &VolumePaths,
    cgroup_path: String,
) -> Result<ContainerConfig, String> {
    let psc = &pod["spec"]["securityContext"];
    let sc = &c["securityContext"];
    let pick = |k: &str| sc[k].as_i64().or_else(|| psc[k].as_i64());
    let (img_uid, img_gid) = numeric_user(&img.user);
    let uid = pick("runAsUser").map(|u| u as u32).or(img_uid).unwrap_or(0);
    let gid = pick("runAsGroup")
        .map(|g| g as u32)
        .or(img_gid)
        .unwrap_or(0);
    if (sc["runAsNonRoot"] == true || psc["runAsNonRoot"] == true) && uid == 0 {
        return Err("container has runAsNonRoot and image will run as root".into());
    }
    let mut additional_gids: Vec<u32> = psc["supplementalGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g.as_u64().map(|g| g as u32))
        .collect();
    if let Some(fs) = psc["fsGroup"].as_u64() {
        additional_gids.push(fs as u32);
    }
    let mut mounts = vec![
        Mount {
            destination: "/etc/hosts".into(),
            source: pod_files.join("hosts").display().to_string(),
            read_only: false,
            kind: String::new(),
        },
        Mount {
            destination: "/etc/hostname".into(),
            source: pod_files.join("hostname").display().to_string(),
            read_only: false,
            kind: String::new(),
        },
        Mount {
            destination: "/etc/resolv.conf".into(),
            source: pod_files.join("resolv.conf").display().to_string(),
            read_only: false,
            kind: String::new(),
        },
    ];
    for vm in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = vm["name"].as_str().unwrap_or("");
        let Some(src) = volumes.get(name) else {
            return Err(format!(
                "volumeMounts: volume \"{name}\" is not defined in the pod"
            ));
        };
        let mut source = src.clone();
        if let Some(sub) = vm["subPath"].as_str().filter(|s| !s.is_empty()) {
            if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
                return Err(format!(
                    "volumeMounts: subPath \"{sub}\" must be a relative path without .."
                ));
            }
            source = format!("{source}/{sub}");
        }
        mounts.push(Mount {
            destination: vm["mountPath"].as_str().unwrap_or("").to_string(),
            source,
            read_only: vm["readOnly"] == true,
            kind: String::new(),
        });
    }
    let res = &c["resources"];
    // Quantities as the controllers read them (util::quantity).
    let q = |kind: &str, what: &str, milli: bool| -> Option<i64> {
        let v = &res[kind][what];
        (!v.is_null()).then(|| util::quantity(v, milli))
    };
    let cpu_req = q("requests", "cpu", true).map(|m| m as u64);
    let cpu_lim = q("limits", "cpu", true).map(|m| m as u64);
    // The kubelet's conversion: shares = millicores * 1024 / 1000 (min 2);
    // quota = millicores * period / 1000.
    let cpu_shares = cpu_req
        .or(cpu_lim)
        .map(|m| (m * 1024 / 1000).max(2))
        .or(Some(2));
    let cpu_quota = cpu_lim.map(|m| (m as i64 * 100_000 / 1000).max(1000));
    let memory_limit = q("limits", "memory", false);
    let caps = |k: &str| -> Vec<String> {
        sc["capabilities"][k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(String::from))
            .collect()
    };
    let cwd = c["workingDir"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(String::from)
        .unwrap_or_else(|| img.working_dir.clone());
    Ok(ContainerConfig {
        args: process_args(c, img, &env),
        env,
        cwd,
        hostname: pod_hostname(pod),
        readonly_rootfs: sc["readOnlyRootFilesystem"] == true,
        uid,
        gid,
        additional_gids,
        cap_add: caps("add"),
        cap_drop: caps("drop"),
        privileged: sc["privileged"] == true,
        allow_privilege_escalation: sc["allowPrivilegeEscalation"] == true,
        // The pod's: its shim joins it (worker::start's Setup).
        netns: orc_container::NetNs::Shim,
        mounts,
        cpu_shares,
        cpu_quota,
        cpu_period: cpu_quota.map(|_| 100_000),
        memory_limit,
        cgroup_path,
        tty: c["tty"] == true,
    })
}

fn numeric_user(user: &str) -> (Option<u32>, Option<u32>) {
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    (u.parse().ok(), g.parse().ok())
}

/// The pod's hostname: spec.hostname or its name (at most 63 bytes).
pub fn pod_hostname(pod: &Value) -> String {
    let h = pod["spec"]["hostname"]
        .as_str()
        .filter(|s| !s.is_empty())
        .or(pod["metadata"]["name"].as_str())
        .unwrap_or("pod");
    h.chars().take(63).collect()
}

/// `/etc/hosts` of a pod.
pub fn hosts_file(pod: &Value, ip: &str, cluster_domain: &str) -> String {
    let host = pod_hostname(pod);
    let mut names = vec![];
    if let Some(sub) = pod["spec"]["subdomain"].as_str().filter(|s| !s.is_empty()) {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        names.push(format!("{host}.{sub}.{ns}.svc.{cluster_domain}"));
    }
    names.push(host);
    let mut s = String::from("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    s.push_str(&format!("{ip}\t{}\n", names.join("\t")));
    for ha in pod["spec"]["hostAliases"].as_array().into_iter().flatten() {
        let hn: Vec<&str> = ha["hostnames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if let Some(aip) = ha["ip"].as_str() {
            s.push_str(&format!("{aip}\t{}\n", hn.join("\t")));
        }
    }
    s
}

/// `/etc/resolv.conf` of a pod (dnsPolicy ClusterFirst).
pub fn resolv_conf(pod: &Value, dns: &str, cluster_domain: &str) -> String {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let cfg = &pod["spec"]["dnsConfig"];
    let mut servers: Vec<String> = if pod["spec"]["dnsPolicy"] == "None" {
        vec![]
    } else {
        vec![dns.to_string()]
    };
    servers.extend(
        cfg["nameservers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from)),
    );
    let mut search = if pod["spec"]["dnsPolicy"] == "None" {
        vec![]
    } else {
        vec![
            format!("{ns}.svc.{cluster_domain}"),
            format!("svc.{cluster_domain}"),
            cluster_domain.to_string(),
        ]
    };
    search.extend(
        cfg["searches"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from)),
    );
    let mut opts = vec!["ndots:5".to_string()];
    for o in cfg["options"].as_array().into_iter().flatten() {
        let name = o["name"].as_str().unwrap_or("");
        let o = match o["value"].as_str() {
            Some(v) => format!("{name}:{v}"),
            None => name.to_string(),
        };
        opts.retain(|x| x.split(':').next() != o.split(':').next());
        opts.push(o);
    }
    let mut s = String::new();
    for d in servers {
        s.push_str(&format!("nameserver {d}\n"));
    }
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    s.push_str(&format!("options {}\n", opts.join(" ")));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_links_follow_the_kubelet() {
        let svcs = vec![
            json!({"metadata": {"name": "redis-master"}, "spec": {"clusterIP": "198.19.0.7",
                "ports": [{"name": "redis", "port": 6379, "protocol": "TCP"}]}}),
            json!({"metadata": {"name": "headless"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
        ];
        let env: BTreeMap<String, String> = service_env(&svcs).into_iter().collect();
        let want = [
            ("REDIS_MASTER_SERVICE_HOST", "198.19.0.7"),
            ("REDIS_MASTER_SERVICE_PORT", "6379"),
            ("REDIS_MASTER_SERVICE_PORT_REDIS", "6379"),
            ("REDIS_MASTER_PORT", "tcp://198.19.0.7:6379"),
            ("REDIS_MASTER_PORT_6379_TCP", "tcp://198.19.0.7:6379"),
            ("REDIS_MASTER_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_MASTER_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_MASTER_PORT_6379_TCP_ADDR", "198.19.0.7"),
        ];
        for (k, v) in want {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(env.len(), want.len());
        // The container's own env wins over a service link.
        let src = Sources {
            services: svcs,
            ..Default::default()
        };
        let c = json!({"env": [{"name": "REDIS_MASTER_SERVICE_PORT", "value": "1"}]});
        let e = environment(&json!({}), &c, &[], &src).unwrap();
        assert!(e.contains(&"REDIS_MASTER_SERVICE_PORT=1".to_string()));
        assert!(e.contains(&"REDIS_MASTER_SERVICE_HOST=198.19.0.7".to_string()));
    }

    fn pod() -> Value {
        json!({"metadata": {"name": "web-1", "namespace": "shop", "uid": "u1", "labels": {"app": "web"}},
               "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}})
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        assert_eq!(backoff(10.0, 1), 10.0);
        assert_eq!(backoff(10.0, 2), 20.0);
        assert_eq!(backoff(10.0, 5), 160.0);
        assert_eq!(backoff(10.0, 6), 300.0);
        assert_eq!(backoff(10.0, 60), 300.0);
    }

    #[test]
    fn phases() {
        let ok = |c| Record {
            exited: Some(ExitInfo {
                exit_code: c,
                signal: None,
                oom_killed: false,
                started_at: String::new(),
                finished_at: String::new(),
            }),
            ..Default::default()
        };
        let (r0, r1, run) = (ok(0), ok(1), Record::default());
        assert_eq!(phase("Always", false, &[(&run, true)]), "Pending");
        assert_eq!(phase("Always", true, &[(&run, true)]), "Running");
        assert_eq!(phase("Never", true, &[(&r0, false)]), "Succeeded");
        assert_eq!(
            phase("Never", true, &[(&r0, false), (&r1, false)]),
            "Failed"
        );
        assert_eq!(phase("OnFailure", true, &[(&r1, false)]), "Running");
        assert_eq!(
            phase("Never", true, &[(&r0, false), (&run, true)]),
            "Running"
        );
        assert_eq!(
            phase("Always", true, &[(&Record::default(), false)]),
            "Pending"
        );
    }

    #[test]
    fn statuses_name_the_reason() {
        let spec = json!({"name": "c", "image": "busybox"});
        let oom = Record {
            id: "x".into(),
            restart_count: 2,
            exited: Some(ExitInfo {
                exit_code: 137,
                signal: Some(9),
                oom_killed: true,
                started_at: "a".into(),
                finished_at: "b".into(),
            }),
            ..Default::default()
        };
        let s = container_status(&spec, &oom, false);
        assert_eq!(s["state"]["terminated"]["reason"], "OOMKilled");
        assert_eq!(s["restartCount"], 2);
        let back = Record {
            waiting: Some(("CrashLoopBackOff".into(), "back-off 20s".into())),
            last: oom.exited.clone(),
            ..oom
        };
        let s = container_status(&spec, &back, false);
        assert_eq!(s["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(s["lastState"]["terminated"]["exitCode"], 137);
    }

    #[test]
    fn environment_follows_kubernetes_precedence() {
        let mut src = Sources {
            pod_ip: "198.18.0.5".into(),
            ..Default::default()
        };
        src.config_maps.insert(
            "cfg".into(),
            [
                ("A".to_string(), "from-cm".to_string()),
                ("B".to_string(), "b".to_string()),
            ]
            .into(),
        );
        src.secrets.insert(
            "s".into(),
            [("pw".to_string(), "hunter2".to_string())].into(),
        );
        let c = json!({"envFrom": [{"configMapRef": {"name": "cfg"}}],
            "env": [{"name": "A", "value": "direct"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                    {"name": "URL", "value": "http://$(IP):80/$$(IP)"}]});
        let env = environment(&pod(), &c, &["PATH=/bin".into(), "A=img".into()], &src).unwrap();
        for want in [
            "PATH=/bin",
            "A=direct",
            "B=b",
            "POD=web-1",
            "IP=198.18.0.5",
            "APP=web",
            "PW=hunter2",
            "URL=http://198.18.0.5:80/$(IP)",
        ] {
            assert!(env.contains(&want.to_string()), "{want} in {env:?}");
        }
        let missing = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]});
        assert!(environment(&pod(), &missing, &[], &src)
            .unwrap_err()
            .contains("ConfigMap \"nope\""));
    }

    #[test]
    fn command_and_args_override_the_image() {
        let img = RunConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["a".into()],
            ..Default::default()
        };
        assert_eq!(process_args(&json!({}), &img, &[]), vec!["/ep", "a"]);
        assert_eq!(
            process_args(&json!({"args": ["b"]}), &img, &[]),
            vec!["/ep", "b"]
        );
        assert_eq!(
            process_args(&json!({"command": ["sh"]}), &img, &[]),
            vec!["sh"]
        );
        assert_eq!(
            process_args(
                &json!({"command": ["echo"], "args": ["$(X)"]}),
                &img,
                &["X=1".into()]
            ),
            vec!["echo", "1"]
        );
    }

    #[test]
    fn resources_and_security_become_runtime_settings() {
        let c = json!({"name": "c", "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "64Mi"}},
            "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true, "capabilities": {"add": ["NET_ADMIN"]}},
            "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true}]});
        let vols: VolumePaths = [("data".to_string(), "/v/data".to_string())].into();
        let cfg = container_config(
            &pod(),
            &c,
            &RunConfig::default(),
            vec![],
            std::path::Path::new("/p"),
            &vols,
            "/orc/x".into(),
        )
        .unwrap();
        assert_eq!(cfg.cpu_shares, Some(256));
        assert_eq!(cfg.cpu_quota, Some(50_000));
        assert_eq!(cfg.memory_limit, Some(64 << 20));
        assert_eq!(cfg.uid, 1000);
        assert!(cfg.readonly_rootfs);
        assert_eq!(cfg.hostname, "web-1");
        assert!(cfg
            .mounts
            .iter()
            .any(|m| m.destination == "/data" && m.read_only && m.source == "/v/data"));
        let bad = json!({"name": "c", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]});
        assert!(container_config(
            &pod(),
            &bad,
            &RunConfig::default(),
            vec![],
            std::path::Path::new("/p"),
            &vols,
            String::new()
        )
        .unwrap_err()
        .contains("nope"));
    }

    #[test]
    fn dns_files() {
        let r = resolv_conf(&pod(), "198.19.0.10", "cluster.local");
        assert_eq!(r, "nameserver 198.19.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n");
        let mut p = pod();
        p["spec"]["subdomain"] = json!("web");
        let h = hosts_file(&p, "198.18.0.5", "cluster.local");
        assert!(h.contains("198.18.0.5\tweb-1.web.shop.svc.cluster.local\tweb-1\n"));
    }
}
