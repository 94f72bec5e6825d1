//! Presence events (DESIGN.md 5): built once per channel transition with the client's next
//! `seq`, staged in the store as a history entry together with every matching sink's outbox
//! entry (one transaction), and handed on only after they are durable. The client's seq, its
//! `$presence` snapshot and whether its channel is open are not stored apart: all three are
//! read back from its newest history entry at start (a channel is recorded apart only where
//! that entry would not show it open: a refused connect after it, a write that failed).

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::ops::Bound;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use herald_protocol::topic::matches;
use herald_protocol::{ClientId, QoS, Topic};
use herald_store::{ChannelRecord, Op, Store, StoreError};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::outbox::{OutboxEntry, SinkQueue};
use crate::router::{Deferred, Router, RouterStats};
use crate::session::Attached;
use crate::types::{
    ChannelId, ChannelInfo, ChannelRef, ClientState, CloseReason, Event, EventKind, FailedConnect,
    Message, Peer, now_ms,
};

/// The JSON form of an event, keys in the order of DESIGN.md 5.1.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceEvent {
    pub event_type: String,
    pub client_id: String,
    pub channel_id: String,
    pub client_ip: String,
    pub time: u64,
    pub seq: u64,
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub group_id: Option<String>,
    pub device_id: Option<String>,
    pub node: String,
    pub clean_session: bool,
    pub protocol: String,
    pub username: Option<String>,
    pub transport: String,
    pub v: u32,
}

/// The topic prefix of the retained snapshots.
pub(crate) const SNAPSHOT_PREFIX: &str = "$presence/";

/// What an event says besides its kind, time, seq and reason: borrowed from the channel's
/// state (or from a stored event, at restart), and formatted straight into the event's JSON,
/// whose buffer is the one allocation of the encoding.
pub(crate) struct Facts<'a> {
    /// The peer address; its text when a stored one does not parse.
    pub(crate) client_ip: Result<SocketAddr, &'a str>,
    pub(crate) clean_session: bool,
    pub(crate) protocol: &'a str,
    pub(crate) username: Option<&'a str>,
    pub(crate) transport: &'a str,
    pub(crate) node: &'a str,
    pub(crate) group_id: Option<&'a str>,
    pub(crate) device_id: Option<&'a str>,
    /// The `reason` of an event without a close reason: a refused CONNECT's refusal.
    pub(crate) refusal: Option<&'a str>,
}

/// What a channel record keeps to build the channel's `tcpclean` after a crash: the facts an
/// event has besides its client id, channel id, kind, time, seq and reason. Short keys, about
/// 100 bytes where the connect event's JSON (which older builds kept with every connect, and
/// which is still read) is about 400.
#[derive(Serialize, Deserialize)]
pub(crate) struct ChannelFacts {
    ip: String,
    cs: bool,
    p: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    u: Option<String>,
    t: String,
    n: String,
}

impl ChannelFacts {
    fn read(info: &[u8]) -> Result<ChannelFacts, serde_json::Error> {
        serde_json::from_slice::<ChannelFacts>(info)
            .or_else(|_| serde_json::from_slice::<PresenceEvent>(info).map(ChannelFacts::from))
    }
}

impl From<PresenceEvent> for ChannelFacts {
    fn from(event: PresenceEvent) -> ChannelFacts {
        ChannelFacts {
            ip: event.client_ip,
            cs: event.clean_session,
            p: event.protocol,
            u: event.username,
            t: event.transport,
            n: event.node,
        }
    }
}

/// When an event happened and its place in its client's sequence.
#[derive(Clone, Copy)]
pub(crate) struct Stamp {
    seq: u64,
    time_ms: u64,
}

/// Bytes reserved for an event's JSON: most fit (about 400 with a Signature user name).
const EVENT_JSON_CAPACITY: usize = 512;

impl Facts<'_> {
    /// What the record of a channel opened from `peer` keeps ([`ChannelFacts`]).
    fn channel_info(&self, peer: SocketAddr) -> Option<Bytes> {
        let facts = ChannelFacts {
            ip: peer.to_string(),
            cs: self.clean_session,
            p: self.protocol.to_owned(),
            u: self.username.map(str::to_owned),
            t: self.transport.to_owned(),
            n: self.node.to_owned(),
        };
        match serde_json::to_vec(&facts) {
            Ok(info) => Some(Bytes::from(info)),
            Err(e) => {
                warn!(error = %e, "cannot encode a channel record");
                None
            }
        }
    }

    /// The event's JSON, keys in the order of DESIGN.md 5.1 (as [`PresenceEvent`] has them).
    fn encode(
        &self,
        client: &ClientId,
        channel: ChannelId,
        kind: EventKind,
        reason: Option<CloseReason>,
        stamp: Stamp,
    ) -> Option<Bytes> {
        let doc = EventJson {
            facts: self,
            client_id: client.as_str(),
            channel,
            kind,
            reason: reason.map(CloseReason::as_str).or(self.refusal),
            stamp,
        };
        let mut json = Vec::with_capacity(EVENT_JSON_CAPACITY);
        match serde_json::to_writer(&mut json, &doc) {
            Ok(()) => Some(Bytes::from(json)),
            Err(e) => {
                warn!(error = %e, "cannot encode a presence event");
                None
            }
        }
    }
}

struct EventJson<'a> {
    facts: &'a Facts<'a>,
    client_id: &'a str,
    channel: ChannelId,
    kind: EventKind,
    reason: Option<&'a str>,
    stamp: Stamp,
}

