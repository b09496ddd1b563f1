//! The cluster's shared state: tenants, deployment records and registered models in PostgreSQL,
//! component bytes in S3-compatible storage (`s3`). Every node reads and writes the same tables.
//!
//! - A deploy is one transaction under a cluster-wide advisory lock: the checks see every node's
//!   deployments as they are, the component is stored before the record, and the record (with its
//!   `NOTIFY`) is committed last, so every node sees the whole deploy or none of it.
//! - Nodes follow each other through `LISTEN kindling_state` (each change notifies at commit); a
//!   dropped listening connection reconnects and asks for a full resync, since notifications sent
//!   meanwhile are lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Mutex, watch};
use tokio_postgres::{AsyncMessage, Client};

use super::s3::ComponentBlobs;
use super::{DeleteCheck, DeployCheck, DeploymentRecord, ModelRecord, StateStore, readable, storage};
use crate::app::DeployError;
use crate::tenant::TenantRecord;

const CHANNEL: &str = "kindling_state";
/// The advisory lock deploys, deletes and component collection take (any fixed number).
const DEPLOY_LOCK: i64 = 0x6b696e646c;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kindling_deployments (name text PRIMARY KEY, record text NOT NULL);
CREATE TABLE IF NOT EXISTS kindling_tenants (name text PRIMARY KEY, record text NOT NULL);
CREATE TABLE IF NOT EXISTS kindling_models (name text PRIMARY KEY, path text NOT NULL);
ALTER TABLE kindling_models ADD COLUMN IF NOT EXISTS ranks integer NOT NULL DEFAULT 1;
";

fn db(e: tokio_postgres::Error) -> io::Error {
    // The cause (a refused certificate, a reset connection) is in the source chain.
    let mut message = format!("postgres: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    io::Error::other(message)
}

/// TLS for the database connections: used as the URL's `sslmode` says (`prefer` by default, so a
/// server without TLS still connects; `require` insists). Server certificates are checked against
/// the public web roots plus, for a private CA, the PEM file `PGSSLROOTCERT` names.
fn tls() -> io::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Ok(path) = std::env::var("PGSSLROOTCERT") {
        let bad = |e: &dyn std::fmt::Display| io::Error::other(format!("PGSSLROOTCERT {path}: {e}"));
        for cert in CertificateDer::pem_file_iter(&path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

pub struct PostgresStore {
    url: String,
    /// One connection for this node's reads and writes; reopened when it drops.
    client: Mutex<Option<Client>>,
    blobs: ComponentBlobs,
    changes: watch::Receiver<u64>,
}

impl PostgresStore {
    pub async fn connect(url: &str, blobs: ComponentBlobs) -> anyhow::Result<Self> {
        let (tx, changes) = watch::channel(0);
        let store = Self { url: url.to_string(), client: Mutex::new(None), blobs, changes };
        {
            let mut guard = store.client().await?;
            let txn = guard.as_mut().expect("connected").transaction().await.map_err(db)?;
            // Nodes starting together would race on CREATE TABLE's catalog rows.
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&DEPLOY_LOCK]).await.map_err(db)?;
            txn.batch_execute(SCHEMA).await.map_err(db)?;
            txn.commit().await.map_err(db)?;
        }
        // Subscribe before the caller's first load, so no change falls between the two.
        let listening = listen(url).await?;
        tokio::spawn(follow(url.to_string(), listening, tx));
        Ok(store)
    }

    async fn client(&self) -> io::Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = tokio_postgres::connect(&self.url, tls()?).await.map_err(db)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "postgres connection closed");
                }
            });
            *guard = Some(client);
        }
        Ok(guard)
    }

    async fn notify(txn: &tokio_postgres::Transaction<'_>, what: &str) -> io::Result<()> {
        txn.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &what]).await.map_err(db).map(drop)
    }

    async fn records(
        client: &impl tokio_postgres::GenericClient,
    ) -> io::Result<Vec<(String, io::Result<DeploymentRecord>)>> {
        let rows =
            client.query("SELECT name, record FROM kindling_deployments ORDER BY name", &[]).await.map_err(db)?;
        Ok(rows
            .iter()
            .map(|row| {
                let text: String = row.get(1);
                (row.get(0), serde_json::from_str::<DeploymentRecord>(&text).map_err(io::Error::other))
            })
            .collect())
    }

    /// Deletes stored components no record refers to, under the deploy lock so a deploy between
    /// storing its component and committing its record cannot lose it. Logged, never fatal.
    async fn collect_garbage(&self) {
        let result = async {
            let mut guard = self.client().await?;
            let txn = guard.as_mut().expect("connected").transaction().await.map_err(db)?;
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&DEPLOY_LOCK]).await.map_err(db)?;
            if let Some(live) = super::file::live_components(Self::records(&txn).await?) {
                self.blobs.retain(live).await?;
            }
            txn.commit().await.map_err(db)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not collect unreferenced components");
        }
    }

    async fn change(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
    ) -> io::Result<u64> {
        let mut guard = self.client().await?;
        let txn = guard.as_mut().expect("connected").transaction().await.map_err(db)?;
        let rows = txn.execute(sql, params).await.map_err(db)?;
        if rows > 0 {
            Self::notify(&txn, what).await?;
        }
        txn.commit().await.map_err(db)?;
        Ok(rows)
    }
}

