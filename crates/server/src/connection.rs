//! One connection's task: the socket, its buffers, and one poll (`poll_wake`) over socket
//! reads, the outbox from the router, the keepalive deadline and, for token and
//! device-credential connections, changes of the auth registry and the tokens' expiry. Every end goes through one exit:
//! `Input::Closed` with the reason. A plain TCP connection idle for `limits.park_idle_ms`
//! leaves the loop instead and hands its boxed state to the parker (`crate::park`), which
//! resumes it in a new task (`resume`) on its next wake-up.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::BytesMut;
use herald_auth::{Principal, UPLOAD_TOKEN_TOPIC};
use herald_protocol::codec::check_filter_syntax;
use herald_protocol::{Codec, DecodeError, Packet, Publish, QoS};
use herald_router::{
    ChannelId, ChannelRef, CloseReason, Input, OutboxReceiver, Outgoing, Route, Transport,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::io::poll_read_buf;
use tracing::{debug, error, info, warn};

use crate::guard::{Bucket, ServerStats};
use crate::park::Parked;
use crate::{DeniedPublish, handshake};

/// The longest a token connection goes without comparing its tokens' expiry with the clock.
const TOKEN_CHECK_MAX: Duration = Duration::from_secs(60);

/// Packets written per wake-up at most, so one busy channel cannot starve its reads.
const WRITE_BATCH: usize = 64;

/// The framed socket: its buffers and codec.
pub(crate) struct Framed<S> {
    stream: S,
    /// Allocated on first use, given back when both are empty: an idle connection keeps 8 bytes
    /// here instead of two empty `BytesMut` (64).
    bufs: Option<Box<Buffers>>,
    codec: Codec,
}

/// The room the handshake's first read makes: a whole CONNECT with a Signature user name and
/// password is 120-200 bytes (a bigger one takes more reads; the codec reserves what a packet
/// still lacks). After the handshake the empty buffer is given back, and later reads make the
/// default 64 bytes of room, which is all an unparked idle connection's PINGREQ needs.
const CONNECT_READ: usize = 256;

/// How much a channel that is ending (taken over, or its write failed) reads, at most,
/// looking for a DISCONNECT its client sent before.
const DRAIN_MAX: usize = 64 * 1024;

/// What a channel that is ending found from its client ([`Framed::drain_now`]).
#[derive(Default)]
pub(crate) struct Drained {
    publishes: Vec<Publish>,
    disconnect: bool,
}

#[derive(Default)]
struct Buffers {
    read: BytesMut,
    write: BytesMut,
    /// A write to the client stalled (`limits.write_timeout_secs`): nothing more is written.
    stalled: bool,
}

impl<S> Framed<S> {
    /// Gives back both buffers when they are empty (a connection about to park).
    fn release_buffers(&mut self) {
        if self.is_drained() {
            self.bufs = None;
        }
    }

    /// Nothing read and not decoded, nothing queued and not written.
    fn is_drained(&self) -> bool {
        self.bufs
            .as_ref()
            .is_none_or(|b| b.read.is_empty() && b.write.is_empty())
    }

    /// Bytes queued and not written yet (left by a parked connection's write).
    fn has_unwritten(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| !b.write.is_empty())
    }

    pub(crate) fn queue(&mut self, packet: Packet) {
        let bufs = self.bufs.get_or_insert_with(Box::default);
        if let Err(e) = self.codec.encode(packet, &mut bufs.write) {
            warn!(error = %e, "dropping a packet that cannot be encoded");
        }
    }
}

