//! One client id's session: its subscriptions, the channel it is attached to, and its QoS 1/2
//! state (messages queued, messages in flight, incoming QoS 2 ids awaiting PUBREL).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::NonZeroU64;
use std::sync::Arc;

use herald_protocol::{ClientId, Packet, PacketId, Protocol, Publish, QoS, Will};
use herald_store::Op;

use crate::Outbox;
use crate::QueueLimits;
use crate::channel_outbox::SendError;
use crate::types::{ChannelId, ChannelRef, Message, Outgoing, Peer, Transport, now_ms};

/// The live channel a session is attached to.
#[derive(Debug)]
pub struct Attached {
    pub id: ChannelId,
    pub outbox: Outbox,
    /// Boxed: most clients have none.
    pub will: Option<Box<Will>>,
    pub peer: Peer,
    pub protocol: Protocol,
    /// Shared between the channels that gave the same user name (a Signature user name names
    /// the access key and instance, so a fleet's devices mostly give one).
    pub username: Option<Arc<str>>,
    pub transport: Transport,
    /// The time of its `connect` event, ms since the Unix epoch.
    pub connected_at_ms: u64,
}

/// What [`Session::enqueue`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Kept,
    /// Kept, and the oldest waiting message was dropped to make room.
    DroppedOldest,
    /// Not kept: the session is full and everything it holds is in flight.
    Refused,
}

/// A QoS 1/2 message waiting to be sent. `seq` is its key in the store, for persistent sessions.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: Option<u64>,
    pub message: Message,
    /// Set when the message may have been sent before (redelivery after a broker restart).
    pub dup: bool,
    /// QoS 2 only: the client already sent PUBREC (before a restart), so the message is
    /// completed with PUBREL, not sent again.
    pub released: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// The acknowledgement an outgoing QoS 1/2 message waits for.
pub enum InflightState {
    /// QoS 1: PUBACK.
    Ack,
    /// QoS 2, first half: PUBREC.
    Received,
    /// QoS 2, after our PUBREL: PUBCOMP.
    Complete,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub packet_id: PacketId,
    pub queued: Queued,
    pub state: InflightState,
}

/// What happened when the session tried to send.
#[derive(Debug, Default)]
pub struct SendOutcome {
    /// The outbox was full: the client is not reading.
    pub slow_consumer: bool,
    /// Queued messages dropped for their age.
    pub expired: u64,
    /// PUBLISH packets sent, by QoS.
    pub sent_by_qos: [u64; 3],
}

#[derive(Debug)]
pub struct Session {
    pub client_id: ClientId,
    /// cleanSession=false: kept across channels and restarts.
    pub persistent: bool,
    /// Ordered maps rather than hash maps: 24 bytes each and no allocation while empty (most
    /// sessions hold a few filters and no QoS 2 ids), where a `HashMap` is 48 bytes.
    pub subscriptions: BTreeMap<String, QoS>,
    pub attached: Option<Attached>,
    /// QoS 1/2 state, allocated when first needed: most idle clients never have any, and the
    /// box (8 bytes) replaces about 90 bytes in every session.
    flow: Option<Box<Flow>>,
    pub created_at_ms: u64,
    /// The seq of the attached channel's `connect` event while the client's `$presence`
    /// snapshot is that event: the snapshot is then read from the channel (its id, peer and
    /// connect time) instead of kept in a box of its own, 64 bytes per connected client
    /// (`Router::snapshot_of`). Taken with the channel by [`Session::detach`].
    pub(crate) snapshot_seq: Option<NonZeroU64>,
}

/// A session's QoS 1/2 state.
#[derive(Debug, Default)]
pub struct Flow {
    pub queue: VecDeque<Queued>,
    pub inflight: VecDeque<Inflight>,
    pub incoming_qos2: BTreeSet<PacketId>,
    next_packet_id: u16,
}

impl Session {
    pub fn new(client_id: ClientId, persistent: bool) -> Box<Session> {
        Box::new(Session {
            client_id,
            persistent,
            subscriptions: BTreeMap::new(),
            attached: None,
            flow: None,
            created_at_ms: now_ms(),
            snapshot_seq: None,
        })
    }

    pub fn record(&self) -> herald_store::SessionRecord {
        // In filter order, as the map keeps them.
        let subscriptions: Vec<(String, u8)> = self
            .subscriptions
            .iter()
            .map(|(f, q)| (f.clone(), q.as_u8()))
            .collect();
        herald_store::SessionRecord {
            subscriptions,
            created_at_ms: self.created_at_ms,
        }
    }

    pub fn channel_id(&self) -> Option<ChannelId> {
        self.attached.as_ref().map(|a| a.id)
    }

