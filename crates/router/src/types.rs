//! The router's vocabulary: inputs from connections, outputs to them, events, settings.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use herald_protocol::{ClientId, Packet, PacketId, Protocol, QoS, Topic, Will};
use tokio::sync::oneshot;

/// A channel's unique 128-bit id, printed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u128);

impl ChannelId {
    /// A new id: the time in ms since the Unix epoch in the top 48 bits, 80 random bits below
    /// (the layout of a UUIDv7, without its version bits). Unique like a random id, but ids of
    /// channels opened together are close, so the store inserts each commit's new channel
    /// records into a few B-tree pages instead of one random page per channel.
    pub fn random() -> ChannelId {
        let time = u128::from(now_ms() & ((1 << 48) - 1));
        let random = rand::random::<u128>() & ((1 << 80) - 1);
        ChannelId((time << 80) | random)
    }
}

/// A peer address kept for long (a session's channel, a `$presence` snapshot): 19 bytes where
/// a `SocketAddr` takes 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    ip: std::net::IpAddr,
    port: u16,
}

impl Peer {
    pub fn addr(self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Peer {
        Peer {
            ip: addr.ip(),
            port: addr.port(),
        }
    }
}

/// A live channel as the router addresses it: the client id its session is under, and the
/// channel's own id. Inputs carry it, so the router finds the session in one lookup and keeps
/// no map from channel ids to client ids (an entry per connection). A channel that is no
/// longer its session's attached one (taken over, closed) is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRef {
    pub client: ClientId,
    pub id: ChannelId,
}

impl ChannelRef {
    pub fn new(client: ClientId, id: ChannelId) -> ChannelRef {
        ChannelRef { client, id }
    }
}

/// The channel id, as logs name a channel.
impl fmt::Display for ChannelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.id.fmt(f)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Every [`CloseReason`].
const ALL_CLOSE_REASONS: [CloseReason; 12] = [
    CloseReason::ClientDisconnect,
    CloseReason::SocketClosed,
    CloseReason::KeepaliveTimeout,
    CloseReason::TakenOver,
    CloseReason::ProtocolError,
    CloseReason::Kicked,
    CloseReason::AuthRevoked,
    CloseReason::ServerShutdown,
    CloseReason::BrokerRestart,
    CloseReason::SlowConsumer,
    CloseReason::NotAuthorized,
    CloseReason::StorageFailure,
];

/// Why a channel ended. Every channel ends exactly once, with one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The socket closed or failed without a DISCONNECT.
    SocketClosed,
    /// Nothing arrived within 1.5x the keepalive.
    KeepaliveTimeout,
    /// A newer connection with the same client id took over.
    TakenOver,
    /// The client broke the protocol (malformed packet, second CONNECT, a limit).
    ProtocolError,
    /// The admin API closed the connection.
    Kicked,
    /// The credentials the connection relied on were revoked or expired.
    AuthRevoked,
    /// The broker is shutting down.
    ServerShutdown,
    /// The broker died with the channel open; reported at its next start.
    BrokerRestart,
    /// The client did not read fast enough and its outbox filled.
    SlowConsumer,
    /// The client published where its permissions do not allow.
    NotAuthorized,
    /// The broker could not make the client's messages durable.
    StorageFailure,
}

impl CloseReason {
    /// The reason named `name` in events (the inverse of [`CloseReason::as_str`]).
    pub fn parse(name: &str) -> Option<CloseReason> {
        ALL_CLOSE_REASONS.into_iter().find(|r| r.as_str() == name)
    }

    /// The reason as it appears in presence events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::SocketClosed => "socket_closed",
            CloseReason::KeepaliveTimeout => "keepalive_timeout",
            CloseReason::TakenOver => "taken_over",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Kicked => "kicked",
            CloseReason::AuthRevoked => "auth_revoked",
            CloseReason::ServerShutdown => "server_shutdown",
            CloseReason::BrokerRestart => "broker_restart",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::NotAuthorized => "not_authorized",
            CloseReason::StorageFailure => "storage_failure",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transport a channel arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }
}

/// What the router sends to a connection task.
#[derive(Debug)]
pub enum Outgoing {
    Packet(Packet),
    /// Flush what is queued, then close the socket.
    Close(CloseReason),
}

/// An application message as the router routes it. Cloning shares the payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Topic,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// When the broker received it, ms since the Unix epoch.
    pub published_at_ms: u64,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("payload", &format_args!("<{} bytes>", self.payload.len()))
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .finish()
    }
}

/// An accepted CONNECT, after authentication, handed to the router.
#[derive(Debug)]
pub struct ConnectRequest {
    pub channel: ChannelId,
    pub client_id: ClientId,
    pub clean_session: bool,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub protocol: Protocol,
    pub peer: SocketAddr,
    pub transport: Transport,
    pub outbox: crate::Outbox,
}

