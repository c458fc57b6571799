//! Node lifecycle and IPAM: a Node whose Lease has not been renewed within the
//! grace period turns Ready=Unknown and gets the `unreachable` taints; pods on
//! a node with NoExecute taints are evicted once their tolerations run out;
//! pods of a deleted node are removed; each node gets a podCIDR.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::scheduler::{tolerates, tolerations};
use crate::store::Change;
use crate::util;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// `a.b.c.d/n`
pub fn parse_cidr(s: &str) -> Option<(u32, u8)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok().filter(|b| *b <= 32)?;
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    Some((u32::from(ip) & mask, bits))
}

/// The first `/mask` subnet of `cluster` not in `used`.
pub fn next_cidr(cluster: &str, mask: u8, used: &HashSet<String>) -> Option<String> {
    let (base, bits) = parse_cidr(cluster)?;
    if mask < bits || mask > 32 {
        return None;
    }
    let count = 1u64 << (mask - bits);
    let step = 1u64 << (32 - mask);
    (0..count)
        .map(|i| format!("{}/{mask}", Ipv4Addr::from((base as u64 + i * step) as u32)))
        .find(|c| !used.contains(c))
}

/// When the pod must leave a node with these taints (seconds since the epoch):
/// None when it tolerates them forever, 0 when at once.
pub fn eviction_time(pod: &Value, taints: &[Value]) -> Option<f64> {
    let mut at: Option<f64> = None;
    for taint in taints.iter().filter(|t| t["effect"] == "NoExecute") {
        let matching: Vec<&Value> = tolerations(pod)
            .iter()
            .filter(|t| tolerates(t, taint))
            .collect();
        let when = if matching.is_empty() {
            Some(0.0)
        } else {
            let secs = matching
                .iter()
                .filter_map(|t| t["tolerationSeconds"].as_i64())
                .min();
            let added = taint["timeAdded"]
                .as_str()
                .and_then(util::parse_time)
                .unwrap_or(0.0);
            // Tolerated for ever only when no matching toleration has a limit.
            secs.map(|s| added + s.max(0) as f64)
        };
        if let Some(w) = when {
            at = Some(at.map_or(w, |a: f64| a.min(w)));
        }
    }
    at
}

/// The node's last sign of life: its Lease, else its Ready heartbeat, else its creation.
pub fn last_heartbeat(node: &Value, lease: Option<&Value>) -> f64 {
    let lease_t = lease
        .and_then(|l| l["spec"]["renewTime"].as_str())
        .and_then(util::parse_time);
    let hb = util::condition(node, "Ready")
        .and_then(|c| c["lastHeartbeatTime"].as_str())
        .and_then(util::parse_time);
    let created = util::parse_time(util::creation(node));
    [lease_t, hb, created]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max)
}

/// The taints a node should carry given its state (only the ones this
/// controller owns: unreachable and not-ready).
pub fn wanted_taints(node: &Value, alive: bool) -> Vec<&'static str> {
    if !alive {
        return vec![UNREACHABLE];
    }
    match util::condition(node, "Ready").map(|c| c["status"].as_str().unwrap_or("")) {
        Some("True") => vec![],
        Some("False") => vec![NOT_READY],
        _ => vec![],
    }
}

/// A free podCIDR for node `name`, reserved in `assigned` (node -> CIDR) before
/// it is written: the other nodes of a batch are decided while that write is in
/// flight, and must not get the same one. `nodes` is the cache's view; what it
/// shows assigned (or nodes since gone) is forgotten from `assigned`.
pub fn reserve_cidr(
    assigned: &mut std::collections::HashMap<String, String>,
    nodes: &[Arc<Value>],
    name: &str,
    cluster: &str,
    mask: u8,
) -> Option<String> {
    let mut used: HashSet<String> = nodes
        .iter()
        .filter_map(|x| x["spec"]["podCIDR"].as_str().map(String::from))
        .collect();
    assigned.retain(|node, _| {
        nodes.iter().any(|x| {
            util::name(x) == node && x["spec"]["podCIDR"].as_str().is_none_or(str::is_empty)
        })
    });
    used.extend(
        assigned
            .iter()
            .filter(|(node, _)| *node != name)
            .map(|(_, c)| c.clone()),
    );
    let c = next_cidr(cluster, mask, &used)?;
    assigned.insert(name.to_string(), c.clone());
    Some(c)
}

