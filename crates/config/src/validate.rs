//! From the file as written to validated settings: every error collected, each with its path.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_auth::{AccessKey, AuthSettings, ClientIdFormat, Secret};
use herald_protocol::client_id::is_valid_group_id;
use herald_protocol::topic::validate_filter;
use herald_router::RouterSettings;
use herald_server::{AbuseSettings, DeniedPublish, ServerSettings};
use herald_store::SyncMode;

use crate::file::{self, ConfigFile};
use crate::{Config, ConfigError, ConfigErrors, StorageSettings, TcpListenerSettings};

/// With `storage.sync = "always"`, how often the router's timer flushes the store: every batch
/// is durable when it is applied, and the flush only hands the ops waiting in the write-ahead
/// log to a checkpoint (if none is running), so that a quiet broker holds none for long.
const ALWAYS_FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// The secrets shipped in `config/herald.toml`, which must never guard a real deployment.
pub const DEMO_SECRETS: [&str; 3] = ["demo-secret", "backend-secret", "admin-secret"];

#[derive(Default)]
pub(crate) struct Errors(Vec<ConfigError>);

impl Errors {
    pub(crate) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Checks `value` lies in `min..=max`; returns it as usize.
    pub(crate) fn range(&mut self, path: &str, value: u64, min: u64, max: u64) -> usize {
        if value < min || value > max {
            self.add(
                path,
                format!("must be between {min} and {max}, got {value}"),
            );
        }
        value.clamp(min, max) as usize
    }
}

