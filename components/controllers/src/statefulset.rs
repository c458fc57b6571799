//! StatefulSet: pods `NAME-0..N-1` with stable hostnames under `serviceName`,
//! OrderedReady (one at a time, each Running and Ready before the next; scale
//! down from the highest ordinal) or Parallel; a PVC per pod from
//! volumeClaimTemplates that outlives the pod; RollingUpdate with partition.
use crate::deployment::template_hash;
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const REVISION_LABEL: &str = "controller-revision-hash";

pub fn ordinal(sts: &str, pod: &str) -> Option<i64> {
    pod.strip_prefix(sts)?.strip_prefix('-')?.parse().ok()
}

pub fn claim_name(template: &str, sts: &str, i: i64) -> String {
    format!("{template}-{sts}-{i}")
}

pub fn revision(sts: &Value) -> String {
    format!(
        "{}-{}",
        util::name(sts),
        template_hash(&sts["spec"]["template"])
    )
}

/// Pod `i` of the StatefulSet.
pub fn pod_for(sts: &Value, i: i64) -> Value {
    let name = format!("{}-{i}", util::name(sts));
    let mut p = util::pod_from_template(sts, None, Some(name.clone()));
    p["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = json!(name);
    p["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!(i.to_string());
    p["metadata"]["labels"][REVISION_LABEL] = json!(revision(sts));
    p["spec"]["hostname"] = json!(name);
    if let Some(svc) = sts["spec"]["serviceName"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        p["spec"]["subdomain"] = json!(svc);
    }
    let mut vols: Vec<Value> = p["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    for t in sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let tn = t["metadata"]["name"].as_str().unwrap_or("");
        vols.retain(|v| v["name"] != tn);
        vols.push(json!({"name": tn, "persistentVolumeClaim": {"claimName": claim_name(tn, util::name(sts), i)}}));
    }
    if !vols.is_empty() {
        p["spec"]["volumes"] = json!(vols);
    }
    p
}

pub fn claim_for(sts: &Value, t: &Value, i: i64) -> Value {
    let tn = t["metadata"]["name"].as_str().unwrap_or("");
    let mut meta = t["metadata"].as_object().cloned().unwrap_or_default();
    meta.insert("name".into(), json!(claim_name(tn, util::name(sts), i)));
    meta.insert("namespace".into(), json!(util::namespace(sts)));
    let mut labels = sts["spec"]["selector"]["matchLabels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if let Some(l) = t["metadata"]["labels"].as_object() {
        labels.extend(l.clone());
    }
    meta.insert("labels".into(), Value::Object(labels));
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": t["spec"].clone()})
}

/// What to do next, given the pods by ordinal.
#[derive(Debug, PartialEq)]
pub enum Step {
    Create(i64),
    Delete(String),
    Wait,
    Done,
}

fn healthy(p: &Value) -> bool {
    util::pod_phase(p) == "Running" && util::pod_ready(p) && !util::deleting(p)
}

/// The next steps for a StatefulSet (all of them under Parallel, one under OrderedReady).
pub fn steps(sts: &Value, pods: &BTreeMap<i64, Arc<Value>>) -> Vec<Step> {
    let replicas = sts["spec"]["replicas"].as_i64().unwrap_or(1).max(0);
    let ordered = sts["spec"]["podManagementPolicy"] != "Parallel";
    let rev = revision(sts);
    let mut out = Vec::new();
    for i in 0..replicas {
        match pods.get(&i) {
            None => out.push(Step::Create(i)),
            Some(p) if util::pod_phase(p) == "Failed" && !util::deleting(p) => {
                out.push(Step::Delete(util::name(p).to_string()))
            }
            Some(p) if !healthy(p) => out.push(Step::Wait),
            Some(_) => continue,
        }
        if ordered {
            return out;
        }
    }
    // Scale down, highest ordinal first.
    let condemned: Vec<&Arc<Value>> = pods
        .range(replicas..)
        .rev()
        .map(|(_, p)| p)
        .filter(|p| !util::deleting(p))
        .collect();
    if !condemned.is_empty() {
        if ordered {
            if pods.range(..replicas).all(|(_, p)| healthy(p))
                && pods.range(replicas..).all(|(_, p)| !util::deleting(p))
            {
                return vec![Step::Delete(util::name(condemned[0]).to_string())];
            }
            return vec![Step::Wait];
        }
        out.extend(
            condemned
                .iter()
                .map(|p| Step::Delete(util::name(p).to_string())),
        );
        return out;
    }
    if !out.is_empty() {
        return out;
    }
    // Rolling update from the highest ordinal down to the partition, one at a time.
    if sts["spec"]["updateStrategy"]["type"] != "OnDelete" {
        let partition = sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"]
            .as_i64()
            .unwrap_or(0);
        for i in (partition.max(0)..replicas).rev() {
            if let Some(p) = pods.get(&i) {
                if util::labels(p).get(REVISION_LABEL) != Some(&rev) {
                    return vec![Step::Delete(util::name(p).to_string())];
                }
            }
        }
    }
    vec![Step::Done]
}

pub struct StatefulSets;

impl StatefulSets {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(sts) = ctx.store.get("statefulsets", key) else {
            return Ok(None);
        };
        if util::deleting(&sts) {
            return Ok(None);
        }
        let name = util::name(&sts).to_string();
        let ns = util::namespace(&sts).to_string();
        let mut pods: BTreeMap<i64, Arc<Value>> = BTreeMap::new();
        for p in ctx.store.controlled("pods", util::uid(&sts)) {
            if let Some(i) = ordinal(&name, util::name(&p)) {
                pods.insert(i, p);
            }
        }
        for step in steps(&sts, &pods) {
            match step {
                Step::Create(i) => {
                    for t in sts["spec"]["volumeClaimTemplates"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        let cn = claim_name(t["metadata"]["name"].as_str().unwrap_or(""), &name, i);
                        if ctx
                            .store
                            .get_ns("persistentvolumeclaims", &ns, &cn)
                            .is_none()
                        {
                            match ctx.create(claim_for(&sts, t, i)).await {
                                Ok(_) => {}
                                Err(e) if e.reason == orc_api::Reason::AlreadyExists => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    ctx.create(pod_for(&sts, i)).await?;
                    ctx.event(
                        &sts,
                        "Normal",
                        "SuccessfulCreate",
                        format!("create Pod {name}-{i} in StatefulSet {name} successful"),
                    );
                }
                Step::Delete(pn) => {
                    if let Some(p) = ctx.store.get_ns("pods", &ns, &pn) {
                        ctx.delete("pods", &p, None).await?;
                        ctx.event(
                            &sts,
                            "Normal",
                            "SuccessfulDelete",
                            format!("delete Pod {pn} in StatefulSet {name} successful"),
                        );
                    }
                }
                Step::Wait | Step::Done => {}
            }
        }
        let rev = revision(&sts);
        let active: Vec<&Arc<Value>> = pods.values().filter(|p| !util::deleting(p)).collect();
        let updated = active
            .iter()
            .filter(|p| util::labels(p).get(REVISION_LABEL) == Some(&rev))
            .count();
        let ready = active.iter().filter(|p| util::pod_ready(p)).count();
        let mut n = (*sts).clone();
        let mut st = if n["status"].is_object() {
            n["status"].clone()
        } else {
            json!({})
        };
        st["observedGeneration"] = json!(util::generation(&sts));
        st["replicas"] = json!(active.len());
        st["readyReplicas"] = json!(ready);
        st["availableReplicas"] = json!(ready);
        st["updatedReplicas"] = json!(updated);
        st["currentReplicas"] = json!(if updated == active.len() {
            updated
        } else {
            active.len() - updated
        });
        st["updateRevision"] = json!(rev);
        if updated == active.len() || st["currentRevision"].is_null() {
            st["currentRevision"] = json!(rev);
        }
        if st != sts["status"] {
            n["status"] = st;
            ctx.update_status(n).await?;
        }
        Ok(None)
    }
}

impl Reconciler for StatefulSets {
    fn name(&self) -> &'static str {
        "statefulset-controller"
    }

    fn keys_for(&self, _ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "statefulsets" => vec![ch.key.clone()],
            "pods" => util::owner_key(&ch.object, "StatefulSet")
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys("statefulsets")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

/// The local provisioner and binder: a pending claim used by a pod that has a
/// node gets a PersistentVolume on that node (a directory under the node's data
/// dir, pinned by node affinity) and is bound to it; a volume whose claim is
/// gone is deleted.
pub struct Volumes;

/// Where a provisioned volume lives on its node (under the node agent's data dir).
pub fn local_path(pvc_uid: &str) -> String {
    format!("/var/lib/orc/volumes/pvc-{pvc_uid}")
}

pub fn volume_for(pvc: &Value, node: &str) -> Value {
    let storage = pvc["spec"]["resources"]["requests"]["storage"].clone();
    json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": format!("pvc-{}", util::uid(pvc)),
            "annotations": {"pv.kubernetes.io/provisioned-by": "orc.dev/local"}},
        "spec": {"capacity": {"storage": if storage.is_null() { json!("1Gi") } else { storage }},
            "accessModes": pvc["spec"]["accessModes"].clone(),
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": pvc["spec"]["storageClassName"].as_str().unwrap_or("local"),
            "local": {"path": local_path(util::uid(pvc))},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": crate::scheduler::HOSTNAME, "operator": "In", "values": [node]}]}]}},
            "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": util::namespace(pvc),
                "name": util::name(pvc), "uid": util::uid(pvc)}}})
}

impl Volumes {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        if let Some(pv_key) = key.strip_prefix("pv|") {
            // A released volume goes with its claim.
            let Some(pv) = ctx.store.get("persistentvolumes", pv_key) else {
                return Ok(None);
            };
            let claim = &pv["spec"]["claimRef"];
            let gone = claim["uid"]
                .as_str()
                .is_some_and(|u| ctx.store.by_uid(u).is_none());
            if gone
                && pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
                && !util::deleting(&pv)
            {
                ctx.delete("persistentvolumes", &pv, None).await?;
            }
            return Ok(None);
        }
        let Some(pvc) = ctx.store.get("persistentvolumeclaims", key) else {
            return Ok(None);
        };
        if util::deleting(&pvc) || pvc["status"]["phase"] == "Bound" {
            return Ok(None);
        }
        let pv_name = format!("pvc-{}", util::uid(&pvc));
        let pv = match ctx.store.get("persistentvolumes", &format!("/{pv_name}")) {
            Some(pv) => (*pv).clone(),
            None => {
                // Wait for the first pod that uses it to have a node.
                let node =
                    ctx.store
                        .list_ns("pods", util::namespace(&pvc))
                        .into_iter()
                        .find_map(|p| {
                            let uses = p["spec"]["volumes"].as_array()?.iter().any(|v| {
                                v["persistentVolumeClaim"]["claimName"] == util::name(&pvc)
                            });
                            let node = p["spec"]["nodeName"].as_str().filter(|n| !n.is_empty())?;
                            uses.then(|| node.to_string())
                        });
                let Some(node) = node else {
                    return Ok(None);
                };
                let pv = ctx.create(volume_for(&pvc, &node)).await?;
                ctx.event(
                    &pvc,
                    "Normal",
                    "ProvisioningSucceeded",
                    format!("Successfully provisioned volume {pv_name} on node {node}"),
                );
                pv
            }
        };
        let mut claim = (*pvc).clone();
        if claim["spec"]["volumeName"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            claim["spec"]["volumeName"] = json!(pv_name);
            claim["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] = json!("yes");
            let c = ctx.update(claim).await?;
            claim = c;
        }
        claim["status"] = json!({"phase": "Bound", "accessModes": pv["spec"]["accessModes"], "capacity": pv["spec"]["capacity"]});
        ctx.update_status(claim).await?;
        let mut v = pv;
        if v["status"]["phase"] != "Bound" {
            v["status"] = json!({"phase": "Bound"});
            ctx.update_status(v).await?;
        }
        Ok(None)
    }
}

impl Reconciler for Volumes {
    fn name(&self) -> &'static str {
        "persistentvolume-binder"
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "persistentvolumeclaims" if ch.event != orc_api::EventType::Deleted => {
                vec![ch.key.clone()]
            }
            "persistentvolumeclaims" => {
                let uid = util::uid(&ch.object);
                ctx.store
                    .list("persistentvolumes")
                    .iter()
                    .filter(|pv| pv["spec"]["claimRef"]["uid"] == uid)
                    .map(|pv| format!("pv|{}", crate::store::key_of(pv)))
                    .collect()
            }
            "persistentvolumes" => vec![format!("pv|{}", ch.key)],
            // A pod got its node: its pending claims can be provisioned.
            "pods"
                if ch.object["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty())
                    && ch
                        .old
                        .as_ref()
                        .is_none_or(|o| o["spec"]["nodeName"] != ch.object["spec"]["nodeName"]) =>
            {
                ch.object["spec"]["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
                    .map(|c| format!("{}/{c}", util::namespace(&ch.object)))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        let mut k = ctx.store.keys("persistentvolumeclaims");
        k.extend(
            ctx.store
                .keys("persistentvolumes")
                .into_iter()
                .map(|p| format!("pv|{p}")),
        );
        k
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(replicas: i64, policy: &str) -> Value {
        json!({"metadata": {"name": "web", "namespace": "d", "uid": "u"},
            "spec": {"replicas": replicas, "podManagementPolicy": policy, "serviceName": "web",
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}]}})
    }

    fn pod(s: &Value, i: i64, ready: bool) -> Arc<Value> {
        let mut p = pod_for(s, i);
        p["status"] = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]});
        Arc::new(p)
    }

    #[test]
    fn ordered_ready_creates_one_at_a_time() {
        let s = sts(3, "OrderedReady");
        let mut pods = BTreeMap::new();
        assert_eq!(steps(&s, &pods), vec![Step::Create(0)]);
        pods.insert(0, pod(&s, 0, false));
        assert_eq!(steps(&s, &pods), vec![Step::Wait]);
        pods.insert(0, pod(&s, 0, true));
        assert_eq!(steps(&s, &pods), vec![Step::Create(1)]);
        pods.insert(1, pod(&s, 1, true));
        pods.insert(2, pod(&s, 2, true));
        assert_eq!(steps(&s, &pods), vec![Step::Done]);
        // Scale down from the top, one at a time.
        let s1 = sts(1, "OrderedReady");
        assert_eq!(steps(&s1, &pods), vec![Step::Delete("web-2".into())]);
    }

    #[test]
    fn parallel_creates_all() {
        let s = sts(3, "Parallel");
        assert_eq!(
            steps(&s, &BTreeMap::new()),
            vec![Step::Create(0), Step::Create(1), Step::Create(2)]
        );
    }

    #[test]
    fn rolling_update_respects_partition() {
        let s = sts(3, "OrderedReady");
        let mut pods = BTreeMap::new();
        for i in 0..3 {
            pods.insert(i, pod(&s, i, true));
        }
        let mut s2 = s.clone();
        s2["spec"]["template"]["spec"]["containers"][0]["image"] = json!("v2");
        s2["spec"]["updateStrategy"] =
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}});
        assert_eq!(steps(&s2, &pods), vec![Step::Delete("web-2".into())]);
        pods.insert(2, pod(&s2, 2, true));
        assert_eq!(
            steps(&s2, &pods),
            vec![Step::Done],
            "below the partition stays"
        );
    }

    #[test]
    fn pods_get_identity_and_claims() {
        let p = pod_for(&sts(3, "OrderedReady"), 1);
        assert_eq!(p["metadata"]["name"], "web-1");
        assert_eq!(p["spec"]["hostname"], "web-1");
        assert_eq!(p["spec"]["subdomain"], "web");
        assert_eq!(
            p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "data-web-1"
        );
        assert_eq!(ordinal("web", "web-12"), Some(12));
        assert_eq!(ordinal("web", "webx-1"), None);
    }
}
