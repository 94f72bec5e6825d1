//! Listeners and connection tasks. A connection task owns its socket and buffers and only moves
//! frames: it decodes packets, checks them against the client's permissions and the limits,
//! hands them to the router, and writes what the router sends back. It owns no broker state.

mod connection;
pub mod guard;
mod handshake;
mod park;
pub mod tls;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use herald_auth::Authenticator;
use herald_router::{RouterHandle, Transport};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
pub use tokio_rustls::TlsAcceptor;

pub use guard::{AbuseSettings, Guard, Refused, ServerStats};
use tracing::{info, warn};

/// What to do with a PUBLISH the client's permissions do not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeniedPublish {
    /// Close the connection (the default).
    Disconnect,
    /// Drop the message, acknowledging it at QoS 1 and 2 so the client does not resend it.
    Ignore,
}

/// The limits a connection task enforces.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How long a new socket has to send its CONNECT.
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Largest remaining length of an inbound packet.
    pub max_packet_size: u32,
    pub max_topic_len: usize,
    pub on_denied_publish: DeniedPublish,
    /// Packets the router may queue for one connection before it counts as a slow reader.
    pub outbox_capacity: usize,
    pub abuse: AbuseSettings,
    /// Tell the router of CONNECTs refused for their credentials (`[presence] connect_failed`).
    pub report_connect_failed: bool,
    /// How long a plain TCP connection stays idle before it parks (gives up its task until
    /// its socket, its outbox or its keepalive deadline wakes it); `None`: never.
    pub park_idle: Option<Duration>,
    /// How long a write may wait without the client taking a byte before the connection is
    /// closed as a slow consumer.
    pub write_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            connect_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_packet_size: 64 * 1024,
            max_topic_len: 128,
            on_denied_publish: DeniedPublish::Disconnect,
            outbox_capacity: 1024,
            abuse: AbuseSettings::default(),
            report_connect_failed: false,
            park_idle: Some(Duration::from_millis(100)),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// What every connection task shares.
pub struct Context {
    pub settings: ServerSettings,
    pub auth: Authenticator,
    pub router: RouterHandle,
    connections: Arc<Semaphore>,
    pub guard: Guard,
    pub stats: Arc<ServerStats>,
    parker: park::Parker,
}

impl Context {
    pub fn new(
        settings: ServerSettings,
        auth: Authenticator,
        router: RouterHandle,
    ) -> Arc<Context> {
        let connections = Arc::new(Semaphore::new(settings.max_connections));
        let guard = Guard::new(settings.abuse.clone());
        let stats: Arc<ServerStats> = Arc::default();
        let parker = park::Parker::new(stats.clone(), auth.registry().clone());
        Arc::new(Context {
            settings,
            auth,
            router,
            connections,
            guard,
            parker,
            stats,
        })
    }
}

/// What a listener speaks on top of TCP, with what its handshake needs.
#[derive(Clone)]
pub enum Endpoint {
    Tcp,
    Tls(TlsAcceptor),
    Ws { path: Arc<str> },
    Wss { tls: TlsAcceptor, path: Arc<str> },
}

impl Endpoint {
    pub fn transport(&self) -> Transport {
        match self {
            Endpoint::Tcp => Transport::Tcp,
            Endpoint::Tls(_) => Transport::Tls,
            Endpoint::Ws { .. } => Transport::Ws,
            Endpoint::Wss { .. } => Transport::Wss,
        }
    }
}

/// Accepts TCP connections until `shutdown` turns true, one task per connection.
pub async fn serve_tcp(
    listener: TcpListener,
    context: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) {
    serve(listener, Endpoint::Tcp, context, shutdown).await
}

/// Accepts connections of one endpoint until `shutdown` turns true, one task per connection.
pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    context: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    let transport = endpoint.transport().as_str();
    let nodelay_inherited = set_listener_nodelay(&listener);
    info!(addr = ?local, transport, "MQTT listener accepting");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Running out of file descriptors must not spin the loop.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !nodelay_inherited {
            let _ = stream.set_nodelay(true);
        }
        spawn_connection(stream, peer, &endpoint, &context);
    }
    info!(addr = ?local, transport, "MQTT listener stopped");
}

