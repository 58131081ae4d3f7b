//! The OpenAI-compatible API, shared by everything that takes OpenAI-style requests (the server,
//! batch jobs): request bodies parsed and checked against the model ([`request`]), chat templates
//! ([`chat`]), stop sequences over streamed text ([`stop`]) and the response bodies
//! ([`response`]), and one choice's text as its events arrive ([`choice`]). Nothing here does I/O beyond loading a model's template and generation
//! defaults; the caller runs the prepared requests on the [`crate::engine::Engine`].

pub mod chat;
pub mod choice;
pub mod request;
pub mod response;
pub mod stop;

use serde_json::{json, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its HTTP
/// status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`...
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(
        status: u16,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError { status, kind, message: message.into(), param: None, code }
    }

    /// A 400 about the request (`param` names the field).
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_owned),
            code: None,
        }
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404 for a model this server does not serve (`served`).
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            format!("the model `{asked}` does not exist; this server serves `{served}`"),
        )
        .with_param("model")
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", None, message)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}
