//! SIGKILL of the broker in the middle of QoS 1 traffic: no acknowledged message to a
//! persistent session is lost, and none is delivered twice without DUP.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_testkit::{BrokerProcess, TestClient, open_config, options};
use rumqttc::QoS;

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
