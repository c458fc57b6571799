//! The controllers and the scheduler: the actors that run on the Raft leader and
//! make the cluster match what users asked for (ReplicaSets, Deployments, node
//! lifecycle and IPAM, garbage collection, namespaces, scheduling). Each is a
//! pure decision (unit-tested on plain values) inside a thin ractor actor fed by
//! one informer cache.
//!
//! It talks to the cluster only through the `Api` trait (the master in-process,
//! or `orc-client`); it must not depend on Raft, RocksDB or the apiserver.

pub mod api;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod gc;
pub mod informer;
pub mod job;
pub mod loadbalancer;
pub mod nodes;
pub mod replicaset;
pub mod runner;
pub mod scheduler;
pub mod statefulset;
pub mod store;
pub mod supervisor;
pub mod util;

pub use api::{Api, ClientApi};

use ractor::{Actor, ActorRef};
use std::sync::Arc;
use std::time::Duration;
use supervisor::{Child, SupArgs, SupMsg, Supervisor};

/// Every timer and range the controllers use (flags of `orc master`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every controller looks at everything again this often.
    pub resync: Duration,
    /// A node without a Lease renewal for this long turns Unknown (node-monitor-grace-period).
    pub node_grace: Duration,
    /// Pod networks: each node gets a `/node_cidr_mask` of this range.
    pub cluster_cidr: String,
    pub node_cidr_mask: u8,
    /// First delay before a failed Job's pod is retried (doubles, at most 6 min).
    pub job_backoff: Duration,
    /// Addresses handed to LoadBalancer Services (empty: none are).
    pub lb_pool: Vec<std::net::Ipv4Addr>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            resync: Duration::from_secs(60),
            node_grace: Duration::from_secs(40),
            cluster_cidr: "198.18.0.0/16".into(),
            node_cidr_mask: 24,
            job_backoff: Duration::from_secs(10),
            lb_pool: Vec::new(),
        }
    }
}

/// The running actor tree; stop it when leadership is lost.
pub struct Controllers {
    sup: ActorRef<SupMsg>,
}

impl Controllers {
    pub async fn stop(self) {
        let _ = self
            .sup
            .stop_and_wait(Some("leadership lost".into()), Some(Duration::from_secs(5)))
            .await;
    }
}

/// Start the supervisor and every controller under it.
pub async fn start(api: Arc<dyn Api>, settings: Settings) -> Result<Controllers, String> {
    let store = store::Store::new();
    let settings = Arc::new(settings);
    let (a, s, st) = (api.clone(), store.clone(), settings.clone());
    let children = vec![
        Child::controller(
            replicaset::ReplicaSets::for_replicasets(),
            a.clone(),
            s.clone(),
            st.clone(),
        ),
        Child::controller(
            replicaset::ReplicaSets::for_replication_controllers(),
            a.clone(),
            s.clone(),
            st.clone(),
        ),
        Child::controller(deployment::Deployments, a.clone(), s.clone(), st.clone()),
        Child::controller(daemonset::DaemonSets, a.clone(), s.clone(), st.clone()),
        Child::controller(job::Jobs, a.clone(), s.clone(), st.clone()),
        Child::controller(cronjob::CronJobs, a.clone(), s.clone(), st.clone()),
        Child::controller(statefulset::StatefulSets, a.clone(), s.clone(), st.clone()),
        Child::controller(statefulset::Volumes, a.clone(), s.clone(), st.clone()),
        Child::controller(endpoints::Endpoints, a.clone(), s.clone(), st.clone()),
        Child::controller(
            loadbalancer::LoadBalancers,
            a.clone(),
            s.clone(),
            st.clone(),
        ),
        Child::controller(
            scheduler::Scheduler::default(),
            a.clone(),
            s.clone(),
            st.clone(),
        ),
        Child::controller(gc::GarbageCollector, a.clone(), s.clone(), st.clone()),
        Child::controller(gc::Namespaces, a.clone(), s.clone(), st.clone()),
        Child::controller(nodes::NodeLifecycle::default(), a, s, st),
    ];
    let (sup, _) = Supervisor::spawn(
        None,
        Supervisor,
        SupArgs {
            api,
            store,
            children,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(Controllers { sup })
}
