//! The listener: HTTP/1.1 connections, dispatch by path, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::app::App;
use crate::http_util::{Body, error, full, with_retry_after};
use crate::{admin, invoke};

/// How long in-flight requests get to finish once shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

async fn dispatch(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    if app.is_draining() {
        let resp = error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "server is shutting down");
        return with_retry_after(resp, 1);
    }
    let path = req.uri().path();
    if path == "/healthz" {
        return Response::new(full("ok\n"));
    }
    if path == "/metrics" {
        let text = app.metrics.render(&app.registry, app.list().len());
        let mut resp = Response::new(full(text));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return resp;
    }
    if path == "/admin" || path.starts_with("/admin/") {
        return admin::handle(&app, req).await;
    }
    invoke::handle(&app, req).await
}

/// Serves until `shutdown` resolves, then drains: new requests get 503, in-flight ones finish.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(dispatch(app, req).await) }
        });
        let conn = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: draining in-flight requests");
    app.start_draining();
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timeout; closing remaining connections"),
    }
    Ok(())
}
