//! CONNECT and CONNACK: every return code, the CONNECT deadline, MQTT 3.1, takeover.

use std::time::Duration;

use herald_protocol::{ConnAck, ConnectReturnCode, Packet};
use herald_testkit::{DEMO_USER, RawClient, TestBroker, TestClient, signature, signed_options};

async fn connack(
    broker: &TestBroker,
    id: &str,
    user: Option<&str>,
    pass: Option<&str>,
    clean: bool,
) -> Option<Packet> {
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(RawClient::connect_packet(id, user, pass, clean))
        .await;
    raw.recv().await
}

fn code(c: ConnectReturnCode) -> Option<Packet> {
    Some(Packet::ConnAck(ConnAck {
        session_present: false,
        code: c,
    }))
}

#[tokio::test]
async fn signature_credentials_are_accepted() {
    let broker = TestBroker::demo("").await;
    let id = "GID_demo@@@dev-1";
    assert_eq!(signature(id), "5vPUiwwywQkBwF4swW30o85MOqw=");
    let got = connack(&broker, id, Some(DEMO_USER), Some(&signature(id)), true).await;
    assert_eq!(got, code(ConnectReturnCode::Accepted));
    broker.stop().await;
}

#[tokio::test]
async fn every_refusal_has_its_connack_code() {
    let broker = TestBroker::demo("").await;
    let id = "GID_demo@@@dev-1";
    let good = signature(id);
    use ConnectReturnCode::*;
    let cases: Vec<(&str, Option<&str>, Option<&str>, ConnectReturnCode)> = vec![
        (id, Some(DEMO_USER), Some("wrong"), BadUsernameOrPassword),
        (id, Some(DEMO_USER), None, BadUsernameOrPassword),
        (
            id,
            Some("Signature|nokey|herald-demo"),
            Some(&good),
            NotAuthorized,
        ),
        (
            id,
            Some("Signature|demo|other-instance"),
            Some(&good),
            NotAuthorized,
        ),
        (id, None, None, NotAuthorized),
        (
            "GID_other@@@dev-1",
            Some(DEMO_USER),
            Some(&good),
            IdentifierRejected,
        ),
        (
            "no-separator",
            Some(DEMO_USER),
            Some(&good),
            IdentifierRejected,
        ),
        (
            "GID_demo@@@bad/device",
            Some(DEMO_USER),
            Some(&good),
            IdentifierRejected,
        ),
    ];
    for (client, user, pass, expected) in cases {
        let got = connack(&broker, client, user, pass, true).await;
        assert_eq!(got, code(expected), "{client} {user:?}");
    }
    // A wrong signature is refused even though the key exists: signed for another client id.
    let other = signature("GID_demo@@@dev-2");
    assert_eq!(
        connack(&broker, id, Some(DEMO_USER), Some(&other), true).await,
        code(BadUsernameOrPassword)
    );
    broker.stop().await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_code_1() {
    let broker = TestBroker::open("").await;
    let mut raw = RawClient::connect(broker.addr).await;
    // MQTT 5 CONNECT (level 5, empty properties).
    raw.send_bytes(b"\x10\x11\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x04abcd")
        .await;
    assert_eq!(
        raw.recv().await,
        code(ConnectReturnCode::UnacceptableProtocolVersion)
    );
    raw.expect_closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn empty_client_id_without_clean_session_gets_code_2() {
    let broker = TestBroker::open("").await;
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send_bytes(b"\x10\x0c\x00\x04MQTT\x04\x00\x00\x3c\x00\x00")
        .await;
    assert_eq!(
        raw.recv().await,
        code(ConnectReturnCode::IdentifierRejected)
    );
    raw.expect_closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn open_mode_takes_plain_clients_and_assigns_empty_ids() {
    let broker = TestBroker::open("").await;
    assert_eq!(
        connack(&broker, "plain", None, None, true).await,
        code(ConnectReturnCode::Accepted)
    );
    assert_eq!(
        connack(&broker, "plain2", Some("user"), Some("pw"), true).await,
        code(ConnectReturnCode::Accepted)
    );
    assert_eq!(
        connack(&broker, "", None, None, true).await,
        code(ConnectReturnCode::Accepted)
    );
    broker.stop().await;
}

#[tokio::test]
async fn mqtt_3_1_clients_are_accepted() {
    let broker = TestBroker::open("").await;
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send_bytes(b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04abcd")
        .await;
    assert_eq!(raw.recv().await, code(ConnectReturnCode::Accepted));
    raw.send_bytes(b"\xc0\x00").await;
    assert_eq!(raw.recv().await, Some(Packet::PingResp));
    broker.stop().await;
}

#[tokio::test]
async fn a_socket_that_never_sends_connect_is_closed_at_the_deadline() {
    let broker = TestBroker::open("[limits]\nconnect_timeout_secs = 1\n").await;
    let mut raw = RawClient::connect(broker.addr).await;
    let started = std::time::Instant::now();
    raw.expect_closed().await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    // Half a packet is no better.
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send_bytes(b"\x10\x10\x00\x04MQ").await;
    raw.expect_closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn the_first_packet_must_be_connect() {
    let broker = TestBroker::open("").await;
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send_bytes(b"\xc0\x00").await;
    raw.expect_closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn keepalive_is_enforced_at_one_and_a_half_times() {
    let broker = TestBroker::open("").await;
    let mut raw = RawClient::connect(broker.addr).await;
    // keepalive = 1 s
    raw.send_bytes(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x01\x00\x04abcd")
        .await;
    assert_eq!(raw.recv().await, code(ConnectReturnCode::Accepted));
    let started = std::time::Instant::now();
    raw.expect_closed().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(3000),
        "closed after {waited:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn pings_keep_a_connection_alive() {
    let broker = TestBroker::open("").await;
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send_bytes(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x01\x00\x04abcd")
        .await;
    assert_eq!(raw.recv().await, code(ConnectReturnCode::Accepted));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        raw.send_bytes(b"\xc0\x00").await;
        assert_eq!(raw.recv().await, Some(Packet::PingResp));
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_new_connection_takes_over_the_client_id() {
    let broker = TestBroker::demo("").await;
    let id = "GID_demo@@@dev-1";
    let mut first = TestClient::connected(signed_options(broker.addr, id, true)).await;
    let mut second = TestClient::connected(signed_options(broker.addr, id, true)).await;
    first.closed().await;
    // The new connection works.
    second.subscribe("demo/t", rumqttc::QoS::AtLeastOnce).await;
    second
        .publish("demo/t", rumqttc::QoS::AtLeastOnce, false, b"x")
        .await;
    assert_eq!(&second.next_publish().await.payload[..], b"x");
    broker.stop().await;
}
