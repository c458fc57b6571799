//! Virtual servers as nftables objects, and the transactions that move the
//! kernel from one set of them to another (pure; `lib` runs `nft`).
//!
//! The table `ip orc-svc` holds IPVS's structure in nftables terms:
//! - the map `vips` (address . protocol . port -> verdict) and the map
//!   `nodeports` (protocol . port -> verdict) are the virtual-server table;
//! - a chain per virtual server (`svc-ID` for ClusterIP traffic, `ext-ID` for
//!   NodePort, LoadBalancer and external IPs) is its scheduler: `numgen random`
//!   or `numgen inc` (round robin) over the real servers, after the
//!   sessionAffinity sets;
//! - a chain per real server (`ep-ID-HEX`) DNATs to it, marks hairpin traffic
//!   for masquerade and records the client in its affinity set;
//! - `no-endpoints` and `no-endpoint-nodeports` map Services without a real
//!   server to an immediate reject.
//!
//! A change to one Service rewrites only its own chains and map elements: an
//! endpoint change is one scheduler chain, one endpoint chain and one set,
//! whatever the number of Services.
use crate::model::{Backend, Scheduler, VirtualServer};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

pub const TABLE: &str = "orc-svc";
/// Packets carrying this mark bit are masqueraded on the way out.
pub const MASQ_MARK: u32 = 0x4000;

const VIPS: &str = "vips";
const NODEPORTS: &str = "nodeports";
const NO_EP: &str = "no-endpoints";
const NO_EP_NODEPORTS: &str = "no-endpoint-nodeports";

/// Everything the table holds for some virtual servers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// Chain name -> its rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Affinity set name -> timeout (seconds).
    pub sets: BTreeMap<String, u32>,
    /// Map name -> element key -> verdict.
    pub maps: BTreeMap<&'static str, BTreeMap<String, String>>,
}

impl Ruleset {
    pub fn extend(&mut self, other: Ruleset) {
        self.chains.extend(other.chains);
        self.sets.extend(other.sets);
        for (m, els) in other.maps {
            self.maps.entry(m).or_default().extend(els);
        }
    }
    fn element(&mut self, map: &'static str, key: String, verdict: String) {
        self.maps.entry(map).or_default().insert(key, verdict);
    }
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.maps.values().all(|m| m.is_empty())
    }
}

