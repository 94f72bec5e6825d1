//! One connection's task: the socket, its buffers, and a `select!` over socket reads, the
//! outbox from the router, and the keepalive deadline. Every end goes through one exit:
//! `Input::Closed` with the reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use herald_auth::{Principal, UPLOAD_TOKEN_TOPIC};
use herald_protocol::codec::check_filter_syntax;
use herald_protocol::{Codec, DecodeError, Packet, Publish, QoS};
use herald_router::{ChannelId, CloseReason, Input, Outgoing, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use tracing::{debug, info, warn};

use crate::guard::{Bucket, ServerStats};
use crate::{Context, DeniedPublish, handshake};

/// Packets written per wake-up at most, so one busy channel cannot starve its reads.
const WRITE_BATCH: usize = 64;

/// How often a token or device-credential connection checks that its credentials still hold.
const AUTH_RECHECK: Duration = Duration::from_secs(1);

/// The framed socket: read buffer, write buffer and codec.
pub(crate) struct Framed<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    codec: Codec,
}

/// The end of a read: a packet, a clean EOF, or an error.
pub(crate) enum ReadError {
    Closed,
    Io(std::io::Error),
    Decode(DecodeError),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    pub(crate) fn new(stream: S, max_packet_size: u32) -> Framed<S> {
        Framed {
            stream,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            codec: Codec::new(max_packet_size),
        }
    }

    /// Reads the next packet. Cancel-safe: bytes read stay in the buffer.
    pub(crate) async fn read_packet(&mut self) -> Result<Packet, ReadError> {
        loop {
            match self.codec.decode(&mut self.read_buf) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(e) => return Err(ReadError::Decode(e)),
            }
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    pub(crate) fn queue(&mut self, packet: Packet) {
        if let Err(e) = self.codec.encode(packet, &mut self.write_buf) {
            warn!(error = %e, "dropping a packet that cannot be encoded");
        }
    }

    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
            if self.write_buf.capacity() > 64 * 1024 {
                // Give back the memory of a burst.
                self.write_buf = BytesMut::new();
            }
        }
        self.stream.flush().await
    }

    pub(crate) async fn write(&mut self, packet: Packet) -> std::io::Result<()> {
        self.queue(packet);
        self.flush().await
    }

    pub(crate) async fn close(mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// Runs a connection from accept to close.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    context: Arc<Context>,
) {
    let mut framed = Framed::new(stream, context.settings.max_packet_size);
    let Some(accepted) = handshake::accept(&mut framed, peer, transport, &context).await else {
        framed.close().await;
        return;
    };
    let channel = ChannelId::random();
    let (outbox, outbox_rx) = mpsc::channel(context.settings.outbox_capacity);
    let keep_alive = accepted.connect.keep_alive;
    let request = handshake::connect_request(
        accepted.connect,
        channel,
        &accepted.principal,
        peer,
        transport,
        outbox,
    );
    if context
        .router
        .inputs
        .send(Input::Connect(Box::new(request)))
        .await
        .is_err()
    {
        framed.close().await;
        return;
    }
    info!(client_id = %accepted.principal.client_id, %channel, %peer, transport = transport.as_str(), "client connected");
    let abuse = context.settings.abuse.clone();
    let mut session = Channel {
        framed,
        channel,
        principal: accepted.principal,
        context,
        outbox_rx,
        keep_alive: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        messages: Bucket::new(u64::from(abuse.messages_per_sec)),
        bytes: Bucket::new(abuse.bytes_per_sec),
    };
    let reason = session.serve().await;
    let _ = session
        .context
        .router
        .inputs
        .send(Input::Closed { channel, reason })
        .await;
    debug!(%channel, reason = reason.as_str(), "connection task ended");
    session.framed.close().await;
}

struct Channel<S> {
    framed: Framed<S>,
    channel: ChannelId,
    principal: Principal,
    context: Arc<Context>,
    outbox_rx: mpsc::Receiver<Outgoing>,
    keep_alive: Option<Duration>,
    /// `limits.max_messages_per_sec`, `limits.max_bytes_per_sec`.
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    /// The connection's loop; returns why it ended.
    async fn serve(&mut self) -> CloseReason {
        let far_future = Duration::from_secs(100 * 365 * 24 * 3600);
        let mut deadline = Instant::now() + self.keep_alive.unwrap_or(far_future);
        // Token and device-credential connections re-check their credentials every second:
        // revocation, refresh and expiry end them with `auth_revoked`.
        let rechecks = self.principal.relies_on_registry();
        let mut recheck = tokio::time::interval(AUTH_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                read = self.framed.read_packet() => {
                    let packet = match read {
                        Ok(packet) => packet,
                        Err(e) => return self.read_failed(e),
                    };
                    if let Some(keep_alive) = self.keep_alive {
                        deadline = Instant::now() + keep_alive;
                    }
                    if let Some(reason) = self.dispatch(packet).await {
                        return reason;
                    }
                }
                out = self.outbox_rx.recv() => {
                    if let Some(reason) = self.write_outbox(out).await {
                        return reason;
                    }
                }
                _ = recheck.tick(), if rechecks => {
                    if let Some(reason) = self.recheck_credentials() {
                        return reason;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    info!(client_id = %self.principal.client_id, channel = %self.channel, "keepalive expired (1.5x the client's keepalive without a packet)");
                    return CloseReason::KeepaliveTimeout;
                }
            }
        }
    }

