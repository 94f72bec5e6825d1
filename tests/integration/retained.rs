//! Retained messages: set, replace, clear, delivered on subscribe, kept across restarts.

use herald_testkit::{TestBroker, TestClient, options};
use rumqttc::QoS;

use crate::QUIET;

#[tokio::test]
async fn retained_messages_are_set_replaced_cleared_and_survive_restart() {
    let broker = TestBroker::open("").await;
    let mut publisher = TestClient::connected(options(broker.addr, "pub", true)).await;
    publisher
        .publish("r/1", QoS::AtLeastOnce, true, b"first")
        .await;
    publisher
        .publish("r/1", QoS::AtLeastOnce, true, b"second")
        .await;
    publisher
        .publish("r/2", QoS::AtLeastOnce, true, b"other")
        .await;

    let mut late = TestClient::connected(options(broker.addr, "late", true)).await;
    late.subscribe("r/1", QoS::AtLeastOnce).await;
    let got = late.next_publish().await;
    assert!(got.retain);
    assert_eq!(&got.payload[..], b"second");
    late.expect_no_publish(QUIET).await;
    // A live delivery of a retained publish carries retain = 0.
    publisher
        .publish("r/1", QoS::AtLeastOnce, true, b"third")
        .await;
    let live = late.next_publish().await;
    assert!(!live.retain);
    assert_eq!(&live.payload[..], b"third");

    // Clear r/2 with an empty payload.
    publisher.publish("r/2", QoS::AtLeastOnce, true, b"").await;
    publisher.disconnect().await;
    late.disconnect().await;

    let broker = broker.restart().await;
    let mut after = TestClient::connected(options(broker.addr, "after", true)).await;
    after.subscribe("r/#", QoS::AtMostOnce).await;
    let got = after.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain, got.qos),
        ("r/1", &b"third"[..], true, QoS::AtMostOnce)
    );
    after.expect_no_publish(QUIET).await;
    broker.stop().await;
}
