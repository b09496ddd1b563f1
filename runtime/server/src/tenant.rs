//! Tenants and who is calling. The operator holds the admin token; each tenant gets an API key
//! (shown once, stored only as its SHA-256) that scopes the admin API to its own deployments and
//! is required to invoke them.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::validate_name;
use crate::store::write_atomically;

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator (admin token), or anyone when no admin token is configured.
    Admin,
    Tenant(String),
    /// No credentials.
    Anonymous,
    /// Credentials that match nothing.
    Invalid,
}

impl Caller {
    /// Whether this caller may see and manage a deployment owned by `owner`.
    pub fn can_access(&self, owner: Option<&str>) -> bool {
        match (self, owner) {
            (Caller::Admin, _) => true,
            (Caller::Tenant(t), Some(o)) => t == o,
            (_, None) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TenantRecord {
    key_sha256: String,
    created_at_unix: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct TenantFile {
    tenants: BTreeMap<String, TenantRecord>,
}

pub struct Tenants {
    path: PathBuf,
    file: RwLock<TenantFile>,
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Constant-time equality for secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn new_key() -> io::Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(io::Error::other)?;
    Ok(format!("kt_{}", hex::encode(bytes)))
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("{0}")]
    Invalid(String),
    #[error("tenant {0} already exists")]
    Exists(String),
    #[error("storage failed: {0}")]
    Storage(#[from] io::Error),
}

impl Tenants {
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let path = data_dir.join("tenants.json");
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => TenantFile::default(),
            Err(e) => return Err(e),
        };
        Ok(Self { path, file: RwLock::new(file) })
    }

    fn save(&self, file: &TenantFile) -> io::Result<()> {
        write_atomically(&self.path, &serde_json::to_vec_pretty(file).map_err(io::Error::other)?)
    }

    /// Creates a tenant and returns its API key (the only time the key is available).
    pub fn create(&self, name: &str) -> Result<String, TenantError> {
        validate_name(name)
            .map_err(|e| TenantError::Invalid(e.to_string().replace("manifest: name", "tenant name")))?;
        let mut file = self.file.write().expect("poisoned");
        if file.tenants.contains_key(name) {
            return Err(TenantError::Exists(name.to_string()));
        }
        let key = new_key()?;
        let created_at_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        file.tenants.insert(name.to_string(), TenantRecord { key_sha256: digest(&key), created_at_unix });
        if let Err(e) = self.save(&file) {
            file.tenants.remove(name);
            return Err(e.into());
        }
        Ok(key)
    }

    pub fn delete(&self, name: &str) -> io::Result<bool> {
        let mut file = self.file.write().expect("poisoned");
        let Some(old) = file.tenants.remove(name) else { return Ok(false) };
        if let Err(e) = self.save(&file) {
            file.tenants.insert(name.to_string(), old);
            return Err(e);
        }
        Ok(true)
    }

    pub fn names(&self) -> Vec<String> {
        self.file.read().expect("poisoned").tenants.keys().cloned().collect()
    }

    /// The tenant whose key this is.
    pub fn authenticate(&self, key: &str) -> Option<String> {
        let d = digest(key);
        let file = self.file.read().expect("poisoned");
        file.tenants.iter().find(|(_, r)| secret_eq(&r.key_sha256, &d)).map(|(n, _)| n.clone())
    }
}

/// Resolves the caller from an `Authorization: Bearer ...` header.
pub fn identify(headers: &http::HeaderMap, admin_token: Option<&str>, tenants: &Tenants) -> Caller {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (bearer, admin_token) {
        (Some(b), Some(t)) if secret_eq(b, t) => Caller::Admin,
        (Some(b), _) => tenants.authenticate(b).map(Caller::Tenant).unwrap_or(Caller::Invalid),
        (None, None) => Caller::Admin,
        (None, Some(_)) => Caller::Anonymous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_their_tenant_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = Tenants::open(dir.path()).unwrap();
        let a = tenants.create("acme").unwrap();
        let b = tenants.create("bolt").unwrap();
        assert_ne!(a, b);
        assert!(matches!(tenants.create("acme"), Err(TenantError::Exists(_))));
        assert!(matches!(tenants.create("Bad Name"), Err(TenantError::Invalid(_))));
        drop(tenants);
        let tenants = Tenants::open(dir.path()).unwrap();
        assert_eq!(tenants.authenticate(&a).as_deref(), Some("acme"));
        assert_eq!(tenants.authenticate(&b).as_deref(), Some("bolt"));
        assert_eq!(tenants.authenticate("kt_guess"), None);
        let stored = std::fs::read_to_string(dir.path().join("tenants.json")).unwrap();
        assert!(!stored.contains(&a), "keys are stored hashed");
        assert!(tenants.delete("acme").unwrap());
        assert_eq!(tenants.authenticate(&a), None);
    }

    #[test]
    fn callers_are_identified_from_the_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = Tenants::open(dir.path()).unwrap();
        let key = tenants.create("acme").unwrap();
        let h = |v: Option<&str>| {
            let mut m = http::HeaderMap::new();
            if let Some(v) = v {
                m.insert(http::header::AUTHORIZATION, format!("Bearer {v}").parse().unwrap());
            }
            m
        };
        assert_eq!(identify(&h(Some("root")), Some("root"), &tenants), Caller::Admin);
        assert_eq!(identify(&h(Some(&key)), Some("root"), &tenants), Caller::Tenant("acme".into()));
        assert_eq!(identify(&h(Some("nope")), Some("root"), &tenants), Caller::Invalid);
        assert_eq!(identify(&h(None), Some("root"), &tenants), Caller::Anonymous);
        assert_eq!(identify(&h(None), None, &tenants), Caller::Admin, "no admin token: local development mode");
        assert!(Caller::Tenant("acme".into()).can_access(Some("acme")));
        assert!(!Caller::Tenant("acme".into()).can_access(Some("bolt")));
        assert!(!Caller::Anonymous.can_access(Some("acme")));
        assert!(Caller::Anonymous.can_access(None));
    }
}
