//! Deployment: one ReplicaSet per pod template (named by the template's hash),
//! rolled with RollingUpdate (maxSurge/maxUnavailable judged on the pod
//! counts its ReplicaSets report) or Recreate, with revisions, history limit,
//! pause and the progress deadline.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util::{self, int_or_percent};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const HASH_LABEL: &str = "pod-template-hash";

/// A stable short hash of a pod template (FNV-1a over its JSON, in Kubernetes'
/// alphabet for generated names).
pub fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in serde_json::to_vec(template).unwrap_or_default() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut s = String::new();
    let mut x = h as u64;
    for _ in 0..10 {
        s.push(ALPHA[(x % ALPHA.len() as u64) as usize] as char);
        x /= ALPHA.len() as u64;
        if x == 0 {
            break;
        }
    }
    s
}

/// A ReplicaSet's template without the hash label, to compare with a Deployment's.
pub fn template_without_hash(rs: &Value) -> Value {
    let mut t = rs["spec"]["template"].clone();
    if let Some(l) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(HASH_LABEL);
    }
    t
}

fn same_template(a: &Value, b: &Value) -> bool {
    // Absent and empty mean the same.
    let norm = |v: &Value| -> Value {
        let mut v = v.clone();
        if let Some(m) = v.pointer_mut("/metadata").and_then(Value::as_object_mut) {
            m.retain(|_, x| !(x.is_null() || x.as_object().is_some_and(|o| o.is_empty())));
        }
        v
    };
    norm(a) == norm(b)
}

pub fn revision(o: &Value) -> i64 {
    util::annotation(o, REVISION)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One ReplicaSet as the rollout sees it.
#[derive(Debug, Clone)]
pub struct RsView {
    pub key: String,
    pub spec: i64,
    /// Active pods it owns now.
    pub pods: i64,
    pub available: i64,
    pub ready: i64,
    pub revision: i64,
}

impl RsView {
    /// The pods it may have at any moment: what it wants or what it still has.
    fn actual(&self) -> i64 {
        self.spec.max(self.pods)
    }
}

/// Scale changes (ReplicaSet key, new replicas) for a RollingUpdate step.
pub fn rolling_step(
    replicas: i64,
    surge: i64,
    unavailable: i64,
    new: &RsView,
    olds: &[RsView],
) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let total: i64 = olds.iter().map(RsView::actual).sum::<i64>() + new.actual();
    // Scale up the new ReplicaSet within the surge.
    if new.spec < replicas {
        let up = (replicas + surge - total).min(replicas - new.spec);
        if up > 0 {
            out.push((new.key.clone(), new.spec + up));
            return out;
        }
    } else if new.spec > replicas {
        out.push((new.key.clone(), replicas));
        return out;
    }
    // Scale down old ones, keeping at least replicas - maxUnavailable available.
    let min_available = replicas - unavailable;
    let spec_total: i64 = olds.iter().map(|o| o.spec).sum::<i64>() + new.spec;
    let new_unavailable = (new.spec - new.available).max(0);
    let max_down = spec_total - min_available - new_unavailable;
    if max_down <= 0 {
        return out;
    }
    let mut olds: Vec<RsView> = olds.to_vec();
    olds.sort_by_key(|o| o.revision);
    // First the old pods that are not available anyway.
    let mut taken = 0;
    for o in olds.iter_mut() {
        if o.spec == 0 || taken >= max_down {
            continue;
        }
        let unhealthy = (o.spec - o.available).max(0);
        let n = unhealthy.min(max_down - taken);
        if n > 0 {
            o.spec -= n;
            taken += n;
            out.push((o.key.clone(), o.spec));
        }
    }
    // Then available ones, down to the minimum.
    let available: i64 = olds.iter().map(|o| o.available.min(o.spec)).sum::<i64>() + new.available;
    let mut budget = (available - min_available).max(0);
    for o in olds.iter_mut() {
        if budget == 0 {
            break;
        }
        if o.spec == 0 {
            continue;
        }
        let n = o.spec.min(budget);
        o.spec -= n;
        budget -= n;
        out.retain(|(k, _)| k != &o.key);
        out.push((o.key.clone(), o.spec));
    }
    out
}

