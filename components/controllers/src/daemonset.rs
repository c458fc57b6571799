//! DaemonSet: one pod on every eligible node (nodeSelector, required node
//! affinity, taints the pods do not tolerate), following nodes as they come and
//! go, replaced by RollingUpdate within maxUnavailable or OnDelete.
use crate::deployment::template_hash;
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::scheduler::{node_selected, untolerated, NodeState};
use crate::store::Change;
use crate::util::{self, int_or_percent};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub const REVISION_LABEL: &str = "controller-revision-hash";

/// Tolerations every DaemonSet pod gets (as in Kubernetes).
pub fn daemon_tolerations() -> Vec<Value> {
    let mut t = vec![
        json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}),
        json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}),
    ];
    for k in [
        "disk-pressure",
        "memory-pressure",
        "pid-pressure",
        "unschedulable",
    ] {
        t.push(json!({"key": format!("node.kubernetes.io/{k}"), "operator": "Exists", "effect": "NoSchedule"}));
    }
    t
}

/// The pod the DaemonSet wants on `node`.
pub fn pod_for(ds: &Value, node: &str, hash: &str) -> Value {
    let mut p = util::pod_from_template(ds, Some(util::generate_prefix(util::name(ds))), None);
    p["metadata"]["labels"][REVISION_LABEL] = json!(hash);
    let mut tol = p["spec"]["tolerations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    tol.extend(daemon_tolerations());
    p["spec"]["tolerations"] = json!(tol);
    p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]});
    p
}

/// Should a pod of this DaemonSet run on `node`?
pub fn eligible(ds: &Value, node: &Arc<Value>) -> bool {
    let probe = pod_for(ds, "", "");
    let mut t = probe.clone();
    // Judge selector and affinity from the template only (not our own pin).
    t["spec"]["affinity"] = ds["spec"]["template"]["spec"]["affinity"].clone();
    let n = NodeState::new(node.clone());
    !util::deleting(node)
        && node_selected(&t, &n)
        && untolerated(&probe, node, &["NoSchedule", "NoExecute"]).is_none()
}

pub struct DaemonSets;

