//! `presence` (Herald only): connect/close churn, with the presence notices read back from
//! `$notice/<group>/#` (a `status_notice` rule to an `mqtt` sink with events `connect` and
//! `tcpclean`). The subscriber's key must be allowed to read `$notice/...`.
//!
//! W clients each loop: connect, wait for CONNACK, close the socket (no DISCONNECT), paced so
//! that all together make `--rate` cycles per second (0: as fast as they can). Every cycle
//! must produce one `connect` and one `tcpclean` notice, each exactly once by `eventId`. A
//! client's events arrive in `seq` order, so its k-th `tcpclean` belongs to its k-th close:
//! the latency is from that close to the notice's arrival.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_protocol::{Packet, QoS};
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Connection, Credentials};
use crate::measure::Samples;
use crate::scenario::{join_all, ms};
use crate::{BenchError, Options, Results, put};

/// Device ids of the churning clients start with this.
const CHURN_DEVICE: &str = "bench-pres-";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notice {
    event_type: String,
    client_id: String,
    event_id: String,
}

/// One churning client's record.
struct Churn {
    client_id: String,
    connacks: Vec<Instant>,
    closes: Vec<Instant>,
    failures: u64,
}

/// Arrival times of one client's notices.
#[derive(Default)]
struct Arrivals {
    connect: Vec<Instant>,
    tcpclean: Vec<Instant>,
}