impl Framed<ParkedSocket> {
    /// Writes what is queued without waiting: true when all of it went out. What the socket
    /// did not take stays queued for the connection's task, which writes it first; an error
    /// is left for the task to meet too.
    fn write_now(&mut self) -> bool {
        use std::io::Write;
        let Some(bufs) = &mut self.bufs else {
            return true;
        };
        while !bufs.write.is_empty() {
            match self.stream.write(&bufs.write) {
                Ok(0) => return false,
                Ok(n) => bytes::Buf::advance(&mut bufs.write, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// Why no packet could be read: a clean EOF, an I/O error, or bytes that do not decode.
pub(crate) enum ReadError {
    Closed,
    Io(std::io::Error),
    Decode(DecodeError),
}

impl<S: Stream> Framed<S> {
    /// What the client sent before this moment, for a channel that is ending: decodes what
    /// is buffered and what the socket holds now, without waiting, until a DISCONNECT, the end
    /// of what is there, or something that does not decode. Keeps the PUBLISHes (they are
    /// routed before the channel ends) and whether a DISCONNECT came; other packets are
    /// dropped, the channel is ending.
    pub(crate) fn drain_now(&mut self) -> Drained {
        let bufs = self.bufs.get_or_insert_with(Box::default);
        let mut drained = Drained::default();
        // Bounded: a client that keeps sending does not hold the takeover up.
        let mut read = 0;
        loop {
            match self.codec.decode(&mut bufs.read) {
                Ok(Some(Packet::Disconnect)) => {
                    drained.disconnect = true;
                    return drained;
                }
                Ok(Some(Packet::Publish(publish))) => {
                    drained.publishes.push(publish);
                    continue;
                }
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => return drained,
            }
            if read >= DRAIN_MAX {
                return drained;
            }
            match self.stream.read_now(&mut bufs.read) {
                Ok(0) | Err(_) => return drained,
                Ok(n) => read += n,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    pub(crate) fn new(stream: S, max_packet_size: u32) -> Framed<S> {
        Framed {
            stream,
            bufs: None,
            codec: Codec::new(max_packet_size),
        }
    }

    /// Reads the next packet (the handshake's CONNECT). Cancel-safe: bytes read stay in the
    /// buffer.
    pub(crate) async fn read_packet(&mut self) -> Result<Packet, ReadError> {
        let bufs = self.bufs.get_or_insert_with(Box::default);
        if bufs.read.capacity() == 0 {
            // Left to itself, the first read makes room for 64 bytes, and a CONNECT with
            // credentials would take two.
            bufs.read.reserve(CONNECT_READ);
        }
        poll_fn(|cx| self.poll_read_packet(cx)).await
    }

    /// Polls for the next packet: decodes what is buffered, reads more when it is not whole.
    fn poll_read_packet(&mut self, cx: &mut Context<'_>) -> Poll<Result<Packet, ReadError>> {
        let bufs = self.bufs.get_or_insert_with(Box::default);
        loop {
            match self.codec.decode(&mut bufs.read) {
                Ok(Some(packet)) => return Poll::Ready(Ok(packet)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(ReadError::Decode(e))),
            }
            match ready!(poll_read_buf(
                Pin::new(&mut self.stream),
                cx,
                &mut bufs.read
            )) {
                Ok(0) => return Poll::Ready(Err(ReadError::Closed)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(ReadError::Io(e))),
            }
        }
    }

    /// Gives back the read buffer when nothing is left in it (after the handshake: an idle
    /// connection should not keep the CONNECT's buffer).
    pub(crate) fn release_read_buffer(&mut self) {
        if let Some(bufs) = &mut self.bufs
            && bufs.read.is_empty()
        {
            bufs.read = BytesMut::new();
        }
    }

    /// Writes what is queued. Fails with a [`Stalled`] error when the client takes no byte
    /// for `stall` (`limits.write_timeout_secs`): a client that stops reading would otherwise
    /// hold the write, and the connection, for as long as its TCP stack answers. The time
    /// counts from the last byte the stream took; no timer is armed while it takes bytes at
    /// once. (A TLS or WebSocket stream takes bytes into its own buffer, up to 64 KiB for TLS
    /// and to the next 16 KiB frame for WebSocket, and drains it in its flush, which then
    /// runs under one timer.)
    pub(crate) async fn flush(&mut self, stall: Duration) -> std::io::Result<()> {
        let Framed { stream, bufs, .. } = self;
        let burst = bufs
            .as_ref()
            .is_some_and(|b| b.write.capacity() > 64 * 1024);
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        let flushed = poll_fn(|cx| {
            loop {
                let progress = match bufs.as_mut().filter(|b| !b.write.is_empty()) {
                    Some(bufs) => match Pin::new(&mut *stream).poll_write(cx, &bufs.write) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                        }
                        Poll::Ready(Ok(written)) => {
                            bytes::Buf::advance(&mut bufs.write, written);
                            true
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => false,
                    },
                    None => match Pin::new(&mut *stream).poll_flush(cx) {
                        Poll::Ready(flushed) => return Poll::Ready(flushed),
                        Poll::Pending => false,
                    },
                };
                if progress {
                    // The stream took bytes: the wait starts again at the next block.
                    timer = None;
                    continue;
                }
                let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        Stalled,
                    )));
                }
                return Poll::Pending;
            }
        })
        .await;
        if let Some(bufs) = bufs {
            if flushed.as_ref().is_err_and(is_stall) {
                // Nothing more goes to this client: the close does not wait for it again.
                bufs.stalled = true;
                bufs.write = BytesMut::new();
            } else if burst && bufs.write.is_empty() {
                // Give back the memory of a burst.
                bufs.write = BytesMut::new();
            }
        }
        flushed
    }

    pub(crate) async fn write(&mut self, packet: Packet, stall: Duration) -> std::io::Result<()> {
        self.queue(packet);
        self.flush(stall).await
    }

    /// Writes what is left and closes the stream, each within `stall`; at once if a write to
    /// this client has already stalled (for TLS and WebSocket the close itself writes).
    pub(crate) async fn close(mut self, stall: Duration) {
        if self.bufs.as_ref().is_some_and(|b| b.stalled) {
            return;
        }
        let _ = self.flush(stall).await;
        if self.bufs.as_ref().is_some_and(|b| b.stalled) {
            return;
        }
        let _ = tokio::time::timeout(stall, self.stream.shutdown()).await;
    }
}

/// What a write that the client took no byte of within `limits.write_timeout_secs` fails with.
#[derive(Debug)]
struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client took no byte within limits.write_timeout_secs")
    }
}

impl std::error::Error for Stalled {}

/// Whether a write failed because the client stopped reading (not an I/O timeout of the
/// system's own).
fn is_stall(error: &std::io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Stalled>())
}

/// Runs a connection from accept to close.
///
/// The task's future is what each connection costs while it is open, so it holds only the
/// [`Channel`] and the serving loop: the handshake and the close are boxed (each runs once).
pub(crate) async fn run<S: Stream>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    context: Arc<crate::Context>,
    permit: OwnedSemaphorePermit,
) {
    let Some(channel) = Box::pin(open(stream, peer, transport, context, permit)).await else {
        return;
    };
    drive(channel, None).await;
}

/// Serves a parked connection again, in a new task, from where it stopped.
pub(crate) async fn resume(channel: Box<Channel<TcpStream>>, deadline: Option<Instant>) {
    drive(channel, deadline).await;
}

