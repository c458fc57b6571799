//! Raft for orc masters: the openraft type configuration, the RocksDB log store and
//! state machine (the API object store), snapshots built from and installed into that
//! store, the watch hub fed by the apply stream, and the Raft network over tonic.
//!
//! It owns durable state and replication only. It must not know about users, the
//! CLI, request validation or admission: commands arrive decided, and the rules for
//! applying them come from `orc-api`'s pure `mutation::apply`.

// openraft's trait methods return its `StorageError` (over 200 bytes); our helpers
// return the same type so `?` flows into them unchanged.
#![allow(clippy::result_large_err)]

pub mod hub;
pub mod network;
pub mod store;

use orc_api::{ApiError, Change, Command};
use std::io::Cursor;

pub type NodeId = u64;
/// What applying one log entry produced: one result per command it carried (a
/// batch carries several; blank and membership entries none).
pub type Response = Vec<Result<Change, ApiError>>;

openraft::declare_raft_types!(
    /// orc's Raft types: log entries carry an `orc_api::Command`, shared
    /// (not copied) between the log's cache of recent entries, replication
    /// and the state machine.
    pub TypeConfig:
        D = std::sync::Arc<Command>,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;

pub use hub::{Hub, StoredEvent};
pub use store::{open, LogStore, StateMachine, StoreError};
