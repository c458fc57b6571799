//! The shell every controller shares: a ractor actor with a de-duplicating work
//! queue fed by the informer's changes, reconciling a batch of keys at a time,
//! retrying failures with back-off, and waiting for its own writes to reach the
//! cache before deciding again.
use crate::api::Api;
use crate::store::{Change, Store};
use crate::Settings;
use futures::future::BoxFuture;
use orc_api::mutation::Preconditions;
use orc_api::request::Request;
use orc_api::{ApiError, Reason};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a controller decides about one key.
pub type Outcome = Result<Option<Duration>, ApiError>;

pub trait Reconciler: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The keys a change makes this controller look at again.
    fn keys_for(&self, ctx: &Ctx, ch: &Change) -> Vec<String>;
    /// Every key (periodic and start-up resync).
    fn all_keys(&self, ctx: &Ctx) -> Vec<String>;
    /// Make the world match the wish for one key. `Ok(Some(d))` looks again after `d`.
    fn reconcile<'a>(&'a self, ctx: &'a Ctx, key: &'a str) -> BoxFuture<'a, Outcome>;
    /// Reconcile several distinct keys (concurrently by default).
    fn reconcile_batch<'a>(
        &'a self,
        ctx: &'a Ctx,
        keys: &'a [String],
    ) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(futures::future::join_all(
            keys.iter().map(|k| self.reconcile(ctx, k)),
        ))
    }
    fn batch_size(&self) -> usize {
        64
    }
}

/// What a reconcile can use: the cache, the API (writes recorded so the next
/// decision waits for them), the settings, and an event recorder.
pub struct Ctx {
    pub api: Arc<dyn Api>,
    pub store: Arc<Store>,
    pub settings: Arc<Settings>,
    pub component: &'static str,
    written: AtomicU64,
}

impl Ctx {
    pub fn new(
        api: Arc<dyn Api>,
        store: Arc<Store>,
        settings: Arc<Settings>,
        component: &'static str,
    ) -> Self {
        Ctx {
            api,
            store,
            settings,
            component,
            written: AtomicU64::new(0),
        }
    }

    fn wrote(&self, r: Result<Value, ApiError>) -> Result<Value, ApiError> {
        if let Ok(v) = &r {
            self.written
                .fetch_max(crate::util::resource_version(v), Ordering::Relaxed);
        }
        r
    }

    pub async fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let r = self
            .api
            .call(Request::Create {
                object: obj,
                namespace: None,
            })
            .await;
        self.wrote(r)
    }

    /// Replace an object; its resourceVersion is the precondition.
    pub async fn update(&self, obj: Value) -> Result<Value, ApiError> {
        let r = self
            .api
            .call(Request::Update {
                object: obj,
                namespace: None,
                status: false,
            })
            .await;
        self.wrote(r)
    }

    /// Replace an object's status; its resourceVersion is the precondition.
    pub async fn update_status(&self, obj: Value) -> Result<Value, ApiError> {
        let r = self
            .api
            .call(Request::Update {
                object: obj,
                namespace: None,
                status: true,
            })
            .await;
        self.wrote(r)
    }

    /// Delete the object `obj` is (its uid is the precondition, so a newer
    /// object of the same name is never removed by mistake).
    pub async fn delete(
        &self,
        resource: &str,
        obj: &Value,
        policy: Option<&str>,
    ) -> Result<Value, ApiError> {
        self.delete_with_grace(resource, obj, policy, None).await
    }

    /// `delete` with a grace period for pods on nodes (Some(0): at once).
    pub async fn delete_with_grace(
        &self,
        resource: &str,
        obj: &Value,
        policy: Option<&str>,
        grace: Option<i64>,
    ) -> Result<Value, ApiError> {
        let r = self
            .api
            .call(Request::Delete {
                resource: resource.to_string(),
                namespace: crate::util::namespace(obj).to_string(),
                name: crate::util::name(obj).to_string(),
                preconditions: Preconditions {
                    uid: Some(crate::util::uid(obj).to_string()),
                    resource_version: None,
                },
                propagation_policy: policy.map(String::from),
                grace_period_seconds: grace,
            })
            .await;
        match r {
            Err(e) if e.reason == Reason::NotFound => Ok(Value::Null),
            r => self.wrote(r),
        }
    }

    /// Record an Event about `obj` (fire and forget: events never hold a decision up).
    pub fn event(&self, obj: &Value, kind: &str, reason: &str, message: String) {
        let ns = match crate::util::namespace(obj) {
            "" => "default".to_string(),
            ns => ns.to_string(),
        };
        let now = orc_api::now_rfc3339();
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{}.", crate::util::name(obj)), "namespace": ns},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                "name": crate::util::name(obj), "namespace": crate::util::namespace(obj),
                "uid": crate::util::uid(obj), "resourceVersion": obj["metadata"]["resourceVersion"]},
            "reason": reason, "message": message, "type": kind,
            "source": {"component": self.component},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        });
        let api = self.api.clone();
        tokio::spawn(async move {
            let _ = api
                .call(Request::Create {
                    object: ev,
                    namespace: None,
                })
                .await;
        });
    }
}

