//! `herald-bench` runs each of its scenarios for about a second against an in-process Herald,
//! so the tool keeps working. The assertions are about sanity (something was delivered, no
//! QoS 1 message or presence event lost), never about speed.

use herald_bench::{Options, Scenario, Summary, UsernameMode, run};
use herald_testkit::TestBroker;

/// A key that may also read the presence notices, and the rule that publishes them.
const EXTRA: &str = r#"
[[access_keys]]
id = "bench"
secret = "bench-secret"
publish = ["demo/#"]
subscribe = ["demo/#", "$notice/#"]

[[sinks]]
id = "notices"
type = "mqtt"
topic = "$notice/{groupId}/{clientId}/{eventType}"
qos = 1

[[rules]]
id = "status-to-notices"
kind = "status_notice"
source = { groups = ["GID_demo"], events = ["connect", "tcpclean"] }
sinks = ["notices"]
"#;

fn options(broker: &TestBroker, scenario: Scenario) -> Options {
    Options {
        port: broker.addr.port(),
        username_mode: UsernameMode::Signature,
        access_key: "bench".into(),
        secret: "bench-secret".into(),
        instance: "herald-demo".into(),
        group: "GID_demo".into(),
        topic_prefix: "demo/bench".into(),
        scenario,
        duration: 1.0,
        max_duration: 30.0,
        ..Options::default()
    }
}

async fn run_ok(options: Options) -> Summary {
    let summary = run(&options)
        .await
        .unwrap_or_else(|e| panic!("{:?} failed: {e}", options.scenario));
    println!("{}", summary.to_json_line());
    summary
}

fn result(summary: &Summary, key: &str) -> f64 {
    summary
        .get(key)
        .unwrap_or_else(|| panic!("{:?} has no {key}", summary.scenario))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_herald() {
    let broker = TestBroker::demo(EXTRA).await;

    let conn = run_ok(Options {
        connections: 50,
        ..options(&broker, Scenario::Conn)
    })
    .await;
    assert_eq!(result(&conn, "connected"), 50.0);
    assert_eq!(result(&conn, "failed"), 0.0);
    assert!(result(&conn, "connect_per_s") > 0.0);
    assert!(conn.bench_cpu_s >= 0.0);

    for qos in [0, 1] {
        let fanin = run_ok(Options {
            publishers: 2,
            qos,
            ..options(&broker, Scenario::Fanin)
        })
        .await;
        assert!(result(&fanin, "delivered") > 0.0);
        assert!(result(&fanin, "delivered_per_s") > 0.0);
        if qos == 1 {
            assert_eq!(result(&fanin, "lost"), 0.0, "QoS 1 fan-in lost messages");
        }
    }

    let fanout = run_ok(Options {
        subscribers: 5,
        ..options(&broker, Scenario::Fanout)
    })
    .await;
    assert!(result(&fanout, "delivered") > 0.0);

    let latency = run_ok(Options {
        rate: 1000.0,
        ..options(&broker, Scenario::Latency)
    })
    .await;
    assert!(result(&latency, "delivered") > 0.0);
    assert_eq!(result(&latency, "lost"), 0.0);
    assert!(result(&latency, "p50_ms") <= result(&latency, "p99_ms"));
    assert!(result(&latency, "p99_ms") <= result(&latency, "max_ms"));

    let offline = run_ok(Options {
        publishers: 2,
        subscribers: 3,
        messages: 200,
        ..options(&broker, Scenario::Offline)
    })
    .await;
    assert_eq!(result(&offline, "delivered"), 600.0);
    assert_eq!(result(&offline, "lost"), 0.0);
    assert_eq!(result(&offline, "sessions_not_present"), 0.0);

    let presence = run_ok(Options {
        connections: 5,
        rate: 100.0,
        ..options(&broker, Scenario::Presence)
    })
    .await;
    assert!(result(&presence, "cycles") > 0.0);
    assert_eq!(
        result(&presence, "unique_events"),
        result(&presence, "expected_events")
    );
    assert_eq!(result(&presence, "missing_connect"), 0.0);
    assert_eq!(result(&presence, "missing_tcpclean"), 0.0);

    broker.stop().await;
}
