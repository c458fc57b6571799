//! CronJob: a Job for each time the five-field schedule (or `@hourly`-style
//! macro) fires in the CronJob's `timeZone`, honouring concurrencyPolicy,
//! startingDeadlineSeconds, suspend, and the history limits.
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util;
use futures::future::BoxFuture;
use orc_api::ApiError;
use serde_json::{json, Value};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A parsed schedule in a time zone.
pub struct Schedule {
    cron: croner::Cron,
    tz: jiff::tz::TimeZone,
}

impl Schedule {
    pub fn parse(schedule: &str, time_zone: Option<&str>) -> Result<Self, String> {
        let s = schedule.trim();
        if !s.starts_with('@') && s.split_whitespace().count() != 5 {
            return Err(format!("spec.schedule \"{s}\": needs five fields (minute hour day-of-month month day-of-week) or a macro like @hourly"));
        }
        let cron = croner::Cron::from_str(s).map_err(|e| format!("spec.schedule \"{s}\": {e}"))?;
        let tz = match time_zone {
            None | Some("") => jiff::tz::TimeZone::UTC,
            Some(z) => {
                jiff::tz::TimeZone::get(z).map_err(|e| format!("spec.timeZone \"{z}\": {e}"))?
            }
        };
        Ok(Schedule { cron, tz })
    }

    /// Does the schedule fire at this minute (seconds since the epoch)?
    pub fn fires_at(&self, minute: i64) -> bool {
        let Ok(ts) = jiff::Timestamp::from_second(minute) else {
            return false;
        };
        let z = ts.to_zoned(self.tz.clone());
        let Some(off) = chrono::FixedOffset::east_opt(z.offset().seconds()) else {
            return false;
        };
        let Some(dt) = chrono::DateTime::from_timestamp(minute, 0) else {
            return false;
        };
        self.cron
            .is_time_matching(&dt.with_timezone(&off))
            .unwrap_or(false)
    }

    /// The latest firing in (after, now], looking back at most a week.
    pub fn last_between(&self, after: f64, now: f64) -> Option<i64> {
        let mut m = (now as i64).div_euclid(60) * 60;
        let stop = (after as i64).max(now as i64 - 7 * 86400);
        while m > stop {
            if self.fires_at(m) {
                return Some(m);
            }
            m -= 60;
        }
        None
    }

    /// The next firing after `now`, looking ahead at most two days.
    pub fn next_after(&self, now: f64) -> Option<i64> {
        let start = (now as i64).div_euclid(60) * 60 + 60;
        (0..2 * 1440)
            .map(|i| start + i * 60)
            .find(|m| self.fires_at(*m))
    }
}

fn finished(job: &Value) -> Option<&'static str> {
    ["Complete", "Failed"]
        .into_iter()
        .find(|t| util::condition_true(job, t))
}

pub struct CronJobs;

impl CronJobs {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(cj) = ctx.store.get("cronjobs", key) else {
            return Ok(None);
        };
        if util::deleting(&cj) {
            return Ok(None);
        }
        let now = util::now_secs();
        let sched = match Schedule::parse(
            cj["spec"]["schedule"].as_str().unwrap_or(""),
            cj["spec"]["timeZone"].as_str(),
        ) {
            Ok(s) => s,
            Err(e) => {
                ctx.event(&cj, "Warning", "InvalidSchedule", e);
                return Ok(None);
            }
        };
        let mut jobs: Vec<Arc<Value>> = ctx
            .store
            .controlled("jobs", util::uid(&cj))
            .into_iter()
            .filter(|j| !util::deleting(j))
            .collect();
        jobs.sort_by_key(|j| util::creation(j).to_string());
        // History limits.
        for (kind, limit) in [
            ("Complete", "successfulJobsHistoryLimit"),
            ("Failed", "failedJobsHistoryLimit"),
        ] {
            let limit = cj["spec"][limit]
                .as_i64()
                .unwrap_or(if kind == "Complete" { 3 } else { 1 })
                .max(0) as usize;
            let done: Vec<&Arc<Value>> =
                jobs.iter().filter(|j| finished(j) == Some(kind)).collect();
            if done.len() > limit {
                for j in &done[..done.len() - limit] {
                    ctx.delete("jobs", j, Some("Background")).await?;
                }
            }
        }
        let mut active: Vec<Arc<Value>> = jobs
            .iter()
            .filter(|j| finished(j).is_none())
            .cloned()
            .collect();
        let mut n = (*cj).clone();
        let mut next = sched
            .next_after(now)
            .map(|t| Duration::from_secs_f64((t as f64 - now).max(0.0) + 0.05));
        if cj["spec"]["suspend"] != true {
            let since = cj["status"]["lastScheduleTime"]
                .as_str()
                .or_else(|| cj["metadata"]["creationTimestamp"].as_str())
                .and_then(util::parse_time)
                .unwrap_or(now);
            if let Some(t) = sched.last_between(since, now) {
                let late = now - t as f64;
                let deadline = cj["spec"]["startingDeadlineSeconds"].as_i64();
                if deadline.is_some_and(|d| late > d as f64) {
                    // Too late for this one; wait for the next.
                } else {
                    match cj["spec"]["concurrencyPolicy"].as_str().unwrap_or("Allow") {
                        "Forbid" if !active.is_empty() => {
                            // Skipped while one runs; looked at again when it ends.
                            next =
                                Some(next.map_or(Duration::from_secs(5), |d| {
                                    d.min(Duration::from_secs(5))
                                }));
                            return self.status(ctx, &cj, n, &active, next).await;
                        }
                        "Replace" => {
                            for j in active.drain(..) {
                                ctx.delete("jobs", &j, Some("Background")).await?;
                            }
                        }
                        _ => {}
                    }
                    let job = job_for(&cj, t);
                    match ctx.create(job).await {
                        Ok(j) => {
                            ctx.event(
                                &cj,
                                "Normal",
                                "SuccessfulCreate",
                                format!("Created job {}", util::name(&j)),
                            );
                            active.push(Arc::new(j));
                        }
                        Err(e) if e.reason == orc_api::Reason::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                    n["status"]["lastScheduleTime"] = json!(util::rfc3339(t as f64));
                }
            }
        }
        self.status(ctx, &cj, n, &active, next).await
    }

