//! Will messages: published on every end but a DISCONNECT.

use std::time::Duration;

use herald_testkit::{RawClient, TestBroker, TestClient, options};
use rumqttc::{LastWill, QoS};

use crate::QUIET;

fn with_will(broker: &TestBroker, id: &str, keep_alive: u64) -> rumqttc::MqttOptions {
    let mut o = options(broker.addr, id, true);
    o.set_last_will(LastWill::new(
        "wills",
        format!("{id} gone"),
        QoS::AtLeastOnce,
        false,
    ));
    o.set_keep_alive(Duration::from_secs(keep_alive));
    o
}

#[tokio::test]
async fn a_dropped_socket_publishes_the_will() {
    let broker = TestBroker::open("").await;
    let mut watcher = TestClient::connected(options(broker.addr, "watcher", true)).await;
    watcher.subscribe("wills", QoS::AtLeastOnce).await;
    let client = TestClient::connected(with_will(&broker, "dropper", 30)).await;
    client.drop_connection();
    let got = watcher.next_publish().await;
    assert_eq!(&got.payload[..], b"dropper gone");
    broker.stop().await;
}

#[tokio::test]
async fn disconnect_discards_the_will() {
    let broker = TestBroker::open("").await;
    let mut watcher = TestClient::connected(options(broker.addr, "watcher", true)).await;
    watcher.subscribe("wills", QoS::AtLeastOnce).await;
    let client = TestClient::connected(with_will(&broker, "polite", 30)).await;
    client.disconnect().await;
    watcher.expect_no_publish(QUIET * 2).await;
    broker.stop().await;
}

#[tokio::test]
async fn takeover_publishes_the_old_channels_will() {
    let broker = TestBroker::open("").await;
    let mut watcher = TestClient::connected(options(broker.addr, "watcher", true)).await;
    watcher.subscribe("wills", QoS::AtLeastOnce).await;
    let _first = TestClient::connected(with_will(&broker, "twin", 30)).await;
    let _second = TestClient::connected(options(broker.addr, "twin", true)).await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"twin gone");
    broker.stop().await;
}

/// A client that sends DISCONNECT and connects again at once, many times: the broker may take
/// the new CONNECT in before it has read the old connection's DISCONNECT; the takeover then
/// reads it first, and the will stays unsent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_just_before_a_reconnect_discards_the_will() {
    let broker = TestBroker::open("").await;
    let mut watcher = TestClient::connected(options(broker.addr, "watcher", true)).await;
    watcher.subscribe("wills", QoS::AtLeastOnce).await;
    for _ in 0..30 {
        let client = TestClient::connected(with_will(&broker, "hasty", 30)).await;
        client.disconnect().await;
    }
    watcher.expect_no_publish(QUIET * 2).await;
    broker.stop().await;
}

/// The same, with a QoS 0 PUBLISH before each DISCONNECT (as `mosquitto_pub -i` in a loop
/// does), both in one write: a takeover that comes before the broker has read them still
/// routes the message and discards the will. (One write: a client whose socket delays the
/// DISCONNECT behind the unacknowledged PUBLISH, Nagle's algorithm, may not have sent it when
/// its next connection arrives, and then the takeover rightly finds none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_and_disconnect_just_before_a_reconnect_are_both_taken() {
    publish_disconnect_reconnect(30, None).await;
}

/// The same from parked connections: the parker resumes the old one, whose new task meets the
/// takeover before it has read a byte, so the takeover finds the PUBLISH as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_s_publish_and_disconnect_just_before_a_reconnect_are_both_taken() {
    publish_disconnect_reconnect(12, Some(Duration::from_millis(150))).await;
}

/// `cycles` times: connect with a will, wait `idle` (to park), then PUBLISH and DISCONNECT in
/// one write and connect again at once; every message arrives, in order, and no will.
async fn publish_disconnect_reconnect(cycles: usize, idle: Option<Duration>) {
    use herald_protocol::{Packet, Publish, Topic, Will};
    let broker = TestBroker::open("").await;
    let mut watcher = TestClient::connected(options(broker.addr, "watcher", true)).await;
    watcher.subscribe("wills", QoS::AtLeastOnce).await;
    watcher.subscribe("news", QoS::AtMostOnce).await;
    for i in 0..cycles {
        let mut client = RawClient::connect(broker.addr).await;
        let mut connect = RawClient::connect_packet("hasty", None, None, true);
        if let Packet::Connect(c) = &mut connect {
            c.will = Some(Will {
                topic: Topic::from_trusted("wills"),
                payload: bytes::Bytes::from_static(b"hasty gone"),
                qos: herald_protocol::QoS::AtLeastOnce,
                retain: false,
            });
        }
        client.send(connect).await;
        assert!(matches!(client.recv().await, Some(Packet::ConnAck(_))));
        if let Some(idle) = idle {
            tokio::time::sleep(idle).await;
        }
        let publish = Publish {
            dup: false,
            qos: herald_protocol::QoS::AtMostOnce,
            retain: false,
            topic: Topic::from_trusted("news"),
            packet_id: None,
            payload: bytes::Bytes::from(i.to_string()),
        };
        client
            .send_all([Packet::Publish(publish), Packet::Disconnect])
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..cycles {
        let p = watcher.next_publish().await;
        assert_eq!(p.topic, "news", "a will was published");
        got.push(String::from_utf8_lossy(&p.payload).to_string());
    }
    let expected: Vec<String> = (0..cycles).map(|i| i.to_string()).collect();
    assert_eq!(got, expected);
    watcher.expect_no_publish(QUIET * 2).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_protocol_error_publishes_the_will() {
    let broker = TestBroker::open("").await;
    let mut watcher = TestClient::connected(options(broker.addr, "watcher", true)).await;
    watcher.subscribe("wills", QoS::AtLeastOnce).await;
    let mut raw = herald_testkit::RawClient::connect(broker.addr).await;
    // CONNECT with will topic "wills", payload "bye", QoS 0.
    raw.send_bytes(b"\x10\x1b\x00\x04MQTT\x04\x06\x00\x3c\x00\x03raw\x00\x05wills\x00\x03bye")
        .await;
    assert!(matches!(
        raw.recv().await,
        Some(herald_protocol::Packet::ConnAck(_))
    ));
    raw.send_bytes(b"\x36\x05\x00\x01a\x00\x01").await; // QoS 3
    raw.expect_closed().await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"bye");
    broker.stop().await;
}