    fn recheck_credentials(&self) -> Option<CloseReason> {
        let registry = self.context.auth.registry();
        match self.principal.still_valid(registry, herald_auth::now_ms()) {
            Ok(()) => None,
            Err(why) => {
                info!(client_id = %self.principal.client_id, channel = %self.channel, why, "closing: credentials no longer valid");
                Some(CloseReason::AuthRevoked)
            }
        }
    }

    fn read_failed(&self, error: ReadError) -> CloseReason {
        let client = &self.principal.client_id;
        match error {
            ReadError::Closed => CloseReason::SocketClosed,
            ReadError::Io(e) => {
                debug!(client_id = %client, error = %e, "socket error");
                CloseReason::SocketClosed
            }
            ReadError::Decode(e) => {
                warn!(client_id = %client, channel = %self.channel, error = %e, "closing on a bad packet");
                CloseReason::ProtocolError
            }
        }
    }

    /// Writes what the router sent, and whatever else is already queued, in one write.
    async fn write_outbox(&mut self, first: Option<Outgoing>) -> Option<CloseReason> {
        let mut next = first;
        let mut close = None;
        for written in 1..=WRITE_BATCH {
            match next {
                Some(Outgoing::Packet(packet)) => self.framed.queue(packet),
                Some(Outgoing::Close(reason)) => {
                    close = Some(reason);
                    break;
                }
                // The router dropped the channel (it ended it) or is gone.
                None => {
                    close = Some(CloseReason::ServerShutdown);
                    break;
                }
            }
            if written == WRITE_BATCH {
                break;
            }
            match self.outbox_rx.try_recv() {
                Ok(more) => next = Some(more),
                Err(_) => break,
            }
        }
        if let Err(e) = self.framed.flush().await {
            debug!(channel = %self.channel, error = %e, "write failed");
            return Some(close.unwrap_or(CloseReason::SocketClosed));
        }
        close
    }

    async fn send(&mut self, input: Input) -> Option<CloseReason> {
        match self.context.router.inputs.send(input).await {
            Ok(()) => None,
            Err(_) => Some(CloseReason::ServerShutdown),
        }
    }

    /// One match over every packet a client may send.
    async fn dispatch(&mut self, packet: Packet) -> Option<CloseReason> {
        let channel = self.channel;
        match packet {
            Packet::Publish(publish) => self.publish(publish).await,
            Packet::PubAck(packet_id) => self.send(Input::PubAck { channel, packet_id }).await,
            Packet::PubRec(packet_id) => self.send(Input::PubRec { channel, packet_id }).await,
            Packet::PubRel(packet_id) => self.send(Input::PubRel { channel, packet_id }).await,
            Packet::PubComp(packet_id) => self.send(Input::PubComp { channel, packet_id }).await,
            Packet::Subscribe { packet_id, filters } => self.subscribe(packet_id, filters).await,
            Packet::Unsubscribe { packet_id, filters } => {
                if let Some(bad) = filters.iter().find(|f| !check_filter_syntax(f)) {
                    return self
                        .protocol_error(&format!("invalid topic filter {bad:?} in UNSUBSCRIBE"));
                }
                self.send(Input::Unsubscribe {
                    channel,
                    packet_id,
                    filters,
                })
                .await
            }
            Packet::PingReq => match self.framed.write(Packet::PingResp).await {
                Ok(()) => None,
                Err(_) => Some(CloseReason::SocketClosed),
            },
            Packet::Disconnect => Some(CloseReason::ClientDisconnect),
            Packet::Connect(_) => self.protocol_error("second CONNECT"),
            other => {
                self.protocol_error(&format!("{} is not a packet a client sends", other.name()))
            }
        }
    }

