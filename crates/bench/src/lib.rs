//! `herald-bench`: a load generator for MQTT 3.1.1 brokers, Herald and Mosquitto alike.
//!
//! It owns the scenarios (connections, fan-in, fan-out, latency, offline queues, presence
//! churn), a lean client on Herald's own codec, and the measurements: rates, latency
//! percentiles, losses, and the CPU time of the bench and of the broker (from `/proc`). It does
//! not start brokers: `scripts/bench-vs-mosquitto.sh` does, and the smoke test uses the
//! testkit. [`run`] returns one [`Summary`], printed by the binary as one JSON line.

pub mod client;
pub mod measure;
pub mod report;
mod scenario;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{ClientError, Credentials};

/// Which workload to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N idle connections opened at a target rate: connect rate, latency, memory per connection.
    Conn,
    /// P publishers to distinct topics, one wildcard subscriber.
    Fanin,
    /// One publisher, N subscribers on one topic.
    Fanout,
    /// A fixed publish rate: end-to-end latency percentiles.
    Latency,
    /// QoS 1 into offline persistent sessions, then the drain on reconnect.
    Offline,
    /// Connect/close churn with the presence notices read from `$notice/<group>/#`.
    Presence,
}

/// How clients log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsernameMode {
    /// `Signature|<AccessKey>|<Instance>`, password HMAC-SHA1 of the client id (DESIGN.md 3.1).
    Signature,
    /// No user name or password (an anonymous broker).
    None,
}

/// Everything a run needs. `Options::default()` is the command line with no arguments.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Benchmark an MQTT broker; prints one JSON summary line"
)]
pub struct Options {
    /// Broker host (loopback only is intended).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    #[arg(long, value_enum, default_value_t = UsernameMode::Signature)]
    pub username_mode: UsernameMode,
    #[arg(long, default_value = "demo")]
    pub access_key: String,
    #[arg(long, default_value = "demo-secret")]
    pub secret: String,
    #[arg(long, default_value = "herald-demo")]
    pub instance: String,
    /// Group ID: client ids are `<group>@@@bench-...`.
    #[arg(long, default_value = "GID_demo")]
    pub group: String,
    /// Access key for the presence subscriber (needs `$notice/...`); default: --access-key.
    #[arg(long)]
    pub notice_access_key: Option<String>,
    /// Secret of --notice-access-key; default: --secret.
    #[arg(long)]
    pub notice_secret: Option<String>,
    #[arg(long, value_enum, default_value_t = Scenario::Conn)]
    pub scenario: Scenario,
    /// First topic level of every bench topic (a declared parent topic on Herald).
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
    /// conn: idle connections to open; presence: clients churning at once.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// conn: connects per second (0: as fast as possible); latency: messages per second;
    /// presence: connect/close cycles per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// fanin: publishers (one topic each); offline: publishers.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// fanout: subscribers; offline: persistent sessions.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// QoS of publishers and subscribers (fanin, fanout); latency and offline always use 1.
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    /// Payload bytes (at least 20: time stamp, sequence, publisher).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Seconds of load (fanin, fanout, latency, presence).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// offline: messages published (each into every session); fanin/fanout: a cap per
    /// publisher (0: none).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// fanin/fanout: messages in flight end to end (published, not yet received by all).
    /// The default stays under Herald's per-connection outbox (1,024 packets), so QoS 0
    /// measures lossless throughput rather than drops.
    #[arg(long, default_value_t = 1000)]
    pub window: u64,
    /// QoS 1 PUBLISHes a publisher may have unacknowledged.
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Seconds the end of a run waits without any arrival before it counts what is missing
    /// as lost.
    #[arg(long, default_value_t = 2.0)]
    pub drain_wait: f64,
    /// conn: seconds the connections stay open after memory is measured (time to inspect
    /// the broker: a heap profile, `ss`, /proc).
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// conn: handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Hard cap on the whole run, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub max_duration: f64,
    /// The broker's pid: its CPU time and memory are read from /proc/PID.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// A label copied into the summary (e.g. "herald", "mosquitto").
    #[arg(long, default_value = "")]
    pub label: String,
    /// A case name copied into the summary (e.g. "fanin-q1").
    #[arg(long, default_value = "")]
    pub case: String,
    /// Worker threads of the bench's runtime (binary only).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options::parse_from(["herald-bench"])
    }
}

impl Options {
    pub(crate) fn addr(&self) -> Result<SocketAddr, BenchError> {
        let text = format!("{}:{}", self.host, self.port);
        text.parse()
            .map_err(|_| BenchError::Options(format!("bad broker address {text:?}")))
    }

    pub(crate) fn credentials(&self) -> Credentials {
        Credentials {
            mode: self.username_mode,
            access_key: self.access_key.clone(),
            secret: self.secret.clone(),
            instance: self.instance.clone(),
            group: self.group.clone(),
        }
    }

    pub(crate) fn notice_credentials(&self) -> Credentials {
        Credentials {
            access_key: self
                .notice_access_key
                .clone()
                .unwrap_or_else(|| self.access_key.clone()),
            secret: self
                .notice_secret
                .clone()
                .unwrap_or_else(|| self.secret.clone()),
            ..self.credentials()
        }
    }

