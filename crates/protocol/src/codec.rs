//! The wire codec: bytes to [`Packet`] and back. The only module that touches `rmqtt-codec`.
//!
//! Decoding returns `Ok(None)` when more bytes are needed (a normal outcome). It frames whole
//! packets itself (the third-party decoder is only given complete packets, so it is never left
//! in the middle of one) and, on top of that decoder, enforces what it lets through: reserved
//! bits in a SUBSCRIBE's requested-QoS bytes, wildcards or NUL in a PUBLISH or will topic, and
//! a password without a user name.

use bytes::BytesMut;
use rmqtt_codec::error::DecodeError as WireDecodeError;
use rmqtt_codec::types::Protocol as WireProtocol;
use rmqtt_codec::v3;
use tokio_util::codec::{Decoder, Encoder};

use crate::packet::{
    ConnAck, Connect, ConnectReturnCode, Packet, Protocol, Publish, QoS, SubAckCode, Will,
};
use crate::topic::{self, Topic};

/// Why bytes could not be decoded. Every variant closes the connection, except that the
/// session layer answers `UnsupportedProtocolLevel` and `EmptyClientIdWithoutCleanSession` on
/// a first CONNECT with a CONNACK refusal before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported protocol level")]
    UnsupportedProtocolLevel,
    #[error("zero-length client id without clean session")]
    EmptyClientIdWithoutCleanSession,
    #[error("packet of {size} bytes exceeds the limit of {max} bytes (limits.max_packet_size)")]
    TooLarge { size: u32, max: u32 },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("i/o error: {0}")]
    Io(String),
}

impl From<std::io::Error> for DecodeError {
    fn from(e: std::io::Error) -> DecodeError {
        DecodeError::Io(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode packet: {0}")]
    Invalid(String),
    #[error("i/o error: {0}")]
    Io(String),
}

impl From<std::io::Error> for EncodeError {
    fn from(e: std::io::Error) -> EncodeError {
        EncodeError::Io(e.to_string())
    }
}

/// MQTT 3.1 / 3.1.1 codec with a maximum inbound packet size.
///
/// Only the limit is kept (every connection holds a codec): the wire codec is made for each
/// packet, and handed whole packets only, so it has no state to keep between them.
#[derive(Debug)]
pub struct Codec {
    max_packet_size: u32,
}

impl Codec {
    /// A codec that refuses inbound packets whose remaining length exceeds `max_packet_size`
    /// (0 is taken as 1, never as "unlimited").
    pub fn new(max_packet_size: u32) -> Codec {
        Codec {
            max_packet_size: max_packet_size.max(1),
        }
    }

    fn wire(&self) -> v3::Codec {
        v3::Codec::new(self.max_packet_size)
    }
}

impl Decoder for Codec {
    type Item = Packet;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        match frame(src, self.max_packet_size) {
            Frame::Incomplete { missing } => {
                // Room for the packet at once, not a read of 64 bytes at a time; at most 8 KiB
                // ahead, so that a header announcing a large packet pins no memory by itself.
                src.reserve(missing.min(8 * 1024));
                return Ok(None);
            }
            Frame::Whole(len) => check_subscribe_options(&src[..len])?,
            // Too large, or a broken length: the inner decoder reports it at once.
            Frame::Refuse => {}
        }
        match self.wire().decode(src) {
            Ok(Some((packet, _len))) => from_wire(packet).map(Some),
            Ok(None) => Ok(None),
            Err(WireDecodeError::UnsupportedProtocolLevel) => {
                Err(DecodeError::UnsupportedProtocolLevel)
            }
            Err(WireDecodeError::InvalidClientId) => {
                Err(DecodeError::EmptyClientIdWithoutCleanSession)
            }
            Err(WireDecodeError::MaxSizeExceeded { size, max }) => {
                Err(DecodeError::TooLarge { size, max })
            }
            Err(other) => Err(DecodeError::Malformed(other.to_string())),
        }
    }
}

impl Encoder<Packet> for Codec {
    type Error = EncodeError;

    fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.wire()
            .encode(to_wire(packet), dst)
            .map_err(|e| EncodeError::Invalid(e.to_string()))
    }
}

impl Encoder<&Packet> for Codec {
    type Error = EncodeError;

    fn encode(&mut self, packet: &Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode(packet.clone(), dst)
    }
}

/// Where the packet at the start of a buffer stands.
enum Frame {
    /// More bytes are needed: `missing` of them, if the header is whole (else 0).
    Incomplete { missing: usize },
    /// A whole packet of this many bytes (fixed header included).
    Whole(usize),
    /// A remaining length over the limit, or longer than 4 bytes.
    Refuse,
}

/// Reads the fixed header at the start of `src` without consuming anything.
fn frame(src: &[u8], max_packet_size: u32) -> Frame {
    let mut remaining = 0usize;
    let mut at = 1;
    loop {
        let Some(&byte) = src.get(at) else {
            return Frame::Incomplete { missing: 0 };
        };
        remaining |= usize::from(byte & 0x7F) << (7 * (at - 1));
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Frame::Refuse;
        }
    }
    if remaining > max_packet_size as usize {
        return Frame::Refuse;
    }
    let len = at + remaining;
    match src.len().checked_sub(len) {
        Some(_) => Frame::Whole(len),
        None => Frame::Incomplete {
            missing: len - src.len(),
        },
    }
}

/// MQTT-3.8.3-4: a SUBSCRIBE whose requested-QoS byte has any of its 6 reserved bits set is
/// malformed. rmqtt-codec masks those bits away, so the whole `packet` is checked first;
/// anything otherwise broken is left to the codec.
fn check_subscribe_options(packet: &[u8]) -> Result<(), DecodeError> {
    if packet.first() != Some(&0x82) {
        return Ok(());
    }
    // Skip the remaining length, then the packet id; then (length, filter, options byte)s.
    let Some(header) = packet.iter().skip(1).position(|b| b & 0x80 == 0) else {
        return Ok(());
    };
    let payload = &packet[header + 2..];
    let mut at = 2;
    while let Some(len) = payload.get(at..at + 2) {
        at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some(&options) = payload.get(at) else {
            return Ok(());
        };
        if options & 0xFC != 0 {
            return Err(malformed(
                "SUBSCRIBE requested-QoS byte has reserved bits set",
            ));
        }
        at += 1;
    }
    Ok(())
}

fn malformed(what: &str) -> DecodeError {
    DecodeError::Malformed(what.to_string())
}

