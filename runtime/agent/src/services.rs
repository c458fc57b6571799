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
pub async fn run(cache: Arc<Cache>, node: String, cluster_cidr: Option<String>, resync: Duration) {
    let mut rx = cache.subscribe();
    cache.wait_synced(2).await;
    let mut proxy = Proxy::new(cluster_cidr);
    let mut idx = Index::default();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
    let mut full = true;
    loop {
        if full {
            idx = Index::rebuild(&cache);
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
            full = false;
        }
        loop {
            let first = tokio::select! {
                r = rx.recv() => r,
                _ = tick.tick() => { full = true; break; }
            };
            let mut dirty = BTreeSet::new();
            let mut note = |r: Result<(&'static str, String), RecvError>,
                            full: &mut bool,
                            idx: &mut Index| match r {
                Ok((SERVICES, k)) => {
                    dirty.insert(k);
                }
                Ok((SLICES, k)) => {
                    let s = cache.get(SLICES, &k);
                    dirty.extend(idx.update(&k, s.as_deref()));
                }
                Ok(_) => {}
                Err(_) => *full = true,
            };
            note(first, &mut full, &mut idx);
            // Everything already announced goes into the same transaction.
            loop {
                match rx.try_recv() {
                    Ok(k) => note(Ok(k), &mut full, &mut idx),
                    Err(TryRecvError::Lagged(_)) => full = true,
                    Err(_) => break,
                }
            }
            if full {
                break;
            }
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
    cache.wait_synced(2).await;
    let mut added: BTreeSet<std::net::Ipv4Addr> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Ok(Some(ifindex)) = orc_netlink::interface_of(&host, node_ip).await else {
            continue;
        };
        let idx = Index::rebuild(&cache);
        let (mine, all) = announced(
            &cache.list(SERVICES),
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
