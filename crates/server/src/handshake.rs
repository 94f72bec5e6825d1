//! The CONNECT handshake: the first packet within the deadline, the client id, credentials and
//! the will, each refusal answered with its CONNACK code and one log line.

use std::net::SocketAddr;

use herald_auth::{Principal, Refusal};
use herald_protocol::{ClientIdError, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet};
use herald_router::{ChannelId, ConnectRequest, FailedConnect, Input, Outbox, Transport};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::Context;
use crate::connection::{Framed, ReadError};
use crate::guard::ServerStats;

pub(crate) struct Accepted {
    pub connect: Connect,
    pub principal: Principal,
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S>,
    context: &Context,
    peer: SocketAddr,
    client_id: &str,
    code: ConnectReturnCode,
    why: &str,
) {
    warn!(%peer, client_id, code = code.as_u8(), refusal = code.as_str(), why, "connection refused");
    let connack = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
    });
    let _ = framed.write(connack, context.settings.write_timeout).await;
}

/// Counts a CONNECT refused for its credentials towards the address's ban
/// (`limits.max_auth_failures_per_ip`). Only credentials count: a refused client id or will
/// topic is the client's configuration, not a guess.
fn failed_login(context: &Context, peer: SocketAddr) {
    ServerStats::add(&context.stats.auth_failures);
    if context.guard.auth_failed(peer.ip()) {
        ServerStats::add(&context.stats.bans);
        let secs = context.guard.settings().auth_ban.as_secs();
        warn!(%peer, limit = "limits.max_auth_failures_per_ip", ban_secs = secs, "too many failed logins: address banned");
    }
}

/// Reads and checks the CONNECT. `None` means the connection was refused (and told so where
/// the protocol allows).
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S>,
    peer: SocketAddr,
    transport: Transport,
    context: &Context,
) -> Option<Accepted> {
    let deadline = context.settings.connect_timeout;
    let first = match tokio::time::timeout(deadline, framed.read_packet()).await {
        Ok(first) => first,
        Err(_) => {
            warn!(%peer, limit = "limits.connect_timeout_secs", secs = deadline.as_secs(), "connection refused: no CONNECT before the deadline");
            return None;
        }
    };
    let mut connect = match first {
        Ok(Packet::Connect(connect)) => *connect,
        Ok(other) => {
            warn!(%peer, packet = other.name(), "connection refused: first packet is not CONNECT");
            return None;
        }
        // The two CONNECTs the protocol answers with a refusing CONNACK before they decode.
        Err(ReadError::Decode(
            e @ (DecodeError::UnsupportedProtocolLevel
            | DecodeError::EmptyClientIdWithoutCleanSession),
        )) => {
            let (code, why) = match e {
                DecodeError::UnsupportedProtocolLevel => (
                    ConnectReturnCode::UnacceptableProtocolVersion,
                    "protocol level is not 3 or 4",
                ),
                _ => (
                    ConnectReturnCode::IdentifierRejected,
                    "empty client id needs clean session",
                ),
            };
            refuse(framed, context, peer, "", code, why).await;
            return None;
        }
        Err(ReadError::Decode(e)) => {
            warn!(%peer, error = %e, "connection refused: bad CONNECT");
            return None;
        }
        Err(ReadError::Closed) | Err(ReadError::Io(_)) => {
            info!(%peer, "socket closed before CONNECT");
            return None;
        }
    };
    if connect.client_id.is_empty() && context.auth.assigns_client_ids() {
        // 21 characters: within MQTT 3.1's 23-character limit too.
        connect.client_id = format!("auto-{:016x}", rand::random::<u64>());
    }
    let client_id = match context.auth.check_client_id(&connect.client_id) {
        Ok(id) => id,
        Err(refusal) => {
            let id = connect.client_id.clone();
            let mut why = refusal.to_string();
            if matches!(refusal, Refusal::ClientId(ClientIdError::TooLong { .. })) {
                why.push_str(" (limits.max_client_id_len)");
            }
            refuse(framed, context, peer, &id, refusal.return_code(), &why).await;
            return None;
        }
    };
    let principal = match context.auth.authenticate(
        &client_id,
        connect.username.as_deref(),
        connect.password.as_deref(),
    ) {
        Ok(principal) => principal,
        Err(refusal) => {
            let code = refusal.return_code();
            failed_login(context, peer);
            refuse(
                framed,
                context,
                peer,
                client_id.as_str(),
                code,
                &refusal.to_string(),
            )
            .await;
            report_failure(context, &connect, &client_id, peer, transport, code);
            return None;
        }
    };
    if let Some(will) = &connect.will {
        let topic = will.topic.as_str();
        let max = context.settings.max_topic_len;
        let why = if topic.len() > max {
            Some("will topic longer than limits.max_topic_len")
        } else if !principal.can_publish(topic) {
            Some("will topic not allowed for this client")
        } else {
            None
        };
        if let Some(why) = why {
            refuse(
                framed,
                context,
                peer,
                client_id.as_str(),
                ConnectReturnCode::NotAuthorized,
                why,
            )
            .await;
            return None;
        }
    }
    Some(Accepted { connect, principal })
}

/// The router's view of an accepted CONNECT.
pub(crate) fn connect_request(
    connect: Connect,
    channel: ChannelId,
    principal: &Principal,
    peer: SocketAddr,
    transport: Transport,
    outbox: Outbox,
) -> ConnectRequest {
    ConnectRequest {
        channel,
        client_id: principal.client_id.clone(),
        clean_session: connect.clean_session,
        will: connect.will,
        username: connect.username,
        protocol: connect.protocol,
        peer,
        transport,
        outbox,
    }
}

/// Tells the router of a CONNECT refused for its credentials, for the optional
/// `connect_failed` event. Never waits: under a flood of bad logins the report is dropped
/// rather than slowing the router.
fn report_failure(
    context: &Context,
    connect: &Connect,
    client_id: &herald_protocol::ClientId,
    peer: SocketAddr,
    transport: Transport,
    code: ConnectReturnCode,
) {
    if !context.settings.report_connect_failed {
        return;
    }
    let failed = FailedConnect {
        client_id: client_id.clone(),
        peer,
        username: connect.username.clone(),
        protocol: connect.protocol,
        transport,
        clean_session: connect.clean_session,
        reason: code.as_str(),
    };
    let _ = context
        .router
        .inputs
        .try_send(Input::ConnectFailed(Box::new(failed)));
}