fn qos_from_wire(qos: v3::QoS) -> QoS {
    match qos {
        v3::QoS::AtMostOnce => QoS::AtMostOnce,
        v3::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v3::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_wire(qos: QoS) -> v3::QoS {
    match qos {
        QoS::AtMostOnce => v3::QoS::AtMostOnce,
        QoS::AtLeastOnce => v3::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v3::QoS::ExactlyOnce,
    }
}

fn topic_from_wire(name: bytestring::ByteString) -> Result<Topic, DecodeError> {
    Topic::new(name, usize::from(u16::MAX))
        .map_err(|e| DecodeError::Malformed(format!("topic name: {e}")))
}

fn from_wire(packet: v3::Packet) -> Result<Packet, DecodeError> {
    Ok(match packet {
        v3::Packet::Connect(connect) => Packet::Connect(Box::new(connect_from_wire(*connect)?)),
        v3::Packet::ConnectAck(ack) => Packet::ConnAck(ConnAck {
            session_present: ack.session_present,
            code: code_from_wire(ack.return_code)?,
        }),
        v3::Packet::Publish(publish) => {
            let publish = *publish;
            Packet::Publish(Publish {
                dup: publish.dup,
                qos: qos_from_wire(publish.qos),
                retain: publish.retain,
                topic: topic_from_wire(publish.topic)?,
                packet_id: publish.packet_id,
                payload: publish.payload,
            })
        }
        v3::Packet::PublishAck { packet_id } => Packet::PubAck(packet_id),
        v3::Packet::PublishReceived { packet_id } => Packet::PubRec(packet_id),
        v3::Packet::PublishRelease { packet_id } => Packet::PubRel(packet_id),
        v3::Packet::PublishComplete { packet_id } => Packet::PubComp(packet_id),
        v3::Packet::Subscribe {
            packet_id,
            topic_filters,
        } => Packet::Subscribe {
            packet_id,
            filters: topic_filters
                .into_iter()
                .map(|(f, q)| (f.to_string(), qos_from_wire(q)))
                .collect(),
        },
        v3::Packet::SubscribeAck { packet_id, status } => Packet::SubAck {
            packet_id,
            codes: status
                .into_iter()
                .map(|s| match s {
                    v3::SubscribeReturnCode::Success(q) => SubAckCode::Granted(qos_from_wire(q)),
                    v3::SubscribeReturnCode::Failure => SubAckCode::Failure,
                })
                .collect(),
        },
        v3::Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => Packet::Unsubscribe {
            packet_id,
            filters: topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        v3::Packet::UnsubscribeAck { packet_id } => Packet::UnsubAck(packet_id),
        v3::Packet::PingRequest => Packet::PingReq,
        v3::Packet::PingResponse => Packet::PingResp,
        v3::Packet::Disconnect => Packet::Disconnect,
    })
}

fn connect_from_wire(connect: v3::Connect) -> Result<Connect, DecodeError> {
    let protocol = match connect.protocol.0 {
        3 => Protocol::V31,
        4 => Protocol::V311,
        _ => return Err(DecodeError::UnsupportedProtocolLevel),
    };
    // MQTT-3.1.2-22: no password without a user name.
    if connect.username.is_none() && connect.password.is_some() {
        return Err(malformed("password flag set without user name flag"));
    }
    let will = match connect.last_will {
        Some(will) => Some(Will {
            topic: topic_from_wire(will.topic)?,
            payload: will.message,
            qos: qos_from_wire(will.qos),
            retain: will.retain,
        }),
        None => None,
    };
    if connect.client_id.contains('\0') {
        return Err(malformed("NUL in client id"));
    }
    Ok(Connect {
        protocol,
        clean_session: connect.clean_session,
        keep_alive: connect.keep_alive,
        client_id: connect.client_id.to_string(),
        will,
        username: connect.username.map(|u| u.to_string()),
        password: connect.password,
    })
}

fn code_from_wire(code: v3::ConnectAckReason) -> Result<ConnectReturnCode, DecodeError> {
    Ok(match code {
        v3::ConnectAckReason::ConnectionAccepted => ConnectReturnCode::Accepted,
        v3::ConnectAckReason::UnacceptableProtocolVersion => {
            ConnectReturnCode::UnacceptableProtocolVersion
        }
        v3::ConnectAckReason::IdentifierRejected => ConnectReturnCode::IdentifierRejected,
        v3::ConnectAckReason::ServiceUnavailable => ConnectReturnCode::ServerUnavailable,
        v3::ConnectAckReason::BadUserNameOrPassword => ConnectReturnCode::BadUsernameOrPassword,
        v3::ConnectAckReason::NotAuthorized => ConnectReturnCode::NotAuthorized,
        v3::ConnectAckReason::Reserved => return Err(malformed("reserved CONNACK code")),
    })
}

fn code_to_wire(code: ConnectReturnCode) -> v3::ConnectAckReason {
    match code {
        ConnectReturnCode::Accepted => v3::ConnectAckReason::ConnectionAccepted,
        ConnectReturnCode::UnacceptableProtocolVersion => {
            v3::ConnectAckReason::UnacceptableProtocolVersion
        }
        ConnectReturnCode::IdentifierRejected => v3::ConnectAckReason::IdentifierRejected,
        ConnectReturnCode::ServerUnavailable => v3::ConnectAckReason::ServiceUnavailable,
        ConnectReturnCode::BadUsernameOrPassword => v3::ConnectAckReason::BadUserNameOrPassword,
        ConnectReturnCode::NotAuthorized => v3::ConnectAckReason::NotAuthorized,
    }
}

fn to_wire(packet: Packet) -> v3::Packet {
    match packet {
        Packet::Connect(connect) => {
            let connect = *connect;
            v3::Packet::Connect(Box::new(v3::Connect {
                protocol: WireProtocol(match connect.protocol {
                    Protocol::V31 => 3,
                    Protocol::V311 => 4,
                }),
                clean_session: connect.clean_session,
                keep_alive: connect.keep_alive,
                last_will: connect.will.map(|w| v3::LastWill {
                    qos: qos_to_wire(w.qos),
                    retain: w.retain,
                    topic: w.topic.into_inner(),
                    message: w.payload,
                }),
                client_id: connect.client_id.into(),
                username: connect.username.map(Into::into),
                password: connect.password,
                cert: None,
            }))
        }
        Packet::ConnAck(ack) => v3::Packet::ConnectAck(v3::ConnectAck {
            return_code: code_to_wire(ack.code),
            session_present: ack.session_present,
        }),
        Packet::Publish(publish) => v3::Packet::Publish(Box::new(rmqtt_codec::types::Publish {
            dup: publish.dup,
            retain: publish.retain,
            qos: qos_to_wire(publish.qos),
            topic: publish.topic.into_inner(),
            packet_id: publish.packet_id,
            payload: publish.payload,
            properties: None,
        })),
        Packet::PubAck(packet_id) => v3::Packet::PublishAck { packet_id },
        Packet::PubRec(packet_id) => v3::Packet::PublishReceived { packet_id },
        Packet::PubRel(packet_id) => v3::Packet::PublishRelease { packet_id },
        Packet::PubComp(packet_id) => v3::Packet::PublishComplete { packet_id },
        Packet::Subscribe { packet_id, filters } => v3::Packet::Subscribe {
            packet_id,
            topic_filters: filters
                .into_iter()
                .map(|(f, q)| (f.into(), qos_to_wire(q)))
                .collect(),
        },
        Packet::SubAck { packet_id, codes } => v3::Packet::SubscribeAck {
            packet_id,
            status: codes
                .into_iter()
                .map(|c| match c {
                    SubAckCode::Granted(q) => v3::SubscribeReturnCode::Success(qos_to_wire(q)),
                    SubAckCode::Failure => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        },
        Packet::Unsubscribe { packet_id, filters } => v3::Packet::Unsubscribe {
            packet_id,
            topic_filters: filters.into_iter().map(Into::into).collect(),
        },
        Packet::UnsubAck(packet_id) => v3::Packet::UnsubscribeAck { packet_id },
        Packet::PingReq => v3::Packet::PingRequest,
        Packet::PingResp => v3::Packet::PingResponse,
        Packet::Disconnect => v3::Packet::Disconnect,
    }
}

/// Checks a topic filter's syntax (no length limit); used by the session layer.
pub fn check_filter_syntax(filter: &str) -> bool {
    topic::validate_filter(filter, usize::from(u16::MAX)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn decode_all(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        let mut codec = Codec::new(1024);
        let mut buf = BytesMut::from(bytes);
        codec.decode(&mut buf)
    }

    #[test]
    fn subscribe_options_with_reserved_bits_are_malformed() {
        // SUBSCRIBE id 1: "a" QoS 1, "b" with options 0x05 (QoS 1 plus a reserved bit).
        let bad = [0x82, 10, 0, 1, 0, 1, b'a', 1, 0, 1, b'b', 0x05];
        assert!(matches!(decode_all(&bad), Err(DecodeError::Malformed(_))));
        let good = [0x82, 10, 0, 1, 0, 1, b'a', 1, 0, 1, b'b', 2];
        let Ok(Some(Packet::Subscribe { filters, .. })) = decode_all(&good) else {
            panic!("valid SUBSCRIBE")
        };
        assert_eq!(
            filters,
            [
                ("a".to_string(), QoS::AtLeastOnce),
                ("b".to_string(), QoS::ExactlyOnce)
            ]
        );
        // Incomplete: wait for more, whatever the bytes so far.
        assert!(matches!(decode_all(&bad[..11]), Ok(None)));
        // Split anywhere, the check still sees the whole packet.
        for split in 1..bad.len() {
            let mut codec = Codec::new(1024);
            let mut buf = BytesMut::from(&bad[..split]);
            assert!(
                matches!(codec.decode(&mut buf), Ok(None)),
                "split at {split}"
            );
            buf.extend_from_slice(&bad[split..]);
            assert!(
                matches!(codec.decode(&mut buf), Err(DecodeError::Malformed(_))),
                "split at {split}"
            );
        }
        // A packet id whose first byte is 0x82, split after the header: still a valid packet.
        let unsubscribe = [0xA2, 5, 0x82, 1, 0, 1, b'a'];
        let mut codec = Codec::new(1024);
        let mut buf = BytesMut::from(&unsubscribe[..2]);
        assert!(matches!(codec.decode(&mut buf), Ok(None)));
        buf.extend_from_slice(&unsubscribe[2..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Ok(Some(Packet::Unsubscribe { .. }))
        ));
        // A QoS of 3 was already refused by the codec.
        let three = [0x82, 6, 0, 1, 0, 1, b'a', 3];
        assert!(decode_all(&three).is_err());
    }

    #[test]
    fn round_trips_every_server_packet() {
        let pid = PacketId::new(7).expect("non-zero");
        let packets = vec![
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: ConnectReturnCode::Accepted,
            }),
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Topic::new("a/b", 64).expect("valid"),
                packet_id: Some(pid),
                payload: Bytes::from_static(b"hi"),
            }),
            Packet::PubAck(pid),
            Packet::PubRec(pid),
            Packet::PubRel(pid),
            Packet::PubComp(pid),
            Packet::SubAck {
                packet_id: pid,
                codes: vec![SubAckCode::Granted(QoS::ExactlyOnce), SubAckCode::Failure],
            },
            Packet::UnsubAck(pid),
            Packet::PingResp,
        ];
        for packet in packets {
            let mut codec = Codec::new(1024);
            let mut buf = BytesMut::new();
            codec.encode(&packet, &mut buf).expect("encodes");
            assert_eq!(codec.decode(&mut buf).expect("decodes"), Some(packet));
        }
    }

    use crate::packet::PacketId;

    #[test]
    fn partial_input_needs_more_bytes() {
        assert_eq!(decode_all(&[0x30]), Ok(None));
        assert_eq!(decode_all(&[0x30, 0x05, 0x00]), Ok(None));
    }

    #[test]
    fn malformed_input_is_refused() {
        // QoS 3 publish.
        assert!(decode_all(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]).is_err());
        // Wildcard in a publish topic.
        assert!(decode_all(&[0x30, 0x03, 0x00, 0x01, b'#']).is_err());
        // Packet id 0 on QoS 1.
        assert!(decode_all(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]).is_err());
        // Bad UTF-8 in a topic.
        assert!(decode_all(&[0x30, 0x04, 0x00, 0x02, 0xff, 0xfe]).is_err());
        // Remaining length over 4 bytes.
        assert!(decode_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        // Oversize.
        assert!(matches!(
            decode_all(&[0x30, 0x80, 0x10]),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn connect_versions_are_recognised() {
        let v311 = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd";
        let Ok(Some(Packet::Connect(c))) = decode_all(v311) else {
            panic!("decodes")
        };
        assert_eq!(c.protocol, Protocol::V311);
        let v31 = b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04abcd";
        let Ok(Some(Packet::Connect(c))) = decode_all(v31) else {
            panic!("decodes")
        };
        assert_eq!(c.protocol, Protocol::V31);
        let v5 = b"\x10\x11\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x04abcd";
        assert_eq!(decode_all(v5), Err(DecodeError::UnsupportedProtocolLevel));
        let no_id = b"\x10\x0c\x00\x04MQTT\x04\x00\x00\x3c\x00\x00";
        assert_eq!(
            decode_all(no_id),
            Err(DecodeError::EmptyClientIdWithoutCleanSession)
        );
    }
}