impl Serialize for EventJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let facts = self.facts;
        let mut event = serializer.serialize_struct("PresenceEvent", 16)?;
        event.serialize_field("eventType", self.kind.as_str())?;
        event.serialize_field("clientId", self.client_id)?;
        event.serialize_field("channelId", &Shown(self.channel))?;
        match facts.client_ip {
            Ok(addr) => event.serialize_field("clientIp", &Shown(addr))?,
            Err(text) => event.serialize_field("clientIp", text)?,
        }
        event.serialize_field("time", &self.stamp.time_ms)?;
        event.serialize_field("seq", &self.stamp.seq)?;
        event.serialize_field("eventId", &Shown(EventId(self.client_id, self.stamp.seq)))?;
        match self.reason {
            Some(reason) => event.serialize_field("reason", reason)?,
            None => event.skip_field("reason")?,
        }
        event.serialize_field("groupId", &facts.group_id)?;
        event.serialize_field("deviceId", &facts.device_id)?;
        event.serialize_field("node", facts.node)?;
        event.serialize_field("cleanSession", &facts.clean_session)?;
        event.serialize_field("protocol", facts.protocol)?;
        event.serialize_field("username", &facts.username)?;
        event.serialize_field("transport", facts.transport)?;
        event.serialize_field("v", &1u32)?;
        event.end()
    }
}

/// A value written into the JSON as the string its `Display` gives, without a `String` first.
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// `clientId:seq`.
struct EventId<'a>(&'a str, u64);

impl std::fmt::Display for EventId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0, self.1)
    }
}

/// A client's `$presence` snapshot as the router keeps it: the typed parts, about 100 bytes
/// with its map entry, where the rendered JSON, its topic and the retained map's entry took
/// about 500 (docs/benchmarks.md). Rendered when it is stored or sent.
/// What the router keeps of a client id it knows.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// The seq of its last presence event (0: none yet).
    pub(crate) seq: u64,
    /// Its `$presence/<clientId>` snapshot, when snapshots are on and it had an event. Boxed,
    /// so that the map's nodes stay small (16 bytes of value per client).
    pub(crate) snapshot: Option<Box<SnapshotState>>,
}

impl Known {
    /// Replaces the snapshot, in the same allocation when there is one.
    pub(crate) fn set_snapshot(&mut self, state: SnapshotState) {
        match &mut self.snapshot {
            Some(snapshot) => **snapshot = state,
            None => self.snapshot = Some(Box::new(state)),
        }
    }
}

/// Each client's newest history entry, as the router reads it at start ([`read_newest`]).
/// The entries' JSON is parsed as the store lends it, not kept.
pub(crate) struct ReadBack {
    /// `(client id, seq, what the entry says of the snapshot)`, sorted by client id: about
    /// 100 bytes a client.
    pub(crate) newest: Vec<(String, u64, Newest)>,
    /// The channels the entries say are still open (their connect or disconnect is the
    /// newest), with what their `tcpclean` needs: usually none after a clean shutdown.
    pub(crate) open: Vec<(String, ChannelId, ChannelFacts)>,
}

pub(crate) fn read_newest(store: &mut dyn Store) -> Result<ReadBack, StoreError> {
    let mut newest = Vec::new();
    let mut open = Vec::new();
    store.last_events(&mut |id, seq, time_ms, payload| {
        let event = match serde_json::from_slice::<PresenceEvent>(payload) {
            Ok(event) => event,
            Err(e) => {
                warn!(client_id = %id, seq, error = %e, "presence snapshot not rebuilt, channel taken as ended: the newest history entry does not parse");
                newest.push((id.to_owned(), seq, Newest::Unreadable));
                return;
            }
        };
        let kind = EventKind::parse(&event.event_type);
        let channel = u128::from_str_radix(&event.channel_id, 16)
            .ok()
            .map(ChannelId);
        let read = match (kind, channel) {
            (Some(EventKind::ConnectFailed), _) => Newest::ConnectFailed,
            (Some(kind), Some(channel)) => {
                match SnapshotState::from_event(&event, kind, channel, seq, time_ms) {
                    Some(state) => Newest::State(state),
                    None => {
                        warn!(client_id = %id, seq, "presence snapshot not rebuilt: the newest history entry has an unknown reason or client address");
                        Newest::Unreadable
                    }
                }
            }
            _ => {
                warn!(client_id = %id, seq, "presence snapshot not rebuilt, channel taken as ended: the newest history entry has an unknown event type or channel id");
                Newest::Unreadable
            }
        };
        newest.push((id.to_owned(), seq, read));
        // A channel whose connect (or disconnect) is the newest event has not ended.
        if let (Some(EventKind::Connect | EventKind::Disconnect), Some(channel)) = (kind, channel)
        {
            open.push((id.to_owned(), channel, event.into()));
        }
    })?;
    Ok(ReadBack { newest, open })
}

/// What a client's newest history entry says of its snapshot, at start.
pub(crate) enum Newest {
    /// The snapshot as of that event.
    State(SnapshotState),
    /// A refused connect: the snapshot is what was stored with it, if anything.
    ConnectFailed,
    /// An entry that does not parse: a stored snapshot, if any, is used.
    Unreadable,
}

