//! `offline`: QoS 1 into persistent sessions that are offline, then the drain on reconnect.
//!
//! N sessions (`cleanSession = false`) subscribe to `<prefix>/offline/t` and disconnect. P
//! publishers then publish `--messages` QoS 1 messages in all; every PUBACK means the broker
//! has queued a copy for each session (durably, on Herald, as `storage.sync` says). Then all
//! sessions reconnect at once and receive their queues: the drain rate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_protocol::{Packet, QoS, Topic};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Connection, Credentials, PacketIds};
use crate::measure::{read_stamp, stamped_payload};
use crate::scenario::{ACK_WAIT, join_all};
use crate::{BenchError, Options, Results, put};

/// Messages when `--messages` is 0.
const DEFAULT_MESSAGES: u64 = 5000;
/// Time the broker gets to see the sessions go offline before the load starts.
const SETTLE: Duration = Duration::from_millis(300);

pub async fn run(options: &Options, addr: SocketAddr) -> Result<Results, BenchError> {
    let credentials = options.credentials();
    let sessions = options.subscribers.max(1);
    let publishers = options.publishers.max(1);
    let messages = if options.messages > 0 {
        options.messages
    } else {
        DEFAULT_MESSAGES
    };
    let topic = client::topic(format!("{}/offline/t", options.topic_prefix))?;
    let session_ids: Vec<String> = (0..sessions)
        .map(|i| credentials.client_id(&format!("bench-off-{i}")))
        .collect();
    for id in &session_ids {
        // A clean connect first drops whatever an earlier run left in this session.
        client::connect(addr, &credentials, id, true)
            .await?
            .writer
            .disconnect()
            .await?;
        let mut c = client::connect(addr, &credentials, id, false).await?;
        c.subscribe(topic.as_str(), QoS::AtLeastOnce).await?;
        c.writer.disconnect().await?;
    }
    tokio::time::sleep(SETTLE).await;

    let mut set = JoinSet::new();
    let start = Instant::now();
    for p in 0..publishers {
        let share =
            messages / publishers as u64 + u64::from((p as u64) < messages % publishers as u64);
        let id = credentials.client_id(&format!("bench-offpub-{p}"));
        let connection = client::connect(addr, &credentials, &id, true).await?;
        let job = (
            topic.clone(),
            p as u32,
            share,
            options.payload,
            options.inflight,
        );
        set.spawn(publish(connection, job));
    }
    join_all(set).await?;
    let publish_s = start.elapsed().as_secs_f64().max(1e-9);

    let drain_start = Instant::now();
    let quiet = options.drain_wait();
    let mut set = JoinSet::new();
    for id in session_ids {
        let credentials: Credentials = credentials.clone();
        set.spawn(async move {
            let connection = client::connect(addr, &credentials, &id, false).await?;
            drain(connection, messages, publishers, quiet).await
        });
    }
    let drained = join_all(set).await?;
    let received: u64 = drained.iter().map(|d| d.received).sum();
    let reordered: u64 = drained.iter().map(|d| d.reordered).sum();
    let last = drained.iter().map(|d| d.last).max().unwrap_or(drain_start);
    let drain_s = (last - drain_start).as_secs_f64().max(1e-9);
    let expected = messages * sessions as u64;
    let mut results = Results::new();
    put(&mut results, "messages", messages as f64);
    put(&mut results, "sessions", sessions as f64);
    put(&mut results, "publish_s", publish_s);
    put(
        &mut results,
        "durable_msgs_per_s",
        messages as f64 / publish_s,
    );
    put(
        &mut results,
        "durable_copies_per_s",
        expected as f64 / publish_s,
    );
    put(&mut results, "expected", expected as f64);
    put(&mut results, "delivered", received as f64);
    put(
        &mut results,
        "lost",
        expected.saturating_sub(received) as f64,
    );
    put(&mut results, "reordered", reordered as f64);
    put(&mut results, "drain_s", drain_s);
    put(&mut results, "drain_per_s", received as f64 / drain_s);
    let without = drained.iter().filter(|d| !d.session_present).count();
    put(&mut results, "sessions_not_present", without as f64);
    Ok(results)
}

/// Publishes `count` QoS 1 messages with at most `inflight` unacknowledged; returns when all
/// are acknowledged.
async fn publish(
    connection: Connection,
    (topic, index, count, payload, inflight): (Topic, u32, u64, usize, usize),
) -> Result<(), BenchError> {
    let Connection {
        reader, mut writer, ..
    } = connection;
    let permits = Arc::new(Semaphore::new(inflight));
    let stop = CancellationToken::new();
    let acks = tokio::spawn(super::flow::read_acks(
        reader,
        permits.clone(),
        stop.clone(),
    ));
    let mut ids = PacketIds::default();
    let mut seq = 0;
    while seq < count {
        let first = permits
            .acquire()
            .await
            .map_err(|_| BenchError::Failed("semaphore closed".into()))?;
        first.forget();
        let mut batch = 1;
        while batch < 64 && seq + batch < count {
            match permits.try_acquire() {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
            batch += 1;
        }
        for _ in 0..batch {
            let body = stamped_payload(payload, seq, index);
            let packet = client::publish(&topic, QoS::AtLeastOnce, Some(ids.next_id()), body);
            writer.queue(packet)?;
            seq += 1;
        }
        writer.flush().await?;
    }
    let all = u32::try_from(inflight).unwrap_or(u32::MAX);
    let acked = tokio::time::timeout(ACK_WAIT, permits.acquire_many(all)).await;
    stop.cancel();
    let _ = acks.await;
    match acked {
        Ok(Ok(_)) => Ok(()),
        _ => Err(BenchError::Failed(format!(
            "offline publisher {index}: PUBACKs missing after {ACK_WAIT:?}"
        ))),
    }
}

struct Drained {
    received: u64,
    reordered: u64,
    last: Instant,
    session_present: bool,
}

/// Receives a reconnected session's queue: until `expected` messages or a quiet pause.
async fn drain(
    connection: Connection,
    expected: u64,
    publishers: usize,
    quiet: Duration,
) -> Result<Drained, BenchError> {
    let Connection {
        mut reader,
        mut writer,
        session_present,
    } = connection;
    let mut out = Drained {
        received: 0,
        reordered: 0,
        last: Instant::now(),
        session_present,
    };
    let mut last_seq: Vec<Option<u64>> = vec![None; publishers];
    while out.received < expected {
        let mut batch = 0;
        while let Some(packet) = reader.try_next()? {
            let Packet::Publish(publish) = packet else {
                continue;
            };
            if let Some(id) = publish.packet_id {
                writer.queue(Packet::PubAck(id))?;
            }
            if let Some(stamp) = read_stamp(&publish.payload)
                && let Some(last) = last_seq.get_mut(stamp.publisher as usize)
            {
                if last.is_some_and(|l| stamp.seq <= l) {
                    out.reordered += 1;
                }
                *last = Some(stamp.seq);
            }
            batch += 1;
        }
        if batch > 0 {
            out.received += batch;
            out.last = Instant::now();
            writer.flush().await?;
            continue;
        }
        match tokio::time::timeout(quiet, reader.fill()).await {
            Ok(read) => read?,
            Err(_) => break,
        }
    }
    let _ = writer.disconnect().await;
    Ok(out)
}
