//! Clients in other languages and tools: the README's tour with mosquitto_pub/mosquitto_sub,
//! and Python paho-mqtt. `.ci/run` installs both (Debian `mosquitto-clients`, PyPI `paho-mqtt`).

use std::path::Path;
use std::process::{Command, Output};

use herald_testkit::{TestBroker, signature};

const BIN: &str = env!("CARGO_BIN_EXE_herald");

fn sign(client_id: &str) -> String {
    let out = Command::new(BIN)
        .args(["sign", "--secret", "demo-secret", "--client-id", client_id])
        .output()
        .expect("run herald sign");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn mosquitto(tool: &str, port: u16, client_id: &str, password: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv311",
            "-q",
            "1",
        ])
        .args([
            "-i",
            client_id,
            "-u",
            "Signature|demo|herald-demo",
            "-P",
            password,
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} is needed for this test (apt-get install -y mosquitto-clients): {e}")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_works_with_mosquitto_clients() {
    let broker = TestBroker::demo("").await;
    let port = broker.addr.port();
    let backend = "GID_demo@@@backend";
    let device = "GID_demo@@@dev-1";
    let (sub_pw, pub_pw) = (sign(backend), sign(device));
    assert_eq!(sub_pw, signature(backend));
    let out = tokio::task::spawn_blocking(move || {
        // A persistent subscription, acknowledged, then offline: nothing races the publishes.
        let created = mosquitto(
            "mosquitto_sub",
            port,
            backend,
            &sub_pw,
            &["-c", "-t", "demo/#", "-E"],
        );
        assert!(created.status.success(), "{created:?}");
        let published = mosquitto(
            "mosquitto_pub",
            port,
            device,
            &pub_pw,
            &["-t", "demo/dev-1/temp", "-m", "21.5"],
        );
        assert!(published.status.success(), "{published:?}");
        let p2p = format!("demo/p2p/{backend}");
        let published = mosquitto(
            "mosquitto_pub",
            port,
            device,
            &pub_pw,
            &["-t", &p2p, "-m", "hello-backend"],
        );
        assert!(published.status.success(), "{published:?}");
        let refused = mosquitto(
            "mosquitto_pub",
            port,
            device,
            "wrong",
            &["-t", "demo/x", "-m", "x"],
        );
        assert!(!refused.status.success());
        mosquitto(
            "mosquitto_sub",
            port,
            backend,
            &sub_pw,
            &["-c", "-t", "demo/#", "-v", "-C", "2", "-W", "10"],
        )
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            "demo/dev-1/temp 21.5",
            "demo/p2p/GID_demo@@@backend hello-backend"
        ],
        "{out:?}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_paho_mqtt_interoperates() {
    let broker = TestBroker::open("").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/paho_check.py");
    let port = broker.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["127.0.0.1", &port])
            .output()
            .expect("python3 runs (python3 -m pip install paho-mqtt)")
    })
    .await
    .expect("join");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "paho check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    broker.stop().await;
}
