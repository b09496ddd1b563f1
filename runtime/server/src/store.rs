//! Durable deployments under the data dir.
//!
//! Layout: `components/<sha256>.wasm` (content-addressed, shared by redeploys of the same bytes),
//! `deployments/<name>.json` (the manifest and the component's hash) and `models.json` (models
//! registered through the admin API). Every file is written to a temporary name, fsynced and
//! renamed, and the deployment record is written last: a crash at any point leaves either the old
//! deployment or the new one visible, never half of one.
//!
//! Once a record is written (or unlinked) the change has happened: housekeeping after it (the
//! directory fsync, collecting unreferenced components) is logged on failure, never reported as
//! a failed deploy or delete, so the caller and the live table never disagree with the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The manifest exactly as deployed.
    pub manifest_toml: String,
    pub component_sha256: String,
    pub component_bytes: u64,
    pub deployed_at_unix: u64,
    /// The tenant that owns the deployment; `None` for the operator's (public) deployments.
    #[serde(default)]
    pub tenant: Option<String>,
}

pub struct DeploymentStore {
    deployments: PathBuf,
    components: PathBuf,
}

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

impl DeploymentStore {
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let store = Self { deployments: data_dir.join("deployments"), components: data_dir.join("components") };
        for dir in [&store.deployments, &store.components] {
            fs::create_dir_all(dir)?;
            // Leftovers of writes a crash interrupted; never visible, safe to drop.
            for entry in fs::read_dir(dir)? {
                let path = entry?.path();
                if path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".tmp")) {
                    fs::remove_file(&path)?;
                }
            }
        }
        Ok(store)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.deployments.join(format!("{name}.json"))
    }

    fn component_path(&self, sha256: &str) -> PathBuf {
        self.components.join(format!("{sha256}.wasm"))
    }

    /// Stores a deployment, replacing any of the same name; returns its record.
    pub fn put(
        &self,
        manifest: &Manifest,
        manifest_toml: &str,
        sha256: &str,
        wasm: &[u8],
        tenant: Option<&str>,
    ) -> io::Result<DeploymentRecord> {
        let component = self.component_path(sha256);
        if !component.is_file() {
            write_atomically(&component, wasm)?;
        }
        let record = DeploymentRecord {
            manifest_toml: manifest_toml.to_string(),
            component_sha256: sha256.to_string(),
            component_bytes: wasm.len() as u64,
            deployed_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            tenant: tenant.map(str::to_string),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
        write_atomically(&self.record_path(&manifest.name), &json)?;
        self.housekeeping();
        Ok(record)
    }

    /// Removes a deployment's record; `Ok(false)` when there was none. Once the record is unlinked
    /// the deployment is gone, whatever the housekeeping after it says.
    pub fn delete(&self, name: &str) -> io::Result<bool> {
        match fs::remove_file(self.record_path(name)) {
            Ok(()) => {
                if let Err(e) = File::open(&self.deployments).and_then(|d| d.sync_all()) {
                    tracing::warn!(error = %e, "could not sync the deployments directory after a delete");
                }
                self.housekeeping();
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn housekeeping(&self) {
        if let Err(e) = self.collect_garbage() {
            tracing::warn!(error = %e, "could not collect unreferenced components");
        }
    }

    pub fn read_component(&self, sha256: &str) -> io::Result<Vec<u8>> {
        fs::read(self.component_path(sha256))
    }

    /// Every stored record, by name; unreadable ones come back as errors to report, not to hide.
    pub fn load_all(&self) -> io::Result<Vec<(String, io::Result<DeploymentRecord>)>> {
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

    /// Removes component files no record refers to. While any record is unreadable nothing is
    /// removed: its component may be one of them, and the operator may yet repair the record.
    fn collect_garbage(&self) -> io::Result<()> {
        let mut live = BTreeSet::new();
        for (name, record) in self.load_all()? {
            match record {
                Ok(r) => live.insert(r.component_sha256),
                Err(e) => {
                    tracing::warn!(deployment = %name, error = %e, "unreadable record; keeping every component");
                    return Ok(());
                }
            };
        }
        for entry in fs::read_dir(&self.components)? {
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
}

/// Models registered through the admin API (`models.json`), registered again at the next start.
pub struct ModelStore {
    path: PathBuf,
    lock: std::sync::Mutex<()>,
}

impl ModelStore {
    pub fn open(data_dir: &Path) -> Self {
        Self { path: data_dir.join("models.json"), lock: Default::default() }
    }

    /// Every stored model: name → checkpoint path.
    pub fn load(&self) -> io::Result<BTreeMap<String, PathBuf>> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e),
        }
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, PathBuf>)) -> io::Result<()> {
        let _guard = self.lock.lock().expect("poisoned");
        let mut models = self.load()?;
        change(&mut models);
        write_atomically(&self.path, &serde_json::to_vec_pretty(&models).map_err(io::Error::other)?)
    }

    pub fn put(&self, name: &str, path: &Path) -> io::Result<()> {
        self.update(|m| {
            m.insert(name.to_string(), path.to_path_buf());
        })
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.update(|m| {
            m.remove(name);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str) -> Manifest {
        Manifest::parse(&format!("name = \"{name}\"\nroutes = [\"/{name}\"]")).unwrap()
    }

    #[test]
    fn put_then_reopen_returns_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeploymentStore::open(dir.path()).unwrap();
        store.put(&manifest("a"), "toml-a", "aa", b"wasm-a", Some("acme")).unwrap();
        store.put(&manifest("b"), "toml-b", "bb", b"wasm-b", None).unwrap();
        drop(store);
        let store = DeploymentStore::open(dir.path()).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let rec = all[0].1.as_ref().unwrap();
        assert_eq!(rec.manifest_toml, "toml-a");
        assert_eq!(rec.tenant.as_deref(), Some("acme"));
        assert_eq!(store.read_component(&rec.component_sha256).unwrap(), b"wasm-a");
    }

    #[test]
    fn replacing_and_deleting_collects_unreferenced_components() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeploymentStore::open(dir.path()).unwrap();
        store.put(&manifest("a"), "v1", "one", b"1", None).unwrap();
        store.put(&manifest("a"), "v2", "two", b"2", None).unwrap();
        assert!(store.read_component("one").is_err(), "old component should be collected");
        assert!(store.delete("a").unwrap());
        assert!(!store.delete("a").unwrap());
        assert!(store.read_component("two").is_err());
    }

    #[test]
    fn an_unreadable_record_keeps_every_component() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeploymentStore::open(dir.path()).unwrap();
        store.put(&manifest("a"), "v1", "one", b"1", None).unwrap();
        fs::write(dir.path().join("deployments/a.json"), b"{damaged").unwrap();
        store.put(&manifest("b"), "v1", "two", b"2", None).unwrap();
        assert_eq!(store.read_component("one").unwrap(), b"1", "a's component survives its damaged record");
    }

    #[test]
    fn registered_models_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let models = ModelStore::open(dir.path());
        models.put("a", Path::new("/models/a")).unwrap();
        models.put("b", Path::new("/models/b.gguf")).unwrap();
        models.remove("a").unwrap();
        let reopened = ModelStore::open(dir.path()).load().unwrap();
        assert_eq!(reopened.into_iter().collect::<Vec<_>>(), [("b".to_string(), PathBuf::from("/models/b.gguf"))]);
    }

    #[test]
    fn interrupted_writes_are_invisible_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeploymentStore::open(dir.path()).unwrap();
        store.put(&manifest("a"), "v1", "one", b"1", None).unwrap();
        // What a crash between write and rename leaves behind.
        fs::write(dir.path().join("deployments/.b.json.tmp"), b"{half").unwrap();
        drop(store);
        let store = DeploymentStore::open(dir.path()).unwrap();
        let names: Vec<_> = store.load_all().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a"]);
        assert!(!dir.path().join("deployments/.b.json.tmp").exists());
    }
}