async fn listen(url: &str) -> io::Result<(Client, tokio::sync::mpsc::UnboundedReceiver<()>)> {
    let (client, mut connection) = tokio_postgres::connect(url, tls()?).await.map_err(db)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => return tracing::warn!(error = %e, "postgres listening connection closed"),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(db)?;
    Ok((client, rx))
}

/// Ticks `changes` on every notification, and after every reconnect (notifications sent while
/// disconnected are lost, so the node resyncs everything).
async fn follow(
    url: String,
    mut listening: (Client, tokio::sync::mpsc::UnboundedReceiver<()>),
    changes: watch::Sender<u64>,
) {
    loop {
        while listening.1.recv().await.is_some() {
            changes.send_modify(|n| *n += 1);
        }
        if changes.is_closed() {
            return;
        }
        let mut backoff = Duration::from_millis(200);
        listening = loop {
            tokio::time::sleep(backoff).await;
            match listen(&url).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = %e, "reconnecting to postgres to follow changes");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        changes.send_modify(|n| *n += 1);
    }
}

#[async_trait::async_trait]
impl StateStore for PostgresStore {
    fn describe(&self) -> String {
        let server = self.url.rsplit_once('@').map_or(self.url.as_str(), |(_, s)| s);
        format!("postgres {server}, components in {}", self.blobs.describe())
    }

    async fn load_deployments(&self) -> io::Result<Vec<(String, io::Result<DeploymentRecord>)>> {
        let guard = self.client().await?;
        Self::records(guard.as_ref().expect("connected")).await
    }

    async fn read_component(&self, sha256: &str) -> io::Result<Vec<u8>> {
        self.blobs.get(sha256).await
    }

