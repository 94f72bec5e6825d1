//! A lean MQTT 3.1.1 client on Herald's own codec over a tokio `TcpStream`.
//!
//! It is split in a [`Reader`] and a [`Writer`] so one task can publish while another reads
//! acknowledgements. Writes are queued and flushed in one `write` per batch; reads decode every
//! complete packet of one `read` before the next. No keepalive pings: runs are short and the
//! keepalive given to the broker is long.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::{Bytes, BytesMut};
use herald_protocol::{
    Codec, Connect, ConnectReturnCode, Packet, PacketId, Protocol, Publish, QoS, SubAckCode, Topic,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::{Decoder, Encoder};

use crate::UsernameMode;

/// Largest packet the client accepts from a broker.
const MAX_PACKET: u32 = 1024 * 1024;
/// Room a new connection's reader has for one read: a CONNACK, a SUBACK, a few acks.
const FIRST_READ: usize = 1024;
/// The most room a reader keeps for one read, reached by doubling while reads fill it.
const MAX_READ: usize = 64 * 1024;
/// Keepalive announced in CONNECT: longer than any run.
pub const KEEP_ALIVE_SECS: u16 = 600;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("decode: {0}")]
    Decode(#[from] herald_protocol::DecodeError),
    #[error("encode: {0}")]
    Encode(#[from] herald_protocol::EncodeError),
    #[error("connection refused with CONNACK {0:?}")]
    Refused(ConnectReturnCode),
    #[error("subscription to {0:?} refused")]
    SubscribeRefused(String),
    #[error("the broker closed the connection")]
    Closed,
    #[error("unexpected {0} from the broker")]
    Unexpected(&'static str),
}

/// How clients of one run identify themselves.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub mode: UsernameMode,
    pub access_key: String,
    pub secret: String,
    pub instance: String,
    pub group: String,
}

impl Credentials {
    /// `<group>@@@<device>`.
    pub fn client_id(&self, device: &str) -> String {
        format!("{}@@@{}", self.group, device)
    }

    /// User name and password for `client_id` (Signature: HMAC-SHA1 of the client id).
    pub fn login(&self, client_id: &str) -> (Option<String>, Option<Bytes>) {
        match self.mode {
            UsernameMode::None => (None, None),
            UsernameMode::Signature => (
                Some(format!("Signature|{}|{}", self.access_key, self.instance)),
                Some(Bytes::from(herald_auth::sign(&self.secret, client_id))),
            ),
        }
    }
}

/// The read half: a buffer and the codec.
pub struct Reader {
    half: OwnedReadHalf,
    buf: BytesMut,
    codec: Codec,
    /// Room made for the next read: [`FIRST_READ`], doubled (up to [`MAX_READ`]) each time a
    /// read fills it. An idle connection of the `conn` scenario keeps 1 KiB, not 64.
    read_size: usize,
}

impl Reader {
    /// The next packet already in the buffer, without reading.
    pub fn try_next(&mut self) -> Result<Option<Packet>, ClientError> {
        Ok(self.codec.decode(&mut self.buf)?)
    }

    /// Reads once from the socket into the buffer.
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 4 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        match self.half.read_buf(&mut self.buf).await? {
            0 => Err(ClientError::Closed),
            read => {
                if read == room && self.read_size < MAX_READ {
                    self.read_size *= 2;
                }
                Ok(())
            }
        }
    }

    /// The next packet, reading as needed.
    pub async fn next(&mut self) -> Result<Packet, ClientError> {
        loop {
            if let Some(packet) = self.try_next()? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }
}

/// The write half: packets are queued, then written in one call by [`Writer::flush`].
pub struct Writer {
    half: OwnedWriteHalf,
    buf: BytesMut,
    codec: Codec,
}

impl Writer {
    pub fn queue(&mut self, packet: Packet) -> Result<(), ClientError> {
        self.codec.encode(packet, &mut self.buf)?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.buf.is_empty() {
            self.half.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    pub async fn send(&mut self, packet: Packet) -> Result<(), ClientError> {
        self.queue(packet)?;
        self.flush().await
    }

    /// Sends DISCONNECT and closes the write side.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(Packet::Disconnect).await?;
        self.half.shutdown().await?;
        Ok(())
    }
}

/// A connected client.
pub struct Connection {
    pub reader: Reader,
    pub writer: Writer,
    pub session_present: bool,
}

/// Loopback source addresses the bench spreads its connections over (127.0.100.1 and up).
const SOURCE_ADDRESSES: u32 = 64;
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// Connects to `addr`. On loopback, each connection takes the next of [`SOURCE_ADDRESSES`]
/// source addresses: one address has only ~28k ephemeral ports, and runs that open and close
/// tens of thousands of connections would otherwise wait for ports in TIME_WAIT.
async fn open_socket(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let IpAddr::V4(ip) = addr.ip() else {
        return TcpStream::connect(addr).await;
    };
    if !ip.is_loopback() {
        return TcpStream::connect(addr).await;
    }
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % SOURCE_ADDRESSES;
    let source = Ipv4Addr::new(127, 0, 100, 1 + n as u8);
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(addr).await
}

/// Opens a TCP connection, sends CONNECT and waits for an accepting CONNACK.
pub async fn connect(
    addr: SocketAddr,
    credentials: &Credentials,
    client_id: &str,
    clean_session: bool,
) -> Result<Connection, ClientError> {
    let stream = open_socket(addr).await?;
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let mut reader = Reader {
        half: read,
        buf: BytesMut::with_capacity(FIRST_READ),
        codec: Codec::new(MAX_PACKET),
        read_size: FIRST_READ,
    };
    let mut writer = Writer {
        half: write,
        buf: BytesMut::with_capacity(256),
        codec: Codec::new(MAX_PACKET),
    };
    let (username, password) = credentials.login(client_id);
    writer
        .send(Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_session,
            keep_alive: KEEP_ALIVE_SECS,
            client_id: client_id.to_string(),
            will: None,
            username,
            password,
        })))
        .await?;
    match reader.next().await? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Accepted => Ok(Connection {
            reader,
            writer,
            session_present: ack.session_present,
        }),
        Packet::ConnAck(ack) => Err(ClientError::Refused(ack.code)),
        other => Err(ClientError::Unexpected(other.name())),
    }
}

