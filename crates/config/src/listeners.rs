//! The `tls`, `ws` and `wss` listeners: addresses, paths, and the TLS material, loaded here so
//! that a bad certificate or key is a config error at start (and in `check-config`).

use std::net::SocketAddr;
use std::path::Path;

use crate::file::{ConfigFile, TlsListener, WsListener};
use crate::validate::Errors;
use crate::{TlsListenerSettings, WsListenerSettings};

fn bind(
    value: Option<&String>,
    default: u16,
    path: &str,
    errors: &mut Errors,
) -> Option<SocketAddr> {
    match value {
        None => Some(SocketAddr::from(([0, 0, 0, 0], default))),
        Some(text) => match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errors.add(
                    format!("{path}.bind"),
                    format!("not an address:port: {text:?}"),
                );
                None
            }
        },
    }
}

fn tls(
    section: &str,
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
    errors: &mut Errors,
) -> Option<std::sync::Arc<herald_server::tls::TlsConfig>> {
    match herald_server::tls::server_config(
        Path::new(cert),
        Path::new(key),
        client_ca.map(Path::new),
    ) {
        Ok(config) => Some(config),
        Err(e) => {
            errors.add(format!("{section}.{}", e.key), e.message);
            None
        }
    }
}

fn tls_listener(def: &TlsListener, errors: &mut Errors) -> Option<TlsListenerSettings> {
    let section = "listeners.tls";
    let bind = bind(def.bind.as_ref(), 8883, section, errors);
    let tls = tls(
        section,
        &def.cert,
        &def.key,
        def.client_ca.as_deref(),
        errors,
    );
    Some(TlsListenerSettings {
        bind: bind?,
        tls: tls?,
    })
}

fn ws_listener(def: &WsListener, secure: bool, errors: &mut Errors) -> Option<WsListenerSettings> {
    let section = if secure {
        "listeners.wss"
    } else {
        "listeners.ws"
    };
    let bind = bind(
        def.bind.as_ref(),
        if secure { 8084 } else { 8083 },
        section,
        errors,
    );
    if !def.path.starts_with('/') {
        errors.add(
            format!("{section}.path"),
            format!("must start with '/', got {:?}", def.path),
        );
    }
    let tls = match (secure, &def.cert, &def.key) {
        (true, Some(cert), Some(key)) => Some(tls(section, cert, key, None, errors)?),
        (true, _, _) => {
            errors.add(
                format!("{section}.cert"),
                "a wss listener needs cert and key",
            );
            return None;
        }
        (false, None, None) => None,
        (false, _, _) => {
            errors.add(
                format!("{section}.cert"),
                "cert and key belong to [listeners.wss]; ws is plain",
            );
            return None;
        }
    };
    Some(WsListenerSettings {
        bind: bind?,
        path: def.path.clone(),
        tls,
    })
}

/// Validates the TLS, WS and WSS listeners.
#[allow(clippy::type_complexity)]
pub fn secure_and_web(
    file: &ConfigFile,
    errors: &mut Errors,
) -> (
    Option<TlsListenerSettings>,
    Option<WsListenerSettings>,
    Option<WsListenerSettings>,
) {
    let Some(listeners) = &file.listeners else {
        return (None, None, None);
    };
    let tls = listeners.tls.as_ref().and_then(|d| tls_listener(d, errors));
    let ws = listeners
        .ws
        .as_ref()
        .and_then(|d| ws_listener(d, false, errors));
    let wss = listeners
        .wss
        .as_ref()
        .and_then(|d| ws_listener(d, true, errors));
    (tls, ws, wss)
}
