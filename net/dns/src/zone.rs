//! The cluster's names (pure): records made from Services and their
//! EndpointSlices, and the answer to one question, telling NXDOMAIN (no
//! such name) from NODATA (the name exists, not with that type).
use serde_json::Value;
use std::collections::HashMap;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    A(Ipv4Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Cname(String),
    Ptr(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    A,
    Srv,
    Cname,
    Ptr,
    Any,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Records(Vec<Data>),
    NoData,
    NxDomain,
    /// Not a cluster name: ask the upstream resolvers.
    NotOurs,
}

/// `name` lower-cased with a trailing dot.
pub fn fqdn(name: &str) -> String {
    let mut n = name.to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

pub fn reverse_name(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
}

fn ready(e: &Value) -> bool {
    e["conditions"]["ready"] != false
}

/// `_PORT._PROTO.BASE` SRV records for the named ports, pointing at `target`.
fn srv(out: &mut Vec<(String, Data)>, ports: &[Value], base: &str, target: &str) {
    for p in ports {
        let (Some(pn), Some(port)) = (
            p["name"].as_str().filter(|n| !n.is_empty()),
            p["port"].as_u64().and_then(|v| u16::try_from(v).ok()),
        ) else {
            continue;
        };
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        out.push((
            format!("_{pn}._{proto}.{base}").to_ascii_lowercase(),
            Data::Srv {
                priority: 0,
                weight: 100,
                port,
                target: target.to_string(),
            },
        ));
    }
}

/// The records of one Service in `domain` (e.g. `cluster.local`).
pub fn service_records(svc: &Value, slices: &[&Value], domain: &str) -> Vec<(String, Data)> {
    let domain = fqdn(domain);
    let ns = svc["metadata"]["namespace"].as_str().unwrap_or("");
    let name = svc["metadata"]["name"].as_str().unwrap_or("");
    let base = format!("{name}.{ns}.svc.{domain}").to_ascii_lowercase();
    let spec = &svc["spec"];
    let mut out = Vec::new();
    if spec["type"] == "ExternalName" {
        if let Some(t) = spec["externalName"].as_str().filter(|t| !t.is_empty()) {
            out.push((base, Data::Cname(fqdn(t))));
        }
        return out;
    }
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    match spec["clusterIP"].as_str() {
        Some(ip) if ip != "None" && !ip.is_empty() => {
            let Ok(ip) = ip.parse::<Ipv4Addr>() else {
                return out;
            };
            out.push((base.clone(), Data::A(ip)));
            out.push((reverse_name(ip), Data::Ptr(base.clone())));
            srv(&mut out, &ports, &base, &base);
        }
        Some("None") => {
            // Headless: the ready endpoints themselves.
            let publish = spec["publishNotReadyAddresses"] == true;
            for s in slices {
                let sports = s["ports"].as_array().cloned().unwrap_or_default();
                for e in s["endpoints"].as_array().into_iter().flatten() {
                    if !publish && !ready(e) {
                        continue;
                    }
                    for a in e["addresses"].as_array().into_iter().flatten() {
                        let Some(ip) = a.as_str().and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                            continue;
                        };
                        let host = e["hostname"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| ip.to_string().replace('.', "-"));
                        let host_name = format!("{host}.{base}").to_ascii_lowercase();
                        out.push((base.clone(), Data::A(ip)));
                        out.push((host_name.clone(), Data::A(ip)));
                        out.push((reverse_name(ip), Data::Ptr(host_name.clone())));
                        srv(&mut out, &sports, &base, &host_name);
                    }
                }
            }
        }
        _ => {}
    }
    out.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| format!("{:?}", a.1).cmp(&format!("{:?}", b.1)))
    });
    out.dedup();
    out
}

