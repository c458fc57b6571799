//! Commands carried in the Raft log and the deterministic rules that apply them.
//!
//! Everything that is not deterministic (uid, timestamps, generated names) is
//! decided by the master that accepted the request and is already inside the
//! command; `apply` only reads the current store and the log index.
use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// Where an object lives: `{plural}/{namespace}/{name}` (namespace empty when cluster-scoped).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(resource: &str, namespace: &str, name: &str) -> Self {
        ObjectKey {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
    pub fn encode(&self) -> String {
        // Not `format!`: this runs for every command on every master.
        let mut k =
            String::with_capacity(self.resource.len() + self.namespace.len() + self.name.len() + 2);
        for (i, part) in [&self.resource, &self.namespace, &self.name]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                k.push('/');
            }
            k.push_str(part);
        }
        k
    }
    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.splitn(3, '/');
        Some(ObjectKey::new(it.next()?, it.next()?, it.next()?))
    }
    /// The prefix that lists a resource, in one namespace or (None) in all.
    pub fn prefix(resource: &str, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) => format!("{resource}/{ns}/"),
            None => format!("{resource}/"),
        }
    }
    pub fn namespace_key(ns: &str) -> String {
        let mut k = String::with_capacity(12 + ns.len());
        k.push_str("namespaces//");
        k.push_str(ns);
        k
    }
}

/// Keys of the allocation index the store keeps beside the objects: which
/// Service holds a ClusterIP or a NodePort. They start with `~`, so no resource
/// prefix ever lists them.
pub const INDEX_PREFIX: &str = "~";

/// The index keys (ClusterIPs and NodePorts) a Service holds.
pub fn allocation_keys(svc: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    let spec = &svc["spec"];
    let mut ips: Vec<&str> = spec["clusterIPs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(ip) = spec["clusterIP"].as_str() {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    for ip in ips {
        if !ip.is_empty() && ip != "None" {
            keys.push(format!("~clusterip/{ip}"));
        }
    }
    for p in spec["ports"].as_array().into_iter().flatten() {
        if let Some(n) = p["nodePort"].as_i64().filter(|n| *n > 0) {
            keys.push(format!(
                "~nodeport/{}/{n}",
                p["protocol"].as_str().unwrap_or("TCP")
            ));
        }
    }
    keys
}

/// A Service may not take a ClusterIP or NodePort another Service holds.
fn check_allocations(
    key: &ObjectKey,
    obj: &Value,
    get: &dyn Fn(&str) -> Option<Arc<Value>>,
) -> Result<(), ApiError> {
    if key.resource != "services" {
        return Ok(());
    }
    let me = key.encode();
    for k in allocation_keys(obj) {
        if let Some(holder) = get(&k) {
            if holder.as_str() != Some(me.as_str()) {
                let (what, value) = k[1..].split_once('/').unwrap_or(("", ""));
                let field = if what == "clusterip" {
                    "spec.clusterIPs"
                } else {
                    "spec.ports.nodePort"
                };
                return Err(ApiError::invalid(format!(
                    "Service \"{}\" is invalid: {field}: Invalid value: \"{}\": provided {} is already allocated",
                    key.name,
                    value.rsplit('/').next().unwrap_or(value),
                    if what == "clusterip" { "IP" } else { "port" }
                )));
            }
        }
    }
    Ok(())
}

/// Metadata the system owns: decided by the accepting master on create, kept from
/// the stored object on update, whatever a request says.
pub const SYSTEM_METADATA: &[&str] = &[
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Store a new object. It is complete: uid, creationTimestamp and name are set.
    Create { key: ObjectKey, object: Value },
    /// Replace an object (or only its status). A `metadata.resourceVersion` in the
    /// object is a precondition.
    Update {
        key: ObjectKey,
        object: Value,
        status: bool,
    },
    /// An `Update` sent as its difference from the stored version
    /// `resource_version` (a JSON merge patch, see [`merge_diff`]): the same
    /// result, without the whole object in the log. With `status`, only the
    /// patch's `status` is used.
    Patch {
        key: ObjectKey,
        patch: Value,
        resource_version: String,
        status: bool,
    },
    /// Delete, or mark for deletion while finalizers remain (or, for a pod
    /// on a node, while its node stops it: graceful deletion).
    Delete {
        key: ObjectKey,
        preconditions: Preconditions,
        propagation: Option<String>,
        now: String,
        #[serde(default)]
        grace: Option<i64>,
    },
    /// Nothing: a no-op entry, used to prove leadership and to test the log.
    Noop,
    /// Several commands in one log entry (concurrent writes share one fsync and
    /// one replication round). Each is applied in order with its own revision.
    Batch(Vec<Command>),
}

