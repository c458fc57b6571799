//! The node's Service proxy: Services and EndpointSlices from the watch
//! cache, turned into virtual servers (`orc_proxy::model`) and programmed
//! into nftables by `orc_proxy::Proxy`: the whole table at start and every
//! `resync`, then one transaction per batch of changes, touching only the
//! Services that changed.
use crate::informer::{key_of, Cache};
use orc_controllers::endpoints::SERVICE_NAME_LABEL;
use orc_controllers::util;
use orc_proxy::{virtual_servers, Proxy, VirtualServer};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

pub const SERVICES: &str = "services";
pub const SLICES: &str = "endpointslices";

/// EndpointSlices by the Service they belong to.
#[derive(Default)]
pub(crate) struct Index {
    pub by_service: HashMap<String, BTreeSet<String>>,
    owner: HashMap<String, String>,
}

impl Index {
    fn slice_owner(slice: &serde_json::Value) -> Option<String> {
        let svc = util::labels(slice).remove(SERVICE_NAME_LABEL)?;
        Some(format!("{}/{svc}", util::namespace(slice)))
    }

    /// Note a slice's (new) state; returns the Services it moved between.
    pub fn update(&mut self, key: &str, slice: Option<&serde_json::Value>) -> Vec<String> {
        let mut touched = Vec::new();
        if let Some(old) = self.owner.remove(key) {
            if let Some(s) = self.by_service.get_mut(&old) {
                s.remove(key);
                if s.is_empty() {
                    self.by_service.remove(&old);
                }
            }
            touched.push(old);
        }
        if let Some(svc) = slice.and_then(Self::slice_owner) {
            self.by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.to_string());
            self.owner.insert(key.to_string(), svc.clone());
            touched.push(svc);
        }
        touched
    }

    pub fn rebuild(cache: &Cache) -> Self {
        let mut i = Index::default();
        for s in cache.list(SLICES) {
            i.update(&key_of(&s), Some(&s));
        }
        i
    }

    /// The Service `key` and its slices, from the cache.
    pub fn service(
        &self,
        cache: &Cache,
        key: &str,
    ) -> Option<(Arc<serde_json::Value>, Vec<Arc<serde_json::Value>>)> {
        let svc = cache.get(SERVICES, key)?;
        let slices = self
            .by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| cache.get(SLICES, k))
            .collect();
        Some((svc, slices))
    }
}

fn servers_of(cache: &Cache, idx: &Index, key: &str, node: &str) -> Vec<VirtualServer> {
    let Some((svc, slices)) = idx.service(cache, key) else {
        return Vec::new();
    };
    let refs: Vec<&serde_json::Value> = slices.iter().map(|s| s.as_ref()).collect();
    virtual_servers(&svc, &refs, node)
}

