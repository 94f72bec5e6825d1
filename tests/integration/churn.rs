//! Churn: thousands of connects and drops from many tasks at once. Afterwards the admin API's
//! online set equals the truth, and every event reached every sink exactly once by eventId, in
//! per-client order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_protocol::Packet;
use herald_testkit::{
    DEMO_USER, HttpCapture, OPS_KEY, RawClient, TestBroker, admin_get, signature,
};
use serde_json::Value;

const TASKS: usize = 20;
const CYCLES: usize = 100;

/// One task's client id, connected CYCLES times; the last connection stays open.
/// Returns the number of events its connections must produce.
async fn churn_one(addr: std::net::SocketAddr, id: String) -> (RawClient, usize) {
    let mut events = 0;
    for cycle in 0..CYCLES {
        let mut raw = RawClient::connect(addr).await;
        raw.send(RawClient::connect_packet(
            &id,
            Some(DEMO_USER),
            Some(&signature(&id)),
            true,
        ))
        .await;
        assert!(
            matches!(raw.recv().await, Some(Packet::ConnAck(_))),
            "{id} cycle {cycle}"
        );
        events += 1;
        if cycle == CYCLES - 1 {
            return (raw, events);
        }
        if cycle % 2 == 0 {
            raw.send(Packet::Disconnect).await;
            raw.expect_closed().await;
            events += 2;
        } else {
            drop(raw);
            events += 1;
        }
        // Both ends of each channel are seen before the next connect, so no takeovers.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    unreachable!("the loop returns on its last cycle")
}

fn unique_events(bodies: impl Iterator<Item = Vec<u8>>) -> (usize, HashMap<String, Vec<Value>>) {
    let mut ids = HashSet::new();
    let mut total = 0;
    let mut per_client: HashMap<String, Vec<Value>> = HashMap::new();
    for body in bodies {
        let e: Value = serde_json::from_slice(&body).expect("JSON");
        total += 1;
        assert!(
            ids.insert(e["eventId"].as_str().expect("eventId").to_string()),
            "duplicate {e}"
        );
        per_client
            .entry(e["clientId"].as_str().expect("clientId").to_string())
            .or_default()
            .push(e);
    }
    (total, per_client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_a_true_online_set_and_exactly_once_events() {
    let hook = HttpCapture::start(200).await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = dir.path().join("events.jsonl");
    let extra = format!(
        r#"{OPS_KEY}
[[sinks]]
id = "hook"
type = "webhook"
url = "{}"

[[sinks]]
id = "file"
type = "file"
path = "{}"

[[rules]]
id = "everything"
kind = "status_notice"
sinks = ["hook", "file"]
"#,
        hook.url("/events"),
        file.display()
    );
    let broker = TestBroker::demo(&extra).await;
    let ids: Vec<String> = (0..TASKS)
        .map(|t| format!("GID_demo@@@churn-{t}"))
        .collect();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| tokio::spawn(churn_one(broker.addr, id.clone())))
        .collect();
    let mut open = Vec::new();
    let mut expected = 0;
    for task in tasks {
        let (raw, events) = task.await.expect("task");
        open.push(raw);
        expected += events;
    }
    assert!(expected >= TASKS * CYCLES * 2);

    // Every sink gets every event, exactly once.
    let file_count = || {
        std::fs::read_to_string(&file)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let mut waited = 0;
    while hook.accepted().len() < expected || file_count() < expected {
        waited += 1;
        assert!(
            waited < 1200,
            "sinks did not catch up: hook {} file {} of {expected}",
            hook.accepted().len(),
            file_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (hook_total, hook_events) = unique_events(hook.accepted().into_iter().map(|r| r.body));
    let text = std::fs::read_to_string(&file).expect("file");
    let (file_total, file_events) = unique_events(text.lines().map(|l| l.as_bytes().to_vec()));
    assert_eq!(hook_total, expected);
    assert_eq!(file_total, expected);
    for per_client in [&hook_events, &file_events] {
        for (client, events) in per_client {
            let seqs: Vec<u64> = events
                .iter()
                .map(|e| e["seq"].as_u64().expect("seq"))
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[1] == w[0] + 1),
                "{client}: {seqs:?}"
            );
        }
    }

    // The admin API's online set is the truth: exactly the last connection of each task.
    let body = admin_get(
        &broker,
        "/api/v1/clients?group=GID_demo&online=true&limit=1000",
    )
    .await;
    let reply: Value = serde_json::from_str(&body).expect("JSON");
    let online: HashSet<String> = reply["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["clientId"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(online, ids.iter().cloned().collect::<HashSet<_>>());
    drop(open);
    broker.stop().await;
}
