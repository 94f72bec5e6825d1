//! `latency`: one publisher at a fixed rate (QoS 1), one subscriber (QoS 1) on the same topic;
//! end-to-end latency from the time stamp in each payload to its arrival. The publisher writes
//! what is due every millisecond and never waits for PUBACKs, so a slow broker shows up as
//! latency, not as a lower rate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_protocol::{Packet, QoS};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Connection, PacketIds, Reader};
use crate::measure::{Samples, now_ns, read_stamp, stamped_payload};
use crate::scenario::ms;
use crate::{BenchError, Options, Results, put};

/// The rate when `--rate` is 0.
const DEFAULT_RATE: f64 = 10_000.0;

pub async fn run(options: &Options, addr: SocketAddr) -> Result<Results, BenchError> {
    let rate = if options.rate > 0.0 {
        options.rate
    } else {
        DEFAULT_RATE
    };
    let credentials = options.credentials();
    let topic = client::topic(format!("{}/latency/t", options.topic_prefix))?;
    let sub_id = credentials.client_id("bench-lat-sub");
    let mut subscriber = client::connect(addr, &credentials, &sub_id, true).await?;
    subscriber
        .subscribe(topic.as_str(), QoS::AtLeastOnce)
        .await?;
    let pub_id = credentials.client_id("bench-lat-pub");
    let Connection {
        reader, mut writer, ..
    } = client::connect(addr, &credentials, &pub_id, true).await?;

    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let sub_task = tokio::spawn(receive(subscriber, received.clone(), stop.clone()));
    let acked = Arc::new(AtomicU64::new(0));
    let ack_task = tokio::spawn(count_acks(reader, acked.clone(), stop.clone()));

    let start = Instant::now();
    let load = options.load();
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut ids = PacketIds::default();
    let mut sent = 0u64;
    loop {
        ticks.tick().await;
        let elapsed = start.elapsed();
        let due = (elapsed.min(load).as_secs_f64() * rate) as u64;
        while sent < due {
            let payload = stamped_payload(options.payload, sent, 0);
            let id = Some(ids.next_id());
            writer.queue(client::publish(&topic, QoS::AtLeastOnce, id, payload))?;
            sent += 1;
        }
        writer.flush().await?;
        if elapsed >= load {
            break;
        }
    }
    let publish_s = start.elapsed().as_secs_f64();

    // Drain: everything arrived, or nothing for a while.
    let mut last = (0, Instant::now());
    while received.load(Ordering::Acquire) < sent && last.1.elapsed() < options.drain_wait() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = received.load(Ordering::Acquire);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    stop.cancel();
    let samples = sub_task
        .await
        .map_err(|e| BenchError::Failed(format!("subscriber task: {e}")))??;
    let _ = ack_task.await;
    let delivered = samples.len() as u64;
    let sorted = samples.sorted();
    let mut results = Results::new();
    put(&mut results, "sent", sent as f64);
    put(&mut results, "acked", acked.load(Ordering::Acquire) as f64);
    put(&mut results, "delivered", delivered as f64);
    put(&mut results, "lost", sent.saturating_sub(delivered) as f64);
    put(
        &mut results,
        "rate_per_s",
        sent as f64 / publish_s.max(1e-9),
    );
    for (key, p) in [
        ("p50_ms", 50.0),
        ("p90_ms", 90.0),
        ("p99_ms", 99.0),
        ("p999_ms", 99.9),
    ] {
        put(&mut results, key, ms(sorted.percentile(p)));
    }
    put(&mut results, "max_ms", ms(sorted.max()));
    Ok(results)
}

/// Records the latency of every message until stopped.
async fn receive(
    connection: Connection,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<Samples, BenchError> {
    let Connection {
        mut reader,
        mut writer,
        ..
    } = connection;
    let mut samples = Samples::with_capacity(1 << 16);
    loop {
        let mut batch = 0;
        while let Some(packet) = reader.try_next()? {
            let Packet::Publish(publish) = packet else {
                continue;
            };
            let now = now_ns();
            if let Some(stamp) = read_stamp(&publish.payload) {
                samples.push(now.saturating_sub(stamp.sent_ns));
            }
            if let Some(id) = publish.packet_id {
                writer.queue(Packet::PubAck(id))?;
            }
            batch += 1;
        }
        if batch > 0 {
            writer.flush().await?;
            received.fetch_add(batch, Ordering::AcqRel);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(samples),
            read = reader.fill() => read?,
        }
    }
}

async fn count_acks(mut reader: Reader, acked: Arc<AtomicU64>, stop: CancellationToken) {
    loop {
        while let Ok(Some(packet)) = reader.try_next() {
            if matches!(packet, Packet::PubAck(_)) {
                acked.fetch_add(1, Ordering::AcqRel);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            read = reader.fill() => if read.is_err() { return },
        }
    }
}
