//! Compiled components, cached on disk by content hash so a restart or a redeploy of the same
//! bytes skips compilation (seconds for an interpreter-based component). Only components that
//! passed the link and export checks are stored, and the cache keeps within a byte budget by
//! dropping the least recently used files (a hit refreshes a file's time), so several servers may
//! share one directory.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub struct ComponentCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
}

impl ComponentCache {
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> std::io::Result<Self> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)?;
        }
        Ok(Self { dir, max_bytes })
    }

    fn path(&self, hash: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{hash}.cwasm")))
    }

    /// The compiled component for this content hash, when the cache has a usable one.
    pub fn load(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path(hash).filter(|p| p.is_file())?;
        // SAFETY: files in the cache dir are written only by `store` below from our own
        // compilation; wasmtime checks the engine-compatibility header before using them.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => {
                let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                Some(c)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "stale compiled component; recompiling");
                None
            }
        }
    }

    /// Keeps a compiled component; failures only cost a later recompilation, so they are logged.
    pub fn store(&self, hash: &str, component: &Component) {
        let Some(path) = self.path(hash) else { return };
        let written = component.serialize().map_err(std::io::Error::other).and_then(|bytes| {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled component");
        }
        if let Err(e) = self.collect_garbage(&path) {
            tracing::warn!(error = %e, "could not trim the compiled-component cache");
        }
    }

    /// Removes the least recently used files until the cache fits its budget, never `keep`.
    fn collect_garbage(&self, keep: &Path) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_file() && entry.path().extension().is_some_and(|e| e == "cwasm") {
                files.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), entry.path()));
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path != keep {
                // A server that mapped this file keeps its copy; the next load recompiles.
                std::fs::remove_file(&path)?;
                total -= len;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(engine: &Engine, n: u32) -> Component {
        let wat = format!("(component (core module (func (export \"f{n}\"))))");
        Component::new(engine, wat::parse_str(wat).unwrap()).unwrap()
    }

    #[test]
    fn stored_components_load_back_and_the_cache_stays_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let one = component(&engine, 1).serialize().unwrap().len() as u64;
        let cache = ComponentCache::new(Some(dir.path().to_path_buf()), one * 2 + one / 2).unwrap();
        assert!(cache.load(&engine, "a").is_none());
        for (n, hash) in ["a", "b", "c"].iter().enumerate() {
            cache.store(hash, &component(&engine, n as u32));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(cache.load(&engine, "a").is_none(), "the least recently used file is dropped");
        assert!(cache.load(&engine, "b").is_some());
        assert!(cache.load(&engine, "c").is_some());
    }
}
