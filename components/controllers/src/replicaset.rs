//! ReplicaSet (set-based selector) and ReplicationController (equality
//! selector): keep `replicas` active pods, adopting matching orphans and
//! releasing pods that stop matching; delete the least useful pods first.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util::{self, pod_active};
use futures::future::BoxFuture;
use orc_api::selector::LabelSelector;
use orc_api::EventType;
use serde_json::{json, Map, Value};
use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Kubernetes' `burstReplicas`: at most this many creates or deletes per pass.
pub const BURST: usize = 500;

pub struct ReplicaSets {
    pub resource: &'static str,
    pub kind: &'static str,
    /// What the last sync of each ReplicaSet learnt about its pods.
    memo: std::sync::Mutex<std::collections::HashMap<String, Memo>>,
}

/// What a pod version tells its ReplicaSet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodFacts {
    pub selected: bool,
    pub active: bool,
    pub ready: bool,
    /// When it became Ready (for minReadySeconds).
    pub ready_since: Option<f64>,
    /// Carries every label of the ReplicaSet's template.
    pub fully_labeled: bool,
}

impl PodFacts {
    pub fn of(
        p: &Value,
        sel: Option<&LabelSelector>,
        tmpl_labels: Option<&Map<String, Value>>,
    ) -> Self {
        let ready = util::pod_ready(p);
        let l = &p["metadata"]["labels"];
        PodFacts {
            selected: sel.is_some_and(|s| s.matches(p)),
            active: pod_active(p),
            ready,
            ready_since: ready.then(|| util::ready_since(p)).flatten(),
            fully_labeled: tmpl_labels.is_none_or(|t| t.iter().all(|(k, v)| l.get(k) == Some(v))),
        }
    }
    fn available(&self, min_ready: i64, now: f64) -> bool {
        self.active && self.ready && util::ready_long_enough(self.ready_since, min_ready, now)
    }
}

/// Facts per pod version (by the address of the shared object, which the memo
/// holds on to), valid for one selector and template labels.
struct Memo {
    basis: (Value, Value),
    pods: std::collections::HashMap<usize, (Arc<Value>, PodFacts)>,
}

impl ReplicaSets {
    pub fn for_replicasets() -> Self {
        ReplicaSets {
            resource: "replicasets",
            kind: "ReplicaSet",
            memo: Default::default(),
        }
    }
    pub fn for_replication_controllers() -> Self {
        ReplicaSets {
            resource: "replicationcontrollers",
            kind: "ReplicationController",
            memo: Default::default(),
        }
    }
}

/// The selector of a ReplicaSet (`matchLabels`/`matchExpressions`) or of a
/// ReplicationController (a plain map), as a LabelSelector object.
pub fn selector_of(owner: &Value) -> Value {
    let s = &owner["spec"]["selector"];
    if owner["kind"] == "ReplicationController" {
        if s.is_object() && !s.as_object().is_some_and(|m| m.is_empty()) {
            json!({"matchLabels": s})
        } else {
            // An RC without a selector selects its template's labels.
            json!({"matchLabels": owner["spec"]["template"]["metadata"]["labels"]})
        }
    } else {
        s.clone()
    }
}

pub fn replicas(owner: &Value) -> i64 {
    owner["spec"]["replicas"].as_i64().unwrap_or(1)
}

fn rank(p: &Value) -> (bool, u8, bool, std::cmp::Reverse<i64>) {
    // Smaller sorts first = deleted first (Kubernetes' ActivePods order).
    let assigned = p["spec"]["nodeName"]
        .as_str()
        .is_some_and(|s| !s.is_empty());
    let phase = match util::pod_phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        _ => 2,
    };
    let restarts: i64 = p["status"]["containerStatuses"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["restartCount"].as_i64()).sum())
        .unwrap_or(0);
    (
        assigned,
        phase,
        util::pod_ready(p),
        std::cmp::Reverse(restarts),
    )
}

