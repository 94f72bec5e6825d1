//! Persistent sessions: subscriptions and queued messages across reconnects and restarts;
//! clean sessions leave nothing behind.

use herald_testkit::{TestBroker, TestClient, options};
use rumqttc::QoS;

use crate::QUIET;

#[tokio::test]
async fn queued_messages_arrive_in_order_after_a_restart() {
    let broker = TestBroker::open("").await;
    let mut sub = TestClient::connected(options(broker.addr, "keeper", false)).await;
    sub.subscribe("jobs/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    for i in 0..20u8 {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        publisher
            .publish(&format!("jobs/{i}"), qos, false, &[i])
            .await;
    }
    // QoS 0 to an offline session is not kept.
    publisher
        .publish("jobs/zero", QoS::AtMostOnce, false, b"lost")
        .await;
    publisher.disconnect().await;

    let broker = broker.restart().await;
    let (mut sub, ack) = TestClient::connect(options(broker.addr, "keeper", false))
        .await
        .expect("connects");
    assert!(ack.session_present);
    for i in 0..20u8 {
        let got = sub.next_publish().await;
        assert_eq!(&got.payload[..], &[i], "order");
    }
    sub.expect_no_publish(QUIET).await;
    // The subscription itself survived too.
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    publisher
        .publish("jobs/new", QoS::AtLeastOnce, false, b"new")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"new");
    broker.stop().await;
}

#[tokio::test]
async fn clean_session_leaves_nothing_behind() {
    let broker = TestBroker::open("").await;
    let mut sub = TestClient::connected(options(broker.addr, "c", false)).await;
    sub.subscribe("x", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    // A clean connect wipes the persistent session.
    let (clean, ack) = TestClient::connect(options(broker.addr, "c", true))
        .await
        .expect("connects");
    assert!(!ack.session_present);
    clean.disconnect().await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    publisher
        .publish("x", QoS::AtLeastOnce, false, b"nobody")
        .await;
    let broker = broker.restart().await;
    let (mut again, ack) = TestClient::connect(options(broker.addr, "c", false))
        .await
        .expect("connects");
    assert!(!ack.session_present);
    again.expect_no_publish(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn session_present_reflects_stored_state() {
    let broker = TestBroker::open("").await;
    let (first, ack) = TestClient::connect(options(broker.addr, "p", false))
        .await
        .expect("connects");
    assert!(!ack.session_present);
    first.disconnect().await;
    let (second, ack) = TestClient::connect(options(broker.addr, "p", false))
        .await
        .expect("connects");
    assert!(ack.session_present);
    second.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn more_than_the_inflight_window_is_drained_on_reconnect() {
    let broker = TestBroker::open("").await;
    let mut sub = TestClient::connected(options(broker.addr, "big-queue", false)).await;
    sub.subscribe("bulk", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    tokio::time::sleep(QUIET).await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    for i in 0..300u16 {
        publisher
            .publish("bulk", QoS::AtLeastOnce, false, &i.to_be_bytes())
            .await;
    }
    let broker = broker.restart().await;
    let mut sub = TestClient::connected(options(broker.addr, "big-queue", false)).await;
    for i in 0..300u16 {
        assert_eq!(
            &sub.next_publish().await.payload[..],
            &i.to_be_bytes(),
            "message {i}"
        );
    }
    sub.expect_no_publish(QUIET).await;
    broker.stop().await;
}
