//! The single-node store: everything under the data dir.
//!
//! Layout: `components/<sha256>.wasm` (content-addressed, shared by redeploys of the same bytes),
//! `deployments/<name>.json` (the manifest and the component's hash), `tenants.json` and
//! `models.json`. Every file is written to a temporary name, fsynced and renamed, and the
//! deployment record is written last: a crash at any point leaves either the old deployment or
//! the new one visible, never half of one.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{DeleteCheck, DeployCheck, DeploymentRecord, ModelRecord, StateStore, readable, storage, verified};
use crate::app::DeployError;
use crate::tenant::TenantRecord;

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().expect("store paths have parents");
    let tmp = dir.join(format!(".{}.tmp", path.file_name().expect("file name").to_string_lossy()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Reads a JSON file, or the default when there is none.
fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> io::Result<T> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_atomically(path, &serde_json::to_vec_pretty(value).map_err(io::Error::other)?)
}

#[derive(Default, Serialize, Deserialize)]
struct TenantFile {
    tenants: BTreeMap<String, TenantRecord>,
}

pub struct FileStore {
    root: PathBuf,
    deployments: PathBuf,
    components: PathBuf,
    /// Deploys and deletes, and each read-modify-write of tenants.json or models.json, one at a
    /// time.
    lock: Mutex<()>,
}

impl FileStore {
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let store = Self {
            root: data_dir.to_path_buf(),
            deployments: data_dir.join("deployments"),
            components: data_dir.join("components"),
            lock: Mutex::new(()),
        };
        for dir in [&store.deployments, &store.components] {
            fs::create_dir_all(dir)?;
            remove_interrupted_writes(dir)?;
        }
        Ok(store)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.deployments.join(format!("{name}.json"))
    }

    fn component_path(&self, sha256: &str) -> PathBuf {
        self.components.join(format!("{sha256}.wasm"))
    }

    fn tenants_path(&self) -> PathBuf {
        self.root.join("tenants.json")
    }

    fn models_path(&self) -> PathBuf {
        self.root.join("models.json")
    }

    fn records(&self) -> io::Result<Vec<(String, io::Result<DeploymentRecord>)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.deployments)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let record = fs::read(&path)
                .and_then(|bytes| serde_json::from_slice::<DeploymentRecord>(&bytes).map_err(io::Error::other));
            out.push((name.to_string(), record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn housekeeping(&self) {
        if let Err(e) = self.collect_garbage() {
            tracing::warn!(error = %e, "could not collect unreferenced components");
        }
    }

    /// Removes component files no record refers to. While any record is unreadable nothing is
    /// removed: its component may be one of them, and the operator may yet repair the record.
    fn collect_garbage(&self) -> io::Result<()> {
        let Some(live) = live_components(self.records()?) else { return Ok(()) };
        retain_files(&self.components, &live)
    }

    fn update_tenants<R>(&self, change: impl FnOnce(&mut BTreeMap<String, TenantRecord>) -> R) -> io::Result<R> {
        let _guard = self.lock.lock().expect("poisoned");
        let mut file: TenantFile = read_json(&self.tenants_path())?;
        let out = change(&mut file.tenants);
        write_json(&self.tenants_path(), &file)?;
        Ok(out)
    }

    fn update_models<R>(&self, change: impl FnOnce(&mut BTreeMap<String, ModelRecord>) -> R) -> io::Result<R> {
        let _guard = self.lock.lock().expect("poisoned");
        let mut models = read_models(&self.models_path())?;
        let out = change(&mut models);
        write_json(&self.models_path(), &models)?;
        Ok(out)
    }
}

/// One entry of models.json: a record, or the bare path that stores before split models wrote.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StoredModel {
    Record(ModelRecord),
    Path(PathBuf),
}

fn read_models(path: &Path) -> io::Result<BTreeMap<String, ModelRecord>> {
    let stored: BTreeMap<String, StoredModel> = read_json(path)?;
    Ok(stored
        .into_iter()
        .map(|(name, m)| match m {
            StoredModel::Record(record) => (name, record),
            StoredModel::Path(path) => (name, ModelRecord::whole(path)),
        })
        .collect())
}