#[derive(Debug, Clone)]
pub(crate) struct SnapshotState {
    since: u64,
    channel: ChannelId,
    peer: Peer,
    seq: u64,
    last_event: EventKind,
    reason: Option<CloseReason>,
}

impl SnapshotState {
    /// The compact form of a snapshot read back from the store: `(client id, state)`, if the
    /// payload is one that renders back to exactly the same bytes on this node (else it stays
    /// a plain retained message).
    pub(crate) fn from_stored(payload: &[u8], node: &str) -> Option<(String, SnapshotState)> {
        let stored: StoredSnapshot = serde_json::from_slice(payload).ok()?;
        // `online` is not kept: it is `lastEvent != tcpclean`, and a payload that says
        // otherwise does not render back the same, so it stays a plain retained message.
        let client_ip: std::net::SocketAddr = stored.client_ip.parse().ok()?;
        let state = SnapshotState {
            since: stored.since,
            channel: ChannelId(u128::from_str_radix(&stored.channel_id, 16).ok()?),
            peer: client_ip.into(),
            seq: stored.seq,
            last_event: EventKind::parse(&stored.last_event)?,
            reason: match stored.reason {
                Some(reason) => Some(CloseReason::parse(&reason)?),
                None => None,
            },
        };
        let same = state.render(&stored.client_id, node)?;
        (same.as_ref() == payload).then_some((stored.client_id, state))
    }

    /// The state after `event` (of `kind`, on `channel`), read back from the history entry
    /// `seq` seen at `time_ms`.
    fn from_event(
        event: &PresenceEvent,
        kind: EventKind,
        channel: ChannelId,
        seq: u64,
        time_ms: u64,
    ) -> Option<SnapshotState> {
        let client_ip: SocketAddr = event.client_ip.parse().ok()?;
        Some(SnapshotState {
            since: time_ms,
            channel,
            peer: client_ip.into(),
            seq,
            last_event: kind,
            reason: match &event.reason {
                Some(reason) => Some(CloseReason::parse(reason)?),
                None => None,
            },
        })
    }

    /// The state after the `connect` (event `seq`) of the channel `attached`.
    pub(crate) fn of_connect(attached: &Attached, seq: NonZeroU64) -> SnapshotState {
        SnapshotState {
            since: attached.connected_at_ms,
            channel: attached.id,
            peer: attached.peer,
            seq: seq.get(),
            last_event: EventKind::Connect,
            reason: None,
        }
    }

    /// The seq of the `connect` this state is the client's state after.
    fn connect_seq(&self) -> Option<NonZeroU64> {
        if self.last_event == EventKind::Connect && self.reason.is_none() {
            NonZeroU64::new(self.seq)
        } else {
            None
        }
    }

    /// The retained message on `$presence/<client>` that carries this state.
    fn message(&self, client: &ClientId, node: &str) -> Option<Message> {
        Some(Message {
            topic: Topic::from_trusted(format!("{SNAPSHOT_PREFIX}{client}")),
            payload: self.render(client.as_str(), node)?,
            qos: QoS::AtLeastOnce,
            retain: true,
            published_at_ms: self.since,
        })
    }

    fn render(&self, client_id: &str, node: &str) -> Option<Bytes> {
        let snapshot = Snapshot {
            client_id,
            online: self.last_event != EventKind::TcpClean,
            since: self.since,
            channel_id: Shown(self.channel),
            client_ip: Shown(self.peer.addr()),
            seq: self.seq,
            last_event: self.last_event.as_str(),
            reason: self.reason.map(CloseReason::as_str),
            node,
            v: 1,
        };
        let mut json = Vec::with_capacity(SNAPSHOT_JSON_CAPACITY);
        serde_json::to_writer(&mut json, &snapshot).ok()?;
        // Short-lived (staged, sent): the compact state is what stays.
        Some(Bytes::from(json))
    }
}

/// A snapshot as read back from the store.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredSnapshot {
    client_id: String,
    since: u64,
    channel_id: String,
    client_ip: String,
    seq: u64,
    last_event: String,
    reason: Option<String>,
}

/// Bytes reserved for a snapshot's JSON (about 250 with an IPv4 peer).
const SNAPSHOT_JSON_CAPACITY: usize = 320;

/// The retained snapshot on `$presence/<clientId>`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot<'a> {
    client_id: &'a str,
    online: bool,
    /// Since when the client has been in this state, ms since the Unix epoch.
    since: u64,
    channel_id: Shown<ChannelId>,
    client_ip: Shown<SocketAddr>,
    seq: u64,
    last_event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    node: &'a str,
    v: u32,
}

impl Router {
    /// Emits the event of `kind` for a live channel.
    pub(crate) fn emit_for(
        &mut self,
        channel: &ChannelRef,
        kind: EventKind,
        reason: Option<CloseReason>,
        clean_session: bool,
    ) {
        let client = &channel.client;
        let Some(attached) = self.attached(client).filter(|a| a.id == channel.id) else {
            return;
        };
        // A `connect` happens when the channel is attached: its time is the channel's connect
        // time, as the admin API and the `$presence` snapshot show it.
        let time_ms = match kind {
            EventKind::Connect => attached.connected_at_ms,
            _ => now_ms(),
        };
        let stamp = self.stamp(client, time_ms);
        let Some(attached) = self.attached(client) else {
            return;
        };
        let (json, peer) = self.encode_event(client, attached, kind, reason, clean_session, stamp);
        self.record(
            json,
            client.clone(),
            channel.id,
            kind,
            reason,
            stamp,
            Ok(peer),
        );
    }