pub struct Deployments;

/// The ReplicaSets as their status reports them (as Kubernetes' deployment
/// controller does): the ReplicaSet controller counts the pods, here they are
/// not walked again. A status not yet updated lags in the safe direction: a
/// scale-up's pods are bounded by its spec, a scale-down's are still counted.
pub fn views(rss: &[Arc<Value>]) -> Vec<RsView> {
    rss.iter()
        .map(|rs| {
            let st = &rs["status"];
            let n = |f: &str| st[f].as_i64().unwrap_or(0);
            RsView {
                key: crate::store::key_of(rs),
                spec: crate::replicaset::replicas(rs),
                pods: n("replicas"),
                available: n("availableReplicas"),
                ready: n("readyReplicas"),
                revision: revision(rs),
            }
        })
        .collect()
}

async fn scale(ctx: &Ctx, d: &Value, rs: &Value, to: i64) -> Result<(), orc_api::ApiError> {
    let from = crate::replicaset::replicas(rs);
    let mut n = rs.clone();
    n["spec"]["replicas"] = json!(to);
    if let Some(a) = n["metadata"]["annotations"].as_object_mut() {
        a.insert(
            "deployment.kubernetes.io/desired-replicas".into(),
            json!(d["spec"]["replicas"].as_i64().unwrap_or(1).to_string()),
        );
    }
    ctx.update(n).await?;
    let verb = if to > from { "up" } else { "down" };
    ctx.event(
        d,
        "Normal",
        "ScalingReplicaSet",
        format!(
            "Scaled {verb} replica set {} from {from} to {to}",
            util::name(rs)
        ),
    );
    Ok(())
}

