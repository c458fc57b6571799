//! The watch hub: every applied change, in log order, kept in a bounded window so a
//! watch can resume from a resourceVersion, and broadcast to live watchers.
//!
//! Window contract: a watch may resume from any resourceVersion `>= floor()`; older
//! ones are answered Expired and the client relists. The window holds the changes
//! applied on this master since it started, at most `capacity` of them (default
//! 100,000) and at most `max_bytes` of serialized objects (default 256 MiB), and is
//! reset when a snapshot is installed.
use orc_api::EventType;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The store revision that produced it (= the object's resourceVersion).
    pub index: u64,
    /// `resource/namespace/name`.
    pub key: String,
    pub event_type: EventType,
    pub object: Arc<Value>,
    /// For MODIFIED: what selectors read of the object before the change.
    pub previous: Option<Value>,
    /// Serialized size of `object`, for the window's byte bound.
    pub size: usize,
}

/// What a live watcher receives.
#[derive(Debug, Clone)]
pub enum HubMessage {
    Events(Arc<Vec<StoredEvent>>),
    /// The applied index moved (possibly without events): for bookmarks.
    Progress(u64),
    /// The history was replaced (snapshot installed): watchers must relist.
    Reset,
}

struct Inner {
    /// The published batches, shared (not copied) with the live watchers
    /// that received them; the first `skip` events of the front batch have
    /// left the window.
    window: VecDeque<Arc<Vec<StoredEvent>>>,
    skip: usize,
    /// Events in the window.
    len: usize,
    /// Sum of `size` over the window.
    bytes: usize,
    floor: u64,
    last: u64,
}

pub struct Hub {
    inner: Mutex<Inner>,
    capacity: usize,
    max_bytes: usize,
    tx: broadcast::Sender<HubMessage>,
}

pub struct Subscription {
    /// Events after the requested version, already in the window.
    pub backlog: Vec<StoredEvent>,
    pub rx: broadcast::Receiver<HubMessage>,
    pub last: u64,
}

impl Hub {
    pub fn new(capacity: usize, max_bytes: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(4096);
        Arc::new(Hub {
            inner: Mutex::new(Inner {
                window: VecDeque::new(),
                skip: 0,
                len: 0,
                bytes: 0,
                floor: 0,
                last: 0,
            }),
            capacity,
            max_bytes,
            tx,
        })
    }

    /// Start (or restart) history at `index`: changes after it will be recorded.
    pub fn reset(&self, index: u64) {
        let mut g = self.inner.lock().unwrap();
        g.window.clear();
        g.skip = 0;
        g.len = 0;
        g.bytes = 0;
        g.floor = index;
        g.last = index;
        let _ = self.tx.send(HubMessage::Reset);
    }

    pub fn floor(&self) -> u64 {
        self.inner.lock().unwrap().floor
    }

    /// Record changes applied up to `last` (in order).
    pub fn publish(&self, events: Vec<StoredEvent>, last: u64) {
        let mut g = self.inner.lock().unwrap();
        let g = &mut *g;
        g.last = g.last.max(last);
        let msg = if events.is_empty() {
            HubMessage::Progress(last)
        } else {
            let events = Arc::new(events);
            g.len += events.len();
            g.bytes += events.iter().map(|e| e.size).sum::<usize>();
            g.window.push_back(events.clone());
            HubMessage::Events(events)
        };
        while g.len > self.capacity || g.bytes > self.max_bytes {
            let Some(front) = g.window.front() else { break };
            let e = &front[g.skip];
            g.bytes -= e.size;
            g.floor = e.index;
            g.len -= 1;
            g.skip += 1;
            if g.skip == front.len() {
                g.window.pop_front();
                g.skip = 0;
            }
        }
        let _ = self.tx.send(msg);
    }

    /// Everything after `from`, then live messages; None if `from` left the window.
    pub fn subscribe(&self, from: u64) -> Option<Subscription> {
        let g = self.inner.lock().unwrap();
        if from < g.floor {
            return None;
        }
        let backlog = g
            .window
            .iter()
            .enumerate()
            .flat_map(|(i, batch)| batch[if i == 0 { g.skip } else { 0 }..].iter())
            .filter(|e| e.index > from)
            .cloned()
            .collect();
        Some(Subscription {
            backlog,
            rx: self.tx.subscribe(),
            last: g.last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> StoredEvent {
        StoredEvent {
            index: i,
            key: format!("configmaps/d/c{i}"),
            event_type: EventType::Added,
            object: Value::Null.into(),
            previous: None,
            size: 100,
        }
    }

    #[test]
    fn resume_inside_window_and_expire_outside() {
        let hub = Hub::new(3, usize::MAX);
        hub.reset(10);
        hub.publish(vec![ev(11), ev(12)], 12);
        let s = hub.subscribe(11).unwrap();
        assert_eq!(
            s.backlog.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![12]
        );
        hub.publish(vec![ev(13), ev(14)], 14);
        assert!(
            hub.subscribe(10).is_none(),
            "11 evicted: 10 is out of the window"
        );
        assert_eq!(hub.subscribe(11).unwrap().backlog.len(), 3);
        assert!(hub.subscribe(9).is_none());
    }

    #[test]
    fn the_window_is_bounded_by_bytes_too() {
        let hub = Hub::new(1000, 250);
        hub.reset(0);
        hub.publish(vec![ev(1), ev(2)], 2);
        assert!(hub.subscribe(0).is_some());
        hub.publish(vec![ev(3)], 3);
        assert!(
            hub.subscribe(0).is_none(),
            "300 bytes > 250: the oldest change left"
        );
        assert_eq!(hub.floor(), 1);
        assert_eq!(hub.subscribe(1).unwrap().backlog.len(), 2);
    }

    /// Batches leave the window one event at a time, whatever batches they
    /// came in.
    #[test]
    fn eviction_crosses_batches_event_by_event() {
        let hub = Hub::new(4, usize::MAX);
        hub.reset(0);
        hub.publish(vec![ev(1), ev(2), ev(3)], 3);
        hub.publish(vec![], 3);
        hub.publish(vec![ev(4), ev(5)], 5);
        assert_eq!(hub.floor(), 1);
        let idx = |s: Subscription| s.backlog.iter().map(|e| e.index).collect::<Vec<_>>();
        assert_eq!(idx(hub.subscribe(1).unwrap()), vec![2, 3, 4, 5]);
        hub.publish(vec![ev(6), ev(7), ev(8)], 8);
        assert_eq!(hub.floor(), 4);
        assert_eq!(idx(hub.subscribe(4).unwrap()), vec![5, 6, 7, 8]);
        assert_eq!(idx(hub.subscribe(6).unwrap()), vec![7, 8]);
        assert!(hub.subscribe(3).is_none());
        hub.reset(20);
        assert!(hub.subscribe(20).unwrap().backlog.is_empty());
        hub.publish(vec![ev(21)], 21);
        assert_eq!(idx(hub.subscribe(20).unwrap()), vec![21]);
    }

    #[test]
    fn live_messages_follow_backlog() {
        let hub = Hub::new(10, usize::MAX);
        hub.reset(0);
        let mut s = hub.subscribe(0).unwrap();
        hub.publish(vec![ev(1)], 1);
        match s.rx.try_recv().unwrap() {
            HubMessage::Events(e) => assert_eq!(e[0].index, 1),
            other => panic!("{other:?}"),
        }
        hub.reset(5);
        assert!(matches!(s.rx.try_recv().unwrap(), HubMessage::Reset));
    }
}
