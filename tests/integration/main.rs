//! Integration tests: the real broker on 127.0.0.1:0, real clients (rumqttc), raw bytes where a
//! client library would hide the behaviour, and the real binary for signals and SIGKILL.

mod abuse;
mod admin;
mod bench_smoke;
mod browser;
mod churn;
mod cli;
mod connect;
mod crash;
mod deploy;
mod device_credentials;
mod fuzz_sessions;
mod interop;
mod limits;
mod malformed;
mod parking;
mod permissions;
mod presence;
mod pubsub;
mod retained;
mod sessions;
mod sinks;
mod tokens;
mod transports;
mod will;

use std::time::Duration;

/// Short waits for "nothing arrives" assertions.
pub const QUIET: Duration = Duration::from_millis(300);