impl Deployments {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(d) = ctx.store.get("deployments", key) else {
            return Ok(None);
        };
        if util::deleting(&d) {
            return Ok(None);
        }
        let now = util::now_secs();
        let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let uid = util::uid(&d).to_string();
        // Matching ReplicaSets without a controller are adopted (after an orphaning delete).
        for rs in ctx.store.list_ns("replicasets", util::namespace(&d)) {
            if util::controller_ref(&rs).is_none()
                && !util::deleting(&rs)
                && util::selector_matches(&d["spec"]["selector"], &util::labels(&rs))
            {
                ctx.update(util::adopted(&rs, &d)).await?;
                return Ok(Some(Duration::ZERO));
            }
        }
        let mut rss: Vec<Arc<Value>> = ctx
            .store
            .controlled("replicasets", &uid)
            .into_iter()
            .filter(|rs| !util::deleting(rs))
            .collect();
        rss.sort_by_key(|rs| revision(rs));
        let template = &d["spec"]["template"];
        let max_rev = rss.iter().map(|r| revision(r)).max().unwrap_or(0);
        let new_rs = rss
            .iter()
            .find(|rs| same_template(&template_without_hash(rs), template))
            .cloned();
        let paused = d["spec"]["paused"] == true;
        let recreate = d["spec"]["strategy"]["type"] == "Recreate";
        let Some(new_rs) = new_rs else {
            if paused {
                return self.status(ctx, &d, &rss, None, now).await;
            }
            // A new template: a new ReplicaSet.
            let hash = template_hash(template);
            let mut t = template.clone();
            t["metadata"]["labels"][HASH_LABEL] = json!(hash);
            let mut sel = d["spec"]["selector"].clone();
            sel["matchLabels"][HASH_LABEL] = json!(hash);
            let olds = views(&rss);
            let surge = int_or_percent(
                &d["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
                replicas,
                true,
                "25%",
            );
            let old_total: i64 = olds.iter().map(RsView::actual).sum();
            let initial = if recreate {
                0
            } else if rss.is_empty() {
                replicas
            } else {
                (replicas + surge - old_total).clamp(0, replicas)
            };
            let mut labels = template["metadata"]["labels"].clone();
            if !labels.is_object() {
                labels = json!({});
            }
            labels[HASH_LABEL] = json!(hash);
            let rs = json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": format!("{}-{hash}", util::name(&d)), "namespace": util::namespace(&d),
                    "labels": labels, "ownerReferences": [util::owner_ref(&d)],
                    "annotations": {REVISION: (max_rev + 1).to_string(),
                        "deployment.kubernetes.io/desired-replicas": replicas.to_string()}},
                "spec": {"replicas": initial, "minReadySeconds": d["spec"]["minReadySeconds"].as_i64().unwrap_or(0),
                    "selector": sel, "template": t},
            });
            let made = ctx.create(rs).await?;
            ctx.event(
                &d,
                "Normal",
                "ScalingReplicaSet",
                format!("Scaled up replica set {} to {initial}", util::name(&made)),
            );
            return Ok(Some(Duration::ZERO));
        };
        // A rollback to an older template makes its ReplicaSet the newest revision.
        if revision(&new_rs) < max_rev || revision(&new_rs) == 0 {
            let mut n = (*new_rs).clone();
            n["metadata"]["annotations"][REVISION] = json!((max_rev + 1).to_string());
            ctx.update(n).await?;
            return Ok(Some(Duration::ZERO));
        }
        if util::annotation(&d, REVISION) != Some(revision(&new_rs).to_string().as_str()) {
            let mut n = (*d).clone();
            n["metadata"]["annotations"][REVISION] = json!(revision(&new_rs).to_string());
            ctx.update(n).await?;
            return Ok(Some(Duration::ZERO));
        }
        let all = views(&rss);
        let new_v = all
            .iter()
            .find(|v| v.key == crate::store::key_of(&new_rs))
            .cloned()
            .expect("new rs");
        let olds: Vec<RsView> = all.iter().filter(|v| v.key != new_v.key).cloned().collect();
        let mut changes: Vec<(String, i64)> = Vec::new();
        if paused {
            // Paused: only follow a change of scale when nothing else is running.
            if olds.iter().all(|o| o.spec == 0) && new_v.spec != replicas {
                changes.push((new_v.key.clone(), replicas));
            }
        } else if recreate {
            if olds.iter().any(|o| o.spec > 0) {
                changes.extend(
                    olds.iter()
                        .filter(|o| o.spec > 0)
                        .map(|o| (o.key.clone(), 0)),
                );
            } else if olds.iter().all(|o| o.pods == 0) && new_v.spec != replicas {
                changes.push((new_v.key.clone(), replicas));
            }
        } else {
            let ru = &d["spec"]["strategy"]["rollingUpdate"];
            let surge = int_or_percent(&ru["maxSurge"], replicas, true, "25%");
            let mut unavailable = int_or_percent(&ru["maxUnavailable"], replicas, false, "25%");
            if surge == 0 && unavailable == 0 {
                unavailable = 1;
            }
            changes = rolling_step(replicas, surge, unavailable, &new_v, &olds);
        }
        for (k, to) in &changes {
            if let Some(rs) = rss.iter().find(|r| &crate::store::key_of(r) == k) {
                scale(ctx, &d, rs, *to).await?;
            }
        }
        if !changes.is_empty() {
            return Ok(Some(Duration::ZERO));
        }
        // History: old, empty ReplicaSets beyond revisionHistoryLimit go.
        let limit = d["spec"]["revisionHistoryLimit"]
            .as_i64()
            .unwrap_or(10)
            .max(0) as usize;
        let empty: Vec<&Arc<Value>> = rss
            .iter()
            .filter(|rs| crate::store::key_of(rs) != new_v.key)
            .filter(|rs| {
                all.iter()
                    .any(|v| v.key == crate::store::key_of(rs) && v.spec == 0 && v.pods == 0)
            })
            .collect();
        if empty.len() > limit {
            for rs in &empty[..empty.len() - limit] {
                ctx.delete("replicasets", rs, None).await?;
            }
        }
        self.status(ctx, &d, &rss, Some(&new_rs), now).await
    }

    async fn status(
        &self,
        ctx: &Ctx,
        d: &Value,
        rss: &[Arc<Value>],
        new_rs: Option<&Arc<Value>>,
        now: f64,
    ) -> Outcome {
        let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let all = views(rss);
        let total: i64 = all.iter().map(|v| v.pods).sum();
        let available: i64 = all.iter().map(|v| v.available).sum();
        let ready: i64 = all.iter().map(|v| v.ready).sum();
        let updated = new_rs
            .and_then(|n| all.iter().find(|v| v.key == crate::store::key_of(n)))
            .map(|v| v.pods)
            .unwrap_or(0);
        let updated_available = new_rs
            .and_then(|n| all.iter().find(|v| v.key == crate::store::key_of(n)))
            .map(|v| v.available)
            .unwrap_or(0);
        let ru = &d["spec"]["strategy"]["rollingUpdate"];
        let max_unavailable = if d["spec"]["strategy"]["type"] == "Recreate" {
            replicas
        } else {
            int_or_percent(&ru["maxUnavailable"], replicas, false, "25%")
        };
        let mut n = d.clone();
        let ts = util::rfc3339(now);
        let mut st = if n["status"].is_object() {
            n["status"].clone()
        } else {
            json!({})
        };
        st["observedGeneration"] = json!(util::generation(d));
        st["replicas"] = json!(total);
        st["updatedReplicas"] = json!(updated);
        st["readyReplicas"] = json!(ready);
        st["availableReplicas"] = json!(available);
        st["unavailableReplicas"] = json!((replicas - available).max(0));
        n["status"] = st;
        if available >= replicas - max_unavailable {
            util::set_condition(
                &mut n,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                &ts,
            );
        } else {
            util::set_condition(
                &mut n,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                &ts,
            );
        }
        let complete = updated == replicas && total == replicas && updated_available == replicas;
        let rs_name = new_rs
            .map(|r| util::name(r).to_string())
            .unwrap_or_default();
        let deadline = d["spec"]["progressDeadlineSeconds"].as_i64().unwrap_or(600);
        let mut recheck = None;
        if d["spec"]["paused"] == true {
            util::set_condition(
                &mut n,
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused",
                &ts,
            );
        } else if complete {
            util::set_condition(
                &mut n,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
                &ts,
            );
        } else {
            let msg = format!("ReplicaSet \"{rs_name}\" is progressing: {updated} of {replicas} updated, {updated_available} available.");
            let prev = util::condition(d, "Progressing").cloned();
            let same = prev.as_ref().is_some_and(|c| {
                c["message"] == msg.as_str() || c["reason"] == "ProgressDeadlineExceeded"
            });
            let since = prev
                .as_ref()
                .and_then(|c| c["lastUpdateTime"].as_str())
                .and_then(util::parse_time)
                .unwrap_or(now);
            let was_exceeded = prev.as_ref().is_some_and(|c| {
                c["reason"] == "ProgressDeadlineExceeded"
                    && c["message"].as_str().is_some_and(|m| m.contains(&rs_name))
            });
            if was_exceeded {
                // Stays failed until the template changes.
            } else if same && now - since >= deadline as f64 {
                util::set_condition(
                    &mut n,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                    &ts,
                );
                ctx.event(
                    d,
                    "Warning",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                );
            } else {
                util::set_condition(
                    &mut n,
                    "Progressing",
                    "True",
                    "ReplicaSetUpdated",
                    &msg,
                    &ts,
                );
                let left = if same {
                    deadline as f64 - (now - since)
                } else {
                    deadline as f64
                };
                recheck =
                    Some(Duration::from_secs_f64(left.max(0.0) + 0.5).min(Duration::from_secs(30)));
            }
        }
        if n["status"] != d["status"] {
            ctx.update_status(n).await?;
        }
        let min_ready = d["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
        if min_ready > 0 && ready > available {
            recheck = Some(Duration::from_secs(1));
        }
        Ok(recheck)
    }
}