/// Every cluster name, kept up to date one Service at a time.
pub struct Zone {
    domain: String,
    /// `.` + domain, for suffix checks without allocating.
    dot_domain: String,
    names: HashMap<String, Vec<Data>>,
    /// Names with something below them (empty non-terminals), counted.
    parents: HashMap<String, usize>,
    by_service: HashMap<String, Vec<(String, Data)>>,
    /// Changes with every change of any zone of the process (never reused),
    /// so an answer cached under one generation is never served from another.
    generation: u64,
}

fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn parents_of<'a>(name: &'a str, domain: &str) -> impl Iterator<Item = &'a str> {
    let domain = domain.to_string();
    let mut rest = Some(name);
    std::iter::from_fn(move || {
        let r = rest?;
        let (_, tail) = r.split_once('.')?;
        if tail.is_empty() || !(tail.ends_with(&domain) || tail.ends_with("in-addr.arpa.")) {
            rest = None;
            return None;
        }
        rest = Some(tail);
        Some(tail)
    })
}

impl Zone {
    pub fn new(domain: &str) -> Self {
        Zone {
            domain: fqdn(domain),
            dot_domain: format!(".{}", fqdn(domain)),
            names: HashMap::new(),
            parents: HashMap::new(),
            by_service: HashMap::new(),
            generation: next_generation(),
        }
    }

    /// This zone's content version: it changes whenever the zone does.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Replace the records of Service `key` (none: it is gone).
    pub fn set_service(&mut self, key: &str, records: Vec<(String, Data)>) {
        self.generation = next_generation();
        if let Some(old) = self.by_service.remove(key) {
            for (n, d) in old {
                if let Some(v) = self.names.get_mut(&n) {
                    if let Some(i) = v.iter().position(|x| *x == d) {
                        v.remove(i);
                    }
                    if v.is_empty() {
                        self.names.remove(&n);
                    }
                }
                for p in parents_of(&n, &self.domain) {
                    if let Some(c) = self.parents.get_mut(p) {
                        *c -= 1;
                        if *c == 0 {
                            self.parents.remove(p);
                        }
                    }
                }
            }
        }
        if records.is_empty() {
            return;
        }
        for (n, d) in &records {
            self.names.entry(n.clone()).or_default().push(d.clone());
            for p in parents_of(n, &self.domain) {
                *self.parents.entry(p.to_string()).or_default() += 1;
            }
        }
        self.by_service.insert(key.to_string(), records);
    }

    pub fn services(&self) -> usize {
        self.by_service.len()
    }

