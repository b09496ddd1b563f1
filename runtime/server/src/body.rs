//! Request bodies read under a cap and a deadline, and response bodies that enforce a cap and
//! hold the deployment's concurrency slot until the last byte has gone out.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use crate::error_code::ErrorCode;
use crate::http_util::{Body, BoxError, error};

/// How long a client has to send a whole request body: a slow sender cannot hold a connection, a
/// buffer and (for deploys) a compile slot for ever.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a request body of at most `max` bytes within `BODY_READ_TIMEOUT`; a larger one gets a
/// 413 and a slower one a 408, which the caller returns as is.
pub async fn read_limited(headers: &http::HeaderMap, body: Incoming, max: u64) -> Result<Bytes, http::Response<Body>> {
    match tokio::time::timeout(BODY_READ_TIMEOUT, read_capped(headers, body, max)).await {
        Ok(read) => read,
        Err(_) => Err(error(
            ErrorCode::BodyTimeout,
            format!("request body not received within {} s", BODY_READ_TIMEOUT.as_secs()),
        )),
    }
}

/// The 413 for a request body over `max` bytes.
pub fn too_large(max: u64) -> http::Response<Body> {
    error(ErrorCode::BodyTooLarge, format!("request body exceeds the limit of {max} bytes"))
}

/// Whether the request's `Content-Length` already says its body is over `max` bytes.
pub fn declared_over(headers: &http::HeaderMap, max: u64) -> bool {
    let declared =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    declared.is_some_and(|n| n > max)
}

async fn read_capped(headers: &http::HeaderMap, body: Incoming, max: u64) -> Result<Bytes, http::Response<Body>> {
    if declared_over(headers, max) {
        return Err(too_large(max));
    }
    match Limited::new(body, max as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large(max)),
        Err(e) => Err(error(ErrorCode::BadRequest, format!("could not read request body: {e}"))),
    }
}

/// Wraps a handler's response body: caps its size and holds the concurrency permit.
pub struct GuardedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    permit: Option<Arc<OwnedSemaphorePermit>>,
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

impl<B> GuardedBody<B> {
    pub fn new(inner: B, limit: u64, permit: Arc<OwnedSemaphorePermit>, on_end: Box<dyn FnOnce() + Send>) -> Self {
        Self { inner, remaining: limit, limit, permit: Some(permit), on_end: Some(on_end) }
    }

    fn finish(&mut self) {
        self.permit.take();
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

impl<B> Drop for GuardedBody<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> HttpBody for GuardedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.finish();
                        let msg = format!("response body exceeds the deployment's limit of {} bytes", this.limit);
                        tracing::warn!("{msg}");
                        return Poll::Ready(Some(Err(msg.into())));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Send + 'static,
{
    body.boxed_unsync()
}