/// What connection tasks (and the admin side) tell the router.
#[derive(Debug)]
pub enum Input {
    Connect(Box<ConnectRequest>),
    Publish {
        channel: ChannelRef,
        publish: herald_protocol::Publish,
    },
    PubAck {
        channel: ChannelRef,
        packet_id: PacketId,
    },
    PubRec {
        channel: ChannelRef,
        packet_id: PacketId,
    },
    PubRel {
        channel: ChannelRef,
        packet_id: PacketId,
    },
    PubComp {
        channel: ChannelRef,
        packet_id: PacketId,
    },
    /// Filters with the QoS asked for, or `None` where the connection refused the filter
    /// (permissions, limits): those get 0x80.
    Subscribe {
        channel: ChannelRef,
        packet_id: PacketId,
        filters: Vec<(String, Option<QoS>)>,
    },
    Unsubscribe {
        channel: ChannelRef,
        packet_id: PacketId,
        filters: Vec<String>,
    },
    /// An acknowledgement for a PUBLISH the connection did not route (a token upload, an
    /// ignored denied publish), sent in order behind the channel's pending acknowledgements.
    Acknowledge {
        channel: ChannelRef,
        packet: Packet,
    },
    /// The one exit path of every channel.
    Closed {
        channel: ChannelRef,
        reason: CloseReason,
    },
    /// A message from inside the broker (the admin API, the `mqtt` sink). `done` is answered
    /// once every copy that must be kept is durable.
    Deliver {
        message: Message,
        done: Option<oneshot::Sender<()>>,
    },
    /// A sink's task delivered these outbox entries: delete them from the store.
    OutboxDelivered {
        sink: String,
        ids: Vec<u64>,
    },
    /// The state of these client ids (the admin API).
    QueryClients {
        ids: Vec<String>,
        reply: oneshot::Sender<Vec<ClientState>>,
    },
    /// A page of known client ids in id order, after `after`, filtered by group and state.
    ListClients {
        group: Option<String>,
        online: Option<bool>,
        after: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Vec<ClientState>>,
    },
    /// Close the client's channel (reason `kicked`); answers whether it had one.
    Kick {
        client_id: String,
        reply: oneshot::Sender<bool>,
    },
    /// Store `ops` (tokens, device credentials: state the router does not own) in order with
    /// everything else; `done` is answered once they are durable and dropped if they failed.
    Persist {
        ops: Vec<herald_store::Op>,
        done: oneshot::Sender<()>,
    },
    /// A CONNECT refused for its credentials, for the optional `connect_failed` event.
    ConnectFailed(Box<FailedConnect>),
    /// Close every channel (reason `server_shutdown`); answer once their events are durable.
    CloseAll {
        done: oneshot::Sender<()>,
    },
    /// Close every channel, make everything durable, then answer.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

impl Input {
    /// The channel a packet input came from (`None` for a CONNECT, a close and the inputs
    /// from inside the broker).
    pub(crate) fn packet_channel(&self) -> Option<&ChannelRef> {
        match self {
            Input::Publish { channel, .. }
            | Input::PubAck { channel, .. }
            | Input::PubRec { channel, .. }
            | Input::PubRel { channel, .. }
            | Input::PubComp { channel, .. }
            | Input::Subscribe { channel, .. }
            | Input::Unsubscribe { channel, .. }
            | Input::Acknowledge { channel, .. } => Some(channel),
            _ => None,
        }
    }
}

/// One open channel of a client, as the query API reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelInfo {
    pub channel_id: String,
    pub client_ip: String,
    pub connected_at: u64,
    pub protocol: &'static str,
    pub transport: &'static str,
}

/// What the broker knows of a client id right now (DESIGN.md 5.5).
#[derive(Debug, Clone)]
pub struct ClientState {
    pub client_id: String,
    pub online: bool,
    pub channels: Vec<ChannelInfo>,
    /// The last presence seq (0: never seen). The event itself is in the store's history
    /// (`HistoryReader::events`) once the state is reported.
    pub seq: u64,
}

/// What the `connect_failed` event reports of a refused CONNECT.
#[derive(Debug, Clone)]
pub struct FailedConnect {
    pub client_id: ClientId,
    pub peer: SocketAddr,
    pub username: Option<String>,
    pub protocol: Protocol,
    pub transport: Transport,
    pub clean_session: bool,
    /// The refusal, e.g. `bad_username_or_password`.
    pub reason: &'static str,
}

/// The kinds of presence event (DESIGN.md 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Connect,
    Disconnect,
    TcpClean,
    /// Optional (`[presence] connect_failed`): a CONNECT refused for its credentials.
    ConnectFailed,
}

