//! The resources orc serves: plural name, kind, apiVersion, scope, short names, and
//! the k8s-openapi type that validates a body of that kind.
use k8s_openapi::api::{apps, batch, coordination, core, discovery, networking};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// Turns a JSON body into the normalised stored form, or names every fault found.
pub type Validator = fn(Value) -> Result<Value, Vec<String>>;

#[derive(Debug, Clone, Copy)]
pub struct ResourceInfo {
    /// Lower-case plural, as in REST paths: `configmaps`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub api_version: &'static str,
    pub namespaced: bool,
    /// Has a status subresource: updates of the main resource keep status,
    /// status updates keep everything else.
    pub has_status: bool,
    pub short_names: &'static [&'static str],
    pub validator: Validator,
}

/// Deserialize as the k8s-openapi type `T`, reporting every field the type does not
/// know (by its path), then serialize back: the stored form is Kubernetes' own.
pub fn typed<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, Vec<String>> {
    let mut unknown = Vec::new();
    // serde_ignored writes `?` for each Option it passes through; users think in field paths.
    let parsed: Result<T, _> = serde_ignored::deserialize(v, |path| {
        unknown.push(path.to_string().replace(".?", "").replace("?.", ""))
    });
    let mut errors: Vec<String> = unknown
        .into_iter()
        .map(|p| format!("unknown field \"{p}\""))
        .collect();
    match parsed {
        Ok(t) if errors.is_empty() => serde_json::to_value(&t).map_err(|e| vec![e.to_string()]),
        Ok(_) => Err(errors),
        Err(e) => {
            errors.push(e.to_string());
            Err(errors)
        }
    }
}

/// Secrets: `stringData` is folded into `data`, as Kubernetes does on write.
fn secret(v: Value) -> Result<Value, Vec<String>> {
    let v = typed::<core::v1::Secret>(v)?;
    let mut s: core::v1::Secret = serde_json::from_value(v).map_err(|e| vec![e.to_string()])?;
    if let Some(sd) = s.string_data.take() {
        let data = s.data.get_or_insert_with(Default::default);
        for (k, val) in sd {
            data.insert(k, k8s_openapi::ByteString(val.into_bytes()));
        }
    }
    serde_json::to_value(&s).map_err(|e| vec![e.to_string()])
}

macro_rules! res {
    ($plural:literal, $singular:literal, $kind:literal, $av:literal, $ns:literal, $status:literal, [$($short:literal),*], $v:expr) => {
        ResourceInfo {
            plural: $plural,
            singular: $singular,
            kind: $kind,
            api_version: $av,
            namespaced: $ns,
            has_status: $status,
            short_names: &[$($short),*],
            validator: $v,
        }
    };
}

pub static RESOURCES: &[ResourceInfo] = &[
    res!(
        "namespaces",
        "namespace",
        "Namespace",
        "v1",
        false,
        true,
        ["ns"],
        typed::<core::v1::Namespace>
    ),
    res!(
        "pods",
        "pod",
        "Pod",
        "v1",
        true,
        true,
        ["po"],
        typed::<core::v1::Pod>
    ),
    res!(
        "replicationcontrollers",
        "replicationcontroller",
        "ReplicationController",
        "v1",
        true,
        true,
        ["rc"],
        typed::<core::v1::ReplicationController>
    ),
    res!(
        "replicasets",
        "replicaset",
        "ReplicaSet",
        "apps/v1",
        true,
        true,
        ["rs"],
        typed::<apps::v1::ReplicaSet>
    ),
    res!(
        "deployments",
        "deployment",
        "Deployment",
        "apps/v1",
        true,
        true,
        ["deploy"],
        typed::<apps::v1::Deployment>
    ),
    res!(
        "daemonsets",
        "daemonset",
        "DaemonSet",
        "apps/v1",
        true,
        true,
        ["ds"],
        typed::<apps::v1::DaemonSet>
    ),
    res!(
        "statefulsets",
        "statefulset",
        "StatefulSet",
        "apps/v1",
        true,
        true,
        ["sts"],
        typed::<apps::v1::StatefulSet>
    ),
    res!(
        "jobs",
        "job",
        "Job",
        "batch/v1",
        true,
        true,
        [],
        typed::<batch::v1::Job>
    ),
    res!(
        "cronjobs",
        "cronjob",
        "CronJob",
        "batch/v1",
        true,
        true,
        ["cj"],
        typed::<batch::v1::CronJob>
    ),
    res!(
        "services",
        "service",
        "Service",
        "v1",
        true,
        true,
        ["svc"],
        typed::<core::v1::Service>
    ),
    res!(
        "endpoints",
        "endpoints",
        "Endpoints",
        "v1",
        true,
        false,
        ["ep"],
        typed::<core::v1::Endpoints>
    ),
    res!(
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        "discovery.k8s.io/v1",
        true,
        false,
        [],
        typed::<discovery::v1::EndpointSlice>
    ),
    res!(
        "ingresses",
        "ingress",
        "Ingress",
        "networking.k8s.io/v1",
        true,
        true,
        ["ing"],
        typed::<networking::v1::Ingress>
    ),
    res!(
        "ingressclasses",
        "ingressclass",
        "IngressClass",
        "networking.k8s.io/v1",
        false,
        false,
        [],
        typed::<networking::v1::IngressClass>
    ),
    res!(
        "configmaps",
        "configmap",
        "ConfigMap",
        "v1",
        true,
        false,
        ["cm"],
        typed::<core::v1::ConfigMap>
    ),
    res!("secrets", "secret", "Secret", "v1", true, false, [], secret),
    res!(
        "nodes",
        "node",
        "Node",
        "v1",
        false,
        true,
        ["no"],
        typed::<core::v1::Node>
    ),
    res!(
        "leases",
        "lease",
        "Lease",
        "coordination.k8s.io/v1",
        true,
        false,
        [],
        typed::<coordination::v1::Lease>
    ),
    res!(
        "events",
        "event",
        "Event",
        "v1",
        true,
        false,
        ["ev"],
        typed::<core::v1::Event>
    ),
    res!(
        "persistentvolumes",
        "persistentvolume",
        "PersistentVolume",
        "v1",
        false,
        true,
        ["pv"],
        typed::<core::v1::PersistentVolume>
    ),
    res!(
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        "PersistentVolumeClaim",
        "v1",
        true,
        true,
        ["pvc"],
        typed::<core::v1::PersistentVolumeClaim>
    ),
];

