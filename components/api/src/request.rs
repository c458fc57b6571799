//! The API's requests and watch events, as they travel (JSON inside the gRPC envelope).
use crate::mutation::{EventType, Preconditions};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "camelCase")]
pub enum Request {
    /// Create an object; `namespace` fills in a missing `metadata.namespace`.
    Create {
        object: Value,
        namespace: Option<String>,
    },
    Get {
        resource: String,
        namespace: String,
        name: String,
    },
    List {
        resource: String,
        /// None: all namespaces.
        namespace: Option<String>,
        #[serde(default)]
        label_selector: String,
        #[serde(default)]
        field_selector: String,
    },
    /// Replace an object; a `metadata.resourceVersion` in it is a precondition.
    Update {
        object: Value,
        namespace: Option<String>,
        #[serde(default)]
        status: bool,
    },
    /// RFC 7386 JSON merge patch.
    Patch {
        resource: String,
        namespace: String,
        name: String,
        patch: Value,
        #[serde(default)]
        status: bool,
    },
    Delete {
        resource: String,
        namespace: String,
        name: String,
        #[serde(default)]
        preconditions: Preconditions,
        propagation_policy: Option<String>,
        /// Pods bound to a node: seconds the node gets to stop them (None:
        /// the pod's terminationGracePeriodSeconds; 0: remove now).
        #[serde(default)]
        grace_period_seconds: Option<i64>,
    },
    /// The cluster as this master sees it, with every member asked for its state.
    ClusterStatus,
    /// This master's own Raft state (used by ClusterStatus on other masters).
    MemberStatus,
    AddMaster {
        id: u64,
        address: String,
    },
    RemoveMaster {
        id: u64,
    },
    /// A consistent copy of the whole object store.
    Snapshot,
}

impl Request {
    /// A write of objects: committed through the Raft leader, so a client
    /// that knows the leader sends it there (a follower would forward it).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Create { .. }
                | Request::Update { .. }
                | Request::Patch { .. }
                | Request::Delete { .. }
        )
    }
}

/// Watch: events after `resource_version` (or, without one, the current state as
/// ADDED events first, then changes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchRequest {
    pub resource: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub label_selector: String,
    #[serde(default)]
    pub field_selector: String,
    pub resource_version: Option<String>,
    /// Send BOOKMARK events carrying the latest resourceVersion.
    #[serde(default)]
    pub bookmarks: bool,
}

/// One watch event, as Kubernetes sends it: `{"type": "ADDED", "object": {...}}`.
/// The object is shared: every watcher of a master is handed the same one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub object: std::sync::Arc<Value>,
}

/// `orc logs`: the output of one container of a pod.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LogsRequest {
    pub namespace: String,
    pub pod: String,
    /// Empty: the pod's only (or first) container.
    #[serde(default)]
    pub container: String,
    #[serde(default)]
    pub follow: bool,
    /// The previous instance of a restarted container.
    #[serde(default)]
    pub previous: bool,
    /// Only the last N lines.
    #[serde(default)]
    pub tail_lines: Option<u64>,
    #[serde(default)]
    pub timestamps: bool,
}

/// `orc exec`: a command in a running container.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    #[serde(default)]
    pub container: String,
    pub command: Vec<String>,
    /// Pass standard input.
    #[serde(default)]
    pub stdin: bool,
    /// Run under a pseudo-terminal (output comes as one stream).
    #[serde(default)]
    pub tty: bool,
}

/// Exec output frames: the first byte of each says what follows.
pub const EXEC_STDOUT: u8 = 1;
pub const EXEC_STDERR: u8 = 2;
/// Followed by `{"exitCode": N}`.
pub const EXEC_EXIT: u8 = 3;