impl Command {
    /// The commands to apply, in order, taken out of a batch.
    pub fn into_commands(self) -> Vec<Command> {
        match self {
            Command::Batch(cmds) => cmds,
            one => vec![one],
        }
    }

    /// About how many bytes its JSON takes, without writing it: the object's
    /// strings, escapes and punctuation counted, numbers at their longest,
    /// 256 bytes for the rest. Never less than the JSON by more than that.
    pub fn approx_json_len(&self) -> usize {
        const ENVELOPE: usize = 256;
        match self {
            Command::Create { object, .. } | Command::Update { object, .. } => {
                ENVELOPE + approx_json_len(object)
            }
            Command::Patch {
                patch,
                resource_version,
                ..
            } => ENVELOPE + approx_json_len(patch) + approx_str_len(resource_version),
            Command::Batch(cmds) => {
                ENVELOPE + cmds.iter().map(Command::approx_json_len).sum::<usize>()
            }
            Command::Delete { .. } | Command::Noop => ENVELOPE,
        }
    }
}

fn approx_str_len(s: &str) -> usize {
    // Quotes, and an escape for each quote, backslash or control character
    // (up to six bytes: \u0000).
    2 + s.len()
        + s.bytes()
            .filter(|b| *b == b'"' || *b == b'\\' || *b < 0x20)
            .count()
            * 5
}

/// About how many bytes `v` takes as compact JSON (at least as many).
pub fn approx_json_len(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(s) => approx_str_len(s),
        Value::Array(a) => 2 + a.iter().map(|x| approx_json_len(x) + 1).sum::<usize>(),
        Value::Object(m) => {
            2 + m
                .iter()
                .map(|(k, x)| approx_str_len(k) + 2 + approx_json_len(x))
                .sum::<usize>()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
    Error,
}

/// What applying a command does to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    /// Write `object` at `key` (ADDED or MODIFIED).
    Put {
        key: String,
        object: Arc<Value>,
        event: EventType,
        /// For MODIFIED: the selector view of the object before (see
        /// `selector::selector_view`), so watches can tell an object entering or
        /// leaving their selector. Not sent anywhere.
        #[serde(skip)]
        previous: Option<Value>,
    },
    /// Remove `key`; `object` is its last state, with the deletion's resourceVersion.
    Remove { key: String, object: Arc<Value> },
    /// Nothing changed (an update that changed nothing, a second delete of a
    /// terminating object); `object` is the current state.
    Unchanged { object: Arc<Value> },
}

impl Change {
    pub fn object(&self) -> &Value {
        match self {
            Change::Put { object, .. }
            | Change::Remove { object, .. }
            | Change::Unchanged { object } => object,
        }
    }

    /// The object, shared (the state machine's own copy, not cloned).
    pub fn into_object(self) -> Arc<Value> {
        match self {
            Change::Put { object, .. }
            | Change::Remove { object, .. }
            | Change::Unchanged { object } => object,
        }
    }
}

fn rv_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
}

fn set_meta(obj: &mut Value, field: &str, v: Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(field.to_string(), v);
    }
}

