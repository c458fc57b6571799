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

/// A log entry's command and its JSON, each made at most once.
///
/// The leader writes an entry to its own log and sends it to each follower;
/// each follower writes what it received to its log. All of these are the
/// same JSON, so it is kept with the command: encoded on first use on the
/// leader. On a follower (and when read back from the log) the entry keeps the
/// very bytes that arrived and parses them only when the state machine applies
/// it: an AppendEntries is answered once its entries are durable, not after
/// every object in them has been parsed (a megabyte of pods takes tens of
/// milliseconds, and openraft gives the whole call one heartbeat interval).
///
/// The state machine takes the command ([`Logged::take_command`]): a created
/// object becomes the stored one without a copy, and the log's cache of
/// recent entries keeps only the JSON.
#[derive(Debug)]
pub struct Logged {
    /// The command made on this master, until the state machine takes it.
    cmd: std::sync::Mutex<Option<Command>>,
    json: std::sync::OnceLock<Box<serde_json::value::RawValue>>,
}

impl Logged {
    pub fn new(cmd: Command) -> Self {
        Logged {
            cmd: std::sync::Mutex::new(Some(cmd)),
            json: std::sync::OnceLock::new(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Command>> {
        self.cmd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The command, to apply: the one made here if it is still here (taken
    /// out, after its JSON is made, so the entry can still be replicated and
    /// read back), else parsed from the JSON; or why the JSON is not a command.
    pub fn take_command(&self) -> Result<Command, String> {
        let json = self.json();
        if let Some(cmd) = self.held().take() {
            return Ok(cmd);
        }
        serde_json::from_str(json.get()).map_err(|e| e.to_string())
    }

    /// The command made on this master, if no state machine took it (an
    /// entry Raft refused, handed back to be sent elsewhere). Its JSON is made
    /// first, so the entry stays whole should it be in a log after all.
    pub fn into_command(&self) -> Option<Command> {
        self.json();
        self.held().take()
    }

    /// The command's JSON (encoded now if it was not yet).
    pub fn json(&self) -> &serde_json::value::RawValue {
        self.json.get_or_init(|| {
            serde_json::value::to_raw_value(
                self.held()
                    .as_ref()
                    .expect("a Logged has its command or its JSON"),
            )
            .expect("a command encodes as JSON")
        })
    }
}

impl serde::Serialize for Logged {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Logged {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        Ok(Logged {
            cmd: std::sync::Mutex::new(None),
            json: std::sync::OnceLock::from(raw),
        })
    }
}

openraft::declare_raft_types!(
    /// orc's Raft types: log entries carry an `orc_api::Command` with its
    /// JSON ([`Logged`]), shared (not copied) between the log's cache of
    /// recent entries, replication and the state machine.
    pub TypeConfig:
        D = std::sync::Arc<Logged>,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;

pub use hub::{Hub, StoredEvent};
pub use store::{open, LogStore, StateMachine, StoreError};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_commands_keep_the_json_they_had() {
        let cmd = Command::Create {
            key: orc_api::ObjectKey::new("configmaps", "default", "a"),
            object: serde_json::json!({"metadata": {"name": "a"}, "data": {"k": "v \"q\""}}),
        };
        // The log and the wire carry exactly what a bare command encoded to
        // before, so logs written by earlier versions still read.
        let plain = serde_json::to_string(&cmd).unwrap();
        let logged = Logged::new(cmd);
        // The command made here is taken as it is; the JSON stays, for
        // replication and the log, and still gives the command.
        assert!(
            matches!(logged.take_command(), Ok(Command::Create { key, .. }) if key.name == "a")
        );
        assert_eq!(serde_json::to_string(&logged).unwrap(), plain);
        assert!(
            matches!(logged.take_command(), Ok(Command::Create { key, .. }) if key.name == "a")
        );
        // A command handed back (Raft refused the entry) leaves its JSON behind,
        // so the entry still reads whole; a second hand-back finds nothing.
        let refused = Logged::new(Command::Noop);
        assert!(matches!(refused.into_command(), Some(Command::Noop)));
        assert!(refused.into_command().is_none());
        assert!(matches!(refused.take_command(), Ok(Command::Noop)));
        // What arrives is kept as it arrived, and parsed for the state machine.
        let back: Logged = serde_json::from_str(&plain).unwrap();
        assert_eq!(back.json().get(), plain);
        assert!(matches!(back.take_command(), Ok(Command::Create { key, .. }) if key.name == "a"));
        // JSON that is not a command is kept, and refused when it is applied.
        let bad: Logged = serde_json::from_str(r#"{"Nonsense": 1}"#).unwrap();
        let e = bad.take_command().unwrap_err();
        assert!(e.contains("Nonsense"), "{e}");
        // Inside an entry too.
        let ent: openraft::Entry<TypeConfig> = openraft::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 7),
            payload: openraft::EntryPayload::Normal(std::sync::Arc::new(back)),
        };
        let bytes = serde_json::to_vec(&ent).unwrap();
        let again: openraft::Entry<TypeConfig> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(serde_json::to_vec(&again).unwrap(), bytes);
    }
}