impl DaemonSets {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(ds) = ctx.store.get("daemonsets", key) else {
            return Ok(None);
        };
        if util::deleting(&ds) {
            return Ok(None);
        }
        let now = util::now_secs();
        let hash = template_hash(&ds["spec"]["template"]);
        let min_ready = ds["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
        let nodes: BTreeMap<String, Arc<Value>> = ctx
            .store
            .list("nodes")
            .into_iter()
            .map(|n| (util::name(&n).to_string(), n))
            .collect();
        let mut by_node: BTreeMap<String, Vec<Arc<Value>>> = BTreeMap::new();
        let mut deletes: Vec<Arc<Value>> = Vec::new();
        for p in ctx.store.controlled("pods", util::uid(&ds)) {
            if util::deleting(&p) {
                continue;
            }
            if util::pod_phase(&p) == "Failed" {
                deletes.push(p); // replaced below
                continue;
            }
            let node = p["spec"]["nodeName"].as_str().map(String::from).or_else(|| {
                p.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchFields/0/values/0")
                    .and_then(Value::as_str)
                    .map(String::from)
            });
            by_node.entry(node.unwrap_or_default()).or_default().push(p);
        }
        let mut creates = Vec::new();
        let (mut desired, mut current, mut ready, mut available, mut updated, mut misscheduled) =
            (0, 0, 0, 0, 0, 0);
        let mut old_pods = Vec::new();
        let mut unavailable = 0;
        for (name, node) in &nodes {
            let pods = by_node.remove(name).unwrap_or_default();
            if !eligible(&ds, node) {
                if !pods.is_empty() {
                    misscheduled += 1;
                }
                deletes.extend(pods);
                continue;
            }
            desired += 1;
            let mut pods = pods;
            pods.sort_by_key(|p| util::creation(p).to_string());
            if pods.is_empty() {
                creates.push(pod_for(&ds, name, &hash));
                unavailable += 1;
                continue;
            }
            current += 1;
            deletes.extend(pods.drain(1..));
            let p = &pods[0];
            if util::pod_ready(p) {
                ready += 1;
            }
            if util::pod_available(p, min_ready, now) {
                available += 1;
            } else {
                unavailable += 1;
            }
            if util::labels(p).get(REVISION_LABEL) == Some(&hash) {
                updated += 1;
            } else {
                old_pods.push(p.clone());
            }
        }
        // Pods on nodes that are gone.
        deletes.extend(by_node.into_values().flatten());
        // RollingUpdate: replace old pods while within maxUnavailable.
        if ds["spec"]["updateStrategy"]["type"] != "OnDelete" {
            let max_unavailable = int_or_percent(
                &ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
                desired,
                true,
                "1",
            )
            .max(1);
            let mut budget = (max_unavailable - unavailable).max(0);
            // Unavailable old pods first: replacing them costs nothing.
            old_pods.sort_by_key(|p| util::pod_available(p, min_ready, now));
            for p in old_pods {
                if !util::pod_available(&p, min_ready, now) {
                    deletes.push(p);
                } else if budget > 0 {
                    budget -= 1;
                    deletes.push(p);
                }
            }
        }
        let made = futures::future::join_all(creates.into_iter().map(|p| ctx.create(p))).await;
        let n_made = made.iter().filter(|r| r.is_ok()).count();
        if n_made > 0 {
            ctx.event(
                &ds,
                "Normal",
                "SuccessfulCreate",
                format!("Created {n_made} pod(s)"),
            );
        }
        for r in made {
            r?;
        }
        for p in &deletes {
            ctx.delete("pods", p, None).await?;
        }
        if !deletes.is_empty() {
            ctx.event(
                &ds,
                "Normal",
                "SuccessfulDelete",
                format!("Deleted {} pod(s)", deletes.len()),
            );
        }
        let mut n = (*ds).clone();
        let mut st = if n["status"].is_object() {
            n["status"].clone()
        } else {
            json!({})
        };
        st["desiredNumberScheduled"] = json!(desired);
        st["currentNumberScheduled"] = json!(current);
        st["numberMisscheduled"] = json!(misscheduled);
        st["numberReady"] = json!(ready);
        st["numberAvailable"] = json!(available);
        st["numberUnavailable"] = json!((desired - available).max(0));
        st["updatedNumberScheduled"] = json!(updated);
        st["observedGeneration"] = json!(util::generation(&ds));
        if st != ds["status"] {
            n["status"] = st;
            ctx.update_status(n).await?;
        }
        Ok((min_ready > 0 && ready > available).then(|| Duration::from_secs(1)))
    }
}

impl Reconciler for DaemonSets {
    fn name(&self) -> &'static str {
        "daemonset-controller"
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "daemonsets" => vec![ch.key.clone()],
            "nodes" => {
                // Only changes that can matter: existence, labels, taints, readiness.
                let relevant = match &ch.old {
                    None => true,
                    Some(o) => {
                        o["metadata"]["labels"] != ch.object["metadata"]["labels"]
                            || o["spec"] != ch.object["spec"]
                    }
                };
                if relevant || ch.event != orc_api::EventType::Modified {
                    ctx.store.keys("daemonsets")
                } else {
                    Vec::new()
                }
            }
            "pods" => util::owner_key(&ch.object, "DaemonSet")
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys("daemonsets")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: Value, taints: Value) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": "n1", "labels": labels}, "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        )
    }

    #[test]
    fn eligibility_follows_selector_and_taints() {
        let ds = json!({"metadata": {"name": "d", "namespace": "x", "uid": "u"},
            "spec": {"template": {"metadata": {"labels": {"a": "b"}}, "spec": {"nodeSelector": {"disk": "ssd"}}}}});
        assert!(eligible(&ds, &node(json!({"disk": "ssd"}), json!([]))));
        assert!(!eligible(&ds, &node(json!({"disk": "hdd"}), json!([]))));
        assert!(!eligible(
            &ds,
            &node(
                json!({"disk": "ssd"}),
                json!([{"key": "gpu", "effect": "NoSchedule"}])
            )
        ));
        // Unreachable nodes keep their daemons.
        assert!(eligible(
            &ds,
            &node(
                json!({"disk": "ssd"}),
                json!([{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}])
            )
        ));
    }

    #[test]
    fn pods_are_pinned_to_their_node() {
        let ds = json!({"metadata": {"name": "d", "namespace": "x", "uid": "u"}, "spec": {"template": {"spec": {}}}});
        let p = pod_for(&ds, "n7", "h");
        assert_eq!(
            p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
            "n7"
        );
        assert_eq!(p["metadata"]["labels"][REVISION_LABEL], "h");
    }
}