    /// The attached channel as the router addresses it.
    pub fn channel_ref(&self) -> Option<ChannelRef> {
        self.attached
            .as_ref()
            .map(|a| ChannelRef::new(self.client_id.clone(), a.id))
    }

    /// Detaches the attached channel, if any, with the seq of its `connect` when that is the
    /// client's `$presence` snapshot (`snapshot_seq`, which holds only while the channel is
    /// attached).
    pub(crate) fn detach(&mut self) -> Option<(Attached, Option<NonZeroU64>)> {
        let attached = self.attached.take()?;
        Some((attached, self.snapshot_seq.take()))
    }

    /// Queues a packet on the attached channel's outbox. `Err(Full)`: the client does not read
    /// fast enough, and the caller closes the channel as a slow consumer. `Err(Closed)`: no
    /// channel is attached, or its connection task has ended; that task routed its
    /// `Input::Closed`, with the real reason, before its outbox closed, so the router ends the
    /// channel when it reads that input, and the packet is simply not sent.
    pub fn send(&self, packet: Packet) -> Result<(), SendError> {
        send_on(&self.attached, packet)
    }

    /// The QoS 1/2 state, if the session has ever had any.
    pub fn flow(&self) -> Option<&Flow> {
        self.flow.as_deref()
    }

    /// The QoS 1/2 state, allocated on first use.
    pub fn flow_mut(&mut self) -> &mut Flow {
        self.flow.get_or_insert_with(Box::default)
    }

    /// The QoS 1/2 state, if the session has ever had any, to change.
    pub fn existing_flow_mut(&mut self) -> Option<&mut Flow> {
        self.flow.as_deref_mut()
    }

    /// Queues `queued` within `limits.max_queued_messages`. A full session drops its oldest
    /// waiting message (staging its removal from the store in `ops`); if every message it
    /// holds is in flight, `queued` is the one not kept. The caller stores `queued` only when
    /// it is kept.
    pub fn enqueue(&mut self, queued: Queued, limits: QueueLimits, ops: &mut Vec<Op>) -> Enqueued {
        let client_id = &self.client_id;
        let flow = self.flow.get_or_insert_with(Box::default);
        if flow.queue.len() + flow.inflight.len() < limits.max_queued_messages {
            flow.queue.push_back(queued);
            return Enqueued::Kept;
        }
        let Some(old) = flow.queue.pop_front() else {
            return Enqueued::Refused;
        };
        if let Some(seq) = old.seq {
            ops.push(Op::Dequeue {
                client_id: client_id.to_string(),
                seq,
            });
        }
        flow.queue.push_back(queued);
        Enqueued::DroppedOldest
    }

    /// Resends what was in flight (DUP set, or PUBREL where PUBREC came), after a reconnect.
    pub fn resend_inflight(&mut self) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        let Some(flow) = self.flow.as_deref() else {
            return outcome;
        };
        for i in &flow.inflight {
            let packet = match i.state {
                InflightState::Complete => Packet::PubRel(i.packet_id),
                _ => publish_packet(&i.queued.message, Some(i.packet_id), true),
            };
            if let Err(error) = send_on(&self.attached, packet) {
                outcome.slow_consumer = error == SendError::Full;
                break;
            }
        }
        outcome
    }

    /// Moves queued messages into flight while the window allows.
    pub fn pump(&mut self, limits: QueueLimits, ops: &mut Vec<Op>) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        let (Some(_), Some(flow)) = (&self.attached, self.flow.as_deref_mut()) else {
            return outcome;
        };
        let oldest_allowed = now_ms().saturating_sub(limits.max_queue_age.as_millis() as u64);
        while flow.inflight.len() < limits.max_inflight {
            let Some(queued) = flow.queue.pop_front() else {
                break;
            };
            // A released message is already in the client's hands: it is completed (PUBREL),
            // never expired, or its id would stay taken on the client's side.
            if !queued.released && queued.message.published_at_ms < oldest_allowed {
                if let Some(seq) = queued.seq {
                    ops.push(Op::Dequeue {
                        client_id: self.client_id.to_string(),
                        seq,
                    });
                }
                outcome.expired += 1;
                continue;
            }
            let Some(packet_id) = flow.packet_id_for(&queued) else {
                flow.queue.push_front(queued);
                break;
            };
            let (packet, state) = match (queued.released, queued.message.qos) {
                (true, _) => (Packet::PubRel(packet_id), InflightState::Complete),
                (false, qos) => {
                    let packet = publish_packet(&queued.message, Some(packet_id), queued.dup);
                    let state = match qos {
                        QoS::ExactlyOnce => InflightState::Received,
                        _ => InflightState::Ack,
                    };
                    (packet, state)
                }
            };
            let sent = send_on(&self.attached, packet);
            if sent == Err(SendError::Closed) {
                // The connection has gone (its close is on the way): the message was not sent,
                // and waits as it was for the session's next channel, which sends it once
                // rather than resending it as a duplicate.
                flow.queue.push_front(queued);
                break;
            }
            if !queued.released {
                outcome.sent_by_qos[queued.message.qos.as_u8() as usize] += 1;
            }
            flow.inflight.push_back(Inflight {
                packet_id,
                queued,
                state,
            });
            if sent == Err(SendError::Full) {
                outcome.slow_consumer = true;
                break;
            }
        }
        outcome
    }

    /// Removes the inflight message `packet_id` if it is in `state`; returns it.
    pub fn take_inflight(&mut self, packet_id: PacketId, state: InflightState) -> Option<Inflight> {
        let inflight = &mut self.flow.as_deref_mut()?.inflight;
        let index = inflight
            .iter()
            .position(|i| i.packet_id == packet_id && i.state == state)?;
        inflight.remove(index)
    }
}