/// Leftovers of writes a crash interrupted: never visible, safe to drop.
pub(crate) fn remove_interrupted_writes(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".tmp")) {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The components the records refer to; `None` while any record is unreadable.
pub(crate) fn live_components(records: Vec<(String, io::Result<DeploymentRecord>)>) -> Option<BTreeSet<String>> {
    let mut live = BTreeSet::new();
    for (name, record) in records {
        match record {
            Ok(r) => live.insert(r.component_sha256),
            Err(e) => {
                tracing::warn!(deployment = %name, error = %e, "unreadable record; keeping every component");
                return None;
            }
        };
    }
    Some(live)
}

/// Removes `<sha256>.wasm` files of `dir` whose hash is not in `live`.
pub(crate) fn retain_files(dir: &Path, live: &BTreeSet<String>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".wasm")) else {
            continue;
        };
        if !live.contains(stem) {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl StateStore for FileStore {
    fn describe(&self) -> String {
        format!("files under {}", self.root.display())
    }

    async fn load_deployments(&self) -> io::Result<Vec<(String, io::Result<DeploymentRecord>)>> {
        self.records()
    }

    async fn read_component(&self, sha256: &str) -> io::Result<Vec<u8>> {
        verified(sha256, fs::read(self.component_path(sha256))?)
    }

    async fn put_deployment(
        &self,
        name: &str,
        wasm: Arc<Vec<u8>>,
        check: DeployCheck,
    ) -> Result<DeploymentRecord, DeployError> {
        let _guard = self.lock.lock().expect("poisoned");
        let current = readable(self.records().map_err(storage)?);
        let record = check(&current)?;
        let component = self.component_path(&record.component_sha256);
        if !component.is_file() {
            write_atomically(&component, &wasm).map_err(storage)?;
        }
        write_json(&self.record_path(name), &record).map_err(storage)?;
        self.housekeeping();
        Ok(record)
    }

    async fn delete_deployment(&self, name: &str, may_delete: DeleteCheck) -> io::Result<bool> {
        let _guard = self.lock.lock().expect("poisoned");
        let path = self.record_path(name);
        let record = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<DeploymentRecord>(&bytes).map_err(io::Error::other)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if !may_delete(&record) {
            return Ok(false);
        }
        fs::remove_file(&path)?;
        // The record is gone: the deployment is deleted, whatever the housekeeping says.
        if let Err(e) = File::open(&self.deployments).and_then(|d| d.sync_all()) {
            tracing::warn!(error = %e, "could not sync the deployments directory after a delete");
        }
        self.housekeeping();
        Ok(true)
    }

    async fn load_tenants(&self) -> io::Result<BTreeMap<String, TenantRecord>> {
        Ok(read_json::<TenantFile>(&self.tenants_path())?.tenants)
    }

    async fn insert_tenant(&self, name: &str, record: &TenantRecord) -> io::Result<bool> {
        let mut inserted = false;
        self.update_tenants(|t| {
            if !t.contains_key(name) {
                t.insert(name.to_string(), record.clone());
                inserted = true;
            }
        })?;
        Ok(inserted)
    }

    async fn update_tenant(&self, name: &str, record: &TenantRecord) -> io::Result<bool> {
        self.update_tenants(|t| t.get_mut(name).map(|r| *r = record.clone()).is_some())
    }

    async fn delete_tenant(&self, name: &str) -> io::Result<bool> {
        self.update_tenants(|t| t.remove(name).is_some())
    }

    async fn load_models(&self) -> io::Result<BTreeMap<String, ModelRecord>> {
        read_models(&self.models_path())
    }

    async fn put_model(&self, name: &str, record: &ModelRecord) -> io::Result<()> {
        self.update_models(|m| {
            m.insert(name.to_string(), record.clone());
        })
    }

    async fn remove_model(&self, name: &str) -> io::Result<bool> {
        self.update_models(|m| m.remove(name).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sha256_hex;

    fn record(name: &str, wasm: &[u8], tenant: Option<&str>) -> DeploymentRecord {
        DeploymentRecord {
            manifest_toml: format!("name = \"{name}\"\nroutes = [\"/{name}\"]"),
            component_sha256: sha256_hex(wasm),
            component_bytes: wasm.len() as u64,
            deployed_at_unix: 1,
            tenant: tenant.map(str::to_string),
        }
    }

    async fn put(store: &FileStore, name: &str, wasm: &[u8], tenant: Option<&str>) -> DeploymentRecord {
        let rec = record(name, wasm, tenant);
        store.put_deployment(name, Arc::new(wasm.to_vec()), Box::new(move |_| Ok(rec))).await.unwrap()
    }

    async fn delete(store: &FileStore, name: &str) -> bool {
        store.delete_deployment(name, Box::new(|_| true)).await.unwrap()
    }

    #[tokio::test]
    async fn put_then_reopen_returns_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, "a", b"wasm-a", Some("acme")).await;
        put(&store, "b", b"wasm-b", None).await;
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        let all = store.load_deployments().await.unwrap();
        assert_eq!(all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let rec = all[0].1.as_ref().unwrap();
        assert_eq!(rec.tenant.as_deref(), Some("acme"));
        assert_eq!(store.read_component(&rec.component_sha256).await.unwrap(), b"wasm-a");
    }

    #[tokio::test]
    async fn a_refused_check_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, "a", b"1", None).await;
        let refused = store
            .put_deployment(
                "b",
                Arc::new(b"2".to_vec()),
                Box::new(|records| {
                    assert_eq!(records.len(), 1, "the check sees the current records");
                    Err(DeployError::NameTaken("b".into()))
                }),
            )
            .await;
        assert!(matches!(refused, Err(DeployError::NameTaken(_))));
        assert_eq!(store.load_deployments().await.unwrap().len(), 1);
        assert!(store.read_component(&sha256_hex(b"2")).await.is_err());
    }

    #[tokio::test]
    async fn replacing_and_deleting_collects_unreferenced_components() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, "a", b"1", None).await;
        put(&store, "a", b"2", None).await;
        assert!(store.read_component(&sha256_hex(b"1")).await.is_err(), "old component should be collected");
        assert!(!store.delete_deployment("a", Box::new(|_| false)).await.unwrap(), "the check can refuse");
        assert!(delete(&store, "a").await);
        assert!(!delete(&store, "a").await);
        assert!(store.read_component(&sha256_hex(b"2")).await.is_err());
    }

    #[tokio::test]
    async fn an_unreadable_record_keeps_every_component() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, "a", b"1", None).await;
        fs::write(dir.path().join("deployments/a.json"), b"{damaged").unwrap();
        put(&store, "b", b"2", None).await;
        assert_eq!(store.read_component(&sha256_hex(b"1")).await.unwrap(), b"1", "a's component survives");
    }

    #[tokio::test]
    async fn a_corrupt_component_is_an_error_not_a_handler() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let rec = put(&store, "a", b"good", None).await;
        fs::write(dir.path().join(format!("components/{}.wasm", rec.component_sha256)), b"evil").unwrap();
        let err = store.read_component(&rec.component_sha256).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn tenants_and_models_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let rec = TenantRecord { key_sha256: "00".into(), created_at_unix: 1, grants: Default::default() };
        assert!(store.insert_tenant("acme", &rec).await.unwrap());
        assert!(!store.insert_tenant("acme", &rec).await.unwrap(), "a second insert is refused");
        assert!(!store.update_tenant("nobody", &rec).await.unwrap());
        store.put_model("a", &ModelRecord::whole("/models/a".into())).await.unwrap();
        store.put_model("b", &ModelRecord::whole("/models/b.gguf".into())).await.unwrap();
        let split = ModelRecord { path: "/models/c".into(), ranks: 2 };
        store.put_model("c", &split).await.unwrap();
        assert!(store.remove_model("a").await.unwrap());
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.load_tenants().await.unwrap().keys().collect::<Vec<_>>(), ["acme"]);
        let models = store.load_models().await.unwrap();
        let expected = [("b".to_string(), ModelRecord::whole("/models/b.gguf".into())), ("c".to_string(), split)];
        assert_eq!(models.into_iter().collect::<Vec<_>>(), expected);
    }

    #[tokio::test]
    async fn models_stored_as_bare_paths_load_as_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("models.json"), br#"{"old": "/models/old"}"#).unwrap();
        let models = store.load_models().await.unwrap();
        assert_eq!(models["old"], ModelRecord::whole("/models/old".into()));
    }

    #[tokio::test]
    async fn interrupted_writes_are_invisible_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, "a", b"1", None).await;
        // What a crash between write and rename leaves behind.
        fs::write(dir.path().join("deployments/.b.json.tmp"), b"{half").unwrap();
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        let names: Vec<_> = store.load_deployments().await.unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a"]);
        assert!(!dir.path().join("deployments/.b.json.tmp").exists());
    }
}
