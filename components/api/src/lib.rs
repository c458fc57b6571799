//! The orc object model: which Kubernetes resources exist, how a body is validated
//! against the k8s-openapi types, label and field selectors, and the pure rules that
//! turn an accepted command into a stored object (resourceVersion, generation,
//! finalizers, deletion). It owns the wire types of the API (requests, answers,
//! watch events, Kubernetes-style errors).
//!
//! It must not depend on tokio, the network, RocksDB or Raft: everything here is a
//! pure function, unit-tested on plain values.

pub mod defaults;
pub mod error;
pub mod manifest;
pub mod mutation;
pub mod request;
pub mod resources;
pub mod selector;
pub mod validate;

pub use error::{ApiError, Reason};
pub use mutation::{Change, Command, EventType, ObjectKey};
pub use request::{Request, WatchEvent};
pub use resources::ResourceInfo;

/// Requests larger than this are rejected with RequestEntityTooLarge (Kubernetes: 3 MiB).
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;

/// Namespaces that exist from bootstrap.
pub const BOOTSTRAP_NAMESPACES: &[&str] = &["default", "orc-system", "kube-node-lease"];

/// The current time as Kubernetes writes it (RFC 3339, seconds, UTC).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Seconds elapsed since an RFC 3339 timestamp (None if it does not parse).
pub fn seconds_since(ts: &str) -> Option<i64> {
    let t: k8s_openapi::jiff::Timestamp = ts.parse().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((now - t.as_second()).max(0))
}

/// Apply an RFC 7386 JSON merge patch.
pub fn merge_patch(doc: &mut serde_json::Value, patch: &serde_json::Value) {
    json_patch::merge(doc, patch)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut d = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        super::merge_patch(&mut d, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(d, json!({"a": "z", "c": {"d": "e"}}));
        let mut d = json!({"a": [1, 2]});
        super::merge_patch(&mut d, &json!({"a": [3]}));
        assert_eq!(d, json!({"a": [3]}));
    }
}
