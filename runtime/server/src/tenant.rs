//! Tenants and who is calling. The operator holds the admin token; each tenant gets an API key
//! (shown once, stored only as its SHA-256) that scopes the admin API to its own deployments and
//! is required to invoke them. The operator grants each tenant the models it may use and a
//! deployment quota.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::validate_name;
use crate::store::StateStore;

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator: the admin token, or a local request when no admin token is configured.
    Admin,
    Tenant(String),
    /// No credentials.
    Anonymous,
    /// Credentials that match nothing.
    Invalid,
}

impl Caller {
    /// Whether this caller may see, replace and delete a deployment owned by `owner` (`None`: the
    /// operator's public deployments, which only the operator manages).
    pub fn can_manage(&self, owner: Option<&str>) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Tenant(t) => owner == Some(t.as_str()),
            Caller::Anonymous | Caller::Invalid => false,
        }
    }

    /// Whether this caller may invoke a deployment owned by `owner`: public ones are open to all.
    pub fn can_invoke(&self, owner: Option<&str>) -> bool {
        owner.is_none() || self.can_manage(owner)
    }
}

/// What the operator decides about a tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// Registered models the tenant's deployments may list and load.
    #[serde(default)]
    pub models: BTreeSet<String>,
    /// Deployments the tenant may have at once; `None`: the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deployments: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub(crate) key_sha256: String,
    pub(crate) created_at_unix: u64,
    #[serde(default, flatten)]
    pub(crate) grants: Grants,
}

/// A tenant as the admin API shows it (never its key).
#[derive(Debug, Clone, Serialize)]
pub struct TenantInfo {
    pub name: String,
    pub created_at_unix: u64,
    #[serde(flatten)]
    pub grants: Grants,
}

/// The tenants, in memory for every request's authentication, written through to the store
/// (and, in a cluster, replaced whenever another node changes them).
pub struct Tenants {
    store: Arc<dyn StateStore>,
    tenants: RwLock<BTreeMap<String, TenantRecord>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality for secrets, whatever their lengths: both sides are hashed to 32 bytes
/// first, so neither the length nor the first differing byte shows in the time taken.
pub fn secret_eq(a: &str, b: &str) -> bool {
    digests_eq(&digest(a), &digest(b))
}

fn digests_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    #[error("no tenant named {0}")]
    NotFound(String),
    #[error("storage failed: {0}")]
    Storage(#[from] io::Error),
}

impl Tenants {
    pub async fn open(store: Arc<dyn StateStore>) -> io::Result<Self> {
        let tenants = store.load_tenants().await?;
        Ok(Self { store, tenants: RwLock::new(tenants) })
    }

    /// Replaces the in-memory tenants with the store's (another node changed them).
    pub async fn reload(&self) -> io::Result<()> {
        let tenants = self.store.load_tenants().await?;
        *self.tenants.write().expect("poisoned") = tenants;
        Ok(())
    }

    /// Creates a tenant and returns its API key (the only time the key is available).
    pub async fn create(&self, name: &str, grants: Grants) -> Result<String, TenantError> {
        validate_name(name).map_err(|_| {
            TenantError::Invalid(format!(
                "tenant name {name:?} must be 1-63 characters of lowercase letters, digits and '-', not starting with '-'"
            ))
        })?;
        if self.tenants.read().expect("poisoned").contains_key(name) {
            return Err(TenantError::Exists(name.to_string()));
        }
        let key = new_key()?;
        let record =
            TenantRecord { key_sha256: hex::encode(digest(&key)), created_at_unix: crate::store::now_unix(), grants };
        // The store decides between two creates racing, here or on another node.
        if !self.store.insert_tenant(name, &record).await? {
            return Err(TenantError::Exists(name.to_string()));
        }
        self.tenants.write().expect("poisoned").insert(name.to_string(), record);
        Ok(key)
    }

