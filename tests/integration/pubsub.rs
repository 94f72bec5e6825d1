//! PUBLISH at QoS 0, 1 and 2 in both directions, SUBSCRIBE and UNSUBSCRIBE, wildcards.

use std::num::NonZeroU16;

use bytes::Bytes;
use herald_protocol::{Packet, Publish, QoS as WireQoS, SubAckCode, Topic};
use herald_testkit::{RawClient, TestBroker, TestClient, options};
use rumqttc::{QoS, SubscribeReasonCode};

use crate::QUIET;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

async fn raw_connected(broker: &TestBroker, id: &str, clean: bool) -> RawClient {
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(RawClient::connect_packet(id, None, None, clean))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    raw
}

#[tokio::test]
async fn every_qos_reaches_subscribers_at_the_granted_qos() {
    let broker = TestBroker::open("").await;
    let mut sub = TestClient::connected(options(broker.addr, "sub", true)).await;
    assert_eq!(
        sub.subscribe("t/0", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        sub.subscribe("t/2", QoS::ExactlyOnce).await,
        vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publisher
            .publish("t/2", qos, false, format!("{qos:?}").as_bytes())
            .await;
        let got = sub.next_publish().await;
        assert_eq!(got.qos, qos);
        assert_eq!(got.payload, Bytes::from(format!("{qos:?}")));
        assert!(!got.retain);
        // Downgraded to the subscription's QoS 0.
        publisher.publish("t/0", qos, false, b"low").await;
        assert_eq!(sub.next_publish().await.qos, QoS::AtMostOnce);
    }
    broker.stop().await;
}

#[tokio::test]
async fn qos2_flow_on_the_wire() {
    let broker = TestBroker::open("").await;
    let mut sub = raw_connected(&broker, "raw-sub", true).await;
    sub.send(Packet::Subscribe {
        packet_id: pid(1),
        filters: vec![("q2".into(), WireQoS::ExactlyOnce)],
    })
    .await;
    assert_eq!(
        sub.recv().await,
        Some(Packet::SubAck {
            packet_id: pid(1),
            codes: vec![SubAckCode::Granted(WireQoS::ExactlyOnce)]
        })
    );
    let mut publisher = raw_connected(&broker, "raw-pub", true).await;
    let publish = Publish {
        dup: false,
        qos: WireQoS::ExactlyOnce,
        retain: false,
        topic: Topic::new("q2", 64).expect("topic"),
        packet_id: Some(pid(9)),
        payload: Bytes::from_static(b"once"),
    };
    publisher.send(Packet::Publish(publish.clone())).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(pid(9))));
    // A retransmission before PUBREL is not delivered again.
    publisher
        .send(Packet::Publish(Publish {
            dup: true,
            ..publish
        }))
        .await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(pid(9))));
    publisher.send(Packet::PubRel(pid(9))).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubComp(pid(9))));
    let Some(Packet::Publish(got)) = sub.recv().await else {
        panic!("delivered")
    };
    assert_eq!(got.qos, WireQoS::ExactlyOnce);
    let id = got.packet_id.expect("packet id");
    sub.send(Packet::PubRec(id)).await;
    assert_eq!(sub.recv().await, Some(Packet::PubRel(id)));
    sub.send(Packet::PubComp(id)).await;
    sub.expect_silence(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn unacknowledged_qos1_is_redelivered_with_dup_on_reconnect() {
    let broker = TestBroker::open("").await;
    let mut sub = raw_connected(&broker, "dup-sub", false).await;
    sub.send(Packet::Subscribe {
        packet_id: pid(1),
        filters: vec![("d".into(), WireQoS::AtLeastOnce)],
    })
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck { .. })));
    let mut publisher = TestClient::connected(options(broker.addr, "dup-pub", true)).await;
    publisher.publish("d", QoS::AtLeastOnce, false, b"m").await;
    let Some(Packet::Publish(first)) = sub.recv().await else {
        panic!("delivered")
    };
    assert!(!first.dup);
    drop(sub); // no PUBACK
    tokio::time::sleep(QUIET).await;
    let mut sub = RawClient::connect(broker.addr).await;
    sub.send(RawClient::connect_packet("dup-sub", None, None, false))
        .await;
    let Some(Packet::ConnAck(ack)) = sub.recv().await else {
        panic!("connack")
    };
    assert!(ack.session_present);
    let Some(Packet::Publish(again)) = sub.recv().await else {
        panic!("redelivered")
    };
    assert!(again.dup);
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(again.payload, first.payload);
    broker.stop().await;
}

