//! Printing objects the way kubectl does: tables, yaml, json, name, describe.
use anyhow::{bail, Result};
use comfy_table::{presets::NOTHING, Table};
use orc_api::resources::ResourceInfo;
use serde_json::Value;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Wide,
    Yaml,
    Json,
    Name,
}

impl Format {
    pub fn parse(s: Option<&str>) -> Result<Self> {
        Ok(match s {
            None => Format::Table,
            Some("wide") => Format::Wide,
            Some("yaml") => Format::Yaml,
            Some("json") => Format::Json,
            Some("name") => Format::Name,
            Some(o) => bail!("unknown output format \"{o}\": use wide, yaml, json or name"),
        })
    }
}

fn s<'a>(o: &'a Value, ptr: &str) -> &'a str {
    o.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn n(o: &Value, ptr: &str) -> i64 {
    o.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

/// Age as kubectl prints it: 5s, 3m, 2h, 4d.
fn age(o: &Value) -> String {
    let created = s(o, "/metadata/creationTimestamp");
    let Some(secs) = orc_api::seconds_since(created) else {
        return "<unknown>".into();
    };
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn columns(info: &ResourceInfo, wide: bool) -> Vec<&'static str> {
    let mut c = vec!["NAME"];
    c.extend(match info.kind {
        "Pod" if wide => vec!["READY", "STATUS", "RESTARTS", "IP", "NODE"],
        "Pod" => vec!["READY", "STATUS", "RESTARTS"],
        "Deployment" => vec!["READY", "UP-TO-DATE", "AVAILABLE"],
        "ReplicaSet" | "ReplicationController" => vec!["DESIRED", "CURRENT", "READY"],
        "StatefulSet" => vec!["READY"],
        "DaemonSet" => vec!["DESIRED", "CURRENT", "READY"],
        "Job" => vec!["COMPLETIONS"],
        "CronJob" => vec!["SCHEDULE", "SUSPEND", "ACTIVE"],
        "Service" => vec!["TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORTS"],
        "EndpointSlice" => vec!["ADDRESSTYPE", "PORTS", "ENDPOINTS"],
        "Ingress" => vec!["CLASS", "HOSTS", "ADDRESS", "PORTS"],
        "IngressClass" => vec!["CONTROLLER"],
        "ConfigMap" => vec!["DATA"],
        "Secret" => vec!["TYPE", "DATA"],
        "Namespace" => vec!["STATUS"],
        "Node" => vec!["STATUS", "ROLES", "VERSION"],
        "PersistentVolume" => vec!["CAPACITY", "STATUS"],
        "PersistentVolumeClaim" => vec!["STATUS", "VOLUME"],
        "Event" => vec!["TYPE", "REASON", "MESSAGE"],
        _ => vec![],
    });
    c.push("AGE");
    c
}

fn cells(info: &ResourceInfo, o: &Value, wide: bool) -> Vec<String> {
    let mut c = vec![s(o, "/metadata/name").to_string()];
    let count = |p: &str| {
        o.pointer(p)
            .and_then(Value::as_object)
            .map(|m| m.len())
            .unwrap_or(0)
            .to_string()
    };
    c.extend(match info.kind {
        "Pod" => {
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map(Vec::len)
                .unwrap_or(0);
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses
                .iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            let phase = if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating"
            } else {
                s(o, "/status/phase")
            };
            let mut v = vec![
                format!("{ready}/{total}"),
                if phase.is_empty() {
                    "Pending".into()
                } else {
                    phase.into()
                },
                restarts.to_string(),
            ];
            if wide {
                v.push(s(o, "/status/podIP").to_string());
                v.push(s(o, "/spec/nodeName").to_string());
            }
            v
        }
        "Deployment" => vec![
            format!(
                "{}/{}",
                n(o, "/status/readyReplicas"),
                n(o, "/spec/replicas")
            ),
            n(o, "/status/updatedReplicas").to_string(),
            n(o, "/status/availableReplicas").to_string(),
        ],
        "ReplicaSet" | "ReplicationController" => {
            vec![
                n(o, "/spec/replicas").to_string(),
                n(o, "/status/replicas").to_string(),
                n(o, "/status/readyReplicas").to_string(),
            ]
        }
        "StatefulSet" => vec![format!(
            "{}/{}",
            n(o, "/status/readyReplicas"),
            n(o, "/spec/replicas")
        )],
        "DaemonSet" => vec![
            n(o, "/status/desiredNumberScheduled").to_string(),
            n(o, "/status/currentNumberScheduled").to_string(),
            n(o, "/status/numberReady").to_string(),
        ],
        "Job" => vec![format!(
            "{}/{}",
            n(o, "/status/succeeded"),
            o.pointer("/spec/completions")
                .and_then(Value::as_i64)
                .unwrap_or(1)
        )],
        "CronJob" => vec![
            s(o, "/spec/schedule").to_string(),
            o.pointer("/spec/suspend")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .to_string(),
            o.pointer("/status/active")
                .and_then(Value::as_array)
                .map(Vec::len)
                .unwrap_or(0)
                .to_string(),
        ],
        "Service" => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_i64() {
                        Some(np) => format!("{}:{np}/{proto}", p["port"]),
                        None => format!("{}/{proto}", p["port"]),
                    }
                })
                .collect();
            let ext: Vec<&str> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str().or(i["hostname"].as_str()))
                .collect();
            let ty = if s(o, "/spec/type").is_empty() {
                "ClusterIP"
            } else {
                s(o, "/spec/type")
            };
            let cip = if s(o, "/spec/clusterIP").is_empty() {
                "<none>"
            } else {
                s(o, "/spec/clusterIP")
            };
            let ext = if ext.is_empty() {
                s(o, "/spec/externalName").to_string()
            } else {
                ext.join(",")
            };
            vec![
                ty.into(),
                cip.into(),
                if ext.is_empty() { "<none>".into() } else { ext },
                if ports.is_empty() {
                    "<none>".into()
                } else {
                    ports.join(",")
                },
            ]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = o
                .pointer("/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| p["port"].to_string())
                .collect();
            // Each address with its conditions (kubectl shows only addresses).
            let eps: Vec<String> = o
                .pointer("/endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    let c = &e["conditions"];
                    let mut conds: Vec<&str> = vec![];
                    if c["ready"] != false {
                        conds.push("ready");
                    } else if c["serving"] == true {
                        conds.push("serving");
                    } else {
                        conds.push("not-ready");
                    }
                    if c["terminating"] == true {
                        conds.push("terminating");
                    }
                    let tag = conds.join(",");
                    e["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str())
                        .map(move |a| format!("{a}({tag})"))
                        .collect::<Vec<_>>()
                })
                .collect();
            vec![
                s(o, "/addressType").to_string(),
                if ports.is_empty() {
                    "<unset>".into()
                } else {
                    ports.join(",")
                },
                if eps.is_empty() {
                    "<none>".into()
                } else {
                    eps.join(" ")
                },
            ]
        }
        "Ingress" => {
            let list = |p: &str, field: &str| -> Vec<String> {
                o.pointer(p)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x[field].as_str().map(String::from))
                    .collect()
            };
            let hosts = list("/spec/rules", "host");
            let mut addrs = list("/status/loadBalancer/ingress", "ip");
            addrs.extend(list("/status/loadBalancer/ingress", "hostname"));
            let tls = o
                .pointer("/spec/tls")
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty());
            let or = |v: Vec<String>, none: &str| {
                if v.is_empty() {
                    none.to_string()
                } else {
                    v.join(",")
                }
            };
            vec![
                o.pointer("/spec/ingressClassName")
                    .and_then(Value::as_str)
                    .unwrap_or("<none>")
                    .to_string(),
                or(hosts, "*"),
                or(addrs, ""),
                if tls { "80, 443" } else { "80" }.to_string(),
            ]
        }
        "IngressClass" => vec![s(o, "/spec/controller").to_string()],
        "ConfigMap" => vec![(o
            .pointer("/data")
            .and_then(Value::as_object)
            .map(|m| m.len())
            .unwrap_or(0)
            + o.pointer("/binaryData")
                .and_then(Value::as_object)
                .map(|m| m.len())
                .unwrap_or(0))
        .to_string()],
        "Secret" => vec![
            if s(o, "/type").is_empty() {
                "Opaque".into()
            } else {
                s(o, "/type").into()
            },
            count("/data"),
        ],
        "Namespace" => vec![if s(o, "/status/phase").is_empty() {
            "Active".into()
        } else {
            s(o, "/status/phase").into()
        }],
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find(|c| c["type"] == "Ready"))
                .map(|c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            vec![
                ready.into(),
                "<none>".into(),
                s(o, "/status/nodeInfo/kubeletVersion").into(),
            ]
        }
        "PersistentVolume" => vec![
            s(o, "/spec/capacity/storage").into(),
            s(o, "/status/phase").into(),
        ],
        "PersistentVolumeClaim" => vec![
            s(o, "/status/phase").into(),
            s(o, "/spec/volumeName").into(),
        ],
        "Event" => vec![
            s(o, "/type").into(),
            s(o, "/reason").into(),
            s(o, "/message").into(),
        ],
        _ => vec![],
    });
    c.push(age(o));
    c
}

