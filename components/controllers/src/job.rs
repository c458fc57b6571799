//! Job: run pods until `completions` succeed (at most `parallelism` at once),
//! or fail after `backoffLimit` failures (with exponential back-off between
//! retries) or `activeDeadlineSeconds`; Indexed mode runs each index once with
//! `JOB_COMPLETION_INDEX`; finished Jobs go after `ttlSecondsAfterFinished`.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

pub const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

/// What the pods of a Job say.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally {
    pub active: Vec<Arc<Value>>,
    pub succeeded: usize,
    pub failed: usize,
    pub ready: usize,
    /// Indexed: indexes done, and indexes running.
    pub done_indexes: BTreeSet<i64>,
    pub active_indexes: BTreeSet<i64>,
    /// When the last pod failed (seconds since the epoch).
    pub last_failure: Option<f64>,
}

pub fn index_of(p: &Value) -> Option<i64> {
    util::annotation(p, INDEX_ANNOTATION).and_then(|s| s.parse().ok())
}

pub fn tally(pods: &[Arc<Value>]) -> Tally {
    let mut t = Tally::default();
    for p in pods {
        match util::pod_phase(p) {
            "Succeeded" => {
                t.succeeded += 1;
                if let Some(i) = index_of(p) {
                    t.done_indexes.insert(i);
                }
            }
            "Failed" => {
                t.failed += 1;
                let fin = p["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
                    .as_str()
                    .and_then(util::parse_time);
                let fin = fin.unwrap_or(0.0);
                t.last_failure = Some(t.last_failure.map_or(fin, |l| l.max(fin)));
            }
            _ if !util::deleting(p) => {
                if util::pod_ready(p) {
                    t.ready += 1;
                }
                if let Some(i) = index_of(p) {
                    t.active_indexes.insert(i);
                }
                t.active.push(p.clone());
            }
            _ => {}
        }
    }
    t
}

/// "0-2,4,6-7"
pub fn compress(ix: &BTreeSet<i64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = ix.iter().peekable();
    while let Some(&a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&&(b + 1)) {
            b += 1;
            it.next();
        }
        out.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    out.join(",")
}

#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Create pods (Some(index) in Indexed mode).
    Create(Vec<Option<i64>>),
    /// Wait this long before creating more (back-off after failures).
    Wait(Duration),
    Complete,
    Failed(&'static str, String),
    Nothing,
}

/// The decision for one Job (`backoff` is the first retry delay).
pub fn decide(job: &Value, t: &Tally, now: f64, backoff: Duration) -> Decision {
    let spec = &job["spec"];
    let indexed = spec["completionMode"] == "Indexed";
    let completions = spec["completions"].as_i64();
    let parallelism = spec["parallelism"].as_i64().unwrap_or(1).max(0) as usize;
    let limit = spec["backoffLimit"].as_i64().unwrap_or(6).max(0) as usize;
    let done = match (indexed, completions) {
        (true, Some(c)) => t.done_indexes.len() as i64 >= c,
        (false, Some(c)) => t.succeeded as i64 >= c,
        // No completions: done when one succeeds and none are running.
        (_, None) => t.succeeded > 0 && t.active.is_empty(),
    };
    if done {
        return Decision::Complete;
    }
    if t.failed > limit {
        return Decision::Failed(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit".into(),
        );
    }
    if let (Some(d), Some(start)) = (
        spec["activeDeadlineSeconds"].as_i64(),
        job["status"]["startTime"]
            .as_str()
            .and_then(util::parse_time),
    ) {
        if now - start >= d as f64 {
            return Decision::Failed(
                "DeadlineExceeded",
                "Job was active longer than specified deadline".into(),
            );
        }
    }
    if spec["suspend"] == true {
        return Decision::Nothing;
    }
    if t.failed > 0 {
        let delay = backoff.as_secs_f64() * 2f64.powi((t.failed as i32 - 1).min(20));
        let delay = delay.min(360.0);
        if let Some(last) = t.last_failure {
            if now < last + delay {
                return Decision::Wait(Duration::from_secs_f64(last + delay - now));
            }
        }
    }
    let room = parallelism.saturating_sub(t.active.len());
    if room == 0 {
        return Decision::Nothing;
    }
    let wanted: Vec<Option<i64>> = if indexed {
        let c = completions.unwrap_or(1);
        (0..c)
            .filter(|i| !t.done_indexes.contains(i) && !t.active_indexes.contains(i))
            .take(room)
            .map(Some)
            .collect()
    } else {
        let left = match completions {
            Some(c) => (c as usize).saturating_sub(t.succeeded + t.active.len()),
            None => usize::from(t.succeeded == 0) * parallelism.saturating_sub(t.active.len()),
        };
        vec![None; left.min(room)]
    };
    if wanted.is_empty() {
        Decision::Nothing
    } else {
        Decision::Create(wanted)
    }
}

fn pod_for(job: &Value, index: Option<i64>) -> Value {
    let mut p = util::pod_from_template(job, Some(util::generate_prefix(util::name(job))), None);
    if let Some(i) = index {
        p["metadata"]["generateName"] =
            json!(util::generate_prefix(&format!("{}-{i}", util::name(job))));
        p["metadata"]["annotations"][INDEX_ANNOTATION] = json!(i.to_string());
        p["metadata"]["labels"][INDEX_ANNOTATION] = json!(i.to_string());
        p["spec"]["hostname"] = json!(format!("{}-{i}", util::name(job)));
        for list in ["containers", "initContainers"] {
            if let Some(cs) = p["spec"][list].as_array_mut() {
                for c in cs {
                    let mut env = c["env"].as_array().cloned().unwrap_or_default();
                    env.push(json!({"name": "JOB_COMPLETION_INDEX", "value": i.to_string()}));
                    c["env"] = json!(env);
                }
            }
        }
    }
    p
}

pub struct Jobs;

fn finished(job: &Value) -> Option<f64> {
    ["Complete", "Failed"]
        .iter()
        .find_map(|t| util::condition(job, t).filter(|c| c["status"] == "True"))
        .and_then(|c| c["lastTransitionTime"].as_str())
        .and_then(util::parse_time)
}

impl Jobs {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(job) = ctx.store.get("jobs", key) else {
            return Ok(None);
        };
        if util::deleting(&job) {
            return Ok(None);
        }
        let now = util::now_secs();
        if let Some(t) = finished(&job) {
            if let Some(ttl) = job["spec"]["ttlSecondsAfterFinished"].as_i64() {
                let at = t + ttl as f64;
                if now >= at {
                    ctx.delete("jobs", &job, Some("Background")).await?;
                    return Ok(None);
                }
                return Ok(Some(Duration::from_secs_f64(at - now + 0.1)));
            }
            return Ok(None);
        }
        let pods = ctx.store.controlled("pods", util::uid(&job));
        let t = tally(&pods);
        let ts = util::rfc3339(now);
        let mut n = (*job).clone();
        if n["status"]["startTime"].is_null() && job["spec"]["suspend"] != true {
            n["status"]["startTime"] = json!(ts);
        }
        let decision = decide(&n, &t, now, ctx.settings.job_backoff);
        let mut recheck = None;
        let mut end_active = false;
        match &decision {
            Decision::Create(ix) => {
                let made =
                    futures::future::join_all(ix.iter().map(|i| ctx.create(pod_for(&job, *i))))
                        .await;
                let ok = made.iter().filter(|r| r.is_ok()).count();
                if ok > 0 {
                    ctx.event(
                        &job,
                        "Normal",
                        "SuccessfulCreate",
                        format!("Created {ok} pod(s)"),
                    );
                }
                for r in made {
                    r?;
                }
            }
            Decision::Wait(d) => recheck = Some(*d),
            Decision::Complete => {
                util::set_condition(&mut n, "Complete", "True", "", "", &ts);
                n["status"]["completionTime"] = json!(ts);
                ctx.event(&job, "Normal", "Completed", "Job completed".into());
                end_active = true;
            }
            Decision::Failed(reason, msg) => {
                util::set_condition(&mut n, "Failed", "True", reason, msg, &ts);
                ctx.event(&job, "Warning", reason, msg.clone());
                end_active = true;
            }
            Decision::Nothing => {}
        }
        if end_active {
            for p in &t.active {
                ctx.delete("pods", p, None).await?;
            }
        }
        let st = &mut n["status"];
        st["active"] = json!(if end_active { 0 } else { t.active.len() });
        st["succeeded"] = json!(t.succeeded);
        st["failed"] = json!(t.failed);
        st["ready"] = json!(t.ready);
        if job["spec"]["completionMode"] == "Indexed" {
            st["completedIndexes"] = json!(compress(&t.done_indexes));
        }
        if n["status"] != job["status"] {
            ctx.update_status(n).await?;
        }
        if let (Some(d), Some(start)) = (
            job["spec"]["activeDeadlineSeconds"].as_i64(),
            job["status"]["startTime"]
                .as_str()
                .and_then(util::parse_time),
        ) {
            let left = Duration::from_secs_f64((start + d as f64 - now).max(0.0) + 0.1);
            recheck = Some(recheck.map_or(left, |r: Duration| r.min(left)));
        }
        Ok(recheck)
    }
}

