//! Open files at start: the process's limit and the kernel's table of descriptors.
//!
//! Every connection is a file descriptor. Two things about them are settled once, before the
//! runtime starts its threads:
//!
//! - The soft `RLIMIT_NOFILE` (often 1024, a leftover of `select`) is raised to the hard limit,
//!   as Go programs such as nats-server do at start, so that `limits.max_connections` and not an
//!   inherited default decides how many clients are served. If even the hard limit is too low,
//!   a warning says so and what it means.
//! - The kernel's descriptor table is grown at once to hold every connection. It otherwise
//!   doubles as descriptors are opened (at 256, 512, ... 8192, 16384), and in a process with
//!   more than one thread each doubling waits for an RCU grace period: the thread calling
//!   `accept` stopped for 8 to 18 ms at each of them, about a seventh of a 10,000-client
//!   reconnect storm on the test machine (docs/benchmarks.md). The table costs 8 bytes of kernel
//!   memory per slot, none of it in the broker's resident memory.

use std::os::fd::AsFd;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors beyond the connections: listeners, the store's files, sink and admin sockets.
pub const RESERVED: u64 = 256;

/// The table is not grown past this many slots (the kernel's default `fs.nr_open`).
const TABLE_CAP: u64 = 1 << 20;

/// What [`prepare`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit found at start (`None`: unlimited).
    pub found: Option<u64>,
    /// The soft limit now.
    pub limit: Option<u64>,
    /// The raising of the soft limit failed with this error.
    pub raise_error: Option<String>,
    /// Descriptors the table holds without growing (0: it could not be grown).
    pub table: u64,
    /// Descriptors the connections allowed by `limits.max_connections` need, with [`RESERVED`].
    pub wanted: u64,
}

impl OpenFiles {
    /// True when the limit is below what `limits.max_connections` needs.
    pub fn short(&self) -> bool {
        self.limit.is_some_and(|limit| limit < self.wanted)
    }
}

/// Raises the soft open-files limit to the hard one and grows the descriptor table to hold
/// `max_connections` connections (within the limit). Call it before the runtime starts: the
/// one grace period it may wait for (the allocator's background thread already runs) is at
/// start, not in the middle of a reconnect storm.
pub fn prepare(max_connections: u64) -> OpenFiles {
    let wanted = max_connections.saturating_add(RESERVED);
    let before = getrlimit(Resource::Nofile);
    let mut raise_error = None;
    if before.current.is_some() && before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            raise_error = Some(e.to_string());
        }
    }
    let limit = getrlimit(Resource::Nofile).current;
    let target = limit
        .map_or(wanted, |limit| limit.min(wanted))
        .min(TABLE_CAP);
    OpenFiles {
        found: before.current,
        limit,
        raise_error,
        table: grow_table(target),
        wanted,
    }
}

/// Makes the descriptor table hold at least `slots` descriptors by duplicating a descriptor
/// of `/dev/null` to descriptor `slots - 1` (or the first free one above it) and closing both.
/// Returns `slots`, or 0 if that failed.
fn grow_table(slots: u64) -> u64 {
    let Some(last) = slots.checked_sub(1).and_then(|n| i32::try_from(n).ok()) else {
        return 0;
    };
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return 0;
    };
    match rustix::io::fcntl_dupfd_cloexec(null.as_fd(), last) {
        Ok(copy) => {
            drop(copy);
            slots
        }
        Err(_) => 0,
    }
}

/// One log line for what [`prepare`] found and did, and a warning when the limit is short.
pub fn log(files: &OpenFiles) {
    let show = |limit: Option<u64>| limit.map_or("unlimited".to_string(), |n| n.to_string());
    if let Some(error) = &files.raise_error {
        tracing::warn!(limit = %show(files.limit), %error, "could not raise the open files limit to the hard limit");
    }
    if files.found != files.limit {
        tracing::info!(
            from = %show(files.found),
            to = %show(files.limit),
            "open files limit raised to the hard limit"
        );
    }
    tracing::info!(
        limit = %show(files.limit),
        table = files.table,
        "open files"
    );
    if files.short() {
        tracing::warn!(
            limit = %show(files.limit),
            wanted = files.wanted,
            "the open files limit is below limits.max_connections plus {RESERVED}: connections past the limit are refused (accept fails with EMFILE); raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower limits.max_connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots in this process's descriptor table (`FDSize` in /proc/self/status).
    fn table_slots() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("read status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("FDSize:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("FDSize line")
    }

    #[test]
    fn the_table_is_grown_to_hold_the_connections_and_the_limit_reaches_the_hard_one() {
        let hard = getrlimit(Resource::Nofile).maximum;
        let files = prepare(3000);
        assert_eq!(files.wanted, 3000 + RESERVED);
        assert_eq!(files.limit, hard, "soft limit raised to the hard limit");
        assert!(files.raise_error.is_none());
        let expected = hard.map_or(files.wanted, |h| h.min(files.wanted));
        assert_eq!(files.table, expected);
        assert!(
            table_slots() >= expected,
            "FDSize {} < {expected}",
            table_slots()
        );
        // The copy used to grow the table is closed again.
        let slot = std::path::PathBuf::from(format!("/proc/self/fd/{}", expected - 1));
        assert!(!slot.exists());
    }

    #[test]
    fn a_limit_below_max_connections_is_reported_short() {
        let files = OpenFiles {
            found: Some(1024),
            limit: Some(20_000),
            raise_error: None,
            table: 20_000,
            wanted: 100_000 + RESERVED,
        };
        assert!(files.short());
        let enough = OpenFiles {
            limit: None,
            ..files.clone()
        };
        assert!(!enough.short());
        assert!(
            !OpenFiles {
                limit: Some(200_000),
                ..files
            }
            .short()
        );
    }
}