    /// Emits the event of `kind` for a channel just detached from its session (its end: the
    /// session no longer names it, so nothing the event sets off can end it again).
    pub(crate) fn emit_detached(
        &mut self,
        client: &ClientId,
        attached: &Attached,
        kind: EventKind,
        reason: Option<CloseReason>,
        clean_session: bool,
    ) {
        let stamp = self.stamp(client, now_ms());
        let (json, peer) = self.encode_event(client, attached, kind, reason, clean_session, stamp);
        self.record(
            json,
            client.clone(),
            attached.id,
            kind,
            reason,
            stamp,
            Ok(peer),
        );
    }

    fn encode_event(
        &self,
        client: &ClientId,
        attached: &Attached,
        kind: EventKind,
        reason: Option<CloseReason>,
        clean_session: bool,
        stamp: Stamp,
    ) -> (Option<Bytes>, SocketAddr) {
        let peer = attached.peer.addr();
        let json = self.facts_of(client, attached, clean_session).encode(
            client,
            attached.id,
            kind,
            reason,
            stamp,
        );
        (json, peer)
    }

    /// What the events of `attached`, a channel of `client`, say besides their kind and stamp.
    fn facts_of<'a>(
        &'a self,
        client: &'a ClientId,
        attached: &'a Attached,
        clean_session: bool,
    ) -> Facts<'a> {
        Facts {
            client_ip: Ok(attached.peer.addr()),
            clean_session,
            protocol: attached.protocol.as_str(),
            username: attached.username.as_deref(),
            transport: attached.transport.as_str(),
            node: &self.settings.presence.node_id,
            group_id: client.group(),
            device_id: client.device(),
            refusal: None,
        }
    }

    fn attached(&self, client: &ClientId) -> Option<&Attached> {
        self.sessions.get(client)?.attached.as_ref()
    }

    /// The client's next seq (kept, like the event, in the batch the event is staged in),
    /// for an event at `time_ms`.
    fn stamp(&mut self, client: &ClientId, time_ms: u64) -> Stamp {
        let known = self.known.entry(client.clone()).or_default();
        known.seq += 1;
        Stamp {
            seq: known.seq,
            time_ms,
        }
    }

    /// The optional audit event of a CONNECT refused for its credentials. It has a channel id
    /// of its own (no channel was opened) and takes the client id's next seq like any event.
    pub(crate) fn connect_failed(&mut self, failed: FailedConnect) {
        if !self.settings.presence.connect_failed {
            return;
        }
        let client = failed.client_id.clone();
        let channel = ChannelId::random();
        let stamp = self.stamp(&client, now_ms());
        let json = Facts {
            client_ip: Ok(failed.peer),
            clean_session: failed.clean_session,
            protocol: failed.protocol.as_str(),
            username: failed.username.as_deref(),
            transport: failed.transport.as_str(),
            node: &self.settings.presence.node_id,
            group_id: client.group(),
            device_id: client.device(),
            refusal: Some(failed.reason),
        }
        .encode(&client, channel, EventKind::ConnectFailed, None, stamp);
        let kind = EventKind::ConnectFailed;
        self.record_open_channel(&client);
        self.record(json, client, channel, kind, None, stamp, Ok(failed.peer));
    }

    /// A refused connect becomes the client's newest history entry, which no longer says that
    /// its channel, if it has one open, is open: so that channel is recorded in the store
    /// (`PutChannel`, with what its `tcpclean` needs) until it ends. Recorded again at each
    /// refused connect (rare; the op replaces), so that a record whose batch failed is not
    /// taken as stored.
    fn record_open_channel(&mut self, client: &ClientId) {
        let Some(session) = self.sessions.get(client) else {
            return;
        };
        let Some(attached) = session.attached.as_ref() else {
            return;
        };
        let facts = self.facts_of(client, attached, !session.persistent);
        let Some(info) = facts.channel_info(attached.peer.addr()) else {
            return;
        };
        let id = attached.id;
        self.persister.stage(Op::PutChannel {
            channel_id: id.0,
            record: ChannelRecord {
                client_id: client.to_string(),
                info,
            },
        });
        self.stored_channels.insert(id);
    }

    /// Stages everything an event changes (its history entry, the sink outboxes, for a
    /// `tcpclean` the removal of its channel's record if it has one) and defers its hand-off to
    /// sinks until that is durable; updates the `$presence` snapshot.
    /// `json` is the event ([`Facts::encode`]; `None` if it could not be encoded: nothing is
    /// staged) and `peer` its client address (or the unreadable text of a stored one).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        json: Option<Bytes>,
        client: ClientId,
        channel: ChannelId,
        kind: EventKind,
        reason: Option<CloseReason>,
        stamp: Stamp,
        peer: Result<SocketAddr, &str>,
    ) {
        let Some(json) = json else {
            return;
        };
        let Stamp { seq, time_ms } = stamp;
        let client_id = client.to_string();
        self.stage_history(&client_id, seq, time_ms, &json);
        // A connect needs no record of its channel: while it (or the channel's disconnect) is
        // the client's newest history entry, the channel is open (read back at start). One is
        // stored only where a refused connect came after it (`record_open_channel`).
        if kind == EventKind::TcpClean {
            self.forget_channel_record(channel);
        }
        let sinks = self.sinks_for(&client, kind);
        let outboxes = self.stage_outboxes(sinks, &json, time_ms);
        debug!(event = kind.as_str(), client_id = %client, %channel, seq, reason = ?reason, "presence event");
        RouterStats::add(&self.stats.presence_events[kind as usize], 1);
        let event = Event {
            kind,
            reason,
            client_id: client.clone(),
            channel,
            seq,
            time_ms,
            json,
        };
        self.defer(Deferred::Presence(event, outboxes));
        // After the event is deferred: what the snapshot's delivery sets off (a slow
        // subscriber closed, its tcpclean) is handed on after this event, not before.
        if self.settings.presence.snapshot_topic && kind == EventKind::ConnectFailed {
            self.store_snapshot(&client);
        } else if self.settings.presence.snapshot_topic {
            match peer {
                Ok(client_ip) => {
                    let state = SnapshotState {
                        since: time_ms,
                        channel,
                        peer: client_ip.into(),
                        seq,
                        last_event: kind,
                        reason,
                    };
                    self.publish_snapshot(&client, state);
                }
                Err(client_ip) => {
                    warn!(client_id = %client, client_ip, "presence snapshot skipped: unreadable client address")
                }
            }
        }
    }

    fn stage_history(&mut self, client_id: &str, seq: u64, time_ms: u64, json: &Bytes) {
        self.persister.stage(Op::PutHistory {
            client_id: client_id.to_string(),
            seq,
            time_ms,
            payload: json.clone(),
        });
        let keep = self.settings.presence.history_per_client.max(1);
        if seq > keep {
            self.persister.stage(Op::PruneHistory {
                client_id: client_id.to_string(),
                below_seq: seq - keep + 1,
            });
        }
    }

    /// The sinks whose `status_notice` rules take this event, each once.
    fn sinks_for(&self, client: &ClientId, kind: EventKind) -> Vec<Arc<SinkQueue>> {
        let mut sinks: Vec<Arc<SinkQueue>> = Vec::new();
        for rule in &self.settings.presence.rules {
            let group_ok = rule.groups.is_empty()
                || client
                    .group()
                    .is_some_and(|g| rule.groups.iter().any(|r| r == g));
            if !group_ok || !(rule.events.is_empty() || rule.events.contains(&kind)) {
                continue;
            }
            for id in &rule.sinks {
                match self.sinks.get(id) {
                    Some(sink) if !sinks.iter().any(|s| s.id == *id) => sinks.push(sink.clone()),
                    Some(_) => {}
                    None => {
                        warn!(rule = %rule.id, sink = %id, "rule names a sink that does not exist")
                    }
                }
            }
        }
        sinks
    }

    /// Keeps `$presence/<clientId>` retained with the client's state after this event: in
    /// memory in its compact form (rendered for each new subscription), replacing any full
    /// copy; not in the store, where the event's history entry is what it is rebuilt from.
    /// Rendered now only if someone subscribes to it. The `connect` of the attached channel is
    /// kept as the session's `snapshot_seq` (the rest of the state is the channel's), the
    /// others in a box of their own.
    fn publish_snapshot(&mut self, client: &ClientId, state: SnapshotState) {
        if client.as_str().contains(['/', '+', '#', '\0']) {
            return;
        }
        let topic = format!("{SNAPSHOT_PREFIX}{client}");
        self.retained.remove(topic.as_str());
        let subscribers = self.targets_of(&topic, QoS::AtLeastOnce);
        let message = if subscribers.is_empty() {
            None
        } else {
            state.message(client, &self.settings.presence.node_id)
        };
        let session = self.sessions.get_mut(client);
        let known = self.known.entry(client.clone()).or_default();
        match (session, state.connect_seq()) {
            (Some(session), Some(seq))
                if session.attached.as_ref().is_some_and(|attached| {
                    attached.id == state.channel
                        && attached.peer == state.peer
                        && attached.connected_at_ms == state.since
                }) =>
            {
                session.snapshot_seq = Some(seq);
                known.snapshot = None;
            }
            (session, _) => {
                if let Some(session) = session {
                    session.snapshot_seq = None;
                }
                known.set_snapshot(state);
            }
        }
        if let Some(message) = message {
            for (subscriber, granted) in subscribers {
                self.deliver(&subscriber, &message, granted, false);
            }
        }
    }

    /// The client's `$presence` snapshot, if it has one.
    fn snapshot_of(&self, client: &str) -> Option<SnapshotState> {
        self.snapshot_in(client, self.known.get(client)?)
    }

    /// The snapshot of `client`, whose entry in `known` is `known`: its box, or while it is
    /// the `connect` of the attached channel, read from that channel.
    fn snapshot_in(&self, client: &str, known: &Known) -> Option<SnapshotState> {
        if let Some(snapshot) = &known.snapshot {
            return Some((**snapshot).clone());
        }
        let session = self.sessions.get(client)?;
        Some(SnapshotState::of_connect(
            session.attached.as_ref()?,
            session.snapshot_seq?,
        ))
    }

    /// A channel just detached (`Session::detach`): its snapshot, if it was read from the
    /// channel (`snapshot_seq`), goes into a box of its own, which the channel's end replaces.
    pub(crate) fn keep_snapshot_apart(
        &mut self,
        client: &ClientId,
        attached: &Attached,
        snapshot_seq: Option<NonZeroU64>,
    ) {
        if let Some(seq) = snapshot_seq {
            self.known
                .entry(client.clone())
                .or_default()
                .set_snapshot(SnapshotState::of_connect(attached, seq));
        }
    }

    /// Drops the client's snapshot (a client allowed to publish on its `$presence` topic
    /// replaces or clears it); whether it had one.
    pub(crate) fn take_snapshot(&mut self, client: &str) -> bool {
        let boxed = self
            .known
            .get_mut(client)
            .and_then(|known| known.snapshot.take())
            .is_some();
        let read_from_channel = self
            .sessions
            .get_mut(client)
            .and_then(|s| s.snapshot_seq.take())
            .is_some();
        boxed || read_from_channel
    }

    /// A `connect_failed` event leaves the client's snapshot as it was but becomes its newest
    /// history entry, which the snapshot cannot be rebuilt from: so the snapshot is stored. At
    /// start it is used while the newest entry is a `connect_failed`, and deleted otherwise.
    fn store_snapshot(&mut self, client: &ClientId) {
        let node = &self.settings.presence.node_id;
        let Some(message) = self
            .snapshot_of(client.as_str())
            .and_then(|state| state.message(client, node))
        else {
            return;
        };
        self.persister.stage(Op::PutRetained {
            message: crate::router::to_stored(&message),
        });
    }

    /// The `$presence` snapshots a new subscription to `filter` receives, rendered.
    pub(crate) fn snapshots_matching(&self, filter: &str) -> Vec<Message> {
        let Some(clients) = filter.strip_prefix(SNAPSHOT_PREFIX) else {
            return Vec::new();
        };
        let node = &self.settings.presence.node_id;
        if !clients.contains(['+', '#']) {
            return self
                .known
                .get_key_value(clients)
                .and_then(|(client, known)| {
                    self.snapshot_in(client.as_str(), known)?
                        .message(client, node)
                })
                .into_iter()
                .collect();
        }
        // One topic buffer for the whole walk, not one allocation per known client.
        let mut topic = String::from(SNAPSHOT_PREFIX);
        self.known
            .iter()
            .filter(|(client, _)| {
                topic.truncate(SNAPSHOT_PREFIX.len());
                topic.push_str(client.as_str());
                matches(filter, &topic)
            })
            .filter_map(|(client, known)| {
                self.snapshot_in(client.as_str(), known)?
                    .message(client, node)
            })
            .collect()
    }

    /// At start-up, before any connection: every channel the store says was open when the
    /// broker died gets its `tcpclean` with reason `broker_restart`.
    pub(crate) fn close_channels_left_open(
        &mut self,
        records: Vec<(u128, ChannelRecord)>,
        from_history: Vec<(String, ChannelId, ChannelFacts)>,
    ) {
        let mut left = Vec::with_capacity(records.len() + from_history.len());
        for (id, record) in records {
            let channel = ChannelId(id);
            self.stored_channels.insert(channel);
            let facts = ChannelFacts::read(&record.info).map_err(|e| e.to_string());
            left.push((channel, record.client_id, facts));
        }
        for (client_id, channel, facts) in from_history {
            if !self.stored_channels.contains(&channel) {
                left.push((channel, client_id, Ok(facts)));
            }
        }
        left.sort_by_key(|(channel, _, _)| *channel);
        let mut closed = 0_usize;
        for (channel, client_id, facts) in left {
            match (facts, self.known_client_id(&client_id)) {
                (Ok(facts), Ok(client)) => {
                    info!(client_id = %client, %channel, reason = CloseReason::BrokerRestart.as_str(), "channel closed");
                    closed += 1;
                    let kind = EventKind::TcpClean;
                    let reason = Some(CloseReason::BrokerRestart);
                    let peer = facts.ip.parse().map_err(|_| facts.ip.as_str());
                    let stamp = self.stamp(&client, now_ms());
                    let json = Facts {
                        client_ip: peer,
                        clean_session: facts.cs,
                        protocol: &facts.p,
                        username: facts.u.as_deref(),
                        transport: &facts.t,
                        node: &facts.n,
                        group_id: client.group(),
                        device_id: client.device(),
                        refusal: None,
                    }
                    .encode(&client, channel, kind, reason, stamp);
                    self.record(json, client, channel, kind, reason, stamp, peer);
                }
                (Err(e), _) => {
                    warn!(%channel, %client_id, error = %e, "unreadable channel record; dropped");
                    self.forget_channel_record(channel);
                }
                (_, Err(e)) => {
                    warn!(%channel, %client_id, error = %e, "channel record with an unusable client id; dropped");
                    self.forget_channel_record(channel);
                }
            }
        }
        if closed > 0 {
            info!(
                channels = closed,
                "closed the channels the previous run left open (tcpclean broker_restart)"
            );
        }
    }

    /// A `tcpclean` whose batch could not be stored (and so was not handed on): its channel's
    /// connect may stay its client's newest history entry or, once another event of the client
    /// is stored, not. Recorded (the event's JSON has what a record needs), so that the next
    /// start gives the channel its `broker_restart` either way.
    pub(crate) fn record_unstored_close(&mut self, event: &Event) {
        self.persister.stage(Op::PutChannel {
            channel_id: event.channel.0,
            record: ChannelRecord {
                client_id: event.client_id.to_string(),
                info: event.json.clone(),
            },
        });
        self.stored_channels.insert(event.channel);
    }

    /// Deletes the stored record of `channel`, if there is one.
    fn forget_channel_record(&mut self, channel: ChannelId) {
        if self.stored_channels.remove(&channel) {
            self.persister.stage(Op::DeleteChannel {
                channel_id: channel.0,
            });
        }
    }

    /// Stages a message that `outflow` rules take, once per sink.
    pub(crate) fn outflow(&mut self, message: &Message, publisher: &ClientId) {
        let topic = message.topic.as_str();
        let mut sinks: Vec<Arc<SinkQueue>> = Vec::new();
        for rule in &self.settings.presence.outflow {
            if !rule.filters.iter().any(|f| matches(f, topic)) {
                continue;
            }
            for id in &rule.sinks {
                if let Some(sink) = self.sinks.get(id)
                    && !sinks.iter().any(|s| s.id == *id)
                {
                    sinks.push(sink.clone());
                }
            }
        }
        if sinks.is_empty() {
            return;
        }
        let message_id = format!("{}-{}", self.settings.presence.node_id, self.next_outbox_id);
        let document = serde_json::json!({
            "topic": topic,
            "clientId": publisher.as_str(),
            "qos": message.qos.as_u8(),
            "payload": base64::engine::general_purpose::STANDARD.encode(&message.payload),
            "time": message.published_at_ms,
            "messageId": message_id,
        });
        let Ok(json) = serde_json::to_vec(&document).map(Bytes::from) else {
            return;
        };
        let outboxes = self.stage_outboxes(sinks, &json, message.published_at_ms);
        self.defer(Deferred::Outbox(outboxes));
    }

    /// Stages one outbox entry per sink for `json`; returns them for the hand-off after commit.
    fn stage_outboxes(
        &mut self,
        sinks: Vec<Arc<SinkQueue>>,
        json: &Bytes,
        added_ms: u64,
    ) -> Vec<(Arc<SinkQueue>, OutboxEntry)> {
        let mut outboxes = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let id = self.next_outbox_id;
            self.next_outbox_id += 1;
            self.persister.stage(Op::PutOutbox {
                sink: sink.id.clone(),
                id,
                payload: json.clone(),
            });
            outboxes.push((
                sink,
                OutboxEntry {
                    id,
                    payload: json.clone(),
                    added_ms,
                },
            ));
        }
        outboxes
    }

    /// After commit: entries go to their sinks' outboxes.
    pub(crate) fn fill_outboxes(&mut self, outboxes: Vec<(Arc<SinkQueue>, OutboxEntry)>) {
        for (sink, entry) in outboxes {
            if let Some(dropped) = sink.push(entry) {
                warn!(sink = %sink.id, id = dropped.id, "sink outbox full: dropped its oldest entry");
                self.persister.stage(Op::DeleteOutbox {
                    sink: sink.id.clone(),
                    id: dropped.id,
                });
            }
        }
    }

    /// After commit: the event goes to the sinks' outboxes and to the event listener.
    pub(crate) fn hand_off(&mut self, event: Event, outboxes: Vec<(Arc<SinkQueue>, OutboxEntry)>) {
        self.fill_outboxes(outboxes);
        if let Some(events) = &self.events
            && events.try_send(event).is_err()
        {
            RouterStats::add(&self.stats.events_dropped, 1);
        }
    }
}

