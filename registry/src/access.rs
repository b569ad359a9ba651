//! Who may do what: namespaces own models, users hold a role per namespace, and bearer tokens
//! (stored only as sha256 hashes) stand for a user, optionally confined to one namespace.
//!
//! A model name `team/model` lives in namespace `team`; a plain name lives in `default`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::RegistryError;
use crate::store::{Registry, now_ms};

/// The namespace of models named without one.
pub const DEFAULT_NAMESPACE: &str = "default";
const TOKEN_PREFIX: &str = "alk_";

/// Roles within a namespace; each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read models, versions, routes, experiments, events and metrics.
    Viewer,
    /// Also call inference and send feedback.
    Predictor,
    /// Also push versions, set aliases, routes, policies, rollouts and experiments.
    Publisher,
    /// Also manage members and tokens, and delete versions.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Predictor, Role::Publisher, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Predictor => "predictor",
            Role::Publisher => "publisher",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Role, RegistryError> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            RegistryError::InvalidAccess(format!("unknown role {s:?}: use viewer, predictor, publisher or admin"))
        })
    }
}

/// The namespace a model name belongs to.
pub fn namespace_of(model: &str) -> &str {
    model.split_once('/').map_or(DEFAULT_NAMESPACE, |(ns, _)| ns)
}

/// Namespace and user names: 1-64 lowercase letters, digits, '_' or '-', starting with a letter
/// or digit (they appear in model names and URLs).
pub fn validate_principal_name(what: &str, name: &str) -> Result<(), RegistryError> {
    let ok = (1..=64).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidAccess(format!(
            "invalid {what} name {name:?}: use 1-64 lowercase letters, digits, '_' or '-', starting with a letter or digit"
        )))
    }
}

/// A user as a request presents itself, resolved from a token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Principal {
    pub user: String,
    /// Server-wide owner: every role everywhere, and creates namespaces and users.
    pub owner: bool,
    /// Role per namespace.
    pub roles: BTreeMap<String, Role>,
    /// The namespace the token is confined to, if any.
    pub scope: Option<String>,
    pub token_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// The token this one derives from (see [`TokenRecord::parent`]).
    #[serde(skip)]
    pub parent: Option<String>,
}

impl Principal {
    /// The role this principal holds in `namespace` (an owner is admin everywhere; a scoped
    /// token holds nothing outside its scope).
    pub fn role_in(&self, namespace: &str) -> Option<Role> {
        if self.scope.as_deref().is_some_and(|s| s != namespace) {
            return None;
        }
        if self.owner { Some(Role::Admin) } else { self.roles.get(namespace).copied() }
    }

    /// Whether the principal acts as the server's owner (an owner's token not confined to a
    /// namespace).
    pub fn is_owner(&self) -> bool {
        self.owner && self.scope.is_none()
    }
}

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    Malformed,
    Unknown,
    Expired,
    Revoked,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Malformed => "malformed",
            TokenRefusal::Unknown => "unknown",
            TokenRefusal::Expired => "expired",
            TokenRefusal::Revoked => "revoked",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenRecord {
    pub id: String,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub description: String,
    pub created_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// The token this one was derived from (a console session): revoking that one revokes this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NamespaceRecord {
    pub name: String,
    pub created_at_ms: u64,
    /// User → role.
    pub members: BTreeMap<String, Role>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UserRecord {
    pub name: String,
    pub owner: bool,
    pub created_at_ms: u64,
}

/// What a new token's owner asked for.
#[derive(Clone, Debug, Default)]
pub struct TokenRequest {
    pub user: String,
    pub namespace: Option<String>,
    pub description: String,
    pub ttl_ms: Option<u64>,
    /// Ties the new token's life to this one's (see [`TokenRecord::parent`]).
    pub parent: Option<String>,
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Splits `alk_<id>_<secret>`.
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 64)).then_some((id, secret))
}

fn opt_u64(row: &sqlx::any::AnyRow, column: &str) -> Option<u64> {
    row.get::<Option<i64>, _>(column).map(|v| v as u64)
}

fn token_record(row: &sqlx::any::AnyRow) -> TokenRecord {
    TokenRecord {
        id: row.get("id"),
        user: row.get("user"),
        namespace: row.get("namespace"),
        description: row.get("description"),
        created_at_ms: row.get::<i64, _>("created_at_ms") as u64,
        expires_at_ms: opt_u64(row, "expires_at_ms"),
        revoked_at_ms: opt_u64(row, "revoked_at_ms"),
        parent: row.get("parent"),
    }
}