/// A resource by plural, singular, short name or kind (case-insensitive), with an
/// optional `.group` suffix as kubectl accepts (`deployments.apps`).
pub fn lookup(name: &str) -> Option<&'static ResourceInfo> {
    let lower = name.to_ascii_lowercase();
    let (base, group) = match lower.split_once('.') {
        Some((b, g)) => (b.to_string(), Some(g.to_string())),
        None => (lower.clone(), None),
    };
    RESOURCES.iter().find(|r| {
        let matches = r.plural == base
            || r.singular == base
            || r.kind.eq_ignore_ascii_case(&base)
            || r.short_names.contains(&base.as_str());
        let group_ok = match &group {
            None => true,
            Some(g) => r
                .api_version
                .rsplit_once('/')
                .map(|(grp, _)| grp == g)
                .unwrap_or(g == "core" || g.is_empty()),
        };
        matches && group_ok
    })
}

/// A resource by apiVersion and kind, exactly as in a manifest.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.api_version == api_version && r.kind == kind)
}

/// A resource by its plural (the form used on the wire).
pub fn by_plural(plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES.iter().find(|r| r.plural == plural)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_by_every_name() {
        for n in [
            "po",
            "pods",
            "pod",
            "Pod",
            "deploy",
            "deployments.apps",
            "cj",
            "ing",
            "ep",
            "no",
            "pvc",
            "pv",
            "lease",
            "ev",
            "secret",
            "cm",
            "ns",
            "sts",
            "ds",
            "rs",
            "rc",
            "svc",
            "job",
        ] {
            assert!(lookup(n).is_some(), "{n}");
        }
        assert_eq!(lookup("deploy").unwrap().kind, "Deployment");
        assert!(lookup("deployments.batch").is_none());
        assert!(lookup("widgets").is_none());
    }

    #[test]
    fn typed_reports_unknown_fields_by_path() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "bogusField": 1,
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "imagee": "busybox"}]}}}});
        let errs = typed::<apps::v1::Deployment>(d).unwrap_err();
        assert!(errs.iter().any(|e| e.contains("bogusField")), "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("spec.template.spec.containers.0.imagee")),
            "{errs:?}"
        );
    }

    #[test]
    fn typed_rejects_wrong_kind_and_keeps_known_fields() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}});
        assert_eq!(typed::<core::v1::ConfigMap>(cm.clone()).unwrap(), cm);
        let wrong = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}});
        assert!(typed::<core::v1::ConfigMap>(wrong).is_err());
    }

    #[test]
    fn secret_string_data_becomes_data() {
        let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"p": "hi"}});
        let out = secret(s).unwrap();
        assert_eq!(out["data"]["p"], "aGk=");
        assert!(out.get("stringData").is_none());
    }
}
