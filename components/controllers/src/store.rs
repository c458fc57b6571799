//! The informer: one consistent copy of the whole object store (a Snapshot),
//! then one watch on every resource from that revision, kept in memory with the
//! indexes controllers need (by owner uid, by uid). Because every change arrives
//! in revision order on one stream, `observed()` says exactly how far the cache
//! has caught up, and a controller waits for its own writes to show before it
//! decides again (what Kubernetes does with "expectations").
use crate::api::{watch_error, Api};
use crate::util::PathExt;
use foldhash::{HashMap, HashMapExt};
use orc_api::request::{Request, WatchRequest};
use orc_api::{resources, EventType};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// One change seen by the informer.
#[derive(Debug, Clone)]
pub struct Change {
    pub resource: &'static str,
    /// `namespace/name` (namespace empty for cluster-scoped objects).
    pub key: String,
    pub event: EventType,
    pub object: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

/// An object in the owner index.
struct Dependent {
    object: Arc<Value>,
    /// The owner is this object's controller.
    controlled: bool,
}

#[derive(Default)]
struct Inner {
    objects: HashMap<&'static str, BTreeMap<String, Arc<Value>>>,
    /// owner uid -> its dependents (kept in the index, so an owner's
    /// dependents are found without a lookup each).
    by_owner: HashMap<String, BTreeMap<(&'static str, String), Dependent>>,
    by_uid: HashMap<String, (&'static str, String)>,
    /// Pods without a controller, by key (adoption candidates).
    orphan_pods: std::collections::BTreeSet<String>,
}

pub struct Store {
    inner: RwLock<Inner>,
    observed: watch::Sender<u64>,
    events: broadcast::Sender<Arc<Change>>,
}

pub fn key_of(obj: &Value) -> String {
    format!("{}/{}", crate::util::namespace(obj), crate::util::name(obj))
}

fn uid(obj: &Value) -> Option<String> {
    obj.get_path(&["metadata", "uid"])
        .and_then(Value::as_str)
        .map(String::from)
}

/// The uids in an object's ownerReferences.
fn owner_uids(obj: &Value) -> impl Iterator<Item = &str> {
    obj.get_path(&["metadata", "ownerReferences"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
}

/// What the indexes read from an object: when two versions of an object
/// agree on it, the indexes only need the new version put in place.
fn index_facts(obj: &Value) -> (Vec<&str>, Option<&Value>, Option<&str>) {
    (
        owner_uids(obj).collect(),
        crate::util::controller_ref(obj),
        obj.get_path(&["metadata", "uid"]).and_then(Value::as_str),
    )
}

fn resource_of(obj: &Value) -> Option<&'static str> {
    let av = obj["apiVersion"].as_str()?;
    let kind = obj["kind"].as_str()?;
    resources::by_kind(av, kind).map(|r| r.plural)
}

impl Inner {
    fn index_remove(&mut self, resource: &'static str, key: &str, obj: &Value) {
        let entry = (resource, key.to_string());
        for o in owner_uids(obj) {
            if let Some(set) = self.by_owner.get_mut(o) {
                set.remove(&entry);
                if set.is_empty() {
                    self.by_owner.remove(o);
                }
            }
        }
        if let Some(u) = uid(obj) {
            self.by_uid.remove(&u);
        }
        if resource == "pods" {
            self.orphan_pods.remove(key);
        }
    }
    fn index_add(&mut self, resource: &'static str, key: &str, obj: &Arc<Value>) {
        let controller = crate::util::controller_uid(obj);
        for o in owner_uids(obj) {
            self.by_owner.entry(o.to_string()).or_default().insert(
                (resource, key.to_string()),
                Dependent {
                    object: obj.clone(),
                    controlled: controller == Some(o),
                },
            );
        }
        if let Some(u) = uid(obj) {
            self.by_uid.insert(u, (resource, key.to_string()));
        }
        if resource == "pods" && crate::util::controller_ref(obj).is_none() {
            self.orphan_pods.insert(key.to_string());
        }
    }
    fn put(&mut self, resource: &'static str, key: String, obj: Arc<Value>) -> Option<Arc<Value>> {
        let old = self
            .objects
            .entry(resource)
            .or_default()
            .insert(key.clone(), obj.clone());
        match &old {
            // The same owners, uid and controller (most updates): only the
            // owner index holds the object itself.
            Some(o) if index_facts(o) == index_facts(&obj) => {
                let entry = (resource, key);
                for u in owner_uids(&obj) {
                    if let Some(d) = self.by_owner.get_mut(u).and_then(|m| m.get_mut(&entry)) {
                        d.object = obj.clone();
                    }
                }
            }
            Some(o) => {
                self.index_remove(resource, &key, o);
                self.index_add(resource, &key, &obj);
            }
            None => self.index_add(resource, &key, &obj),
        }
        old
    }
    fn remove(&mut self, resource: &'static str, key: &str) -> Option<Arc<Value>> {
        let old = self.objects.get_mut(resource)?.remove(key)?;
        self.index_remove(resource, key, &old);
        Some(old)
    }
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Store {
            inner: RwLock::new(Inner::default()),
            observed: watch::channel(0).0,
            events: broadcast::channel(1 << 16).0,
        })
    }

    pub fn get(&self, resource: &str, key: &str) -> Option<Arc<Value>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.objects.get(resource)?.get(key).cloned()
    }