    async fn put_deployment(
        &self,
        name: &str,
        wasm: Arc<Vec<u8>>,
        check: DeployCheck,
    ) -> Result<DeploymentRecord, DeployError> {
        let record = {
            let mut guard = self.client().await.map_err(storage)?;
            let txn = guard.as_mut().expect("connected").transaction().await.map_err(db).map_err(storage)?;
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&DEPLOY_LOCK]).await.map_err(db).map_err(storage)?;
            let current = readable(Self::records(&txn).await.map_err(storage)?);
            // A refusal drops the transaction: nothing is written.
            let record = check(&current)?;
            self.blobs.put(&record.component_sha256, wasm).await.map_err(storage)?;
            let json = serde_json::to_string(&record).map_err(|e| DeployError::Storage(e.to_string()))?;
            txn.execute(
                "INSERT INTO kindling_deployments (name, record) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET record = excluded.record",
                &[&name, &json],
            )
            .await
            .map_err(db)
            .map_err(storage)?;
            Self::notify(&txn, "deployments").await.map_err(storage)?;
            txn.commit().await.map_err(db).map_err(storage)?;
            record
        };
        self.collect_garbage().await;
        Ok(record)
    }

    async fn delete_deployment(&self, name: &str, may_delete: DeleteCheck) -> io::Result<bool> {
        let deleted = {
            let mut guard = self.client().await?;
            let txn = guard.as_mut().expect("connected").transaction().await.map_err(db)?;
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&DEPLOY_LOCK]).await.map_err(db)?;
            let row =
                txn.query_opt("SELECT record FROM kindling_deployments WHERE name = $1", &[&name]).await.map_err(db)?;
            let Some(row) = row else { return Ok(false) };
            let record: DeploymentRecord = serde_json::from_str(row.get(0)).map_err(io::Error::other)?;
            if !may_delete(&record) {
                return Ok(false);
            }
            txn.execute("DELETE FROM kindling_deployments WHERE name = $1", &[&name]).await.map_err(db)?;
            Self::notify(&txn, "deployments").await?;
            txn.commit().await.map_err(db)?;
            true
        };
        self.collect_garbage().await;
        Ok(deleted)
    }

    async fn load_tenants(&self) -> io::Result<BTreeMap<String, TenantRecord>> {
        let guard = self.client().await?;
        let rows = guard
            .as_ref()
            .expect("connected")
            .query("SELECT name, record FROM kindling_tenants", &[])
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let text: String = row.get(1);
                Ok((row.get(0), serde_json::from_str(&text).map_err(io::Error::other)?))
            })
            .collect()
    }

    async fn insert_tenant(&self, name: &str, record: &TenantRecord) -> io::Result<bool> {
        let json = serde_json::to_string(record).map_err(io::Error::other)?;
        let sql = "INSERT INTO kindling_tenants (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
        Ok(self.change(sql, &[&name, &json], "tenants").await? == 1)
    }

    async fn update_tenant(&self, name: &str, record: &TenantRecord) -> io::Result<bool> {
        let json = serde_json::to_string(record).map_err(io::Error::other)?;
        Ok(self.change("UPDATE kindling_tenants SET record = $2 WHERE name = $1", &[&name, &json], "tenants").await?
            == 1)
    }

    async fn delete_tenant(&self, name: &str) -> io::Result<bool> {
        Ok(self.change("DELETE FROM kindling_tenants WHERE name = $1", &[&name], "tenants").await? == 1)
    }

    async fn load_models(&self) -> io::Result<BTreeMap<String, ModelRecord>> {
        let guard = self.client().await?;
        let rows = guard
            .as_ref()
            .expect("connected")
            .query("SELECT name, path, ranks FROM kindling_models", &[])
            .await
            .map_err(db)?;
        let record = |row: &tokio_postgres::Row| ModelRecord {
            path: PathBuf::from(row.get::<_, String>(1)),
            ranks: row.get::<_, i32>(2).max(1) as usize,
        };
        Ok(rows.iter().map(|row| (row.get::<_, String>(0), record(row))).collect())
    }

    async fn put_model(&self, name: &str, record: &ModelRecord) -> io::Result<()> {
        let path =
            record.path.to_str().ok_or_else(|| io::Error::other("model paths must be UTF-8 in a shared store"))?;
        let ranks = i32::try_from(record.ranks).map_err(io::Error::other)?;
        let sql = "INSERT INTO kindling_models (name, path, ranks) VALUES ($1, $2, $3) \
                   ON CONFLICT (name) DO UPDATE SET path = excluded.path, ranks = excluded.ranks";
        self.change(sql, &[&name, &path, &ranks], "models").await.map(drop)
    }

    async fn remove_model(&self, name: &str) -> io::Result<bool> {
        Ok(self.change("DELETE FROM kindling_models WHERE name = $1", &[&name], "models").await? == 1)
    }

    fn prune_local_cache(&self, live: &BTreeSet<String>) {
        if let Err(e) = self.blobs.retain_cached(live) {
            tracing::warn!(error = %e, "could not prune the component cache");
        }
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}