fn meta_field<'a>(obj: &'a Value, field: &str) -> Option<&'a Value> {
    obj.get("metadata").and_then(|m| m.get(field))
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta_field(obj, "finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Finalizers that hold an object's removal: `metadata.finalizers`, and for a
/// Namespace also `spec.finalizers` (the namespace controller's `kubernetes`).
fn all_finalizers(obj: &Value) -> Vec<String> {
    let mut f = finalizers(obj);
    if obj.get("kind").and_then(Value::as_str) == Some("Namespace") {
        if let Some(a) = obj.pointer("/spec/finalizers").and_then(Value::as_array) {
            f.extend(a.iter().filter_map(|v| v.as_str().map(String::from)));
        }
    }
    f
}

fn describe(key: &ObjectKey) -> String {
    format!("{} \"{}\"", key.resource, key.name)
}

/// Apply `cmd` as store revision `revision` to a store read through `get`.
/// (A batch is opened with `Command::into_commands` first.) The command is
/// taken: a created or replaced object becomes the stored one, not a copy.
pub fn apply(
    cmd: Command,
    revision: u64,
    get: &dyn Fn(&str) -> Option<Arc<Value>>,
) -> Result<Change, ApiError> {
    let rv = Value::String(revision.to_string());
    match cmd {
        Command::Batch(_) => Err(ApiError::internal(
            "a batch must be opened before it is applied",
        )),
        Command::Noop => Ok(Change::Unchanged {
            object: Arc::new(Value::Null),
        }),
        Command::Create { key, object } => {
            let key = &key;
            let k = key.encode();
            if get(&k).is_some() {
                return Err(ApiError::new(
                    crate::Reason::AlreadyExists,
                    format!("{} already exists", describe(key)),
                ));
            }
            if !key.namespace.is_empty() {
                match get(&ObjectKey::namespace_key(&key.namespace)) {
                    None => {
                        return Err(ApiError::not_found(format!(
                            "namespaces \"{}\" not found",
                            key.namespace
                        )))
                    }
                    Some(ns) if meta_field(&ns, "deletionTimestamp").is_some() => {
                        return Err(ApiError::new(
                            crate::Reason::Conflict,
                            format!("namespace \"{}\" is being terminated", key.namespace),
                        ))
                    }
                    _ => {}
                }
            }
            check_allocations(key, &object, get)?;
            let mut obj = object;
            set_meta(&mut obj, "resourceVersion", rv);
            if obj.get("spec").is_some() {
                set_meta(&mut obj, "generation", Value::from(1));
            }
            Ok(Change::Put {
                key: k,
                object: Arc::new(obj),
                event: EventType::Added,
                previous: None,
            })
        }
        Command::Patch {
            key,
            patch,
            resource_version,
            status,
        } => {
            let key = &key;
            let current = get(&key.encode())
                .ok_or_else(|| ApiError::not_found(format!("{} not found", describe(key))))?;
            if rv_of(&current) != Some(resource_version.as_str()) {
                return Err(stale(key));
            }
            let mut new = (*current).clone();
            if status {
                if let Some(s) = patch.get("status") {
                    crate::merge_patch(&mut new["status"], s);
                }
                if new.get("status") == Some(&Value::Null) {
                    new.as_object_mut().map(|m| m.remove("status"));
                }
            } else {
                crate::merge_patch(&mut new, &patch);
                if let (Some(m), true) = (new.as_object_mut(), object_has_status_subresource(key)) {
                    match current.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
            }
            finish_update(key, current, new, status, rv, get)
        }
        Command::Update {
            key,
            mut object,
            status,
        } => {
            let key = &key;
            let k = key.encode();
            let current = get(&k)
                .ok_or_else(|| ApiError::not_found(format!("{} not found", describe(key))))?;
            if let Some(want) = rv_of(&object) {
                if Some(want) != rv_of(&current) {
                    return Err(stale(key));
                }
            }
            if let Some(uid) = meta_field(&object, "uid") {
                if Some(uid) != meta_field(&current, "uid") {
                    return Err(ApiError::conflict(format!(
                        "{}: the uid in the request does not match the stored object",
                        describe(key)
                    )));
                }
            }
            let new = if status {
                let mut n = (*current).clone();
                match object.get_mut("status").map(Value::take) {
                    Some(s) => n["status"] = s,
                    None => {
                        n.as_object_mut().map(|m| m.remove("status"));
                    }
                }
                n
            } else {
                let mut n = object;
                // Status belongs to the status subresource where there is one.
                if let (Some(m), true) = (n.as_object_mut(), object_has_status_subresource(key)) {
                    match current.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
                n
            };
            finish_update(key, current, new, status, rv, get)
        }
        Command::Delete {
            key,
            preconditions,
            propagation,
            now,
            grace,
        } => {
            let key = &key;
            let k = key.encode();
            let current = get(&k)
                .ok_or_else(|| ApiError::not_found(format!("{} not found", describe(key))))?;
            if let Some(uid) = &preconditions.uid {
                if meta_field(&current, "uid").and_then(Value::as_str) != Some(uid) {
                    return Err(ApiError::conflict(format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_field(&current, "uid")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    )));
                }
            }
            if let Some(want) = &preconditions.resource_version {
                if rv_of(&current) != Some(want) {
                    return Err(ApiError::conflict(format!(
                        "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                        rv_of(&current).unwrap_or("")
                    )));
                }
            }
            let mut fins = finalizers(&current);
            let extra = match propagation.as_deref() {
                Some("Foreground") => Some("foregroundDeletion"),
                Some("Orphan") => Some("orphan"),
                Some("Background") | None => None,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                    "propagationPolicy \"{other}\" is not one of Foreground, Background, Orphan"
                )))
                }
            };
            // Graceful deletion: a pod on a node stays, marked, until its node
            // has stopped it and deletes it with grace 0 (or someone forces it).
            let on_node = key.resource == "pods"
                && current["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty())
                && !matches!(
                    current["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed")
                );
            let grace = grace
                .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
                .max(0);
            let marked = meta_field(&current, "deletionTimestamp").is_some();
            if on_node && !marked && grace > 0 && extra.is_none() {
                let mut obj = (*current).clone();
                set_meta(&mut obj, "resourceVersion", rv);
                set_meta(&mut obj, "deletionTimestamp", Value::String(now.clone()));
                set_meta(&mut obj, "deletionGracePeriodSeconds", Value::from(grace));
                return Ok(Change::Put {
                    key: k,
                    object: Arc::new(obj),
                    event: EventType::Modified,
                    previous: Some(crate::selector::selector_view(&current)),
                });
            }
            let pod_done = key.resource == "pods" && marked && grace == 0;
            if marked && !(pod_done && fins.is_empty() && all_finalizers(&current).is_empty()) {
                return Ok(Change::Unchanged { object: current });
            }
            if let Some(f) = extra {
                if !fins.iter().any(|x| x == f) {
                    fins.push(f.to_string());
                }
            }
            let mut obj = (*current).clone();
            set_meta(&mut obj, "resourceVersion", rv);
            if fins.is_empty() && all_finalizers(&current).is_empty() {
                return Ok(Change::Remove {
                    key: k,
                    object: Arc::new(obj),
                });
            }
            set_meta(&mut obj, "deletionTimestamp", Value::String(now.clone()));
            set_meta(&mut obj, "deletionGracePeriodSeconds", Value::from(0));
            if !fins.is_empty() {
                set_meta(&mut obj, "finalizers", Value::from(fins));
            }
            if key.resource == "namespaces" {
                obj["status"]["phase"] = Value::from("Terminating");
            }
            Ok(Change::Put {
                key: k,
                object: Arc::new(obj),
                event: EventType::Modified,
                previous: Some(crate::selector::selector_view(&current)),
            })
        }
    }
}