    pub fn get_ns(&self, resource: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.get(resource, &format!("{ns}/{name}"))
    }

    pub fn list(&self, resource: &str) -> Vec<Arc<Value>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.objects
            .get(resource)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn keys(&self, resource: &str) -> Vec<String> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.objects
            .get(resource)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn list_ns(&self, resource: &str, ns: &str) -> Vec<Arc<Value>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.objects
            .get(resource)
            .map(|m| in_namespace(m, ns))
            .unwrap_or_default()
    }

    /// Every resource that has objects in namespace `ns`.
    pub fn all_in_namespace(&self, ns: &str) -> Vec<(&'static str, Arc<Value>)> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("{ns}/");
        let mut out = Vec::new();
        for (r, m) in &g.objects {
            for (_, v) in m
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
            {
                out.push((*r, v.clone()));
            }
        }
        out
    }

    /// `resource|namespace/name` of every object for which `pred` holds.
    pub fn scan(&self, pred: impl Fn(&Value) -> bool) -> Vec<String> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (r, m) in &g.objects {
            for (k, v) in m {
                if pred(v) {
                    out.push(format!("{r}|{k}"));
                }
            }
        }
        out
    }

    /// Pods in namespace `ns` that no controller owns.
    pub fn orphan_pods(&self, ns: &str) -> Vec<Arc<Value>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("{ns}/");
        let Some(pods) = g.objects.get("pods") else {
            return Vec::new();
        };
        g.orphan_pods
            .range(prefix.clone()..)
            .take_while(|k| k.starts_with(&prefix))
            .filter_map(|k| pods.get(k).cloned())
            .collect()
    }

    /// The `resource` objects whose controller is the object with `owner_uid`.
    pub fn controlled(&self, resource: &str, owner_uid: &str) -> Vec<Arc<Value>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.by_owner
            .get(owner_uid)
            .map(|m| {
                m.iter()
                    .filter(|((r, _), d)| *r == resource && d.controlled)
                    .map(|(_, d)| d.object.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Objects whose ownerReferences name `owner_uid`.
    pub fn dependents(&self, owner_uid: &str) -> Vec<(&'static str, Arc<Value>)> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.by_owner
            .get(owner_uid)
            .map(|m| m.iter().map(|((r, _), d)| (*r, d.object.clone())).collect())
            .unwrap_or_default()
    }

    pub fn by_uid(&self, uid: &str) -> Option<(&'static str, Arc<Value>)> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let (r, k) = g.by_uid.get(uid)?;
        g.objects.get(r)?.get(k).map(|v| (*r, v.clone()))
    }

    /// The revision the cache has caught up to.
    pub fn observed(&self) -> u64 {
        *self.observed.borrow()
    }

    /// Wait until the cache has seen revision `rv` (or `timeout` passes).
    pub async fn wait_observed(&self, rv: u64, timeout: Duration) -> bool {
        let mut rx = self.observed.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|o| *o >= rv))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.events.subscribe()
    }

    fn emit(&self, ch: Change) {
        let _ = self.events.send(Arc::new(ch));
    }

    /// Replace everything with a consistent copy taken at revision `rv`; the
    /// differences are announced as changes.
    pub fn replace(&self, items: Vec<Value>, rv: u64) {
        let mut fresh: HashMap<&'static str, BTreeMap<String, Arc<Value>>> = HashMap::new();
        for obj in items {
            if let Some(r) = resource_of(&obj) {
                fresh
                    .entry(r)
                    .or_default()
                    .insert(key_of(&obj), Arc::new(obj));
            }
        }
        let mut changes = Vec::new();
        {
            let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
            let old = std::mem::take(&mut g.objects);
            g.by_owner.clear();
            g.by_uid.clear();
            g.orphan_pods.clear();
            for (r, m) in &old {
                for (k, v) in m {
                    if !fresh.get(r).is_some_and(|f| f.contains_key(k)) {
                        changes.push(Change {
                            resource: r,
                            key: k.clone(),
                            event: EventType::Deleted,
                            object: v.clone(),
                            old: None,
                        });
                    }
                }
            }
            for (r, m) in fresh {
                for (k, v) in m {
                    let before = old.get(r).and_then(|o| o.get(&k)).cloned();
                    if before.as_deref() != Some(&*v) {
                        changes.push(Change {
                            resource: r,
                            key: k.clone(),
                            event: if before.is_some() {
                                EventType::Modified
                            } else {
                                EventType::Added
                            },
                            object: v.clone(),
                            old: before,
                        });
                    }
                    g.put(r, k, v);
                }
            }
        }
        for c in changes {
            self.emit(c);
        }
        self.observed.send_replace(rv);
    }

    /// One watch event.
    pub fn apply(&self, event: EventType, obj: Arc<Value>) {
        let rv = crate::util::resource_version(&obj);
        let Some(resource) = resource_of(&obj) else {
            return;
        };
        let key = key_of(&obj);
        let old = {
            let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
            match event {
                EventType::Deleted => g.remove(resource, &key),
                _ => g.put(resource, key.clone(), obj.clone()),
            }
        };
        self.emit(Change {
            resource,
            key,
            event,
            object: obj,
            old,
        });
        self.observed.send_if_modified(|o| {
            if rv > *o {
                *o = rv;
                true
            } else {
                false
            }
        });
    }

    fn progress(&self, rv: u64) {
        self.observed.send_if_modified(|o| {
            if rv > *o {
                *o = rv;
                true
            } else {
                false
            }
        });
    }
}

