//! The leader's actor tree: a supervisor that owns the informer and one actor
//! per controller, restarting a failed child with back-off (100 ms doubling to
//! 30 s). It is started when a master becomes Raft leader and stopped when it
//! stops being leader.
use crate::api::Api;
use crate::runner::{ControllerActor, Ctx, Reconciler, TaskGuard};
use crate::store::Store;
use crate::Settings;
use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

type SpawnFn =
    Arc<dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, String>> + Send + Sync>;

/// One child: its name and how to start it.
#[derive(Clone)]
pub struct Child {
    pub name: &'static str,
    spawn: SpawnFn,
}

impl Child {
    pub fn controller<R: Reconciler>(
        r: R,
        api: Arc<dyn Api>,
        store: Arc<Store>,
        settings: Arc<Settings>,
    ) -> Child {
        let r = Arc::new(r);
        let name = r.name();
        Child {
            name,
            spawn: Arc::new(move |sup: ActorCell| {
                let ctx = Arc::new(Ctx::new(api.clone(), store.clone(), settings.clone(), name));
                let r = r.clone();
                Box::pin(async move {
                    ControllerActor::<R>::spawn_linked(
                        None,
                        ControllerActor::default(),
                        (r, ctx),
                        sup,
                    )
                    .await
                    .map(|(a, _)| a.get_cell())
                    .map_err(|e| e.to_string())
                })
            }),
        }
    }
}

pub enum SupMsg {
    Restart(&'static str),
}

pub struct Supervisor;

pub struct SupState {
    children: Vec<Child>,
    running: HashMap<ractor::ActorId, &'static str>,
    failures: HashMap<&'static str, u32>,
    _informer: TaskGuard,
}

impl SupState {
    async fn start(&mut self, me: &ActorRef<SupMsg>, name: &'static str) {
        let Some(c) = self.children.iter().find(|c| c.name == name).cloned() else {
            return;
        };
        match (c.spawn)(me.get_cell()).await {
            Ok(cell) => {
                self.running.insert(cell.get_id(), name);
            }
            Err(e) => {
                tracing::warn!("starting {name}: {e}");
                self.retry(me, name);
            }
        }
    }

    fn retry(&mut self, me: &ActorRef<SupMsg>, name: &'static str) {
        let n = self.failures.entry(name).or_insert(0);
        *n += 1;
        let delay = Duration::from_millis((100u64 << (*n).min(9)).min(30_000));
        tracing::warn!("restarting {name} in {delay:?}");
        let me = me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = me.cast(SupMsg::Restart(name));
        });
    }
}

pub struct SupArgs {
    pub api: Arc<dyn Api>,
    pub store: Arc<Store>,
    pub children: Vec<Child>,
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = SupArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<SupMsg>,
        args: SupArgs,
    ) -> Result<SupState, ActorProcessingErr> {
        let informer = tokio::spawn(crate::store::run(args.api.clone(), args.store.clone()));
        // Controllers start on a complete cache.
        while args.store.observed() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(SupState {
            children: args.children,
            running: HashMap::new(),
            failures: HashMap::new(),
            _informer: TaskGuard(informer),
        })
    }

    async fn post_start(
        &self,
        me: ActorRef<SupMsg>,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        let names: Vec<&'static str> = st.children.iter().map(|c| c.name).collect();
        for n in names {
            st.start(&me, n).await;
        }
        tracing::info!("controllers started: {}", st.running.len());
        Ok(())
    }

    async fn post_stop(
        &self,
        me: ActorRef<SupMsg>,
        _st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        me.stop_children(None);
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<SupMsg>,
        msg: SupMsg,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::Restart(name) => st.start(&me, name).await,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<SupMsg>,
        ev: SupervisionEvent,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        match ev {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(name) = st.running.remove(&cell.get_id()) {
                    tracing::error!("controller {name} failed: {err}");
                    st.retry(&me, name);
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(name) = st.running.remove(&cell.get_id()) {
                    tracing::warn!("controller {name} stopped ({reason:?})");
                    st.retry(&me, name);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BoxFuture as ApiFuture;
    use crate::runner::Outcome;
    use crate::store::Change;
    use orc_api::request::{Request, WatchEvent, WatchRequest};
    use orc_api::ApiError;
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::mpsc;

    /// An empty cluster whose watch stays open (the shell, not a part the test is about).
    struct Empty(std::sync::Mutex<Vec<mpsc::Sender<WatchEvent>>>);
    impl Api for Empty {
        fn call(&self, _req: Request) -> ApiFuture<Result<Value, ApiError>> {
            Box::pin(async { Ok(json!({"metadata": {"resourceVersion": "1"}, "items": []})) })
        }
        fn watch(&self, _req: WatchRequest) -> ApiFuture<mpsc::Receiver<WatchEvent>> {
            let (tx, rx) = mpsc::channel(1);
            self.0.lock().unwrap().push(tx);
            Box::pin(async move { rx })
        }
    }

    /// Panics the first time it reconciles, then counts.
    struct Flaky(Arc<AtomicUsize>);
    impl Reconciler for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn keys_for(&self, _ctx: &Ctx, _ch: &Change) -> Vec<String> {
            Vec::new()
        }
        fn all_keys(&self, _ctx: &Ctx) -> Vec<String> {
            vec!["k".into()]
        }
        fn reconcile<'a>(&'a self, _ctx: &'a Ctx, _key: &'a str) -> BoxFuture<'a, Outcome> {
            Box::pin(async move {
                if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first reconcile fails");
                }
                Ok(None)
            })
        }
    }

    #[tokio::test]
    async fn a_crashed_controller_is_restarted() {
        let api: Arc<dyn Api> = Arc::new(Empty(Default::default()));
        let store = Store::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let settings = Arc::new(Settings::default());
        let child = Child::controller(Flaky(runs.clone()), api.clone(), store.clone(), settings);
        let (sup, handle) = Supervisor::spawn(
            None,
            Supervisor,
            SupArgs {
                api,
                store,
                children: vec![child],
            },
        )
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            runs.load(Ordering::SeqCst) >= 2,
            "the controller ran again after its crash"
        );
        sup.stop(None);
        handle.await.unwrap();
    }
}