/// The rest of an update once the new object is composed: system metadata
/// kept, nothing to do when nothing changed, generation and revision set, and
/// removal when the last finalizer of a deleted object goes.
fn finish_update(
    key: &ObjectKey,
    current: Arc<Value>,
    mut new: Value,
    status: bool,
    rv: Value,
    get: &dyn Fn(&str) -> Option<Arc<Value>>,
) -> Result<Change, ApiError> {
    // Fields the system owns are kept from the stored object.
    for &f in SYSTEM_METADATA.iter().chain(&["name", "namespace"]) {
        match meta_field(&current, f).cloned() {
            Some(v) => set_meta(&mut new, f, v),
            None => {
                new.get_mut("metadata")
                    .and_then(Value::as_object_mut)
                    .map(|m| m.remove(f));
            }
        }
    }
    set_meta(
        &mut new,
        "resourceVersion",
        current
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null),
    );
    if new == *current {
        return Ok(Change::Unchanged { object: current });
    }
    check_allocations(key, &new, get)?;
    if !status && new.get("spec") != current.get("spec") {
        let g = meta_field(&current, "generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        set_meta(&mut new, "generation", Value::from(g + 1));
    }
    set_meta(&mut new, "resourceVersion", rv);
    if meta_field(&new, "deletionTimestamp").is_some() && all_finalizers(&new).is_empty() {
        return Ok(Change::Remove {
            key: key.encode(),
            object: Arc::new(new),
        });
    }
    Ok(Change::Put {
        key: key.encode(),
        object: Arc::new(new),
        event: EventType::Modified,
        previous: Some(crate::selector::selector_view(&current)),
    })
}

