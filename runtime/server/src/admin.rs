//! The admin API: deployments and models. Guarded by the admin token when one is configured.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::app::{App, DeployError};
use crate::body::read_limited;
use crate::http_util::{Body, BoxError, empty, error, json};
use crate::tenant::{Caller, TenantError, identify};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

const DEPLOY_USAGE: &str =
    "expected multipart/form-data with a 'manifest' part (kindling.toml) and a 'component' part (the .wasm)";

fn forbidden() -> Response<Body> {
    error(StatusCode::FORBIDDEN, "forbidden", "this endpoint requires the admin token")
}

fn not_found(what: &str, name: &str) -> Response<Body> {
    error(StatusCode::NOT_FOUND, "not_found", format!("no {what} named {name}"))
}

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let caller = identify(req.headers(), app.config.admin_token.as_deref(), &app.tenants);
    if matches!(caller, Caller::Anonymous | Caller::Invalid) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin API requires 'Authorization: Bearer <admin token or tenant API key>'",
        );
    }
    let admin = caller == Caller::Admin;
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(2).collect(); // after "/admin"
    // A deployment the caller may not see answers exactly like one that does not exist.
    let visible = |name: &str| app.get(name).filter(|d| caller.can_access(d.record.tenant.as_deref()));
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["deployments"]) => {
            let list: Vec<_> = app
                .list()
                .iter()
                .filter(|d| caller.can_access(d.record.tenant.as_deref()))
                .map(|d| d.summary())
                .collect();
            json(StatusCode::OK, &list)
        }
        (Method::POST, ["deployments"]) => deploy(app, &caller, req).await,
        (Method::GET, ["deployments", name]) => match visible(name) {
            Some(d) => json(StatusCode::OK, &d.summary()),
            None => not_found("deployment", name),
        },
        (Method::DELETE, ["deployments", name]) => match visible(name) {
            None => not_found("deployment", name),
            Some(_) => match app.delete(name).await {
                Ok(true) => empty(StatusCode::NO_CONTENT),
                Ok(false) => not_found("deployment", name),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
            },
        },
        (Method::GET, ["models"]) => json(StatusCode::OK, &app.registry.list()),
        (_, ["models", ..] | ["tenants", ..]) if !admin => forbidden(),
        (Method::POST, ["models"]) => add_model(app, req).await,
        (Method::DELETE, ["models", name]) => {
            if app.registry.remove(name) {
                empty(StatusCode::NO_CONTENT)
            } else {
                not_found("model", name)
            }
        }
        (Method::POST, ["models", name, "preload"]) => preload(app, name),
        (Method::POST, ["models", name, "unload"]) => {
            let unloaded = app.registry.unload(name);
            json(StatusCode::OK, &serde_json::json!({ "model": name, "unloaded": unloaded }))
        }
        (Method::GET, ["tenants"]) => json(StatusCode::OK, &app.tenants.names()),
        (Method::POST, ["tenants"]) => create_tenant(app, req).await,
        (Method::DELETE, ["tenants", name]) => match app.tenants.delete(name) {
            Ok(true) => empty(StatusCode::NO_CONTENT),
            Ok(false) => not_found("tenant", name),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", format!("no admin endpoint {} {path}", req.method())),
    }
}

/// Streams admission progress as JSON lines: `{"resident_bytes", "total_bytes"}` while pages come
/// in, then `{"done": true, "already_pooled", "seconds"}` or `{"error"}`.
fn preload(app: &Arc<App>, name: &str) -> Response<Body> {
    if !app.registry.contains(name) {
        return not_found("model", name);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (app, name) = (app.clone(), name.to_string());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let progress_tx = tx.clone();
        let result = app
            .registry
            .preload(&name, move |p| {
                let line = serde_json::json!({ "resident_bytes": p.resident_bytes, "total_bytes": p.total_bytes });
                let _ = progress_tx.send(format!("{line}\n"));
            })
            .await;
        let last = match result {
            Ok(hit) => {
                serde_json::json!({ "done": true, "already_pooled": hit, "seconds": started.elapsed().as_secs_f64() })
            }
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = tx.send(format!("{last}\n"));
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, BoxError>(Frame::data(Bytes::from(line))), rx))
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    resp
}

async fn create_tenant(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    #[derive(Deserialize)]
    struct NewTenant {
        name: String,
    }
    let (parts, body) = req.into_parts();
    let bytes = match read_limited(&parts.headers, body, 4096).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let new: NewTenant = match serde_json::from_slice(&bytes) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", format!("expected {{\"name\"}}: {e}")),
    };
    match app.tenants.create(&new.name) {
        Ok(key) => json(StatusCode::CREATED, &serde_json::json!({ "name": new.name, "api_key": key })),
        Err(e @ TenantError::Invalid(_)) => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        Err(e @ TenantError::Exists(_)) => error(StatusCode::CONFLICT, "exists", e.to_string()),
        Err(e @ TenantError::Storage(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    }
}

async fn deploy(app: &Arc<App>, caller: &Caller, req: Request<Incoming>) -> Response<Body> {
    let boundary = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let Some(boundary) = boundary else {
        return error(StatusCode::BAD_REQUEST, "bad_request", DEPLOY_USAGE);
    };
    let (parts, body) = req.into_parts();
    let bytes = match read_limited(&parts.headers, body, app.config.max_deploy_bytes as u64).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let (manifest, component) = match read_parts(bytes, boundary).await {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "bad_request", msg),
    };
    match app.deploy(caller, &manifest, component).await {
        Ok((deployment, replaced)) => {
            tracing::info!(deployment = %deployment.manifest.name, replaced, "deployed");
            let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
            json(status, &deployment.summary())
        }
        Err(e) => {
            let (status, code) = match &e {
                DeployError::Manifest(_) => (StatusCode::BAD_REQUEST, "invalid_manifest"),
                DeployError::Component(_) => (StatusCode::BAD_REQUEST, "invalid_component"),
                DeployError::UnknownModel(_) => (StatusCode::BAD_REQUEST, "unknown_model"),
                DeployError::RouteConflict { .. } => (StatusCode::CONFLICT, "route_conflict"),
                DeployError::NameTaken(_) => (StatusCode::CONFLICT, "name_taken"),
                DeployError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
            };
            error(status, code, e.to_string())
        }
    }
}

async fn read_parts(bytes: Bytes, boundary: String) -> Result<(String, Vec<u8>), String> {
    let stream = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(bytes) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let (mut manifest, mut component) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(|e| format!("malformed multipart body: {e}"))? {
        match field.name() {
            Some("manifest") => {
                let text = field.bytes().await.map_err(|e| e.to_string())?;
                manifest = Some(String::from_utf8(text.to_vec()).map_err(|_| "manifest is not UTF-8".to_string())?);
            }
            Some("component") => component = Some(field.bytes().await.map_err(|e| e.to_string())?.to_vec()),
            _ => {}
        }
    }
    match (manifest, component) {
        (Some(m), Some(c)) => Ok((m, c)),
        _ => Err(DEPLOY_USAGE.into()),
    }
}

#[derive(Deserialize)]
struct AddModel {
    name: String,
    path: PathBuf,
}

async fn add_model(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = match read_limited(&parts.headers, body, 64 << 10).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let add: AddModel = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, "bad_request", format!("expected {{\"name\", \"path\"}}: {e}"));
        }
    };
    let registry = app.registry.clone();
    let result = tokio::task::spawn_blocking(move || registry.register(&add.name, &add.path)).await;
    match result {
        Ok(Ok(entry)) => json(StatusCode::CREATED, &entry),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, "invalid_model", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}
