//! Who may connect, and what they may publish and subscribe to.
//!
//! [`Authenticator::authenticate`] turns the credentials of a CONNECT into a [`Principal`] or
//! a [`Refusal`] that maps to one CONNACK code. [`Principal`] answers permission questions for
//! the rest of the connection. Tokens and device credentials issued at run time live in the
//! shared [`AuthRegistry`]. No I/O; the only clock read is the wall time `authenticate` checks
//! token expiry against (`authenticate_at` takes it as an argument, for tests).

mod policy;
mod registry;
mod signature;

pub use policy::{
    DeviceGrant, HeldToken, Permissions, Principal, UPLOAD_TOKEN_TOPIC, is_broker_topic,
};
pub use registry::{Actions, AuthRegistry, DeviceCredential, TokenGrant};
pub use signature::{sign, verify_signature};

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use herald_protocol::{ClientId, ClientIdError, ConnectReturnCode};

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<REDACTED>")
    }
}

/// An access key declared in config (DESIGN.md 3.4).
#[derive(Debug, Clone)]
pub struct AccessKey {
    pub id: String,
    pub secret: Secret,
    /// Topic filters this key may publish to.
    pub publish: Vec<String>,
    /// Topic filters this key may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether the key may use the admin API.
    pub admin: bool,
}

/// How client ids are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdFormat {
    /// `GroupID@@@DeviceID` with a declared group.
    Alibaba,
    /// Any non-empty id (plain MQTT clients, test suites).
    Any,
}

/// Everything the authenticator needs, built by the config crate.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub instance_id: String,
    pub allow_anonymous: bool,
    pub client_id_format: ClientIdFormat,
    /// The legacy Signature form: bare AccessKeyId as user name, the GroupID signed.
    pub legacy_signature: bool,
    pub access_keys: Vec<AccessKey>,
    pub groups: Vec<String>,
    /// Declared parent topics; empty means any first level is allowed.
    pub parent_topics: Vec<String>,
    pub max_client_id_len: usize,
}