/// A stream a connection runs on. Only a plain TCP channel can be handed to the parker (TLS
/// and WebSocket keep state inside their stream types).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// The channel as a plain TCP one, or back unchanged.
    fn into_tcp(
        channel: Box<Channel<Self>>,
    ) -> Result<Box<Channel<TcpStream>>, Box<Channel<Self>>> {
        Err(channel)
    }

    /// Reads what can be read without waiting into `buf`: `Ok(0)` at the end of the stream,
    /// `WouldBlock` when nothing is there. By default what the stream's own state says is
    /// readable (a TLS or WebSocket stream keeps state a read outside it would break).
    fn read_now(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll_read_buf(Pin::new(self), &mut cx, buf) {
            Poll::Ready(read) => read,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Stream for TcpStream {
    fn into_tcp(
        channel: Box<Channel<Self>>,
    ) -> Result<Box<Channel<TcpStream>>, Box<Channel<Self>>> {
        Ok(channel)
    }

    /// From the socket itself, whether or not tokio has seen it readable yet: bytes that came
    /// a moment ago may not have reached tokio's reactor.
    fn read_now(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        use std::io::Read;
        let mut chunk = [0u8; 512];
        let read = (&*socket2::SockRef::from(&*self)).read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..read]);
        Ok(read)
    }
}

impl Stream for tokio_rustls::server::TlsStream<TcpStream> {}

impl<S: Stream> Stream for crate::ws::WsIo<S> {}

/// Serves the channel until it ends or parks. The channel is boxed so that it moves between
/// tasks, and in and out of the parker, as a pointer; passed by value, it would also take its
/// room twice in the future of `run` (rustc does not overlap a moved-from local).
async fn drive<S: Stream>(channel: Box<Channel<S>>, mut deadline: Option<Instant>) {
    let mut serving = Serving(Some(channel));
    // The channel is in `serving` while it is served, and taken out (then put back, or the
    // task ends) to finish or park.
    while let Some(channel) = serving.0.as_mut() {
        let served = channel.serve(deadline).await;
        let Some(channel) = serving.0.take() else {
            return;
        };
        match served {
            Served::Ended(reason) => return Box::pin(channel.finish(reason)).await,
            Served::Idle(idle_deadline) => match S::into_tcp(channel) {
                Ok(channel) => {
                    let context = channel.context.clone();
                    let deadline = idle_deadline;
                    let wake_at = earliest(deadline, channel.token_expiry());
                    return context.parker.park(Parked {
                        channel,
                        deadline,
                        wake_at,
                    });
                }
                // Not parkable after all (`parkable` is set for plain TCP only): serve on.
                Err(same) => (serving.0, deadline) = (Some(same), idle_deadline),
            },
        }
    }
}

/// The channel a task is serving. If the task unwinds (a panic: none is known, but tokio would
/// catch one and drop the task), dropping this routes the channel's close, which the task
/// would otherwise never send: the router ends a channel when its task says so (a closed outbox
/// only tells it the close is on the way), and the client would stay online. No bigger than
/// the box it holds.
struct Serving<S>(Option<Box<Channel<S>>>);

impl<S> Drop for Serving<S> {
    fn drop(&mut self) {
        if let Some(channel) = &self.0
            && std::thread::panicking()
        {
            let channel_ref = channel.channel_ref();
            error!(channel = %channel_ref, "a connection task panicked; its channel is closed as socket_closed");
            let _ = channel.context.router.inputs.try_send(Input::Closed {
                channel: channel_ref,
                reason: CloseReason::SocketClosed,
            });
        }
    }
}

/// The handshake, then the channel registered with the router; `None` when the connection
/// was refused or the router has stopped (the socket is closed then).
async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    context: Arc<crate::Context>,
    permit: OwnedSemaphorePermit,
) -> Option<Box<Channel<S>>> {
    let context = Admitted::new(context, permit);
    let mut framed = Framed::new(stream, context.settings.max_packet_size);
    let Some(accepted) = handshake::accept(&mut framed, peer, transport, &context).await else {
        framed.close(context.settings.write_timeout).await;
        return None;
    };
    let channel = ChannelId::random();
    let (outbox, outbox_rx) = herald_router::channel_outbox(context.settings.outbox_capacity);
    let keep_alive = accepted.connect.keep_alive;
    let request = handshake::connect_request(
        accepted.connect,
        channel,
        &accepted.principal,
        peer,
        transport,
        outbox,
    );
    if !context
        .router
        .route(Input::Connect(Box::new(request)))
        .await
    {
        framed.close(context.settings.write_timeout).await;
        return None;
    }
    info!(client_id = %accepted.principal.client_id, %channel, %peer, transport = transport.as_str(), "client connected");
    let abuse = &context.settings.abuse;
    let parkable = transport == Transport::Tcp && context.settings.park_idle.is_some();
    Some(Box::new(Channel {
        framed,
        channel,
        principal: accepted.principal,
        outbox_rx,
        keep_alive,
        throttles: Throttles::new(abuse),
        parkable,
        awaiting_connack: true,
        checked_generation: 0,
        context,
    }))
}

