//! Kubernetes defaulting at admission: fields a user leaves out get the values
//! Kubernetes would give them, so what is stored (and what controllers read) is
//! complete. Applied on create and update; applying twice changes nothing.
use serde_json::{json, Value};

/// Settings of the admission defaults.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// The `DefaultTolerationSeconds` admission plugin: pods tolerate not-ready
    /// and unreachable nodes this long before eviction.
    pub toleration_seconds: i64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            toleration_seconds: 300,
        }
    }
}

fn set(v: &mut Value, key: &str, default: Value) {
    if let Some(m) = v.as_object_mut() {
        if m.get(key).is_none_or(Value::is_null) {
            m.insert(key.to_string(), default);
        }
    }
}

fn obj<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    if !v[key].is_object() {
        v[key] = json!({});
    }
    &mut v[key]
}

/// A pod spec (of a pod or of a template).
fn pod_spec(spec: &mut Value, restart: &str) {
    set(spec, "restartPolicy", json!(restart));
    set(spec, "terminationGracePeriodSeconds", json!(30));
    set(spec, "dnsPolicy", json!("ClusterFirst"));
    set(spec, "schedulerName", json!("default-scheduler"));
    set(spec, "enableServiceLinks", json!(true));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec[list].as_array_mut() {
            for c in cs {
                set(c, "imagePullPolicy", json!(image_pull_policy(c)));
                set(c, "terminationMessagePath", json!("/dev/termination-log"));
                if let Some(ports) = c["ports"].as_array_mut() {
                    for p in ports {
                        set(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

/// `Always` for `:latest` or untagged images, `IfNotPresent` otherwise.
fn image_pull_policy(c: &Value) -> &'static str {
    let image = c["image"].as_str().unwrap_or("");
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        "IfNotPresent"
    } else {
        match name.split_once(':') {
            Some((_, "latest")) | None => "Always",
            Some(_) => "IfNotPresent",
        }
    }
}

fn template(spec: &mut Value, restart: &str) {
    let t = obj(spec, "template");
    pod_spec(obj(t, "spec"), restart);
}

fn tolerations(spec: &mut Value, seconds: i64) {
    let mut list = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let covered = list.iter().any(|t| {
            (t["key"] == key || (t["key"].is_null() && t["operator"] == "Exists"))
                && (t["effect"].is_null() || t["effect"] == "NoExecute" || t["effect"] == "")
        });
        if !covered {
            list.push(
                json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                             "tolerationSeconds": seconds}),
            );
        }
    }
    spec["tolerations"] = Value::Array(list);
}

/// Fill in what Kubernetes fills in for `kind`.
pub fn apply(kind: &str, o: &mut Value, d: &Defaults) {
    match kind {
        "Namespace" => {
            let spec = obj(o, "spec");
            set(spec, "finalizers", json!(["kubernetes"]));
            set(obj(o, "status"), "phase", json!("Active"));
        }
        "Pod" => {
            let spec = obj(o, "spec");
            pod_spec(spec, "Always");
            tolerations(spec, d.toleration_seconds);
            set(obj(o, "status"), "phase", json!("Pending"));
        }
        "ReplicaSet" | "ReplicationController" => {
            let spec = obj(o, "spec");
            set(spec, "replicas", json!(1));
            template(spec, "Always");
        }
        "Deployment" => {
            let spec = obj(o, "spec");
            set(spec, "replicas", json!(1));
            set(spec, "revisionHistoryLimit", json!(10));
            set(spec, "progressDeadlineSeconds", json!(600));
            let st = obj(spec, "strategy");
            set(st, "type", json!("RollingUpdate"));
            if st["type"] == "RollingUpdate" {
                let ru = obj(st, "rollingUpdate");
                set(ru, "maxSurge", json!("25%"));
                set(ru, "maxUnavailable", json!("25%"));
            }
            template(spec, "Always");
        }
        "DaemonSet" => {
            let spec = obj(o, "spec");
            set(spec, "revisionHistoryLimit", json!(10));
            let st = obj(spec, "updateStrategy");
            set(st, "type", json!("RollingUpdate"));
            if st["type"] == "RollingUpdate" {
                let ru = obj(st, "rollingUpdate");
                set(ru, "maxUnavailable", json!(1));
                set(ru, "maxSurge", json!(0));
            }
            template(spec, "Always");
        }
        "StatefulSet" => {
            let spec = obj(o, "spec");
            set(spec, "replicas", json!(1));
            set(spec, "revisionHistoryLimit", json!(10));
            set(spec, "podManagementPolicy", json!("OrderedReady"));
            let st = obj(spec, "updateStrategy");
            set(st, "type", json!("RollingUpdate"));
            if st["type"] == "RollingUpdate" {
                set(obj(st, "rollingUpdate"), "partition", json!(0));
            }
            template(spec, "Always");
        }
        "Job" => {
            let spec = obj(o, "spec");
            let indexed = spec["completionMode"] == "Indexed";
            set(spec, "parallelism", json!(1));
            if !indexed || spec["completions"].is_null() {
                set(spec, "completions", json!(1));
            }
            set(spec, "backoffLimit", json!(6));
            set(spec, "completionMode", json!("NonIndexed"));
            set(spec, "suspend", json!(false));
            template(spec, "Never");
            // The selector Kubernetes generates: this Job's uid.
            let uid = o
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .map(String::from);
            let name = o
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(String::from);
            if let (Some(uid), Some(name)) = (uid, name) {
                let spec = obj(o, "spec");
                if spec["selector"].is_null() && spec["manualSelector"] != true {
                    spec["selector"] =
                        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
                    let meta = obj(obj(spec, "template"), "metadata");
                    let labels = obj(meta, "labels");
                    for (k, v) in [
                        ("batch.kubernetes.io/controller-uid", &uid),
                        ("controller-uid", &uid),
                        ("batch.kubernetes.io/job-name", &name),
                        ("job-name", &name),
                    ] {
                        set(labels, k, json!(v));
                    }
                }
            }
        }
        "CronJob" => {
            let spec = obj(o, "spec");
            set(spec, "concurrencyPolicy", json!("Allow"));
            set(spec, "suspend", json!(false));
            set(spec, "successfulJobsHistoryLimit", json!(3));
            set(spec, "failedJobsHistoryLimit", json!(1));
            let jt = obj(spec, "jobTemplate");
            let js = obj(jt, "spec");
            set(js, "backoffLimit", json!(6));
            template(js, "Never");
        }
        "Service" => {
            let spec = obj(o, "spec");
            set(spec, "type", json!("ClusterIP"));
            set(spec, "sessionAffinity", json!("None"));
            if let Some(ports) = spec["ports"].as_array_mut() {
                for p in ports {
                    set(p, "protocol", json!("TCP"));
                    let port = p["port"].clone();
                    set(p, "targetPort", port);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_kubernetes_defaults_once() {
        let mut p = json!({"kind": "Pod", "spec": {"containers": [{"name": "c", "image": "busybox"}],
            "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 5}]}});
        apply("Pod", &mut p, &Defaults::default());
        let again = p.clone();
        apply("Pod", &mut p, &Defaults::default());
        assert_eq!(p, again);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        let t = p["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0]["tolerationSeconds"], 5);
        assert_eq!(t[1]["key"], "node.kubernetes.io/not-ready");
        assert_eq!(t[1]["tolerationSeconds"], 300);
    }

    #[test]
    fn deployment_and_job_defaults() {
        let mut d =
            json!({"spec": {"template": {"spec": {"containers": [{"image": "nginx:1.25"}]}}}});
        apply("Deployment", &mut d, &Defaults::default());
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        let mut j = json!({"spec": {"template": {"spec": {}}}});
        apply("Job", &mut j, &Defaults::default());
        assert_eq!(j["spec"]["backoffLimit"], 6);
        assert_eq!(j["spec"]["template"]["spec"]["restartPolicy"], "Never");
    }
}
