//! Small pure helpers over JSON objects: metadata, owner references, pod state,
//! conditions, quantities and times.
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// `Value::pointer` without its per-segment allocations (a hot path here).
pub trait PathExt {
    fn get_path(&self, path: &[&str]) -> Option<&Value>;
}

impl PathExt for Value {
    fn get_path(&self, path: &[&str]) -> Option<&Value> {
        path.iter().try_fold(self, |v, k| v.get(*k))
    }
}

pub fn name(o: &Value) -> &str {
    o.get_path(&["metadata", "name"])
        .and_then(Value::as_str)
        .unwrap_or("")
}
pub fn namespace(o: &Value) -> &str {
    o.get_path(&["metadata", "namespace"])
        .and_then(Value::as_str)
        .unwrap_or("")
}
pub fn uid(o: &Value) -> &str {
    o.get_path(&["metadata", "uid"])
        .and_then(Value::as_str)
        .unwrap_or("")
}
pub fn resource_version(o: &Value) -> u64 {
    o.get_path(&["metadata", "resourceVersion"])
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
pub fn labels(o: &Value) -> BTreeMap<String, String> {
    o.get_path(&["metadata", "labels"])
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}
pub fn annotation<'a>(o: &'a Value, key: &str) -> Option<&'a str> {
    o.get_path(&["metadata", "annotations"])
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}
pub fn deleting(o: &Value) -> bool {
    o.get_path(&["metadata", "deletionTimestamp"])
        .is_some_and(|v| !v.is_null())
}
pub fn creation(o: &Value) -> &str {
    o.get_path(&["metadata", "creationTimestamp"])
        .and_then(Value::as_str)
        .unwrap_or("")
}
pub fn generation(o: &Value) -> i64 {
    o.get_path(&["metadata", "generation"])
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// The ownerReference that marks `o` as controlled by someone.
pub fn controller_ref(o: &Value) -> Option<&Value> {
    o.get_path(&["metadata", "ownerReferences"])
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r["controller"] == true)
}
pub fn controller_uid(o: &Value) -> Option<&str> {
    controller_ref(o).and_then(|r| r["uid"].as_str())
}

/// `namespace/name` of the `kind` that controls `o`, if one does.
pub fn owner_key(o: &Value, kind: &str) -> Option<String> {
    let r = controller_ref(o)?;
    (r["kind"] == kind).then(|| format!("{}/{}", namespace(o), r["name"].as_str().unwrap_or("")))
}