/// Node lifecycle and IPAM. `assigned` holds the podCIDRs this controller
/// handed out that its cache may not show yet: nodes registering together
/// are decided in one batch, before the cache has the first one's update.
#[derive(Default)]
pub struct NodeLifecycle {
    assigned: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl NodeLifecycle {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let name = key.trim_start_matches('/');
        let Some(node) = ctx.store.get("nodes", key) else {
            // Gone: so are its pods (Kubernetes' pod GC), at once: no node
            // is left to stop them.
            for p in ctx.store.list("pods") {
                if p["spec"]["nodeName"] == name {
                    ctx.delete_with_grace("pods", &p, None, Some(0)).await?;
                }
            }
            return Ok(None);
        };
        let s = &ctx.settings;
        let now = util::now_secs();
        let mut n = (*node).clone();
        // IPAM.
        if n["spec"]["podCIDR"].as_str().is_none_or(str::is_empty) {
            let nodes = ctx.store.list("nodes");
            let picked = reserve_cidr(
                &mut self.assigned.lock().unwrap(),
                &nodes,
                name,
                &s.cluster_cidr,
                s.node_cidr_mask,
            );
            match picked {
                Some(c) => {
                    n["spec"]["podCIDR"] = json!(c);
                    n["spec"]["podCIDRs"] = json!([c]);
                    if let Err(e) = ctx.update(n).await {
                        self.assigned.lock().unwrap().remove(name);
                        return Err(e);
                    }
                    ctx.event(
                        &node,
                        "Normal",
                        "CIDRAssignmentSucceeded",
                        format!("Node {name} got podCIDR {c}"),
                    );
                    return Ok(Some(Duration::ZERO));
                }
                None => ctx.event(
                    &node,
                    "Warning",
                    "CIDRNotAvailable",
                    format!(
                        "no podCIDR of /{} is left in {}",
                        s.node_cidr_mask, s.cluster_cidr
                    ),
                ),
            }
        }
        let lease = ctx.store.get_ns("leases", LEASE_NAMESPACE, name);
        let elapsed = now - last_heartbeat(&node, lease.as_deref());
        let grace = s.node_grace.as_secs_f64();
        let alive = elapsed <= grace;
        if !alive && util::condition(&node, "Ready").is_none_or(|c| c["status"] != "Unknown") {
            let ts = util::rfc3339(now);
            util::set_condition(
                &mut n,
                "Ready",
                "Unknown",
                "NodeStatusUnknown",
                "Kubelet stopped posting node status.",
                &ts,
            );
            ctx.update_status(n.clone()).await?;
            ctx.event(
                &node,
                "Normal",
                "NodeNotReady",
                format!("Node {name} status is now: NodeNotReady"),
            );
            return Ok(Some(Duration::ZERO));
        }
        // Our taints: add what is wanted, remove what is not.
        let wanted = wanted_taints(&node, alive);
        let taints: Vec<Value> = node["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ours = |t: &Value| t["key"] == UNREACHABLE || t["key"] == NOT_READY;
        let mut next: Vec<Value> = taints
            .iter()
            .filter(|t| !ours(t) || wanted.iter().any(|w| t["key"] == *w))
            .cloned()
            .collect();
        for w in &wanted {
            for effect in ["NoSchedule", "NoExecute"] {
                if !next.iter().any(|t| t["key"] == *w && t["effect"] == effect) {
                    next.push(json!({"key": w, "effect": effect, "timeAdded": util::rfc3339(now)}));
                }
            }
        }
        if next != taints {
            let mut n = (*node).clone();
            n["spec"]["taints"] = json!(next);
            ctx.update(n).await?;
            return Ok(Some(Duration::ZERO));
        }
        // Eviction from NoExecute taints.
        let mut recheck = alive.then(|| Duration::from_secs_f64((grace - elapsed).max(0.0) + 0.2));
        if taints.iter().any(|t| t["effect"] == "NoExecute") {
            for p in ctx.store.list("pods") {
                if p["spec"]["nodeName"] != name || !util::pod_active(&p) {
                    continue;
                }
                match eviction_time(&p, &taints) {
                    Some(at) if at <= now => {
                        ctx.event(
                            &p,
                            "Normal",
                            "TaintManagerEviction",
                            format!(
                                "Marking for deletion Pod {}/{}",
                                util::namespace(&p),
                                util::name(&p)
                            ),
                        );
                        ctx.delete("pods", &p, None).await?;
                    }
                    Some(at) => {
                        let d = Duration::from_secs_f64(at - now + 0.1);
                        recheck = Some(recheck.map_or(d, |r| r.min(d)));
                    }
                    None => {}
                }
            }
        }
        Ok(recheck)
    }
}

impl Reconciler for NodeLifecycle {
    fn name(&self) -> &'static str {
        "node-lifecycle-controller"
    }

