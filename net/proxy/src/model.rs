//! From Kubernetes objects (a Service and its EndpointSlices) to the virtual
//! servers a node must program: pure functions, no I/O.
use serde_json::Value;
use std::net::Ipv4Addr;

/// How a virtual server picks a real server (IPVS's "scheduler").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// `numgen random`: what kube-proxy does; the default.
    Random,
    /// `numgen inc`: IPVS's `rr`.
    RoundRobin,
}

/// Annotation choosing the scheduler of a Service: `random` or `rr`.
pub const SCHEDULER_ANNOTATION: &str = "orc.dev/lb-scheduler";

/// A real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// One port of one Service as this node serves it: the virtual server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    /// `namespace/name/port-name` (port name may be empty).
    pub key: String,
    /// `tcp`, `udp` or `sctp`.
    pub proto: &'static str,
    /// The ClusterIP and port, for traffic from inside the cluster.
    pub cluster: Option<(Ipv4Addr, u16)>,
    /// externalIPs and LoadBalancer ingress addresses, with the port: entry
    /// points that follow externalTrafficPolicy.
    pub external: Vec<(Ipv4Addr, u16)>,
    pub node_port: Option<u16>,
    /// Real servers for traffic to the ClusterIP (internalTrafficPolicy applied).
    pub internal_backends: Vec<Backend>,
    /// Real servers for NodePort and external traffic (externalTrafficPolicy applied).
    pub external_backends: Vec<Backend>,
    /// externalTrafficPolicy Local: no masquerade, the client address is kept.
    pub external_local: bool,
    /// sessionAffinity ClientIP: its timeout in seconds.
    pub affinity: Option<u32>,
    pub scheduler: Scheduler,
}

impl VirtualServer {
    /// Any real server at all (else the Service rejects at once).
    pub fn has_backends(&self) -> bool {
        !self.internal_backends.is_empty() || !self.external_backends.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Ep {
    ip: Ipv4Addr,
    port: u16,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// Kubernetes' choice of endpoints: the ready ones; when none is ready, the
/// serving ones that are terminating (so a rolling update of the last pods
/// keeps answering while they drain).
fn usable(eps: &[&Ep]) -> Vec<Backend> {
    let ready: Vec<Backend> = eps
        .iter()
        .filter(|e| e.ready)
        .map(|e| Backend {
            ip: e.ip,
            port: e.port,
        })
        .collect();
    let mut out = if ready.is_empty() {
        eps.iter()
            .filter(|e| e.serving && e.terminating)
            .map(|e| Backend {
                ip: e.ip,
                port: e.port,
            })
            .collect()
    } else {
        ready
    };
    out.sort();
    out.dedup();
    out
}

fn proto_of(v: &Value) -> &'static str {
    match v.as_str().unwrap_or("TCP") {
        "UDP" => "udp",
        "SCTP" => "sctp",
        _ => "tcp",
    }
}

fn truthy(v: &Value, default: bool) -> bool {
    v.as_bool().unwrap_or(default)
}

/// The endpoints of one Service port (by name and protocol) in its slices.
fn slice_endpoints(slices: &[&Value], pname: &str, proto: &str, node: &str) -> Vec<Ep> {
    let mut eps = Vec::new();
    for s in slices {
        if s["addressType"].as_str().is_some_and(|t| t != "IPv4") {
            continue;
        }
        let Some(sp) = s["ports"].as_array().into_iter().flatten().find(|sp| {
            sp["name"].as_str().unwrap_or("") == pname && proto_of(&sp["protocol"]) == proto
        }) else {
            continue;
        };
        let Some(target) = sp["port"].as_u64().and_then(|v| u16::try_from(v).ok()) else {
            continue;
        };
        for e in s["endpoints"].as_array().into_iter().flatten() {
            let c = &e["conditions"];
            let ready = truthy(&c["ready"], true);
            for a in e["addresses"].as_array().into_iter().flatten() {
                if let Some(ip) = a.as_str().and_then(|a| a.parse().ok()) {
                    eps.push(Ep {
                        ip,
                        port: target,
                        local: e["nodeName"].as_str() == Some(node),
                        ready,
                        serving: truthy(&c["serving"], ready),
                        terminating: truthy(&c["terminating"], false),
                    });
                }
            }
        }
    }
    eps
}

/// The usable real servers of one Service port (by name; `proto` is `tcp`,
/// `udp` or `sctp`) on any node: what an L7 proxy balances over.
pub fn ready_backends(slices: &[&Value], port_name: &str, proto: &str) -> Vec<Backend> {
    let eps = slice_endpoints(slices, port_name, proto, "");
    usable(&eps.iter().collect::<Vec<_>>())
}

/// The virtual servers of `svc` on node `node`, given the Service's
/// EndpointSlices. ExternalName and headless Services have none.
pub fn virtual_servers(svc: &Value, slices: &[&Value], node: &str) -> Vec<VirtualServer> {
    let spec = &svc["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Vec::new();
    }
    let cluster_ip = spec["clusterIP"]
        .as_str()
        .and_then(|s| s.parse::<Ipv4Addr>().ok());
    let ns = svc["metadata"]["namespace"].as_str().unwrap_or("");
    let name = svc["metadata"]["name"].as_str().unwrap_or("");
    let mut external_ips: Vec<Ipv4Addr> = spec["externalIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    if kind == "LoadBalancer" {
        external_ips.extend(
            svc["status"]["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str()?.parse::<Ipv4Addr>().ok()),
        );
    }
    external_ips.sort();
    external_ips.dedup();
    if cluster_ip.is_none() && external_ips.is_empty() {
        return Vec::new(); // headless
    }
    let affinity = (spec["sessionAffinity"] == "ClientIP").then(|| {
        spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"]
            .as_u64()
            .map(|t| t.clamp(1, 86_400) as u32)
            .unwrap_or(10_800)
    });
    let scheduler = match svc["metadata"]["annotations"][SCHEDULER_ANNOTATION].as_str() {
        Some("rr") | Some("round-robin") => Scheduler::RoundRobin,
        _ => Scheduler::Random,
    };
    let etp_local = spec["externalTrafficPolicy"] == "Local";
    let itp_local = spec["internalTrafficPolicy"] == "Local";
    let mut out = Vec::new();
    for p in spec["ports"].as_array().into_iter().flatten() {
        let Some(port) = p["port"].as_u64().and_then(|v| u16::try_from(v).ok()) else {
            continue;
        };
        let pname = p["name"].as_str().unwrap_or("");
        let proto = proto_of(&p["protocol"]);
        let eps = slice_endpoints(slices, pname, proto, node);
        let all: Vec<&Ep> = eps.iter().collect();
        let local: Vec<&Ep> = eps.iter().filter(|e| e.local).collect();
        let node_port = p["nodePort"]
            .as_u64()
            .and_then(|v| u16::try_from(v).ok())
            .filter(|n| *n > 0 && matches!(kind, "NodePort" | "LoadBalancer"));
        out.push(VirtualServer {
            key: format!("{ns}/{name}/{pname}"),
            proto,
            cluster: cluster_ip.map(|ip| (ip, port)),
            external: external_ips.iter().map(|ip| (*ip, port)).collect(),
            node_port,
            internal_backends: usable(if itp_local { &local } else { &all }),
            external_backends: usable(if etp_local { &local } else { &all }),
            external_local: etp_local,
            affinity,
            scheduler,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(spec: Value) -> Value {
        json!({"metadata": {"namespace": "demo", "name": "web"}, "spec": spec})
    }

    fn slice() -> Value {
        json!({"addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.18.1.2"], "nodeName": "n1", "conditions": {"ready": true, "serving": true, "terminating": false}},
                {"addresses": ["198.18.2.2"], "nodeName": "n2", "conditions": {"ready": true, "serving": true, "terminating": false}},
                {"addresses": ["198.18.2.3"], "nodeName": "n2", "conditions": {"ready": false, "serving": false, "terminating": false}},
                {"addresses": ["198.18.1.9"], "nodeName": "n1", "conditions": {"ready": false, "serving": true, "terminating": true}}]})
    }

    #[test]
    fn cluster_ip_uses_ready_endpoints_of_the_named_port() {
        let s = svc(json!({"type": "ClusterIP", "clusterIP": "198.19.0.10",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]}));
        let sl = slice();
        let v = virtual_servers(&s, &[&sl], "n1");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].key, "demo/web/http");
        assert_eq!(v[0].cluster, Some(("198.19.0.10".parse().unwrap(), 80)));
        let ips: Vec<String> = v[0]
            .internal_backends
            .iter()
            .map(|b| format!("{}:{}", b.ip, b.port))
            .collect();
        assert_eq!(ips, ["198.18.1.2:8080", "198.18.2.2:8080"]);
        assert_eq!(v[0].node_port, None);
        // The UDP port has no slice port: no backends, so it rejects.
        assert!(!v[1].has_backends());
        assert_eq!(v[1].proto, "udp");
    }