/// Run the proxy until the task is dropped. `cache` must watch Services and
/// EndpointSlices.
pub async fn run(
    cache: Arc<Cache>,
    node: String,
    cluster_cidr: Option<String>,
    resync: Duration,
    lb: Option<orc_proxy::socklb::SockLb>,
) {
    let mut rx = cache.subscribe();
    cache.wait_synced(2).await;
    let mut proxy = Proxy::new(cluster_cidr);
    if let Some(lb) = lb {
        proxy = proxy.with_socket_lb(lb);
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
    // Each round starts with the whole table; it ends when a resync is due
    // or the change stream lagged.
    loop {
        let mut idx = Index::rebuild(&cache);
        {
            let all: Vec<(String, Vec<VirtualServer>)> = cache
                .list(SERVICES)
                .iter()
                .map(|s| {
                    let k = key_of(s);
                    let v = servers_of(&cache, &idx, &k, &node);
                    (k, v)
                })
                .collect();
            match proxy.resync(all) {
                Ok(n) => tracing::info!(
                    "service rules written: {} services, {n} commands",
                    proxy.services()
                ),
                Err(e) => tracing::error!("service rules: {e}"),
            }
        }
        loop {
            let first = tokio::select! {
                r = rx.recv() => r,
                _ = tick.tick() => break,
            };
            // Everything already announced goes into the same transaction.
            let Some(dirty) = batch(first, &mut rx, &cache, &mut idx) else {
                break;
            };
            let changed: Vec<(String, Vec<VirtualServer>)> = dirty
                .into_iter()
                .map(|k| {
                    let v = servers_of(&cache, &idx, &k, &node);
                    (k, v)
                })
                .collect();
            if let Err(e) = proxy.update(changed) {
                tracing::error!("service rules: {e}");
            }
        }
    }
}

/// The Services touched by the change `first` and by every change already
/// announced after it; None when the receiver lagged or closed (the
/// caller starts over from the whole cache).
pub(crate) fn batch(
    first: Result<(&'static str, String), RecvError>,
    rx: &mut tokio::sync::broadcast::Receiver<(&'static str, String)>,
    cache: &Cache,
    idx: &mut Index,
) -> Option<BTreeSet<String>> {
    let mut dirty = BTreeSet::new();
    let mut next = Some(first.ok()?);
    while let Some((resource, k)) = next {
        match resource {
            SERVICES => {
                dirty.insert(k);
            }
            SLICES => {
                let s = cache.get(SLICES, &k);
                dirty.extend(idx.update(&k, s.as_deref()));
            }
            _ => {}
        }
        next = match rx.try_recv() {
            Ok(k) => Some(k),
            Err(TryRecvError::Empty) => None,
            Err(_) => return None,
        };
    }
    Some(dirty)
}

/// The LoadBalancer addresses node `node` announces (pure): for each
/// LoadBalancer Service, the first (by name) of the nodes with a ready
/// endpoint takes its addresses, as MetalLB's layer-2 mode elects one
/// speaker per address.
pub fn announced(
    services: &[Arc<serde_json::Value>],
    slices_of: impl Fn(&str) -> Vec<Arc<serde_json::Value>>,
    node: &str,
) -> (BTreeSet<std::net::Ipv4Addr>, BTreeSet<std::net::Ipv4Addr>) {
    let mut mine = BTreeSet::new();
    let mut all = BTreeSet::new();
    for svc in services {
        if svc["spec"]["type"] != "LoadBalancer" {
            continue;
        }
        let ips: Vec<std::net::Ipv4Addr> = svc["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["ip"].as_str()?.parse().ok())
            .collect();
        all.extend(ips.iter().copied());
        let nodes: BTreeSet<String> = slices_of(&key_of(svc))
            .iter()
            .flat_map(|s| {
                s["endpoints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e["conditions"]["ready"] != false)
                    .filter_map(|e| e["nodeName"].as_str().map(String::from))
            })
            .collect();
        if nodes.iter().next().map(String::as_str) == Some(node) {
            mine.extend(ips);
        }
    }
    (mine, all)
}

/// Hold the LoadBalancer addresses this node announces on its own
/// interface (the kernel answers ARP for them), and only those.
pub async fn announce(
    cache: Arc<Cache>,
    host: rtnetlink::Handle,
    node: String,
    node_ip: std::net::Ipv4Addr,
) {
    let mut rx = cache.subscribe();
    cache.wait_synced(2).await;
    let is_lb = |k: &str| {
        cache
            .get(SERVICES, k)
            .is_some_and(|s| s["spec"]["type"] == "LoadBalancer")
    };
    let mut added: BTreeSet<std::net::Ipv4Addr> = BTreeSet::new();
    // Work only when a LoadBalancer Service or its slices change; the
    // interface is checked again now and then (someone may remove an address).
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut idx = Index::rebuild(&cache);
    let mut lbs: BTreeSet<String> = cache
        .list(SERVICES)
        .iter()
        .map(|s| key_of(s))
        .filter(|k| is_lb(k))
        .collect();
    loop {
        tokio::select! {
            r = rx.recv() => match batch(r, &mut rx, &cache, &mut idx) {
                Some(dirty) => {
                    let mut touched = false;
                    for k in dirty {
                        touched |= lbs.remove(&k);
                        if is_lb(&k) {
                            lbs.insert(k);
                            touched = true;
                        }
                    }
                    if !touched {
                        continue;
                    }
                }
                None => {
                    idx = Index::rebuild(&cache);
                    lbs = cache.list(SERVICES).iter().map(|s| key_of(s)).filter(|k| is_lb(k)).collect();
                }
            },
            _ = tick.tick() => {}
        }
        let Ok(Some(ifindex)) = orc_netlink::interface_of(&host, node_ip).await else {
            continue;
        };
        let services: Vec<Arc<serde_json::Value>> =
            lbs.iter().filter_map(|k| cache.get(SERVICES, k)).collect();
        let (mine, all) = announced(
            &services,
            |k| idx.service(&cache, k).map(|(_, s)| s).unwrap_or_default(),
            &node,
        );
        let have: BTreeSet<std::net::Ipv4Addr> = orc_netlink::host_addresses(&host, ifindex)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|ip| *ip != node_ip)
            .collect();
        for ip in mine.difference(&have) {
            match orc_netlink::add_host_address(&host, ifindex, *ip).await {
                Ok(()) => {
                    tracing::info!("announcing load-balancer address {ip}");
                    added.insert(*ip);
                }
                Err(e) => tracing::warn!("load-balancer address {ip}: {e}"),
            }
        }
        for ip in have.iter() {
            if !mine.contains(ip) && (all.contains(ip) || added.contains(ip)) {
                if let Err(e) = orc_netlink::del_host_address(&host, ifindex, *ip).await {
                    tracing::warn!("load-balancer address {ip}: {e}");
                } else {
                    tracing::info!("no longer announcing {ip}");
                    added.remove(ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(ns: &str, name: &str, svc: &str, nodes: &[(&str, bool)]) -> serde_json::Value {
        let eps: Vec<serde_json::Value> = nodes
            .iter()
            .enumerate()
            .map(|(i, (n, ready))| json!({"addresses": [format!("198.18.1.{}", i + 2)], "nodeName": n, "conditions": {"ready": ready}}))
            .collect();
        json!({"metadata": {"namespace": ns, "name": name, "labels": {SERVICE_NAME_LABEL: svc}}, "endpoints": eps})
    }

    #[test]
    fn slices_are_indexed_by_their_service_and_move_with_it() {
        let mut i = Index::default();
        let s = slice("demo", "web-a", "web", &[]);
        assert_eq!(i.update("demo/web-a", Some(&s)), ["demo/web"]);
        assert!(i.by_service["demo/web"].contains("demo/web-a"));
        // Relabelled to another Service: both are touched.
        let s2 = slice("demo", "web-a", "api", &[]);
        assert_eq!(i.update("demo/web-a", Some(&s2)), ["demo/web", "demo/api"]);
        assert!(!i.by_service.contains_key("demo/web"));
        assert_eq!(i.update("demo/web-a", None), ["demo/api"]);
        assert!(i.by_service.is_empty());
    }

    #[test]
    fn the_first_node_with_a_ready_endpoint_announces() {
        let svc = Arc::new(json!({"metadata": {"namespace": "demo", "name": "lb"},
            "spec": {"type": "LoadBalancer"},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.18.253.200"}]}}}));
        let plain = Arc::new(json!({"metadata": {"namespace": "demo", "name": "web"},
            "spec": {"type": "ClusterIP"}}));
        let slices = |nodes: Vec<(&'static str, bool)>| {
            move |k: &str| {
                assert_eq!(k, "demo/lb");
                vec![Arc::new(slice("demo", "lb-x", "lb", &nodes))]
            }
        };
        let all = [svc.clone(), plain];
        let ip: std::net::Ipv4Addr = "198.18.253.200".parse().unwrap();
        let (mine, every) = announced(&all, slices(vec![("n2", true), ("n1", false)]), "n2");
        assert!(mine.contains(&ip) && every.contains(&ip));
        // n1 is first by name once it is ready.
        let (mine, _) = announced(&all, slices(vec![("n2", true), ("n1", true)]), "n2");
        assert!(mine.is_empty());
        let (mine, _) = announced(&all, slices(vec![("n2", true), ("n1", true)]), "n1");
        assert!(mine.contains(&ip));
        // No ready endpoint: nobody.
        let (mine, every) = announced(&all, slices(vec![("n1", false)]), "n1");
        assert!(mine.is_empty() && every.contains(&ip));
    }
}
