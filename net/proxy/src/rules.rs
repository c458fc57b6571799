//! Virtual servers as nftables objects, and the transactions that move the
//! kernel from one set of them to another (pure; `lib` runs `nft`).
//!
//! The table `ip orc-svc` holds IPVS's structure in nftables terms. Most
//! Services need no chain of their own:
//! - the interval map `backends` takes (address . protocol . port . bucket),
//!   the bucket being `numgen random mod 720`, to the real server's address
//!   and port: a virtual server with N real servers holds N elements, each
//!   a range of 720/N buckets, and one rule DNATs through it
//!   (`nodeport-backends` does the same for NodePorts, keyed by protocol and
//!   port on every local address);
//! - sets say which entries masquerade (`cluster-vips` from outside the
//!   cluster CIDR, `masq-external`, `masq-nodeports` for
//!   externalTrafficPolicy Cluster), which drop (`drop-vips`,
//!   `drop-nodeports`: Local policy without a local endpoint), which reject
//!   at once (`no-endpoints`, `no-endpoint-nodeports`), and which pairs are
//!   hairpin traffic (`hairpin`: a pod reaching itself through a Service).
//!
//! An endpoint change is then a few element changes in one map, whatever the
//! number of Services; the kernel's chain graph does not grow with them.
//! Services that need per-client state or strict order (sessionAffinity
//! ClientIP, the round-robin scheduler) get chains instead: `svc-ID` and
//! `ext-ID` reached through the verdict maps `vips` and `nodeports`, an
//! affinity set and a DNAT chain per real server (`ep-ID-HEX`).

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
const BACKENDS: &str = "backends";
const NODEPORT_BACKENDS: &str = "nodeport-backends";
const CLUSTER_VIPS: &str = "cluster-vips";
const MASQ_EXTERNAL: &str = "masq-external";
const MASQ_NODEPORTS: &str = "masq-nodeports";
const DROP_VIPS: &str = "drop-vips";
const DROP_NODEPORTS: &str = "drop-nodeports";
const HAIRPIN: &str = "hairpin";
/// Buckets a connection is hashed into: divisible by 1-6, 8-10, 12, ...
pub const BUCKETS: usize = 720;

/// Everything the table holds for some virtual servers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// Chain name -> its rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Affinity set name -> timeout (seconds).
    pub sets: BTreeMap<String, u32>,
    /// Map or set name -> element key -> value (empty for a set).
    pub maps: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// Real servers that may be reached through this Service by themselves.
    pub hairpin: BTreeSet<std::net::Ipv4Addr>,
}