fn send_on(attached: &Option<Attached>, packet: Packet) -> Result<(), SendError> {
    match attached {
        Some(a) => a.outbox.try_send(Outgoing::Packet(packet)),
        None => Err(SendError::Closed),
    }
}

impl Flow {
    fn allocate_packet_id(&mut self) -> PacketId {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            if let Some(id) = PacketId::new(self.next_packet_id)
                && !self.in_flight(id)
            {
                return id;
            }
        }
    }

    fn in_flight(&self, id: PacketId) -> bool {
        self.inflight.iter().any(|i| i.packet_id == id)
    }

    /// The packet id of a queued message: derived from its store seq when it has one, so that
    /// after a restart it is sent again under its original id (MQTT 3.1.1 4.4) and a client
    /// awaiting its PUBREL recognises it; else the next free id. `None` while the derived id
    /// is still in flight with another message (the queue waits, keeping its order).
    fn packet_id_for(&mut self, queued: &Queued) -> Option<PacketId> {
        match queued.seq {
            Some(seq) => {
                let id = PacketId::new((seq % u64::from(u16::MAX)) as u16 + 1)?;
                (!self.in_flight(id)).then_some(id)
            }
            None => Some(self.allocate_packet_id()),
        }
    }
}

/// The PUBLISH packet that delivers `message` (retain flag as given in the message).
pub fn publish_packet(message: &Message, packet_id: Option<PacketId>, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup: dup && message.qos != QoS::AtMostOnce,
        qos: message.qos,
        retain: message.retain,
        topic: message.topic.clone(),
        packet_id,
        payload: message.payload.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use herald_protocol::Topic;

    use super::*;
    use crate::{OutboxReceiver, channel_outbox};

    fn attached_session() -> (Box<Session>, OutboxReceiver) {
        let client = ClientId::parse_any("c", 64).expect("id");
        let mut session = Session::new(client, true);
        let (outbox, rx) = channel_outbox(64);
        session.attached = Some(Attached {
            id: ChannelId(1),
            outbox,
            will: None,
            peer: SocketAddr::from(([127, 0, 0, 1], 1)).into(),
            protocol: Protocol::V311,
            username: None,
            transport: Transport::Tcp,
            connected_at_ms: 0,
        });
        (session, rx)
    }

    fn waiting_count(session: &Session) -> usize {
        session.flow().map_or(0, |f| f.queue.len())
    }

    fn in_flight(session: &Session) -> usize {
        session.flow().map_or(0, |f| f.inflight.len())
    }

    fn queued(seq: u64, released: bool) -> Queued {
        Queued {
            seq: Some(seq),
            message: Message {
                topic: Topic::new("t", 64).expect("topic"),
                payload: Bytes::from_static(b"m"),
                qos: QoS::ExactlyOnce,
                retain: false,
                published_at_ms: now_ms(),
            },
            dup: true,
            released,
        }
    }

    const LIMITS: QueueLimits = QueueLimits {
        max_inflight: 10,
        max_queued_messages: 100,
        max_queue_age: Duration::from_secs(60),
    };

    fn sent(rx: &mut OutboxReceiver) -> Vec<Packet> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|out| match out {
                Outgoing::Packet(packet) => packet,
                Outgoing::Close(reason) => panic!("closed: {reason}"),
            })
            .collect()
    }

    #[test]
    fn stored_messages_go_out_under_ids_derived_from_their_seq() {
        let (mut session, mut rx) = attached_session();
        session.flow_mut().queue.push_back(queued(4, true));
        session
            .flow_mut()
            .queue
            .push_back(queued(u64::from(u16::MAX) + 6, false));
        // Derives the same id as seq 6 - 65535 away: it waits for that one to complete.
        session.flow_mut().queue.push_back(queued(6, false));
        session.flow_mut().queue.push_back(queued(7, false));
        let mut ops = Vec::new();
        let outcome = session.pump(LIMITS, &mut ops);
        assert!(!outcome.slow_consumer);
        assert_eq!(
            outcome.sent_by_qos,
            [0, 0, 1],
            "a PUBREL is not a PUBLISH sent"
        );
        let packets = sent(&mut rx);
        assert_eq!(packets.len(), 2, "{packets:?}");
        assert_eq!(packets[0], Packet::PubRel(PacketId::new(5).expect("id")));
        let Packet::Publish(publish) = &packets[1] else {
            panic!("{packets:?}")
        };
        assert_eq!(publish.packet_id, PacketId::new(7));
        assert!(publish.dup);
        assert_eq!(waiting_count(&session), 2, "seq 6 and 7 wait, in order");

        let id = PacketId::new(7).expect("id");
        assert!(session.take_inflight(id, InflightState::Received).is_some());
        session.pump(LIMITS, &mut ops);
        let ids: Vec<Option<PacketId>> = sent(&mut rx)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.packet_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [PacketId::new(7), PacketId::new(8)]);
    }

    #[test]
    fn a_gone_connection_takes_nothing_into_flight() {
        let (mut session, mut rx) = attached_session();
        session.flow_mut().queue.push_back(queued(6, false));
        session.flow_mut().queue.push_back(queued(7, false));
        rx.close();
        let mut ops = Vec::new();
        let outcome = session.pump(LIMITS, &mut ops);
        assert!(!outcome.slow_consumer, "gone is not slow");
        assert_eq!(outcome.sent_by_qos, [0, 0, 0]);
        assert_eq!(in_flight(&session), 0);
        let waiting: Vec<Option<u64>> = session
            .flow()
            .map(|f| f.queue.iter().map(|q| q.seq).collect())
            .unwrap_or_default();
        assert_eq!(waiting, [Some(6), Some(7)], "both wait, in order");
    }

    #[test]
    fn a_full_session_drops_its_oldest_waiting_message_or_else_the_new_one() {
        let (mut session, _rx) = attached_session();
        let limits = QueueLimits {
            max_inflight: 1,
            max_queued_messages: 2,
            ..LIMITS
        };
        let mut ops = Vec::new();
        assert_eq!(
            session.enqueue(queued(1, false), limits, &mut ops),
            Enqueued::Kept
        );
        session.pump(limits, &mut ops);
        assert_eq!(in_flight(&session), 1);
        assert_eq!(
            session.enqueue(queued(2, false), limits, &mut ops),
            Enqueued::Kept
        );
        assert!(ops.is_empty());
        assert_eq!(
            session.enqueue(queued(3, false), limits, &mut ops),
            Enqueued::DroppedOldest
        );
        assert!(
            matches!(ops.as_slice(), [Op::Dequeue { seq: 2, .. }]),
            "{ops:?}"
        );
        let waiting: Vec<Option<u64>> = session.flow_mut().queue.iter().map(|q| q.seq).collect();
        assert_eq!(waiting, [Some(3)]);

        // Everything in flight: the new message is the one not kept, and nothing is staged.
        let (mut session, _rx) = attached_session();
        let mut ops = Vec::new();
        let limits = QueueLimits {
            max_inflight: 2,
            ..limits
        };
        session.enqueue(queued(1, false), limits, &mut ops);
        session.enqueue(queued(2, false), limits, &mut ops);
        session.pump(limits, &mut ops);
        assert_eq!(in_flight(&session), 2);
        assert_eq!(
            session.enqueue(queued(3, false), limits, &mut ops),
            Enqueued::Refused
        );
        assert_eq!(waiting_count(&session), 0);
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn a_released_message_is_completed_however_old() {
        let (mut session, mut rx) = attached_session();
        let mut old = queued(4, true);
        old.message.published_at_ms = 0;
        session.flow_mut().queue.push_back(old);
        let mut expired = queued(5, false);
        expired.message.published_at_ms = 0;
        session.flow_mut().queue.push_back(expired);
        let mut ops = Vec::new();
        let outcome = session.pump(LIMITS, &mut ops);
        assert_eq!(outcome.expired, 1, "the unreleased old one expires");
        assert_eq!(
            sent(&mut rx),
            [Packet::PubRel(PacketId::new(5).expect("id"))]
        );
    }
}

#[cfg(test)]
mod size {
    #[test]
    fn an_idle_session_is_small() {
        // Every connected client holds one (docs/benchmarks.md); QoS 1/2 state is boxed apart.
        // 160 bytes is a size class of the allocator (jemalloc's next is 192).
        let size = std::mem::size_of::<super::Session>();
        assert!(size <= 160, "Session is {size} bytes");
    }
}
