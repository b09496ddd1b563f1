//! Compiled components, cached on disk by content hash so a restart or a redeploy of the same
//! bytes skips compilation (seconds for an interpreter-based component).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub struct ComponentCache {
    dir: Option<PathBuf>,
}

impl ComponentCache {
    pub fn new(dir: Option<PathBuf>) -> std::io::Result<Self> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)?;
        }
        Ok(Self { dir })
    }

    fn path(&self, hash: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{hash}.cwasm")))
    }

    /// The compiled component for `wasm`, from the cache when possible.
    pub fn load_or_compile(&self, engine: &Engine, hash: &str, wasm: &[u8]) -> wasmtime::Result<Component> {
        let Some(path) = self.path(hash) else {
            return Component::new(engine, wasm);
        };
        if path.is_file() {
            // SAFETY: files in the cache dir are written only by `store` below from our own
            // compilation; wasmtime checks the engine-compatibility header before using them.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "stale compiled component; recompiling")
                }
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = Self::store(&path, &component.serialize()?) {
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled component");
        }
        Ok(component)
    }

    fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }
}