    /// Replaces a tenant's grants; the change applies to the next deploy and the next `load`.
    pub async fn set_grants(&self, name: &str, grants: Grants) -> Result<TenantInfo, TenantError> {
        let not_found = || TenantError::NotFound(name.to_string());
        let mut record = self.tenants.read().expect("poisoned").get(name).cloned().ok_or_else(not_found)?;
        record.grants = grants;
        if !self.store.update_tenant(name, &record).await? {
            self.tenants.write().expect("poisoned").remove(name);
            return Err(not_found());
        }
        let info = Self::info(name, &record);
        self.tenants.write().expect("poisoned").insert(name.to_string(), record);
        Ok(info)
    }

    pub async fn delete(&self, name: &str) -> io::Result<bool> {
        let deleted = self.store.delete_tenant(name).await?;
        self.tenants.write().expect("poisoned").remove(name);
        Ok(deleted)
    }

    fn info(name: &str, r: &TenantRecord) -> TenantInfo {
        TenantInfo { name: name.to_string(), created_at_unix: r.created_at_unix, grants: r.grants.clone() }
    }

    pub fn get(&self, name: &str) -> Option<TenantInfo> {
        self.tenants.read().expect("poisoned").get(name).map(|r| Self::info(name, r))
    }

    pub fn list(&self) -> Vec<TenantInfo> {
        self.tenants.read().expect("poisoned").iter().map(|(n, r)| Self::info(n, r)).collect()
    }

    /// The models `name` may use; `None` when the tenant does not exist (any more).
    pub fn granted_models(&self, name: &str) -> Option<BTreeSet<String>> {
        self.tenants.read().expect("poisoned").get(name).map(|r| r.grants.models.clone())
    }

