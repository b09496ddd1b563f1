//! Invocation: route a request to its deployment, admit it, run the handler, and report.

use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use kindling_host::{InvokeError, LlmCtx, LlmReport};

use crate::app::{App, Deployment};
use crate::body::{GuardedBody, boxed, read_limited};
use crate::error_code::ErrorCode;
use crate::http_util::{Body, error, with_retry_after};
use crate::tenant::identify;

/// One entry per model this request had to start, e.g.
/// `model=tiny;wait_ms=12;pool=hit;admit_ms=0;h2d_ms=3;init_ms=8;first_token_ms=15`.
/// `first_token_ms` (from the generation request to its first token) is there when the handler
/// generated before it sent its response headers.
fn cold_start_header(report: &LlmReport) -> Option<HeaderValue> {
    if report.cold_starts.is_empty() {
        return None;
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let value = report
        .cold_starts
        .iter()
        .map(|(model, c)| {
            let mut v = format!(
                "model={model};wait_ms={:.1};pool={};admit_ms={:.1};h2d_ms={:.1};init_ms={:.1}",
                ms(c.waited),
                c.load.source(),
                ms(c.load.admit),
                ms(c.load.h2d),
                ms(c.load.init)
            );
            if let Some(t) = report.first_token {
                v.push_str(&format!(";first_token_ms={:.1}", ms(t)));
            }
            v
        })
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::from_str(&value).ok()
}

/// How long a request waits for a free concurrency slot before it is answered 429.
const ADMISSION_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The answer for a path nothing serves, and for a deployment the caller may not call: the two
/// are indistinguishable, so a route reveals nothing about whose it is.
fn no_route(path: &str) -> Response<Body> {
    error(ErrorCode::NoRoute, format!("no deployment serves {path}"))
}

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
    let Some(deployment) = app.resolve(host, &path) else {
        return no_route(&path);
    };
    let owner = deployment.record.tenant.as_deref();
    if owner.is_some() {
        // Tenant keys authenticate; a local request without one is not the operator here.
        let caller = identify(req.headers(), app.config.admin_token.as_deref(), &app.tenants, false);
        if !caller.can_invoke(owner) {
            return no_route(&path);
        }
    }
    let name = deployment.manifest.name.clone();
    let resp = handle_routed(app, deployment, &path, req).await;
    app.metrics.request(&name, resp.status().as_u16(), started.elapsed());
    resp
}

async fn handle_routed(
    app: &Arc<App>,
    deployment: Arc<Deployment>,
    path: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(models) = app.invocation_models(&deployment) else {
        return no_route(path); // its tenant was deleted a moment ago
    };
    // The body first: a client that sends it slowly holds no invocation slot meanwhile.
    let (mut parts, body) = req.into_parts();
    let bytes = match read_limited(&parts.headers, body, deployment.manifest.limits.max_request_bytes).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    // A slot is held until the previous instance is gone, which can be a moment after its client
    // read the last byte: a brief wait keeps a client's back-to-back requests from a 429.
    let slot = tokio::time::timeout(ADMISSION_WAIT, deployment.in_flight.clone().acquire_owned()).await;
    let Ok(Ok(permit)) = slot else {
        let resp = error(
            ErrorCode::TooManyRequests,
            format!(
                "deployment {} is at its limit of {} concurrent invocations",
                deployment.manifest.name, deployment.manifest.limits.max_concurrency
            ),
        );
        return with_retry_after(resp, 1);
    };
    // Held by the instance and by the response body: the slot frees when both are gone.
    let permit = Arc::new(permit);

    // Credentials are the host's business; handlers never see them.
    parts.headers.remove(http::header::AUTHORIZATION);
    if !parts.headers.contains_key(http::header::HOST) {
        parts.headers.insert(http::header::HOST, HeaderValue::from_static("localhost"));
    }
    let request = Request::from_parts(parts, Full::new(bytes));
    let llm = LlmCtx::new(app.backend.clone(), models, deployment.limits.max_tokens, deployment.generations.clone());

    let name = deployment.manifest.name.clone();
    match app.runtime.invoke(&deployment.handler, request, llm, &deployment.limits, permit.clone()).await {
        Ok(invocation) => {
            let (mut parts, body) = invocation.response.into_parts();
            if let Some(v) = cold_start_header(&invocation.report.lock().expect("poisoned")) {
                parts.headers.insert("x-kindling-cold-start", v);
            }
            parts.headers.insert("x-kindling-deployment", HeaderValue::from_str(&name).expect("validated name"));
            let t = invocation.timing;
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            let mut timing = format!("instantiate;dur={:.3}, handler;dur={:.3}", ms(t.instantiate), ms(t.handler));
            if t.warm {
                timing.push_str(", warm"); // its instance was made ahead of the request
            }
            parts.headers.insert("server-timing", HeaderValue::from_str(&timing).expect("ascii"));
            let report = invocation.report.clone();
            let app = app.clone();
            let guest = invocation.guest;
            let on_end = Box::new(move || {
                drop(guest); // the body is over or its client is gone: so is the guest
                let r = report.lock().expect("poisoned");
                app.metrics.invocation(&name, &r);
                tracing::info!(
                    deployment = %name,
                    generations = r.generations,
                    prompt_tokens = r.prompt_tokens,
                    completion_tokens = r.completion_tokens,
                    "invocation finished"
                );
            });
            let limit = deployment.manifest.limits.max_response_bytes;
            Response::from_parts(parts, boxed(GuardedBody::new(body, limit, permit, on_end)))
        }
        Err(e) => invoke_error(&deployment.manifest.name, e),
    }
}

fn invoke_error(deployment: &str, e: InvokeError) -> Response<Body> {
    let message = format!("deployment {deployment}: {e}");
    match e {
        InvokeError::Timeout(_) => error(ErrorCode::HandlerTimeout, message),
        InvokeError::Capacity(_) => with_retry_after(error(ErrorCode::NoCapacity, message), 1),
        InvokeError::Trap(_) => error(ErrorCode::HandlerTrapped, message),
        InvokeError::Host(_) => error(ErrorCode::Internal, message),
        InvokeError::Killed => with_retry_after(error(ErrorCode::ShuttingDown, message), 1),
        InvokeError::NoResponse | InvokeError::ErrorResponse(_) => error(ErrorCode::HandlerNoResponse, message),
    }
}
