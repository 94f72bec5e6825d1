//! The scenarios. Each takes the options and the broker's address, drives the load, and
//! returns its named results; `crate::run` adds the CPU times and the summary around them.

pub mod conn;
pub mod flow;
pub mod latency;
pub mod offline;
pub mod presence;

use std::time::Duration;

use tokio::task::JoinSet;

use crate::BenchError;

/// Milliseconds, as results report them.
pub(crate) fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Collects every task's output; the first failure fails the run.
pub(crate) async fn join_all<T: 'static>(
    mut set: JoinSet<Result<T, BenchError>>,
) -> Result<Vec<T>, BenchError> {
    let mut out = Vec::with_capacity(set.len());
    while let Some(joined) = set.join_next().await {
        let value =
            joined.map_err(|e| BenchError::Failed(format!("a bench task failed: {e}")))??;
        out.push(value);
    }
    Ok(out)
}

/// How long a publisher waits for its last PUBACKs at most.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(30);