impl Connection {
    /// Subscribes to `filter` and waits for the SUBACK; publishes that arrive first are
    /// dropped (the caller subscribes before any load starts).
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<(), ClientError> {
        let packet_id = PacketId::new(1).ok_or(ClientError::Unexpected("packet id"))?;
        self.writer
            .send(Packet::Subscribe {
                packet_id,
                filters: vec![(filter.to_string(), qos)],
            })
            .await?;
        loop {
            match self.reader.next().await? {
                Packet::SubAck { codes, .. } => {
                    return match codes.first() {
                        Some(SubAckCode::Granted(_)) => Ok(()),
                        _ => Err(ClientError::SubscribeRefused(filter.to_string())),
                    };
                }
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        self.writer.send(Packet::PubAck(id)).await?;
                    }
                }
                other => return Err(ClientError::Unexpected(other.name())),
            }
        }
    }
}

/// Packet ids 1..=65535, cycling.
#[derive(Debug, Default)]
pub struct PacketIds(u16);

impl PacketIds {
    pub fn next_id(&mut self) -> PacketId {
        self.0 = self.0.wrapping_add(1);
        if self.0 == 0 {
            self.0 = 1;
        }
        NonZeroU16::new(self.0).unwrap_or(NonZeroU16::MIN)
    }
}

/// A PUBLISH of `payload` on `topic`.
pub fn publish(topic: &Topic, qos: QoS, packet_id: Option<PacketId>, payload: Bytes) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.clone(),
        packet_id,
        payload,
    })
}

/// A topic built by the bench; validated so a bad prefix fails early.
pub fn topic(name: String) -> Result<Topic, ClientError> {
    Topic::new(name, usize::from(u16::MAX)).map_err(|_| ClientError::Unexpected("topic name"))
}