/// `storage.cache_mb` in bytes: from 64 KiB (with a cache much smaller, checkpoints read back
/// most of the pages they touch) to 1 TiB.
fn cache_bytes(errors: &mut Errors, mb: f64) -> usize {
    const MIN_MB: f64 = 0.0625;
    const MAX_MB: f64 = (1u64 << 20) as f64;
    if (MIN_MB..=MAX_MB).contains(&mb) {
        (mb * crate::file::MIB).round() as usize
    } else {
        errors.add(
            "storage.cache_mb",
            format!("must be between {MIN_MB} and {MAX_MB} (MiB), got {mb}"),
        );
        herald_store::DEFAULT_CACHE_BYTES
    }
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

pub fn validate(
    file: ConfigFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();
    if !is_id(&file.node.id) {
        errors.add("node.id", "must be 1+ chars of [A-Za-z0-9_.-]");
    }
    if file.node.data_dir.is_empty() {
        errors.add("node.data_dir", "must not be empty");
    }
    let tcp = listeners(&file, &mut errors);
    let (tls, ws, wss) = crate::listeners::secure_and_web(&file, &mut errors);
    let limits = &file.limits;
    let max_topic_len = errors.range("limits.max_topic_len", limits.max_topic_len, 1, 65_535);
    let auth = auth(&file, max_topic_len, env, &mut errors);
    let max_inflight = errors.range("limits.max_inflight", limits.max_inflight, 1, 65_535);
    let router = RouterSettings {
        max_subscriptions: errors.range(
            "limits.max_subscriptions",
            limits.max_subscriptions,
            1,
            100_000,
        ),
        max_inflight,
        max_queued_messages: errors.range(
            "limits.max_queued_messages",
            limits.max_queued_messages,
            1,
            10_000_000,
        ),
        max_queue_age: Duration::from_secs(limits.max_queue_age_secs.max(1)),
        max_incoming_qos2: max_inflight,
        flush_interval: None,
        presence: Default::default(),
    };
    if limits.max_queue_age_secs == 0 {
        errors.add("limits.max_queue_age_secs", "must be at least 1");
    }
    let on_denied_publish = match limits.on_denied_publish.as_str() {
        "disconnect" => DeniedPublish::Disconnect,
        "ignore" => DeniedPublish::Ignore,
        other => {
            errors.add(
                "limits.on_denied_publish",
                format!("must be \"disconnect\" or \"ignore\", got {other:?}"),
            );
            DeniedPublish::Disconnect
        }
    };
    let server = ServerSettings {
        connect_timeout: Duration::from_secs(limits.connect_timeout_secs),
        max_connections: errors.range(
            "limits.max_connections",
            limits.max_connections,
            1,
            10_000_000,
        ),
        max_packet_size: errors.range(
            "limits.max_packet_size",
            limits.max_packet_size,
            64,
            268_435_455,
        ) as u32,
        max_topic_len,
        on_denied_publish,
        abuse: AbuseSettings {
            connect_rate_per_ip: errors.range(
                "limits.max_connect_rate_per_ip",
                limits.max_connect_rate_per_ip,
                0,
                1_000_000,
            ) as u32,
            auth_failures_per_ip: errors.range(
                "limits.max_auth_failures_per_ip",
                limits.max_auth_failures_per_ip,
                0,
                1_000_000,
            ) as u32,
            auth_ban: Duration::from_secs(errors.range(
                "limits.auth_ban_secs",
                limits.auth_ban_secs,
                1,
                86_400,
            ) as u64),
            messages_per_sec: errors.range(
                "limits.max_messages_per_sec",
                limits.max_messages_per_sec,
                0,
                10_000_000,
            ) as u32,
            bytes_per_sec: errors.range(
                "limits.max_bytes_per_sec",
                limits.max_bytes_per_sec,
                0,
                1 << 40,
            ) as u64,
        },
        park_idle: match errors.range("limits.park_idle_ms", limits.park_idle_ms, 0, 3_600_000) {
            0 => None,
            millis => Some(Duration::from_millis(millis as u64)),
        },
        write_timeout: Duration::from_secs(errors.range(
            "limits.write_timeout_secs",
            limits.write_timeout_secs,
            1,
            86_400,
        ) as u64),
        ..ServerSettings::default()
    };
    if limits.connect_timeout_secs == 0 {
        errors.add("limits.connect_timeout_secs", "must be at least 1");
    }
    let sync = match file.storage.sync.as_str() {
        "always" => SyncMode::Always,
        "interval" => {
            let millis =
                errors.range("storage.interval_ms", file.storage.interval_ms, 1, 60_000) as u64;
            SyncMode::Interval { millis }
        }
        other => {
            errors.add(
                "storage.sync",
                format!("must be \"always\" or \"interval\", got {other:?}"),
            );
            SyncMode::Always
        }
    };
    let router = RouterSettings {
        flush_interval: match sync {
            SyncMode::Interval { millis } => Some(Duration::from_millis(millis)),
            SyncMode::Always => Some(ALWAYS_FLUSH_INTERVAL),
        },
        ..router
    };
    let (presence, sinks) = crate::rules::validate(&file, &file.node.id, env, &mut errors);
    let router = RouterSettings { presence, ..router };
    let server = ServerSettings {
        report_connect_failed: router.presence.connect_failed,
        ..server
    };
    let admin_bind = if file.admin.enabled {
        match file.admin.bind.parse::<SocketAddr>() {
            Ok(bind) => Some(bind),
            Err(_) => {
                errors.add(
                    "admin.bind",
                    format!("not an address:port: {:?}", file.admin.bind),
                );
                None
            }
        }
    } else {
        None
    };
    let demo_keys = auth
        .access_keys
        .iter()
        .filter(|k| DEMO_SECRETS.contains(&k.secret.expose()))
        .map(|k| k.id.clone())
        .collect();
    let min_token_ttl_secs = errors.range(
        "instance.min_token_ttl_secs",
        file.instance.min_token_ttl_secs,
        1,
        60,
    );
    let cache_bytes = cache_bytes(&mut errors, file.storage.cache_mb);
    if !errors.0.is_empty() {
        return Err(ConfigErrors(errors.0));
    }
    Ok(Config {
        node_id: file.node.id,
        tcp,
        tls,
        ws,
        wss,
        auth,
        router,
        server,
        storage: StorageSettings {
            data_dir: PathBuf::from(file.node.data_dir),
            sync,
            cache_bytes,
        },
        demo_keys,
        sinks,
        admin_bind,
        min_token_ttl: Duration::from_secs(min_token_ttl_secs as u64),
    })
}

fn listeners(file: &ConfigFile, errors: &mut Errors) -> Option<TcpListenerSettings> {
    let Some(listeners) = &file.listeners else {
        return Some(TcpListenerSettings {
            bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
        });
    };
    let tcp = listeners.tcp.as_ref()?;
    match tcp.bind.parse::<SocketAddr>() {
        Ok(bind) => Some(TcpListenerSettings { bind }),
        Err(_) => {
            errors.add(
                "listeners.tcp.bind",
                format!("not an address:port: {:?}", tcp.bind),
            );
            None
        }
    }
}

fn auth(
    file: &ConfigFile,
    max_topic_len: usize,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> AuthSettings {
    let instance = &file.instance;
    if !is_id(&instance.id) {
        errors.add("instance.id", "must be 1+ chars of [A-Za-z0-9_.-]");
    }
    let client_id_format = match instance.client_id_format.as_str() {
        "alibaba" => ClientIdFormat::Alibaba,
        "any" => ClientIdFormat::Any,
        other => {
            errors.add(
                "instance.client_id_format",
                format!("must be \"alibaba\" or \"any\", got {other:?}"),
            );
            ClientIdFormat::Alibaba
        }
    };
    let mut seen = HashSet::new();
    let mut access_keys = Vec::new();
    for (i, key) in file.access_keys.iter().enumerate() {
        if let Some(key) = access_key(i, key, max_topic_len, env, errors) {
            if !seen.insert(key.id.clone()) {
                errors.add(
                    format!("access_keys[{i}].id"),
                    format!("duplicate access key {:?}", key.id),
                );
            }
            access_keys.push(key);
        }
    }
    let mut groups = Vec::new();
    for (i, group) in file.groups.iter().enumerate() {
        if !is_valid_group_id(&group.id) {
            errors.add(
                format!("groups[{i}].id"),
                "must be 7-64 chars of [A-Za-z0-9_-]",
            );
        } else if groups.contains(&group.id) {
            errors.add(
                format!("groups[{i}].id"),
                format!("duplicate group {:?}", group.id),
            );
        }
        groups.push(group.id.clone());
    }
    let mut parent_topics = Vec::new();
    for (i, topic) in file.topics.iter().enumerate() {
        let p = &topic.parent;
        if p.is_empty()
            || p.contains(['/', '+', '#', '\0'])
            || p.starts_with('$')
            || p.len() > max_topic_len
        {
            errors.add(
                format!("topics[{i}].parent"),
                "must be one topic level: no '/', '+', '#', leading '$'",
            );
        } else if parent_topics.contains(p) {
            errors.add(
                format!("topics[{i}].parent"),
                format!("duplicate parent topic {p:?}"),
            );
        }
        parent_topics.push(p.clone());
    }
    AuthSettings {
        instance_id: instance.id.clone(),
        allow_anonymous: instance.allow_anonymous,
        client_id_format,
        legacy_signature: instance.legacy_signature,
        access_keys,
        groups,
        parent_topics,
        max_client_id_len: errors.range(
            "limits.max_client_id_len",
            file.limits.max_client_id_len,
            1,
            65_535,
        ),
    }
}

fn access_key(
    i: usize,
    key: &file::AccessKey,
    max_topic_len: usize,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> Option<AccessKey> {
    let path = format!("access_keys[{i}]");
    if !is_id(&key.id) {
        errors.add(format!("{path}.id"), "must be 1+ chars of [A-Za-z0-9_.-]");
    }
    let secret = secret(&path, &key.secret, &key.secret_env, env, errors);
    if key.secret.is_none() && key.secret_env.is_none() {
        errors.add(
            format!("{path}.secret"),
            "missing: give secret or secret_env",
        );
    }
    for (list, filters) in [("publish", &key.publish), ("subscribe", &key.subscribe)] {
        for (j, filter) in filters.iter().enumerate() {
            if let Err(e) = validate_filter(filter, max_topic_len) {
                errors.add(
                    format!("{path}.{list}[{j}]"),
                    format!("invalid topic filter {filter:?}: {e}"),
                );
            }
        }
    }
    Some(AccessKey {
        id: key.id.clone(),
        secret: Secret::new(secret?),
        publish: key.publish.clone(),
        subscribe: key.subscribe.clone(),
        admin: key.admin,
    })
}

/// A secret given inline (`secret`) or by environment variable (`secret_env`) under `path`;
/// `None` when it is given neither way (the caller decides whether that is an error).
pub(crate) fn secret(
    path: &str,
    inline: &Option<String>,
    variable: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> Option<String> {
    match (inline, variable) {
        (Some(value), None) if value.is_empty() => {
            errors.add(format!("{path}.secret"), "must not be empty");
            None
        }
        (Some(value), None) => Some(value.clone()),
        (None, Some(var)) => match env(var) {
            Some(value) if !value.is_empty() => Some(value),
            _ => {
                errors.add(
                    format!("{path}.secret_env"),
                    format!("environment variable {var} is not set or empty"),
                );
                None
            }
        },
        (Some(_), Some(_)) => {
            errors.add(
                format!("{path}.secret"),
                "give either secret or secret_env, not both",
            );
            None
        }
        (None, None) => None,
    }
}
