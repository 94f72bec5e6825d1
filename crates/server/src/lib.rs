//! Listeners and connection tasks. A connection task owns its socket and buffers and only moves
//! frames: it decodes packets, checks them against the client's permissions and the limits,
//! hands them to the router, and writes what the router sends back. It owns no broker state.

mod connection;
mod handshake;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use herald_auth::Authenticator;
use herald_router::{RouterHandle, Transport};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
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
        }
    }
}

/// What every connection task shares.
pub struct Context {
    pub settings: ServerSettings,
    pub auth: Authenticator,
    pub router: RouterHandle,
    connections: Arc<Semaphore>,
}

impl Context {
    pub fn new(
        settings: ServerSettings,
        auth: Authenticator,
        router: RouterHandle,
    ) -> Arc<Context> {
        let connections = Arc::new(Semaphore::new(settings.max_connections));
        Arc::new(Context {
            settings,
            auth,
            router,
            connections,
        })
    }
}

/// Accepts TCP connections until `shutdown` turns true, one task per connection.
pub async fn serve_tcp(
    listener: TcpListener,
    context: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    info!(addr = ?local, "MQTT TCP listener accepting");
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
        spawn_connection(stream, peer, Transport::Tcp, &context);
    }
    info!(addr = ?local, "MQTT TCP listener stopped");
}

fn spawn_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    transport: Transport,
    context: &Arc<Context>,
) {
    let Ok(permit) = context.connections.clone().try_acquire_owned() else {
        warn!(%peer, limit = "limits.max_connections", max = context.settings.max_connections, "connection refused: too many connections");
        return;
    };
    let _ = stream.set_nodelay(true);
    let context = context.clone();
    tokio::spawn(async move {
        connection::run(stream, peer, transport, context).await;
        drop(permit);
    });
}
