//! Test helpers: start Herald on 127.0.0.1:0 (in this process, or as a real process that can be
//! SIGKILLed), talk raw MQTT bytes, or use `rumqttc` clients with Signature credentials.

mod client;
mod http;
mod pki;
mod process;
mod raw;

pub use client::{TestClient, options, signed_options};
pub use http::{HttpCapture, Received};
pub use pki::TestPki;
pub use process::BrokerProcess;
pub use raw::RawClient;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use herald::Broker;
use herald::config::Config;
use tempfile::TempDir;

/// Node, listeners on port 0 (MQTT over TCP, admin API) and the `[instance]` header: what
/// every test config shares. `instance` goes inside `[instance]`, `rest` after it.
fn base_config(data_dir: &Path, instance: &str, rest: &str) -> String {
    format!(
        r#"
[node]
id = "test-node"
data_dir = "{dir}"

[listeners.tcp]
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[instance]
id = "herald-demo"
{instance}
{rest}
"#,
        dir = data_dir.display()
    )
}

/// The demo instance of the shipped config, with the data in `data_dir` and TCP on port 0.
/// `extra` is appended (it may add `[limits]`, `[storage]`, more keys, groups or topics).
pub fn demo_config(data_dir: &Path, extra: &str) -> String {
    let demo = r#"
[[access_keys]]
id = "demo"
secret = "demo-secret"
publish = ["demo/#"]
subscribe = ["demo/#"]

[[groups]]
id = "GID_demo"

[[topics]]
parent = "demo"
"#;
    base_config(data_dir, "", &format!("{demo}{extra}"))
}

/// An open broker for plain MQTT clients: anonymous, any client id, any topic.
pub fn open_config(data_dir: &Path, extra: &str) -> String {
    base_config(
        data_dir,
        "allow_anonymous = true\nclient_id_format = \"any\"",
        extra,
    )
}

/// The demo secret's Signature password for `client_id`.
pub fn signature(client_id: &str) -> String {
    herald_auth::sign("demo-secret", client_id)
}

/// The Signature user name of the demo key.
pub const DEMO_USER: &str = "Signature|demo|herald-demo";

/// A broker running in this process, with its own data directory.
pub struct TestBroker {
    pub addr: SocketAddr,
    broker: Option<Broker>,
    dir: TempDir,
    config_text: String,
}

impl TestBroker {
    /// Starts the demo config plus `extra`.
    pub async fn demo(extra: &str) -> TestBroker {
        let dir = TempDir::new().expect("temp dir");
        let text = demo_config(&dir.path().join("data"), extra);
        TestBroker::start_in(dir, text).await
    }

    /// Starts the open config plus `extra`.
    pub async fn open(extra: &str) -> TestBroker {
        let dir = TempDir::new().expect("temp dir");
        let text = open_config(&dir.path().join("data"), extra);
        TestBroker::start_in(dir, text).await
    }

    /// Starts the config `text` builds for a data directory (e.g. [`demo_config`] with a key
    /// of `[instance]` changed).
    pub async fn with_config(text: impl FnOnce(&Path) -> String) -> TestBroker {
        let dir = TempDir::new().expect("temp dir");
        let text = text(&dir.path().join("data"));
        TestBroker::start_in(dir, text).await
    }

    async fn start_in(dir: TempDir, config_text: String) -> TestBroker {
        // Logs show with RUST_LOG set (e.g. RUST_LOG=debug cargo test ... -- --nocapture).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let config = Config::parse(&config_text, &|_| None)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let broker = Broker::start(config).await.expect("broker starts");
        TestBroker {
            addr: broker.tcp_addr.expect("tcp listener"),
            broker: Some(broker),
            dir,
            config_text,
        }
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("running")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Shuts down cleanly and starts again on the same data (on a new port).
    pub async fn restart(mut self) -> TestBroker {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
        let TestBroker {
            dir, config_text, ..
        } = self;
        TestBroker::start_in(dir, config_text).await
    }

    pub async fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }
}

/// How many panics this process has seen since the first call (a hook counts them, then
/// prints them as before). A panic in a connection or router task does not fail a test by
/// itself: tests that hunt for them compare this before and after.
pub fn panics() -> usize {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            COUNT.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

/// An `[[access_keys]]` entry with `admin = true` (id `ops`, secret `ops-secret`), to append to
/// a test config that calls the admin API through [`admin_get`] or [`metric`].
pub const OPS_KEY: &str =
    "\n[[access_keys]]\nid = \"ops\"\nsecret = \"ops-secret\"\nadmin = true\n";

/// GET `path` on the broker's admin API with the [`OPS_KEY`] credentials; the body as text.
pub async fn admin_get(broker: &TestBroker, path: &str) -> String {
    let admin = broker.broker().admin_addr.expect("admin listener");
    reqwest::Client::new()
        .get(format!("http://{admin}{path}"))
        .basic_auth("ops", Some("ops-secret"))
        .send()
        .await
        .expect("admin API answers")
        .text()
        .await
        .expect("body")
}

/// The value of the first `/metrics` sample whose line starts with `prefix`.
pub async fn metric(broker: &TestBroker, prefix: &str) -> u64 {
    let text = admin_get(broker, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

/// Every line of a JSON-lines file (a `file` sink), parsed; empty while the file is missing.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}