impl Ruleset {
    pub fn extend(&mut self, other: Ruleset) {
        self.chains.extend(other.chains);
        self.sets.extend(other.sets);
        self.hairpin.extend(other.hairpin);
        for (m, els) in other.maps {
            self.maps.entry(m).or_default().extend(els);
        }
    }
    fn element(&mut self, map: &'static str, key: String, verdict: String) {
        self.maps.entry(map).or_default().insert(key, verdict);
    }
    /// The entry points these objects answer for (`vip:ADDR . PROTO . PORT`,
    /// `np:PROTO . PORT`): two Services must not share one.
    pub fn entries(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (m, els) in &self.maps {
            let (kind, bucketed) = match *m {
                VIPS | NO_EP | DROP_VIPS => ("vip", false),
                BACKENDS => ("vip", true),
                NODEPORTS | NO_EP_NODEPORTS | DROP_NODEPORTS => ("np", false),
                NODEPORT_BACKENDS => ("np", true),
                _ => continue,
            };
            for k in els.keys() {
                let k = if bucketed {
                    k.rsplit_once(" . ").map_or(k.as_str(), |(p, _)| p)
                } else {
                    k
                };
                out.insert(format!("{kind}:{k}"));
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
            && self.sets.is_empty()
            && self.hairpin.is_empty()
            && self.maps.values().all(|m| m.is_empty())
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
        if let Some((ip, port)) = vs.cluster {
            r.element(NO_EP, format!("{ip} . {p} . {port}"), String::new());
        }
        for (ip, port) in &vs.external {
            r.element(NO_EP, format!("{ip} . {p} . {port}"), String::new());
        }
        if let Some(np) = vs.node_port {
            r.element(NO_EP_NODEPORTS, format!("{p} . {np}"), String::new());
        }
        return r;
    }
    let backends: BTreeSet<Backend> = vs
        .internal_backends
        .iter()
        .chain(&vs.external_backends)
        .copied()
        .collect();
    if vs.affinity.is_none() && vs.scheduler == Scheduler::Random {
        r.hairpin = backends.iter().map(|b| b.ip).collect();
        // One entry point: its real servers as bucket ranges, or a drop
        // (Local policy, none here); `masq`: the set that marks it.
        let entry = |r: &mut Ruleset,
                     (map, drop): (&'static str, &'static str),
                     key: String,
                     list: &[Backend],
                     masq: Option<&'static str>| {
            if list.is_empty() {
                r.element(drop, key, String::new());
                return;
            }
            let n = list.len().min(BUCKETS);
            for (i, b) in list.iter().take(BUCKETS).enumerate() {
                let (lo, hi) = (i * BUCKETS / n, (i + 1) * BUCKETS / n - 1);
                let range = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                };
                r.element(
                    map,
                    format!("{key} . {range}"),
                    format!("{} . {}", b.ip, b.port),
                );
            }
            if let Some(set) = masq {
                r.element(set, key, String::new());
            }
        };
        let vips = (BACKENDS, DROP_VIPS);
        if let Some((ip, port)) = vs.cluster {
            let masq = cluster_cidr.map(|_| CLUSTER_VIPS);
            let key = format!("{ip} . {p} . {port}");
            entry(&mut r, vips, key, &vs.internal_backends, masq);
        }
        let ext_masq = |set| (!vs.external_local).then_some(set);
        for (ip, port) in &vs.external {
            let key = format!("{ip} . {p} . {port}");
            let masq = ext_masq(MASQ_EXTERNAL);
            entry(&mut r, vips, key, &vs.external_backends, masq);
        }
        if let Some(np) = vs.node_port {
            let key = format!("{p} . {np}");
            let masq = ext_masq(MASQ_NODEPORTS);
            entry(
                &mut r,
                (NODEPORT_BACKENDS, DROP_NODEPORTS),
                key,
                &vs.external_backends,
                masq,
            );
        }
        return r;
    }
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

/// The table's fixed part: maps, sets, dispatch, hooks and masquerade.
/// `cluster_cidr`: traffic to a ClusterIP from outside it is masqueraded.
pub fn base(cluster_cidr: Option<&str>) -> Vec<String> {
    let t = t();
    let m = MASQ_MARK;
    let mark = format!("meta mark set meta mark | {m:#x}");
    let vip_key = "ip daddr . meta l4proto . th dport";
    let local = "fib daddr type local ip daddr != 127.0.0.0/8";
    let np_key = "meta l4proto . th dport";
    let vip_t = "ipv4_addr . inet_proto . inet_service";
    let np_t = "inet_proto . inet_service";
    let mut v = vec![
        format!("add table {t}"),
        format!("add map {t} {VIPS} {{ type {vip_t} : verdict; }}"),
        format!("add map {t} {NODEPORTS} {{ type {np_t} : verdict; }}"),
        format!("add map {t} {BACKENDS} {{ typeof ip daddr . meta l4proto . th dport . numgen random mod {BUCKETS} : ip daddr . th dport; flags interval; }}"),
        format!("add map {t} {NODEPORT_BACKENDS} {{ typeof meta l4proto . th dport . numgen random mod {BUCKETS} : ip daddr . th dport; flags interval; }}"),
    ];
    for set in [NO_EP, CLUSTER_VIPS, MASQ_EXTERNAL, DROP_VIPS] {
        v.push(format!("add set {t} {set} {{ type {vip_t}; }}"));
    }
    for set in [NO_EP_NODEPORTS, MASQ_NODEPORTS, DROP_NODEPORTS] {
        v.push(format!("add set {t} {set} {{ type {np_t}; }}"));
    }
    v.extend([
        format!("add set {t} {HAIRPIN} {{ type ipv4_addr . ipv4_addr; }}"),
        format!("add chain {t} mark-masq"),
        format!("add rule {t} mark-masq {mark}"),
        format!("add chain {t} services"),
        format!("add rule {t} services {vip_key} vmap @{VIPS}"),
        format!("add rule {t} services {local} {np_key} vmap @{NODEPORTS}"),
    ]);
    if let Some(c) = cluster_cidr {
        v.push(format!(
            "add rule {t} services ip saddr != {c} {vip_key} @{CLUSTER_VIPS} {mark}"
        ));
    }
    v.extend([
        format!("add rule {t} services {vip_key} @{MASQ_EXTERNAL} {mark}"),
        format!("add rule {t} services {local} {np_key} @{MASQ_NODEPORTS} {mark}"),
        format!("add rule {t} services {vip_key} @{DROP_VIPS} drop"),
        format!("add rule {t} services {local} {np_key} @{DROP_NODEPORTS} drop"),
        format!("add rule {t} services meta l4proto {{ tcp, udp, sctp }} dnat ip addr . port to {vip_key} . numgen random mod {BUCKETS} map @{BACKENDS}"),
        format!("add rule {t} services {local} meta l4proto {{ tcp, udp, sctp }} dnat ip addr . port to {np_key} . numgen random mod {BUCKETS} map @{NODEPORT_BACKENDS}"),
        format!("add chain {t} endpoints-check"),
        format!("add rule {t} endpoints-check {vip_key} @{NO_EP} reject"),
        format!("add rule {t} endpoints-check {local} {np_key} @{NO_EP_NODEPORTS} reject"),
        format!("add chain {t} filter-prerouting {{ type filter hook prerouting priority dstnat - 10; policy accept; }}"),
        format!("add rule {t} filter-prerouting ct state new jump endpoints-check"),
        format!("add chain {t} filter-output {{ type filter hook output priority -110; policy accept; }}"),
        format!("add rule {t} filter-output ct state new jump endpoints-check"),
        format!("add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}"),
        format!("add rule {t} nat-prerouting jump services"),
        format!("add chain {t} nat-output {{ type nat hook output priority -100; policy accept; }}"),
        format!("add rule {t} nat-output jump services"),
        format!("add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"),
        // A pod that reached itself through a Service must see the reply
        // come from elsewhere.
        format!("add rule {t} nat-postrouting ct status dnat ip saddr . ip daddr @{HAIRPIN} {mark}"),
        format!("add rule {t} nat-postrouting meta mark & {m:#x} == {m:#x} meta mark set meta mark ^ {m:#x} masquerade fully-random"),
    ]);
    v
}

fn set_decl(name: &str, timeout: u32) -> String {
    format!(
        "add set {} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}",
        t()
    )
}

/// One nftables transaction: replace the whole table with `all`.
pub fn full(all: &Ruleset, cluster_cidr: Option<&str>) -> String {
    let t = t();
    let mut out = vec![format!("add table {t}"), format!("delete table {t}")];
    out.extend(base(cluster_cidr));
    for (s, timeout) in &all.sets {
        out.push(set_decl(s, *timeout));
    }
    for c in all.chains.keys() {
        out.push(format!("add chain {t} {c}"));
    }
    for (c, rules) in &all.chains {
        for r in rules {
            out.push(format!("add rule {t} {c} {r}"));
        }
    }
    // Elements in chunks: one netlink batch holds only so much.
    for (m, els) in &all.maps {
        let items: Vec<String> = els.iter().map(|(k, v)| element(k, v)).collect();
        for chunk in items.chunks(500) {
            out.push(format!("add element {t} {m} {{ {} }}", chunk.join(", ")));
        }
    }
    let pairs: Vec<String> = all
        .hairpin
        .iter()
        .map(|ip| format!("{ip} . {ip}"))
        .collect();
    for chunk in pairs.chunks(500) {
        out.push(format!(
            "add element {t} {HAIRPIN} {{ {} }}",
            chunk.join(", ")
        ));
    }
    out.join("\n") + "\n"
}

fn element(k: &str, v: &str) -> String {
    if v.is_empty() {
        k.to_string()
    } else {
        format!("{k} : {v}")
    }
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
                        .push(format!("add element {t} {m} {{ {} }}", element(k, v)));
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

    /// Hairpin pairs that appear (first Service to use the address) and go
    /// (last one gone); the caller counts references.
    pub fn hairpin(&mut self, add: &[std::net::Ipv4Addr], del: &[std::net::Ipv4Addr]) {
        let t = t();
        for ip in add {
            self.add_elements
                .push(format!("add element {t} {HAIRPIN} {{ {ip} . {ip} }}"));
        }
        for ip in del {
            self.del_elements
                .push(format!("delete element {t} {HAIRPIN} {{ {ip} . {ip} }}"));
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
    fn a_virtual_server_is_a_range_of_buckets_per_real_server() {
        let v = vs(&[
            ("198.18.1.2", 8080),
            ("198.18.2.2", 8080),
            ("198.18.3.2", 80),
        ]);
        let r = render(&v, Some("198.18.0.0/16"));
        assert!(r.chains.is_empty() && r.sets.is_empty());
        let b = &r.maps[BACKENDS];
        assert_eq!(b["198.19.0.10 . tcp . 80 . 0-239"], "198.18.1.2 . 8080");
        assert_eq!(b["198.19.0.10 . tcp . 80 . 240-479"], "198.18.2.2 . 8080");
        assert_eq!(b["198.19.0.10 . tcp . 80 . 480-719"], "198.18.3.2 . 80");
        assert_eq!(r.maps[NODEPORT_BACKENDS].len(), 3);
        assert!(r.maps[NODEPORT_BACKENDS].contains_key("tcp . 30002 . 0-239"));
        assert!(r.maps[CLUSTER_VIPS].contains_key("198.19.0.10 . tcp . 80"));
        assert!(r.maps[MASQ_NODEPORTS].contains_key("tcp . 30002"));
        assert_eq!(r.hairpin.len(), 3);
        // Seven real servers: 102 or 103 buckets each.
        let seven: Vec<(String, u16)> = (1..=7).map(|i| (format!("198.18.1.{i}"), 80)).collect();
        let refs: Vec<(&str, u16)> = seven.iter().map(|(a, p)| (a.as_str(), *p)).collect();
        let r = render(&vs(&refs), None);
        let sizes: Vec<usize> = r.maps[BACKENDS]
            .keys()
            .map(|k| {
                let (lo, hi) = k.rsplit(' ').next().unwrap().split_once('-').unwrap();
                hi.parse::<usize>().unwrap() - lo.parse::<usize>().unwrap() + 1
            })
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), BUCKETS);
        assert!(sizes.iter().all(|s| *s == 102 || *s == 103), "{sizes:?}");
    }

    #[test]
    fn local_policy_keeps_the_client_address_or_drops() {
        let mut v = vs(&[("198.18.1.2", 8080)]);
        v.external_local = true;
        let r = render(&v, None);
        assert!(!r.maps.contains_key(MASQ_NODEPORTS));
        assert!(r.maps[NODEPORT_BACKENDS].contains_key("tcp . 30002 . 0-719"));
        v.external_backends.clear();
        let r = render(&v, None);
        assert!(r.maps[DROP_NODEPORTS].contains_key("tcp . 30002"));
        assert!(!r.maps.contains_key(NODEPORT_BACKENDS));
    }

    #[test]
    fn affinity_and_round_robin_get_chains() {
        let mut v = vs(&[("198.18.1.2", 8080), ("198.18.2.2", 8080)]);
        v.scheduler = Scheduler::RoundRobin;
        let id = id(&v);
        let r = render(&v, Some("198.18.0.0/16"));
        assert_eq!(
            r.maps[VIPS]["198.19.0.10 . tcp . 80"],
            format!("goto svc-{id}")
        );
        assert_eq!(r.maps[NODEPORTS]["tcp . 30002"], format!("goto ext-{id}"));
        let svc = &r.chains[&format!("svc-{id}")];
        assert_eq!(svc[0], "ip saddr != 198.18.0.0/16 jump mark-masq");
        assert!(svc[1].starts_with("numgen inc mod 2 vmap { 0 : goto ep-"));
        assert_eq!(r.chains[&format!("ext-{id}")][0], "jump mark-masq");
        let ep = &r.chains[&format!("ep-{id}-c6120102-1f90")];
        assert_eq!(ep[0], "ip saddr 198.18.1.2 jump mark-masq");
        assert_eq!(ep[1], "meta l4proto tcp dnat to 198.18.1.2:8080");
        assert!(!r.maps.contains_key(BACKENDS));

        let mut v = vs(&[("198.18.1.2", 8080)]);
        v.affinity = Some(60);
        v.external_local = true;
        v.external_backends.clear();
        let id = super::id(&v);
        let r = render(&v, None);
        let h = "c6120102-1f90";
        assert_eq!(r.sets[&format!("aff-{id}-{h}-60")], 60);
        let svc = &r.chains[&format!("svc-{id}")];
        assert_eq!(
            svc[0],
            format!("ip saddr @aff-{id}-{h}-60 goto ep-{id}-{h}")
        );
        assert!(svc[1].starts_with("numgen random mod 1"));
        // Local policy without a local endpoint: dropped, not masqueraded.
        assert_eq!(r.chains[&format!("ext-{id}")], ["drop"]);
        assert!(r.chains[&format!("ep-{id}-{h}")][1].starts_with("update @aff-"));
    }

    #[test]
    fn a_service_without_endpoints_rejects() {
        let v = vs(&[]);
        let r = render(&v, None);
        assert!(r.chains.is_empty());
        assert_eq!(r.maps[NO_EP]["198.19.0.10 . tcp . 80"], "");
        assert_eq!(r.maps[NO_EP_NODEPORTS]["tcp . 30002"], "");
        assert!(!r.maps.contains_key(VIPS) && !r.maps.contains_key(BACKENDS));
    }

    #[test]
    fn one_endpoint_change_is_one_element() {
        let a = render(&vs(&[("198.18.1.2", 8080), ("198.18.2.2", 8080)]), None);
        let b = render(&vs(&[("198.18.1.2", 8080), ("198.18.2.3", 8080)]), None);
        let mut p = Plan::default();
        p.add(&a, &b);
        assert_eq!(
            p.commands(),
            [
                "delete element ip orc-svc backends { 198.19.0.10 . tcp . 80 . 360-719 }",
                "delete element ip orc-svc nodeport-backends { tcp . 30002 . 360-719 }",
                "add element ip orc-svc backends { 198.19.0.10 . tcp . 80 . 360-719 : 198.18.2.3 . 8080 }",
                "add element ip orc-svc nodeport-backends { tcp . 30002 . 360-719 : 198.18.2.3 . 8080 }",
            ]
        );
        // Nothing changes: nothing to do.
        let mut p = Plan::default();
        p.add(&b, &b);
        assert!(p.is_empty());
    }

    #[test]
    fn one_endpoint_change_touches_only_its_chains() {
        let rr = |b: &[(&str, u16)]| {
            let mut v = vs(b);
            v.scheduler = Scheduler::RoundRobin;
            v
        };
        let a = render(&rr(&[("198.18.1.2", 8080), ("198.18.2.2", 8080)]), None);
        let b = render(&rr(&[("198.18.1.2", 8080), ("198.18.2.3", 8080)]), None);
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
    }

    #[test]
    fn losing_the_last_endpoint_moves_the_service_to_reject() {
        let a = render(&vs(&[("198.18.1.2", 8080)]), None);
        let b = render(&vs(&[]), None);
        let mut p = Plan::default();
        p.add(&a, &b);
        let s = p.script();
        assert!(s.contains("delete element ip orc-svc backends { 198.19.0.10 . tcp . 80 . 0-719 }"));
        assert!(s.contains("add element ip orc-svc no-endpoints { 198.19.0.10 . tcp . 80 }"));
    }

    #[test]
    fn entry_points_are_the_same_on_both_paths() {
        let map = render(&vs(&[("198.18.1.2", 8080)]), None).entries();
        let mut v = vs(&[("198.18.1.2", 8080)]);
        v.scheduler = Scheduler::RoundRobin;
        let chain = render(&v, None).entries();
        let none = render(&vs(&[]), None).entries();
        let want: BTreeSet<String> = ["vip:198.19.0.10 . tcp . 80", "np:tcp . 30002"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(map, want);
        assert_eq!(chain, want);
        assert_eq!(none, want);
    }

    #[test]
    fn full_sync_replaces_the_table_atomically() {
        let r = render(&vs(&[("198.18.1.2", 8080)]), None);
        let s = full(&r, None);
        assert!(
            s.starts_with("add table ip orc-svc\ndelete table ip orc-svc\nadd table ip orc-svc\n")
        );
        assert!(s.contains("add element ip orc-svc backends { 198.19.0.10 . tcp . 80 . 0-719 : 198.18.1.2 . 8080 }"));
        assert!(s.contains("add element ip orc-svc hairpin { 198.18.1.2 . 198.18.1.2 }"));
    }
}
