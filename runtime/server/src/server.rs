//! The listener: HTTP/1.1 connections under a cap and timeouts, dispatch by path, graceful
//! shutdown that ends with every guest gone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::error_code::ErrorCode;
use crate::http_util::{Body, error, full, with_retry_after};
use crate::metrics::HandlerInstances;
use crate::tenant::{Caller, identify, is_local_request};
use crate::{admin, invoke};

/// Largest request head (request line + headers); a larger one is answered 431.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// How long guests get to stop once they are told to at the end of a shutdown.
const KILL_GRACE: Duration = Duration::from_secs(5);

async fn dispatch(app: Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    if app.is_draining() {
        let resp = error(ErrorCode::ShuttingDown, "server is shutting down");
        return with_retry_after(resp, 1);
    }
    let path = req.uri().path();
    if path == "/healthz" {
        return Response::new(full("ok\n"));
    }
    let local = || is_local_request(peer.ip(), req.headers());
    if path == "/metrics" {
        // Metrics name every deployment: they are the operator's.
        if identify(req.headers(), app.config.admin_token.as_deref(), &app.tenants, local()) != Caller::Admin {
            return error(ErrorCode::Unauthorized, "/metrics requires the admin token");
        }
        let instances = HandlerInstances { live: app.runtime.live_instances(), warm: app.runtime.warm_instances() };
        let text = app.metrics.render(&app.registry, app.list().len(), instances);
        let mut resp = Response::new(full(text));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return resp;
    }
    if path == "/admin" || path.starts_with("/admin/") {
        let local = local();
        return admin::handle(&app, req, local).await;
    }
    invoke::handle(&app, req).await
}

/// Serves until `shutdown` resolves, then drains: new requests get 503, in-flight ones get until
/// the drain deadline; guests still running then are stopped before this returns.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let connections = Arc::new(Semaphore::new(app.config.max_connections.max(1)));
    let mut backoff = Duration::from_millis(10);
    loop {
        // At the connection cap, stop accepting: the kernel's backlog holds the next ones.
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait for descriptors to free instead of spinning.
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        backoff = Duration::from_millis(10);
        // Small responses go out at once instead of waiting on the client's delayed ACK (40 ms).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let header_read_timeout = app.config.header_read_timeout;
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(dispatch(app, peer, req).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_header_size(MAX_HEADER_BYTES)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    tracing::info!("shutting down: draining in-flight requests");
    app.start_draining();
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(app.config.drain_timeout) => tracing::warn!("drain timeout; closing remaining connections"),
    }
    let live = app.runtime.live_instances();
    if live > 0 {
        tracing::warn!(live, "stopping the guests still running");
        app.runtime.kill_all();
        let deadline = tokio::time::Instant::now() + KILL_GRACE;
        while app.runtime.live_instances() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}
