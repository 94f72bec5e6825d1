//! The start and the end of a channel: CONNECT (new session, resumed session, takeover) and
//! the one exit path every channel takes.

use std::collections::VecDeque;
use std::sync::Arc;

use herald_protocol::{ConnAck, ConnectReturnCode, Packet};
use herald_store::Op;
use tracing::{info, warn};

use crate::channel_outbox::SendError;
use crate::router::{Router, RouterStats};
use crate::session::{Attached, Session};
use crate::types::{
    ChannelId, ChannelRef, CloseReason, ConnectRequest, EventKind, Input, Message, Outgoing, now_ms,
};

/// How many distinct recent user names [`shared_username`] remembers: a deployment
/// has a few access keys, each giving one Signature user name to all its devices.
const RECENT_USERNAMES: usize = 8;

/// How long a CONNECT that takes over a client id waits for the old channel to end by itself
/// (normally well under a millisecond: its task reads what its socket holds and reports). An
/// old channel that does not answer (its task stuck in a write to a client that reads nothing)
/// is ended as `taken_over` then.
pub(crate) const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A CONNECT waiting for the channel it takes over to end.
#[derive(Debug)]
pub(crate) struct Takeover {
    /// The open channel of the client id.
    old: ChannelId,
    request: Box<ConnectRequest>,
    due: tokio::time::Instant,
    /// What the new connection sent after its CONNECT (a client need not wait for the
    /// CONNACK), handled once the CONNECT is.
    held: Vec<Input>,
}