impl EventKind {
    /// The kind named `name` in configs and events.
    pub fn parse(name: &str) -> Option<EventKind> {
        match name {
            "connect" => Some(EventKind::Connect),
            "disconnect" => Some(EventKind::Disconnect),
            "tcpclean" => Some(EventKind::TcpClean),
            "connect_failed" => Some(EventKind::ConnectFailed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::TcpClean => "tcpclean",
            EventKind::ConnectFailed => "connect_failed",
        }
    }
}

/// One presence event for one channel: the typed parts the broker needs, and the event as
/// DESIGN.md 5.1 JSON, exactly as sinks and subscribers receive it.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub reason: Option<CloseReason>,
    pub client_id: ClientId,
    pub channel: ChannelId,
    /// Per client id, strictly increasing over all its events; survives restarts.
    pub seq: u64,
    pub time_ms: u64,
    pub json: Bytes,
}

/// A `status_notice` rule, as the router matches it: events of these groups (all when empty)
/// and kinds (all when empty) go to these sinks.
#[derive(Debug, Clone)]
pub struct StatusRule {
    pub id: String,
    pub groups: Vec<String>,
    pub events: Vec<EventKind>,
    pub sinks: Vec<String>,
}

/// An `outflow` rule: messages clients publish on these filters go to these sinks as JSON
/// `{topic, clientId, qos, payload (base64), time, messageId}`.
#[derive(Debug, Clone)]
pub struct OutflowRule {
    pub id: String,
    pub filters: Vec<String>,
    pub sinks: Vec<String>,
}

/// Presence settings (DESIGN.md 5 and 6).
#[derive(Debug, Clone)]
pub struct PresenceSettings {
    /// Reported as `node` in every event.
    pub node_id: String,
    /// Events kept per client id for the history query.
    pub history_per_client: u64,
    /// Keep `$presence/<clientId>` retained with the client's current state.
    pub snapshot_topic: bool,
    /// Emit `connect_failed` for CONNECTs refused for their credentials (CONNACK 4 or 5).
    pub connect_failed: bool,
    pub rules: Vec<StatusRule>,
    pub outflow: Vec<OutflowRule>,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        PresenceSettings {
            node_id: "herald-1".into(),
            history_per_client: 100,
            snapshot_topic: true,
            connect_failed: false,
            rules: Vec::new(),
            outflow: Vec::new(),
        }
    }
}

/// The per-session queue limits: small and `Copy`, so the per-message path takes them without
/// cloning the whole settings.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_inflight: usize,
    pub max_queued_messages: usize,
    pub max_queue_age: Duration,
}

/// Limits and policies the router enforces (DESIGN.md 2 and 4).
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub max_subscriptions: usize,
    pub max_inflight: usize,
    pub max_queued_messages: usize,
    pub max_queue_age: Duration,
    /// Incoming QoS 2 messages awaiting PUBREL, per client.
    pub max_incoming_qos2: usize,
    /// How often the store is flushed ([`Store::flush`]): with `storage.sync = "interval"`,
    /// made durable; in both modes, the operations waiting in its write-ahead log handed to a
    /// checkpoint, so that a quiet broker does not hold them for long.
    ///
    /// [`Store::flush`]: herald_store::Store::flush
    pub flush_interval: Option<Duration>,
    pub presence: PresenceSettings,
}

impl RouterSettings {
    pub fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            max_inflight: self.max_inflight,
            max_queued_messages: self.max_queued_messages,
            max_queue_age: self.max_queue_age,
        }
    }
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            max_subscriptions: 30,
            max_inflight: 64,
            max_queued_messages: 10_000,
            max_queue_age: Duration::from_secs(3 * 24 * 3600),
            max_incoming_qos2: 64,
            flush_interval: None,
            presence: PresenceSettings::default(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_parse_back_from_their_names() {
        for reason in ALL_CLOSE_REASONS {
            assert_eq!(CloseReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(CloseReason::parse("tired"), None);
    }

    #[test]
    fn channel_ids_are_unique_32_hex_digits_and_grow_with_time() {
        let first = ChannelId::random();
        let ids: std::collections::HashSet<ChannelId> =
            (0..10_000).map(|_| ChannelId::random()).collect();
        assert_eq!(ids.len(), 10_000);
        std::thread::sleep(Duration::from_millis(2));
        let later = ChannelId::random();
        assert!(later > first && ids.iter().all(|id| *id < later));
        let text = later.to_string();
        assert_eq!(text.len(), 32);
        assert!(text.chars().all(|c| c.is_ascii_hexdigit()));
        // The top 48 bits are the time in ms.
        let ms = (later.0 >> 80) as u64;
        assert!(ms.abs_diff(now_ms()) < 60_000, "{ms}");
    }
}
