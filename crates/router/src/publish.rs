//! PUBLISH and its acknowledgements in both directions, and routing a message to sessions.

use std::collections::HashMap;

use herald_protocol::topic::p2p_target;
use herald_protocol::{ClientId, Packet, PacketId, Publish, QoS};
use herald_store::Op;
use tracing::warn;

use crate::presence::SNAPSHOT_PREFIX;
use crate::router::{Deferred, Router, RouterStats, to_stored};
use crate::session::{Enqueued, InflightState, Queued, publish_packet};
use crate::types::{ChannelRef, CloseReason, Message, now_ms};

impl Router {
    pub(crate) fn handle_publish(&mut self, channel: ChannelRef, publish: Publish) {
        let max_incoming = self.settings.max_incoming_qos2;
        let Some(session) = self.session_of(&channel) else {
            return;
        };
        let packet_id = publish.packet_id;
        if publish.qos == QoS::ExactlyOnce {
            let Some(id) = packet_id else { return };
            if session
                .flow()
                .is_some_and(|f| f.incoming_qos2.contains(&id))
            {
                // A retransmission of a message already routed: acknowledge, do not route again.
                self.reply(channel, Deferred::Send(Packet::PubRec(id)), false);
                return;
            }
            let flow = session.flow_mut();
            if flow.incoming_qos2.len() >= max_incoming {
                warn!(%channel, limit = "limits.max_inflight", "too many QoS 2 messages awaiting PUBREL; closing");
                self.end_channel(&channel, CloseReason::ProtocolError);
                return;
            }
            flow.incoming_qos2.insert(id);
            if session.persistent {
                // In the batch the PUBREC waits for: after a crash, a retransmission of this
                // PUBLISH is recognised and not routed again.
                let client_id = session.client_id.to_string();
                self.persister.stage(Op::PutIncomingQos2 {
                    client_id,
                    packet_id: id.get(),
                });
            }
        }
        RouterStats::add(&self.stats.messages_received, 1);
        RouterStats::add(&self.stats.received_by_qos[publish.qos.as_u8() as usize], 1);
        let message = Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            published_at_ms: now_ms(),
        };
        self.route_from(message, Some(&channel.client));
        match (publish.qos, packet_id) {
            (QoS::AtLeastOnce, Some(id)) => {
                self.reply(channel, Deferred::Send(Packet::PubAck(id)), true)
            }
            (QoS::ExactlyOnce, Some(id)) => {
                self.reply(channel, Deferred::Send(Packet::PubRec(id)), true)
            }
            _ => {}
        }
    }

    pub(crate) fn handle_pubrel(&mut self, channel: ChannelRef, packet_id: PacketId) {
        let Some(session) = self.session_of(&channel) else {
            return;
        };
        let removed = session
            .existing_flow_mut()
            .is_some_and(|f| f.incoming_qos2.remove(&packet_id));
        let durable = removed && session.persistent;
        if durable {
            // The PUBCOMP waits for the id to be forgotten on disk too: once the client has it,
            // it may reuse the id for a new message, which must not be taken for a
            // retransmission after a crash.
            let client_id = session.client_id.to_string();
            self.persister.stage(Op::DeleteIncomingQos2 {
                client_id,
                packet_id: packet_id.get(),
            });
        }
        self.reply(channel, Deferred::Send(Packet::PubComp(packet_id)), durable);
    }

    pub(crate) fn handle_puback(&mut self, channel: ChannelRef, packet_id: PacketId) {
        self.complete(channel, packet_id, InflightState::Ack);
    }

    pub(crate) fn handle_pubcomp(&mut self, channel: ChannelRef, packet_id: PacketId) {
        self.complete(channel, packet_id, InflightState::Complete);
    }

    pub(crate) fn handle_pubrec(&mut self, channel: ChannelRef, packet_id: PacketId) {
        let Some(session) = self.session_of(&channel) else {
            return;
        };
        let mut released = None;
        if let Some(inflight) = session.existing_flow_mut().and_then(|f| {
            f.inflight
                .iter_mut()
                .find(|i| i.packet_id == packet_id && i.state == InflightState::Received)
        }) {
            inflight.state = InflightState::Complete;
            released = inflight.queued.seq;
        }
        // A stored message (only persistent sessions' messages have a seq) is marked released
        // before the PUBREL goes out: after a crash the broker then resends the PUBREL, never
        // the PUBLISH the client has already taken.
        let durable = released.is_some();
        if let Some(seq) = released {
            let client_id = session.client_id.to_string();
            self.persister.stage(Op::PutReleased { client_id, seq });
        }
        self.reply(channel, Deferred::Send(Packet::PubRel(packet_id)), durable);
    }

    /// The last acknowledgement of an outgoing message: forget it and send the next ones.
    fn complete(&mut self, channel: ChannelRef, packet_id: PacketId, state: InflightState) {
        let limits = self.settings.queue_limits();
        let Some(session) = self.session_of(&channel) else {
            return;
        };
        let mut ops = Vec::new();
        if let Some(done) = session.take_inflight(packet_id, state)
            && let Some(seq) = done.queued.seq
        {
            ops.push(Op::Dequeue {
                client_id: session.client_id.to_string(),
                seq,
            });
        }
        let outcome = session.pump(limits, &mut ops);
        self.stage_all(ops);
        self.after_send(Some(channel), outcome);
    }

    /// Delivers a message to every session it reaches, and keeps it if retained. Stages every
    /// store op it needs in the open batch.
    pub(crate) fn route(&mut self, message: Message) {
        self.route_from(message, None);
    }

    /// Like [`Router::route`] for a message a client published: it may also match `outflow`
    /// rules (messages from the broker itself never do, so a sink cannot feed itself).
    pub(crate) fn route_from(&mut self, message: Message, publisher: Option<&ClientId>) {
        if let Some(publisher) = publisher
            && !self.settings.presence.outflow.is_empty()
        {
            self.outflow(&message, publisher);
        }
        if message.retain {
            self.retain(&message);
        }
        self.deliver_to_subscribers(&message);
    }

    /// Delivers a copy to every session the message reaches ([`Router::targets_of`]).
    pub(crate) fn deliver_to_subscribers(&mut self, message: &Message) {
        for (client, granted) in self.targets_of(message.topic.as_str(), message.qos) {
            self.deliver(&client, message, granted, false);
        }
    }

    /// The sessions a message on `topic` reaches and the QoS each is granted: the subscribers
    /// of the topic, or for a P2P topic the named client (at `qos`, whether or not it
    /// subscribed).
    pub(crate) fn targets_of(&self, topic: &str, qos: QoS) -> HashMap<ClientId, QoS> {
        let mut targets: HashMap<ClientId, QoS> = HashMap::new();
        if let Some(target) = p2p_target(topic) {
            if let Some(session) = self.sessions.get(target) {
                targets.insert(session.client_id.clone(), qos);
            }
        } else {
            self.tree.matches(topic, &mut targets);
        }
        targets
    }

    fn retain(&mut self, message: &Message) {
        let topic = message.topic.to_string();
        // A client allowed to publish on `$presence/...` replaces (or clears) the snapshot.
        if let Some(client) = topic.strip_prefix(SNAPSHOT_PREFIX)
            && self.take_snapshot(client)
            && message.payload.is_empty()
        {
            self.persister.stage(Op::DeleteRetained {
                topic: topic.clone(),
            });
        }
        if message.payload.is_empty() {
            if self.retained.remove(&topic).is_some() {
                self.persister.stage(Op::DeleteRetained { topic });
            }
        } else {
            self.persister.stage(Op::PutRetained {
                message: to_stored(message),
            });
            self.retained.insert(topic, message.clone());
        }
    }

    /// Delivers one copy to one session at `min(granted, message QoS)`. `retained` marks a
    /// delivery of a retained message to a new subscription (retain flag set).
    pub(crate) fn deliver(
        &mut self,
        client: &ClientId,
        message: &Message,
        granted: QoS,
        retained: bool,
    ) {
        let limits = self.settings.queue_limits();
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        let mut copy = message.clone();
        copy.qos = granted.min(message.qos);
        copy.retain = retained;
        if copy.qos == QoS::AtMostOnce {
            if session.send(publish_packet(&copy, None, false)).is_ok() {
                RouterStats::add(&self.stats.messages_sent, 1);
                RouterStats::add(&self.stats.sent_by_qos[0], 1);
            } else {
                RouterStats::add(&self.stats.qos0_dropped, 1);
            }
            return;
        }
        let mut ops = Vec::new();
        let seq = session.persistent.then(|| {
            let seq = self.next_seq;
            self.next_seq += 1;
            seq
        });
        let stored = seq.map(|seq| Op::Enqueue {
            client_id: client.to_string(),
            seq,
            message: to_stored(&copy),
        });
        let queued = Queued {
            seq,
            message: copy,
            dup: false,
            released: false,
        };
        match session.enqueue(queued, limits, &mut ops) {
            Enqueued::Kept => ops.extend(stored),
            Enqueued::DroppedOldest => {
                ops.extend(stored);
                RouterStats::add(&self.stats.queue_dropped, 1);
                warn!(client_id = %client, limit = "limits.max_queued_messages", "session queue full; dropped its oldest message");
            }
            Enqueued::Refused => {
                RouterStats::add(&self.stats.queue_dropped, 1);
                warn!(client_id = %client, limit = "limits.max_queued_messages", "session queue full and every message in flight; dropped the new message");
            }
        }
        let outcome = session.pump(limits, &mut ops);
        // Named only for what after_send reports or closes (the client id is cloned then).
        let channel = (outcome.slow_consumer || outcome.expired > 0)
            .then(|| session.channel_ref())
            .flatten();
        self.stage_all(ops);
        self.after_send(channel, outcome);
    }
}
