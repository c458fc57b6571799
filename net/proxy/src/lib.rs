//! orc-proxy: the Service data path of a node, IPVS-style balancing in
//! nftables. `model` turns a Service and its EndpointSlices into virtual
//! servers (pure), `rules` turns virtual servers into nftables objects and
//! the transactions between two states (pure), and `Proxy` applies them with
//! one `nft -f -` transaction per batch of changes: incremental per Service,
//! whole-table at start and on every resync. It owns the table `ip orc-svc`
//! and nothing else; it must not depend on the API server, the agent or any
//! network I/O beyond running `nft`.
//!
//! The kernel here has no IPVS. An IPVS backend would plug in at `Proxy`:
//! each `VirtualServer` is an IPVS virtual service (ClusterIP, external and
//! node addresses with the port; scheduler `rr` or a random one; persistence
//! for sessionAffinity) and each `Backend` a real server, added and removed
//! through the `ip_vs` generic-netlink family instead of nftables chains,
//! with the VIPs on a dummy interface and the masquerade rules kept here.
pub mod model;
pub mod rules;

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
}

impl Proxy {
    pub fn new(cluster_cidr: Option<String>) -> Self {
        Proxy {
            cluster_cidr,
            applied: BTreeMap::new(),
            hairpin: BTreeMap::new(),
            claims: BTreeMap::new(),
            dirty: true,
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
        if let Err(e) = nft(&plan.script()) {
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
        self.applied = all
            .into_iter()
            .map(|(k, s)| {
                let r = self.claim(&k, &s);
                (k, r)
            })
            .filter(|(_, r)| !r.is_empty())
            .collect();
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
        nft(&script)?;
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