#[derive(Default)]
struct Notices {
    by_client: HashMap<String, Arrivals>,
    unique: u64,
    duplicates: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

pub async fn run(options: &Options, addr: SocketAddr) -> Result<Results, BenchError> {
    let credentials = options.credentials();
    let workers = options.connections.max(1);
    let filter = format!("$notice/{}/#", options.group);
    let notice_id = credentials.client_id("bench-notice");
    let mut listener =
        client::connect(addr, &options.notice_credentials(), &notice_id, true).await?;
    listener.subscribe(&filter, QoS::AtLeastOnce).await?;
    let unique = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let listen = tokio::spawn(listen(listener, unique.clone(), stop.clone()));

    let start = Instant::now();
    let deadline = start + options.load();
    let mut set = JoinSet::new();
    for w in 0..workers {
        let credentials = credentials.clone();
        let client_id = credentials.client_id(&format!("{CHURN_DEVICE}{w}"));
        let pace = (options.rate > 0.0).then(|| Pace {
            first: start + Duration::from_secs_f64(w as f64 / options.rate),
            every: Duration::from_secs_f64(workers as f64 / options.rate),
        });
        set.spawn(churn(addr, credentials, client_id, pace, deadline));
    }
    let churned = join_all(set).await?;
    let cycles: u64 = churned.iter().map(|c| c.closes.len() as u64).sum();
    let failures: u64 = churned.iter().map(|c| c.failures).sum();
    let churn_s = start.elapsed().as_secs_f64();

    // Wait for two notices per cycle, or a quiet pause.
    let mut last = (0, Instant::now());
    while unique.load(Ordering::Acquire) < 2 * cycles && last.1.elapsed() < options.drain_wait() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = unique.load(Ordering::Acquire);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    stop.cancel();
    let notices = listen
        .await
        .map_err(|e| BenchError::Failed(format!("notice listener: {e}")))??;
    Ok(tally(&churned, &notices, start, cycles, failures, churn_s))
}

fn tally(
    churned: &[Churn],
    notices: &Notices,
    start: Instant,
    cycles: u64,
    failures: u64,
    churn_s: f64,
) -> Results {
    let mut close_latency = Samples::with_capacity(cycles as usize);
    let mut connect_latency = Samples::with_capacity(cycles as usize);
    let (mut missing_connect, mut missing_tcpclean, mut extra, mut counted) =
        (0u64, 0u64, 0u64, 0u64);
    let empty = Arrivals::default();
    for churn in churned {
        let arrivals = notices.by_client.get(&churn.client_id).unwrap_or(&empty);
        let n = churn.closes.len();
        counted += (arrivals.connect.len() + arrivals.tcpclean.len()) as u64;
        missing_connect += n.saturating_sub(arrivals.connect.len()) as u64;
        missing_tcpclean += n.saturating_sub(arrivals.tcpclean.len()) as u64;
        extra += (arrivals.connect.len().saturating_sub(n)
            + arrivals.tcpclean.len().saturating_sub(n)) as u64;
        for (closed, seen) in churn.closes.iter().zip(&arrivals.tcpclean) {
            close_latency.push(nanos(seen.saturating_duration_since(*closed)));
        }
        for (acked, seen) in churn.connacks.iter().zip(&arrivals.connect) {
            connect_latency.push(nanos(seen.saturating_duration_since(*acked)));
        }
    }
    let events_s = notices
        .last
        .map_or(0.0, |last| (last - start).as_secs_f64())
        .max(1e-9);
    let close_latency = close_latency.sorted();
    let connect_latency = connect_latency.sorted();
    let mut results = Results::new();
    put(&mut results, "cycles", cycles as f64);
    put(
        &mut results,
        "cycles_per_s",
        cycles as f64 / churn_s.max(1e-9),
    );
    put(&mut results, "connect_failures", failures as f64);
    put(&mut results, "expected_events", (2 * cycles) as f64);
    put(&mut results, "events", counted as f64);
    put(&mut results, "unique_events", notices.unique as f64);
    put(&mut results, "duplicates", notices.duplicates as f64);
    put(&mut results, "missing_connect", missing_connect as f64);
    put(&mut results, "missing_tcpclean", missing_tcpclean as f64);
    put(&mut results, "unexpected_events", extra as f64);
    put(&mut results, "events_per_s", counted as f64 / events_s);
    put(
        &mut results,
        "tcpclean_p50_ms",
        ms(close_latency.percentile(50.0)),
    );
    put(
        &mut results,
        "tcpclean_p99_ms",
        ms(close_latency.percentile(99.0)),
    );
    put(&mut results, "tcpclean_max_ms", ms(close_latency.max()));
    put(
        &mut results,
        "connect_p50_ms",
        ms(connect_latency.percentile(50.0)),
    );
    put(
        &mut results,
        "connect_p99_ms",
        ms(connect_latency.percentile(99.0)),
    );
    results
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

struct Pace {
    first: Instant,
    every: Duration,
}

async fn churn(
    addr: SocketAddr,
    credentials: Credentials,
    client_id: String,
    pace: Option<Pace>,
    deadline: Instant,
) -> Result<Churn, BenchError> {
    let mut out = Churn {
        client_id,
        connacks: Vec::new(),
        closes: Vec::new(),
        failures: 0,
    };
    let mut k = 0u32;
    loop {
        if let Some(pace) = &pace {
            tokio::time::sleep_until((pace.first + pace.every * k).into()).await;
        }
        k += 1;
        if Instant::now() >= deadline {
            return Ok(out);
        }
        match client::connect(addr, &credentials, &out.client_id, true).await {
            Ok(connection) => {
                out.connacks.push(Instant::now());
                out.closes.push(Instant::now());
                drop(connection);
            }
            Err(e) => {
                if out.failures == 0 {
                    eprintln!("herald-bench presence: {}: {e}", out.client_id);
                }
                out.failures += 1;
                if out.failures > 100 {
                    return Err(BenchError::Failed(format!(
                        "presence: connects keep failing: {e}"
                    )));
                }
            }
        }
    }
}

/// Reads notices until stopped, acknowledging each.
async fn listen(
    connection: Connection,
    unique: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<Notices, BenchError> {
    let Connection {
        mut reader,
        mut writer,
        ..
    } = connection;
    let mut notices = Notices::default();
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        let mut acks = 0;
        while let Some(packet) = reader.try_next()? {
            let Packet::Publish(publish) = packet else {
                continue;
            };
            let now = Instant::now();
            if let Some(id) = publish.packet_id {
                writer.queue(Packet::PubAck(id))?;
                acks += 1;
            }
            let Ok(notice) = serde_json::from_slice::<Notice>(&publish.payload) else {
                continue;
            };
            // Only the churning clients' events count (not the listener's own connect).
            if !notice.client_id.contains(CHURN_DEVICE) {
                continue;
            }
            if !seen.insert(notice.event_id) {
                notices.duplicates += 1;
                continue;
            }
            notices.unique += 1;
            unique.fetch_add(1, Ordering::AcqRel);
            notices.first.get_or_insert(now);
            notices.last = Some(now);
            let arrivals = notices.by_client.entry(notice.client_id).or_default();
            match notice.event_type.as_str() {
                "connect" => arrivals.connect.push(now),
                "tcpclean" => arrivals.tcpclean.push(now),
                _ => {}
            }
        }
        if acks > 0 {
            writer.flush().await?;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(notices),
            read = reader.fill() => read?,
        }
    }
}
