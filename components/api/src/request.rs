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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub object: Value,
}