    /// The tenant whose key this is.
    pub fn authenticate(&self, key: &str) -> Option<String> {
        let d = digest(key);
        let tenants = self.tenants.read().expect("poisoned");
        let matches = |r: &TenantRecord| {
            let mut stored = [0u8; 32];
            hex::decode_to_slice(&r.key_sha256, &mut stored).is_ok() && digests_eq(&stored, &d)
        };
        tenants.iter().find(|(_, r)| matches(r)).map(|(n, _)| n.clone())
    }
}

/// Whether a request comes from this machine and from no web page elsewhere: a loopback peer, a
/// `Host` naming the loopback (a DNS-rebinding page sends its own host name) and no cross-site
/// `Origin` (a form another site posts). Without an admin token only such requests administer.
pub fn is_local_request(peer: IpAddr, headers: &http::HeaderMap) -> bool {
    fn loopback_host(authority: &str) -> bool {
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
    let header = |name: http::header::HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    let host_ok = header(http::header::HOST).is_none_or(loopback_host);
    let origin_ok = header(http::header::ORIGIN).is_none_or(|origin| {
        origin.split_once("://").is_some_and(|(scheme, rest)| {
            matches!(scheme, "http" | "https") && loopback_host(rest.split('/').next().unwrap_or(""))
        })
    });
    let fetch_ok = headers.get("sec-fetch-site").is_none_or(|v| v != "cross-site");
    peer.is_loopback() && host_ok && origin_ok && fetch_ok
}

/// Resolves the caller from an `Authorization: Bearer ...` header. Without an admin token, a
/// request without credentials is the operator only when `local` (see `is_local_request`).
pub fn identify(headers: &http::HeaderMap, admin_token: Option<&str>, tenants: &Tenants, local: bool) -> Caller {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (bearer, admin_token) {
        (Some(b), Some(t)) if secret_eq(b, t) => Caller::Admin,
        (Some(b), _) => tenants.authenticate(b).map(Caller::Tenant).unwrap_or(Caller::Invalid),
        (None, None) if local => Caller::Admin,
        (None, _) => Caller::Anonymous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(dir: &std::path::Path) -> Tenants {
        Tenants::open(Arc::new(crate::store::FileStore::open(dir).unwrap())).await.unwrap()
    }

    #[tokio::test]
    async fn keys_authenticate_their_tenant_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = open(dir.path()).await;
        let grants = Grants { models: ["tiny".to_string()].into(), max_deployments: Some(2) };
        let a = tenants.create("acme", grants.clone()).await.unwrap();
        let b = tenants.create("bolt", Grants::default()).await.unwrap();
        assert_ne!(a, b);
        assert!(matches!(tenants.create("acme", Grants::default()).await, Err(TenantError::Exists(_))));
        assert!(matches!(tenants.create("Bad Name", Grants::default()).await, Err(TenantError::Invalid(_))));
        drop(tenants);
        let tenants = open(dir.path()).await;
        assert_eq!(tenants.authenticate(&a).as_deref(), Some("acme"));
        assert_eq!(tenants.authenticate(&b).as_deref(), Some("bolt"));
        assert_eq!(tenants.authenticate("kt_guess"), None);
        assert_eq!(tenants.get("acme").unwrap().grants, grants);
        let stored = std::fs::read_to_string(dir.path().join("tenants.json")).unwrap();
        assert!(!stored.contains(&a), "keys are stored hashed");
        let none = Grants::default();
        assert_eq!(tenants.set_grants("acme", none.clone()).await.unwrap().grants, none);
        assert_eq!(tenants.granted_models("acme"), Some(BTreeSet::new()));
        assert!(matches!(tenants.set_grants("nobody", none).await, Err(TenantError::NotFound(_))));
        assert!(tenants.delete("acme").await.unwrap());
        assert_eq!(tenants.authenticate(&a), None);
        assert_eq!(tenants.granted_models("acme"), None);
    }

    #[test]
    fn secrets_compare_equal_only_when_equal_whatever_the_length() {
        assert!(secret_eq("root-token", "root-token"));
        assert!(!secret_eq("root-token", "root-toke"));
        assert!(!secret_eq("root-token", "root-tokex"));
        assert!(!secret_eq("", "x"));
    }

    #[tokio::test]
    async fn callers_are_identified_from_the_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = open(dir.path()).await;
        let key = tenants.create("acme", Grants::default()).await.unwrap();
        let h = |v: Option<&str>| {
            let mut m = http::HeaderMap::new();
            if let Some(v) = v {
                m.insert(http::header::AUTHORIZATION, format!("Bearer {v}").parse().unwrap());
            }
            m
        };
        assert_eq!(identify(&h(Some("root")), Some("root"), &tenants, false), Caller::Admin);
        assert_eq!(identify(&h(Some(&key)), Some("root"), &tenants, false), Caller::Tenant("acme".into()));
        assert_eq!(identify(&h(Some("nope")), Some("root"), &tenants, true), Caller::Invalid);
        assert_eq!(identify(&h(None), Some("root"), &tenants, true), Caller::Anonymous);
        assert_eq!(identify(&h(None), None, &tenants, true), Caller::Admin, "no admin token: local development");
        assert_eq!(identify(&h(None), None, &tenants, false), Caller::Anonymous, "...but only locally");
        let acme = Caller::Tenant("acme".into());
        assert!(acme.can_manage(Some("acme")));
        assert!(!acme.can_manage(Some("bolt")));
        assert!(!acme.can_manage(None), "public deployments are the operator's");
        assert!(acme.can_invoke(None));
        assert!(!Caller::Anonymous.can_invoke(Some("acme")));
        assert!(Caller::Anonymous.can_invoke(None));
        assert!(Caller::Admin.can_manage(Some("acme")));
    }

    #[test]
    fn only_loopback_requests_naming_the_loopback_count_as_local() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let h = |pairs: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            m
        };
        assert!(is_local_request(lo, &h(&[("host", "127.0.0.1:7070")])));
        assert!(is_local_request(lo, &h(&[("host", "localhost:7070"), ("origin", "http://localhost:7070")])));
        assert!(is_local_request("::1".parse().unwrap(), &h(&[("host", "[::1]:7070")])));
        assert!(!is_local_request("10.0.0.2".parse().unwrap(), &h(&[("host", "127.0.0.1")])), "remote peer");
        assert!(!is_local_request(lo, &h(&[("host", "evil.example:7070")])), "DNS rebinding");
        assert!(!is_local_request(lo, &h(&[("host", "127.0.0.1"), ("origin", "https://evil.example")])));
        assert!(!is_local_request(lo, &h(&[("host", "127.0.0.1"), ("origin", "null")])));
        assert!(!is_local_request(lo, &h(&[("host", "127.0.0.1"), ("sec-fetch-site", "cross-site")])));
    }
}