/// Pods in the order they should be deleted: unscheduled, pending, not ready,
/// most restarted, newest.
pub fn deletion_order(pods: &mut [Arc<Value>]) {
    pods.sort_by(|a, b| match rank(a).cmp(&rank(b)) {
        Ordering::Equal => util::creation(b).cmp(util::creation(a)),
        o => o,
    });
}

/// What to do: create `create` pods, delete `delete`, and the status to report.
#[derive(Debug)]
pub struct Plan {
    pub create: usize,
    pub delete: Vec<Arc<Value>>,
    pub status: Value,
    /// Look again then (a pod becomes available after minReadySeconds).
    pub recheck: Option<Duration>,
}

/// Whether a pod's change can change what its ReplicaSet decides or reports:
/// not a bind, not a container's details, only what `plan` and adoption read
/// (labels, owners, deletion, phase, readiness and since when).
pub fn counts_change(old: &Value, new: &Value) -> bool {
    fn meta<'a>(p: &'a Value, f: &str) -> Option<&'a Value> {
        p.get("metadata").and_then(|m| m.get(f))
    }
    fn ready(p: &Value) -> Option<(&Value, &Value)> {
        util::condition(p, "Ready").map(|c| (&c["status"], &c["lastTransitionTime"]))
    }
    ["labels", "ownerReferences", "deletionTimestamp"]
        .iter()
        .any(|f| meta(old, f) != meta(new, f))
        || util::pod_phase(old) != util::pod_phase(new)
        || ready(old) != ready(new)
}

fn template_labels(rs: &Value) -> Option<&Map<String, Value>> {
    rs["spec"]["template"]["metadata"]["labels"].as_object()
}

/// The decision for one ReplicaSet, given the pods it owns.
pub fn plan(rs: &Value, owned: &[Arc<Value>], now: f64) -> Plan {
    let facts: Vec<PodFacts> = owned
        .iter()
        .map(|p| PodFacts::of(p, None, template_labels(rs)))
        .collect();
    plan_from(rs, owned, &facts, now)
}

