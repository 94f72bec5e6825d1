//! Real sinks with outages: a local webhook receiver that is down for a while (and a broker
//! restart meanwhile), a Redis server that starts late, a file in a directory that appears
//! late. Every event arrives, in per-client order, deduplicable by eventId.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use herald_testkit::{
    HttpCapture, OPS_KEY, TestBroker, TestClient, json_lines, metric, signed_options,
};
use serde_json::Value;

/// Connects and disconnects each client twice: 3 events per cycle.
async fn churn(broker: &TestBroker, clients: &[String]) {
    for _ in 0..2 {
        for id in clients {
            let c = TestClient::connected(signed_options(broker.addr, id, true)).await;
            c.disconnect().await;
        }
    }
    // Let the broker take the last DISCONNECTs in before the test goes on (a shutdown racing
    // them would rightly report server_shutdown instead).
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn clients(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("GID_demo@@@{prefix}-{i}")).collect()
}

/// Deduplicates by eventId and checks, per client, seq strictly increasing and the event
/// sequence connect, disconnect, tcpclean repeated.
fn check_events(events: &[Value], clients: &[String], cycles: usize) {
    let mut seen: HashMap<String, &Value> = HashMap::new();
    let mut per_client: HashMap<String, Vec<&Value>> = HashMap::new();
    for e in events {
        let id = e["eventId"].as_str().expect("eventId").to_string();
        if let Some(first) = seen.get(&id) {
            assert_eq!(*first, e, "same eventId, different content");
            continue;
        }
        seen.insert(id, e);
        per_client
            .entry(e["clientId"].as_str().expect("clientId").to_string())
            .or_default()
            .push(e);
    }
    for id in clients {
        let mine = per_client
            .get(id)
            .unwrap_or_else(|| panic!("no events for {id}"));
        let kinds: Vec<&str> = mine
            .iter()
            .map(|e| e["eventType"].as_str().expect("type"))
            .collect();
        let expected: Vec<&str> = ["connect", "disconnect", "tcpclean"]
            .iter()
            .copied()
            .cycle()
            .take(3 * cycles)
            .collect();
        assert_eq!(kinds, expected, "{id}");
        let seqs: Vec<u64> = mine
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{id}: {seqs:?}");
    }
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_across_a_restart_gets_every_event_signed() {
    let hook = HttpCapture::start(503).await;
    let extra = format!(
        r#"
[[sinks]]
id = "hook"
type = "webhook"
url = "{}"
secret = "hook-secret"
timeout_ms = 2000

[[rules]]
id = "to-hook"
kind = "status_notice"
sinks = ["hook"]
"#,
        hook.url("/presence")
    );
    let broker = TestBroker::demo(&extra).await;
    let ids = clients("hooked", 3);
    churn(&broker, &ids).await;
    wait_for("the sink to try", async || hook.refused() > 0).await;
    let broker = broker.restart().await;
    hook.set_status(200);
    wait_for("every event", async || {
        let ids: std::collections::HashSet<String> = hook
            .accepted()
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .filter_map(|e| e["eventId"].as_str().map(str::to_string))
            .collect();
        ids.len() >= 18
    })
    .await;
    let received = hook.accepted();
    for r in &received {
        assert_eq!(
            r.header("x-herald-signature"),
            Some(herald_rules::signature("hook-secret", &r.body).as_str())
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let events: Vec<Value> = received
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("JSON"))
        .collect();
    check_events(&events, &ids, 2);
    broker.stop().await;
}

/// `XRANGE` replies: (entry id, [(field, value)]).
type StreamEntries = Vec<(String, Vec<(String, String)>)>;

/// A port for a redis-server started later in the test: free now and below Linux's ephemeral
/// range (32768 and up by default), so that the connections other tests open meanwhile cannot
/// take it before redis binds it (a port from `bind(:0)` is ephemeral, and one was taken).
fn free_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16);
    for i in 0..1000u32 {
        let port = 20_000 + (seed.wrapping_add(i.wrapping_mul(7_919)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000")
}

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(port: u16, dir: &std::path::Path) -> RedisServer {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is needed for this test (apt-get install -y redis-server)");
    RedisServer(child)
}

fn redis_sink_config(port: u16) -> String {
    format!(
        r#"
[[sinks]]
id = "stream"
type = "redis"
url = "redis://127.0.0.1:{port}"
stream = "herald:test"

[[rules]]
id = "to-redis"
kind = "status_notice"
source = {{ events = ["connect", "disconnect", "tcpclean"] }}
sinks = ["stream"]
"#
    )
}

/// Reads the stream `herald:test` until `enough` says its events (parsed, each entry's
/// `eventId` field checked against the event's) are enough; panics after about 40 s with what
/// the last look found and the redis-server's state and log.
async fn wait_for_stream(
    broker: &TestBroker,
    port: u16,
    redis_server: &mut RedisServer,
    dir: &std::path::Path,
    enough: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
    // What the last look found, for the message if the events never all arrive.
    let mut last_look = String::from("no look yet");
    // The sink retries with a backoff doubling up to 30 s: on a loaded machine the churn can
    // take long enough that the retry after redis starts is many seconds away.
    for _ in 0..800 {
        match client.get_multiplexed_async_connection().await {
            Err(e) => last_look = format!("cannot connect to redis: {e}"),
            Ok(mut conn) => {
                let entries: redis::RedisResult<StreamEntries> = redis::cmd("XRANGE")
                    .arg("herald:test")
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await;
                match entries {
                    Ok(entries) => {
                        let mut events = Vec::new();
                        for (_, fields) in entries {
                            let fields: HashMap<String, String> = fields.into_iter().collect();
                            let event: Value =
                                serde_json::from_str(&fields["event"]).expect("JSON");
                            assert_eq!(event["eventId"].as_str(), Some(fields["eventId"].as_str()));
                            events.push(event);
                        }
                        if enough(&events) {
                            return events;
                        }
                        let seen: Vec<String> = events
                            .iter()
                            .map(|e| {
                                format!("{} {} seq {}", e["clientId"], e["eventType"], e["seq"])
                            })
                            .collect();
                        last_look = format!("{} entries in the stream: {seen:?}", events.len());
                    }
                    Err(e) => last_look = format!("XRANGE failed: {e}"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics: Vec<String> = herald_testkit::admin_get(broker, "/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("herald_sink") || l.starts_with("herald_presence"))
        .map(str::to_string)
        .collect();
    panic!(
        "after 40 s: {last_look}; the broker's metrics: {metrics:?}; redis-server {:?}, its log: {}",
        redis_server.0.try_wait(),
        std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
    );
}

/// The events of the clients whose ids start with `prefix`.
fn events_of(events: &[Value], prefix: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| {
            e["clientId"]
                .as_str()
                .is_some_and(|id| id.starts_with(prefix))
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stream_that_starts_late_gets_every_event() {
    let port = free_port();
    let broker = TestBroker::demo(&format!("{OPS_KEY}{}", redis_sink_config(port))).await;
    let ids = clients("streamed", 2);
    churn(&broker, &ids).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let mut redis_server = start_redis(port, dir.path());
    let events = wait_for_stream(&broker, port, &mut redis_server, dir.path(), |e| {
        e.len() >= 12
    })
    .await;
    check_events(&events, &ids, 2);
    broker.stop().await;
}

/// Redis goes away between two deliveries (its stream with it: no persistence) and comes back
/// on the same port: the events of the outage arrive on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_restarts_gets_the_events_of_its_outage() {
    let port = free_port();
    let first_dir = tempfile::TempDir::new().expect("temp dir");
    let mut redis_server = start_redis(port, first_dir.path());
    let broker = TestBroker::demo(&format!("{OPS_KEY}{}", redis_sink_config(port))).await;
    let before = clients("before", 2);
    churn(&broker, &before).await;
    let events = wait_for_stream(&broker, port, &mut redis_server, first_dir.path(), |e| {
        events_of(e, "GID_demo@@@before").len() >= 12
    })
    .await;
    check_events(&events, &before, 2);
    drop(redis_server);
    const FAILURES: &str = "herald_sink_failures_total{sink=\"stream\"}";
    let failures = metric(&broker, FAILURES).await;
    let during = clients("during", 2);
    churn(&broker, &during).await;
    wait_for("the sink to notice redis was gone", async || {
        metric(&broker, FAILURES).await > failures
    })
    .await;
    let second_dir = tempfile::TempDir::new().expect("temp dir");
    let mut redis_server = start_redis(port, second_dir.path());
    let events = wait_for_stream(&broker, port, &mut redis_server, second_dir.path(), |e| {
        events_of(e, "GID_demo@@@during").len() >= 12
    })
    .await;
    check_events(&events_of(&events, "GID_demo@@@during"), &during, 2);
    broker.stop().await;
}

#[tokio::test]
async fn a_file_sink_whose_directory_appears_late_gets_every_event() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("later").join("events.jsonl");
    let extra = format!(
        "[[sinks]]\nid = \"file\"\ntype = \"file\"\npath = \"{}\"\n\n[[rules]]\nid = \"to-file\"\nkind = \"status_notice\"\nsinks = [\"file\"]\n",
        path.display()
    );
    let broker = TestBroker::demo(&extra).await;
    let ids = clients("filed", 2);
    churn(&broker, &ids).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::create_dir_all(dir.path().join("later")).expect("mkdir");
    let mut events = Vec::new();
    wait_for("the file", async || {
        events = json_lines(&path);
        events.len() >= 12
    })
    .await;
    check_events(&events, &ids, 2);
    broker.stop().await;
}

#[tokio::test]
async fn outflow_rules_copy_published_messages_to_sinks() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("telemetry.jsonl");
    let extra = format!(
        r#"
[[sinks]]
id = "telemetry-file"
type = "file"
path = "{}"

[[rules]]
id = "telemetry-out"
kind = "outflow"
source = {{ topics = ["demo/telemetry/#"] }}
sinks = ["telemetry-file"]
"#,
        path.display()
    );
    let broker = TestBroker::demo(&extra).await;
    let mut device =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@sensor", true)).await;
    device
        .publish(
            "demo/telemetry/temp",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"21.5",
        )
        .await;
    device
        .publish(
            "demo/other",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"not copied",
        )
        .await;
    let mut lines: Vec<Value> = Vec::new();
    wait_for("the outflow entry", async || {
        lines = json_lines(&path);
        !lines.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let m = &lines[0];
    assert_eq!(m["topic"], "demo/telemetry/temp");
    assert_eq!(m["clientId"], "GID_demo@@@sensor");
    assert_eq!(m["qos"], 1);
    assert_eq!(m["payload"], "MjEuNQ==");
    assert!(m["time"].as_u64().is_some());
    assert!(
        m["messageId"]
            .as_str()
            .is_some_and(|id| id.starts_with("test-node-"))
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_full_outbox_drops_its_oldest_entries_and_counts_them() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("later").join("events.jsonl");
    let extra = format!(
        r#"{OPS_KEY}
[[sinks]]
id = "small"
type = "file"
path = "{}"
outbox_max = 3

[[rules]]
id = "to-small"
kind = "status_notice"
sinks = ["small"]
"#,
        path.display()
    );
    let broker = TestBroker::demo(&extra).await;
    let ids = clients("squeezed", 1);
    churn(&broker, &ids).await; // 6 events, 3 fit
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::create_dir_all(dir.path().join("later")).expect("mkdir");
    let mut events: Vec<Value> = Vec::new();
    wait_for("the file", async || {
        events = json_lines(&path);
        events.len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seqs: Vec<u64> = json_lines(&path)
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![4, 5, 6], "the newest three are kept");
    assert_eq!(
        metric(&broker, "herald_sink_dropped_total{sink=\"small\"}").await,
        3
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_slows_neither_mqtt_nor_other_sinks() {
    // Accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hole = black_hole.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = black_hole.accept().await {
            held.push(stream);
        }
    });
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("events.jsonl");
    let extra = format!(
        r#"
[[sinks]]
id = "hanging"
type = "webhook"
url = "http://{hole}/never"
timeout_ms = 30000

[[sinks]]
id = "file"
type = "file"
path = "{}"

[[rules]]
id = "both"
kind = "status_notice"
sinks = ["hanging", "file"]
"#,
        path.display()
    );
    let broker = TestBroker::demo(&extra).await;
    let ids = clients("unhindered", 3);
    let started = std::time::Instant::now();
    churn(&broker, &ids).await;
    let mut sub = TestClient::connected(signed_options(broker.addr, "GID_demo@@@sub", true)).await;
    sub.subscribe("demo/t", rumqttc::QoS::AtLeastOnce).await;
    let mut publisher =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@pub", true)).await;
    for i in 0..20u8 {
        publisher
            .publish("demo/t", rumqttc::QoS::AtLeastOnce, false, &[i])
            .await;
        assert_eq!(&sub.next_publish().await.payload[..], &[i]);
    }
    wait_for("the file sink", async || json_lines(&path).len() >= 18).await;
    // Far less than the webhook's 30 s timeout: nothing waited for it.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    broker.stop().await;
}