/// `o` with `owner` added as its controller (adoption).
pub fn adopted(o: &Value, owner: &Value) -> Value {
    let mut n = o.clone();
    let mut refs = n["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    refs.push(owner_ref(owner));
    n["metadata"]["ownerReferences"] = json!(refs);
    n
}

/// An ownerReference to `owner` that makes it the controller.
pub fn owner_ref(owner: &Value) -> Value {
    json!({
        "apiVersion": owner["apiVersion"], "kind": owner["kind"],
        "name": name(owner), "uid": uid(owner),
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// Seconds since the Unix epoch, from RFC 3339 (fractions allowed).
pub fn parse_time(ts: &str) -> Option<f64> {
    let t: k8s_openapi::jiff::Timestamp = ts.parse().ok()?;
    Some(t.as_millisecond() as f64 / 1000.0)
}

/// Now as seconds since the epoch.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// RFC 3339 of a time in seconds since the epoch (whole seconds, as Kubernetes writes).
pub fn rfc3339(secs: f64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// RFC 3339 with microseconds (Lease renewTime, MicroTime).
pub fn rfc3339_micro(secs: f64) -> String {
    k8s_openapi::jiff::Timestamp::from_microsecond((secs * 1e6) as i64)
        .map(|t| format!("{t:.6}"))
        .unwrap_or_default()
}

pub fn pod_phase(p: &Value) -> &str {
    p.get_path(&["status", "phase"])
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

/// Not finished and not being deleted (Kubernetes' "active" pod).
pub fn pod_active(p: &Value) -> bool {
    !deleting(p) && !matches!(pod_phase(p), "Succeeded" | "Failed")
}

pub fn condition<'a>(o: &'a Value, t: &str) -> Option<&'a Value> {
    o.get_path(&["status", "conditions"])
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["type"] == t)
}

pub fn condition_true(o: &Value, t: &str) -> bool {
    condition(o, t).is_some_and(|c| c["status"] == "True")
}

pub fn pod_ready(p: &Value) -> bool {
    condition_true(p, "Ready")
}

/// Ready for at least `min_ready` seconds at `now`.
pub fn pod_available(p: &Value, min_ready: i64, now: f64) -> bool {
    if !pod_ready(p) || deleting(p) {
        return false;
    }
    min_ready <= 0 || ready_long_enough(ready_since(p), min_ready, now)
}

/// When the pod's Ready condition last changed (to True, for a ready pod).
pub fn ready_since(p: &Value) -> Option<f64> {
    condition(p, "Ready")
        .and_then(|c| c["lastTransitionTime"].as_str())
        .and_then(parse_time)
}

/// Ready since `since` is at least `min_ready` seconds at `now`.
pub fn ready_long_enough(since: Option<f64>, min_ready: i64, now: f64) -> bool {
    min_ready <= 0 || since.is_some_and(|t| now - t >= min_ready as f64)
}

/// Set a condition in `status.conditions`, keeping lastTransitionTime when the
/// status does not change. Returns whether anything changed.
pub fn set_condition(
    obj: &mut Value,
    t: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) -> bool {
    // Each kind's condition type has its own "last seen" field (or none).
    let touch = match obj["kind"].as_str() {
        Some("Node") => Some("lastHeartbeatTime"),
        Some("Deployment") => Some("lastUpdateTime"),
        _ => None,
    };
    if !obj["status"].is_object() {
        obj["status"] = json!({});
    }
    if !obj["status"]["conditions"].is_array() {
        obj["status"]["conditions"] = json!([]);
    }
    let conds = obj["status"]["conditions"].as_array_mut().expect("array");
    if let Some(c) = conds.iter_mut().find(|c| c["type"] == t) {
        if c["status"] == status && c["reason"] == reason && c["message"] == message {
            return false;
        }
        if c["status"] != status {
            c["lastTransitionTime"] = json!(now);
        }
        c["status"] = json!(status);
        c["reason"] = json!(reason);
        c["message"] = json!(message);
        if let Some(f) = touch {
            c[f] = json!(now);
        }
        return true;
    }
    let mut c = json!({"type": t, "status": status, "reason": reason, "message": message,
                      "lastTransitionTime": now});
    if let Some(f) = touch {
        c[f] = json!(now);
    }
    conds.push(c);
    true
}

/// A Kubernetes quantity as a number: cpu in millicores with `milli`, bytes otherwise.
pub fn quantity(q: &Value, milli: bool) -> i64 {
    let s = match q {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return 0,
    };
    let (num, mult): (&str, f64) = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s.as_str(), 1.0));
    let v: f64 = num.parse().unwrap_or(0.0) * mult;
    if milli {
        (v * 1000.0).ceil() as i64
    } else {
        v.ceil() as i64
    }
}

/// Total requests of a pod's containers (init containers count by their maximum,
/// as in Kubernetes): (cpu millicores, memory bytes).
pub fn pod_requests(p: &Value) -> (i64, i64) {
    let sum = |list: &str| -> Vec<(i64, i64)> {
        p["spec"]
            .get(list)
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        let r = &c["resources"]["requests"];
                        let l = &c["resources"]["limits"];
                        // A limit without a request is the request (Kubernetes defaulting).
                        let pick = |k: &str, milli| {
                            if r.get(k).is_some() {
                                quantity(&r[k], milli)
                            } else {
                                quantity(&l[k], milli)
                            }
                        };
                        (pick("cpu", true), pick("memory", false))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let app = sum("containers")
        .into_iter()
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let init = sum("initContainers")
        .into_iter()
        .fold((0, 0), |a, b| (a.0.max(b.0), a.1.max(b.1)));
    (app.0.max(init.0), app.1.max(init.1))
}

/// Label selector of a workload (`spec.selector`), as a selector string check.
pub fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    orc_api::selector::LabelSelector::from_object(selector)
        .map(|s| s.matches_labels(labels))
        .unwrap_or(false)
}

/// An int-or-percent field (maxSurge, maxUnavailable) against `total`.
pub fn int_or_percent(v: &Value, total: i64, round_up: bool, default: &str) -> i64 {
    let v = if v.is_null() {
        json!(default)
    } else {
        v.clone()
    };
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => match s.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.parse().unwrap_or(0.0);
                let x = p * total as f64 / 100.0;
                if round_up {
                    x.ceil() as i64
                } else {
                    x.floor() as i64
                }
            }
            None => s.parse().unwrap_or(0),
        },
        _ => 0,
    }
}

