//! The config file as written: serde structs mirroring the TOML, with defaults. Unknown keys
//! are errors.

use serde::Deserialize;

use crate::{ConfigError, ConfigErrors};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub node: Node,
    pub listeners: Option<Listeners>,
    #[serde(default)]
    pub instance: Instance,
    #[serde(default)]
    pub access_keys: Vec<AccessKey>,
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub topics: Vec<ParentTopic>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub presence: Presence,
    #[serde(default)]
    pub sinks: Vec<SinkDef>,
    #[serde(default)]
    pub rules: Vec<RuleDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub enabled: bool,
    pub bind: String,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            enabled: true,
            bind: "127.0.0.1:8080".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    pub history_per_client: u64,
    pub snapshot_topic: bool,
    pub connect_failed: bool,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            history_per_client: 100,
            snapshot_topic: true,
            connect_failed: false,
        }
    }
}

/// One `[[sinks]]` entry: common keys plus the keys of its type (checked in validation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkDef {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub topic: Option<String>,
    pub qos: Option<u8>,
    pub url: Option<String>,
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    pub timeout_ms: Option<u64>,
    pub path: Option<String>,
    pub stream: Option<String>,
    pub maxlen: Option<u64>,
    pub outbox_max: Option<u64>,
    pub outbox_max_age_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub source: RuleSource,
    pub sinks: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSource {
    pub groups: Option<Vec<String>>,
    pub events: Option<Vec<String>>,
    pub topics: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Node {
    pub id: String,
    pub data_dir: String,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            id: "herald-1".into(),
            data_dir: "data".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub tls: Option<TlsListener>,
    pub ws: Option<WsListener>,
    pub wss: Option<WsListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    pub bind: Option<String>,
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
}

/// `ws` and `wss`; `cert` and `key` are for `wss` only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsListener {
    pub bind: Option<String>,
    #[serde(default = "default_ws_path")]
    pub path: String,
    pub cert: Option<String>,
    pub key: Option<String>,
}

fn default_ws_path() -> String {
    "/mqtt".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListener {
    #[serde(default = "default_tcp_bind")]
    pub bind: String,
}

fn default_tcp_bind() -> String {
    "0.0.0.0:1883".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Instance {
    pub id: String,
    pub allow_anonymous: bool,
    /// "alibaba" or "any".
    pub client_id_format: String,
    pub legacy_signature: bool,
    /// The shortest lifetime `POST /api/v1/tokens` accepts (DESIGN.md 3.2 says 60 s; tests
    /// lower it to see expiry quickly).
    pub min_token_ttl_secs: u64,
}

impl Default for Instance {
    fn default() -> Self {
        Instance {
            id: "herald".into(),
            allow_anonymous: false,
            client_id_format: "alibaba".into(),
            legacy_signature: false,
            min_token_ttl_secs: 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKey {
    pub id: String,
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentTopic {
    pub parent: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_client_id_len: u64,
    pub max_topic_len: u64,
    pub max_subscriptions: u64,
    pub max_packet_size: u64,
    pub max_inflight: u64,
    pub max_queued_messages: u64,
    pub max_queue_age_secs: u64,
    pub connect_timeout_secs: u64,
    pub max_connections: u64,
    /// "disconnect" or "ignore".
    pub on_denied_publish: String,
    /// New connections per second from one address (0: no limit).
    pub max_connect_rate_per_ip: u64,
    /// Failed logins per minute from one address before it is banned (0: never banned).
    pub max_auth_failures_per_ip: u64,
    pub auth_ban_secs: u64,
    /// PUBLISH packets per second per connection (0: no limit).
    pub max_messages_per_sec: u64,
    /// PUBLISH bytes per second per connection (0: no limit).
    pub max_bytes_per_sec: u64,
    /// Milliseconds without traffic after which a plain TCP connection parks (0: never).
    pub park_idle_ms: u64,
    /// Seconds a write to a client may wait without the client taking a byte.
    pub write_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_id_len: 64,
            max_topic_len: 128,
            max_subscriptions: 30,
            max_packet_size: 64 * 1024,
            max_inflight: 64,
            max_queued_messages: 10_000,
            max_queue_age_secs: 3 * 24 * 3600,
            connect_timeout_secs: 10,
            max_connections: 100_000,
            on_denied_publish: "disconnect".into(),
            max_connect_rate_per_ip: 0,
            max_auth_failures_per_ip: 20,
            auth_ban_secs: 60,
            max_messages_per_sec: 0,
            max_bytes_per_sec: 0,
            park_idle_ms: 100,
            write_timeout_secs: 30,
        }
    }
}

/// Bytes in a MiB, for `storage.cache_mb`.
pub(crate) const MIB: f64 = (1u64 << 20) as f64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// "always" or "interval".
    pub sync: String,
    pub interval_ms: u64,
    /// redb's page cache, MiB: an integer or a decimal (0.5 is 512 KiB).
    pub cache_mb: f64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            sync: "always".into(),
            interval_ms: 100,
            cache_mb: herald_store::DEFAULT_CACHE_BYTES as f64 / MIB,
        }
    }
}

/// Parses TOML into the file structs; a syntax or type error comes back with its key path.
pub fn parse(text: &str) -> Result<ConfigFile, ConfigErrors> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("TOML syntax: {}", e.message()),
        }])
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().message().to_string();
        ConfigErrors(vec![ConfigError {
            path: if path == "." { String::new() } else { path },
            message,
        }])
    })
}
