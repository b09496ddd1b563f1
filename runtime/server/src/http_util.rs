//! Response helpers shared by the admin API and invocation: one body type, JSON errors.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use crate::error_code::ErrorCode;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("serializable");
    body.push(b'\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `{"error": {"code": ..., "message": ...}}`, the shape every Kindling error has, with the
/// code's status from the one table (`error_code`).
pub fn error(code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    json(code.status(), &serde_json::json!({ "error": { "code": code.as_str(), "message": message.into() } }))
}

pub fn with_retry_after(mut resp: Response<Body>, seconds: u32) -> Response<Body> {
    resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    resp
}

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = status;
    resp
}