fn user_record(row: &sqlx::any::AnyRow) -> UserRecord {
    UserRecord {
        name: row.get("name"),
        owner: row.get::<i64, _>("owner") != 0,
        created_at_ms: row.get::<i64, _>("created_at_ms") as u64,
    }
}

impl Registry {
    pub async fn namespace_exists(&self, name: &str) -> Result<bool, RegistryError> {
        Ok(sqlx::query("SELECT 1 FROM namespaces WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    pub async fn create_namespace(&self, name: &str) -> Result<NamespaceRecord, RegistryError> {
        validate_principal_name("namespace", name)?;
        let now = now_ms();
        let done = sqlx::query("INSERT INTO namespaces (name, created_at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(now as i64)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::Conflict(format!("namespace {name:?} already exists")));
        }
        Ok(NamespaceRecord { name: name.into(), created_at_ms: now, members: BTreeMap::new() })
    }

    /// The members of one namespace and their roles.
    pub async fn members(&self, namespace: &str) -> Result<BTreeMap<String, Role>, RegistryError> {
        if !self.namespace_exists(namespace).await? {
            return Err(RegistryError::NamespaceNotFound(namespace.into()));
        }
        sqlx::query("SELECT \"user\", role FROM members WHERE namespace = $1")
            .bind(namespace)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.get("user"), r.get::<String, _>("role").parse()?)))
            .collect()
    }

    pub async fn namespaces(&self) -> Result<Vec<NamespaceRecord>, RegistryError> {
        let rows =
            sqlx::query("SELECT name, created_at_ms FROM namespaces ORDER BY name").fetch_all(&self.pool).await?;
        let members = sqlx::query("SELECT namespace, \"user\", role FROM members").fetch_all(&self.pool).await?;
        let mut out: Vec<NamespaceRecord> = rows
            .iter()
            .map(|r| NamespaceRecord {
                name: r.get("name"),
                created_at_ms: r.get::<i64, _>("created_at_ms") as u64,
                members: BTreeMap::new(),
            })
            .collect();
        for m in members {
            let ns: String = m.get("namespace");
            if let Some(rec) = out.iter_mut().find(|r| r.name == ns) {
                rec.members.insert(m.get("user"), m.get::<String, _>("role").parse()?);
            }
        }
        Ok(out)
    }

    /// Creates a user (or makes an existing one an owner when `owner`).
    pub async fn ensure_user(&self, name: &str, owner: bool) -> Result<UserRecord, RegistryError> {
        validate_principal_name("user", name)?;
        let row = sqlx::query(
            "INSERT INTO users (name, owner, created_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET owner = (users.owner OR excluded.owner) RETURNING name, CAST(owner AS INTEGER) AS owner, created_at_ms",
        )
        .bind(name)
        .bind(owner)
        .bind(now_ms() as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(user_record(&row))
    }

    pub async fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        let row = sqlx::query("SELECT name, CAST(owner AS INTEGER) AS owner, created_at_ms FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(user_record))
    }

    pub async fn owner_exists(&self) -> Result<bool, RegistryError> {
        Ok(sqlx::query("SELECT 1 FROM users WHERE owner").fetch_optional(&self.pool).await?.is_some())
    }

    /// Gives `user` (created if new) `role` in `namespace`.
    pub async fn set_member(&self, namespace: &str, user: &str, role: Role) -> Result<(), RegistryError> {
        if !self.namespace_exists(namespace).await? {
            return Err(RegistryError::NamespaceNotFound(namespace.into()));
        }
        self.ensure_user(user, false).await?;
        sqlx::query(
            "INSERT INTO members (namespace, \"user\", role) VALUES ($1, $2, $3) \
             ON CONFLICT (namespace, \"user\") DO UPDATE SET role = excluded.role",
        )
        .bind(namespace)
        .bind(user)
        .bind(role.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes `user` from `namespace`, and revokes the user's tokens confined to it.
    pub async fn remove_member(&self, namespace: &str, user: &str) -> Result<(), RegistryError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM members WHERE namespace = $1 AND \"user\" = $2")
            .bind(namespace)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::InvalidAccess(format!("{user:?} is not a member of namespace {namespace:?}")));
        }
        sqlx::query(
            "UPDATE tokens SET revoked_at_ms = $1 WHERE \"user\" = $2 AND namespace = $3 AND revoked_at_ms IS NULL",
        )
        .bind(now_ms() as i64)
        .bind(user)
        .bind(namespace)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates a token; the returned string is the only place its secret ever exists.
    pub async fn create_token(&self, req: &TokenRequest) -> Result<(String, TokenRecord), RegistryError> {
        if self.user(&req.user).await?.is_none() {
            return Err(RegistryError::UserNotFound(req.user.clone()));
        }
        if let Some(ns) = &req.namespace
            && !self.namespace_exists(ns).await?
        {
            return Err(RegistryError::NamespaceNotFound(ns.clone()));
        }
        let (id, secret) = (random_hex(6), random_hex(32));
        let now = now_ms();
        let record = TokenRecord {
            id: id.clone(),
            user: req.user.clone(),
            namespace: req.namespace.clone(),
            description: req.description.clone(),
            created_at_ms: now,
            expires_at_ms: req.ttl_ms.map(|t| now.saturating_add(t)),
            revoked_at_ms: None,
            parent: req.parent.clone(),
        };
        sqlx::query(
            "INSERT INTO tokens (id, \"user\", namespace, description, hash, created_at_ms, expires_at_ms, parent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(&record.user)
        .bind(&record.namespace)
        .bind(&record.description)
        .bind(digest(&secret))
        .bind(now as i64)
        .bind(record.expires_at_ms.map(|v| v as i64))
        .bind(&record.parent)
        .execute(&self.pool)
        .await?;
        Ok((format!("{TOKEN_PREFIX}{id}_{secret}"), record))
    }

    pub async fn token(&self, id: &str) -> Result<TokenRecord, RegistryError> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| RegistryError::TokenNotFound(id.into()))?;
        Ok(token_record(&row))
    }

    /// Tokens of `user` (any user when `None`), confined to `namespace` when given.
    pub async fn tokens(&self, user: Option<&str>, namespace: Option<&str>) -> Result<Vec<TokenRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT * FROM tokens WHERE (CAST($1 AS TEXT) IS NULL OR \"user\" = $1) \
             AND (CAST($2 AS TEXT) IS NULL OR namespace = $2) ORDER BY created_at_ms, id",
        )
        .bind(user)
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(token_record).collect())
    }

    /// Revokes the token and the tokens derived from it (its console sessions).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord, RegistryError> {
        sqlx::query("UPDATE tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $1) WHERE id = $2 OR parent = $2")
            .bind(now_ms() as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.token(id).await
    }

    /// Resolves a bearer token to its principal. The stored hash is compared in constant time.
    pub async fn authenticate(&self, token: &str) -> Result<Result<Principal, TokenRefusal>, RegistryError> {
        let Some((id, secret)) = parse_token(token) else { return Ok(Err(TokenRefusal::Malformed)) };
        let Some(row) = sqlx::query("SELECT * FROM tokens WHERE id = $1").bind(id).fetch_optional(&self.pool).await?
        else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let stored: Vec<u8> = row.get("hash");
        if !bool::from(stored.ct_eq(&digest(secret))) {
            return Ok(Err(TokenRefusal::Unknown));
        }
        let record = token_record(&row);
        if record.revoked_at_ms.is_some() {
            return Ok(Err(TokenRefusal::Revoked));
        }
        if record.expires_at_ms.is_some_and(|e| e <= now_ms()) {
            return Ok(Err(TokenRefusal::Expired));
        }
        let Some(user) = self.user(&record.user).await? else { return Ok(Err(TokenRefusal::Unknown)) };
        let roles = sqlx::query("SELECT namespace, role FROM members WHERE \"user\" = $1")
            .bind(&record.user)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.get("namespace"), r.get::<String, _>("role").parse()?)))
            .collect::<Result<_, RegistryError>>()?;
        Ok(Ok(Principal {
            user: user.name,
            owner: user.owner,
            roles,
            scope: record.namespace,
            token_id: record.id,
            expires_at_ms: record.expires_at_ms,
            parent: record.parent,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_scope() {
        assert!(Role::Viewer < Role::Predictor && Role::Predictor < Role::Publisher && Role::Publisher < Role::Admin);
        let mut p = Principal {
            user: "ann".into(),
            owner: false,
            roles: BTreeMap::from([("team".into(), Role::Publisher), ("other".into(), Role::Viewer)]),
            scope: None,
            token_id: "x".into(),
            expires_at_ms: None,
            parent: None,
        };
        assert_eq!(p.role_in("team"), Some(Role::Publisher));
        assert_eq!(p.role_in("nope"), None);
        p.scope = Some("team".into());
        assert_eq!(p.role_in("other"), None);
        p.owner = true;
        assert_eq!(p.role_in("team"), Some(Role::Admin));
        assert_eq!(p.role_in("other"), None);
        assert!(!p.is_owner());
        assert_eq!(namespace_of("team/fraud"), "team");
        assert_eq!(namespace_of("fraud"), DEFAULT_NAMESPACE);
    }

    #[test]
    fn token_format() {
        assert!(parse_token(&format!("alk_{}_{}", "a".repeat(12), "b".repeat(64))).is_some());
        for bad in ["", "alk_", "alk_abc_def", &format!("alk_{}_{}", "g".repeat(12), "b".repeat(64))] {
            assert!(parse_token(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn tokens_resolve_expire_and_revoke() {
        let dir = crate::testing::Scratch::new().await.unwrap();
        let reg = dir.open().await.unwrap();
        reg.create_namespace("team").await.unwrap();
        assert!(matches!(reg.create_namespace("team").await, Err(RegistryError::Conflict(_))));
        assert!(reg.create_namespace("Bad/Name").await.is_err());
        reg.set_member("team", "ann", Role::Predictor).await.unwrap();
        assert!(matches!(reg.set_member("nope", "ann", Role::Viewer).await, Err(RegistryError::NamespaceNotFound(_))));

        let req = TokenRequest { user: "ann".into(), ..Default::default() };
        let (token, record) = reg.create_token(&req).await.unwrap();
        let p = reg.authenticate(&token).await.unwrap().unwrap();
        assert_eq!(
            (p.user.as_str(), p.role_in("team"), p.token_id.as_str()),
            ("ann", Some(Role::Predictor), &*record.id)
        );

        // A wrong secret with a real id, an unknown id, garbage.
        let forged = format!("{}{}", &token[..token.len() - 1], if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(reg.authenticate(&forged).await.unwrap(), Err(TokenRefusal::Unknown));
        assert_eq!(reg.authenticate("Bearer nonsense").await.unwrap(), Err(TokenRefusal::Malformed));

        let (short, _) = reg.create_token(&TokenRequest { ttl_ms: Some(0), ..req.clone() }).await.unwrap();
        assert_eq!(reg.authenticate(&short).await.unwrap(), Err(TokenRefusal::Expired));

        // A derived token (a console session) dies with its parent, not the other way round.
        let (child, _) =
            reg.create_token(&TokenRequest { parent: Some(record.id.clone()), ..req.clone() }).await.unwrap();
        let (child2, child2_record) =
            reg.create_token(&TokenRequest { parent: Some(record.id.clone()), ..req.clone() }).await.unwrap();
        reg.revoke_token(&child2_record.id).await.unwrap();
        assert!(reg.authenticate(&token).await.unwrap().is_ok());
        assert_eq!(reg.authenticate(&child2).await.unwrap(), Err(TokenRefusal::Revoked));
        assert!(reg.authenticate(&child).await.unwrap().is_ok());
        reg.revoke_token(&record.id).await.unwrap();
        assert_eq!(reg.authenticate(&token).await.unwrap(), Err(TokenRefusal::Revoked));
        assert_eq!(reg.authenticate(&child).await.unwrap(), Err(TokenRefusal::Revoked));

        // Removing a member revokes the tokens confined to that namespace.
        let (scoped, _) =
            reg.create_token(&TokenRequest { namespace: Some("team".into()), ..req.clone() }).await.unwrap();
        assert!(reg.authenticate(&scoped).await.unwrap().is_ok());
        reg.remove_member("team", "ann").await.unwrap();
        assert_eq!(reg.authenticate(&scoped).await.unwrap(), Err(TokenRefusal::Revoked));

        // Only hashes are stored: the secret appears nowhere in the database (its files, on SQLite).
        let secret = token.rsplit('_').next().unwrap();
        let holds = |bytes: &[u8]| bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
        if reg.dialect() == crate::Dialect::Sqlite {
            for file in ["registry.db", "registry.db-wal"] {
                assert!(!holds(&std::fs::read(dir.dir.path().join(file)).unwrap_or_default()), "{file} holds a secret");
            }
        }
        for row in sqlx::query("SELECT id, \"user\", description, hash, parent FROM tokens")
            .fetch_all(&reg.pool)
            .await
            .unwrap()
        {
            let text = [0, 1, 2, 4].map(|i| row.get::<Option<String>, _>(i).unwrap_or_default()).join(" ");
            assert!(!holds(text.as_bytes()) && !holds(&row.get::<Vec<u8>, _>(3)), "a token row holds a secret");
        }
    }
}