    fn protocol_error(&self, why: &str) -> Option<CloseReason> {
        warn!(client_id = %self.principal.client_id, channel = %self.channel, why, "closing on a protocol error");
        Some(CloseReason::ProtocolError)
    }

    async fn publish(&mut self, publish: Publish) -> Option<CloseReason> {
        let topic = publish.topic.as_str();
        let max = self.context.settings.max_topic_len;
        if topic.len() > max {
            warn!(client_id = %self.principal.client_id, limit = "limits.max_topic_len", len = topic.len(), max, "topic too long; closing");
            return Some(CloseReason::ProtocolError);
        }
        if topic == UPLOAD_TOKEN_TOPIC && self.principal.is_token_mode() {
            return self.upload_token(publish).await;
        }
        if !self.principal.can_publish(topic) {
            return self.denied_publish(publish).await;
        }
        self.throttle(topic.len() + publish.payload.len()).await;
        self.send(Input::Publish {
            channel: self.channel,
            publish,
        })
        .await
    }

    /// Slows the connection down when it publishes faster than its limits allow; TCP then
    /// pushes back on the client.
    async fn throttle(&mut self, size: usize) {
        let by_count = self.messages.as_mut().and_then(|b| b.take(1.0));
        let by_size = self.bytes.as_mut().and_then(|b| b.take(size as f64));
        if let Some(wait) = by_count.max(by_size) {
            ServerStats::add(&self.context.stats.throttled);
            tokio::time::sleep(wait).await;
        }
    }

    /// A token-mode client refreshes its tokens (DESIGN.md 3.2). The message is not routed; the
    /// acknowledgement confirms the new token. An invalid token closes the connection with
    /// `protocol_error`: the client learns at once that its refresh failed.
    async fn upload_token(&mut self, publish: Publish) -> Option<CloseReason> {
        let now = herald_auth::now_ms();
        let auth = &self.context.auth;
        if let Err(refusal) = auth.upload_token(&mut self.principal, &publish.payload, now) {
            warn!(client_id = %self.principal.client_id, channel = %self.channel, %refusal, "token upload refused; closing");
            return Some(CloseReason::ProtocolError);
        }
        info!(client_id = %self.principal.client_id, channel = %self.channel, "token uploaded");
        self.acknowledge_unrouted(&publish).await
    }

    /// Acknowledges a PUBLISH that is not routed (a token upload, an ignored denied publish).
    /// The acknowledgement goes through the router, behind the channel's acknowledgements that
    /// still wait for storage, so PUBACKs keep the order of their PUBLISHes.
    async fn acknowledge_unrouted(&mut self, publish: &Publish) -> Option<CloseReason> {
        let packet = match (publish.qos, publish.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => Packet::PubAck(id),
            // PUBREL will come back and be answered by the router with PUBCOMP.
            (QoS::ExactlyOnce, Some(id)) => Packet::PubRec(id),
            _ => return None,
        };
        let channel = self.channel;
        self.send(Input::Acknowledge { channel, packet }).await
    }

    async fn denied_publish(&mut self, publish: Publish) -> Option<CloseReason> {
        let client = &self.principal.client_id;
        match self.context.settings.on_denied_publish {
            DeniedPublish::Disconnect => {
                warn!(client_id = %client, topic = %publish.topic, "publish not allowed; closing (limits.on_denied_publish = \"disconnect\")");
                Some(CloseReason::NotAuthorized)
            }
            DeniedPublish::Ignore => {
                info!(client_id = %client, topic = %publish.topic, "publish not allowed; dropped (limits.on_denied_publish = \"ignore\")");
                self.acknowledge_unrouted(&publish).await
            }
        }
    }

    async fn subscribe(
        &mut self,
        packet_id: herald_protocol::PacketId,
        filters: Vec<(String, QoS)>,
    ) -> Option<CloseReason> {
        let max = self.context.settings.max_topic_len;
        let mut checked = Vec::with_capacity(filters.len());
        for (filter, qos) in filters {
            if !check_filter_syntax(&filter) {
                return self
                    .protocol_error(&format!("invalid topic filter {filter:?} in SUBSCRIBE"));
            }
            let allowed = if filter.len() > max {
                warn!(client_id = %self.principal.client_id, limit = "limits.max_topic_len", len = filter.len(), max, "subscription refused: filter too long");
                false
            } else if !self.principal.can_subscribe(&filter) {
                info!(client_id = %self.principal.client_id, %filter, "subscription refused: not allowed");
                false
            } else {
                true
            };
            checked.push((filter, allowed.then_some(qos)));
        }
        self.send(Input::Subscribe {
            channel: self.channel,
            packet_id,
            filters: checked,
        })
        .await
    }
}
