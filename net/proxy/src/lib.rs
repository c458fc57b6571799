//! orc-proxy: the Service data path of a node, IPVS-style balancing in
//! nftables. `model` turns a Service and its EndpointSlices into virtual
//! servers (pure), `rules` turns virtual servers into nftables objects and
//! the transactions between two states (pure), and `Proxy` applies them as
//! one nftables transaction per batch of changes (through `libnft`, one
//! libnftables context kept open; `nft -f -` without it): incremental per
//! Service, whole-table at start and on every resync. It owns the table
//! `ip orc-svc` and nothing else; it must not depend on the API server, the
//! agent or any network I/O beyond nftables' netlink and the `bpf(2)` calls
//! of `socklb`.
//!
//! With a [`socklb::SockLb`] (`Proxy::with_socket_lb`), TCP connections
//! from the node's pods to a ClusterIP are also balanced when the socket
//! connects (`socklb`), so they never go through the NAT rules; the rules
//! stay for every other path and as the fallback.
//!
//! The kernel here has no IPVS. An IPVS backend would plug in at `Proxy`:
//! each `VirtualServer` is an IPVS virtual service (ClusterIP, external and
//! node addresses with the port; scheduler `rr` or a random one; persistence
//! for sessionAffinity) and each `Backend` a real server, added and removed
//! through the `ip_vs` generic-netlink family instead of nftables chains,
//! with the VIPs on a dummy interface and the masquerade rules kept here.
pub mod libnft;
pub mod model;
pub mod rules;
pub mod socklb;

pub use model::{virtual_servers, Backend, Scheduler, VirtualServer};
pub use rules::{Plan, Ruleset, TABLE};

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nft (apt-get install nftables): {0}")]
    Spawn(std::io::Error),
    #[error("nft: {0}")]
    Nft(String),
}

