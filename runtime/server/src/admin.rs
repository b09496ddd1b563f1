//! The admin API: deployments, models and tenants. The operator (admin token, or a local request
//! when no token is configured) manages everything; a tenant's API key manages its own
//! deployments and sees the models granted to it, nothing else.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyDataStream, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::{Deserialize, Serialize};

use crate::app::{App, DeployError, ModelError};
use crate::body::{declared_over, read_limited, too_large};
use crate::error_code::ErrorCode;
use crate::http_util::{Body, BoxError, empty, error, json};
use crate::tenant::{Caller, Grants, TenantError, identify};

const DEPLOY_USAGE: &str =
    "expected multipart/form-data with a 'manifest' part (kindling.toml) and a 'component' part (the .wasm)";

/// Largest manifest part accepted.
const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// How long a deploy upload may take (at least 2 MiB/s for the largest one).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);

fn forbidden() -> Response<Body> {
    error(ErrorCode::Forbidden, "this endpoint requires the admin token")
}

fn not_found(what: &str, name: &str) -> Response<Body> {
    error(ErrorCode::NotFound, format!("no {what} named {name}"))
}

fn storage_error(e: impl std::fmt::Display) -> Response<Body> {
    error(ErrorCode::Storage, e.to_string())
}

/// `local`: the request comes from this machine and no other site (see `is_local_request`).
pub async fn handle(app: &Arc<App>, req: Request<Incoming>, local: bool) -> Response<Body> {
    let caller = identify(req.headers(), app.config.admin_token.as_deref(), &app.tenants, local);
    if matches!(caller, Caller::Anonymous | Caller::Invalid) {
        let message = if app.config.admin_token.is_some() {
            "admin API requires 'Authorization: Bearer <admin token or tenant API key>'"
        } else {
            "without --admin-token the admin API accepts only local requests (loopback, Host localhost) or tenant API keys"
        };
        return error(ErrorCode::Unauthorized, message);
    }
    let admin = caller == Caller::Admin;
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(2).collect(); // after "/admin"
    // A deployment the caller may not manage answers exactly like one that does not exist.
    let visible = |name: &str| app.get(name).filter(|d| caller.can_manage(d.record.tenant.as_deref()));
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["deployments"]) => {
            let list: Vec<_> = app
                .list()
                .iter()
                .filter(|d| caller.can_manage(d.record.tenant.as_deref()))
                .map(|d| d.summary())
                .collect();
            json(StatusCode::OK, &list)
        }
        (Method::POST, ["deployments"]) => deploy(app, &caller, req).await,
        (Method::GET, ["deployments", name]) => match visible(name) {
            Some(d) => json(StatusCode::OK, &d.summary()),
            None => not_found("deployment", name),
        },
        (Method::DELETE, ["deployments", name]) => match app.delete(&caller, name).await {
            Ok(()) => empty(StatusCode::NO_CONTENT),
            Err(DeployError::NotFound(_)) => not_found("deployment", name),
            Err(e) => storage_error(e),
        },
        (Method::GET, ["models"]) if !admin => json(StatusCode::OK, &granted_models(app, &caller)),
        (Method::GET, ["models"]) => json(StatusCode::OK, &app.registry.list()),
        (_, ["models", ..] | ["tenants", ..]) if !admin => forbidden(),
        (Method::POST, ["models"]) => add_model(app, req).await,
        (Method::DELETE, ["models", name]) => match app.remove_model(name).await {
            Ok(true) => empty(StatusCode::NO_CONTENT),
            Ok(false) => not_found("model", name),
            Err(e) => storage_error(e),
        },
        (Method::POST, ["models", name, "preload"]) => preload(app, name),
        (Method::POST, ["models", name, "unload"]) => {
            let unloaded = app.registry.unload(name);
            json(StatusCode::OK, &serde_json::json!({ "model": name, "unloaded": unloaded }))
        }
        (Method::POST, ["models", name, "sleep"]) => {
            let asleep = app.registry.sleep(name);
            json(StatusCode::OK, &serde_json::json!({ "model": name, "asleep": asleep }))
        }
        (Method::GET, ["tenants"]) => json(StatusCode::OK, &app.tenants.list()),
        (Method::POST, ["tenants"]) => create_tenant(app, req).await,
        (Method::GET, ["tenants", name]) => match app.tenants.get(name) {
            Some(t) => json(StatusCode::OK, &t),
            None => not_found("tenant", name),
        },
        (Method::PATCH, ["tenants", name]) => update_tenant(app, name, req).await,
        (Method::DELETE, ["tenants", name]) => match app.delete_tenant(name).await {
            Ok(true) => empty(StatusCode::NO_CONTENT),
            Ok(false) => not_found("tenant", name),
            Err(e) => storage_error(e),
        },
        _ => error(ErrorCode::NotFound, format!("no admin endpoint {} {path}", req.method())),
    }
}