/// `plan` with each owned pod's facts already known.
fn plan_from(rs: &Value, owned: &[Arc<Value>], facts: &[PodFacts], now: f64) -> Plan {
    let want = replicas(rs).max(0) as usize;
    let min_ready = rs["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let active_facts = || facts.iter().filter(|f| f.active);
    let n_active = active_facts().count();
    let ready = active_facts().filter(|f| f.ready).count();
    let available = active_facts()
        .filter(|f| f.available(min_ready, now))
        .count();
    let fully = active_facts().filter(|f| f.fully_labeled).count();
    let mut status = rs["status"].clone();
    if !status.is_object() {
        status = json!({});
    }
    status["replicas"] = json!(n_active);
    status["fullyLabeledReplicas"] = json!(fully);
    status["readyReplicas"] = json!(ready);
    status["availableReplicas"] = json!(available);
    status["observedGeneration"] = json!(util::generation(rs));
    let recheck = (min_ready > 0 && ready > available).then(|| Duration::from_secs(1));
    let (create, delete) = match n_active.cmp(&want) {
        Ordering::Less => ((want - n_active).min(BURST), Vec::new()),
        Ordering::Greater => {
            let mut active: Vec<Arc<Value>> = owned
                .iter()
                .zip(facts)
                .filter(|(_, f)| f.active)
                .map(|(p, _)| p.clone())
                .collect();
            deletion_order(&mut active);
            let n = (active.len() - want).min(BURST);
            (0, active.into_iter().take(n).collect())
        }
        Ordering::Equal => (0, Vec::new()),
    };
    Plan {
        create,
        delete,
        status,
        recheck,
    }
}

impl ReplicaSets {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(rs) = ctx
            .store
            .get(self.resource, key)
            .filter(|rs| !util::deleting(rs))
        else {
            self.memo
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
            return Ok(None);
        };
        // Parsed once; a selector that does not parse selects nothing.
        let selector = selector_of(&rs);
        let sel = LabelSelector::from_object(&selector).ok();
        let selects = |p: &Value| sel.as_ref().is_some_and(|s| s.matches(p));
        let uid = util::uid(&rs).to_string();
        let mut owned: Vec<Arc<Value>> = Vec::new();
        let mut facts: Vec<PodFacts> = Vec::new();
        let mut writes = Vec::new();
        // Pods it controls; those that no longer match are released. Facts
        // about a pod version seen by the last sync are not worked out again.
        let basis = (
            selector,
            template_labels(&rs).map_or(Value::Null, |m| Value::Object(m.clone())),
        );
        let mut memo = self
            .memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .filter(|m| m.basis == basis)
            .map(|m| m.pods)
            .unwrap_or_default();
        let mut seen = std::collections::HashMap::with_capacity(memo.len().max(16));
        for p in ctx.store.controlled("pods", &uid) {
            let at = Arc::as_ptr(&p) as usize;
            let f = match memo.remove(&at) {
                Some((_, f)) => f,
                None => PodFacts::of(&p, sel.as_ref(), template_labels(&rs)),
            };
            seen.insert(at, (p.clone(), f));
            if f.selected {
                owned.push(p);
                facts.push(f);
            } else if !util::deleting(&p) {
                let mut np = (*p).clone();
                if let Some(refs) = np["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|o| o["uid"] != uid.as_str());
                }
                writes.push(np);
            }
        }
        drop(memo);
        self.memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), Memo { basis, pods: seen });
        // Orphans that match are adopted.
        for p in ctx.store.orphan_pods(util::namespace(&rs)) {
            if pod_active(&p) && selects(&p) {
                writes.push(util::adopted(&p, &rs));
            }
        }
        if !writes.is_empty() {
            for r in futures::future::join_all(writes.into_iter().map(|p| ctx.update(p))).await {
                r?;
            }
            return Ok(Some(Duration::ZERO));
        }
        let plan = plan_from(&rs, &owned, &facts, util::now_secs());
        if plan.create > 0 {
            let prefix = util::generate_prefix(util::name(&rs));
            let pods = (0..plan.create)
                .map(|_| ctx.create(util::pod_from_template(&rs, Some(prefix.clone()), None)));
            let results = futures::future::join_all(pods).await;
            let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
            let made = results.len() - failed.len();
            if made > 0 {
                ctx.event(
                    &rs,
                    "Normal",
                    "SuccessfulCreate",
                    format!("Created {made} pod(s)"),
                );
            }
            if let Some(e) = failed.first() {
                ctx.event(
                    &rs,
                    "Warning",
                    "FailedCreate",
                    format!("Error creating: {e}"),
                );
                return Err((*e).clone());
            }
        }
        if !plan.delete.is_empty() {
            let n = plan.delete.len();
            let dels = plan.delete.iter().map(|p| ctx.delete("pods", p, None));
            for r in futures::future::join_all(dels).await {
                r?;
            }
            ctx.event(
                &rs,
                "Normal",
                "SuccessfulDelete",
                format!("Deleted {n} pod(s)"),
            );
        }
        if plan.status != rs["status"] {
            let mut n = (*rs).clone();
            n["status"] = plan.status;
            ctx.update_status(n).await?;
        }
        Ok(plan.recheck)
    }
}

