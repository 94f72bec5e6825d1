//! Limits of DESIGN.md 2, each with its refusal.

use std::num::NonZeroU16;
use std::time::Duration;

use herald_protocol::{ConnAck, ConnectReturnCode, Packet, QoS as WireQoS, SubAckCode};
use herald_testkit::{RawClient, TestBroker, TestClient, options};
use rumqttc::{QoS, SubscribeReasonCode};

use crate::QUIET;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

#[tokio::test]
async fn client_id_longer_than_the_limit_gets_code_2() {
    let broker = TestBroker::open("[limits]\nmax_client_id_len = 10\n").await;
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(RawClient::connect_packet("abcdefghijk", None, None, true))
        .await;
    assert_eq!(
        raw.recv().await,
        Some(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::IdentifierRejected
        }))
    );
    broker.stop().await;
}

#[tokio::test]
async fn topic_longer_than_the_limit() {
    let broker = TestBroker::open("[limits]\nmax_topic_len = 16\n").await;
    let mut client = TestClient::connected(options(broker.addr, "long", true)).await;
    let codes = client.subscribe(&"f".repeat(17), QoS::AtMostOnce).await;
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);
    client
        .client
        .publish("t".repeat(17), QoS::AtMostOnce, false, b"x".to_vec())
        .await
        .expect("queue");
    client.closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn subscriptions_beyond_the_limit_get_0x80() {
    let broker = TestBroker::open("[limits]\nmax_subscriptions = 2\n").await;
    let mut client = TestClient::connected(options(broker.addr, "many", true)).await;
    assert_eq!(
        client.subscribe("a", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        client.subscribe("b", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        client.subscribe("c", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    // Re-subscribing to an existing filter is a replacement, not a new subscription.
    assert_eq!(
        client.subscribe("a", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    broker.stop().await;
}

#[tokio::test]
async fn packets_over_the_size_limit_close_the_connection() {
    let broker = TestBroker::open("[limits]\nmax_packet_size = 1024\n").await;
    let mut client = TestClient::connected(options(broker.addr, "big", true)).await;
    client
        .client
        .publish("big", QoS::AtMostOnce, false, vec![0u8; 2000])
        .await
        .expect("queue");
    client.closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn no_more_than_max_inflight_unacknowledged_messages() {
    let broker = TestBroker::open("[limits]\nmax_inflight = 3\n").await;
    let mut sub = RawClient::connect(broker.addr).await;
    sub.send(RawClient::connect_packet("slow", None, None, true))
        .await;
    assert!(matches!(sub.recv().await, Some(Packet::ConnAck(_))));
    sub.send(Packet::Subscribe {
        packet_id: pid(1),
        filters: vec![("w".into(), WireQoS::AtLeastOnce)],
    })
    .await;
    assert_eq!(
        sub.recv().await,
        Some(Packet::SubAck {
            packet_id: pid(1),
            codes: vec![SubAckCode::Granted(WireQoS::AtLeastOnce)]
        })
    );
    let mut publisher = TestClient::connected(options(broker.addr, "fast", true)).await;
    for i in 0..5u8 {
        publisher.publish("w", QoS::AtLeastOnce, false, &[i]).await;
    }
    let mut ids = Vec::new();
    for expected in 0..3u8 {
        let Some(Packet::Publish(p)) = sub.recv().await else {
            panic!("publish")
        };
        assert_eq!(&p.payload[..], &[expected]);
        ids.push(p.packet_id.expect("id"));
    }
    sub.expect_silence(QUIET).await;
    sub.send(Packet::PubAck(ids[0])).await;
    let Some(Packet::Publish(p)) = sub.recv().await else {
        panic!("publish")
    };
    assert_eq!(&p.payload[..], &[3]);
    sub.expect_silence(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn the_offline_queue_keeps_the_newest_messages_up_to_its_bound() {
    let broker = TestBroker::open("[limits]\nmax_queued_messages = 3\n").await;
    let sub = TestClient::connected(options(broker.addr, "away", false)).await;
    let mut sub = sub;
    sub.subscribe("q", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    for i in 0..5u8 {
        publisher.publish("q", QoS::AtLeastOnce, false, &[i]).await;
    }
    let mut sub = TestClient::connected(options(broker.addr, "away", false)).await;
    for expected in 2..5u8 {
        assert_eq!(&sub.next_publish().await.payload[..], &[expected]);
    }
    sub.expect_no_publish(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let broker = TestBroker::open("[limits]\nmax_connections = 2\n").await;
    let _a = TestClient::connected(options(broker.addr, "a", true)).await;
    let _b = TestClient::connected(options(broker.addr, "b", true)).await;
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(RawClient::connect_packet("c", None, None, true))
        .await;
    raw.expect_closed().await;
    broker.stop().await;
}

/// A raw subscriber of `topic` at QoS 0, and a raw publisher.
async fn subscriber_and_publisher(broker: &TestBroker, topic: &str) -> (RawClient, RawClient) {
    let mut sub = RawClient::connect(broker.addr).await;
    sub.send(RawClient::connect_packet("reader", None, None, true))
        .await;
    assert!(matches!(sub.recv().await, Some(Packet::ConnAck(_))));
    sub.send(Packet::Subscribe {
        packet_id: pid(1),
        filters: vec![(topic.into(), WireQoS::AtMostOnce)],
    })
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck { .. })));
    let mut publisher = RawClient::connect(broker.addr).await;
    publisher
        .send(RawClient::connect_packet("flooder", None, None, true))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::ConnAck(_))));
    (sub, publisher)
}

/// `count` QoS 0 PUBLISHes of 60 KiB on `topic`, each numbered in its first two bytes.
async fn flood(publisher: &mut RawClient, topic: &str, count: u16) {
    for n in 0..count {
        let mut payload = n.to_be_bytes().to_vec();
        payload.resize(60 * 1024, 0);
        publisher
            .send(Packet::Publish(herald_protocol::Publish {
                dup: false,
                qos: WireQoS::AtMostOnce,
                retain: false,
                topic: herald_protocol::Topic::new(topic.to_string(), 128).expect("topic"),
                packet_id: None,
                payload: payload.into(),
            }))
            .await;
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_when_a_write_stalls() {
    // Two connections at most: the one that stops reading and the publisher. Only when the
    // first is closed can a third one connect.
    let broker = TestBroker::open("[limits]\nwrite_timeout_secs = 1\nmax_connections = 2\n").await;
    let (mut sub, mut publisher) = subscriber_and_publisher(&broker, "flood").await;
    // From here on the subscriber reads nothing. 400 x 60 KiB is more than the loopback
    // socket buffers hold, so the broker's write to it waits.
    flood(&mut publisher, "flood", 400).await;
    // The stalled write ends after 1 s without progress and frees the subscriber's slot.
    let started = std::time::Instant::now();
    loop {
        let mut probe = RawClient::connect(broker.addr).await;
        probe
            .send(RawClient::connect_packet("probe", None, None, true))
            .await;
        if matches!(probe.recv().await, Some(Packet::ConnAck(_))) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the stalled subscriber still holds its slot after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It was the subscriber that was closed: what reached its socket, then the end. The
    // publisher is still served.
    while let Some(packet) = sub.recv().await {
        assert!(matches!(packet, Packet::Publish(_)), "{packet:?}");
    }
    publisher.send(Packet::PingReq).await;
    assert_eq!(publisher.recv().await, Some(Packet::PingResp));
    broker.stop().await;
}

#[tokio::test]
async fn a_slow_reader_is_not_closed_by_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Encoder;
    let broker =
        TestBroker::open("[limits]\nwrite_timeout_secs = 1\nmax_packet_size = 4194304\n").await;
    // A subscriber that reads 64 KiB every 10 ms (6.4 MB/s), on a plain socket.
    let mut sub = tokio::net::TcpStream::connect(broker.addr)
        .await
        .expect("connect");
    let mut codec = herald_protocol::Codec::new(8 * 1024 * 1024);
    let mut out = bytes::BytesMut::new();
    for packet in [
        RawClient::connect_packet("slow-reader", None, None, true),
        Packet::Subscribe {
            packet_id: pid(1),
            filters: vec![("slow".into(), WireQoS::AtMostOnce)],
        },
    ] {
        codec.encode(packet, &mut out).expect("encode");
    }
    sub.write_all(&out).await.expect("write");
    let mut acks = [0u8; 4 + 5];
    sub.read_exact(&mut acks).await.expect("CONNACK and SUBACK");
    let mut publisher = RawClient::connect(broker.addr).await;
    publisher
        .send(RawClient::connect_packet("big-publisher", None, None, true))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::ConnAck(_))));
    // 10 x 2 MiB, queued at once: one write of about 20 MiB, which at that pace takes about
    // 3 s, three times the timeout, while the client never stops taking bytes.
    let payload = bytes::Bytes::from(vec![1u8; 2 * 1024 * 1024]);
    let publish = Packet::Publish(herald_protocol::Publish {
        dup: false,
        qos: WireQoS::AtMostOnce,
        retain: false,
        topic: herald_protocol::Topic::new("slow".to_string(), 128).expect("topic"),
        packet_id: None,
        payload,
    });
    let mut one = bytes::BytesMut::new();
    codec.encode(publish.clone(), &mut one).expect("encode");
    for _ in 0..10 {
        publisher.send(publish.clone()).await;
    }
    let expected = 10 * one.len();
    let mut received = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while received < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "{received} of {expected} bytes in 20 s"
        );
        match tokio::time::timeout(Duration::from_secs(5), sub.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!("closed after {received} of {expected} bytes"),
            Ok(Ok(read)) => received += read,
            Err(_) => panic!("nothing for 5 s after {received} of {expected} bytes"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(received, expected);
    broker.stop().await;
}