/// What the connection's one timer serves: the keepalive deadline, the time it would park, and
/// its first token's expiry.
#[derive(Clone, Copy)]
struct Times {
    deadline: Option<Instant>,
    idle_at: Option<Instant>,
    idle_after: Option<Duration>,
    expiry: Option<Instant>,
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `limits.max_messages_per_sec` and `limits.max_bytes_per_sec` of one connection. Boxed in
/// the channel, and absent when both are off (the default).
struct Throttles {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Throttles {
    fn new(abuse: &crate::guard::AbuseSettings) -> Option<Box<Throttles>> {
        let throttles = Throttles {
            messages: Bucket::new(u64::from(abuse.messages_per_sec)),
            bytes: Bucket::new(abuse.bytes_per_sec),
        };
        (throttles.messages.is_some() || throttles.bytes.is_some()).then(|| Box::new(throttles))
    }
}

/// What a handled wake-up leaves to wait for.
enum Step {
    Continue,
    Close(CloseReason),
    /// Write out what was queued, then close if told to.
    Flush {
        then_close: Option<CloseReason>,
    },
    /// A takeover ends the channel: read what its client sent before (routing its PUBLISHes;
    /// a DISCONNECT among them makes the end `client_disconnect`), write out what was queued,
    /// then close.
    TakenOver,
    /// The router has the input unless its queue was full; then wait for room. Then pause
    /// for `throttle`, if the connection publishes faster than its limits.
    Route {
        route: Route,
        throttle: Option<Duration>,
    },
}

/// What woke a connection up.
enum Wake {
    Read(Result<Packet, ReadError>),
    Outbox(Option<Outgoing>),
    Recheck,
    KeepaliveExpired,
    /// Nothing happened for `limits.park_idle_ms` and nothing is pending.
    Idle,
}

/// How [`Channel::serve`] returned.
enum Served {
    Ended(CloseReason),
    /// Idle: to be parked, with its keepalive deadline.
    Idle(Option<Instant>),
}

pub(crate) struct Channel<S> {
    framed: Framed<S>,
    channel: ChannelId,
    principal: Principal,
    /// The server's context, and the connection's slot under `limits.max_connections`.
    context: Admitted,
    pub(crate) outbox_rx: OutboxReceiver,
    /// The client's keepalive in seconds (0: none); see [`Channel::keep_alive`].
    keep_alive: u16,
    /// `limits.max_messages_per_sec`, `limits.max_bytes_per_sec`.
    throttles: Option<Box<Throttles>>,
    /// Plain TCP and parking on (`limits.park_idle_ms`).
    parkable: bool,
    /// Nothing has come from the outbox yet: the CONNACK, always the first thing the router
    /// puts there (once it has handled the CONNECT, which behind a busy router queue can take
    /// a while), is still to come. The connection does not park for that wait, which is not
    /// idleness.
    awaiting_connack: bool,
    /// The auth registry's generation when the credentials were last checked (token and
    /// device-credential connections): a parked one whose registry moved on is woken.
    checked_generation: u64,
}

/// A connection's hold on the server: the shared context, and its slot under
/// `limits.max_connections`, given back when this is dropped. The slot's semaphore permit is
/// forgotten and added back here, so every channel keeps one pointer for both (8 bytes, where
/// the context and a permit took 24).
pub(crate) struct Admitted(Arc<crate::Context>);

impl Admitted {
    fn new(context: Arc<crate::Context>, permit: OwnedSemaphorePermit) -> Admitted {
        permit.forget();
        Admitted(context)
    }
}

impl std::ops::Deref for Admitted {
    type Target = Arc<crate::Context>;

    fn deref(&self) -> &Arc<crate::Context> {
        &self.0
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.connections.add_permits(1);
    }
}

/// A parked connection's socket: out of tokio's reactor, in the parker's own epoll set.
pub(crate) type ParkedSocket = mio::net::TcpStream;

impl Channel<TcpStream> {
    /// Takes the socket out of tokio's reactor, which frees its registration, for the parker.
    /// On failure the socket is gone and only the rest of the channel is left, to be ended.
    // Boxed on purpose: the channel moves between tasks and the parker as a pointer.
    #[allow(clippy::boxed_local)]
    pub(crate) fn unregister(self: Box<Self>) -> Result<Box<Channel<ParkedSocket>>, Lost> {
        (*self).map_stream(|stream| stream.into_std().map(ParkedSocket::from_std))
    }
}

impl<S> Channel<S> {
    /// How long the connection may be silent: 1.5 times the client's keepalive (MQTT 3.1.1
    /// 3.1.2.10), or forever when it is 0.
    fn keep_alive(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    /// The channel as the router addresses it (its client id and channel id).
    fn channel_ref(&self) -> ChannelRef {
        ChannelRef::new(self.principal.client_id.clone(), self.channel)
    }

    /// Whether the channel's rights depend on the auth registry (tokens, device credential),
    /// and the registry has changed since they were last checked.
    pub(crate) fn registry_moved_on(&self) -> bool {
        self.principal.relies_on_registry()
            && self.context.auth.registry().generation() != self.checked_generation
    }

    pub(crate) fn relies_on_registry(&self) -> bool {
        self.principal.relies_on_registry()
    }
}

impl Channel<ParkedSocket> {
    pub(crate) fn socket_mut(&mut self) -> &mut ParkedSocket {
        &mut self.framed.stream
    }

    /// Puts the socket back into tokio's reactor, to be served by a task again. Must run on
    /// the runtime.
    // Boxed on purpose: the channel moves between tasks and the parker as a pointer.
    #[allow(clippy::boxed_local)]
    pub(crate) fn register(self: Box<Self>) -> Result<Box<Channel<TcpStream>>, Lost> {
        (*self).map_stream(|stream| TcpStream::from_std(std::net::TcpStream::from(stream)))
    }