    async fn status(
        &self,
        ctx: &Ctx,
        cj: &Value,
        mut n: Value,
        active: &[Arc<Value>],
        next: Option<Duration>,
    ) -> Outcome {
        let refs: Vec<Value> = active
            .iter()
            .map(|j| json!({"apiVersion": "batch/v1", "kind": "Job", "name": util::name(j), "namespace": util::namespace(j), "uid": util::uid(j)}))
            .collect();
        n["status"]["active"] = json!(refs);
        if n["status"] != cj["status"] {
            ctx.update_status(n).await.map_err(|e: ApiError| e)?;
        }
        Ok(next)
    }
}

/// The Job for the run scheduled at `t` (named by its minute, so a run is made once).
pub fn job_for(cj: &Value, t: i64) -> Value {
    let jt = &cj["spec"]["jobTemplate"];
    let mut meta = jt["metadata"].as_object().cloned().unwrap_or_default();
    meta.insert(
        "name".into(),
        json!(format!("{}-{}", util::name(cj), t / 60)),
    );
    meta.insert("namespace".into(), json!(util::namespace(cj)));
    meta.insert("ownerReferences".into(), json!([util::owner_ref(cj)]));
    let mut ann = meta
        .get("annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    ann.insert(
        "batch.kubernetes.io/cronjob-scheduled-timestamp".into(),
        json!(util::rfc3339(t as f64)),
    );
    meta.insert("annotations".into(), Value::Object(ann));
    json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": jt["spec"].clone()})
}

impl Reconciler for CronJobs {
    fn name(&self) -> &'static str {
        "cronjob-controller"
    }

    fn keys_for(&self, _ctx: &Ctx, ch: &Change) -> Vec<String> {
        match ch.resource {
            "cronjobs" => vec![ch.key.clone()],
            "jobs" => util::owner_key(&ch.object, "CronJob").into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.keys("cronjobs")
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> i64 {
        util::parse_time(s).unwrap() as i64
    }

    #[test]
    fn five_fields_and_macros() {
        assert!(Schedule::parse("*/5 * * * *", None).is_ok());
        assert!(Schedule::parse("@hourly", None).is_ok());
        assert!(Schedule::parse("* * * *", None).is_err());
        assert!(Schedule::parse("0 * * * * *", None).is_err());
        assert!(Schedule::parse("* * * * *", Some("Mars/Olympus")).is_err());
    }

    #[test]
    fn last_and_next() {
        let s = Schedule::parse("*/15 * * * *", None).unwrap();
        let now = t("2024-05-01T10:37:20Z") as f64;
        assert_eq!(
            s.last_between(now - 3600.0, now),
            Some(t("2024-05-01T10:30:00Z"))
        );
        assert_eq!(s.next_after(now), Some(t("2024-05-01T10:45:00Z")));
        // Nothing new since the last run at 10:30.
        assert_eq!(s.last_between(t("2024-05-01T10:30:00Z") as f64, now), None);
        let h = Schedule::parse("@hourly", None).unwrap();
        assert_eq!(h.next_after(now), Some(t("2024-05-01T11:00:00Z")));
    }

    #[test]
    fn time_zones() {
        // 09:00 in Tokyo is 00:00 UTC.
        let s = Schedule::parse("0 9 * * *", Some("Asia/Tokyo")).unwrap();
        let now = t("2024-05-01T12:00:00Z") as f64;
        assert_eq!(s.next_after(now), Some(t("2024-05-02T00:00:00Z")));
    }

    #[test]
    fn job_names_follow_the_minute() {
        let cj = json!({"metadata": {"name": "c", "namespace": "n", "uid": "u"},
            "spec": {"jobTemplate": {"spec": {"template": {}}}}});
        assert_eq!(job_for(&cj, 120)["metadata"]["name"], "c-2");
    }
}