/// The most tokens one password may carry.
const MAX_TOKENS_PER_PASSWORD: usize = 8;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Why a CONNECT is refused. Each maps to exactly one CONNACK code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("client id rejected: {0}")]
    ClientId(#[from] ClientIdError),
    #[error("client id rejected: group {0:?} is not declared")]
    UnknownGroup(String),
    #[error("bad user name or password: {0}")]
    BadCredentials(&'static str),
    #[error("not authorized: {0}")]
    NotAuthorized(&'static str),
}

impl Refusal {
    /// The one place where an authentication failure becomes a CONNACK code.
    pub fn return_code(&self) -> ConnectReturnCode {
        match self {
            Refusal::ClientId(_) | Refusal::UnknownGroup(_) => {
                ConnectReturnCode::IdentifierRejected
            }
            Refusal::BadCredentials(_) => ConnectReturnCode::BadUsernameOrPassword,
            Refusal::NotAuthorized(_) => ConnectReturnCode::NotAuthorized,
        }
    }
}

/// Checks client ids and credentials against the configured instance, keys and groups.
#[derive(Debug)]
pub struct Authenticator {
    settings: AuthSettings,
    keys: HashMap<String, Arc<AccessKey>>,
    /// One thin pointer in every principal (a slice's `Arc` would be two).
    parents: Arc<Vec<String>>,
    registry: Arc<AuthRegistry>,
}

/// The user name modes of DESIGN.md 3.
enum Username<'a> {
    Signature { key: &'a str, instance: &'a str },
    Token { key: &'a str, instance: &'a str },
    DeviceCredential { key: &'a str, instance: &'a str },
    Legacy { key: &'a str },
    Other,
}

fn parse_username(username: &str) -> Username<'_> {
    let mut parts = username.split('|');
    let mode = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    match (mode, rest.as_slice()) {
        ("Signature", [key, instance]) => Username::Signature { key, instance },
        ("Token", [key, instance]) => Username::Token { key, instance },
        ("DeviceCredential", [key, instance]) => Username::DeviceCredential { key, instance },
        (key, []) => Username::Legacy { key },
        _ => Username::Other,
    }
}

impl Authenticator {
    /// An authenticator with an empty registry of its own.
    pub fn new(settings: AuthSettings) -> Authenticator {
        Authenticator::with_registry(settings, Arc::new(AuthRegistry::new()))
    }

    /// An authenticator that reads tokens and device credentials from `registry`.
    pub fn with_registry(settings: AuthSettings, registry: Arc<AuthRegistry>) -> Authenticator {
        let keys = settings
            .access_keys
            .iter()
            .map(|k| (k.id.clone(), Arc::new(k.clone())))
            .collect();
        let parents = Arc::new(settings.parent_topics.clone());
        Authenticator {
            settings,
            keys,
            parents,
            registry,
        }
    }

    /// The tokens and device credentials.
    pub fn registry(&self) -> &Arc<AuthRegistry> {
        &self.registry
    }

    /// The access key with this id, if declared.
    pub fn access_key(&self, id: &str) -> Option<&Arc<AccessKey>> {
        self.keys.get(id)
    }

    /// Whether a CONNECT with an empty client id (and clean session) gets an id assigned, as
    /// MQTT 3.1.1 allows; only with `client_id_format = "any"`.
    pub fn assigns_client_ids(&self) -> bool {
        self.settings.client_id_format == ClientIdFormat::Any
    }

    /// Checks a client id's form and group (CONNACK 2 on refusal).
    pub fn check_client_id(&self, client_id: &str) -> Result<ClientId, Refusal> {
        let max = self.settings.max_client_id_len;
        let id = match self.settings.client_id_format {
            ClientIdFormat::Alibaba => {
                let id = ClientId::parse_alibaba(client_id, max)?;
                let group = id.group().unwrap_or_default();
                if !self.settings.groups.iter().any(|g| g == group) {
                    return Err(Refusal::UnknownGroup(group.to_string()));
                }
                id
            }
            ClientIdFormat::Any => ClientId::parse_any(client_id, max)?,
        };
        Ok(id)
    }

    /// Checks the credentials of a CONNECT whose client id has been checked already.
    pub fn authenticate(
        &self,
        client_id: &ClientId,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        self.authenticate_at(client_id, username, password, now_ms())
    }

    /// [`Authenticator::authenticate`] with the time tokens are checked against.
    pub fn authenticate_at(
        &self,
        client_id: &ClientId,
        username: Option<&str>,
        password: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Principal, Refusal> {
        let Some(username) = username else {
            return self.anonymous(client_id, "no user name and anonymous access is off");
        };
        match parse_username(username) {
            Username::Signature { key, instance } => {
                if instance != self.settings.instance_id {
                    return Err(Refusal::NotAuthorized("unknown instance id"));
                }
                let key = self.known_key(key)?;
                self.check_signature(&key, client_id.as_str(), password)?;
                Ok(self.principal(client_id, Permissions::Key(key)))
            }
            Username::Legacy { key }
                if self.settings.legacy_signature && self.keys.contains_key(key) =>
            {
                let key = self.known_key(key)?;
                let group = client_id.group().unwrap_or(client_id.as_str());
                self.check_signature(&key, group, password)?;
                Ok(self.principal(client_id, Permissions::Key(key)))
            }
            Username::Token { key, instance } => {
                self.check_instance_and_key(key, instance)?;
                let held = self.check_tokens(password, now_ms)?;
                Ok(self.principal(client_id, Permissions::Tokens(held)))
            }
            Username::DeviceCredential { key, instance } => {
                if instance != self.settings.instance_id {
                    return Err(Refusal::NotAuthorized("unknown instance id"));
                }
                let credential = self
                    .registry
                    .credential_of_key(key)
                    .ok_or(Refusal::NotAuthorized("unknown device access key"))?;
                if credential.client_id != client_id.as_str() {
                    return Err(Refusal::NotAuthorized(
                        "the device credential is bound to another client id",
                    ));
                }
                let password = password.ok_or(Refusal::BadCredentials("no password"))?;
                if !verify_signature(credential.secret.expose(), client_id.as_str(), password) {
                    return Err(Refusal::BadCredentials("wrong signature"));
                }
                let permissions = Permissions::Device(Box::new(DeviceGrant {
                    key_id: credential.key_id.clone(),
                    secret: credential.secret.clone(),
                }));
                Ok(self.principal(client_id, permissions))
            }
            Username::Legacy { .. } | Username::Other => self.anonymous_or(
                client_id,
                Refusal::BadCredentials("user name names no auth mode"),
            ),
        }
    }

    fn check_instance_and_key(&self, key: &str, instance: &str) -> Result<(), Refusal> {
        if instance != self.settings.instance_id {
            return Err(Refusal::NotAuthorized("unknown instance id"));
        }
        self.known_key(key).map(|_| ())
    }

    /// Checks a token-mode password: `<type>|<token>` pairs joined by `|`, every token valid.
    fn check_tokens(
        &self,
        password: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Vec<HeldToken>, Refusal> {
        let password = password.ok_or(Refusal::BadCredentials("no password"))?;
        let password = std::str::from_utf8(password)
            .map_err(|_| Refusal::BadCredentials("token password is not UTF-8"))?;
        let parts: Vec<&str> = password.split('|').collect();
        if !parts.len().is_multiple_of(2) || parts.len() > 2 * MAX_TOKENS_PER_PASSWORD {
            return Err(Refusal::BadCredentials(
                "token password is not <type>|<token> pairs (at most 8)",
            ));
        }
        parts
            .chunks(2)
            .map(|pair| self.check_token(pair[0], pair[1], now_ms))
            .collect()
    }

    /// Checks one token presented as `kind` (`R`, `W`, `RW`) at `now_ms`.
    pub fn check_token(&self, kind: &str, token: &str, now_ms: u64) -> Result<HeldToken, Refusal> {
        let used_as = Actions::parse_type(kind)
            .ok_or(Refusal::BadCredentials("token type is not R, W or RW"))?;
        let grant = self
            .registry
            .token(token)
            .ok_or(Refusal::BadCredentials("unknown or revoked token"))?;
        if !grant.valid_at(now_ms) {
            return Err(Refusal::BadCredentials("expired token"));
        }
        if !used_as.within(grant.actions) {
            return Err(Refusal::BadCredentials(
                "token type asks for more than the token grants",
            ));
        }
        Ok(HeldToken {
            token: Secret::new(token),
            used_as,
            grant,
        })
    }

    /// Handles a PUBLISH of a token-mode client to `$SYS/uploadToken`: a JSON
    /// `{"token": "...", "type": "R|W|RW"}` whose token, if valid, is added to the client's.
    pub fn upload_token(
        &self,
        principal: &mut Principal,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<(), Refusal> {
        #[derive(serde::Deserialize)]
        struct Upload {
            token: String,
            #[serde(rename = "type")]
            kind: String,
        }
        if !principal.is_token_mode() {
            return Err(Refusal::NotAuthorized(
                "only token-mode clients upload tokens",
            ));
        }
        let upload: Upload = serde_json::from_slice(payload).map_err(|_| {
            Refusal::BadCredentials("uploadToken payload is not {\"token\", \"type\"} JSON")
        })?;
        let held = self.check_token(&upload.kind, &upload.token, now_ms)?;
        principal.add_token(held);
        Ok(())
    }

    fn known_key(&self, id: &str) -> Result<Arc<AccessKey>, Refusal> {
        self.keys
            .get(id)
            .cloned()
            .ok_or(Refusal::NotAuthorized("unknown access key"))
    }

    fn check_signature(
        &self,
        key: &AccessKey,
        signed: &str,
        password: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let password = password.ok_or(Refusal::BadCredentials("no password"))?;
        if verify_signature(key.secret.expose(), signed, password) {
            Ok(())
        } else {
            Err(Refusal::BadCredentials("wrong signature"))
        }
    }

    /// Plain MQTT clients with credentials Herald does not know are let in as anonymous when
    /// that is allowed; otherwise they get `refusal`.
    fn anonymous_or(&self, client_id: &ClientId, refusal: Refusal) -> Result<Principal, Refusal> {
        if self.settings.allow_anonymous {
            Ok(self.principal(client_id, Permissions::Anonymous))
        } else {
            Err(refusal)
        }
    }

    fn anonymous(&self, client_id: &ClientId, why: &'static str) -> Result<Principal, Refusal> {
        self.anonymous_or(client_id, Refusal::NotAuthorized(why))
    }

    fn principal(&self, client_id: &ClientId, permissions: Permissions) -> Principal {
        Principal::new(client_id.clone(), permissions, self.parents.clone())
    }
}

#[cfg(test)]
mod tests;
