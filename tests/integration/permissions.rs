//! Access-key permissions, parent topics, P2P topics, and the denied-publish policy.

use herald_testkit::{TestBroker, TestClient, signed_options};
use rumqttc::{QoS, SubscribeReasonCode};

use crate::QUIET;

const A: &str = "GID_demo@@@dev-a";
const B: &str = "GID_demo@@@dev-b";

#[tokio::test]
async fn subscriptions_outside_the_keys_filters_get_0x80() {
    let broker = TestBroker::demo("").await;
    let mut client = TestClient::connected(signed_options(broker.addr, A, true)).await;
    client
        .client
        .subscribe_many(vec![
            rumqttc::SubscribeFilter::new("demo/ok".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("other/x".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("#".into(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("$notice/GID_demo/#".into(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("demo/+".into(), QoS::ExactlyOnce),
        ])
        .await
        .expect("subscribe");
    assert_eq!(
        client.suback().await,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::ExactlyOnce),
        ]
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_denied_publish_closes_the_connection_by_default() {
    let broker = TestBroker::demo("").await;
    let mut client = TestClient::connected(signed_options(broker.addr, A, true)).await;
    client
        .client
        .publish("other/x", QoS::AtLeastOnce, false, b"no".to_vec())
        .await
        .expect("queue");
    client.closed().await;
    // Undeclared parent topics are denied the same way.
    let mut client = TestClient::connected(signed_options(broker.addr, A, true)).await;
    client
        .client
        .publish("nodemo", QoS::AtMostOnce, false, b"no".to_vec())
        .await
        .expect("queue");
    client.closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn ignore_policy_drops_denied_publishes_and_keeps_the_connection() {
    let broker = TestBroker::demo("[limits]\non_denied_publish = \"ignore\"\n").await;
    let mut watcher = TestClient::connected(signed_options(broker.addr, B, true)).await;
    watcher.subscribe("demo/#", QoS::AtLeastOnce).await;
    let mut client = TestClient::connected(signed_options(broker.addr, A, true)).await;
    client
        .publish("other/x", QoS::AtLeastOnce, false, b"dropped")
        .await; // PUBACK still comes
    client
        .publish("demo/fine", QoS::AtLeastOnce, false, b"kept")
        .await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"kept");
    watcher.expect_no_publish(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn p2p_messages_reach_only_their_target() {
    let broker = TestBroker::demo("").await;
    let mut target = TestClient::connected(signed_options(broker.addr, B, true)).await;
    let mut bystander =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@dev-c", true)).await;
    bystander.subscribe("demo/#", QoS::AtLeastOnce).await;
    // Nobody may subscribe to another client's P2P topic.
    let codes = bystander
        .subscribe(&format!("demo/p2p/{B}"), QoS::AtLeastOnce)
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);
    let mut sender = TestClient::connected(signed_options(broker.addr, A, true)).await;
    sender
        .publish(&format!("demo/p2p/{B}"), QoS::AtLeastOnce, false, b"for b")
        .await;
    let got = target.next_publish().await;
    assert_eq!(&got.payload[..], b"for b");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    bystander.expect_no_publish(QUIET).await;
    broker.stop().await;
}

#[tokio::test]
async fn a_will_on_a_forbidden_topic_is_refused_at_connect() {
    let broker = TestBroker::demo("").await;
    let mut o = signed_options(broker.addr, A, true);
    o.set_last_will(rumqttc::LastWill::new(
        "other/will",
        "x",
        QoS::AtMostOnce,
        false,
    ));
    let err = TestClient::connect(o).await.err().expect("refused");
    assert!(err.contains("NotAuthorized"), "{err}");
    broker.stop().await;
}