    pub(crate) fn drain_wait(&self) -> Duration {
        Duration::from_secs_f64(self.drain_wait.clamp(0.1, 60.0))
    }

    pub(crate) fn load(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.05))
    }

    fn validate(&self) -> Result<(), BenchError> {
        let bad = |why: &str| Err(BenchError::Options(why.to_string()));
        if self.qos > 1 {
            return bad("--qos must be 0 or 1");
        }
        if self.payload < measure::STAMP_LEN {
            return bad("--payload must be at least 20 bytes");
        }
        if self.max_duration <= 0.0 || self.duration < 0.0 || self.rate < 0.0 {
            return bad("--duration, --rate and --max-duration must be positive");
        }
        if self.inflight == 0 || self.inflight > 60_000 || self.window == 0 {
            return bad("--inflight must be 1..=60000 and --window at least 1");
        }
        Ok(())
    }

    /// The parameters that shaped the run, as they appear in the summary (no secrets).
    fn params(&self) -> BTreeMap<String, Value> {
        let mut p = BTreeMap::new();
        let mut put = |k: &str, v: Value| {
            p.insert(k.to_string(), v);
        };
        put(
            "username_mode",
            serde_json::to_value(self.username_mode).unwrap_or(Value::Null),
        );
        put("drain_wait", self.drain_wait.into());
        match self.scenario {
            Scenario::Conn => {
                put("connections", self.connections.into());
                put("rate", self.rate.into());
                put("connect_concurrency", self.connect_concurrency.into());
            }
            Scenario::Fanin | Scenario::Fanout => {
                if self.scenario == Scenario::Fanin {
                    put("publishers", self.publishers.into());
                } else {
                    put("subscribers", self.subscribers.into());
                }
                put("qos", self.qos.into());
                put("payload", self.payload.into());
                put("duration", self.duration.into());
                put("window", self.window.into());
                put("inflight", self.inflight.into());
                put("messages", self.messages.into());
            }
            Scenario::Latency => {
                put("rate", self.rate.into());
                put("qos", 1.into());
                put("payload", self.payload.into());
                put("duration", self.duration.into());
            }
            Scenario::Offline => {
                put("publishers", self.publishers.into());
                put("subscribers", self.subscribers.into());
                put("messages", self.messages.into());
                put("payload", self.payload.into());
                put("inflight", self.inflight.into());
            }
            Scenario::Presence => {
                put("connections", self.connections.into());
                put("rate", self.rate.into());
                put("duration", self.duration.into());
            }
        }
        p
    }
}

/// What a run reports: one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: Scenario,
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub case: String,
    pub target: String,
    pub params: BTreeMap<String, Value>,
    /// Named measurements; rates are per second, latencies in milliseconds, memory in KiB.
    pub results: BTreeMap<String, f64>,
    /// User + system CPU seconds of the bench process during the run.
    pub bench_cpu_s: f64,
    /// User + system CPU seconds of the broker (`--broker-pid`) during the run.
    pub broker_cpu_s: Option<f64>,
    pub wall_s: f64,
}

impl Summary {
    /// A result by name.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.results.get(key).copied()
    }

    /// The summary as one JSON line.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad options: {0}")]
    Options(String),
    #[error("client: {0}")]
    Client(#[from] ClientError),
    #[error("the run exceeded --max-duration ({0:.1} s)")]
    TimedOut(f64),
    #[error("{0}")]
    Failed(String),
}

/// Results being filled in by a scenario.
pub(crate) type Results = BTreeMap<String, f64>;

pub(crate) fn put(results: &mut Results, key: &str, value: f64) {
    results.insert(key.to_string(), value);
}

/// Runs one scenario against the broker in `options` and measures it.
pub async fn run(options: &Options) -> Result<Summary, BenchError> {
    options.validate()?;
    let addr = options.addr()?;
    measure::clock_start();
    let bench_cpu = measure::cpu_seconds(None);
    let broker_cpu = options
        .broker_pid
        .and_then(|pid| measure::cpu_seconds(Some(pid)));
    let started = Instant::now();
    let cap = Duration::from_secs_f64(options.max_duration);
    let work = async {
        match options.scenario {
            Scenario::Conn => scenario::conn::run(options, addr).await,
            Scenario::Fanin | Scenario::Fanout => scenario::flow::run(options, addr).await,
            Scenario::Latency => scenario::latency::run(options, addr).await,
            Scenario::Offline => scenario::offline::run(options, addr).await,
            Scenario::Presence => scenario::presence::run(options, addr).await,
        }
    };
    let results = tokio::time::timeout(cap, work)
        .await
        .map_err(|_| BenchError::TimedOut(options.max_duration))??;
    let bench_cpu_s = measure::cpu_seconds(None).unwrap_or(0.0) - bench_cpu.unwrap_or(0.0);
    let broker_cpu_s = match (broker_cpu, options.broker_pid) {
        (Some(before), Some(pid)) => measure::cpu_seconds(Some(pid)).map(|after| after - before),
        _ => None,
    };
    Ok(Summary {
        scenario: options.scenario,
        label: options.label.clone(),
        case: options.case.clone(),
        target: addr.to_string(),
        params: options.params(),
        results,
        bench_cpu_s,
        broker_cpu_s,
        wall_s: started.elapsed().as_secs_f64(),
    })
}