/// What a tenant may know of the models: the names granted to it that are registered. Paths,
/// sizes and residency are the operator's business.
fn granted_models(app: &App, caller: &Caller) -> Vec<serde_json::Value> {
    let Caller::Tenant(tenant) = caller else { return Vec::new() };
    let granted = app.tenants.granted_models(tenant).unwrap_or_default();
    granted.iter().filter(|m| app.registry.contains(m)).map(|m| serde_json::json!({ "name": m })).collect()
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

/// A small JSON request body, or the 4xx to answer.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>, shape: &str) -> Result<T, Response<Body>> {
    let (parts, body) = req.into_parts();
    let bytes = read_limited(&parts.headers, body, 64 << 10).await?;
    serde_json::from_slice(&bytes).map_err(|e| error(ErrorCode::BadRequest, format!("expected {shape}: {e}")))
}

fn tenant_error(e: TenantError) -> Response<Body> {
    match e {
        TenantError::Invalid(_) => error(ErrorCode::BadRequest, e.to_string()),
        TenantError::Exists(_) => error(ErrorCode::Exists, e.to_string()),
        TenantError::NotFound(_) => error(ErrorCode::NotFound, e.to_string()),
        TenantError::Storage(_) => storage_error(e),
    }
}

/// Grants name registered models only, so a typo is an error now rather than a refusal later:
/// the answer for the first model that is not registered.
fn ungrantable(app: &App, grants: &Grants) -> Option<Response<Body>> {
    let m = grants.models.iter().find(|m| !app.registry.contains(m))?;
    Some(error(ErrorCode::UnknownModel, format!("no registered model named {m}")))
}

async fn create_tenant(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewTenant {
        name: String,
        #[serde(flatten)]
        grants: Grants,
    }
    let new: NewTenant = match read_json(req, "{\"name\", \"models\": [...], \"max_deployments\"}").await {
        Ok(n) => n,
        Err(resp) => return resp,
    };
    if let Some(resp) = ungrantable(app, &new.grants) {
        return resp;
    }
    #[derive(Serialize)]
    struct Created<'a> {
        name: &'a str,
        api_key: String,
        #[serde(flatten)]
        grants: &'a Grants,
    }
    match app.tenants.create(&new.name, new.grants.clone()).await {
        Ok(api_key) => json(StatusCode::CREATED, &Created { name: &new.name, api_key, grants: &new.grants }),
        Err(e) => tenant_error(e),
    }
}

/// `PATCH /admin/tenants/NAME {"models"?, "max_deployments"?}`: fields given replace the old ones.
async fn update_tenant(app: &Arc<App>, name: &str, req: Request<Incoming>) -> Response<Body> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Update {
        models: Option<std::collections::BTreeSet<String>>,
        #[serde(default, with = "double_option")]
        max_deployments: Option<Option<u32>>,
    }
    let update: Update = match read_json(req, "{\"models\": [...], \"max_deployments\"}").await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let Some(current) = app.tenants.get(name) else { return not_found("tenant", name) };
    let grants = Grants {
        models: update.models.unwrap_or(current.grants.models),
        max_deployments: update.max_deployments.unwrap_or(current.grants.max_deployments),
    };
    if let Some(resp) = ungrantable(app, &grants) {
        return resp;
    }
    match app.tenants.set_grants(name, grants).await {
        Ok(info) => json(StatusCode::OK, &info),
        Err(e) => tenant_error(e),
    }
}

/// `"field": null` (clear) apart from a missing field (keep).
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