    #[test]
    fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
        let s = svc(json!({"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80}]}));
        let sl = json!({"ports": [{"name": "http", "port": 8080}], "endpoints": [
            {"addresses": ["198.18.1.9"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["198.18.1.8"], "conditions": {"ready": false, "serving": false, "terminating": false}}]});
        let v = virtual_servers(&s, &[&sl], "n1");
        assert_eq!(v[0].internal_backends.len(), 1);
        assert_eq!(v[0].internal_backends[0].ip.to_string(), "198.18.1.9");
    }

    #[test]
    fn traffic_policies_pick_local_endpoints() {
        let s = svc(
            json!({"type": "NodePort", "clusterIP": "198.19.0.10", "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
            "ports": [{"name": "http", "port": 80, "nodePort": 30002}]}),
        );
        let sl = slice();
        let v = &virtual_servers(&s, &[&sl], "n2")[0];
        assert_eq!(v.node_port, Some(30002));
        assert!(v.external_local);
        assert_eq!(v.affinity, Some(10_800));
        assert_eq!(v.external_backends.len(), 1);
        assert_eq!(v.internal_backends.len(), 1);
        assert_eq!(v.external_backends[0].ip.to_string(), "198.18.2.2");
        let v = &virtual_servers(&s, &[&sl], "n3")[0];
        assert!(v.external_backends.is_empty());
    }

    #[test]
    fn load_balancer_addresses_and_headless_and_external_name() {
        let mut s = svc(json!({"type": "LoadBalancer", "clusterIP": "198.19.0.10",
            "ports": [{"name": "http", "port": 80, "nodePort": 30003}]}));
        s["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.252.1"}]}});
        let v = &virtual_servers(&s, &[], "n1")[0];
        assert_eq!(v.external, [("198.18.252.1".parse().unwrap(), 80)]);
        let h = svc(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert!(virtual_servers(&h, &[], "n1").is_empty());
        let e = svc(json!({"type": "ExternalName", "externalName": "example.test"}));
        assert!(virtual_servers(&e, &[], "n1").is_empty());
    }
}
