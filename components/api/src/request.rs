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
    /// Decode a request's JSON. The same as `serde_json::from_slice`, but a
    /// create or an update (most requests, each with a whole object) is read
    /// straight into its fields: the derived decoder of an internally tagged
    /// enum first copies the whole body into an intermediate tree to find the
    /// tag, then builds the object from that copy.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Request> {
        #[derive(Deserialize)]
        struct Verb<'a> {
            #[serde(borrow)]
            verb: std::borrow::Cow<'a, str>,
        }
        #[derive(Deserialize)]
        struct Create {
            object: Value,
            namespace: Option<String>,
        }
        #[derive(Deserialize)]
        struct Update {
            object: Value,
            namespace: Option<String>,
            #[serde(default)]
            status: bool,
        }
        match serde_json::from_slice::<Verb>(bytes)
            .as_ref()
            .map(|v| &*v.verb)
        {
            Ok("create") => serde_json::from_slice(bytes)
                .map(|Create { object, namespace }| Request::Create { object, namespace }),
            Ok("update") => serde_json::from_slice(bytes).map(
                |Update {
                     object,
                     namespace,
                     status,
                 }| Request::Update {
                    object,
                    namespace,
                    status,
                },
            ),
            _ => serde_json::from_slice(bytes),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `from_json` reads what the derived decoder reads, and fails where it fails.
    #[test]
    fn from_json_agrees_with_the_derived_decoder() {
        let bodies = [
            json!({"verb": "create", "object": {"kind": "ConfigMap", "data": {"a": "b"}}}),
            json!({"verb": "create", "object": {"kind": "Pod"}, "namespace": "ns"}),
            json!({"object": {"kind": "Pod"}, "namespace": null, "verb": "create"}),
            json!({"verb": "update", "object": {"kind": "Pod"}, "status": true}),
            json!({"verb": "update", "object": {"kind": "Pod"}, "namespace": "x", "extra": 1}),
            json!({"verb": "get", "resource": "pods", "namespace": "a", "name": "b"}),
            json!({"verb": "memberStatus"}),
            // Failures: no object, a wrong type, no verb, an unknown verb.
            json!({"verb": "create"}),
            json!({"verb": "update", "object": {}, "status": "yes"}),
            json!({"object": {}}),
            json!({"verb": "frobnicate"}),
        ];
        for b in bodies {
            let bytes = serde_json::to_vec(&b).unwrap();
            let derived = serde_json::from_slice::<Request>(&bytes);
            let ours = Request::from_json(&bytes);
            match (derived, ours) {
                (Ok(d), Ok(o)) => assert_eq!(
                    serde_json::to_value(&d).unwrap(),
                    serde_json::to_value(&o).unwrap(),
                    "{b}"
                ),
                (Err(_), Err(_)) => {}
                (d, o) => panic!("{b}: derived {d:?}, from_json {o:?}"),
            }
        }
        assert!(Request::from_json(b"{\"verb\": \"create\", ").is_err());
    }
}