async fn deploy(app: &Arc<App>, caller: &Caller, req: Request<Incoming>) -> Response<Body> {
    let boundary = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let Some(boundary) = boundary else {
        return error(ErrorCode::BadRequest, DEPLOY_USAGE);
    };
    let max = app.config.max_deploy_bytes as u64;
    if declared_over(req.headers(), max) {
        return too_large(max);
    }
    let uploads = app.config.data_dir.join("uploads");
    let upload = tokio::time::timeout(UPLOAD_TIMEOUT, read_upload(req.into_body(), boundary, max, uploads)).await;
    let (manifest, component) = match upload {
        Ok(Ok(parts)) => parts,
        Ok(Err(resp)) => return resp,
        Err(_) => {
            let message = format!("deploy upload not received within {} s", UPLOAD_TIMEOUT.as_secs());
            return error(ErrorCode::BodyTimeout, message);
        }
    };
    match app.deploy(caller, &manifest, &component).await {
        Ok((deployment, replaced)) => {
            tracing::info!(deployment = %deployment.manifest.name, replaced, "deployed");
            let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
            json(status, &deployment.summary())
        }
        Err(e) => {
            let code = match &e {
                DeployError::Manifest(_) => ErrorCode::InvalidManifest,
                DeployError::Component(_) => ErrorCode::InvalidComponent,
                DeployError::UnknownModel(_) => ErrorCode::UnknownModel,
                DeployError::OverCeiling(_) => ErrorCode::LimitOverCeiling,
                DeployError::ModelNotGranted(_) => ErrorCode::ModelNotGranted,
                DeployError::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
                DeployError::RouteConflict { .. } => ErrorCode::RouteConflict,
                DeployError::NameTaken(_) => ErrorCode::NameTaken,
                DeployError::NotFound(_) => ErrorCode::NotFound,
                DeployError::Storage(_) => ErrorCode::Storage,
            };
            error(code, e.to_string())
        }
    }
}

/// Reads a deploy's multipart body as it arrives: the manifest into memory (small), the component
/// into a staged file under `dir`, so a large upload never sits in memory while it waits.
async fn read_upload(
    body: Incoming,
    boundary: String,
    max: u64,
    dir: PathBuf,
) -> Result<(String, tempfile::TempPath), Response<Body>> {
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().whole_stream(max).for_field("manifest", MAX_MANIFEST_BYTES));
    let mut multipart = multer::Multipart::with_constraints(BodyDataStream::new(body), boundary, constraints);
    let malformed = |e: multer::Error| match e {
        multer::Error::StreamSizeExceeded { .. } => too_large(max),
        multer::Error::FieldSizeExceeded { .. } => {
            error(ErrorCode::BodyTooLarge, format!("manifest exceeds {MAX_MANIFEST_BYTES} bytes"))
        }
        e => error(ErrorCode::BadRequest, format!("malformed multipart body: {e}")),
    };
    let (mut manifest, mut component) = (None, None);
    while let Some(mut field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("manifest") => {
                let text = field.bytes().await.map_err(malformed)?;
                let text = String::from_utf8(text.to_vec())
                    .map_err(|_| error(ErrorCode::BadRequest, "manifest is not UTF-8"))?;
                manifest = Some(text);
            }
            Some("component") => {
                tokio::fs::create_dir_all(&dir).await.map_err(storage_error)?;
                let staged = tempfile::NamedTempFile::new_in(&dir).map_err(storage_error)?;
                // Written through tokio's file, so a slow disk stalls this upload, not the executor.
                let (file, path) = staged.into_parts();
                let mut file = tokio::fs::File::from_std(file);
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    file.write_all(&chunk).await.map_err(storage_error)?;
                }
                file.flush().await.map_err(storage_error)?;
                component = Some(path);
            }
            _ => {}
        }
    }
    match (manifest, component) {
        (Some(m), Some(c)) => Ok((m, c)),
        _ => Err(error(ErrorCode::BadRequest, DEPLOY_USAGE)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddModel {
    name: String,
    path: PathBuf,
    /// Workers (GPUs) to split the model over by tensor parallelism; 1 (whole) when absent.
    #[serde(default)]
    tensor_parallel: Option<usize>,
}

async fn add_model(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let add: AddModel = match read_json(req, "{\"name\", \"path\", \"tensor_parallel\"?}").await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match app.register_model(&add.name, &add.path, add.tensor_parallel.unwrap_or(1)).await {
        Ok(entry) => json(StatusCode::CREATED, &entry),
        Err(e @ ModelError::Invalid(_)) => error(ErrorCode::InvalidModel, e.to_string()),
        Err(e @ ModelError::Storage(_)) => storage_error(e),
        Err(e @ ModelError::Internal(_)) => error(ErrorCode::Internal, e.to_string()),
    }
}