/// A pod for `owner` from its `spec.template`.
pub fn pod_from_template(
    owner: &Value,
    generate_name: Option<String>,
    name: Option<String>,
) -> Value {
    let t = &owner["spec"]["template"];
    let mut meta = t["metadata"].as_object().cloned().unwrap_or_default();
    meta.remove("name");
    meta.remove("namespace");
    meta.insert("namespace".into(), json!(namespace(owner)));
    match (name, generate_name) {
        (Some(n), _) => {
            meta.insert("name".into(), json!(n));
        }
        (None, Some(g)) => {
            meta.insert("generateName".into(), json!(g));
        }
        _ => {}
    }
    meta.insert("ownerReferences".into(), json!([owner_ref(owner)]));
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": t["spec"].clone()})
}

/// The generateName prefix Kubernetes uses for a workload's pods.
pub fn generate_prefix(owner_name: &str) -> String {
    // Names are at most 63 characters with the 5-character suffix.
    let max = 58;
    let mut s: String = owner_name.chars().take(max - 1).collect();
    s.push('-');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity(&json!("500m"), true), 500);
        assert_eq!(quantity(&json!("2"), true), 2000);
        assert_eq!(quantity(&json!(1), true), 1000);
        assert_eq!(quantity(&json!("1Gi"), false), 1 << 30);
        assert_eq!(quantity(&json!("128M"), false), 128_000_000);
        assert_eq!(quantity(&json!("0.5"), true), 500);
    }

    #[test]
    fn requests_sum_containers_and_take_init_max() {
        let p = json!({"spec": {
            "containers": [{"resources": {"requests": {"cpu": "100m", "memory": "1Mi"}}},
                           {"resources": {"limits": {"cpu": "200m"}}}],
            "initContainers": [{"resources": {"requests": {"cpu": "1"}}}]}});
        assert_eq!(pod_requests(&p), (1000, 1 << 20));
    }

    #[test]
    fn percents() {
        assert_eq!(int_or_percent(&Value::Null, 10, true, "25%"), 3);
        assert_eq!(int_or_percent(&Value::Null, 10, false, "25%"), 2);
        assert_eq!(int_or_percent(&json!(2), 10, false, "25%"), 2);
        assert_eq!(int_or_percent(&json!("50%"), 5, true, "25%"), 3);
    }

    #[test]
    fn conditions_keep_transition_time() {
        let mut o = json!({"kind": "Deployment"});
        assert!(set_condition(&mut o, "Ready", "True", "R", "", "t1"));
        assert!(!set_condition(&mut o, "Ready", "True", "R", "", "t2"));
        assert!(set_condition(&mut o, "Ready", "True", "R2", "", "t3"));
        assert_eq!(condition(&o, "Ready").unwrap()["lastTransitionTime"], "t1");
        assert!(set_condition(&mut o, "Ready", "False", "R2", "", "t4"));
        assert_eq!(condition(&o, "Ready").unwrap()["lastTransitionTime"], "t4");
    }
}
