//! Abuse limits at the edge: new connections per second and failed authentications per source
//! address (then a temporary ban), and per-connection message and byte rates (the connection
//! is slowed down, which pushes back on the client through TCP). Every refusal is counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The limits, each off when 0.
#[derive(Debug, Clone)]
pub struct AbuseSettings {
    /// New connections per second from one address.
    pub connect_rate_per_ip: u32,
    /// Failed CONNECT authentications from one address within a minute before a ban.
    pub auth_failures_per_ip: u32,
    pub auth_ban: Duration,
    /// PUBLISH packets per second per connection.
    pub messages_per_sec: u32,
    /// PUBLISH bytes (topic and payload) per second per connection.
    pub bytes_per_sec: u64,
}

impl Default for AbuseSettings {
    fn default() -> Self {
        AbuseSettings {
            connect_rate_per_ip: 0,
            auth_failures_per_ip: 20,
            auth_ban: Duration::from_secs(60),
            messages_per_sec: 0,
            bytes_per_sec: 0,
        }
    }
}

/// What the edge refused or slowed, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub refused_max_connections: AtomicU64,
    pub refused_connect_rate: AtomicU64,
    pub refused_banned: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bans: AtomicU64,
    pub throttled: AtomicU64,
    pub handshake_failures: AtomicU64,
}

impl ServerStats {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Source {
    second: Instant,
    connects: u32,
    minute: Instant,
    failures: u32,
    banned_until: Option<Instant>,
}

/// Why a new connection is refused before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    ConnectRate,
    Banned,
}

/// Per-address bookkeeping. The lock is held for a map lookup only.
#[derive(Debug, Default)]
pub struct Guard {
    settings: AbuseSettings,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

/// Addresses tracked at most; beyond it idle ones are forgotten.
const MAX_SOURCES: usize = 100_000;

impl Guard {
    pub fn new(settings: AbuseSettings) -> Guard {
        Guard {
            settings,
            sources: Mutex::default(),
        }
    }

    fn with_source<T>(&self, ip: IpAddr, f: impl FnOnce(&mut Source, Instant) -> T) -> T {
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_SOURCES {
            sources.retain(|_, s| {
                now.duration_since(s.minute) < Duration::from_secs(60)
                    || s.banned_until.is_some_and(|b| b > now)
            });
        }
        let source = sources.entry(ip).or_insert(Source {
            second: now,
            connects: 0,
            minute: now,
            failures: 0,
            banned_until: None,
        });
        f(source, now)
    }

    /// Called for every accepted socket.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refused> {
        let rate = self.settings.connect_rate_per_ip;
        self.with_source(ip, |source, now| {
            if source.banned_until.is_some_and(|until| until > now) {
                return Err(Refused::Banned);
            }
            if rate == 0 {
                return Ok(());
            }
            if now.duration_since(source.second) >= Duration::from_secs(1) {
                source.second = now;
                source.connects = 0;
            }
            source.connects += 1;
            if source.connects > rate {
                Err(Refused::ConnectRate)
            } else {
                Ok(())
            }
        })
    }

    /// Called for every CONNECT refused for its credentials. `true` when it starts a ban.
    pub fn auth_failed(&self, ip: IpAddr) -> bool {
        let limit = self.settings.auth_failures_per_ip;
        let ban = self.settings.auth_ban;
        if limit == 0 {
            return false;
        }
        self.with_source(ip, |source, now| {
            if now.duration_since(source.minute) >= Duration::from_secs(60) {
                source.minute = now;
                source.failures = 0;
            }
            source.failures += 1;
            if source.failures >= limit && source.banned_until.is_none_or(|until| until <= now) {
                source.banned_until = Some(now + ban);
                source.failures = 0;
                return true;
            }
            false
        })
    }

    pub fn settings(&self) -> &AbuseSettings {
        &self.settings
    }
}

/// A token bucket: `rate` per second, bursts up to one second's worth.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: u64) -> Option<Bucket> {
        (rate > 0).then(|| Bucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        })
    }

    /// Takes `n` tokens; returns how long to wait first when there are not enough.
    pub fn take(&mut self, n: f64) -> Option<Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        self.tokens -= n;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_rate_and_bans_per_address() {
        let guard = Guard::new(AbuseSettings {
            connect_rate_per_ip: 3,
            auth_failures_per_ip: 2,
            auth_ban: Duration::from_secs(60),
            ..AbuseSettings::default()
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..3 {
            assert_eq!(guard.admit(a), Ok(()));
        }
        assert_eq!(guard.admit(a), Err(Refused::ConnectRate));
        assert_eq!(guard.admit(b), Ok(()));
        assert!(!guard.auth_failed(b));
        assert!(guard.auth_failed(b));
        assert_eq!(guard.admit(b), Err(Refused::Banned));
    }

    #[test]
    fn buckets_delay_what_exceeds_the_rate() {
        let mut bucket = Bucket::new(10).expect("on");
        for _ in 0..10 {
            assert_eq!(bucket.take(1.0), None);
        }
        let wait = bucket.take(1.0).expect("over the rate");
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert!(Bucket::new(0).is_none());
    }
}
