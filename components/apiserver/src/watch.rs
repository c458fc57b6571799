//! Watches, served from this master's apply stream: a resourceVersion to resume
//! from (inside the hub's window), or the current state as ADDED events first.
use crate::api::{resource_info, Master};
use orc_api::mutation::{EventType, ObjectKey};
use orc_api::request::{WatchEvent, WatchRequest};
use orc_api::selector::{FieldSelector, LabelSelector};
use orc_api::{ApiError, Reason};
use orc_raft::hub::HubMessage;
use orc_raft::StoredEvent;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

type Tx = mpsc::Sender<WatchEvent>;

async fn send(tx: &Tx, ev: WatchEvent) -> bool {
    tx.send(ev).await.is_ok()
}

async fn send_error(tx: &Tx, e: ApiError) {
    let _ = send(
        tx,
        WatchEvent {
            event_type: EventType::Error,
            object: e.to_status().into(),
        },
    )
    .await;
}

fn expired(rv: u64, floor: u64) -> ApiError {
    ApiError::new(Reason::Expired, format!("too old resource version: {rv} ({floor}); the watch history on this master starts after {floor}: relist"))
}

struct Filter {
    prefix: String,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn selected(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event a watcher with this filter sees for `e`, if any. As in
    /// Kubernetes' watch cache, a change that brings an object into the selection
    /// is ADDED and one that takes it out is DELETED.
    fn classify(&self, e: &StoredEvent) -> Option<EventType> {
        if !e.key.starts_with(&self.prefix) {
            return None;
        }
        let now = self.selected(&e.object);
        match e.event_type {
            EventType::Modified => {
                let before = e.previous.as_ref().map(|p| self.selected(p)).unwrap_or(now);
                match (before, now) {
                    (true, true) => Some(EventType::Modified),
                    (false, true) => Some(EventType::Added),
                    (true, false) => Some(EventType::Deleted),
                    (false, false) => None,
                }
            }
            other => now.then_some(other),
        }
    }
}

/// Start a watch; its events (ending with an ERROR event if it fails) arrive on
/// the receiver. Dropping the receiver ends it.
pub fn start(master: Arc<Master>, req: WatchRequest) -> mpsc::Receiver<WatchEvent> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        if let Err(e) = run(master, req, &tx).await {
            send_error(&tx, e).await;
        }
    });
    rx
}

async fn run(master: Arc<Master>, req: WatchRequest, tx: &Tx) -> Result<(), ApiError> {
    // "*" watches every resource (the controllers' informer).
    let all = req.resource == "*";
    let info = resource_info(if all { "namespaces" } else { &req.resource })?;
    let filter = Filter {
        prefix: if all {
            String::new()
        } else {
            ObjectKey::prefix(
                info.plural,
                req.namespace.as_deref().filter(|_| info.namespaced),
            )
        },
        labels: LabelSelector::parse(&req.label_selector)?,
        fields: FieldSelector::parse(&req.field_selector)?,
    };
    let hub = master.sm.hub().clone();
    let from_rv = req
        .resource_version
        .as_deref()
        .filter(|s| !s.is_empty() && *s != "0");
    let (start, initial) = match from_rv {
        Some(rv) => {
            let rv: u64 = rv.parse().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion \"{rv}\" is not a number"))
            })?;
            (rv, Vec::new())
        }
        None => {
            // The current state (linearizable), then everything after it.
            master.read_barrier().await?;
            let (index, objs) = master
                .sm
                .list(&filter.prefix)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            (index, objs)
        }
    };
    let sub = hub
        .subscribe(start)
        .ok_or_else(|| expired(start, hub.floor()))?;
    for (key, object) in initial {
        if key.starts_with(&filter.prefix)
            && filter.selected(&object)
            && !send(
                tx,
                WatchEvent {
                    event_type: EventType::Added,
                    object: object.into(),
                },
            )
            .await
        {
            return Ok(());
        }
    }
    let mut sent_up_to = start;
    for e in sub.backlog {
        sent_up_to = e.index;
        if let Some(event_type) = filter.classify(&e) {
            if !send(
                tx,
                WatchEvent {
                    event_type,
                    object: e.object,
                },
            )
            .await
            {
                return Ok(());
            }
        }
    }
    let mut rx = sub.rx;
    let mut latest = sub.last.max(sent_up_to);
    let mut bookmarked = start;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(HubMessage::Events(evs)) => {
                    for e in evs.iter() {
                        if e.index <= sent_up_to {
                            continue; // already sent from the backlog
                        }
                        sent_up_to = e.index;
                        latest = latest.max(e.index);
                        if let Some(event_type) = filter.classify(e) {
                            if !send(tx, WatchEvent { event_type, object: e.object.clone() }).await {
                                return Ok(());
                            }
                        }
                    }
                }
                Ok(HubMessage::Progress(i)) => latest = latest.max(i),
                Ok(HubMessage::Reset) => return Err(expired(sent_up_to, hub.floor())),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Err(ApiError::new(Reason::Expired, "the watcher fell behind the apply stream: relist"))
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = tick.tick() => {
                if tx.is_closed() {
                    return Ok(());
                }
                if req.bookmarks && latest > bookmarked {
                    bookmarked = latest;
                    let obj: Value = json!({"apiVersion": info.api_version, "kind": info.kind,
                        "metadata": {"resourceVersion": latest.to_string()}});
                    if !send(tx, WatchEvent { event_type: EventType::Bookmark, object: obj.into() }).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(labels: &str) -> Filter {
        Filter {
            prefix: "pods/ns/".into(),
            labels: LabelSelector::parse(labels).unwrap(),
            fields: FieldSelector::parse("").unwrap(),
        }
    }

    fn ev(t: EventType, now: &str, before: Option<&str>) -> StoredEvent {
        let obj = |app: &str| json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": app}}});
        StoredEvent {
            index: 1,
            key: "pods/ns/p".into(),
            event_type: t,
            object: obj(now).into(),
            previous: before.map(obj),
            size: 0,
        }
    }

    #[test]
    fn objects_entering_and_leaving_a_selection() {
        let f = filter("app=web");
        assert_eq!(
            f.classify(&ev(EventType::Added, "web", None)),
            Some(EventType::Added)
        );
        assert_eq!(f.classify(&ev(EventType::Added, "db", None)), None);
        assert_eq!(
            f.classify(&ev(EventType::Modified, "web", Some("web"))),
            Some(EventType::Modified)
        );
        assert_eq!(
            f.classify(&ev(EventType::Modified, "web", Some("db"))),
            Some(EventType::Added)
        );
        assert_eq!(
            f.classify(&ev(EventType::Modified, "db", Some("web"))),
            Some(EventType::Deleted)
        );
        assert_eq!(f.classify(&ev(EventType::Modified, "db", Some("db"))), None);
        assert_eq!(
            f.classify(&ev(EventType::Deleted, "web", None)),
            Some(EventType::Deleted)
        );
        let mut other_ns = ev(EventType::Added, "web", None);
        other_ns.key = "pods/other/p".into();
        assert_eq!(f.classify(&other_ns), None);
    }
}
