//! A client that speaks raw bytes, for behaviour a client library would hide.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use herald_protocol::{Codec, Connect, Packet, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    codec: Codec,
}

/// How long `expect_*` waits.
const WAIT: Duration = Duration::from_secs(5);

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
            codec: Codec::new(16 * 1024 * 1024),
        }
    }

    /// Closes the connection abortively (`SO_LINGER` 0): the kernel sends a reset, not a FIN,
    /// so the broker's next write to it fails, while what was sent before is still there to read.
    pub fn abort(self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The broker may have closed already; later reads tell.
        let _ = self.stream.write_all(bytes).await;
    }

    pub async fn send(&mut self, packet: Packet) {
        self.send_all([packet]).await;
    }

    /// `packets` in one write (as a client whose packets leave together).
    pub async fn send_all(&mut self, packets: impl IntoIterator<Item = Packet>) {
        let mut out = BytesMut::new();
        for packet in packets {
            self.codec.encode(packet, &mut out).expect("encode");
        }
        self.send_bytes(&out).await;
    }

    /// Connected with the demo access key's Signature for `client_id` (clean session,
    /// `keep_alive` seconds); returns after the CONNACK, which must accept it.
    pub async fn signed(addr: SocketAddr, client_id: &str, keep_alive: u16) -> RawClient {
        let mut raw = RawClient::connect(addr).await;
        let mut connect = RawClient::connect_packet(
            client_id,
            Some(crate::DEMO_USER),
            Some(&crate::signature(client_id)),
            true,
        );
        if let Packet::Connect(c) = &mut connect {
            c.keep_alive = keep_alive;
        }
        raw.send(connect).await;
        assert!(
            matches!(raw.recv().await, Some(Packet::ConnAck(ack)) if ack.code == herald_protocol::ConnectReturnCode::Accepted),
            "{client_id} was not accepted"
        );
        raw
    }

    /// A CONNECT packet with the given fields (MQTT 3.1.1, keepalive 60).
    pub fn connect_packet(
        client_id: &str,
        user: Option<&str>,
        password: Option<&str>,
        clean: bool,
    ) -> Packet {
        Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_session: clean,
            keep_alive: 60,
            client_id: client_id.to_string(),
            will: None,
            username: user.map(str::to_string),
            password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
        }))
    }

    /// The next packet, or `None` if the broker closed the connection first.
    pub async fn recv(&mut self) -> Option<Packet> {
        let read = async {
            loop {
                if let Some(packet) = self
                    .codec
                    .decode(&mut self.buf)
                    .expect("broker sent a valid packet")
                {
                    return Some(packet);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("broker answered or closed within 5 s")
    }

    /// Asserts the broker closes the connection without sending anything else.
    pub async fn expect_closed(&mut self) {
        assert_eq!(
            self.recv().await,
            None,
            "expected the broker to close the connection"
        );
    }

    /// Waits up to `wait` and asserts nothing arrives and the connection stays open.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(wait, self.stream.peek(&mut byte)).await {
            Err(_) => {}
            Ok(result) => panic!("expected silence, got {result:?}"),
        }
    }
}
