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