/// Aborts a task when dropped (an actor's state owns its helper tasks).
pub struct TaskGuard(pub tokio::task::JoinHandle<()>);
impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub enum Msg {
    Enqueue(Vec<String>),
    ResyncAll,
    Work,
}

pub struct ControllerActor<R: Reconciler>(std::marker::PhantomData<R>);

impl<R: Reconciler> Default for ControllerActor<R> {
    fn default() -> Self {
        ControllerActor(std::marker::PhantomData)
    }
}

pub struct State<R: Reconciler> {
    r: Arc<R>,
    ctx: Arc<Ctx>,
    queue: VecDeque<String>,
    queued: HashSet<String>,
    working: bool,
    failures: HashMap<String, u32>,
    _tasks: Vec<TaskGuard>,
}

impl<R: Reconciler> State<R> {
    fn push(&mut self, keys: Vec<String>, me: &ActorRef<Msg>) {
        for k in keys {
            if self.queued.insert(k.clone()) {
                self.queue.push_back(k);
            }
        }
        if !self.working && !self.queue.is_empty() {
            self.working = true;
            let _ = me.cast(Msg::Work);
        }
    }
}

fn later(me: &ActorRef<Msg>, key: String, after: Duration) {
    let me = me.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let _ = me.cast(Msg::Enqueue(vec![key]));
    });
}

impl<R: Reconciler> Actor for ControllerActor<R> {
    type Msg = Msg;
    type State = State<R>;
    type Arguments = (Arc<R>, Arc<Ctx>);

    async fn pre_start(
        &self,
        me: ActorRef<Msg>,
        (r, ctx): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Changes -> keys.
        let mut sub = ctx.store.subscribe();
        let (r2, ctx2, me2) = (r.clone(), ctx.clone(), me.clone());
        let feed = tokio::spawn(async move {
            loop {
                match sub.recv().await {
                    Ok(ch) => {
                        let keys = r2.keys_for(&ctx2, &ch);
                        if !keys.is_empty() && me2.cast(Msg::Enqueue(keys)).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if me2.cast(Msg::ResyncAll).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let me3 = me.clone();
        let every = ctx.settings.resync;
        let resync = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if me3.cast(Msg::ResyncAll).is_err() {
                    return;
                }
            }
        });
        let _ = me.cast(Msg::ResyncAll);
        Ok(State {
            r,
            ctx,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            working: false,
            failures: HashMap::new(),
            _tasks: vec![TaskGuard(feed), TaskGuard(resync)],
        })
    }

    async fn handle(
        &self,
        me: ActorRef<Msg>,
        msg: Msg,
        st: &mut State<R>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Enqueue(keys) => st.push(keys, &me),
            Msg::ResyncAll => {
                let keys = st.r.all_keys(&st.ctx);
                st.push(keys, &me)
            }
            Msg::Work => {
                // Decide only on a cache that shows this controller's own writes.
                let want = st.ctx.written.load(Ordering::Relaxed);
                if !st
                    .ctx
                    .store
                    .wait_observed(want, Duration::from_secs(5))
                    .await
                {
                    tracing::warn!(
                        "{}: the cache has not caught up with revision {want}",
                        st.r.name()
                    );
                }
                let n = st.r.batch_size().min(st.queue.len());
                let keys: Vec<String> = st.queue.drain(..n).collect();
                for k in &keys {
                    st.queued.remove(k);
                }
                let outcomes = st.r.reconcile_batch(&st.ctx, &keys).await;
                for (k, o) in keys.into_iter().zip(outcomes) {
                    match o {
                        Ok(None) => {
                            st.failures.remove(&k);
                        }
                        Ok(Some(d)) => {
                            st.failures.remove(&k);
                            later(&me, k, d);
                        }
                        Err(e) => {
                            let n = st.failures.entry(k.clone()).or_insert(0);
                            *n += 1;
                            let quick = matches!(
                                e.reason,
                                Reason::Conflict | Reason::AlreadyExists | Reason::NotFound
                            );
                            let base = if quick { 5 } else { 100 };
                            let ms = (base << (*n).min(10)).min(30_000);
                            if !quick || *n > 3 {
                                tracing::info!("{} {k}: {e} (retry in {ms} ms)", st.r.name());
                            }
                            later(&me, k, Duration::from_millis(ms));
                        }
                    }
                }
                if st.queue.is_empty() {
                    st.working = false;
                } else {
                    let _ = me.cast(Msg::Work);
                }
            }
        }
        Ok(())
    }
}