/// Run one nftables transaction (`nft -f -`).
pub fn nft(input: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::Spawn)?;
    let wrote = child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes());
    let out = child.wait_with_output().map_err(Error::Spawn)?;
    if !out.status.success() {
        return Err(Error::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    wrote.map_err(Error::Spawn)
}

/// The Service proxy of one node: what the kernel holds, per Service.
pub struct Proxy {
    cluster_cidr: Option<String>,
    applied: BTreeMap<String, Ruleset>,
    /// How many Services hold each hairpin pair.
    hairpin: BTreeMap<std::net::Ipv4Addr, usize>,
    /// Entry point -> the Service that holds it (`Ruleset::entries`).
    claims: BTreeMap<String, String>,
    /// Set when the kernel may differ from `applied` (a failed transaction).
    dirty: bool,
    /// The connect-time balancer and what its map holds, per Service.
    lb: Option<socklb::SockLb>,
    lb_applied: BTreeMap<String, BTreeMap<socklb::Key, Vec<u8>>>,
    /// The libnftables context transactions go through, opened at the
    /// first one (in the namespace of the thread that makes it); None
    /// before, or when libnftables is missing (then `nft -f -` runs).
    lib: Option<libnft::Nft>,
    lib_tried: bool,
}

impl Proxy {
    pub fn new(cluster_cidr: Option<String>) -> Self {
        Proxy {
            cluster_cidr,
            applied: BTreeMap::new(),
            hairpin: BTreeMap::new(),
            claims: BTreeMap::new(),
            dirty: true,
            lb: None,
            lb_applied: BTreeMap::new(),
            lib: None,
            lib_tried: false,
        }
    }

    /// Run one transaction: through libnftables when it is there.
    fn nft(&mut self, script: &str) -> Result<(), Error> {
        if !self.lib_tried {
            self.lib_tried = true;
            self.lib = libnft::Nft::open();
            if self.lib.is_none() {
                tracing::warn!("libnftables.so.1 not found: each change runs nft");
            }
        }
        match &mut self.lib {
            Some(l) => l.run(script).map_err(Error::Nft),
            None => nft(script),
        }
    }

    /// Also balance pods' TCP connections to ClusterIPs at connect time.
    pub fn with_socket_lb(mut self, lb: socklb::SockLb) -> Self {
        self.lb = Some(lb);
        self
    }

    /// Bring the balancer's entries of Service `key` to those of `servers`
    /// (none when the Service got no rules). A failed update removes the
    /// entry, so the connection takes the nftables rules instead of a stale
    /// endpoint.
    fn sync_lb(&mut self, key: &str, servers: &[VirtualServer], has_rules: bool) {
        let Some(lb) = &self.lb else { return };
        let new: BTreeMap<socklb::Key, Vec<u8>> = if has_rules {
            servers.iter().filter_map(socklb::entry).collect()
        } else {
            BTreeMap::new()
        };
        let old = self.lb_applied.remove(key).unwrap_or_default();
        for k in old.keys().filter(|k| !new.contains_key(*k)) {
            if let Err(e) = lb.remove(k) {
                tracing::warn!("service {key}: socket balancer: {e}");
            }
        }
        let mut held = BTreeMap::new();
        for (k, v) in new {
            if old.get(&k) == Some(&v) {
                held.insert(k, v);
                continue;
            }
            match lb.set(&k, &v) {
                Ok(()) => {
                    held.insert(k, v);
                }
                Err(e) => {
                    tracing::warn!("service {key}: socket balancer: {e}; nftables serves it");
                    let _ = lb.remove(&k);
                }
            }
        }
        if !held.is_empty() {
            self.lb_applied.insert(key.to_string(), held);
        }
    }

    fn render(&self, servers: &[VirtualServer]) -> Ruleset {
        let mut r = Ruleset::default();
        for vs in servers {
            r.extend(rules::render(vs, self.cluster_cidr.as_deref()));
        }
        r
    }

    /// The rules of Service `key`, unless another Service holds one of its
    /// entry points (two Services with the same external IP and port):
    /// then it gets none, and the table stays valid for everyone else.
    fn claim(&mut self, key: &str, servers: &[VirtualServer]) -> Ruleset {
        self.claims.retain(|_, k| k != key);
        let r = self.render(servers);
        let entries = r.entries();
        if let Some((e, other)) = entries
            .iter()
            .find_map(|e| self.claims.get(e).map(|o| (e, o)))
        {
            tracing::warn!("service {key}: {e} belongs to service {other}; {key} gets no rules");
            return Ruleset::default();
        }
        for e in entries {
            self.claims.insert(e, key.to_string());
        }
        r
    }

    /// Bring the given Services (`namespace/name` -> virtual servers; an
    /// empty list for a Service that is gone) up to date in one transaction.
    /// Returns the number of nft commands run. After a failure the next
    /// call rewrites the whole table.
    pub fn update(&mut self, changed: Vec<(String, Vec<VirtualServer>)>) -> Result<usize, Error> {
        let mut plan = Plan::default();
        let mut next = Vec::new();
        for (key, servers) in changed {
            let new = self.claim(&key, &servers);
            let old = self.applied.get(&key).cloned().unwrap_or_default();
            plan.add(&old, &new);
            let (mut up, mut down) = (Vec::new(), Vec::new());
            for ip in new.hairpin.difference(&old.hairpin) {
                let c = self.hairpin.entry(*ip).or_default();
                *c += 1;
                if *c == 1 {
                    up.push(*ip);
                }
            }
            for ip in old.hairpin.difference(&new.hairpin) {
                if let Some(c) = self.hairpin.get_mut(ip) {
                    *c -= 1;
                    if *c == 0 {
                        self.hairpin.remove(ip);
                        down.push(*ip);
                    }
                }
            }
            plan.hairpin(&up, &down);
            self.sync_lb(&key, &servers, !new.is_empty());
            next.push((key, new));
        }
        for (key, new) in next {
            if new.is_empty() {
                self.applied.remove(&key);
            } else {
                self.applied.insert(key, new);
            }
        }
        if self.dirty {
            return self.write_all();
        }
        let cmds = plan.commands();
        if cmds.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.nft(&plan.script()) {
            self.dirty = true;
            tracing::warn!("service rules: {e}; rewriting the table");
            return self.write_all();
        }
        Ok(cmds.len())
    }

    /// Replace everything (start and periodic resync): `all` is every
    /// Service of the cluster.
    pub fn resync(&mut self, all: Vec<(String, Vec<VirtualServer>)>) -> Result<usize, Error> {
        self.claims.clear();
        let mut all = all;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut applied = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for (k, s) in all {
            let r = self.claim(&k, &s);
            self.sync_lb(&k, &s, !r.is_empty());
            seen.insert(k.clone());
            if !r.is_empty() {
                applied.insert(k, r);
            }
        }
        let gone: Vec<String> = self
            .lb_applied
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.sync_lb(&k, &[], false);
        }
        self.applied = applied;
        self.hairpin.clear();
        for r in self.applied.values() {
            for ip in &r.hairpin {
                *self.hairpin.entry(*ip).or_default() += 1;
            }
        }
        self.write_all()
    }

    fn write_all(&mut self) -> Result<usize, Error> {
        let mut all = Ruleset::default();
        for r in self.applied.values() {
            all.extend(r.clone());
        }
        let script = rules::full(&all, self.cluster_cidr.as_deref());
        self.nft(&script)?;
        self.dirty = false;
        Ok(script.lines().count())
    }

    /// Number of Services with rules.
    pub fn services(&self) -> usize {
        self.applied.len()
    }
}

/// Remove the table (a node reset).
pub fn remove() {
    let _ = nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"));
}
