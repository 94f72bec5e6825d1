//! Malformed input closes only the offending connection; everyone else keeps working.

use herald_protocol::Packet;
use herald_testkit::{RawClient, TestBroker, TestClient, options};
use rumqttc::QoS;

async fn connected_raw(broker: &TestBroker, id: &str) -> RawClient {
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(RawClient::connect_packet(id, None, None, true))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    raw
}

#[tokio::test]
async fn each_kind_of_malformed_packet_closes_only_its_connection() {
    let broker = TestBroker::open("[limits]\nmax_packet_size = 4096\n").await;
    let mut bystander = TestClient::connected(options(broker.addr, "bystander", true)).await;
    bystander.subscribe("ok", QoS::AtLeastOnce).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "remaining length of five bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ),
        (
            "bad UTF-8 in a topic",
            vec![0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, b'x'],
        ),
        ("QoS 3", vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]),
        (
            "packet id 0",
            vec![0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00],
        ),
        (
            "wildcard in a publish topic",
            vec![0x30, 0x03, 0x00, 0x01, b'+'],
        ),
        (
            "second CONNECT",
            b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd".to_vec(),
        ),
        ("oversize packet", vec![0x30, 0x80, 0x80, 0x01]),
        ("reserved packet type", vec![0xf0, 0x00]),
        (
            "SUBSCRIBE with bad flags",
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        (
            "SUBSCRIBE with an invalid filter",
            vec![0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'#', 0x00],
        ),
        (
            "SUBSCRIBE with QoS 3",
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03],
        ),
        (
            "SUBSCRIBE with a reserved bit in the QoS byte",
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x41],
        ),
        ("SUBSCRIBE with no filter", vec![0x82, 0x02, 0x00, 0x01]),
        (
            "server-only packet from a client",
            vec![0x90, 0x03, 0x00, 0x01, 0x00],
        ),
        ("NUL in a topic", vec![0x30, 0x04, 0x00, 0x02, b'a', 0x00]),
    ];
    for (what, bytes) in cases {
        let mut raw = connected_raw(&broker, "bad").await;
        raw.send_bytes(&bytes).await;
        assert_eq!(
            raw.recv().await,
            None,
            "{what}: connection should be closed"
        );
    }
    let mut publisher = TestClient::connected(options(broker.addr, "publisher", true)).await;
    publisher
        .publish("ok", QoS::AtLeastOnce, false, b"still here")
        .await;
    assert_eq!(&bystander.next_publish().await.payload[..], b"still here");
    broker.stop().await;
}

#[tokio::test]
async fn a_password_without_a_user_name_is_malformed() {
    let broker = TestBroker::open("").await;
    let mut raw = RawClient::connect(broker.addr).await;
    // Flags 0x42: password + clean session, no user name.
    raw.send_bytes(b"\x10\x12\x00\x04MQTT\x04\x42\x00\x3c\x00\x02id\x00\x02pw")
        .await;
    raw.expect_closed().await;
    broker.stop().await;
}
