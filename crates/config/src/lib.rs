//! Herald's configuration file: TOML in, each crate's settings out.
//!
//! Parse (unknown keys are errors), apply defaults, then validate everything and report every
//! error with its key path at once. Nothing here panics or reads globals; secrets given as
//! `secret_env` are read from the environment passed in.

mod file;
mod listeners;
mod rules;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_auth::AuthSettings;
use herald_router::RouterSettings;
use herald_server::ServerSettings;
use herald_store::SyncMode;

pub use file::ConfigFile;

/// One problem in a config file, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `access_keys[0].secret`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every error found in one config, printed one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A plain-TCP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpListenerSettings {
    pub bind: SocketAddr,
}

/// A TLS listener.
#[derive(Debug, Clone)]
pub struct TlsListenerSettings {
    pub bind: SocketAddr,
    pub tls: std::sync::Arc<herald_server::tls::TlsConfig>,
}

/// A WebSocket listener (`tls` set for WSS).
#[derive(Debug, Clone)]
pub struct WsListenerSettings {
    pub bind: SocketAddr,
    pub path: String,
    pub tls: Option<std::sync::Arc<herald_server::tls::TlsConfig>>,
}

/// Where and how the node keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSettings {
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    /// The store's page cache, bytes (`storage.cache_mb`).
    pub cache_bytes: usize,
}

/// A validated configuration, split into the settings each crate takes.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub tcp: Option<TcpListenerSettings>,
    pub tls: Option<TlsListenerSettings>,
    pub ws: Option<WsListenerSettings>,
    pub wss: Option<WsListenerSettings>,
    pub auth: AuthSettings,
    pub router: RouterSettings,
    pub server: ServerSettings,
    pub storage: StorageSettings,
    /// Access keys still set to the shipped demo secret (a loud warning at start).
    pub demo_keys: Vec<String>,
    pub sinks: Vec<herald_rules::SinkSettings>,
    /// Where the admin HTTP API listens; `None` when switched off.
    pub admin_bind: Option<SocketAddr>,
    /// The shortest token lifetime the admin API accepts (`instance.min_token_ttl_secs`).
    pub min_token_ttl: Duration,
}

impl Config {
    /// Parses and validates TOML text. `env` looks up `secret_env` variables.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let file = file::parse(text)?;
        validate::validate(file, env)
    }

    /// Reads, parses and validates a config file, using the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::parse(&text, &|name| std::env::var(name).ok())
    }

    /// The built-in defaults used when no config file exists: a local, open broker for trying
    /// Herald out (TCP on 127.0.0.1:1883, anonymous clients, any client id), like Mosquitto's
    /// local-only mode. No admin API: there is no admin key to use it with.
    pub fn builtin() -> Config {
        let text = r#"
            [listeners.tcp]
            bind = "127.0.0.1:1883"
            [admin]
            enabled = false
            [instance]
            allow_anonymous = true
            client_id_format = "any"
        "#;
        match Config::parse(text, &|_| None) {
            Ok(config) => config,
            Err(e) => panic!("the built-in config is invalid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests;