impl Reconciler for Jobs {
    fn name(&self) -> &'static str {
        "job-controller"
    }

    fn keys_for(&self, _ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "jobs" => vec![ch.key.clone()],
            "pods" => util::owner_key(&ch.object, "Job").into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys("jobs")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: Value) -> Value {
        json!({"metadata": {"name": "j"}, "spec": spec, "status": {}})
    }
    fn pod(phase: &str, index: Option<i64>) -> Arc<Value> {
        let mut p =
            json!({"metadata": {"name": "p", "annotations": {}}, "status": {"phase": phase}});
        if let Some(i) = index {
            p["metadata"]["annotations"][INDEX_ANNOTATION] = json!(i.to_string());
        }
        Arc::new(p)
    }
    const B: Duration = Duration::from_secs(10);

    #[test]
    fn parallelism_and_completions() {
        let j = job(json!({"completions": 5, "parallelism": 2}));
        assert_eq!(
            decide(&j, &tally(&[]), 0.0, B),
            Decision::Create(vec![None, None])
        );
        let t = tally(&[pod("Running", None), pod("Succeeded", None)]);
        assert_eq!(decide(&j, &t, 0.0, B), Decision::Create(vec![None]));
        let t = tally(&[pod("Running", None), pod("Running", None)]);
        assert_eq!(decide(&j, &t, 0.0, B), Decision::Nothing);
        // 4 done, 1 running: nothing more even with room.
        let t = tally(&[
            pod("Succeeded", None),
            pod("Succeeded", None),
            pod("Succeeded", None),
            pod("Succeeded", None),
            pod("Running", None),
        ]);
        assert_eq!(decide(&j, &t, 0.0, B), Decision::Nothing);
        let done: Vec<_> = (0..5).map(|_| pod("Succeeded", None)).collect();
        assert_eq!(decide(&j, &tally(&done), 0.0, B), Decision::Complete);
    }

    #[test]
    fn backoff_limit_and_delay() {
        let j = job(json!({"completions": 1, "parallelism": 1, "backoffLimit": 2}));
        let t = tally(&[pod("Failed", None)]);
        // Failed at time 0 (no finish time): 10 s back-off.
        assert!(matches!(decide(&j, &t, 5.0, B), Decision::Wait(_)));
        assert_eq!(decide(&j, &t, 11.0, B), Decision::Create(vec![None]));
        let t = tally(&[pod("Failed", None), pod("Failed", None)]);
        assert!(
            matches!(decide(&j, &t, 15.0, B), Decision::Wait(_)),
            "20 s after the second failure"
        );
        let t = tally(&[
            pod("Failed", None),
            pod("Failed", None),
            pod("Failed", None),
        ]);
        assert!(matches!(
            decide(&j, &t, 0.0, B),
            Decision::Failed("BackoffLimitExceeded", _)
        ));
    }

    #[test]
    fn indexed_runs_each_index_once() {
        let j = job(json!({"completions": 4, "parallelism": 2, "completionMode": "Indexed"}));
        assert_eq!(
            decide(&j, &tally(&[]), 0.0, B),
            Decision::Create(vec![Some(0), Some(1)])
        );
        let t = tally(&[pod("Succeeded", Some(0)), pod("Running", Some(1))]);
        assert_eq!(decide(&j, &t, 0.0, B), Decision::Create(vec![Some(2)]));
        assert_eq!(
            compress(&[0, 1, 2, 4, 6, 7].into_iter().collect()),
            "0-2,4,6-7"
        );
        let p = pod_for(
            &json!({"metadata": {"name": "j", "namespace": "x", "uid": "u"},
            "spec": {"template": {"spec": {"containers": [{"name": "c"}]}}}}),
            Some(3),
        );
        assert_eq!(
            p["spec"]["containers"][0]["env"][0],
            json!({"name": "JOB_COMPLETION_INDEX", "value": "3"})
        );
    }

    #[test]
    fn deadline() {
        let mut j = job(json!({"completions": 1, "activeDeadlineSeconds": 5}));
        j["status"]["startTime"] = json!("2020-01-01T00:00:00Z");
        let t0 = util::parse_time("2020-01-01T00:00:00Z").unwrap();
        assert!(matches!(
            decide(&j, &tally(&[]), t0 + 6.0, B),
            Decision::Failed("DeadlineExceeded", _)
        ));
    }
}