    /// Writes the packet the router queued while the connection is parked, without giving it
    /// a task, with non-blocking writes. `Some(packets written)` when it went out and nothing
    /// else waits, with `waker` left with the outbox; `None` when the task is needed: more
    /// than one packet was queued (the connection is busy: its task serves it better than the
    /// one parker), a close or the outbox's end is queued, the socket did not take everything
    /// (the rest stays queued and the task writes it first, even if nothing else comes), or
    /// the connection's tokens or credentials changed since it last checked them (the task
    /// checks before it writes).
    pub(crate) fn write_in_place(&mut self, waker: &Waker) -> Option<usize> {
        if self.registry_moved_on() {
            return None;
        }
        let (packets, left) = self.outbox_rx.take_packets(1, waker);
        let count = packets.len();
        if count > 0 {
            self.awaiting_connack = false;
        }
        for packet in packets {
            self.framed.queue(packet);
        }
        let written = self.framed.write_now();
        if written {
            self.framed.release_buffers();
        }
        (written && !left).then_some(count)
    }
}

/// What is left of a channel whose socket was lost while it moved between tokio and the
/// parker: enough to tell the router, which hears of it like of any other end.
pub(crate) struct Lost {
    channel: ChannelRef,
    context: Admitted,
    /// Kept until the close is routed: the router takes a closed outbox for a task that has gone
    /// and waits for its close, which must then be on the way.
    _outbox_rx: OutboxReceiver,
}

impl Lost {
    pub(crate) async fn abandon(self) {
        let (channel, reason) = (self.channel, CloseReason::SocketClosed);
        self.context
            .router
            .route(Input::Closed { channel, reason })
            .await;
    }
}

impl<S> Channel<S> {
    /// The same channel over the stream `f` makes of its stream.
    fn map_stream<T>(
        self,
        f: impl FnOnce(S) -> std::io::Result<T>,
    ) -> Result<Box<Channel<T>>, Lost> {
        let Channel {
            framed,
            channel,
            principal,
            context,
            outbox_rx,
            keep_alive,
            throttles,
            parkable,
            awaiting_connack,
            checked_generation,
        } = self;
        let Framed {
            stream,
            bufs,
            codec,
        } = framed;
        let stream = match f(stream) {
            Ok(stream) => stream,
            Err(e) => {
                warn!(client_id = %principal.client_id, %channel, error = %e, "closing: the socket could not move between the runtime and the parker");
                return Err(Lost {
                    channel: ChannelRef::new(principal.client_id, channel),
                    context,
                    _outbox_rx: outbox_rx,
                });
            }
        };
        Ok(Box::new(Channel {
            framed: Framed {
                stream,
                bufs,
                codec,
            },
            channel,
            principal,
            context,
            outbox_rx,
            keep_alive,
            throttles,
            parkable,
            awaiting_connack,
            checked_generation,
        }))
    }
}

impl<S: Stream> Channel<S> {
    /// The connection's loop; returns why it ended.
    ///
    /// An idle connection waits here, so what this future holds is what an idle connection
    /// costs: one timer (keepalive, parking, token expiry; re-armed only when it fires, not on
    /// every packet), a registry watch only for connections that need it, and no buffers. Packets
    /// and outbox wake-ups are handled synchronously; what is left to wait for (a socket
    /// write, rarely a full router queue or a throttle) is a small [`Step`].
    ///
    /// `deadline` is the keepalive deadline of a parked connection that resumes; a new one
    /// starts its keepalive now. Returns [`Served::Idle`] when a parkable connection has had
    /// nothing to do for `limits.park_idle_ms`.
    async fn serve(&mut self, deadline: Option<Instant>) -> Served {
        // Token and device-credential connections end with `auth_revoked` when the registry
        // takes their right away (revocation, refresh, unregistration: it wakes them) or a
        // token expires (a deadline). Checked first here too: the registry may have changed
        // while the connection was parked, and nothing it sent is routed before the check.
        if self.registry_moved_on()
            && let Step::Close(reason) = self.recheck_credentials()
        {
            return Served::Ended(reason);
        }
        // What the parker could not write (the socket was full) goes out first.
        if self.framed.has_unwritten()
            && let Err(e) = self.framed.flush(self.context.settings.write_timeout).await
        {
            return Served::Ended(Box::pin(self.end_on_write_failure(&e)).await);
        }
        self.framed.release_read_buffer();
        let idle_after = self.context.settings.park_idle.filter(|_| self.parkable);
        let keep_alive = self.keep_alive();
        let mut deadline = deadline.or_else(|| keep_alive.map(|k| Instant::now() + k));
        let mut idle_at = idle_after.map(|after| Instant::now() + after);
        let registry = self.context.auth.registry().clone();
        let mut registry_watch = self
            .principal
            .relies_on_registry()
            .then(|| registry.watch());
        let mut expires_ms = self.principal.expires_at_ms();
        let mut expiry = self.token_expiry();
        // One timer for all three: re-armed only when it fires, at whichever is next.
        let mut timer =
            pin!(earliest(earliest(deadline, idle_at), expiry).map(tokio::time::sleep_until));
        let mut outbox_first = false;
        loop {
            // Reads and the outbox take turns going first, so neither starves the other.
            outbox_first = !outbox_first;
            let wake = poll_fn(|cx| {
                let times = Times {
                    deadline,
                    idle_at,
                    idle_after,
                    expiry,
                };
                self.poll_wake(cx, outbox_first, timer.as_mut(), times, &mut registry_watch)
            })
            .await;
            let now = Instant::now();
            let rechecked = matches!(wake, Wake::Recheck);
            // A registry change is not the connection's own activity.
            if let Some(after) = idle_after
                && !rechecked
            {
                idle_at = Some(now + after);
            }
            let step = match wake {
                Wake::Idle => {
                    self.framed.release_buffers();
                    return Served::Idle(deadline);
                }
                Wake::Read(Ok(packet)) => {
                    if let Some(keep_alive) = keep_alive {
                        deadline = Some(now + keep_alive);
                    }
                    self.dispatch(packet)
                }
                Wake::Read(Err(e)) => Step::Close(self.read_failed(e)),
                Wake::Outbox(out) => self.take_outbox(out),
                Wake::Recheck => {
                    registry_watch = Some(registry.watch());
                    self.recheck_credentials()
                }
                Wake::KeepaliveExpired => {
                    info!(client_id = %self.principal.client_id, channel = %self.channel, "keepalive expired (1.5x the client's keepalive without a packet)");
                    Step::Close(CloseReason::KeepaliveTimeout)
                }
            };
            // Awaited here, each in its own arm, so the task holds only the one it waits for.
            let ended = match step {
                Step::Continue => None,
                Step::Close(reason) => Some(reason),
                Step::Flush { then_close } => {
                    match (
                        self.framed.flush(self.context.settings.write_timeout).await,
                        then_close,
                    ) {
                        (Ok(()), then_close) | (Err(_), then_close @ Some(_)) => then_close,
                        // Boxed: a failed write is rare, and the task should not carry its
                        // state while it waits for anything else.
                        (Err(e), None) => Some(Box::pin(self.end_on_write_failure(&e)).await),
                    }
                }
                Step::TakenOver => {
                    let reason = Box::pin(self.end_with_what_is_left(CloseReason::TakenOver)).await;
                    let _ = self.framed.flush(self.context.settings.write_timeout).await;
                    Some(reason)
                }
                Step::Route { route, throttle } => match (route.await, throttle) {
                    (false, _) => Some(CloseReason::ServerShutdown),
                    (true, None) => None,
                    (true, Some(wait)) => {
                        // Boxed: throttling is the exception, and an idle connection should
                        // not carry a timer's state for it.
                        Box::pin(tokio::time::sleep(wait)).await;
                        None
                    }
                },
            };
            if let Some(reason) = ended {
                return Served::Ended(reason);
            }
            // After a check, the next one is due; a token upload may have changed the first
            // expiry, and the timer must not sleep past it.
            if rechecked || self.principal.expires_at_ms() != expires_ms {
                expires_ms = self.principal.expires_at_ms();
                expiry = self.token_expiry();
                if let Some(expiry) = expiry {
                    match timer.as_mut().as_pin_mut() {
                        Some(timer) if timer.deadline() <= expiry => {}
                        Some(timer) => timer.reset(expiry),
                        None => timer.set(Some(tokio::time::sleep_until(expiry))),
                    }
                }
            }
        }
    }

