//! Endpoints and EndpointSlices: for each Service with a selector, the pods it
//! selects that have an IP, with their conditions (ready, serving,
//! terminating), named target ports resolved per pod, and
//! publishNotReadyAddresses honoured.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// A Service port's target resolved against one pod: a number, or a container
/// port name looked up in the pod (None when the pod has no such port).
pub fn resolve_port(svc_port: &Value, pod: &Value) -> Option<i64> {
    match &svc_port["targetPort"] {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => {
            if let Ok(n) = name.parse() {
                return Some(n);
            }
            pod["spec"]["containers"].as_array()?.iter().find_map(|c| {
                c["ports"]
                    .as_array()?
                    .iter()
                    .find(|p| p["name"] == name.as_str())?["containerPort"]
                    .as_i64()
            })
        }
        _ => svc_port["port"].as_i64(),
    }
}

/// The slices a Service should have: one per distinct set of resolved ports.
pub fn slices(svc: &Value, pods: &[Arc<Value>]) -> Vec<Value> {
    let name = util::name(svc);
    let publish = svc["spec"]["publishNotReadyAddresses"] == true;
    let svc_ports: Vec<Value> = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let mut groups: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
    for p in pods {
        let Some(ip) = p["status"]["podIP"].as_str().filter(|s| !s.is_empty()) else {
            continue;
        };
        if matches!(util::pod_phase(p), "Succeeded" | "Failed") {
            continue;
        }
        let ports: Vec<Value> = svc_ports
            .iter()
            .filter_map(|sp| {
                let port = resolve_port(sp, p)?;
                let mut o =
                    json!({"port": port, "protocol": sp["protocol"].as_str().unwrap_or("TCP")});
                if let Some(n) = sp["name"].as_str() {
                    o["name"] = json!(n);
                }
                Some(o)
            })
            .collect();
        let terminating = util::deleting(p);
        let serving = util::pod_ready(p);
        let ready = (serving && !terminating) || publish;
        let mut ep = json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving || publish, "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": util::name(p), "namespace": util::namespace(p), "uid": util::uid(p)}});
        if let Some(n) = p["spec"]["nodeName"].as_str() {
            ep["nodeName"] = json!(n);
        }
        if let (Some(h), Some(sub)) = (
            p["spec"]["hostname"].as_str(),
            p["spec"]["subdomain"].as_str(),
        ) {
            if sub == name {
                ep["hostname"] = json!(h);
            }
        }
        let key = serde_json::to_string(&ports).unwrap_or_default();
        let g = groups.entry(key).or_insert_with(|| (ports, Vec::new()));
        g.1.push(ep);
    }
    if groups.is_empty() {
        groups.insert(String::new(), (Vec::new(), Vec::new()));
    }
    groups
        .into_values()
        .enumerate()
        .map(|(i, (ports, mut eps))| {
            eps.sort_by(|a, b| a["targetRef"]["name"].as_str().cmp(&b["targetRef"]["name"].as_str()));
            let slice_name = if i == 0 { name.to_string() } else { format!("{name}-{i}") };
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "namespace": util::namespace(svc),
                    "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY: "endpointslice-controller.k8s.io"},
                    "ownerReferences": [util::owner_ref(svc)]},
                "addressType": "IPv4", "endpoints": eps, "ports": ports})
        })
        .collect()
}

/// The v1 Endpoints object for the same slices.
pub fn endpoints(svc: &Value, slices: &[Value]) -> Value {
    let subsets: Vec<Value> = slices
        .iter()
        .filter(|s| s["endpoints"].as_array().is_some_and(|e| !e.is_empty()))
        .map(|s| {
            let addr = |e: &Value| {
                let mut a = json!({"ip": e["addresses"][0], "targetRef": e["targetRef"]});
                if let Some(n) = e["nodeName"].as_str() {
                    a["nodeName"] = json!(n);
                }
                if let Some(h) = e["hostname"].as_str() {
                    a["hostname"] = json!(h);
                }
                a
            };
            let eps = s["endpoints"].as_array().cloned().unwrap_or_default();
            let ready: Vec<Value> = eps
                .iter()
                .filter(|e| e["conditions"]["ready"] == true)
                .map(addr)
                .collect();
            let not: Vec<Value> = eps
                .iter()
                .filter(|e| e["conditions"]["ready"] != true)
                .map(addr)
                .collect();
            let mut sub = json!({"ports": s["ports"]});
            if !ready.is_empty() {
                sub["addresses"] = json!(ready);
            }
            if !not.is_empty() {
                sub["notReadyAddresses"] = json!(not);
            }
            sub
        })
        .collect();
    let mut o = json!({"apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": util::name(svc), "namespace": util::namespace(svc), "labels": svc["metadata"]["labels"].clone(),
            "ownerReferences": [util::owner_ref(svc)]}});
    if o["metadata"]["labels"].is_null() {
        o["metadata"].as_object_mut().map(|m| m.remove("labels"));
    }
    if !subsets.is_empty() {
        o["subsets"] = json!(subsets);
    }
    o
}

fn selects(svc: &Value, labels: &BTreeMap<String, String>) -> bool {
    match svc["spec"]["selector"].as_object() {
        Some(sel) if !sel.is_empty() => sel
            .iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()),
        _ => false,
    }
}