/// Keep `store` in step with the cluster until the task is dropped: a snapshot,
/// then a watch on everything; relist when the watch fails or expires.
pub async fn run(api: Arc<dyn Api>, store: Arc<Store>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let snap = match api.call(Request::Snapshot).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("informer: snapshot failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let rv = crate::util::resource_version(&snap);
        let items = match snap {
            Value::Object(mut m) => match m.remove("items") {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        store.replace(items, rv);
        backoff = Duration::from_millis(100);
        let mut rx = api
            .watch(WatchRequest {
                resource: "*".into(),
                namespace: None,
                label_selector: String::new(),
                field_selector: String::new(),
                resource_version: Some(rv.to_string()),
                bookmarks: true,
            })
            .await;
        while let Some(ev) = rx.recv().await {
            match ev.event_type {
                EventType::Error => {
                    tracing::info!("informer: watch ended ({}); relisting", watch_error(&ev));
                    break;
                }
                EventType::Bookmark => store.progress(crate::util::resource_version(&ev.object)),
                t => store.apply(t, ev.object),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The objects of namespace `ns` in a map keyed `namespace/name`.
pub(crate) fn in_namespace(m: &BTreeMap<String, Arc<Value>>, ns: &str) -> Vec<Arc<Value>> {
    let prefix = format!("{ns}/");
    m.range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, owner: Option<&str>, phase: &str) -> Arc<Value> {
        let refs = match owner {
            Some(u) => json!([{"kind": "ReplicaSet", "name": "r", "uid": u, "controller": true}]),
            None => json!([]),
        };
        Arc::new(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "d", "uid": format!("u-{name}"),
                         "resourceVersion": "1", "ownerReferences": refs},
            "status": {"phase": phase}}))
    }

    fn phases(s: &Store, owner: &str) -> Vec<String> {
        s.controlled("pods", owner)
            .iter()
            .map(|p| format!("{}={}", crate::util::name(p), crate::util::pod_phase(p)))
            .collect()
    }

    #[test]
    fn the_owner_index_follows_updates_owner_changes_and_deletes() {
        let s = Store::new();
        s.apply(EventType::Added, pod("a", Some("rs1"), "Pending"));
        s.apply(EventType::Added, pod("b", Some("rs1"), "Pending"));
        s.apply(EventType::Added, pod("c", None, "Pending"));
        assert_eq!(phases(&s, "rs1"), ["a=Pending", "b=Pending"]);
        assert_eq!(s.orphan_pods("d").len(), 1);
        // An update that keeps the owners: the index holds the new version.
        s.apply(EventType::Modified, pod("a", Some("rs1"), "Running"));
        assert_eq!(phases(&s, "rs1"), ["a=Running", "b=Pending"]);
        // Released, then adopted by another owner.
        s.apply(EventType::Modified, pod("b", None, "Running"));
        assert_eq!(phases(&s, "rs1"), ["a=Running"]);
        assert_eq!(s.orphan_pods("d").len(), 2);
        s.apply(EventType::Modified, pod("b", Some("rs2"), "Running"));
        assert_eq!(phases(&s, "rs2"), ["b=Running"]);
        assert_eq!(s.orphan_pods("d").len(), 1);
        // An owner that is not the controller owns without controlling.
        let mut c = (*pod("c", None, "Pending")).clone();
        c["metadata"]["ownerReferences"] = json!([{"kind": "X", "name": "x", "uid": "rs1"}]);
        s.apply(EventType::Modified, Arc::new(c));
        assert_eq!(phases(&s, "rs1"), ["a=Running"]);
        assert_eq!(s.dependents("rs1").len(), 2);
        s.apply(EventType::Deleted, pod("a", Some("rs1"), "Running"));
        assert!(phases(&s, "rs1").is_empty());
        assert_eq!(s.dependents("rs1").len(), 1);
        assert_eq!(s.by_uid("u-b").map(|(r, _)| r), Some("pods"));
    }
}
