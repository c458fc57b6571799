//! LoadBalancer addresses, as MetalLB or k3s' ServiceLB hand them out: each
//! Service of type LoadBalancer gets one address of the pool (the masters'
//! `--load-balancer-pool`) in `status.loadBalancer.ingress`; nodes with a
//! ready endpoint announce it. A Service that stops being a LoadBalancer
//! gives its address back.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Parse a pool: `A.B.C.D/N` or `FIRST-LAST`, comma-separated.
pub fn parse_pool(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--load-balancer-pool: \"{part}\" is not a CIDR or FIRST-LAST range");
        let (first, last) = if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
            (u32::from(a), u32::from(b))
        } else {
            let (base, bits) = crate::nodes::parse_cidr(part).ok_or_else(bad)?;
            let size = 1u64 << (32 - bits as u64);
            if size <= 2 {
                (base, base + size as u32 - 1)
            } else {
                // Leave out the network and broadcast addresses.
                (base + 1, base + size as u32 - 2)
            }
        };
        if last < first || last - first > 65_536 {
            return Err(bad());
        }
        out.extend((first..=last).map(Ipv4Addr::from));
    }
    Ok(out)
}

fn ingress_ips(svc: &Value) -> Vec<Ipv4Addr> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str()?.parse().ok())
        .collect()
}

/// The address `svc` should hold (pure): the one it has, the one it asks for
/// (`spec.loadBalancerIP`) if free, else the first free one of the pool.
pub fn choose(svc: &Value, pool: &[Ipv4Addr], used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    if let Some(ip) = ingress_ips(svc).into_iter().find(|ip| pool.contains(ip)) {
        return Some(ip);
    }
    if let Some(ip) = svc["spec"]["loadBalancerIP"]
        .as_str()
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
    {
        return (pool.contains(&ip) && !used.contains(&ip)).then_some(ip);
    }
    pool.iter().find(|ip| !used.contains(ip)).copied()
}

pub struct LoadBalancers;

impl LoadBalancers {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(svc) = ctx.store.get("services", key) else {
            return Ok(None);
        };
        let is_lb = svc["spec"]["type"] == "LoadBalancer" && !util::deleting(&svc);
        let have = ingress_ips(&svc);
        let want: Vec<Ipv4Addr> = if is_lb {
            let used: BTreeSet<Ipv4Addr> = ctx
                .store
                .list("services")
                .iter()
                .filter(|s| crate::store::key_of(s) != key)
                .flat_map(|s| ingress_ips(s))
                .collect();
            match choose(&svc, &ctx.settings.lb_pool, &used) {
                Some(ip) => vec![ip],
                None => {
                    if !ctx.settings.lb_pool.is_empty() && have.is_empty() {
                        ctx.event(
                            &svc,
                            "Warning",
                            "AllocationFailed",
                            "no address of the load-balancer pool is free".into(),
                        );
                    }
                    return Ok(None);
                }
            }
        } else {
            vec![]
        };
        if want == have {
            return Ok(None);
        }
        let mut s = (*svc).clone();
        s["status"]["loadBalancer"] = if want.is_empty() {
            json!({})
        } else {
            json!({"ingress": want.iter().map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"})).collect::<Vec<_>>()})
        };
        ctx.update_status(s).await?;
        Ok(None)
    }
}

impl Reconciler for LoadBalancers {
    fn name(&self) -> &'static str {
        "service-lb-controller"
    }

    fn keys_for(&self, _ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "services" => vec![ch.key.clone()],
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        if ctx.settings.lb_pool.is_empty() {
            return Vec::new();
        }
        ctx.store.keys("services")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }

    /// One at a time: two Services must not take the same free address.
    fn batch_size(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_choices() {
        let pool = parse_pool("198.18.252.0/30, 198.18.252.10-198.18.252.11").unwrap();
        let p: Vec<String> = pool.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            p,
            [
                "198.18.252.1",
                "198.18.252.2",
                "198.18.252.10",
                "198.18.252.11"
            ]
        );
        assert!(parse_pool("nope").unwrap_err().contains("\"nope\""));
        let svc = json!({"spec": {"type": "LoadBalancer"}});
        let mut used = BTreeSet::new();
        assert_eq!(choose(&svc, &pool, &used), Some(pool[0]));
        used.insert(pool[0]);
        assert_eq!(choose(&svc, &pool, &used), Some(pool[1]));
        // A Service keeps what it has; asks for a free address and gets it.
        let has =
            json!({"spec": {}, "status": {"loadBalancer": {"ingress": [{"ip": "198.18.252.10"}]}}});
        assert_eq!(choose(&has, &pool, &used), Some(pool[2]));
        let asks = json!({"spec": {"loadBalancerIP": "198.18.252.11"}});
        assert_eq!(choose(&asks, &pool, &used), Some(pool[3]));
        let asks_taken = json!({"spec": {"loadBalancerIP": "198.18.252.1"}});
        assert_eq!(choose(&asks_taken, &pool, &used), None);
        let all: BTreeSet<Ipv4Addr> = pool.iter().copied().collect();
        assert_eq!(choose(&svc, &pool, &all), None);
    }
}