/// Write `want` where it differs from what is stored (the stored version is the precondition).
async fn put(ctx: &Ctx, current: Option<Arc<Value>>, want: Value) -> Result<(), orc_api::ApiError> {
    match current {
        None => ctx.create(want).await.map(|_| ()),
        Some(cur) => {
            let same = ["endpoints", "ports", "addressType", "subsets"]
                .iter()
                .all(|f| cur[*f] == want[*f])
                && cur["metadata"]["labels"] == want["metadata"]["labels"];
            if same {
                return Ok(());
            }
            let mut n = want;
            n["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
            ctx.update(n).await.map(|_| ())
        }
    }
}

pub struct Endpoints;

impl Endpoints {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(svc) = ctx.store.get("services", key) else {
            return Ok(None);
        };
        if util::deleting(&svc)
            || svc["spec"]["selector"]
                .as_object()
                .is_none_or(|m| m.is_empty())
        {
            return Ok(None);
        }
        let ns = util::namespace(&svc);
        let pods: Vec<Arc<Value>> = ctx
            .store
            .list_ns("pods", ns)
            .into_iter()
            .filter(|p| selects(&svc, &util::labels(p)))
            .collect();
        let want = slices(&svc, &pods);
        let existing: Vec<Arc<Value>> = ctx
            .store
            .list_ns("endpointslices", ns)
            .into_iter()
            .filter(|s| {
                util::labels(s).get(SERVICE_NAME_LABEL).map(String::as_str)
                    == Some(util::name(&svc))
            })
            .collect();
        for s in &want {
            let cur = existing
                .iter()
                .find(|e| util::name(e) == util::name(s))
                .cloned();
            put(ctx, cur, s.clone()).await?;
        }
        for e in &existing {
            if !want.iter().any(|w| util::name(w) == util::name(e)) {
                ctx.delete("endpointslices", e, None).await?;
            }
        }
        let ep = endpoints(&svc, &want);
        let cur = ctx.store.get_ns("endpoints", ns, util::name(&svc));
        put(ctx, cur, ep).await?;
        Ok(None)
    }
}

impl Reconciler for Endpoints {
    fn name(&self) -> &'static str {
        "endpointslice-controller"
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "services" => vec![ch.key.clone()],
            "pods" => {
                let ns = util::namespace(&ch.object);
                let mut keys = Vec::new();
                for p in std::iter::once(&ch.object).chain(ch.old.iter()) {
                    let l = util::labels(p);
                    for s in ctx.store.list_ns("services", ns) {
                        if selects(&s, &l) {
                            keys.push(crate::store::key_of(&s));
                        }
                    }
                }
                keys.dedup();
                keys
            }
            "endpointslices" | "endpoints" => {
                let n = util::labels(&ch.object)
                    .get(SERVICE_NAME_LABEL)
                    .cloned()
                    .unwrap_or_else(|| util::name(&ch.object).to_string());
                vec![format!("{}/{n}", util::namespace(&ch.object))]
            }
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys("services")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, port_name: Option<(&str, i64)>) -> Arc<Value> {
        let mut p = json!({"metadata": {"name": name, "namespace": "d", "uid": name, "labels": {"app": "w"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": []}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}});
        if let Some((n, v)) = port_name {
            p["spec"]["containers"][0]["ports"] = json!([{"name": n, "containerPort": v}]);
        }
        Arc::new(p)
    }

    fn svc(target: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "d", "uid": "s"},
            "spec": {"selector": {"app": "w"}, "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]}})
    }

    #[test]
    fn ready_and_not_ready_endpoints() {
        let s = slices(
            &svc(json!(8080)),
            &[
                pod("a", "198.18.0.2", true, None),
                pod("b", "198.18.0.3", false, None),
            ],
        );
        assert_eq!(s.len(), 1);
        let eps = s[0]["endpoints"].as_array().unwrap();
        assert_eq!(
            eps[0]["conditions"],
            json!({"ready": true, "serving": true, "terminating": false})
        );
        assert_eq!(eps[1]["conditions"]["ready"], false);
        assert_eq!(s[0]["ports"][0]["port"], 8080);
        let e = endpoints(&svc(json!(8080)), &s);
        assert_eq!(e["subsets"][0]["addresses"][0]["ip"], "198.18.0.2");
        assert_eq!(e["subsets"][0]["notReadyAddresses"][0]["ip"], "198.18.0.3");
    }

    #[test]
    fn named_ports_resolve_per_pod() {
        let s = slices(
            &svc(json!("web")),
            &[
                pod("a", "198.18.0.2", true, Some(("web", 8080))),
                pod("b", "198.18.0.3", true, Some(("web", 9090))),
            ],
        );
        assert_eq!(s.len(), 2);
        let ports: Vec<i64> = s
            .iter()
            .map(|x| x["ports"][0]["port"].as_i64().unwrap())
            .collect();
        assert_eq!(ports, vec![8080, 9090]);
    }

    #[test]
    fn publish_not_ready() {
        let mut v = svc(json!(80));
        v["spec"]["publishNotReadyAddresses"] = json!(true);
        let s = slices(&v, &[pod("b", "198.18.0.3", false, None)]);
        assert_eq!(s[0]["endpoints"][0]["conditions"]["ready"], true);
    }
}