impl Router {
    /// A CONNECT. If the client id has an open channel, that channel is asked to end first
    /// (an `Outgoing::Close` with `taken_over`), and the CONNECT waits for it: its task reads
    /// what its client sent before (a DISCONNECT the broker had not read yet when the new
    /// CONNECT came ends it as `client_disconnect`, with its `disconnect` event and without its
    /// will) and reports how it ended; the CONNECT is taken then, or after [`TAKEOVER_WAIT`].
    pub(crate) fn handle_connect(&mut self, request: ConnectRequest) {
        let client = request.client_id.clone();
        if let Some(attached) = self.sessions.get(&client).and_then(|s| s.attached.as_ref()) {
            let old = ChannelRef::new(client.clone(), attached.id);
            let due = match self.takeovers.remove(&client) {
                // A newer CONNECT for the same id: the one that waited never became a channel.
                // The old channel's time is not extended.
                Some(waiting) => {
                    info!(client_id = %client, old_channel = %old, new_channel = %request.channel, replaced = %waiting.request.channel, "client id taken over again while the old channel ends");
                    let _ = waiting
                        .request
                        .outbox
                        .try_send(Outgoing::Close(CloseReason::TakenOver));
                    Some(waiting.due)
                }
                None => {
                    info!(client_id = %client, old_channel = %old, new_channel = %request.channel, "client id taken over by a new connection");
                    // A closed outbox: its task has ended, and its `Input::Closed` is on the
                    // way (it keeps the outbox until that is sent). A full one: it does not
                    // read, and would not see the request soon: the channel ends now.
                    match attached
                        .outbox
                        .try_send(Outgoing::Close(CloseReason::TakenOver))
                    {
                        Err(SendError::Full) => None,
                        _ => Some(tokio::time::Instant::now() + TAKEOVER_WAIT),
                    }
                }
            };
            if let Some(due) = due {
                self.takeovers.insert(
                    client,
                    Takeover {
                        old: old.id,
                        request: Box::new(request),
                        due,
                        held: Vec::new(),
                    },
                );
                return;
            }
            // Taken in at once, below, once the old channel has ended.
            self.end_channel(&old, CloseReason::TakenOver);
        }
        let mut session_present = false;
        if request.clean_session {
            if let Some(old) = self.sessions.remove(&client) {
                self.discard_session(&old);
            }
            self.sessions.insert(Session::new(client.clone(), false));
        } else if self.sessions.get(&client).is_some_and(|s| s.persistent) {
            session_present = true;
        } else {
            let session = Session::new(client.clone(), true);
            self.persister.stage(Op::PutSession {
                client_id: client.to_string(),
                record: session.record(),
            });
            self.sessions.insert(session);
        }
        let recent = &mut self.recent_usernames;
        let username = request.username.map(|name| shared_username(recent, name));
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        session.attached = Some(Attached {
            id: request.channel,
            outbox: request.outbox,
            will: request.will.map(Box::new),
            peer: request.peer.into(),
            protocol: request.protocol,
            username,
            transport: request.transport,
            // Also the time of its `connect` event (`Router::emit_for`).
            connected_at_ms: now_ms(),
        });
        RouterStats::add(&self.stats.connections, 1);
        let connack = Packet::ConnAck(ConnAck {
            session_present,
            code: ConnectReturnCode::Accepted,
        });
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        let channel = ChannelRef::new(client.clone(), request.channel);
        // A closed outbox here is a client that went at once: the channel is announced, and
        // its task's `Input::Closed`, on the way, ends it with the reason.
        if session.send(connack) == Err(SendError::Full) {
            self.slow_consumer(&channel);
            return;
        }
        self.emit_for(&channel, EventKind::Connect, None, request.clean_session);
        let Some(session) = self.sessions.get_mut(&client) else {
            return;
        };
        let mut ops = Vec::new();
        let resent = session.resend_inflight();
        let pumped = session.pump(self.settings.queue_limits(), &mut ops);
        self.stage_all(ops);
        if resent.slow_consumer {
            self.slow_consumer(&channel);
            return;
        }
        self.after_send(Some(channel), pumped);
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

    /// When the first waiting takeover is due.
    pub(crate) fn next_takeover_due(&self) -> Option<tokio::time::Instant> {
        self.takeovers.values().map(|t| t.due).min()
    }

    /// Ends the old channels of the takeovers that waited [`TAKEOVER_WAIT`] (each then takes
    /// its CONNECT in).
    pub(crate) fn end_overdue_takeovers(&mut self) {
        if self.takeovers.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let overdue: Vec<ChannelRef> = self
            .takeovers
            .iter()
            .filter(|(_, t)| t.due <= now)
            .map(|(client, t)| ChannelRef::new(client.clone(), t.old))
            .collect();
        for old in overdue {
            warn!(client_id = %old.client, channel = %old, "the channel taken over did not end by itself in time; ended as taken_over");
            self.end_channel(&old, CloseReason::TakenOver);
        }
    }

    /// Keeps `input` for later if it comes from a connection whose CONNECT waits for a
    /// takeover; gives it back otherwise.
    pub(crate) fn hold_for_takeover(&mut self, input: Input) -> Option<Input> {
        if self.takeovers.is_empty() {
            return Some(input);
        }
        let Some(channel) = input.packet_channel() else {
            return Some(input);
        };
        match self.takeovers.get_mut(&channel.client) {
            Some(waiting) if waiting.request.channel == channel.id => {
                waiting.held.push(input);
                None
            }
            _ => Some(input),
        }
    }

    /// Closes the connections whose CONNECTs wait for a takeover, without taking them in.
    pub(crate) fn drop_takeovers(&mut self, reason: CloseReason) {
        for (_, waiting) in self.takeovers.drain() {
            let _ = waiting.request.outbox.try_send(Outgoing::Close(reason));
        }
    }

    /// The one exit path of every channel: ends it once, whoever noticed first. A CONNECT that
    /// waited for this channel to end is taken in after it.
    pub(crate) fn end_channel(&mut self, channel: &ChannelRef, reason: CloseReason) {
        // A connection whose CONNECT waits for a takeover ended first: it never became a
        // channel, and the old one (asked to end already) ends as it will. (With no takeover
        // waiting, the map answers without hashing.)
        if self
            .takeovers
            .get(&channel.client)
            .is_some_and(|t| t.request.channel == channel.id)
        {
            self.takeovers.remove(&channel.client);
            return;
        }
        self.end_attached(channel, reason);
        if self
            .takeovers
            .get(&channel.client)
            .is_some_and(|t| t.old == channel.id)
            && let Some(waiting) = self.takeovers.remove(&channel.client)
        {
            if waiting.request.outbox.is_closed() {
                // Its task ended while it waited; the `Input::Closed` it sent comes next and
                // finds no channel: it never became one.
                return;
            }
            self.handle_connect(*waiting.request);
            for input in waiting.held {
                // Packet inputs: never a shutdown request.
                let _ = self.handle(input);
            }
        }
    }

    fn end_attached(&mut self, channel: &ChannelRef, reason: CloseReason) {
        let Some(session) = self.session_of(channel) else {
            return;
        };
        let persistent = session.persistent;
        // Detached before its events: what they set off (the client's own `$presence`
        // snapshot delivered to its full outbox) cannot end the channel a second time.
        let Some((attached, snapshot_seq)) = session.detach() else {
            return;
        };
        let client = channel.client.clone();
        self.keep_snapshot_apart(&client, &attached, snapshot_seq);
        if reason == CloseReason::ClientDisconnect {
            self.emit_detached(
                &client,
                &attached,
                EventKind::Disconnect,
                Some(reason),
                !persistent,
            );
        }
        self.emit_detached(
            &client,
            &attached,
            EventKind::TcpClean,
            Some(reason),
            !persistent,
        );
        self.stats
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        // The connection task stops when it reads this, or when it finds the outbox closed.
        let _ = attached.outbox.try_send(Outgoing::Close(reason));
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

/// `name` as an allocation shared with the channels that recently gave the same user name;
/// `recent` holds the latest distinct names, newest first.
fn shared_username(recent: &mut VecDeque<Arc<str>>, name: String) -> Arc<str> {
    if let Some(shared) = recent.iter().find(|shared| ***shared == *name) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(name);
    if recent.len() == RECENT_USERNAMES {
        recent.pop_back();
    }
    recent.push_front(shared.clone());
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_giving_one_user_name_share_it() {
        let mut recent = VecDeque::new();
        let signature = "Signature|LTAI5tExample|post-cn-demo";
        let a = shared_username(&mut recent, signature.to_string());
        let b = shared_username(&mut recent, signature.to_string());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*b, signature);
        // Other names are kept apart, and only the latest few distinct ones are remembered.
        let names: Vec<String> = (0..RECENT_USERNAMES).map(|n| format!("user-{n}")).collect();
        let others: Vec<Arc<str>> = names
            .iter()
            .map(|name| shared_username(&mut recent, name.clone()))
            .collect();
        assert!(others.iter().all(|other| !Arc::ptr_eq(other, &a)));
        assert_eq!(recent.len(), RECENT_USERNAMES);
        let c = shared_username(&mut recent, signature.to_string());
        assert_eq!(c, a);
        assert!(
            !Arc::ptr_eq(&c, &a),
            "forgotten after {RECENT_USERNAMES} other names"
        );
        let last = names.last().expect("names");
        let again = shared_username(&mut recent, last.clone());
        assert!(Arc::ptr_eq(&again, others.last().expect("others")));
    }
}
