//! Garbage collection through ownerReferences (Background: dependents of a
//! vanished owner go; Foreground: an owner waits for its dependents; Orphan:
//! dependents are released) and the namespace controller (a terminating
//! namespace empties, then goes).
use crate::runner::{Ctx, Outcome, Reconciler};
use crate::store::Change;
use crate::util;
use crate::util::PathExt;
use futures::future::BoxFuture;
use orc_api::request::Request;
use orc_api::{resources, ApiError, EventType, Reason};
use serde_json::{json, Value};
use std::time::Duration;

fn finalizers(o: &Value) -> Vec<String> {
    o.get_path(&["metadata", "finalizers"])
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn has_owners(o: &Value) -> bool {
    o.get_path(&["metadata", "ownerReferences"])
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

fn gc_finalizing(o: &Value) -> bool {
    util::deleting(o)
        && finalizers(o)
            .iter()
            .any(|f| f == "orphan" || f == "foregroundDeletion")
}

fn split(key: &str) -> Option<(&str, &str)> {
    key.split_once('|')
}

async fn drop_finalizer(ctx: &Ctx, o: &Value, f: &str) -> Result<(), ApiError> {
    let mut n = o.clone();
    let rest: Vec<String> = finalizers(o).into_iter().filter(|x| x != f).collect();
    n["metadata"]["finalizers"] = json!(rest);
    ctx.update(n).await.map(|_| ())
}

/// Is the owner an ownerReference names still there (asked of the API, not the
/// cache, before anything is deleted)?
async fn owner_exists(ctx: &Ctx, ns: &str, r: &Value) -> Result<bool, ApiError> {
    let Some(info) = resources::by_kind(
        r["apiVersion"].as_str().unwrap_or(""),
        r["kind"].as_str().unwrap_or(""),
    ) else {
        return Ok(false);
    };
    let got = ctx
        .api
        .call(Request::Get {
            resource: info.plural.into(),
            namespace: if info.namespaced {
                ns.into()
            } else {
                String::new()
            },
            name: r["name"].as_str().unwrap_or("").into(),
        })
        .await;
    match got {
        Ok(o) => Ok(util::uid(&o) == r["uid"].as_str().unwrap_or("")),
        Err(e) if e.reason == Reason::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

pub struct GarbageCollector;

impl GarbageCollector {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some((resource, k)) = split(key) else {
            return Ok(None);
        };
        let Some(o) = ctx.store.get(resource, k) else {
            return Ok(None);
        };
        let uid = util::uid(&o).to_string();
        if util::deleting(&o) {
            let fins = finalizers(&o);
            if fins.iter().any(|f| f == "orphan") {
                let mut pending = false;
                for (_, dep) in ctx.store.dependents(&uid) {
                    let mut n = (*dep).clone();
                    if let Some(refs) = n["metadata"]["ownerReferences"].as_array_mut() {
                        refs.retain(|r| r["uid"] != uid.as_str());
                    }
                    ctx.update(n).await?;
                    pending = true;
                }
                if pending {
                    return Ok(Some(Duration::ZERO));
                }
                drop_finalizer(ctx, &o, "orphan").await?;
                return Ok(None);
            }
            if fins.iter().any(|f| f == "foregroundDeletion") {
                let deps = ctx.store.dependents(&uid);
                if deps.is_empty() {
                    drop_finalizer(ctx, &o, "foregroundDeletion").await?;
                    return Ok(None);
                }
                for (r, dep) in deps {
                    if !util::deleting(&dep) {
                        ctx.delete(r, &dep, Some("Foreground")).await?;
                    }
                }
                return Ok(None);
            }
            // Other finalizers are someone else's; a dependent of a vanished
            // owner is still collected below.
        }
        let refs = o
            .get_path(&["metadata", "ownerReferences"])
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if refs.is_empty() {
            return Ok(None);
        }
        // Cheap first look in the cache; only a suspected orphan is checked live.
        if refs
            .iter()
            .any(|r| ctx.store.by_uid(r["uid"].as_str().unwrap_or("")).is_some())
        {
            return Ok(None);
        }
        for r in &refs {
            if owner_exists(ctx, util::namespace(&o), r).await? {
                return Ok(None);
            }
        }
        if !util::deleting(&o) {
            ctx.delete(resource, &o, Some("Background")).await?;
        }
        Ok(None)
    }
}

impl Reconciler for GarbageCollector {
    fn name(&self) -> &'static str {
        "garbage-collector"
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        let mut keys = Vec::new();
        let me = format!("{}|{}", ch.resource, ch.key);
        if ch.event == EventType::Deleted {
            // Its dependents may now be orphans; its owners may be waiting for it.
            for (r, d) in ctx.store.dependents(util::uid(&ch.object)) {
                keys.push(format!("{r}|{}", crate::store::key_of(&d)));
            }
        } else if has_owners(&ch.object) || gc_finalizing(&ch.object) {
            keys.push(me);
        }
        for r in ch
            .object
            .get_path(&["metadata", "ownerReferences"])
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some((res, owner)) = ctx.store.by_uid(r["uid"].as_str().unwrap_or("")) {
                if gc_finalizing(&owner) {
                    keys.push(format!("{res}|{}", crate::store::key_of(&owner)));
                }
            }
        }
        keys
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store.scan(|o| has_owners(o) || gc_finalizing(o))
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}

pub struct Namespaces;

impl Namespaces {
    async fn sync(&self, ctx: &Ctx, key: &str) -> Outcome {
        let Some(ns) = ctx.store.get("namespaces", key) else {
            return Ok(None);
        };
        if !util::deleting(&ns) {
            return Ok(None);
        }
        let name = util::name(&ns);
        let inside = ctx.store.all_in_namespace(name);
        if inside.is_empty() {
            let mut n = (*ns).clone();
            if let Some(f) = n["spec"]["finalizers"].as_array_mut() {
                f.retain(|x| x != "kubernetes");
            }
            ctx.update(n).await?;
            return Ok(None);
        }
        for (r, o) in &inside {
            if !util::deleting(o) {
                ctx.delete(r, o, Some("Background")).await?;
            }
        }
        Ok(Some(Duration::from_secs(2)))
    }
}

impl Reconciler for Namespaces {
    fn name(&self) -> &'static str {
        "namespace-controller"
    }

    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String> {
        if ch.resource == "namespaces" {
            return util::deleting(&ch.object)
                .then(|| ch.key.clone())
                .into_iter()
                .collect();
        }
        let ns = util::namespace(&ch.object);
        if ch.event == EventType::Deleted && !ns.is_empty() {
            let k = format!("/{ns}");
            if ctx
                .store
                .get("namespaces", &k)
                .is_some_and(|n| util::deleting(&n))
            {
                return vec![k];
            }
        }
        Vec::new()
    }

    fn all_keys(&self, ctx: &Ctx) -> Vec<String> {
        ctx.store
            .list("namespaces")
            .iter()
            .filter(|n| util::deleting(n))
            .map(|n| crate::store::key_of(n))
            .collect()
    }

    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(self.sync(ctx, key))
    }
}