impl Reconciler for ReplicaSets {
    fn name(&self) -> &'static str {
        if self.kind == "ReplicaSet" {
            "replicaset-controller"
        } else {
            "replication-controller"
        }
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        if ch.resource == self.resource {
            return vec![ch.key.clone()];
        }
        if ch.resource != "pods" {
            return Vec::new();
        }
        if let (EventType::Modified, Some(old)) = (ch.event, &ch.old) {
            if !counts_change(old, &ch.object) {
                return Vec::new();
            }
        }
        let mut keys = Vec::new();
        for p in std::iter::once(&ch.object).chain(ch.old.iter()) {
            match util::owner_key(p, self.kind) {
                Some(k) => keys.push(k),
                None if util::controller_ref(p).is_none() => {
                    // An orphan: whoever would adopt it.
                    let l = util::labels(p);
                    for rs in ctx.store.list_ns(self.resource, util::namespace(p)) {
                        if util::selector_matches(&selector_of(&rs), &l) {
                            keys.push(crate::store::key_of(&rs));
                        }
                    }
                }
                None => {}
            }
        }
        keys.dedup();
        keys
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys(self.resource)
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, phase: &str, ready: bool, created: &str) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": name, "creationTimestamp": created},
            "spec": {"nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}),
        )
    }

    fn rs(replicas: i64) -> Value {
        json!({"kind": "ReplicaSet", "metadata": {"name": "r", "generation": 2},
               "spec": {"replicas": replicas, "template": {"metadata": {"labels": {"a": "b"}}}}})
    }

    #[test]
    fn binds_and_container_details_do_not_count() {
        let p = pod("a", "", "Pending", false, "2026-01-01T00:00:00Z");
        let mut bound = (*p).clone();
        bound["spec"]["nodeName"] = json!("n1");
        assert!(!counts_change(&p, &bound));
        let mut restarted = bound.clone();
        restarted["status"]["containerStatuses"] = json!([{"name": "c", "restartCount": 1}]);
        assert!(!counts_change(&bound, &restarted));
        let running = pod("a", "n1", "Running", true, "2026-01-01T00:00:00Z");
        assert!(counts_change(&bound, &running));
        let mut relabelled = (*running).clone();
        relabelled["metadata"]["labels"]["app"] = json!("other");
        assert!(counts_change(&running, &relabelled));
        let mut deleting = (*running).clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
        assert!(counts_change(&running, &deleting));
    }

    #[test]
    fn creates_what_is_missing_and_counts_status() {
        let pods = vec![pod("a", "n1", "Running", true, "t1")];
        let p = plan(&rs(3), &pods, 0.0);
        assert_eq!(p.create, 2);
        assert!(p.delete.is_empty());
        assert_eq!(p.status["replicas"], 1);
        assert_eq!(p.status["readyReplicas"], 1);
        assert_eq!(p.status["observedGeneration"], 2);
    }

    #[test]
    fn deletes_unscheduled_then_not_ready_then_newest() {
        let pods = vec![
            pod("old-ready", "n1", "Running", true, "2020-01-01T00:00:00Z"),
            pod("new-ready", "n1", "Running", true, "2021-01-01T00:00:00Z"),
            pod("not-ready", "n1", "Running", false, "2019-01-01T00:00:00Z"),
            pod("unscheduled", "", "Pending", false, "2018-01-01T00:00:00Z"),
        ];
        let p = plan(&rs(1), &pods, 0.0);
        let names: Vec<&str> = p.delete.iter().map(|p| util::name(p)).collect();
        assert_eq!(names, vec!["unscheduled", "not-ready", "new-ready"]);
    }

    #[test]
    fn finished_pods_are_replaced() {
        let pods = vec![pod("done", "n1", "Succeeded", false, "t")];
        assert_eq!(plan(&rs(1), &pods, 0.0).create, 1);
    }

    #[test]
    fn min_ready_seconds_counts_pods_ready_long_enough() {
        let mut p = (*pod("a", "n1", "Running", true, "t")).clone();
        p["status"]["conditions"][0]["lastTransitionTime"] = json!("2026-01-01T00:00:00Z");
        let t0 = util::parse_time("2026-01-01T00:00:00Z").unwrap();
        let mut r = rs(1);
        r["spec"]["minReadySeconds"] = json!(10);
        let pods = vec![Arc::new(p)];
        let early = plan(&r, &pods, t0 + 5.0);
        assert_eq!(early.status["readyReplicas"], 1);
        assert_eq!(early.status["availableReplicas"], 0);
        assert!(early.recheck.is_some());
        let later = plan(&r, &pods, t0 + 11.0);
        assert_eq!(later.status["availableReplicas"], 1);
        assert!(later.recheck.is_none());
    }

    #[test]
    fn rc_selector_is_a_map() {
        let rc = json!({"kind": "ReplicationController", "spec": {"selector": {"app": "x"}}});
        assert_eq!(selector_of(&rc), json!({"matchLabels": {"app": "x"}}));
    }
}