impl Reconciler for Deployments {
    fn name(&self) -> &'static str {
        "deployment-controller"
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "deployments" => vec![ch.key.clone()],
            "replicasets" => match util::owner_key(&ch.object, "Deployment") {
                Some(k) => vec![k],
                None => {
                    let l = util::labels(&ch.object);
                    ctx.store
                        .list_ns("deployments", util::namespace(&ch.object))
                        .iter()
                        .filter(|d| util::selector_matches(&d["spec"]["selector"], &l))
                        .map(|d| crate::store::key_of(d))
                        .collect()
                }
            },
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys("deployments")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(key: &str, spec: i64, pods: i64, available: i64, revision: i64) -> RsView {
        RsView {
            key: key.into(),
            spec,
            pods,
            available,
            ready: available,
            revision,
        }
    }

    /// Simulate a rollout step by step: pods follow specs at once and become
    /// available at once; at every step the surge and availability bounds hold.
    #[test]
    fn rolling_update_respects_surge_and_unavailable() {
        for (replicas, surge, unav) in [(6, 2, 1), (9, 3, 2), (4, 1, 0), (3, 0, 1), (10, 3, 3)] {
            let mut new = v("new", 0, 0, 0, 2);
            let mut old = v("old", replicas, replicas, replicas, 1);
            for _ in 0..100 {
                let ch = rolling_step(replicas, surge, unav, &new, std::slice::from_ref(&old));
                if ch.is_empty() {
                    break;
                }
                for (k, to) in ch {
                    if k == "new" {
                        new.spec = to;
                    } else {
                        old.spec = to;
                    }
                }
                // Old pods go at once; new pods come (and become ready) next.
                old.pods = old.spec;
                old.available = old.available.min(old.spec);
                assert!(
                    new.pods + old.pods <= replicas + surge,
                    "surge {replicas} {surge}"
                );
                new.pods = new.spec;
                assert!(
                    new.pods + old.pods <= replicas + surge,
                    "surge {replicas} {surge}"
                );
                new.available = new.pods;
                assert!(new.available + old.available >= replicas - unav);
            }
            assert_eq!(
                (new.spec, old.spec),
                (replicas, 0),
                "finished {replicas} {surge} {unav}"
            );
        }
    }

