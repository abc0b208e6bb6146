//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
//! each kind of failure gets, and the metric label it is counted under.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use zimage::ErrorKind;

/// One failed request, as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error` ...
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, param: None, message: message.into(), retry_after: None }
    }

    /// 400: the request cannot be served as sent.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
        )
    }

    pub fn unknown_model(name: &str, served: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("the model '{name}' does not exist here; this server has: {}", served.join(", ")),
        )
        .with_param("model")
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), what)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Some("method_not_allowed"),
            "method not allowed",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("the request body is larger than this server's limit of {limit} bytes"),
        )
    }

    pub fn queue_full(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("queue_full"),
            "the generation queue is full; retry later",
        );
        e.retry_after = Some(retry_after);
        e
    }

    /// Every slot for reading and decoding uploaded pictures is taken (`--workers` +
    /// `--max-queue` per model): refused at once rather than decoding without bound. The same
    /// code as a full queue: both say the server holds all the work it takes.
    pub fn decoders_busy(slots: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("queue_full"),
            format!("all {slots} slots for decoding uploaded pictures are taken; retry later"),
        );
        e.retry_after = Some(1);
        e
    }

    pub fn loading() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("model_loading"),
            "the models are still loading",
        );
        e.retry_after = Some(2);
        e
    }

    pub fn draining() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("shutting_down"),
            "the server is shutting down and takes no new work",
        )
    }

    pub fn timeout(seconds: u64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            Some("timeout"),
            format!("the generation did not finish within the server's {seconds} s limit and was cancelled"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("internal_error"), message)
    }

    /// The client went away (never sent: there is no one to send it to; logged and counted).
    pub fn cancelled() -> Self {
        // 499 is nginx's "client closed request"; it only appears in logs and metrics.
        Self::new(StatusCode::from_u16(499).expect("valid"), "cancelled", Some("cancelled"), "cancelled")
    }

    /// The client went away, or stopped reading its stream, for `why` (logged and counted as
    /// [`ApiError::cancelled`]).
    pub fn client_gone(why: &str) -> Self {
        let mut e = Self::cancelled();
        e.message = why.to_string();
        e
    }

    /// An SDK error: every invalid request and unusable image is a 400, inference a 500.
    pub fn from_sdk(e: &zimage::Error) -> Self {
        let message = one_line(&e.to_string());
        match e.kind() {
            ErrorKind::InvalidRequest => Self::invalid(message),
            ErrorKind::Image => Self::invalid(message).with_code("invalid_image"),
            ErrorKind::Cancelled => Self::cancelled(),
            // ONNX Runtime's own words for it; its message names its source files and arena,
            // which tell the client nothing: a short 503 instead (the log keeps the detail).
            ErrorKind::Inference if OUT_OF_MEMORY.iter().any(|m| message.contains(m)) => {
                tracing::error!("out of memory: {message}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("out_of_memory"),
                    "the server ran out of memory for this generation; ask for a smaller size or fewer images",
                )
            }
            ErrorKind::Inference => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("inference_failed"), message)
            }
            _ => Self::internal(message),
        }
    }

    /// The label this error is counted under in `/metrics`.
    pub fn metric_kind(&self) -> &'static str {
        match (self.status.as_u16(), self.code) {
            (_, Some("queue_full")) => "queue_full",
            (_, Some("timeout")) => "timeout",
            (_, Some("cancelled")) => "cancelled",
            (_, Some("inference_failed")) => "inference",
            (_, Some("invalid_image")) => "invalid_image",
            (_, Some("out_of_memory")) => "out_of_memory",
            (400, _) => "invalid_request",
            (401, _) => "unauthorized",
            (404, _) => "not_found",
            (405, _) => "method_not_allowed",
            (413, _) => "too_large",
            (503, _) => "unavailable",
            _ => "internal",
        }
    }

    /// The JSON body (also the `error` event of a stream).
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(self);
        response
    }
}

/// How ONNX Runtime reports an allocation that failed (its CPU arena, std::bad_alloc, CUDA).
const OUT_OF_MEMORY: [&str; 4] = ["bad_alloc", "BFCArena", "Failed to allocate memory", "out of memory"];

/// SDK messages can span lines; an API error is one line.
pub fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inference(message: &str) -> zimage::Error {
        zimage::Error::Inference { stage: "transformer", message: message.to_string(), source: None }
    }

    #[test]
    fn allocation_failures_are_a_short_503() {
        // What ONNX Runtime said for an 8192x8192 generation on the tiny package.
        let arena = "Non-zero status code returned while running Expand node. Name:'Expand_308' Status Message: \
                     /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* \
                     onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to \
                     allocate memory for requested buffer of size 68736254976";
        for message in [arena, "std::bad_alloc"] {
            let e = ApiError::from_sdk(&inference(message));
            assert_eq!((e.status.as_u16(), e.code, e.metric_kind()), (503, Some("out_of_memory"), "out_of_memory"));
            assert!(!e.message.contains("onnxruntime"), "{}", e.message);
        }
        let e = ApiError::from_sdk(&inference("non-finite latents"));
        assert_eq!((e.status.as_u16(), e.code), (500, Some("inference_failed")));
    }
}
