//! `fanin` and `fanout`: throughput from publishers to subscribers.
//!
//! fanin: P publishers, each on its own topic `<prefix>/fanin/<p>`, one subscriber on
//! `<prefix>/fanin/#`. fanout: one publisher on `<prefix>/fanout/t`, N subscribers on it.
//!
//! Publishers run as fast as the broker lets them, with two bounds so the run measures
//! sustained throughput rather than queue growth: at QoS 1, `--inflight` unacknowledged
//! PUBLISHes per publisher; at both QoS, `--window` messages in flight end to end (published
//! and not yet received by every subscriber). A message that never arrives is counted as lost;
//! after a stall the window stops waiting for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_protocol::{Packet, QoS, Topic};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Connection, PacketIds, Reader, Writer};
use crate::measure::{self, now_ns, read_stamp};
use crate::scenario::{ACK_WAIT, join_all};
use crate::{BenchError, Options, Results, Scenario, put};

/// Messages a publisher writes in one `write` at most.
const BATCH: u64 = 64;
/// A window that sees no delivery for this long stops waiting for what is outstanding.
const STALL: Duration = Duration::from_millis(200);

/// Counters shared by the publishers and subscribers of one run.
struct Flow {
    /// Messages published.
    sent: AtomicU64,
    /// Copies received, over all subscribers.
    delivered: AtomicU64,
    /// Copies the window gave up waiting for (they still count as lost at the end).
    written_off: AtomicU64,
    /// Subscribers that receive each message.
    copies: u64,
    /// Copies in flight at most.
    window: u64,
    progress: Notify,
    /// When the last copy arrived (bench clock, ns).
    last_delivery_ns: AtomicU64,
}

impl Flow {
    fn outstanding(&self) -> u64 {
        let expected = self.sent.load(Ordering::Acquire) * self.copies;
        expected.saturating_sub(
            self.delivered.load(Ordering::Acquire) + self.written_off.load(Ordering::Acquire),
        )
    }

    /// Waits until at least one message fits in the window; returns how many fit.
    async fn room(&self) -> u64 {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outstanding = self.outstanding();
            if outstanding + self.copies <= self.window {
                return (self.window - outstanding) / self.copies;
            }
            let before = self.delivered.load(Ordering::Acquire);
            if tokio::time::timeout(STALL, notified).await.is_err()
                && self.delivered.load(Ordering::Acquire) == before
            {
                self.written_off
                    .fetch_add(self.outstanding(), Ordering::AcqRel);
            }
        }
    }

    fn record(&self, copies: u64) {
        self.delivered.fetch_add(copies, Ordering::AcqRel);
        self.last_delivery_ns.store(now_ns(), Ordering::Release);
        self.progress.notify_waiters();
    }
}

/// What a subscriber saw.
#[derive(Default)]
struct Received {
    copies: u64,
    /// Copies whose sequence number was not above the last one from the same publisher.
    reordered: u64,
}

