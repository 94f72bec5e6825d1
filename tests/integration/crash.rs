//! SIGKILL of the broker in the middle of QoS 1 traffic: no acknowledged message to a
//! persistent session is lost, and none is delivered twice without DUP. And QoS 2 stays
//! exactly once across a SIGKILL.

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::{Packet, Publish, QoS as WireQoS, Topic};
use herald_testkit::{BrokerProcess, RawClient, TestClient, open_config, options};
use rumqttc::QoS;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// Receives on the persistent session until `wait` passes with nothing new; records
/// (payload, dup) pairs.
async fn drain(client: &mut TestClient, seen: &mut Vec<(u32, bool)>, wait: Duration) {
    while let Some(Ok(packet)) = client.next_incoming(wait).await {
        if let rumqttc::Packet::Publish(p) = packet {
            let n = u32::from_be_bytes(p.payload[..4].try_into().expect("4 bytes"));
            seen.push((n, p.dup));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_message_with_sync_always() {
    sigkill_in_the_middle_of_qos1_traffic("[storage]\nsync = \"always\"\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_message_with_sync_interval() {
    // A long interval: acknowledged batches live only in the write-ahead log when it dies.
    sigkill_in_the_middle_of_qos1_traffic("[storage]\nsync = \"interval\"\ninterval_ms = 10000\n")
        .await;
}

async fn sigkill_in_the_middle_of_qos1_traffic(storage: &str) {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = open_config(&dir.path().join("data"), storage);
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);

    // One persistent subscriber online, one offline: both must get every acknowledged message.
    let mut online = TestClient::connected(options(broker.addr, "online-sub", false)).await;
    online.subscribe("crash/#", QoS::AtLeastOnce).await;
    let mut offline = TestClient::connected(options(broker.addr, "offline-sub", false)).await;
    offline.subscribe("crash/#", QoS::AtLeastOnce).await;
    offline.disconnect().await;
    // Let the broker take the DISCONNECT in before publishing starts, so that nothing is
    // delivered to (and acknowledged by) the "offline" subscriber while it is still online.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let acked = Arc::new(Mutex::new(Vec::<u32>::new()));
    let mut publisher = TestClient::connected(options(broker.addr, "crash-pub", true)).await;
    let acked_by_task = acked.clone();
    let publishing = tokio::spawn(async move {
        for n in 0u32..5000 {
            if publisher
                .client
                .publish("crash/t", QoS::AtLeastOnce, false, n.to_be_bytes().to_vec())
                .await
                .is_err()
            {
                return;
            }
            loop {
                match publisher.next_incoming(Duration::from_secs(5)).await {
                    Some(Ok(rumqttc::Packet::PubAck(_))) => break,
                    Some(Ok(_)) => continue,
                    _ => return,
                }
            }
            acked_by_task.lock().expect("lock").push(n);
        }
    });
    let mut seen_online = Vec::new();
    while acked.lock().expect("lock").len() < 300 {
        drain(&mut online, &mut seen_online, Duration::from_millis(20)).await;
    }
    broker.kill();
    let _ = publishing.await;
    drain(&mut online, &mut seen_online, Duration::from_millis(200)).await;
    let acked: Vec<u32> = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 300);

    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let mut online = TestClient::connected(options(broker.addr, "online-sub", false)).await;
    drain(&mut online, &mut seen_online, Duration::from_millis(1500)).await;
    let mut offline = TestClient::connected(options(broker.addr, "offline-sub", false)).await;
    let mut seen_offline = Vec::new();
    drain(&mut offline, &mut seen_offline, Duration::from_millis(1500)).await;

    for (name, seen) in [("online", &seen_online), ("offline", &seen_offline)] {
        let mut count: HashMap<u32, usize> = HashMap::new();
        for (n, dup) in seen {
            let c = count.entry(*n).or_default();
            *c += 1;
            assert!(
                *c == 1 || *dup,
                "{name}: message {n} delivered again without DUP"
            );
        }
        let lost: Vec<&u32> = acked.iter().filter(|n| !count.contains_key(n)).collect();
        assert!(
            lost.is_empty(),
            "{name}: acknowledged messages lost: {lost:?}"
        );
    }
    // The offline session got them in publish order.
    let firsts: Vec<u32> = {
        let mut once = std::collections::HashSet::new();
        seen_offline
            .iter()
            .filter(|(n, _)| once.insert(*n))
            .map(|(n, _)| *n)
            .collect()
    };
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "offline delivery out of order"
    );
    broker.kill();
}

async fn raw_session(addr: std::net::SocketAddr, id: &str) -> (RawClient, bool) {
    let mut raw = RawClient::connect(addr).await;
    raw.send(RawClient::connect_packet(id, None, None, false))
        .await;
    match raw.recv().await {
        Some(Packet::ConnAck(ack)) => (raw, ack.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn qos2_publish(id: u16, payload: &'static [u8], dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos: WireQoS::ExactlyOnce,
        retain: false,
        topic: Topic::new("q2/t", 64).expect("topic"),
        packet_id: NonZeroU16::new(id),
        payload: Bytes::from_static(payload),
    })
}

/// Exactly once across a crash: a QoS 2 PUBLISH the broker answered with PUBREC is not routed
/// again when the client retransmits it to the restarted broker, and an id released by
/// PUBCOMP stays released, so its reuse for a new message is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_does_not_make_qos2_deliver_twice() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = open_config(&dir.path().join("data"), "[storage]\nsync = \"always\"\n");
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let mut sub = TestClient::connected(options(broker.addr, "q2-sub", false)).await;
    sub.subscribe("q2/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let (mut publisher, _) = raw_session(broker.addr, "q2-pub").await;
    publisher.send(qos2_publish(9, b"once", false)).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(pid(9))));
    // The broker dies before the PUBREL arrives.
    broker.kill();

    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let (mut publisher, present) = raw_session(broker.addr, "q2-pub").await;
    assert!(present);
    publisher.send(qos2_publish(9, b"once", true)).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(pid(9))));
    publisher.send(Packet::PubRel(pid(9))).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubComp(pid(9))));
    broker.kill();

    // After the PUBCOMP the client may reuse id 9 for a new message.
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let (mut publisher, _) = raw_session(broker.addr, "q2-pub").await;
    publisher.send(qos2_publish(9, b"second", false)).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(pid(9))));
    publisher.send(Packet::PubRel(pid(9))).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubComp(pid(9))));

    let mut sub = TestClient::connected(options(broker.addr, "q2-sub", false)).await;
    let mut got = Vec::new();
    while let Some(Ok(packet)) = sub.next_incoming(Duration::from_millis(1500)).await {
        if let rumqttc::Packet::Publish(p) = packet {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(got, ["once", "second"]);
    broker.kill();
}

/// Publishes `payload` at QoS 2 and returns the packet id it reaches `sub` under.
async fn relay_qos2(publisher: &mut TestClient, sub: &mut RawClient, payload: &[u8]) -> NonZeroU16 {
    publisher
        .publish("q2/t", QoS::ExactlyOnce, false, payload)
        .await;
    match sub.recv().await {
        Some(Packet::Publish(publish)) => {
            assert_eq!(publish.payload, payload);
            publish.packet_id.expect("a QoS 2 packet id")
        }
        other => panic!("expected the PUBLISH of {payload:?}, got {other:?}"),
    }
}

/// The other direction: a QoS 2 delivery to a persistent subscriber resumes where it was after
/// a SIGKILL. A message the subscriber has not acknowledged comes again under its original
/// packet id with DUP set (so a subscriber that took it can recognise it); one it has PUBRECed
/// is completed with PUBREL, not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_resumes_qos2_deliveries_under_their_original_ids() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = open_config(&dir.path().join("data"), "[storage]\nsync = \"always\"\n");
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let (mut sub, _) = raw_session(broker.addr, "q2-out-sub").await;
    sub.send(Packet::Subscribe {
        packet_id: pid(1),
        filters: vec![("q2/#".into(), WireQoS::ExactlyOnce)],
    })
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck { .. })));
    let mut publisher = TestClient::connected(options(broker.addr, "q2-out-pub", true)).await;
    // Three complete exchanges first, so the ids below are not the ones a fresh broker would
    // hand out first.
    for _ in 0..3 {
        let id = relay_qos2(&mut publisher, &mut sub, b"warm-up").await;
        sub.send(Packet::PubRec(id)).await;
        assert_eq!(sub.recv().await, Some(Packet::PubRel(id)));
        sub.send(Packet::PubComp(id)).await;
    }
    let first_id = relay_qos2(&mut publisher, &mut sub, b"first").await;
    sub.send(Packet::PubRec(first_id)).await;
    assert_eq!(sub.recv().await, Some(Packet::PubRel(first_id)));
    let second_id = relay_qos2(&mut publisher, &mut sub, b"second").await;
    assert_ne!(first_id, second_id);
    // The broker dies: "first" awaits its PUBCOMP, "second" its PUBREC.
    broker.kill();

    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let (mut sub, present) = raw_session(broker.addr, "q2-out-sub").await;
    assert!(present);
    assert_eq!(sub.recv().await, Some(Packet::PubRel(first_id)));
    let Some(Packet::Publish(again)) = sub.recv().await else {
        panic!("second delivered again")
    };
    assert_eq!(again.packet_id, Some(second_id));
    assert!(again.dup);
    assert_eq!(again.payload, Bytes::from_static(b"second"));
    sub.send(Packet::PubComp(first_id)).await;
    sub.send(Packet::PubRec(second_id)).await;
    assert_eq!(sub.recv().await, Some(Packet::PubRel(second_id)));
    sub.send(Packet::PubComp(second_id)).await;
    sub.expect_silence(Duration::from_millis(500)).await;
    broker.kill();

    // Both are complete: nothing comes after another restart.
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let (mut sub, _) = raw_session(broker.addr, "q2-out-sub").await;
    sub.expect_silence(Duration::from_millis(500)).await;
    broker.kill();
}
