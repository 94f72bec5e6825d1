//! Property test of whole connections: a valid CONNECT, then random sequences of valid,
//! truncated and garbage packets. Nothing panics anywhere in the broker, and it keeps serving.
//!
//! A longer run: `PROPTEST_CASES=5000 cargo test -p herald --test integration fuzz_sessions`.

use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use herald_protocol::{Codec, Packet, Publish, QoS, Topic};
use herald_testkit::{RawClient, TestBroker};
use proptest::prelude::*;
use tokio_util::codec::Encoder;

#[derive(Debug, Clone)]
enum Step {
    Packet(Packet),
    Garbage(Vec<u8>),
    Truncated(Packet, usize),
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet() -> impl Strategy<Value = Packet> {
    let id = (1u16..8).prop_map(|n| NonZeroU16::new(n).expect("non-zero"));
    let topic = prop_oneof![
        Just("a"),
        Just("a/b"),
        Just("$SYS/x"),
        Just("a/p2p/fuzz"),
        Just("b/c/d")
    ];
    let filter = prop_oneof![
        Just("a/#"),
        Just("+/b"),
        Just("#"),
        Just("a/p2p/other"),
        Just("b/+/d")
    ];
    prop_oneof![
        (
            topic,
            qos(),
            any::<bool>(),
            id.clone(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(t, qos, retain, id, payload)| {
                Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain,
                    topic: Topic::new(t, 64).expect("valid"),
                    packet_id: (qos != QoS::AtMostOnce).then_some(id),
                    payload: Bytes::from(payload),
                })
            }),
        (
            id.clone(),
            proptest::collection::vec((filter.clone().prop_map(str::to_string), qos()), 1..4)
        )
            .prop_map(|(packet_id, filters)| Packet::Subscribe { packet_id, filters }),
        (
            id.clone(),
            proptest::collection::vec(filter.prop_map(str::to_string), 1..3)
        )
            .prop_map(|(packet_id, filters)| Packet::Unsubscribe { packet_id, filters }),
        id.clone().prop_map(Packet::PubAck),
        id.clone().prop_map(Packet::PubRec),
        id.clone().prop_map(Packet::PubRel),
        id.prop_map(Packet::PubComp),
        Just(Packet::PingReq),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => packet().prop_map(Step::Packet),
        1 => proptest::collection::vec(any::<u8>(), 1..32).prop_map(Step::Garbage),
        1 => (packet(), any::<usize>()).prop_map(|(p, cut)| Step::Truncated(p, cut)),
    ]
}

fn bytes_of(packet: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    Codec::new(1 << 20)
        .encode(packet, &mut buf)
        .expect("encodes");
    buf.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_sessions_never_break_the_broker(sessions in proptest::collection::vec(proptest::collection::vec(step(), 1..30), 1..4)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let before = herald_testkit::panics();
            let broker = TestBroker::open("[limits]\nmax_inflight = 4\nmax_subscriptions = 5\n").await;
            let mut clients = Vec::new();
            for (n, steps) in sessions.iter().enumerate() {
                let mut raw = RawClient::connect(broker.addr).await;
                raw.send(RawClient::connect_packet(&format!("fuzz-{n}"), None, None, n % 2 == 0)).await;
                for step in steps {
                    let bytes = match step {
                        Step::Packet(p) => bytes_of(p),
                        Step::Garbage(g) => g.clone(),
                        Step::Truncated(p, cut) => {
                            let b = bytes_of(p);
                            b[..cut % b.len()].to_vec()
                        }
                    };
                    raw.send_bytes(&bytes).await;
                }
                clients.push(raw);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            // The broker still serves a fresh client.
            let mut probe = RawClient::connect(broker.addr).await;
            probe.send(RawClient::connect_packet("probe", None, None, true)).await;
            assert!(matches!(probe.recv().await, Some(Packet::ConnAck(_))));
            probe.send(Packet::PingReq).await;
            assert_eq!(probe.recv().await, Some(Packet::PingResp));
            drop(clients);
            broker.stop().await;
            assert_eq!(herald_testkit::panics(), before, "something panicked");
        });
    }
}