impl Router {
    /// The state of one client id, known or not.
    pub(crate) fn client_state(&self, id: &str) -> ClientState {
        let session = self.sessions.get(id);
        let channels: Vec<ChannelInfo> = session
            .and_then(|s| s.attached.as_ref())
            .map(|a| ChannelInfo {
                channel_id: a.id.to_string(),
                client_ip: a.peer.addr().to_string(),
                connected_at: a.connected_at_ms,
                protocol: a.protocol.as_str(),
                transport: a.transport.as_str(),
            })
            .into_iter()
            .collect();
        ClientState {
            client_id: id.to_string(),
            online: !channels.is_empty(),
            channels,
            seq: self.known.get(id).map_or(0, |known| known.seq),
        }
    }

    /// Known client ids (any that ever had a presence event, or a session: every session's
    /// client id is in `known`) in id order. A page starts where the last one ended (and,
    /// for a group, where the group's ids start) instead of sorting every known id.
    pub(crate) fn list_clients(
        &self,
        group: Option<&str>,
        online: Option<bool>,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<ClientState> {
        let prefix = group.map(|g| format!("{g}{}", herald_protocol::client_id::SEPARATOR));
        let prefix = prefix.as_deref();
        let start = match (after, prefix) {
            (Some(after), Some(prefix)) if after < prefix => Bound::Included(prefix),
            (Some(after), _) => Bound::Excluded(after),
            (None, Some(prefix)) => Bound::Included(prefix),
            (None, None) => Bound::Unbounded,
        };
        self.known
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(client, _)| client)
            .take_while(|c| prefix.is_none_or(|p| c.as_str().starts_with(p)))
            .filter(|c| group.is_none_or(|g| c.group() == Some(g)))
            .map(|c| self.client_state(c.as_str()))
            .filter(|s| online.is_none_or(|o| s.online == o))
            .take(limit)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_snapshot_comes_back_compact_only_when_it_renders_identically() {
        for (online, last_event, reason) in [
            (true, EventKind::Connect, None),
            (
                true,
                EventKind::Disconnect,
                Some(CloseReason::ClientDisconnect),
            ),
            (false, EventKind::TcpClean, Some(CloseReason::BrokerRestart)),
        ] {
            let state = SnapshotState {
                since: 1_732_345_678_901,
                channel: ChannelId::random(),
                peer: "[2001:db8::7]:51514"
                    .parse::<SocketAddr>()
                    .expect("address")
                    .into(),
                seq: 42,
                last_event,
                reason,
            };
            let payload = state.render("GID_demo@@@dev-1", "herald-1").expect("JSON");
            let text = std::str::from_utf8(&payload).expect("UTF-8");
            assert!(text.contains(&format!("\"online\":{online},")), "{text}");
            assert!(
                text.contains("\"clientIp\":\"[2001:db8::7]:51514\""),
                "{text}"
            );
            // `online` is derived from `lastEvent`: a payload where they disagree stays plain.
            let odd = text.replace(
                &format!("\"online\":{online},"),
                &format!("\"online\":{},", !online),
            );
            assert!(SnapshotState::from_stored(odd.as_bytes(), "herald-1").is_none());
            let (id, back) = SnapshotState::from_stored(&payload, "herald-1").expect("compact");
            assert_eq!(id, "GID_demo@@@dev-1");
            assert_eq!(back.render(&id, "herald-1"), Some(payload.clone()));
            // Written by another node, or by hand: kept as it is.
            assert!(SnapshotState::from_stored(&payload, "herald-2").is_none());
        }
        let by_hand = br#"{"clientId":"x","online":true,"since":1,"channelId":"00","clientIp":"1.2.3.4:5","seq":1,"lastEvent":"connect","node":"herald-1","v":1,"extra":1}"#;
        assert!(SnapshotState::from_stored(by_hand, "herald-1").is_none());
        assert!(SnapshotState::from_stored(b"not json", "herald-1").is_none());
    }

    /// The borrowed encoding writes exactly what serialising a [`PresenceEvent`] writes (the
    /// type sinks and tests read events back into).
    #[test]
    fn events_encode_as_a_presence_event_serialises() {
        let channel = ChannelId::random();
        let cases = [
            (
                "GID_demo@@@dev-1",
                "203.0.113.7:51514",
                EventKind::Connect,
                None,
                None,
                Some("Signature|AK|herald-demo"),
            ),
            (
                "GID_demo@@@dev-1",
                "[2001:db8::7]:1883",
                EventKind::TcpClean,
                Some(CloseReason::KeepaliveTimeout),
                None,
                None,
            ),
            (
                "plain \"quoted\" id",
                "10.0.0.1:2",
                EventKind::ConnectFailed,
                None,
                Some("bad_username_or_password"),
                Some("user"),
            ),
        ];
        for (id, ip, kind, reason, refusal, username) in cases {
            let client = ClientId::parse_any(id, 256).expect("client id");
            let stamp = Stamp {
                seq: 42,
                time_ms: 1_732_345_678_901,
            };
            let facts = Facts {
                client_ip: Ok(ip.parse().expect("address")),
                clean_session: true,
                protocol: "mqtt3.1.1",
                username,
                transport: "tcp",
                node: "herald-1",
                group_id: client.group(),
                device_id: client.device(),
                refusal,
            };
            let json = facts
                .encode(&client, channel, kind, reason, stamp)
                .expect("JSON");
            let expected = PresenceEvent {
                event_type: kind.as_str().to_string(),
                client_id: id.to_string(),
                channel_id: channel.to_string(),
                client_ip: ip.to_string(),
                time: stamp.time_ms,
                seq: 42,
                event_id: format!("{id}:42"),
                reason: reason.map(|r| r.as_str()).or(refusal).map(str::to_string),
                group_id: client.group().map(str::to_string),
                device_id: client.device().map(str::to_string),
                node: "herald-1".to_string(),
                clean_session: true,
                protocol: "mqtt3.1.1".to_string(),
                username: username.map(str::to_string),
                transport: "tcp".to_string(),
                v: 1,
            };
            assert_eq!(
                std::str::from_utf8(&json).expect("UTF-8"),
                serde_json::to_string(&expected).expect("JSON")
            );
            // A channel record keeps the facts in short form; one an older build wrote (the
            // connect event itself) reads back the same.
            let info = facts
                .channel_info(ip.parse().expect("address"))
                .expect("channel info");
            assert!(info.len() * 2 < json.len(), "{info:?}");
            for stored in [&info, &json] {
                let back = ChannelFacts::read(stored).expect("channel facts");
                assert_eq!(back.ip, ip);
                assert!(back.cs);
                assert_eq!((back.p.as_str(), back.t.as_str()), ("mqtt3.1.1", "tcp"));
                assert_eq!(back.u.as_deref(), username);
                assert_eq!(back.n, "herald-1");
            }
            assert!(ChannelFacts::read(b"{}").is_err());
            // An address read back from a stored event that does not parse is kept as text.
            let facts = Facts {
                client_ip: Err("somewhere"),
                ..facts
            };
            let json = facts
                .encode(&client, channel, kind, reason, stamp)
                .expect("JSON");
            let back: PresenceEvent = serde_json::from_slice(&json).expect("event");
            assert_eq!(back.client_ip, "somewhere");
        }
    }

    #[test]
    fn what_is_kept_per_known_client_is_small() {
        // One per client id ever seen, online or not (docs/benchmarks.md).
        let size = std::mem::size_of::<Known>();
        assert!(size <= 16, "Known is {size} bytes");
        let size = std::mem::size_of::<SnapshotState>();
        assert!(size <= 64, "SnapshotState is {size} bytes");
    }
}
