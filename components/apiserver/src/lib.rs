//! The master: it starts the Raft node over the RocksDB store, serves the `orc.Orc`
//! gRPC service (Raft traffic and the API on one port), decides everything
//! non-deterministic about a write (uid, timestamps, generated names) before
//! proposing it, forwards writes to the leader, serves linearizable reads
//! (ReadIndex) and watches from the local apply stream.
//!
//! It must not depend on the CLI or on anything that runs on nodes. Request
//! validation comes from `orc-api`; durable state from `orc-raft`.

mod alloc;
mod api;
mod batch;
mod service;
mod watch;

use openraft::{BasicNode, SnapshotPolicy};
use orc_raft::network::NetworkFactory;
use orc_raft::{Hub, Raft, StateMachine};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use api::Master;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("opening the store in {dir}: {source}")]
    Store {
        dir: PathBuf,
        source: orc_raft::StoreError,
    },
    #[error("starting raft: {0}")]
    Raft(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving gRPC on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
}

/// Everything a master needs to start. Timers are settings so tests can shrink them.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub id: u64,
    pub listen: SocketAddr,
    /// The address other masters and clients use to reach this one (defaults to `listen`).
    pub advertise: String,
    pub data_dir: PathBuf,
    /// The founding members; a master not in it waits to be added (`cluster add-master`).
    pub initial_cluster: BTreeMap<u64, String>,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Build a snapshot (and purge the log behind it) after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for slightly lagging followers.
    pub keep_logs: u64,
    /// A write that is not committed by then fails with Unavailable.
    pub write_timeout: Duration,
    /// Watch history kept in memory: at most this many changes ...
    pub watch_window: usize,
    /// ... and at most this many bytes of objects (see `orc_raft::hub`).
    pub watch_window_bytes: usize,
    /// The controllers' timers and ranges (they run while this master leads).
    pub controllers: orc_controllers::Settings,
    /// Admission defaults.
    pub defaults: orc_api::defaults::Defaults,
    /// ClusterIPs come from this range ...
    pub service_cidr: String,
    /// ... and NodePorts from this one.
    pub node_ports: (u16, u16),
}

impl MasterConfig {
    pub fn new(
        id: u64,
        listen: SocketAddr,
        data_dir: PathBuf,
        initial_cluster: BTreeMap<u64, String>,
    ) -> Self {
        MasterConfig {
            id,
            listen,
            advertise: listen.to_string(),
            data_dir,
            initial_cluster,
            // openraft 0.9 starts an election `election_max + rand(min..max)` after the
            // last heartbeat (plus `2 * election_max` on a master with a shorter log),
            // so these give a new leader 0.45-0.6 s after a leader dies, at most 1.2 s.
            // openraft also cancels an AppendEntries after one heartbeat interval, so
            // the interval must cover a loaded follower's append + fsync: 100 ms.
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(150),
            election_max: Duration::from_millis(300),
            snapshot_every: 10_000,
            keep_logs: 1_000,
            write_timeout: Duration::from_secs(5),
            watch_window: 100_000,
            watch_window_bytes: 256 << 20,
            controllers: orc_controllers::Settings::default(),
            defaults: orc_api::defaults::Defaults::default(),
            service_cidr: "198.19.0.0/16".into(),
            node_ports: (30000, 32767),
        }
    }
}

/// Start a master and serve until `stop` completes; then stop Raft and flush
/// the state machine (its writes skip RocksDB's WAL: without the flush a
/// restart would re-apply them from the log, and an offline look at the
/// store, `orc debug check-store`, would see it as of the last flush).
pub async fn run(
    cfg: MasterConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), MasterError> {
    let raft_cfg = openraft::Config {
        cluster_name: "orc".into(),
        heartbeat_interval: cfg.heartbeat.as_millis() as u64,
        election_timeout_min: cfg.election_min.as_millis() as u64,
        election_timeout_max: cfg.election_max.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        max_in_snapshot_log_to_keep: cfg.keep_logs,
        // Entries are batches of up to 512 writes (1 MiB): an AppendEntries must be
        // handled within one heartbeat interval, or it is retried for ever (a
        // 1,000-node registration burst with 64 entries per payload livelocked).
        max_payload_entries: 4,
        ..Default::default()
    }
    .validate()
    .map_err(|e| MasterError::Config(e.to_string()))?;
    let dir = cfg.data_dir.join("raft");
    std::fs::create_dir_all(&dir).map_err(|e| MasterError::Store {
        dir: dir.clone(),
        source: orc_raft::StoreError::Corrupt {
            what: "data dir".into(),
            why: e.to_string(),
        },
    })?;
    let hub = Hub::new(cfg.watch_window, cfg.watch_window_bytes);
    let (log, sm): (_, StateMachine) =
        orc_raft::open(&dir, hub).map_err(|source| MasterError::Store {
            dir: dir.clone(),
            source,
        })?;
    let raft = Raft::new(cfg.id, Arc::new(raft_cfg), NetworkFactory, log, sm.clone())
        .await
        .map_err(|e| MasterError::Raft(e.to_string()))?;
    let master = Arc::new(Master::new(cfg.clone(), raft.clone(), sm));

    let server = service::serve(master.clone(), cfg.listen);
    let server = tokio::spawn(server);

    if cfg.initial_cluster.contains_key(&cfg.id) && !raft.is_initialized().await.unwrap_or(true) {
        let members: BTreeMap<u64, BasicNode> = cfg
            .initial_cluster
            .iter()
            .map(|(id, a)| (*id, BasicNode::new(a)))
            .collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!("initialized a new cluster"),
            Err(e) => tracing::info!("not initializing: {e}"),
        }
    }
    tokio::spawn(api::leader_duties(master.clone()));

    let served = tokio::select! {
        r = server => r.map_err(|e| MasterError::Raft(e.to_string()))?,
        _ = stop => Ok(()),
    };
    if let Err(e) = raft.shutdown().await {
        tracing::warn!("stopping raft: {e}");
    }
    let sm = master.sm.clone();
    match tokio::task::spawn_blocking(move || sm.flush()).await {
        Ok(Ok(())) => tracing::info!("state machine flushed"),
        Ok(Err(e)) => tracing::warn!("flushing the state machine: {e}"),
        Err(e) => tracing::warn!("flushing the state machine: {e}"),
    }
    served
}
