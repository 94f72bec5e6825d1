//! The start and the end of a channel: CONNECT (new session, resumed session, takeover) and
//! the one exit path every channel takes.

use herald_protocol::{ConnAck, ConnectReturnCode, Packet};
use herald_store::Op;
use tracing::{info, warn};

use crate::router::{Router, RouterStats};
use crate::session::{Attached, Session};
use crate::types::{ChannelId, CloseReason, ConnectRequest, EventKind, Message, now_ms};

impl Router {
    pub(crate) fn handle_connect(&mut self, request: ConnectRequest) {
        let client = request.client_id.clone();
        if let Some(old) = self.sessions.get(&client).and_then(|s| s.channel_id()) {
            info!(client_id = %client, old_channel = %old, new_channel = %request.channel, "client id taken over by a new connection");
            self.end_channel(old, CloseReason::TakenOver);
        }
        let mut session_present = false;
        if request.clean_session {
            if let Some(old) = self.sessions.remove(&client) {
                self.discard_session(&old);
            }
            self.sessions
                .insert(client.clone(), Session::new(client.clone(), false));
        } else if self.sessions.get(&client).is_some_and(|s| s.persistent) {
            session_present = true;
        } else {
            let session = Session::new(client.clone(), true);
            self.persister.stage(Op::PutSession {
                client_id: client.to_string(),
                record: session.record(),
            });
            self.sessions.insert(client.clone(), session);
        }
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        session.attached = Some(Attached {
            id: request.channel,
            outbox: request.outbox,
            will: request.will.map(Box::new),
            peer: request.peer.into(),
            protocol: request.protocol,
            username: request.username,
            transport: request.transport,
            connected_at_ms: now_ms(),
        });
        self.channels.insert(request.channel, client.clone());
        RouterStats::add(&self.stats.connections, 1);
        let connack = Packet::ConnAck(ConnAck {
            session_present,
            code: ConnectReturnCode::Accepted,
        });
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        if !session.send(connack) {
            self.slow_consumer(request.channel);
            return;
        }
        self.emit_for(
            request.channel,
            EventKind::Connect,
            None,
            request.clean_session,
        );
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        let mut ops = Vec::new();
        let resent = session.resend_inflight();
        let pumped = session.pump(self.settings.queue_limits(), &mut ops);
        self.stage_all(ops);
        if resent.slow_consumer {
            self.slow_consumer(request.channel);
            return;
        }
        self.after_send(Some(request.channel), pumped);
    }

    /// Removes a session's subscriptions and, for a persistent one, its stored state.
    fn discard_session(&mut self, session: &Session) {
        for filter in session.subscriptions.keys() {
            self.tree.remove(filter, &session.client_id);
        }
        if session.persistent {
            self.persister.stage(Op::DeleteSession {
                client_id: session.client_id.to_string(),
            });
        }
    }

    /// The one exit path of every channel: ends it once, whoever noticed first.
    pub(crate) fn end_channel(&mut self, channel: ChannelId, reason: CloseReason) {
        let Some(client) = self.channels.get(&channel).cloned() else {
            return;
        };
        let Some(persistent) = self.sessions.get(&client).map(|s| s.persistent) else {
            self.channels.remove(&channel);
            return;
        };
        if reason == CloseReason::ClientDisconnect {
            self.emit_for(channel, EventKind::Disconnect, Some(reason), !persistent);
        }
        self.emit_for(channel, EventKind::TcpClean, Some(reason), !persistent);
        self.channels.remove(&channel);
        self.stats
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        let Some(attached) = session.attached.take() else {
            return;
        };
        // The connection task stops when it reads this, or when it finds the outbox closed.
        let _ = attached
            .outbox
            .try_send(crate::types::Outgoing::Close(reason));
        info!(client_id = %client, %channel, reason = reason.as_str(), "channel closed");
        if !persistent && let Some(session) = self.sessions.remove(&client) {
            self.discard_session(&session);
        }
        if reason != CloseReason::ClientDisconnect
            && let Some(will) = attached.will
        {
            if reason != CloseReason::TakenOver && reason != CloseReason::ServerShutdown {
                warn!(client_id = %client, topic = %will.topic, "publishing will message");
            }
            let message = Message {
                topic: will.topic,
                payload: will.payload,
                qos: will.qos,
                retain: will.retain,
                published_at_ms: now_ms(),
            };
            self.route_from(message, Some(&client));
        }
    }
}