/// Sets `TCP_NODELAY` on the listening socket. `true` where the sockets it accepts inherit it
/// (Linux: an accepted socket starts as a copy of the listener's), which saves one
/// `setsockopt` per connection; elsewhere each accepted socket is set on its own.
fn set_listener_nodelay(listener: &TcpListener) -> bool {
    let set = socket2::SockRef::from(listener).set_tcp_nodelay(true);
    if let Err(e) = &set {
        warn!(error = %e, "TCP_NODELAY on the listening socket failed; set per connection");
    }
    set.is_ok() && cfg!(any(target_os = "linux", target_os = "android"))
}

fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    endpoint: &Endpoint,
    context: &Arc<Context>,
) {
    if let Err(refused) = context.guard.admit(peer.ip()) {
        let (counter, limit) = match refused {
            Refused::ConnectRate => (
                &context.stats.refused_connect_rate,
                "limits.max_connect_rate_per_ip",
            ),
            Refused::Banned => (&context.stats.refused_banned, "limits.auth_ban_secs"),
        };
        ServerStats::add(counter);
        warn!(%peer, limit, "connection refused: {refused:?}");
        return;
    }
    let Ok(permit) = context.connections.clone().try_acquire_owned() else {
        ServerStats::add(&context.stats.refused_max_connections);
        warn!(%peer, limit = "limits.max_connections", max = context.settings.max_connections, "connection refused: too many connections");
        return;
    };
    let context = context.clone();
    if let Endpoint::Tcp = endpoint {
        // The most common case gets a task of exactly its own size: an idle connection costs
        // its future, not the largest of all transports' handshakes.
        tokio::spawn(connection::run(
            stream,
            peer,
            Transport::Tcp,
            context,
            permit,
        ));
        return;
    }
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let deadline = context.settings.connect_timeout;
        let transport = endpoint.transport();
        let stats = context.stats.clone();
        // The transport handshakes count against the CONNECT deadline too.
        let failed = match endpoint {
            // Never taken: plain TCP is spawned on its own above, in a task of its own size.
            Endpoint::Tcp => {
                Box::pin(connection::run(stream, peer, transport, context, permit)).await;
                None
            }
            Endpoint::Tls(tls) => match tokio::time::timeout(deadline, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    Box::pin(connection::run(stream, peer, transport, context, permit)).await;
                    None
                }
                Ok(Err(e)) => Some(format!("TLS handshake failed: {e}")),
                Err(_) => Some("TLS handshake not done before the CONNECT deadline".to_string()),
            },
            Endpoint::Ws { path } => {
                match tokio::time::timeout(deadline, ws::accept(stream, &path)).await {
                    Ok(Ok(stream)) => {
                        Box::pin(connection::run(stream, peer, transport, context, permit)).await;
                        None
                    }
                    Ok(Err(e)) => Some(format!("WebSocket upgrade failed: {e}")),
                    Err(_) => {
                        Some("WebSocket upgrade not done before the CONNECT deadline".to_string())
                    }
                }
            }
            Endpoint::Wss { tls, path } => {
                let upgrade = async {
                    let stream = tls
                        .accept(stream)
                        .await
                        .map_err(|e| format!("TLS handshake failed: {e}"))?;
                    ws::accept(stream, &path)
                        .await
                        .map_err(|e| format!("WebSocket upgrade failed: {e}"))
                };
                match tokio::time::timeout(deadline, upgrade).await {
                    Ok(Ok(stream)) => {
                        Box::pin(connection::run(stream, peer, transport, context, permit)).await;
                        None
                    }
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some(
                        "TLS and WebSocket handshakes not done before the CONNECT deadline"
                            .to_string(),
                    ),
                }
            }
        };
        if let Some(why) = failed {
            ServerStats::add(&stats.handshake_failures);
            warn!(%peer, transport = transport.as_str(), why, "connection refused");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_without_a_call_each() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let inherited = set_listener_nodelay(&listener);
        assert_eq!(
            inherited,
            cfg!(any(target_os = "linux", target_os = "android"))
        );
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        if inherited {
            assert!(
                accepted.nodelay().expect("getsockopt"),
                "inherited from the listener"
            );
        }
    }
}