fn stale(key: &ObjectKey) -> ApiError {
    ApiError::conflict(format!(
        "Operation cannot be fulfilled on {}: the object has been modified; please apply your changes to the latest version and try again",
        describe(key)
    ))
}

/// `Update { object, status }` as a `Patch` against `current`: the version
/// and the patch, when `object` names `current`'s version (and uid, if any)
/// and a merge patch can express the change.
pub fn update_as_patch(current: &Value, object: &Value, status: bool) -> Option<(String, Value)> {
    let want = rv_of(object)?;
    if rv_of(current) != Some(want) {
        return None;
    }
    if let Some(uid) = meta_field(object, "uid") {
        if Some(uid) != meta_field(current, "uid") {
            return None; // Update's own check answers that.
        }
    }
    let patch = if status {
        let diff = match object.get("status") {
            None => Value::Null,
            Some(o) => merge_diff(current.get("status").unwrap_or(&Value::Null), o)?,
        };
        serde_json::json!({ "status": diff })
    } else {
        merge_diff(current, object)?
    };
    Some((want.to_string(), patch))
}

/// A JSON merge patch (RFC 7386) that turns `from` into `to`, or None when no
/// merge patch can: `to` holds a null where they differ (a patch's null
/// removes a field).
pub fn merge_diff(from: &Value, to: &Value) -> Option<Value> {
    fn has_null(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Object(m) => m.values().any(has_null),
            _ => false,
        }
    }
    match (from, to) {
        (Value::Object(f), Value::Object(t)) => {
            let mut patch = serde_json::Map::new();
            for k in f.keys() {
                if !t.contains_key(k) {
                    patch.insert(k.clone(), Value::Null);
                }
            }
            for (k, tv) in t {
                match f.get(k) {
                    Some(fv) if fv == tv => {}
                    Some(fv) => {
                        patch.insert(k.clone(), merge_diff(fv, tv)?);
                    }
                    None if has_null(tv) => return None,
                    None => {
                        patch.insert(k.clone(), tv.clone());
                    }
                }
            }
            Some(Value::Object(patch))
        }
        (_, t) if has_null(t) => None,
        (_, t) => Some(t.clone()),
    }
}