    fn keys_for(&self, _ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "nodes" => vec![ch.key.clone()],
            // A pod landing on a tainted node is judged too.
            "pods"
                if ch.event == orc_api::EventType::Added
                    || ch.old.as_ref().is_some_and(|o| {
                        o["spec"]["nodeName"] != ch.object["spec"]["nodeName"]
                    }) =>
            {
                ch.object["spec"]["nodeName"]
                    .as_str()
                    .map(|n| format!("/{n}"))
                    .into_iter()
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys("nodes")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes decided in one batch (neither one's podCIDR in the cache yet)
    /// get different ones; a node the cache shows with its CIDR frees the
    /// reservation, and a node's own reservation is offered to it again.
    #[test]
    fn nodes_registering_together_get_different_cidrs() {
        let node = |name: &str, cidr: Option<&str>| {
            Arc::new(json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr}}))
        };
        let mut assigned = std::collections::HashMap::new();
        let view = vec![node("node-1", None), node("node-2", None)];
        let a = reserve_cidr(&mut assigned, &view, "node-1", "198.18.0.0/17", 24).unwrap();
        let b = reserve_cidr(&mut assigned, &view, "node-2", "198.18.0.0/17", 24).unwrap();
        assert_ne!(a, b);
        // Asked again before the cache caught up, node-1 is offered its own.
        assert_eq!(
            reserve_cidr(&mut assigned, &view, "node-1", "198.18.0.0/17", 24).unwrap(),
            a
        );
        // Once the cache shows both, a third node gets a third CIDR.
        let later = vec![
            node("node-1", Some(&a)),
            node("node-2", Some(&b)),
            node("node-3", None),
        ];
        let c = reserve_cidr(&mut assigned, &later, "node-3", "198.18.0.0/17", 24).unwrap();
        assert!(c != a && c != b);
        assert_eq!(assigned.len(), 1, "{assigned:?}");
    }

    #[test]
    fn cidrs() {
        let mut used = HashSet::new();
        assert_eq!(
            next_cidr("198.18.0.0/16", 24, &used).unwrap(),
            "198.18.0.0/24"
        );
        used.insert("198.18.0.0/24".to_string());
        assert_eq!(
            next_cidr("198.18.0.0/16", 24, &used).unwrap(),
            "198.18.1.0/24"
        );
        assert_eq!(
            next_cidr(
                "198.18.0.0/23",
                24,
                &["198.18.0.0/24".to_string(), "198.18.1.0/24".to_string()].into()
            ),
            None
        );
        assert_eq!(
            next_cidr("198.18.0.0/16", 26, &used).unwrap(),
            "198.18.0.0/26"
        );
    }

    #[test]
    fn evictions_follow_tolerations() {
        let taints = vec![
            json!({"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": "2020-01-01T00:00:00Z"}),
        ];
        let t0 = util::parse_time("2020-01-01T00:00:00Z").unwrap();
        let none = json!({"spec": {}});
        assert_eq!(eviction_time(&none, &taints), Some(0.0));
        let five = json!({"spec": {"tolerations": [{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]}});
        assert_eq!(eviction_time(&five, &taints), Some(t0 + 5.0));
        let forever = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        assert_eq!(eviction_time(&forever, &taints), None);
        assert_eq!(
            eviction_time(&none, &[json!({"key": "x", "effect": "NoSchedule"})]),
            None
        );
    }

    #[test]
    fn taints_follow_readiness() {
        let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(wanted_taints(&ready, true).is_empty());
        assert_eq!(wanted_taints(&ready, false), vec![UNREACHABLE]);
        let not = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
        assert_eq!(wanted_taints(&not, true), vec![NOT_READY]);
    }
}