fn table(info: &ResourceInfo, items: &[Value], wide: bool, all_ns: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    let mut head: Vec<&str> = Vec::new();
    if all_ns && info.namespaced {
        head.push("NAMESPACE");
    }
    head.extend(columns(info, wide));
    t.set_header(head);
    for o in items {
        let mut row = Vec::new();
        if all_ns && info.namespaced {
            row.push(s(o, "/metadata/namespace").to_string());
        }
        row.extend(cells(info, o, wide));
        t.add_row(row);
    }
    t
}

fn name_of(info: &ResourceInfo, o: &Value) -> String {
    let group = info
        .api_version
        .split_once('/')
        .map(|(g, _)| format!(".{g}"))
        .unwrap_or_default();
    format!("{}{group}/{}", info.singular, s(o, "/metadata/name"))
}

fn yaml(v: &Value) -> String {
    serde_saphyr::to_string(v).unwrap_or_else(|e| format!("# cannot render YAML: {e}\n"))
}

pub fn print_list(list: &Value, info: &ResourceInfo, fmt: Format, all_ns: bool) {
    let items = list["items"].as_array().cloned().unwrap_or_default();
    match fmt {
        Format::Json => println!("{}", serde_json::to_string_pretty(list).unwrap_or_default()),
        Format::Yaml => print!("{}", yaml(list)),
        Format::Name => items.iter().for_each(|o| println!("{}", name_of(info, o))),
        Format::Table | Format::Wide => {
            if items.is_empty() {
                eprintln!("No resources found.");
            } else {
                println!(
                    "{}",
                    table(info, &items, fmt == Format::Wide, all_ns).trim_fmt()
                );
            }
        }
    }
}

