//! Hostile traffic: sockets that never speak, CONNECT floods from one address, password
//! guessing, oversize length fields, publish floods. Well-behaved clients on the same broker
//! keep working meanwhile, and every refusal is counted in /metrics.

use std::time::Duration;

use herald_protocol::Packet;
use herald_testkit::{
    DEMO_USER, OPS_KEY, RawClient, TestBroker, TestClient, metric, signature, signed_options,
};
use rumqttc::QoS;

/// A client that publishes and receives its own message: the broker still serves.
async fn still_serves(broker: &TestBroker, id: &str) {
    let mut c = TestClient::connected(signed_options(broker.addr, id, true)).await;
    c.subscribe("demo/alive", QoS::AtLeastOnce).await;
    c.publish("demo/alive", QoS::AtLeastOnce, false, b"yes")
        .await;
    assert_eq!(&c.next_publish().await.payload[..], b"yes");
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_and_endless_packets_are_closed_while_others_work() {
    let broker = TestBroker::demo("[limits]\nconnect_timeout_secs = 1\n").await;
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(
            tokio::net::TcpStream::connect(broker.addr)
                .await
                .expect("connect"),
        );
    }
    // A CONNECT that never completes, and a huge length field.
    let mut partial = RawClient::connect(broker.addr).await;
    partial.send_bytes(b"\x10\x10\x00\x04MQ").await;
    let mut huge = RawClient::connect(broker.addr).await;
    huge.send_bytes(&[0x10, 0xff, 0xff, 0xff, 0x7f]).await;
    still_serves(&broker, "GID_demo@@@steady").await;
    huge.expect_closed().await;
    partial.expect_closed().await;
    for mut socket in silent {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "silent socket got data");
    }
    still_serves(&broker, "GID_demo@@@steady").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_from_one_address_is_cut_at_its_rate() {
    let broker = TestBroker::demo(&format!(
        "[limits]\nmax_connect_rate_per_ip = 20\n{OPS_KEY}"
    ))
    .await;
    let mut refused = 0;
    for i in 0..60 {
        let id = format!("GID_demo@@@flood-{i}");
        let mut raw = RawClient::connect(broker.addr).await;
        raw.send(RawClient::connect_packet(
            &id,
            Some(DEMO_USER),
            Some(&signature(&id)),
            true,
        ))
        .await;
        match raw.recv().await {
            Some(Packet::ConnAck(_)) => {}
            None => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(refused >= 30, "only {refused} of 60 refused");
    assert_eq!(
        metric(
            &broker,
            "herald_connections_refused_total{limit=\"connect_rate\"}"
        )
        .await,
        refused
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    still_serves(&broker, "GID_demo@@@after-flood").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_bans_the_address_for_a_while() {
    let broker = TestBroker::demo(&format!(
        "[limits]\nmax_auth_failures_per_ip = 3\nauth_ban_secs = 2\n{OPS_KEY}"
    ))
    .await;
    let id = "GID_demo@@@victim";
    for _ in 0..3 {
        let mut raw = RawClient::connect(broker.addr).await;
        raw.send(RawClient::connect_packet(
            id,
            Some(DEMO_USER),
            Some("guess"),
            true,
        ))
        .await;
        assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    }
    // Banned: even the right password gets no CONNACK.
    let mut raw = RawClient::connect(broker.addr).await;
    raw.send(RawClient::connect_packet(
        id,
        Some(DEMO_USER),
        Some(&signature(id)),
        true,
    ))
    .await;
    raw.expect_closed().await;
    assert_eq!(metric(&broker, "herald_auth_bans_total").await, 1);
    assert_eq!(metric(&broker, "herald_auth_failures_total").await, 3);
    assert!(
        metric(
            &broker,
            "herald_connections_refused_total{limit=\"banned\"}"
        )
        .await
            >= 1
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    still_serves(&broker, id).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_will_topic_is_not_a_failed_login() {
    let broker = TestBroker::demo(&format!(
        "[limits]\nmax_auth_failures_per_ip = 3\nauth_ban_secs = 60\n{OPS_KEY}"
    ))
    .await;
    let id = "GID_demo@@@will";
    // Right credentials, a will topic the key may not publish to: refused, five times.
    for _ in 0..5 {
        let mut options = signed_options(broker.addr, id, true);
        options.set_last_will(rumqttc::LastWill::new(
            "elsewhere/will",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        let refused = TestClient::connect(options).await.err().unwrap_or_default();
        assert!(refused.contains("NotAuthorized"), "{refused}");
    }
    assert_eq!(metric(&broker, "herald_auth_failures_total").await, 0);
    assert_eq!(metric(&broker, "herald_auth_bans_total").await, 0);
    still_serves(&broker, id).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_is_slowed_down_not_dropped() {
    let broker = TestBroker::demo(&format!("[limits]\nmax_messages_per_sec = 50\n{OPS_KEY}")).await;
    let mut sub =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@listener", true)).await;
    sub.subscribe("demo/flood", QoS::AtLeastOnce).await;
    let mut flooder =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@flooder", true)).await;
    for i in 0..120u8 {
        flooder
            .publish("demo/flood", QoS::AtLeastOnce, false, &[i])
            .await;
    }
    for i in 0..120u8 {
        assert_eq!(&sub.next_publish().await.payload[..], &[i]);
    }
    assert!(metric(&broker, "herald_publish_throttled_total").await > 0);
    still_serves(&broker, "GID_demo@@@bystander").await;
    broker.stop().await;
}
