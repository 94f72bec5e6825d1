//! The `herald` command line: sign, check-config, serve and its signals, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use herald_testkit::{BrokerProcess, TestClient, open_config, options};
use rumqttc::QoS;

const BIN: &str = env!("CARGO_BIN_EXE_herald");

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/herald.toml")
}

#[test]
fn sign_prints_the_signature_password() {
    let out = Command::new(BIN)
        .args([
            "sign",
            "--secret",
            "demo-secret",
            "--client-id",
            "GID_demo@@@dev-1",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "5vPUiwwywQkBwF4swW30o85MOqw="
    );
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(shipped_config())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_prints_every_error_with_its_path_and_exits_2() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[instance]\nclient_id_format = \"x\"\n[limits]\nmax_inflight = 0\n[storage]\nsync = \"no\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "instance.client_id_format",
        "limits.max_inflight",
        "storage.sync",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/herald.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["serve", "--bogus"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_refuses_a_corrupt_store_with_a_clear_error() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("herald.redb"), b"this is not a database").expect("write");
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, open_config(&data, "")).expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("herald.redb"), "{stderr}");
    // Nothing was reset.
    assert_eq!(
        std::fs::read(data.join("herald.redb")).expect("read"),
        b"this is not a database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_shut_down_cleanly_and_keep_state() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = open_config(&dir.path().join("data"), "");
    for signal in [15, 2] {
        let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
        let mut sub = TestClient::connected(options(broker.addr, "sig-sub", false)).await;
        sub.subscribe("sig", QoS::AtLeastOnce).await;
        let status = tokio::task::spawn_blocking(move || broker.signal_and_wait(signal))
            .await
            .expect("join");
        assert_eq!(status.code(), Some(0), "exit status after signal {signal}");
        sub.closed().await;
    }
    let broker = BrokerProcess::spawn(Path::new(BIN), dir.path(), &config);
    let (_sub, ack) = TestClient::connect(options(broker.addr, "sig-sub", false))
        .await
        .expect("connects");
    assert!(ack.session_present);
}

#[test]
fn serve_warns_loudly_about_the_demo_key() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let text = herald_testkit::demo_config(&dir.path().join("data"), "");
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, text).expect("write");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait for the listening line, then stop it and read the log.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    let _ = std::io::Read::read(&mut stdout, &mut first);
    let _ = Command::new("kill")
        .arg("-15")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("demo secret"), "{stderr}");
}
