//! Kubernetes-style errors: a reason, an HTTP-like code and a message naming the fault.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    BadRequest,
    NotFound,
    AlreadyExists,
    Conflict,
    Invalid,
    RequestEntityTooLarge,
    Expired,
    Unavailable,
    MethodNotAllowed,
    InternalError,
}

impl Reason {
    pub fn code(self) -> u16 {
        match self {
            Reason::BadRequest => 400,
            Reason::NotFound => 404,
            Reason::MethodNotAllowed => 405,
            Reason::AlreadyExists | Reason::Conflict => 409,
            Reason::Expired => 410,
            Reason::RequestEntityTooLarge => 413,
            Reason::Invalid => 422,
            Reason::InternalError => 500,
            Reason::Unavailable => 503,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason:?}: {message}")]
pub struct ApiError {
    pub reason: Reason,
    pub code: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        ApiError {
            reason,
            code: reason.code(),
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(Reason::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Reason::NotFound, m)
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(Reason::Invalid, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(Reason::Conflict, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(Reason::Unavailable, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(Reason::InternalError, m)
    }
    /// The object in the shape of a Kubernetes `Status`.
    pub fn to_status(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": self.message, "reason": format!("{:?}", self.reason), "code": self.code,
        })
    }
}
