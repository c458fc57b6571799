//! The controllers' door into the API: a request/answer call and a watch. On the
//! leader it is the master itself (no network); elsewhere (simulated nodes,
//! tests) it is an `orc_client::Client`.
use orc_api::request::{Request, WatchEvent, WatchRequest};
use orc_api::{ApiError, EventType, Reason};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub trait Api: Send + Sync + 'static {
    fn call(&self, req: Request) -> BoxFuture<Result<Value, ApiError>>;
    /// Watch events; a failure arrives as a final `ERROR` event carrying a Status.
    fn watch(&self, req: WatchRequest) -> BoxFuture<mpsc::Receiver<WatchEvent>>;
}

fn client_error(e: orc_client::ClientError) -> ApiError {
    match e {
        orc_client::ClientError::Api(e) => e,
        other => ApiError::unavailable(other.to_string()),
    }
}

/// A client shared by many tasks.
pub struct ClientApi(pub Arc<orc_client::Client>);

impl Api for ClientApi {
    fn call(&self, req: Request) -> BoxFuture<Result<Value, ApiError>> {
        let c = self.0.clone();
        Box::pin(async move { c.call(&req).await.map_err(client_error) })
    }
    fn watch(&self, req: WatchRequest) -> BoxFuture<mpsc::Receiver<WatchEvent>> {
        let c = self.0.clone();
        Box::pin(async move {
            let mut rx = c.watch(req).await;
            let (tx, out) = mpsc::channel(1024);
            tokio::spawn(async move {
                while let Some(item) = rx.recv().await {
                    let ev = match item {
                        Ok(ev) => ev,
                        Err(e) => WatchEvent {
                            event_type: EventType::Error,
                            object: client_error(e).to_status().into(),
                        },
                    };
                    let last = ev.event_type == EventType::Error;
                    if tx.send(ev).await.is_err() || last {
                        return;
                    }
                }
            });
            out
        })
    }
}

/// The error carried by an `ERROR` watch event.
pub fn watch_error(ev: &WatchEvent) -> ApiError {
    let reason = if ev.object["reason"] == "Expired" {
        Reason::Expired
    } else {
        Reason::InternalError
    };
    ApiError::new(
        reason,
        ev.object["message"]
            .as_str()
            .unwrap_or("watch error")
            .to_string(),
    )
}