    /// The answer to (`name`, `qtype`); `name` as `fqdn` gives it.
    pub fn lookup(&self, name: &str, qtype: QType) -> Answer {
        let ours = name == self.domain || name.ends_with(&self.dot_domain);
        let reverse = name.ends_with(".in-addr.arpa.");
        let Some(recs) = self.names.get(name) else {
            if ours {
                return if self.parents.contains_key(name) || name == self.domain {
                    Answer::NoData
                } else {
                    Answer::NxDomain
                };
            }
            return Answer::NotOurs;
        };
        if !ours && !reverse {
            return Answer::NotOurs;
        }
        let cname: Vec<Data> = recs
            .iter()
            .filter(|d| matches!(d, Data::Cname(_)))
            .cloned()
            .collect();
        if !cname.is_empty() && qtype != QType::Cname {
            return Answer::Records(cname);
        }
        let hits: Vec<Data> = recs
            .iter()
            .filter(|d| {
                matches!(
                    (qtype, d),
                    (QType::Any, _)
                        | (QType::A, Data::A(_))
                        | (QType::Srv, Data::Srv { .. })
                        | (QType::Cname, Data::Cname(_))
                        | (QType::Ptr, Data::Ptr(_))
                )
            })
            .cloned()
            .collect();
        if hits.is_empty() {
            Answer::NoData
        } else {
            Answer::Records(hits)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn zone() -> Zone {
        let mut z = Zone::new("cluster.local");
        let web = json!({"metadata": {"namespace": "demo", "name": "web"},
            "spec": {"clusterIP": "198.19.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}});
        z.set_service("demo/web", service_records(&web, &[], "cluster.local"));
        let db = json!({"metadata": {"namespace": "demo", "name": "db"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}});
        let slice = json!({"ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}], "endpoints": [
            {"addresses": ["198.18.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
            {"addresses": ["198.18.2.5"], "hostname": "db-1", "conditions": {"ready": true}},
            {"addresses": ["198.18.2.6"], "conditions": {"ready": false}}]});
        z.set_service("demo/db", service_records(&db, &[&slice], "cluster.local"));
        let ext = json!({"metadata": {"namespace": "demo", "name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.test"}});
        z.set_service("demo/ext", service_records(&ext, &[], "cluster.local"));
        z
    }

    #[test]
    fn cluster_ip_service_names() {
        let z = zone();
        assert_eq!(
            z.lookup("web.demo.svc.cluster.local.", QType::A),
            Answer::Records(vec![Data::A("198.19.0.20".parse().unwrap())])
        );
        assert_eq!(
            z.lookup("_http._tcp.web.demo.svc.cluster.local.", QType::Srv),
            Answer::Records(vec![Data::Srv {
                priority: 0,
                weight: 100,
                port: 80,
                target: "web.demo.svc.cluster.local.".into()
            }])
        );
        assert_eq!(
            z.lookup("20.0.19.198.in-addr.arpa.", QType::Ptr),
            Answer::Records(vec![Data::Ptr("web.demo.svc.cluster.local.".into())])
        );
    }

    #[test]
    fn headless_and_external_names() {
        let z = zone();
        let Answer::Records(a) = z.lookup("db.demo.svc.cluster.local.", QType::A) else {
            panic!()
        };
        assert_eq!(a.len(), 2, "only the ready endpoints: {a:?}");
        assert_eq!(
            z.lookup("db-1.db.demo.svc.cluster.local.", QType::A),
            Answer::Records(vec![Data::A("198.18.2.5".parse().unwrap())])
        );
        let Answer::Records(srv) = z.lookup("_pg._tcp.db.demo.svc.cluster.local.", QType::Srv)
        else {
            panic!()
        };
        assert_eq!(srv.len(), 2);
        assert_eq!(
            z.lookup("ext.demo.svc.cluster.local.", QType::A),
            Answer::Records(vec![Data::Cname("example.test.".into())])
        );
    }

    #[test]
    fn nxdomain_nodata_and_upstream_are_told_apart() {
        let mut z = zone();
        // The name exists, not with that type.
        assert_eq!(
            z.lookup("web.demo.svc.cluster.local.", QType::Srv),
            Answer::NoData
        );
        // Empty non-terminals exist too.
        assert_eq!(
            z.lookup("demo.svc.cluster.local.", QType::A),
            Answer::NoData
        );
        assert_eq!(z.lookup("cluster.local.", QType::A), Answer::NoData);
        // A short name searched in another namespace does not.
        assert_eq!(
            z.lookup("web.other.svc.cluster.local.", QType::A),
            Answer::NxDomain
        );
        assert_eq!(
            z.lookup("web.svc.cluster.local.", QType::A),
            Answer::NxDomain
        );
        assert_eq!(z.lookup("example.test.", QType::A), Answer::NotOurs);
        assert_eq!(
            z.lookup("9.9.18.198.in-addr.arpa.", QType::Ptr),
            Answer::NotOurs
        );
        // A Service that goes takes its names, and its empty parents, along.
        z.set_service("demo/web", vec![]);
        z.set_service("demo/db", vec![]);
        z.set_service("demo/ext", vec![]);
        assert_eq!(
            z.lookup("web.demo.svc.cluster.local.", QType::A),
            Answer::NxDomain
        );
        assert_eq!(
            z.lookup("demo.svc.cluster.local.", QType::A),
            Answer::NxDomain
        );
        assert_eq!(z.services(), 0);
    }
}
