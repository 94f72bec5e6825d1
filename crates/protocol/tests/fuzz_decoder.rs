//! Property tests of the decoder: arbitrary bytes never panic and never make it allocate past
//! the size limit; every packet we encode decodes back, however the bytes are split.
//!
//! A longer run: `PROPTEST_CASES=200000 cargo test -p herald-protocol --test fuzz_decoder`.

use bytes::{Bytes, BytesMut};
use herald_protocol::{Codec, Packet, PacketId, Publish, QoS, SubAckCode, Topic};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

const LIMIT: u32 = 4096;

fn decode_stream(bytes: &[u8], splits: &[usize]) -> (Vec<Packet>, bool) {
    let mut codec = Codec::new(LIMIT);
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    let mut at = 0;
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    for cut in cuts {
        buf.extend_from_slice(&bytes[at..cut.max(at)]);
        at = cut.max(at);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(packet)) => packets.push(packet),
                Ok(None) => break,
                Err(_) => return (packets, true),
            }
            // The buffer never grows far past the limit from a length field alone.
            assert!(
                buf.capacity() <= 2 * LIMIT as usize + bytes.len() + 64,
                "capacity {}",
                buf.capacity()
            );
        }
    }
    (packets, false)
}

fn topic() -> impl Strategy<Value = String> {
    "[a-z0-9/]{1,40}".prop_filter("no empty", |t| !t.is_empty())
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet() -> impl Strategy<Value = Packet> {
    let id = (1u16..).prop_map(|n| PacketId::new(n).expect("non-zero"));
    prop_oneof![
        (
            topic(),
            proptest::collection::vec(any::<u8>(), 0..300),
            qos(),
            any::<bool>(),
            any::<bool>(),
            id.clone()
        )
            .prop_map(
                |(t, payload, qos, retain, dup, id)| Packet::Publish(Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    topic: Topic::new(t, 1024).expect("valid"),
                    packet_id: (qos != QoS::AtMostOnce).then_some(id),
                    payload: Bytes::from(payload),
                })
            ),
        id.clone().prop_map(Packet::PubAck),
        id.clone().prop_map(Packet::PubRec),
        id.clone().prop_map(Packet::PubRel),
        id.clone().prop_map(Packet::PubComp),
        (
            id.clone(),
            proptest::collection::vec((topic(), qos()), 1..5)
        )
            .prop_map(|(packet_id, filters)| Packet::Subscribe { packet_id, filters }),
        (id.clone(), proptest::collection::vec(qos(), 1..5)).prop_map(|(packet_id, q)| {
            Packet::SubAck {
                packet_id,
                codes: q.into_iter().map(SubAckCode::Granted).collect(),
            }
        }),
        (id.clone(), proptest::collection::vec(topic(), 1..5))
            .prop_map(|(packet_id, filters)| Packet::Unsubscribe { packet_id, filters }),
        id.prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), splits in proptest::collection::vec(any::<usize>(), 0..8)) {
        let _ = decode_stream(&bytes, &splits);
    }

    #[test]
    fn mutated_valid_packets_never_panic(packets in proptest::collection::vec(packet(), 1..6), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut codec = Codec::new(LIMIT);
        let mut bytes = BytesMut::new();
        for p in packets {
            codec.encode(p, &mut bytes).expect("encodes");
        }
        let mut bytes = bytes.to_vec();
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        let _ = decode_stream(&bytes, &[]);
    }

    #[test]
    fn encoded_packets_decode_back_however_split(packets in proptest::collection::vec(packet(), 1..8), splits in proptest::collection::vec(any::<usize>(), 0..10)) {
        let mut codec = Codec::new(LIMIT);
        let mut bytes = BytesMut::new();
        for p in &packets {
            codec.encode(p, &mut bytes).expect("encodes");
        }
        let (decoded, failed) = decode_stream(&bytes, &splits);
        prop_assert!(!failed);
        prop_assert_eq!(decoded, packets);
    }
}