fn object_has_status_subresource(key: &ObjectKey) -> bool {
    crate::resources::by_plural(&key.resource).is_some_and(|r| r.has_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_encode_and_decode() {
        let k = ObjectKey::new("pods", "web", "a-1");
        assert_eq!(k.encode(), "pods/web/a-1");
        let d = ObjectKey::decode(&k.encode()).unwrap();
        assert_eq!(
            (d.resource, d.namespace, d.name),
            (k.resource, k.namespace, k.name)
        );
        assert_eq!(ObjectKey::new("nodes", "", "n").encode(), "nodes//n");
        assert_eq!(
            ObjectKey::namespace_key("x"),
            ObjectKey::new("namespaces", "", "x").encode()
        );
    }
    use serde_json::json;
    use std::collections::HashMap;

    struct Store(HashMap<String, Value>);
    impl Store {
        fn new() -> Self {
            let mut m = HashMap::new();
            m.insert(
                ObjectKey::namespace_key("default"),
                json!({"metadata": {"name": "default"}}),
            );
            Store(m)
        }
        fn run(&mut self, cmd: &Command, index: u64) -> Result<Change, ApiError> {
            let snapshot = self.0.clone();
            let ch = apply(cmd.clone(), index, &|k| {
                snapshot.get(k).cloned().map(Arc::new)
            })?;
            match &ch {
                Change::Put { key, object, .. } => {
                    self.0.insert(key.clone(), (**object).clone());
                }
                Change::Remove { key, .. } => {
                    self.0.remove(key);
                }
                Change::Unchanged { .. } => {}
            }
            Ok(ch)
        }
    }

    fn deploy(replicas: i64) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "default", "uid": "u1", "creationTimestamp": "t"},
            "spec": {"replicas": replicas}})
    }
    fn key() -> ObjectKey {
        ObjectKey::new("deployments", "default", "d")
    }

    #[test]
    fn approx_json_len_is_never_short() {
        let v = json!({"metadata": {"name": "a\"b\\c\n", "labels": {"k": "v"}},
            "spec": {"replicas": 3, "ratio": 0.125, "list": [1, "x", null, true, {}]}});
        let cmd = Command::Create {
            key: ObjectKey::new("configmaps", "d", "a"),
            object: v.clone(),
        };
        let exact = serde_json::to_vec(&cmd).unwrap().len();
        let approx = cmd.approx_json_len();
        assert!(
            approx >= exact && approx <= exact + 400,
            "{approx} vs {exact}"
        );
        assert!(approx_json_len(&v) >= serde_json::to_vec(&v).unwrap().len());
        let batch = Command::Batch(vec![cmd.clone(), cmd]);
        assert!(batch.approx_json_len() >= serde_json::to_vec(&batch).unwrap().len());
    }

    #[test]
    fn create_sets_rv_and_generation_and_rejects_duplicates() {
        let mut s = Store::new();
        let ch = s
            .run(
                &Command::Create {
                    key: key(),
                    object: deploy(1),
                },
                7,
            )
            .unwrap();
        assert_eq!(ch.object()["metadata"]["resourceVersion"], "7");
        assert_eq!(ch.object()["metadata"]["generation"], 1);
        let e = s
            .run(
                &Command::Create {
                    key: key(),
                    object: deploy(1),
                },
                8,
            )
            .unwrap_err();
        assert_eq!(e.reason, crate::Reason::AlreadyExists);
    }

    #[test]
    fn create_in_missing_namespace_fails() {
        let mut s = Store::new();
        let e = s
            .run(
                &Command::Create {
                    key: ObjectKey::new("configmaps", "nope", "c"),
                    object: json!({"metadata": {}}),
                },
                2,
            )
            .unwrap_err();
        assert_eq!(e.reason, crate::Reason::NotFound);
        assert!(e.message.contains("nope"));
    }

    #[test]
    fn update_checks_rv_bumps_generation_and_keeps_status() {
        let mut s = Store::new();
        s.run(
            &Command::Create {
                key: key(),
                object: deploy(1),
            },
            2,
        )
        .unwrap();
        s.run(
            &Command::Update {
                key: key(),
                object: json!({"status": {"replicas": 1}}),
                status: true,
            },
            3,
        )
        .unwrap();
        let mut stale = deploy(2);
        stale["metadata"]["resourceVersion"] = json!("2");
        assert_eq!(
            s.run(
                &Command::Update {
                    key: key(),
                    object: stale,
                    status: false
                },
                4
            )
            .unwrap_err()
            .reason,
            crate::Reason::Conflict
        );
        let mut fresh = deploy(2);
        fresh["metadata"]["resourceVersion"] = json!("3");
        fresh["status"] = json!({"replicas": 99});
        let ch = s
            .run(
                &Command::Update {
                    key: key(),
                    object: fresh,
                    status: false,
                },
                5,
            )
            .unwrap();
        let o = ch.object();
        assert_eq!(o["metadata"]["generation"], 2);
        assert_eq!(o["metadata"]["resourceVersion"], "5");
        assert_eq!(o["status"]["replicas"], 1, "status kept from the store");
        assert_eq!(o["metadata"]["uid"], "u1");
        // status writes leave spec and generation alone
        let ch = s
            .run(
                &Command::Update {
                    key: key(),
                    object: json!({"spec": {"replicas": 7}, "status": {"replicas": 2}}),
                    status: true,
                },
                6,
            )
            .unwrap();
        assert_eq!(ch.object()["spec"]["replicas"], 2);
        assert_eq!(ch.object()["metadata"]["generation"], 2);
    }

    #[test]
    fn update_without_change_writes_nothing() {
        let mut s = Store::new();
        s.run(
            &Command::Create {
                key: key(),
                object: deploy(1),
            },
            2,
        )
        .unwrap();
        let ch = s
            .run(
                &Command::Update {
                    key: key(),
                    object: deploy(1),
                    status: false,
                },
                3,
            )
            .unwrap();
        assert!(matches!(ch, Change::Unchanged { .. }));
        assert_eq!(ch.object()["metadata"]["resourceVersion"], "2");
    }

    #[test]
    fn pods_on_nodes_are_deleted_gracefully() {
        let mut s = Store::new();
        let pk = ObjectKey::new("pods", "default", "p");
        let pod = |node: &str| {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default", "uid": "u"},
                   "spec": {"nodeName": node, "terminationGracePeriodSeconds": 7, "containers": [{"name": "c", "image": "i"}]}})
        };
        s.run(
            &Command::Create {
                key: pk.clone(),
                object: pod("n1"),
            },
            2,
        )
        .unwrap();
        let del = |grace| Command::Delete {
            key: pk.clone(),
            preconditions: Preconditions::default(),
            propagation: None,
            now: "T".into(),
            grace,
        };
        // Marked, with the pod's grace period; a second delete changes nothing.
        let ch = s.run(&del(None), 3).unwrap();
        assert!(matches!(ch, Change::Put { .. }));
        assert_eq!(ch.object()["metadata"]["deletionTimestamp"], "T");
        assert_eq!(ch.object()["metadata"]["deletionGracePeriodSeconds"], 7);
        assert!(matches!(
            s.run(&del(None), 4).unwrap(),
            Change::Unchanged { .. }
        ));
        // The node is done: grace 0 removes it.
        assert!(matches!(
            s.run(&del(Some(0)), 5).unwrap(),
            Change::Remove { .. }
        ));
        // Unbound pods, and forced deletes, go at once.
        s.run(
            &Command::Create {
                key: pk.clone(),
                object: pod(""),
            },
            6,
        )
        .unwrap();
        assert!(matches!(
            s.run(&del(None), 7).unwrap(),
            Change::Remove { .. }
        ));
        s.run(
            &Command::Create {
                key: pk.clone(),
                object: pod("n1"),
            },
            8,
        )
        .unwrap();
        assert!(matches!(
            s.run(&del(Some(0)), 9).unwrap(),
            Change::Remove { .. }
        ));
    }

    #[test]
    fn delete_with_finalizers_marks_then_removes() {
        let mut s = Store::new();
        let mut d = deploy(1);
        d["metadata"]["finalizers"] = json!(["x"]);
        s.run(
            &Command::Create {
                key: key(),
                object: d,
            },
            2,
        )
        .unwrap();
        let del = Command::Delete {
            key: key(),
            preconditions: Preconditions::default(),
            propagation: None,
            now: "T".into(),
            grace: None,
        };
        let ch = s.run(&del, 3).unwrap();
        assert!(matches!(ch, Change::Put { .. }));
        assert_eq!(ch.object()["metadata"]["deletionTimestamp"], "T");
        assert!(matches!(s.run(&del, 4).unwrap(), Change::Unchanged { .. }));
        let mut cleared = ch.object().clone();
        cleared["metadata"]["finalizers"] = json!([]);
        let ch = s
            .run(
                &Command::Update {
                    key: key(),
                    object: cleared,
                    status: false,
                },
                5,
            )
            .unwrap();
        assert!(matches!(ch, Change::Remove { .. }));
        assert!(!s.0.contains_key(&key().encode()));
    }

    #[test]
    fn delete_preconditions_and_propagation() {
        let mut s = Store::new();
        s.run(
            &Command::Create {
                key: key(),
                object: deploy(1),
            },
            2,
        )
        .unwrap();
        let bad_uid = Command::Delete {
            key: key(),
            preconditions: Preconditions {
                uid: Some("zz".into()),
                resource_version: None,
            },
            propagation: None,
            now: "T".into(),
            grace: None,
        };
        assert_eq!(
            s.run(&bad_uid, 3).unwrap_err().reason,
            crate::Reason::Conflict
        );
        let bad_rv = Command::Delete {
            key: key(),
            preconditions: Preconditions {
                uid: None,
                resource_version: Some("1".into()),
            },
            propagation: None,
            now: "T".into(),
            grace: None,
        };
        assert_eq!(
            s.run(&bad_rv, 3).unwrap_err().reason,
            crate::Reason::Conflict
        );
        let fg = Command::Delete {
            key: key(),
            preconditions: Preconditions::default(),
            propagation: Some("Foreground".into()),
            now: "T".into(),
            grace: None,
        };
        let ch = s.run(&fg, 4).unwrap();
        assert_eq!(
            ch.object()["metadata"]["finalizers"],
            json!(["foregroundDeletion"])
        );
        let bg = Command::Delete {
            key: ObjectKey::new("deployments", "default", "missing"),
            preconditions: Preconditions::default(),
            propagation: None,
            now: "T".into(),
            grace: None,
        };
        assert_eq!(s.run(&bg, 5).unwrap_err().reason, crate::Reason::NotFound);
    }

    #[test]
    fn a_patch_against_the_named_version_is_the_same_update() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "uid": "u1", "resourceVersion": "5",
                         "generation": 1, "labels": {"app": "a", "tier": "web"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c", "image": "i", "args": [null, "x"]}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}});
        let key = ObjectKey::new("pods", "default", "p");
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut o = pod.clone();
            f(&mut o);
            o
        };
        let cases: Vec<(Value, bool)> = vec![
            (edit(&|o| o["spec"]["nodeName"] = json!("n1")), false),
            (
                edit(&|o| o["spec"]["containers"][0]["image"] = json!("j")),
                false,
            ),
            (
                edit(&|o| {
                    o["metadata"]["labels"]
                        .as_object_mut()
                        .unwrap()
                        .remove("tier");
                }),
                false,
            ),
            (
                edit(&|o| o["metadata"]["annotations"] = json!({"a": {"deep": 1}})),
                false,
            ),
            (
                edit(&|o| o["status"] = json!({"phase": "Running", "podIP": "198.18.0.5"})),
                false,
            ),
            (
                edit(&|o| o["status"] = json!({"phase": "Running", "podIP": "198.18.0.5"})),
                true,
            ),
            (edit(&|o| o["status"]["conditions"] = json!([])), true),
            (
                edit(&|o| {
                    o.as_object_mut().unwrap().remove("status");
                }),
                true,
            ),
            (edit(&|o| o["metadata"]["labels"]["app"] = json!("b")), true),
            (edit(&|o| o["metadata"]["name"] = json!("other")), false),
            (pod.clone(), false),
        ];
        for (i, (object, status)) in cases.into_iter().enumerate() {
            let mut s = Store::new();
            s.0.insert(key.encode(), pod.clone());
            let (rv, patch) = update_as_patch(&pod, &object, status)
                .unwrap_or_else(|| panic!("case {i}: no patch"));
            let by_update = s.run(
                &Command::Update {
                    key: key.clone(),
                    object: object.clone(),
                    status,
                },
                9,
            );
            let mut s = Store::new();
            s.0.insert(key.encode(), pod.clone());
            let by_patch = s.run(
                &Command::Patch {
                    key: key.clone(),
                    patch: patch.clone(),
                    resource_version: rv,
                    status,
                },
                9,
            );
            assert_eq!(
                format!("{by_update:?}"),
                format!("{by_patch:?}"),
                "case {i}: patch {patch}"
            );
            // The patch is smaller than the object whenever something stays.
            if object != pod {
                assert!(
                    patch.to_string().len() < object.to_string().len(),
                    "case {i}"
                );
            }
        }
        // Nulls a merge patch cannot carry, another version, another uid: no patch.
        assert!(update_as_patch(&pod, &edit(&|o| o["spec"]["x"] = Value::Null), false).is_none());
        assert!(
            update_as_patch(&pod, &edit(&|o| o["status"]["phase"] = Value::Null), true).is_none()
        );
        let stale = edit(&|o| o["metadata"]["resourceVersion"] = json!("4"));
        assert!(update_as_patch(&pod, &stale, false).is_none());
        let other = edit(&|o| o["metadata"]["uid"] = json!("u2"));
        assert!(update_as_patch(&pod, &other, false).is_none());
        // A patch against a version that has moved on conflicts, as the update would.
        let mut s = Store::new();
        let mut moved = pod.clone();
        moved["metadata"]["resourceVersion"] = json!("6");
        s.0.insert(key.encode(), moved);
        let (rv, patch) =
            update_as_patch(&pod, &edit(&|o| o["spec"]["nodeName"] = json!("n1")), false).unwrap();
        let e = s
            .run(
                &Command::Patch {
                    key: key.clone(),
                    patch,
                    resource_version: rv,
                    status: false,
                },
                9,
            )
            .unwrap_err();
        assert_eq!(e.reason, crate::Reason::Conflict);
    }

    #[test]
    fn key_round_trip() {
        let k = ObjectKey::new("nodes", "", "n1");
        assert_eq!(k.encode(), "nodes//n1");
        assert_eq!(ObjectKey::decode("nodes//n1").unwrap(), k);
    }
}
