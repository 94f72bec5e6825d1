//! Measurements: the bench clock and payload stamps, CPU time and resident memory from
//! `/proc`, and latency percentiles.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes at the start of every payload: send time (ns), sequence number, publisher index.
pub const STAMP_LEN: usize = 20;

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ, 100 on every Linux architecture
/// that matters here).
const TICKS_PER_SECOND: f64 = 100.0;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Starts the bench clock (idempotent).
pub fn clock_start() {
    EPOCH.get_or_init(Instant::now);
}

/// Nanoseconds since the bench clock started.
pub fn now_ns() -> u64 {
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What a payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sent_ns: u64,
    pub seq: u64,
    pub publisher: u32,
}

/// A payload of `len` bytes (at least [`STAMP_LEN`]) carrying the stamp, padded with `x`.
pub fn stamped_payload(len: usize, seq: u64, publisher: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(len.max(STAMP_LEN));
    buf.put_u64(now_ns());
    buf.put_u64(seq);
    buf.put_u32(publisher);
    buf.resize(len.max(STAMP_LEN), b'x');
    buf.freeze()
}

/// Reads the stamp of a payload built by [`stamped_payload`].
pub fn read_stamp(payload: &[u8]) -> Option<Stamp> {
    let field = |range: std::ops::Range<usize>| payload.get(range);
    let sent_ns = u64::from_be_bytes(field(0..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(field(8..16)?.try_into().ok()?);
    let publisher = u32::from_be_bytes(field(16..20)?.try_into().ok()?);
    Some(Stamp {
        sent_ns,
        seq,
        publisher,
    })
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// User + system CPU seconds of a process (all its threads); `None` is this process.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    parse_cpu_seconds(&stat)
}

/// Fields 14 and 15 of `/proc/PID/stat` (utime, stime), counted after the `)` that ends the
/// command name, which may itself hold spaces.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ")": state is field 3, so utime (14) is the 12th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(proc_path(Some(pid), "status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Percentiles of a set of samples.
#[derive(Debug, Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn with_capacity(n: usize) -> Samples {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, value: u64) {
        self.0.push(value);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorts once; returns a view that answers percentiles.
    pub fn sorted(mut self) -> Sorted {
        self.0.sort_unstable();
        Sorted(self.0)
    }
}

pub struct Sorted(Vec<u64>);

impl Sorted {
    /// The nearest-rank percentile `p` in 0..=100; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        // The epsilon keeps float noise (99.9% of 1000 = 999.0000001) off the next rank.
        let rank = (p / 100.0 * self.0.len() as f64 - 1e-9).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub fn max(&self) -> u64 {
        self.0.last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        clock_start();
        let payload = stamped_payload(64, 42, 3);
        assert_eq!(payload.len(), 64);
        let stamp = read_stamp(&payload).expect("stamp");
        assert_eq!((stamp.seq, stamp.publisher), (42, 3));
        assert!(stamp.sent_ns <= now_ns());
        assert_eq!(read_stamp(b"short"), None);
    }

    #[test]
    fn cpu_fields_are_found_after_the_command_name() {
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.0));
        assert!(cpu_seconds(None).is_some());
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut samples = Samples::default();
        for v in 1..=1000 {
            samples.push(v);
        }
        let sorted = samples.sorted();
        assert_eq!(sorted.percentile(50.0), 500);
        assert_eq!(sorted.percentile(99.0), 990);
        assert_eq!(sorted.percentile(99.9), 999);
        assert_eq!(sorted.percentile(100.0), 1000);
        assert_eq!(sorted.max(), 1000);
        assert_eq!(Samples::default().sorted().percentile(99.0), 0);
    }
}
