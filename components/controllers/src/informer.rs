//! A watch cache for processes away from the leader (node agents, DNS,
//! ingress): some resources across all namespaces (list, then watch
//! from the list's revision; relist when the watch ends). Each change is
//! announced as (resource, `namespace/name`); a receiver that lags behind
//! the announcements resyncs from the cache.
use crate::{util, Api};
use orc_api::request::{Request, WatchRequest};
use orc_api::EventType;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

pub type Key = (&'static str, String);

pub struct Cache {
    objects: RwLock<HashMap<&'static str, BTreeMap<String, Arc<Value>>>>,
    changes: broadcast::Sender<Key>,
    /// How many of the watched resources have been listed once.
    synced: watch::Sender<usize>,
}

pub fn key_of(o: &Value) -> String {
    format!("{}/{}", util::namespace(o), util::name(o))
}

impl Cache {
    pub fn new() -> Arc<Self> {
        Arc::new(Cache {
            objects: RwLock::new(HashMap::new()),
            changes: broadcast::channel(65_536).0,
            synced: watch::channel(0).0,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Key> {
        self.changes.subscribe()
    }

    pub fn get(&self, resource: &str, key: &str) -> Option<Arc<Value>> {
        self.objects
            .read()
            .unwrap()
            .get(resource)?
            .get(key)
            .cloned()
    }

    pub fn list(&self, resource: &str) -> Vec<Arc<Value>> {
        self.objects
            .read()
            .unwrap()
            .get(resource)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Objects of one namespace (keys `ns/...`).
    pub fn list_ns(&self, resource: &str, ns: &str) -> Vec<Arc<Value>> {
        self.objects
            .read()
            .unwrap()
            .get(resource)
            .map(|m| crate::store::in_namespace(m, ns))
            .unwrap_or_default()
    }

    /// Wait until `n` resources have been listed.
    pub async fn wait_synced(&self, n: usize) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s >= n).await;
    }

    fn replace(&self, resource: &'static str, items: Vec<Value>) {
        let fresh: BTreeMap<String, Arc<Value>> = items
            .into_iter()
            .map(|o| (key_of(&o), Arc::new(o)))
            .collect();
        let mut changed = Vec::new();
        {
            let mut g = self.objects.write().unwrap();
            let old = g.insert(resource, fresh.clone()).unwrap_or_default();
            for (k, v) in &old {
                if fresh.get(k) != Some(v) {
                    changed.push(k.clone());
                }
            }
            for k in fresh.keys() {
                if !old.contains_key(k) {
                    changed.push(k.clone());
                }
            }
        }
        for k in changed {
            let _ = self.changes.send((resource, k));
        }
    }

    fn apply(&self, resource: &'static str, event: EventType, obj: Arc<Value>) {
        let key = key_of(&obj);
        {
            let mut g = self.objects.write().unwrap();
            let m = g.entry(resource).or_default();
            if event == EventType::Deleted {
                m.remove(&key);
            } else {
                m.insert(key.clone(), obj);
            }
        }
        let _ = self.changes.send((resource, key));
    }
}

/// Keep `resource` in `cache` until the task is dropped.
pub async fn run(api: Arc<dyn Api>, cache: Arc<Cache>, resource: &'static str) {
    let mut first = true;
    let mut backoff = Duration::from_millis(100);
    loop {
        let list = match api
            .call(Request::List {
                resource: resource.into(),
                namespace: None,
                label_selector: String::new(),
                field_selector: String::new(),
            })
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("list {resource}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let items = match list {
            Value::Object(mut m) => match m.remove("items") {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        cache.replace(resource, items);
        if first {
            first = false;
            cache.synced.send_modify(|n| *n += 1);
        }
        let mut rx = api
            .watch(WatchRequest {
                resource: resource.into(),
                namespace: None,
                label_selector: String::new(),
                field_selector: String::new(),
                resource_version: Some(rv),
                bookmarks: true,
            })
            .await;
        while let Some(ev) = rx.recv().await {
            match ev.event_type {
                EventType::Error => break,
                EventType::Bookmark => continue,
                t => cache.apply(resource, t, ev.object),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