    /// When to check the connection's tokens next, if it has tokens: at the first one's
    /// expiry, and at least every `TOKEN_CHECK_MAX`, because expiry times are wall-clock
    /// times and the timer is monotonic (a clock step or a suspended host would otherwise
    /// let an expired token run on).
    fn token_expiry(&self) -> Option<Instant> {
        let at = self.principal.expires_at_ms()?;
        let left = Duration::from_millis(at.saturating_sub(herald_auth::now_ms()));
        Some(Instant::now() + left.min(TOKEN_CHECK_MAX))
    }

    /// Polls everything a connection waits for at once.
    fn poll_wake(
        &mut self,
        cx: &mut Context<'_>,
        outbox_first: bool,
        mut timer: Pin<&mut Option<Sleep>>,
        times: Times,
        registry_watch: &mut Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
    ) -> Poll<Wake> {
        let Times {
            deadline,
            idle_at,
            idle_after,
            expiry,
        } = times;
        if outbox_first && let Poll::Ready(out) = self.outbox_rx.poll_recv(cx) {
            return Poll::Ready(Wake::Outbox(out));
        }
        if let Poll::Ready(read) = self.framed.poll_read_packet(cx) {
            return Poll::Ready(Wake::Read(read));
        }
        if !outbox_first && let Poll::Ready(out) = self.outbox_rx.poll_recv(cx) {
            return Poll::Ready(Wake::Outbox(out));
        }
        if let Some(watch) = registry_watch
            && watch.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Wake::Recheck);
        }
        if let Some(mut timer) = timer.as_mut().as_pin_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            let now = Instant::now();
            if deadline.is_some_and(|deadline| deadline <= now) {
                return Poll::Ready(Wake::KeepaliveExpired);
            }
            if expiry.is_some_and(|expiry| expiry <= now) {
                return Poll::Ready(Wake::Recheck);
            }
            let idle_at = match idle_at {
                Some(at) if at <= now => {
                    if self.framed.is_drained() && !self.awaiting_connack {
                        return Poll::Ready(Wake::Idle);
                    }
                    // Half a packet is buffered, or the CONNACK is yet to come: look again one
                    // idle period later (the rest of the packet or the CONNACK, when it comes,
                    // moves the idle time anyway).
                    idle_after.map(|after| now + after)
                }
                // Packets came since the timer was set: wait for the time they moved.
                later => later,
            };
            if let Some(next) = earliest(earliest(deadline, idle_at), expiry) {
                timer.as_mut().reset(next);
                let _ = timer.poll(cx);
            }
        }
        Poll::Pending
    }

    /// The one exit of every channel: the router hears why, then the socket is closed.
    async fn finish(self, reason: CloseReason) {
        let channel = self.channel;
        self.context
            .router
            .route(Input::Closed {
                channel: self.channel_ref(),
                reason,
            })
            .await;
        debug!(%channel, reason = reason.as_str(), "connection task ended");
        let stall = self.context.settings.write_timeout;
        self.framed.close(stall).await;
    }

    fn recheck_credentials(&mut self) -> Step {
        let registry = self.context.auth.registry();
        // Read before the check: a change after this is one the check may not have seen.
        let generation = registry.generation();
        match self.principal.still_valid(registry, herald_auth::now_ms()) {
            Ok(()) => {
                self.checked_generation = generation;
                Step::Continue
            }
            Err(why) => {
                info!(client_id = %self.principal.client_id, channel = %self.channel, why, "closing: credentials no longer valid");
                Step::Close(CloseReason::AuthRevoked)
            }
        }
    }