    #[test]
    fn views_read_the_replicasets_status() {
        let rs = Arc::new(json!({"metadata": {"name": "web-1", "namespace": "d",
            "annotations": {REVISION: "3"}},
            "spec": {"replicas": 5},
            "status": {"replicas": 4, "readyReplicas": 3, "availableReplicas": 2}}));
        let fresh = Arc::new(json!({"metadata": {"name": "web-2", "namespace": "d"},
            "spec": {"replicas": 2}}));
        let v = views(&[rs, fresh]);
        assert_eq!(
            (
                v[0].key.as_str(),
                v[0].spec,
                v[0].pods,
                v[0].ready,
                v[0].available,
                v[0].revision
            ),
            ("d/web-1", 5, 4, 3, 2, 3)
        );
        assert_eq!((v[1].spec, v[1].pods, v[1].available), (2, 0, 0));
        assert_eq!(v[0].actual(), 5);
    }

    #[test]
    fn scale_up_waits_for_old_pods_to_go() {
        // Old spec is 0 but its 3 pods are still there: no room to surge.
        let new = v("new", 3, 3, 3, 2);
        let old = v("old", 0, 3, 3, 1);
        assert!(rolling_step(6, 0, 1, &new, &[old]).is_empty());
    }

    #[test]
    fn hash_is_stable_and_template_sensitive() {
        let a = json!({"spec": {"containers": [{"image": "a"}]}});
        let b = json!({"spec": {"containers": [{"image": "b"}]}});
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert!(orc_api::validate::dns1123_label(&template_hash(&a)).is_ok());
    }

    #[test]
    fn rs_template_matches_without_hash_label() {
        let d = json!({"metadata": {"labels": {"app": "x"}}, "spec": {}});
        let rs = json!({"spec": {"template": {"metadata": {"labels": {"app": "x", "pod-template-hash": "abc"}}, "spec": {}}}});
        assert!(same_template(&template_without_hash(&rs), &d));
    }
}