pub fn print_one(o: &Value, info: &ResourceInfo, fmt: Format, all_ns: bool) {
    match fmt {
        Format::Json => println!("{}", serde_json::to_string_pretty(o).unwrap_or_default()),
        Format::Yaml => print!("---\n{}", yaml(o)),
        Format::Name => println!("{}", name_of(info, o)),
        Format::Table | Format::Wide => println!(
            "{}",
            table(info, std::slice::from_ref(o), fmt == Format::Wide, all_ns).trim_fmt()
        ),
    }
}

/// One JSON document per line: the object, or with `events` the whole event.
pub fn print_watch_json(o: &Value, event_type: &str, events: bool) {
    let doc = if events {
        serde_json::json!({"type": event_type, "object": o})
    } else {
        o.clone()
    };
    println!("{}", serde_json::to_string(&doc).unwrap_or_default());
}

pub fn describe(o: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: &str| {
        out.push_str(&format!("{:<20}{}\n", format!("{k}:"), v))
    };
    line(&mut out, "Name", s(o, "/metadata/name"));
    if !s(o, "/metadata/namespace").is_empty() {
        line(&mut out, "Namespace", s(o, "/metadata/namespace"));
    }
    line(
        &mut out,
        "Kind",
        &format!("{} ({})", s(o, "/kind"), s(o, "/apiVersion")),
    );
    for (title, ptr) in [
        ("Labels", "/metadata/labels"),
        ("Annotations", "/metadata/annotations"),
    ] {
        let m = o.pointer(ptr).and_then(Value::as_object);
        match m {
            Some(m) if !m.is_empty() => {
                let mut first = true;
                for (k, v) in m {
                    let val = v.as_str().unwrap_or("");
                    let val = if val.len() > 80 {
                        format!("{}...", &val[..77])
                    } else {
                        val.to_string()
                    };
                    line(
                        &mut out,
                        if first { title } else { "" },
                        &format!("{k}={val}"),
                    );
                    first = false;
                }
            }
            _ => line(&mut out, title, "<none>"),
        }
    }
    line(&mut out, "UID", s(o, "/metadata/uid"));
    line(
        &mut out,
        "ResourceVersion",
        s(o, "/metadata/resourceVersion"),
    );
    line(
        &mut out,
        "Created",
        &format!("{} ({} ago)", s(o, "/metadata/creationTimestamp"), age(o)),
    );
    if let Some(d) = o
        .pointer("/metadata/deletionTimestamp")
        .and_then(Value::as_str)
    {
        line(&mut out, "Deleting since", d);
    }
    for part in ["spec", "data", "status"] {
        if let Some(v) = o.get(part) {
            out.push_str(&format!("{}{}:\n", part[..1].to_uppercase(), &part[1..]));
            for l in yaml(v).lines() {
                out.push_str(&format!("  {l}\n"));
            }
        }
    }
    out
}

pub fn print_cluster_status(st: &Value) {
    println!("leader: {}   term: {}", st["leader"], st["term"]);
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec!["ID", "ADDRESS", "ROLE", "REACHABLE", "APPLIED"]);
    for m in st["members"].as_array().into_iter().flatten() {
        t.add_row(vec![
            m["id"].to_string(),
            m["address"].as_str().unwrap_or("").to_string(),
            m["role"].as_str().unwrap_or("").to_string(),
            m["reachable"].to_string(),
            m["applied_index"].to_string(),
        ]);
    }
    println!("{}", t.trim_fmt());
}

/// The "Events:" section of describe.
pub fn describe_events(evs: &[Value]) -> String {
    if evs.is_empty() {
        return "Events:             <none>\n".into();
    }
    let mut evs: Vec<&Value> = evs.iter().collect();
    evs.sort_by_key(|e| e["lastTimestamp"].as_str().unwrap_or("").to_string());
    let mut out = String::from(
        "Events:\n  Type     Reason               Age    From                        Message\n",
    );
    for e in evs {
        let age = e["lastTimestamp"]
            .as_str()
            .and_then(orc_api::seconds_since)
            .map(|s| format!("{s}s"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:<8} {:<20} {:<6} {:<27} {}\n",
            e["type"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
            age,
            e["source"]["component"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        ));
    }
    out
}