    /// Why a write ended the connection, logged: a client that took no byte for
    /// `limits.write_timeout_secs` is a slow consumer, anything else a closed socket.
    fn write_failed(&self, error: &std::io::Error) -> CloseReason {
        if !is_stall(error) {
            debug!(channel = %self.channel, %error, "write failed");
            return CloseReason::SocketClosed;
        }
        if self.outbox_rx.is_ended() {
            // The router ended the channel already (its outbox filled) and logged why.
            debug!(channel = %self.channel, "a stalled write ended after its channel");
        } else {
            let secs = self.context.settings.write_timeout.as_secs();
            warn!(client_id = %self.principal.client_id, channel = %self.channel, limit = "limits.write_timeout_secs", secs, "closing: the client read nothing while a write waited");
        }
        CloseReason::SlowConsumer
    }

    /// How a channel whose write failed ends. A client that sent its last packets and a
    /// DISCONNECT, then closed, makes the next write fail (its kernel answers with a reset)
    /// while those packets may still wait, unread, in this socket. They still count: what is
    /// there is read without waiting (as for a takeover), its PUBLISHes are routed, and a
    /// DISCONNECT makes this the clean end the client asked for (a `disconnect` event, no will)
    /// instead of `socket_closed`.
    async fn end_on_write_failure(&mut self, error: &std::io::Error) -> CloseReason {
        match self.write_failed(error) {
            CloseReason::SocketClosed => {
                self.end_with_what_is_left(CloseReason::SocketClosed).await
            }
            stalled => stalled,
        }
    }

