//! End to end in a real browser: MQTT.js, loaded from a local file in headless Chromium, talks
//! to Herald's WebSocket listener and exchanges a message with a device on plain TCP.
//!
//! Needs node, Debian's Chromium and the page's npm packages (`.ci/run` installs them):
//! `apt-get install -y chromium` and `npm ci --prefix tests/browser`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald_router::Transport as Kind;
use herald_testkit::{TestBroker, TestClient, signed_options};
use rumqttc::{Packet, QoS};
use serde_json::Value;

const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL: &str = "install them with `apt-get install -y chromium` (Debian's Chromium at /usr/bin/chromium, \
                       plus nodejs/npm if node is missing) and `npm ci --prefix tests/browser`, as .ci/run does";
/// How long the driver may wait for the page; the test allows more for Chromium's start.
const PAGE_TIMEOUT: Duration = Duration::from_secs(20);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser")
}

/// Fails (never skips) when a tool the test needs is missing, naming the install commands.
fn require_tools() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        matches!(&node, Ok(out) if out.status.success()),
        "the browser test needs node ({node:?}); {INSTALL}"
    );
    assert!(
        Path::new(CHROMIUM).exists(),
        "the browser test needs {CHROMIUM}; {INSTALL}"
    );
    let modules = browser_dir().join("node_modules");
    for file in ["mqtt/dist/mqtt.min.js", "playwright-core/package.json"] {
        assert!(
            modules.join(file).exists(),
            "the browser test needs tests/browser/node_modules/{file}; {INSTALL}"
        );
    }
}

fn ws_endpoint(broker: &TestBroker) -> SocketAddr {
    broker
        .broker()
        .endpoints
        .iter()
        .find(|(k, _)| *k == Kind::Ws)
        .map(|(_, a)| *a)
        .expect("a ws listener")
}

/// The child's stdout and stderr once it has exited, or after killing it at `deadline`.
fn finish(mut child: std::process::Child, deadline: Instant) -> (Option<i32>, String, String) {
    use std::io::Read;
    let status = loop {
        match child.try_wait().expect("poll the driver") {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status.and_then(|s| s.code()), out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_in_headless_chromium_exchanges_a_message_with_a_device() {
    require_tools();
    let started = Instant::now();
    let broker = TestBroker::demo("\n[listeners.ws]\nbind = \"127.0.0.1:0\"\n").await;
    let ws = ws_endpoint(&broker);

    // The device, on plain TCP, listens before the page starts.
    let mut device =
        TestClient::connected(signed_options(broker.addr, "GID_demo@@@device", true)).await;
    device.subscribe("demo/browser/out", QoS::AtLeastOnce).await;

    // Screenshots land in a fixed temporary directory, overwritten by each run, for a look by hand.
    let shots = std::env::temp_dir().join("herald-browser-test");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let screenshot = shots.join("mqtt_page.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = tempfile::TempDir::new().expect("profile dir");

    let page_id = "GID_demo@@@browser";
    let child = Command::new("node")
        .arg(browser_dir().join("run_page.mjs"))
        .args(["--port", &ws.port().to_string()])
        .args(["--client-id", page_id])
        .args(["--username", herald_testkit::DEMO_USER])
        .args(["--password", &herald_testkit::signature(page_id)])
        .args(["--screenshot", &screenshot.display().to_string()])
        .args(["--user-data-dir", &profile.path().display().to_string()])
        .args(["--timeout-ms", &PAGE_TIMEOUT.as_millis().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("node starts: {e}; {INSTALL}"));
    let deadline = Instant::now() + PAGE_TIMEOUT + Duration::from_secs(15);

    // Wait for the page's message, failing early if the driver gives up first.
    let mut child = Some(child);
    let from_page = loop {
        match device.next_incoming(Duration::from_millis(250)).await {
            Some(Ok(Packet::Publish(p))) => break p,
            Some(Ok(_)) | None => {}
            Some(Err(e)) => panic!("device connection failed: {e}"),
        }
        let running = child.as_mut().expect("driver").try_wait().expect("poll");
        if running.is_some() || Instant::now() >= deadline {
            let (code, out, err) = finish(child.take().expect("driver"), Instant::now());
            panic!("no message from the page (driver exit {code:?})\nstdout: {out}\nstderr: {err}");
        }
    };
    assert_eq!(from_page.topic, "demo/browser/out");
    assert_eq!(&from_page.payload[..], b"hello-from-browser");
    device
        .publish(
            "demo/browser/in",
            QoS::AtLeastOnce,
            false,
            b"hello-from-device",
        )
        .await;

    let child = child.take().expect("driver");
    let (code, out, err) = tokio::task::spawn_blocking(move || finish(child, deadline))
        .await
        .expect("join");
    let line = out.lines().last().unwrap_or_default();
    let result: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("driver printed no JSON line ({e}; exit {code:?})\nstdout: {out}\nstderr: {err}")
    });
    assert!(
        code == Some(0) && result["ok"] == true,
        "browser exchange failed (exit {code:?}): {result:#}\nstderr: {err}"
    );
    assert_eq!(result["received"]["topic"], "demo/browser/in", "{result:#}");
    assert_eq!(
        result["received"]["payload"], "hello-from-device",
        "{result:#}"
    );
    assert_eq!(
        result["sent"]["payload"], "hello-from-browser",
        "{result:#}"
    );
    assert_eq!(result["title"], "herald: ok", "{result:#}");

    let png = std::fs::read(&screenshot).expect("the driver wrote a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "{} is not a PNG",
        screenshot.display()
    );
    eprintln!(
        "browser exchange ok in {:?} (page {} ms); screenshot: {}",
        started.elapsed(),
        result["elapsedMs"],
        screenshot.display()
    );
    device.disconnect().await;
    broker.stop().await;
}
