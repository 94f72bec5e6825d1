//! `conn`: open N idle connections at a target rate and keep them open. Measures the connect
//! rate, the latency from TCP connect to CONNACK, and the broker's resident memory per
//! connection (VmRSS after minus before, divided by the connections that succeeded).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, Connection};
use crate::measure::{Samples, rss_kib};
use crate::scenario::{join_all, ms};
use crate::{BenchError, Options, Results, put};

/// Time the broker gets after the last CONNACK before its memory is read (Herald parks a
/// connection after 100 ms without traffic, `limits.park_idle_ms`: all are parked by then).
const SETTLE: Duration = Duration::from_millis(1000);

struct Attempt {
    connection: Option<Connection>,
    latency_ns: u64,
    finished: Instant,
    error: Option<String>,
}

pub async fn run(options: &Options, addr: SocketAddr) -> Result<Results, BenchError> {
    let credentials = Arc::new(options.credentials());
    let rss_before = options.broker_pid.and_then(rss_kib);
    let limit = Arc::new(Semaphore::new(options.connect_concurrency.max(1)));
    let gap = (options.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / options.rate));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..options.connections {
        if let Some(gap) = gap {
            tokio::time::sleep_until((start + gap.mul_f64(i as f64)).into()).await;
        }
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BenchError::Failed("semaphore closed".into()))?;
        let credentials = credentials.clone();
        set.spawn(async move {
            let client_id = credentials.client_id(&format!("bench-conn-{i}"));
            let began = Instant::now();
            let result = client::connect(addr, &credentials, &client_id, true).await;
            let finished = Instant::now();
            drop(permit);
            let latency_ns = u64::try_from((finished - began).as_nanos()).unwrap_or(u64::MAX);
            Ok::<_, BenchError>(match result {
                Ok(connection) => Attempt {
                    connection: Some(connection),
                    latency_ns,
                    finished,
                    error: None,
                },
                Err(e) => Attempt {
                    connection: None,
                    latency_ns,
                    finished,
                    error: Some(e.to_string()),
                },
            })
        });
    }
    let attempts = join_all(set).await?;
    let last = attempts.iter().map(|a| a.finished).max().unwrap_or(start);
    let mut latencies = Samples::with_capacity(attempts.len());
    let mut connections = Vec::with_capacity(attempts.len());
    let mut failed = 0usize;
    for attempt in attempts {
        match attempt.connection {
            Some(c) => {
                latencies.push(attempt.latency_ns);
                connections.push(c);
            }
            None => {
                if failed == 0 {
                    eprintln!(
                        "herald-bench conn: first failure: {}",
                        attempt.error.unwrap_or_default()
                    );
                }
                failed += 1;
            }
        }
    }
    let connected = connections.len();
    tokio::time::sleep(SETTLE).await;
    let rss_after = options.broker_pid.and_then(rss_kib);
    let elapsed = (last - start).as_secs_f64().max(1e-9);
    let latencies = latencies.sorted();
    let mut results = Results::new();
    put(&mut results, "connected", connected as f64);
    put(&mut results, "failed", failed as f64);
    put(&mut results, "connect_s", elapsed);
    put(&mut results, "connect_per_s", connected as f64 / elapsed);
    put(
        &mut results,
        "connect_p50_ms",
        ms(latencies.percentile(50.0)),
    );
    put(
        &mut results,
        "connect_p99_ms",
        ms(latencies.percentile(99.0)),
    );
    put(&mut results, "connect_max_ms", ms(latencies.max()));
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        put(&mut results, "rss_before_kib", before as f64);
        put(&mut results, "rss_after_kib", after as f64);
        if connected > 0 {
            let per = (after as f64 - before as f64) / connected as f64;
            put(&mut results, "rss_per_conn_kib", per);
        }
    }
    if options.hold > 0.0 {
        eprintln!("herald-bench conn: holding {connected} connections");
        tokio::time::sleep(Duration::from_secs_f64(options.hold.min(3600.0))).await;
    }
    drop(connections);
    Ok(results)
}