    /// How a channel that is ending (taken over, or its socket closed) ends, by what its client
    /// sent before: what is buffered and what the socket holds is read without waiting
    /// ([`Framed::drain_now`]) and its PUBLISHes routed; a PUBLISH that closes the channel
    /// decides the reason, else a DISCONNECT makes it `client_disconnect`, else `otherwise`.
    async fn end_with_what_is_left(&mut self, otherwise: CloseReason) -> CloseReason {
        let Drained {
            publishes,
            disconnect,
        } = self.framed.drain_now();
        match self.route_drained(publishes).await {
            Some(refused) => refused,
            None if disconnect => CloseReason::ClientDisconnect,
            None => otherwise,
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

    /// Queues what the router sent, and whatever else is already in the outbox, for one
    /// write.
    fn take_outbox(&mut self, first: Option<Outgoing>) -> Step {
        let mut next = first;
        let mut then_close = None;
        self.awaiting_connack = false;
        for written in 1..=WRITE_BATCH {
            match next {
                Some(Outgoing::Packet(packet)) => self.framed.queue(packet),
                // A takeover: whether the client sent DISCONNECT first decides how this channel
                // ended, and whether its will is published (the router waits to hear); what it
                // published before goes on.
                Some(Outgoing::Close(CloseReason::TakenOver)) => return Step::TakenOver,
                Some(Outgoing::Close(reason)) => {
                    then_close = Some(reason);
                    break;
                }
                // The router dropped the channel (it ended it) or is gone.
                None => {
                    then_close = Some(CloseReason::ServerShutdown);
                    break;
                }
            }
            if written == WRITE_BATCH {
                break;
            }
            match self.outbox_rx.try_recv() {
                Some(more) => next = Some(more),
                None => break,
            }
        }
        Step::Flush { then_close }
    }

    /// Routes the PUBLISHes a channel that is ending found (checked as any other, without the
    /// publish rate's pause: what is drained is bounded). Its outbox is closed first: the
    /// router's answers to them would not be written, and must not fill the outbox, which the
    /// router would take for a slow reader. Stops at one that closes the channel and returns
    /// why: that reason, not a DISCONNECT behind it, is how the channel ends (its will is
    /// published).
    async fn route_drained(&mut self, publishes: Vec<Publish>) -> Option<CloseReason> {
        if publishes.is_empty() {
            return None;
        }
        self.outbox_rx.close();
        for publish in publishes {
            match self.publish(publish) {
                Step::Route { route, .. } => {
                    if !route.await {
                        return Some(CloseReason::ServerShutdown);
                    }
                }
                Step::Close(reason) => return Some(reason),
                Step::Continue | Step::Flush { .. } | Step::TakenOver => {}
            }
        }
        None
    }

    /// Hands `input` to the router now; the step waits only if its queue is full.
    fn send(&self, input: Input) -> Step {
        Step::Route {
            route: self.context.router.route(input),
            throttle: None,
        }
    }

    /// One match over every packet a client may send.
    fn dispatch(&mut self, packet: Packet) -> Step {
        match packet {
            Packet::Publish(publish) => self.publish(publish),
            Packet::PubAck(packet_id) => self.send(Input::PubAck {
                channel: self.channel_ref(),
                packet_id,
            }),
            Packet::PubRec(packet_id) => self.send(Input::PubRec {
                channel: self.channel_ref(),
                packet_id,
            }),
            Packet::PubRel(packet_id) => self.send(Input::PubRel {
                channel: self.channel_ref(),
                packet_id,
            }),
            Packet::PubComp(packet_id) => self.send(Input::PubComp {
                channel: self.channel_ref(),
                packet_id,
            }),
            Packet::Subscribe { packet_id, filters } => self.subscribe(packet_id, filters),
            Packet::Unsubscribe { packet_id, filters } => {
                if let Some(bad) = filters.iter().find(|f| !check_filter_syntax(f)) {
                    return self
                        .protocol_error(&format!("invalid topic filter {bad:?} in UNSUBSCRIBE"));
                }
                self.send(Input::Unsubscribe {
                    channel: self.channel_ref(),
                    packet_id,
                    filters,
                })
            }
            Packet::PingReq => {
                self.framed.queue(Packet::PingResp);
                Step::Flush { then_close: None }
            }
            Packet::Disconnect => Step::Close(CloseReason::ClientDisconnect),
            Packet::Connect(_) => self.protocol_error("second CONNECT"),
            other => {
                self.protocol_error(&format!("{} is not a packet a client sends", other.name()))
            }
        }
    }

    fn protocol_error(&self, why: &str) -> Step {
        warn!(client_id = %self.principal.client_id, channel = %self.channel, why, "closing on a protocol error");
        Step::Close(CloseReason::ProtocolError)
    }

    fn publish(&mut self, publish: Publish) -> Step {
        let topic = publish.topic.as_str();
        let max = self.context.settings.max_topic_len;
        if topic.len() > max {
            warn!(client_id = %self.principal.client_id, limit = "limits.max_topic_len", len = topic.len(), max, "topic too long; closing");
            return Step::Close(CloseReason::ProtocolError);
        }
        if topic == UPLOAD_TOKEN_TOPIC && self.principal.is_token_mode() {
            return self.upload_token(publish);
        }
        if !self.principal.can_publish(topic) {
            return self.denied_publish(publish);
        }
        let throttle = self.throttle(topic.len() + publish.payload.len());
        let input = Input::Publish {
            channel: self.channel_ref(),
            publish,
        };
        Step::Route {
            route: self.context.router.route(input),
            throttle,
        }
    }

    /// How long to pause reading when the connection publishes faster than its limits allow;
    /// TCP then pushes back on the client.
    fn throttle(&mut self, size: usize) -> Option<Duration> {
        let throttles = self.throttles.as_mut()?;
        let by_count = throttles.messages.as_mut().and_then(|b| b.take(1.0));
        let by_size = throttles.bytes.as_mut().and_then(|b| b.take(size as f64));
        let wait = by_count.max(by_size);
        if wait.is_some() {
            ServerStats::add(&self.context.stats.throttled);
        }
        wait
    }

    /// A token-mode client refreshes its tokens (DESIGN.md 3.2). The message is not routed; the
    /// acknowledgement confirms the new token. An invalid token closes the connection with
    /// `protocol_error`: the client learns at once that its refresh failed.
    fn upload_token(&mut self, publish: Publish) -> Step {
        let now = herald_auth::now_ms();
        let auth = &self.context.auth;
        if let Err(refusal) = auth.upload_token(&mut self.principal, &publish.payload, now) {
            warn!(client_id = %self.principal.client_id, channel = %self.channel, %refusal, "token upload refused; closing");
            return Step::Close(CloseReason::ProtocolError);
        }
        info!(client_id = %self.principal.client_id, channel = %self.channel, "token uploaded");
        self.acknowledge_unrouted(&publish)
    }

    /// Acknowledges a PUBLISH that is not routed (a token upload, an ignored denied publish).
    /// The acknowledgement goes through the router, behind the channel's acknowledgements that
    /// still wait for storage, so PUBACKs keep the order of their PUBLISHes.
    fn acknowledge_unrouted(&self, publish: &Publish) -> Step {
        let packet = match (publish.qos, publish.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => Packet::PubAck(id),
            // PUBREL will come back and be answered by the router with PUBCOMP.
            (QoS::ExactlyOnce, Some(id)) => Packet::PubRec(id),
            _ => return Step::Continue,
        };
        let channel = self.channel_ref();
        self.send(Input::Acknowledge { channel, packet })
    }

    fn denied_publish(&self, publish: Publish) -> Step {
        let client = &self.principal.client_id;
        match self.context.settings.on_denied_publish {
            DeniedPublish::Disconnect => {
                warn!(client_id = %client, topic = %publish.topic, "publish not allowed; closing (limits.on_denied_publish = \"disconnect\")");
                Step::Close(CloseReason::NotAuthorized)
            }
            DeniedPublish::Ignore => {
                info!(client_id = %client, topic = %publish.topic, "publish not allowed; dropped (limits.on_denied_publish = \"ignore\")");
                self.acknowledge_unrouted(&publish)
            }
        }
    }

    fn subscribe(&self, packet_id: herald_protocol::PacketId, filters: Vec<(String, QoS)>) -> Step {
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
            channel: self.channel_ref(),
            packet_id,
            filters: checked,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use herald_router::Transport;
    use tokio::net::TcpStream;

    fn future_size<A, F: Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open connection is one task holding this future, so its size is most of what an
    /// idle connection costs (docs/benchmarks.md). It was 2,144 bytes before the handshake,
    /// the waiting router send and the rare paths were boxed and packets were handled
    /// synchronously (736 in a release build since); keep it from creeping back.
    #[test]
    fn an_open_connection_task_stays_small() {
        type Args = (
            TcpStream,
            SocketAddr,
            Transport,
            Arc<crate::Context>,
            tokio::sync::OwnedSemaphorePermit,
        );
        let size = future_size(|(s, p, t, c, permit): Args| super::run(s, p, t, c, permit));
        assert!(size <= 1024, "a connection task is {size} bytes");
        type Resumed = (Box<super::Channel<TcpStream>>, Option<tokio::time::Instant>);
        let size = future_size(|(channel, deadline): Resumed| super::resume(channel, deadline));
        assert!(size <= 1024, "a resumed connection task is {size} bytes");
        // What a parked connection keeps (its socket out of tokio's reactor).
        let size = std::mem::size_of::<super::Channel<super::ParkedSocket>>();
        // 128 bytes in release builds (a jemalloc size class); debug builds add 16.
        let bound = if cfg!(debug_assertions) { 144 } else { 128 };
        assert!(size <= bound, "a parked channel's state is {size} bytes");
    }
}