#[tokio::test]
async fn wildcards_match_as_the_spec_says() {
    let broker = TestBroker::open("").await;
    let mut sub = TestClient::connected(options(broker.addr, "wild", true)).await;
    sub.subscribe("a/+/c", QoS::AtMostOnce).await;
    sub.subscribe("x/#", QoS::AtMostOnce).await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    for (topic, delivered) in [
        ("a/b/c", true),
        ("a/b/c/d", false),
        ("a/c", false),
        ("x", true),
        ("x/y/z", true),
        ("y/x", false),
    ] {
        publisher
            .publish(topic, QoS::AtLeastOnce, false, topic.as_bytes())
            .await;
        if delivered {
            assert_eq!(sub.next_publish().await.topic, topic);
        } else {
            sub.expect_no_publish(QUIET).await;
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let broker = TestBroker::open("").await;
    let mut sub = TestClient::connected(options(broker.addr, "overlap", true)).await;
    sub.subscribe("o/#", QoS::AtMostOnce).await;
    sub.subscribe("o/+", QoS::AtLeastOnce).await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    publisher
        .publish("o/1", QoS::AtLeastOnce, false, b"x")
        .await;
    assert_eq!(sub.next_publish().await.qos, QoS::AtLeastOnce);
    sub.expect_no_publish(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let broker = TestBroker::open("").await;
    let mut sub = raw_connected(&broker, "unsub", true).await;
    sub.send(Packet::Subscribe {
        packet_id: pid(1),
        filters: vec![("u".into(), WireQoS::AtMostOnce)],
    })
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck { .. })));
    sub.send(Packet::Unsubscribe {
        packet_id: pid(2),
        filters: vec!["u".into(), "never-subscribed".into()],
    })
    .await;
    assert_eq!(sub.recv().await, Some(Packet::UnsubAck(pid(2))));
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    publisher.publish("u", QoS::AtLeastOnce, false, b"x").await;
    sub.expect_silence(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_publisher_receives_its_own_messages_when_subscribed() {
    let broker = TestBroker::open("").await;
    let mut client = TestClient::connected(options(broker.addr, "self", true)).await;
    client.subscribe("me", QoS::AtLeastOnce).await;
    client
        .client
        .publish("me", QoS::AtLeastOnce, false, b"echo".to_vec())
        .await
        .expect("publish");
    assert_eq!(&client.next_publish().await.payload[..], b"echo");
    broker.stop().await;
}

#[tokio::test]
async fn leading_wildcards_do_not_match_dollar_topics() {
    let broker = TestBroker::open("").await;
    let mut everything = TestClient::connected(options(broker.addr, "all", true)).await;
    everything.subscribe("#", QoS::AtLeastOnce).await;
    everything.subscribe("+/B", QoS::AtLeastOnce).await;
    let mut dollar = TestClient::connected(options(broker.addr, "dollar", true)).await;
    dollar.subscribe("$TopicA/#", QoS::AtLeastOnce).await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    publisher
        .publish("$TopicA/B", QoS::AtLeastOnce, false, b"d")
        .await;
    assert_eq!(dollar.next_publish().await.topic, "$TopicA/B");
    everything.expect_no_publish(QUIET).await;
    broker.stop().await;
}