/// A short, stable id for a virtual server (48 bits of FNV-1a).
pub fn id(vs: &VirtualServer) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vs.key.bytes().chain(vs.proto.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

fn backend_hex(b: &Backend) -> String {
    format!("{:08x}-{:04x}", u32::from(b.ip), b.port)
}

/// The scheduling rules over `backends`: affinity first, then numgen.
fn schedule(
    out: &mut Vec<String>,
    id: &str,
    vs: &VirtualServer,
    backends: &[Backend],
    drop_when_empty: bool,
) {
    if backends.is_empty() {
        if drop_when_empty {
            out.push("drop".into());
        }
        return;
    }
    if let Some(t) = vs.affinity {
        for b in backends {
            let h = backend_hex(b);
            out.push(format!("ip saddr @aff-{id}-{h}-{t} goto ep-{id}-{h}"));
        }
    }
    let gen = match vs.scheduler {
        Scheduler::Random => "random",
        Scheduler::RoundRobin => "inc",
    };
    let mut rule = format!("numgen {gen} mod {} vmap {{ ", backends.len());
    for (i, b) in backends.iter().enumerate() {
        if i > 0 {
            rule.push_str(", ");
        }
        let _ = write!(rule, "{i} : goto ep-{id}-{}", backend_hex(b));
    }
    rule.push_str(" }");
    out.push(rule);
}

/// The nftables objects of one virtual server. `cluster_cidr`: traffic to a
/// ClusterIP from outside it is masqueraded (kube-proxy's --cluster-cidr).
pub fn render(vs: &VirtualServer, cluster_cidr: Option<&str>) -> Ruleset {
    let mut r = Ruleset::default();
    let id = id(vs);
    let p = vs.proto;
    if !vs.has_backends() {
        let reject = "goto reject-chain".to_string();
        if let Some((ip, port)) = vs.cluster {
            r.element(NO_EP, format!("{ip} . {p} . {port}"), reject.clone());
        }
        for (ip, port) in &vs.external {
            r.element(NO_EP, format!("{ip} . {p} . {port}"), reject.clone());
        }
        if let Some(np) = vs.node_port {
            r.element(NO_EP_NODEPORTS, format!("{p} . {np}"), reject);
        }
        return r;
    }
    let backends: BTreeSet<Backend> = vs
        .internal_backends
        .iter()
        .chain(&vs.external_backends)
        .copied()
        .collect();
    for b in &backends {
        let h = backend_hex(b);
        let mut rules = vec![format!("ip saddr {} jump mark-masq", b.ip)];
        if let Some(t) = vs.affinity {
            // The timeout is in the name: a new timeout is a new set.
            r.sets.insert(format!("aff-{id}-{h}-{t}"), t);
            rules.push(format!("update @aff-{id}-{h}-{t} {{ ip saddr }}"));
        }
        rules.push(format!("meta l4proto {p} dnat to {}:{}", b.ip, b.port));
        r.chains.insert(format!("ep-{id}-{h}"), rules);
    }
    if let Some((ip, port)) = vs.cluster {
        let mut rules = Vec::new();
        if let Some(c) = cluster_cidr {
            rules.push(format!("ip saddr != {c} jump mark-masq"));
        }
        schedule(&mut rules, &id, vs, &vs.internal_backends, true);
        r.chains.insert(format!("svc-{id}"), rules);
        r.element(
            VIPS,
            format!("{ip} . {p} . {port}"),
            format!("goto svc-{id}"),
        );
    }
    if !vs.external.is_empty() || vs.node_port.is_some() {
        let mut rules = Vec::new();
        if !vs.external_local {
            rules.push("jump mark-masq".to_string());
        }
        schedule(&mut rules, &id, vs, &vs.external_backends, true);
        r.chains.insert(format!("ext-{id}"), rules);
        for (ip, port) in &vs.external {
            r.element(
                VIPS,
                format!("{ip} . {p} . {port}"),
                format!("goto ext-{id}"),
            );
        }
        if let Some(np) = vs.node_port {
            r.element(NODEPORTS, format!("{p} . {np}"), format!("goto ext-{id}"));
        }
    }
    r
}

fn t() -> String {
    format!("ip {TABLE}")
}

/// The table's fixed part: maps, dispatch, hooks and masquerade.
pub fn base() -> Vec<String> {
    let t = t();
    let m = MASQ_MARK;
    vec![
        format!("add table {t}"),
        format!("add map {t} {VIPS} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}"),
        format!("add map {t} {NODEPORTS} {{ type inet_proto . inet_service : verdict; }}"),
        format!("add map {t} {NO_EP} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}"),
        format!("add map {t} {NO_EP_NODEPORTS} {{ type inet_proto . inet_service : verdict; }}"),
        format!("add chain {t} mark-masq"),
        format!("add rule {t} mark-masq meta mark set meta mark | {m:#x}"),
        format!("add chain {t} reject-chain"),
        format!("add rule {t} reject-chain reject"),
        format!("add chain {t} services"),
        format!("add rule {t} services ip daddr . meta l4proto . th dport vmap @{VIPS}"),
        format!("add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @{NODEPORTS}"),
        format!("add chain {t} endpoints-check"),
        format!("add rule {t} endpoints-check ip daddr . meta l4proto . th dport vmap @{NO_EP}"),
        format!("add rule {t} endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @{NO_EP_NODEPORTS}"),
        format!("add chain {t} filter-prerouting {{ type filter hook prerouting priority dstnat - 10; policy accept; }}"),
        format!("add rule {t} filter-prerouting ct state new jump endpoints-check"),
        format!("add chain {t} filter-output {{ type filter hook output priority -110; policy accept; }}"),
        format!("add rule {t} filter-output ct state new jump endpoints-check"),
        format!("add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}"),
        format!("add rule {t} nat-prerouting jump services"),
        format!("add chain {t} nat-output {{ type nat hook output priority -100; policy accept; }}"),
        format!("add rule {t} nat-output jump services"),
        format!("add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"),
        format!("add rule {t} nat-postrouting meta mark & {m:#x} == {m:#x} meta mark set meta mark ^ {m:#x} masquerade fully-random"),
    ]
}

fn set_decl(name: &str, timeout: u32) -> String {
    format!(
        "add set {} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}",
        t()
    )
}

/// One nftables transaction: replace the whole table with `all`.
pub fn full(all: &Ruleset) -> String {
    let t = t();
    let mut out = vec![format!("add table {t}"), format!("delete table {t}")];
    out.extend(base());
    let mut plan = Plan::default();
    plan.add(&Ruleset::default(), all);
    out.extend(plan.commands());
    out.join("\n") + "\n"
}

/// Commands that turn some old objects into new ones, in an order the
/// kernel accepts in one transaction: new sets and chains before anything
/// refers to them; old ones removed after nothing does.
#[derive(Debug, Default)]
pub struct Plan {
    add_sets: Vec<String>,
    add_chains: Vec<String>,
    rules: Vec<String>,
    del_elements: Vec<String>,
    add_elements: Vec<String>,
    flush_old: Vec<String>,
    del_chains: Vec<String>,
    del_sets: Vec<String>,
}

impl Plan {
    /// Add the changes from `old` to `new` (the objects of one Service).
    pub fn add(&mut self, old: &Ruleset, new: &Ruleset) {
        let t = t();
        for (s, timeout) in &new.sets {
            if !old.sets.contains_key(s) {
                self.add_sets.push(set_decl(s, *timeout));
            }
        }
        for (c, rules) in &new.chains {
            match old.chains.get(c) {
                Some(o) if o == rules => continue,
                Some(_) => self.rules.push(format!("flush chain {t} {c}")),
                None => self.add_chains.push(format!("add chain {t} {c}")),
            }
            for r in rules {
                self.rules.push(format!("add rule {t} {c} {r}"));
            }
        }
        for (m, els) in &old.maps {
            for (k, v) in els {
                if new.maps.get(m).and_then(|n| n.get(k)) != Some(v) {
                    self.del_elements
                        .push(format!("delete element {t} {m} {{ {k} }}"));
                }
            }
        }
        for (m, els) in &new.maps {
            for (k, v) in els {
                if old.maps.get(m).and_then(|o| o.get(k)) != Some(v) {
                    self.add_elements
                        .push(format!("add element {t} {m} {{ {k} : {v} }}"));
                }
            }
        }
        for c in old.chains.keys() {
            if !new.chains.contains_key(c) {
                self.flush_old.push(format!("flush chain {t} {c}"));
                self.del_chains.push(format!("delete chain {t} {c}"));
            }
        }
        for s in old.sets.keys() {
            if !new.sets.contains_key(s) {
                self.del_sets.push(format!("delete set {t} {s}"));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.commands().is_empty()
    }

    pub fn commands(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for part in [
            &self.add_sets,
            &self.add_chains,
            &self.rules,
            &self.del_elements,
            &self.add_elements,
            &self.flush_old,
            &self.del_chains,
            &self.del_sets,
        ] {
            out.extend(part.iter().cloned());
        }
        out
    }

    pub fn script(&self) -> String {
        let mut s = self.commands().join("\n");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scheduler;

    fn vs(backends: &[(&str, u16)]) -> VirtualServer {
        let b: Vec<Backend> = backends
            .iter()
            .map(|(ip, port)| Backend {
                ip: ip.parse().unwrap(),
                port: *port,
            })
            .collect();
        VirtualServer {
            key: "demo/web/http".into(),
            proto: "tcp",
            cluster: Some(("198.19.0.10".parse().unwrap(), 80)),
            external: vec![],
            node_port: Some(30002),
            internal_backends: b.clone(),
            external_backends: b,
            external_local: false,
            affinity: None,
            scheduler: Scheduler::Random,
        }
    }

    #[test]
    fn a_virtual_server_schedules_over_its_real_servers() {
        let v = vs(&[("198.18.1.2", 8080), ("198.18.2.2", 8080)]);
        let id = id(&v);
        let r = render(&v, Some("198.18.0.0/16"));
        assert_eq!(
            r.maps[VIPS]["198.19.0.10 . tcp . 80"],
            format!("goto svc-{id}")
        );
        assert_eq!(r.maps[NODEPORTS]["tcp . 30002"], format!("goto ext-{id}"));
        let svc = &r.chains[&format!("svc-{id}")];
        assert_eq!(svc[0], "ip saddr != 198.18.0.0/16 jump mark-masq");
        assert!(svc[1].starts_with("numgen random mod 2 vmap { 0 : goto ep-"));
        assert_eq!(r.chains[&format!("ext-{id}")][0], "jump mark-masq");
        let ep = &r.chains[&format!("ep-{id}-c6120102-1f90")];
        assert_eq!(ep[0], "ip saddr 198.18.1.2 jump mark-masq");
        assert_eq!(ep[1], "meta l4proto tcp dnat to 198.18.1.2:8080");
        assert!(r.sets.is_empty());
    }

    #[test]
    fn affinity_round_robin_and_local_policy() {
        let mut v = vs(&[("198.18.1.2", 8080)]);
        v.affinity = Some(60);
        v.scheduler = Scheduler::RoundRobin;
        v.external_local = true;
        v.external_backends.clear();
        let id = id(&v);
        let r = render(&v, None);
        let h = "c6120102-1f90";
        assert_eq!(r.sets[&format!("aff-{id}-{h}-60")], 60);
        let svc = &r.chains[&format!("svc-{id}")];
        assert_eq!(
            svc[0],
            format!("ip saddr @aff-{id}-{h}-60 goto ep-{id}-{h}")
        );
        assert!(svc[1].starts_with("numgen inc mod 1"));
        // Local policy without a local endpoint: dropped, not masqueraded.
        assert_eq!(r.chains[&format!("ext-{id}")], ["drop"]);
        assert!(r.chains[&format!("ep-{id}-{h}")][1].starts_with("update @aff-"));
    }

    #[test]
    fn a_service_without_endpoints_rejects() {
        let v = vs(&[]);
        let r = render(&v, None);
        assert!(r.chains.is_empty());
        assert_eq!(r.maps[NO_EP]["198.19.0.10 . tcp . 80"], "goto reject-chain");
        assert_eq!(r.maps[NO_EP_NODEPORTS]["tcp . 30002"], "goto reject-chain");
        assert!(!r.maps.contains_key(VIPS));
    }

    #[test]
    fn one_endpoint_change_touches_only_its_chains() {
        let a = render(&vs(&[("198.18.1.2", 8080), ("198.18.2.2", 8080)]), None);
        let b = render(&vs(&[("198.18.1.2", 8080), ("198.18.2.3", 8080)]), None);
        let mut p = Plan::default();
        p.add(&a, &b);
        let cmds = p.commands();
        let id = id(&vs(&[]));
        // New endpoint chain, two rewritten schedulers, the old endpoint gone;
        // map elements untouched.
        assert!(cmds.contains(&format!("add chain ip orc-svc ep-{id}-c6120203-1f90")));
        assert!(cmds.contains(&format!("flush chain ip orc-svc svc-{id}")));
        assert!(cmds.contains(&format!("delete chain ip orc-svc ep-{id}-c6120202-1f90")));
        assert!(!cmds.iter().any(|c| c.contains("element")));
        // The endpoint that stays keeps its chain.
        assert!(!cmds
            .iter()
            .any(|c| c.contains(&format!("ip orc-svc ep-{id}-c6120102"))));
        let pos = |s: &str| cmds.iter().position(|c| c.starts_with(s)).unwrap();
        assert!(pos("add chain") < pos("flush chain"));
        assert!(pos("flush chain ip orc-svc svc") < pos("delete chain"));
        // Nothing changes: nothing to do.
        let mut p = Plan::default();
        p.add(&b, &b);
        assert!(p.is_empty());
    }

    #[test]
    fn losing_the_last_endpoint_moves_the_service_to_reject() {
        let a = render(&vs(&[("198.18.1.2", 8080)]), None);
        let b = render(&vs(&[]), None);
        let mut p = Plan::default();
        p.add(&a, &b);
        let s = p.script();
        assert!(s.contains("delete element ip orc-svc vips { 198.19.0.10 . tcp . 80 }"));
        assert!(s.contains(
            "add element ip orc-svc no-endpoints { 198.19.0.10 . tcp . 80 : goto reject-chain }"
        ));
        let del_el = s.find("delete element ip orc-svc vips").unwrap();
        let del_chain = s.find("delete chain").unwrap();
        assert!(del_el < del_chain);
    }

    #[test]
    fn full_sync_replaces_the_table_atomically() {
        let r = render(&vs(&[("198.18.1.2", 8080)]), None);
        let s = full(&r);
        assert!(
            s.starts_with("add table ip orc-svc\ndelete table ip orc-svc\nadd table ip orc-svc\n")
        );
        assert!(s.contains("add element ip orc-svc vips"));
    }
}