pub async fn run(options: &Options, addr: SocketAddr) -> Result<Results, BenchError> {
    let fanin = options.scenario == Scenario::Fanin;
    let (publishers, subscribers) = if fanin {
        (options.publishers.max(1), 1)
    } else {
        (1, options.subscribers.max(1))
    };
    let qos = if options.qos == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let credentials = options.credentials();
    let prefix = &options.topic_prefix;
    let (filter, topic_of): (String, Box<dyn Fn(usize) -> String>) = if fanin {
        let base = format!("{prefix}/fanin");
        (
            format!("{base}/#"),
            Box::new(move |p| format!("{base}/{p}")),
        )
    } else {
        let topic = format!("{prefix}/fanout/t");
        (topic.clone(), Box::new(move |_| topic.clone()))
    };
    let flow = Arc::new(Flow {
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        written_off: AtomicU64::new(0),
        copies: subscribers as u64,
        window: options.window.max(1) * subscribers as u64,
        progress: Notify::new(),
        last_delivery_ns: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();

    let mut subscriber_set = JoinSet::new();
    for i in 0..subscribers {
        let client_id = credentials.client_id(&format!("bench-sub-{i}"));
        let mut connection = client::connect(addr, &credentials, &client_id, true).await?;
        connection.subscribe(&filter, qos).await?;
        let (flow, stop) = (flow.clone(), stop.clone());
        subscriber_set.spawn(subscriber(connection, flow, stop, publishers));
    }
    let mut connections = Vec::with_capacity(publishers);
    for p in 0..publishers {
        let client_id = credentials.client_id(&format!("bench-pub-{p}"));
        connections.push(client::connect(addr, &credentials, &client_id, true).await?);
    }

    let start = Instant::now();
    let start_ns = now_ns();
    let deadline = start + options.load();
    let mut publisher_set = JoinSet::new();
    for (p, connection) in connections.into_iter().enumerate() {
        let job = PublishJob {
            index: p as u32,
            topic: client::topic(topic_of(p))?,
            qos,
            payload: options.payload,
            inflight: options.inflight,
            cap: options.messages,
            deadline,
        };
        publisher_set.spawn(publisher(connection, job, flow.clone()));
    }
    let sent_per_publisher = join_all(publisher_set).await?;
    let publish_s = start.elapsed().as_secs_f64();
    drain(&flow, options.drain_wait()).await;
    stop.cancel();
    let received = join_all(subscriber_set).await?;

    let sent: u64 = sent_per_publisher.iter().sum();
    let expected = sent * flow.copies;
    let delivered: u64 = received.iter().map(|r| r.copies).sum();
    let reordered: u64 = received.iter().map(|r| r.reordered).sum();
    let last_ns = flow
        .last_delivery_ns
        .load(Ordering::Acquire)
        .max(start_ns + 1);
    let delivery_s = (last_ns - start_ns) as f64 / 1e9;
    let mut results = Results::new();
    put(&mut results, "sent", sent as f64);
    put(&mut results, "expected", expected as f64);
    put(&mut results, "delivered", delivered as f64);
    put(
        &mut results,
        "lost",
        expected.saturating_sub(delivered) as f64,
    );
    put(
        &mut results,
        "extra",
        delivered.saturating_sub(expected) as f64,
    );
    put(&mut results, "reordered", reordered as f64);
    put(
        &mut results,
        "publish_per_s",
        sent as f64 / publish_s.max(1e-9),
    );
    put(
        &mut results,
        "delivered_per_s",
        delivered as f64 / delivery_s.max(1e-9),
    );
    put(&mut results, "load_s", delivery_s);
    Ok(results)
}

/// Waits until every copy arrived or nothing arrived for `quiet`.
async fn drain(flow: &Flow, quiet: Duration) {
    loop {
        let notified = flow.progress.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if flow.delivered.load(Ordering::Acquire) >= flow.sent.load(Ordering::Acquire) * flow.copies
        {
            return;
        }
        if tokio::time::timeout(quiet, notified).await.is_err() {
            return;
        }
    }
}

async fn subscriber(
    connection: Connection,
    flow: Arc<Flow>,
    stop: CancellationToken,
    publishers: usize,
) -> Result<Received, BenchError> {
    let Connection {
        mut reader,
        mut writer,
        ..
    } = connection;
    let mut last_seq: Vec<Option<u64>> = vec![None; publishers];
    let mut received = Received::default();
    loop {
        let mut batch = 0;
        while let Some(packet) = reader.try_next()? {
            let Packet::Publish(publish) = packet else {
                continue;
            };
            batch += 1;
            if let Some(id) = publish.packet_id {
                writer.queue(Packet::PubAck(id))?;
            }
            if let Some(stamp) = read_stamp(&publish.payload)
                && let Some(last) = last_seq.get_mut(stamp.publisher as usize)
            {
                if last.is_some_and(|l| stamp.seq <= l) {
                    received.reordered += 1;
                }
                *last = Some(stamp.seq);
            }
        }
        if batch > 0 {
            received.copies += batch;
            writer.flush().await?;
            flow.record(batch);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(received),
            read = reader.fill() => read?,
        }
    }
}

struct PublishJob {
    index: u32,
    topic: Topic,
    qos: QoS,
    payload: usize,
    inflight: usize,
    /// Messages at most (0: no cap).
    cap: u64,
    deadline: Instant,
}

/// Publishes until the deadline (or the cap); returns how many messages it sent. At QoS 1 it
/// returns once every PUBLISH is acknowledged.
async fn publisher(
    connection: Connection,
    job: PublishJob,
    flow: Arc<Flow>,
) -> Result<u64, BenchError> {
    let Connection {
        reader, mut writer, ..
    } = connection;
    let inflight = Arc::new(Semaphore::new(job.inflight));
    let stop_acks = CancellationToken::new();
    let acks = tokio::spawn(read_acks(reader, inflight.clone(), stop_acks.clone()));
    let mut ids = PacketIds::default();
    let mut seq = 0u64;
    while Instant::now() < job.deadline && (job.cap == 0 || seq < job.cap) {
        let mut batch = flow.room().await.min(BATCH);
        if job.cap > 0 {
            batch = batch.min(job.cap - seq);
        }
        if job.qos == QoS::AtLeastOnce {
            batch = match take_permits(&inflight, batch, job.deadline).await {
                Some(n) => n,
                None => break,
            };
        }
        queue_batch(&mut writer, &job, &mut ids, &mut seq, batch)?;
        flow.sent.fetch_add(batch, Ordering::AcqRel);
        writer.flush().await?;
    }
    if job.qos == QoS::AtLeastOnce {
        let all = u32::try_from(job.inflight).unwrap_or(u32::MAX);
        let acked = tokio::time::timeout(ACK_WAIT, inflight.acquire_many(all)).await;
        if !matches!(acked, Ok(Ok(_))) {
            eprintln!(
                "herald-bench: publisher {} still has unacknowledged QoS 1 messages",
                job.index
            );
        }
    }
    stop_acks.cancel();
    let _ = acks.await;
    Ok(seq)
}

/// Takes 1 to `want` inflight permits (waiting for the first until `deadline`).
async fn take_permits(inflight: &Semaphore, want: u64, deadline: Instant) -> Option<u64> {
    let first = tokio::time::timeout_at(deadline.into(), inflight.acquire()).await;
    first.ok()?.ok()?.forget();
    let mut got = 1;
    while got < want {
        match inflight.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => break,
        }
        got += 1;
    }
    Some(got)
}

fn queue_batch(
    writer: &mut Writer,
    job: &PublishJob,
    ids: &mut PacketIds,
    seq: &mut u64,
    batch: u64,
) -> Result<(), BenchError> {
    for _ in 0..batch {
        let payload = measure::stamped_payload(job.payload, *seq, job.index);
        let packet_id = (job.qos == QoS::AtLeastOnce).then(|| ids.next_id());
        writer.queue(client::publish(&job.topic, job.qos, packet_id, payload))?;
        *seq += 1;
    }
    Ok(())
}

/// Returns one inflight permit per PUBACK.
pub(crate) async fn read_acks(
    mut reader: Reader,
    inflight: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let mut acked = 0;
        loop {
            match reader.try_next() {
                Ok(Some(Packet::PubAck(_))) => acked += 1,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if acked > 0 {
            inflight.add_permits(acked);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            read = reader.fill() => if read.is_err() { return },
        }
    }
}
