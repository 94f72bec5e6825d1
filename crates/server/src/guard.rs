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
    /// Idle connections parked right now (a gauge; `limits.park_idle_ms`).
    pub parked: AtomicU64,
    /// Writes the parker made for parked connections, which stayed parked.
    pub parked_writes: AtomicU64,
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

impl Source {
    fn new(now: Instant) -> Source {
        Source {
            second: now,
            connects: 0,
            minute: now,
            failures: 0,
            banned_until: None,
        }
    }

    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| until > now)
    }
}

#[derive(Debug, Default)]
struct Sources {
    map: HashMap<IpAddr, Source>,
    last_purge: Option<Instant>,
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
    sources: Mutex<Sources>,
}

/// Addresses tracked at most; beyond it idle ones are forgotten (at most once a second), and
/// while every tracked one is still active a new address is not tracked.
const MAX_SOURCES: usize = 100_000;

impl Guard {
    pub fn new(settings: AbuseSettings) -> Guard {
        Guard {
            settings,
            sources: Mutex::default(),
        }
    }

    /// Runs `f` on the address's record; `None` when the table is full of active addresses
    /// and this one is not tracked (then nothing limits it: fail open, never a scan per call).
    fn with_source<T>(&self, ip: IpAddr, f: impl FnOnce(&mut Source, Instant) -> T) -> Option<T> {
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let Sources { map, last_purge } = &mut *sources;
        if map.len() >= MAX_SOURCES && !map.contains_key(&ip) {
            if last_purge.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
                *last_purge = Some(now);
                map.retain(|_, s| {
                    now.duration_since(s.minute) < Duration::from_secs(60) || s.banned(now)
                });
            }
            if map.len() >= MAX_SOURCES {
                return None;
            }
        }
        let source = map.entry(ip).or_insert_with(|| Source::new(now));
        Some(f(source, now))
    }

    /// Called for every accepted socket.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refused> {
        let rate = self.settings.connect_rate_per_ip;
        if rate == 0 {
            // Only a ban can refuse: look the address up, do not start tracking it.
            let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let banned = sources
                .map
                .get(&ip)
                .is_some_and(|s| s.banned(Instant::now()));
            return if banned { Err(Refused::Banned) } else { Ok(()) };
        }
        self.with_source(ip, |source, now| {
            if source.banned(now) {
                return Err(Refused::Banned);
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
        .unwrap_or(Ok(()))
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
            if source.failures >= limit && !source.banned(now) {
                source.banned_until = Some(now + ban);
                source.failures = 0;
                return true;
            }
            false
        })
        .unwrap_or(false)
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
    fn without_a_rate_only_bans_are_tracked_and_a_full_table_stays_full() {
        let guard = Guard::new(AbuseSettings {
            connect_rate_per_ip: 0,
            auth_failures_per_ip: 1,
            auth_ban: Duration::from_secs(60),
            ..AbuseSettings::default()
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        assert_eq!(guard.admit(a), Ok(()));
        let tracked = |g: &Guard| g.sources.lock().expect("lock").map.len();
        assert_eq!(tracked(&guard), 0, "admitting does not track");
        assert!(guard.auth_failed(a));
        assert_eq!(guard.admit(a), Err(Refused::Banned));
        // A table full of active addresses takes no new one, and does not grow.
        {
            let mut sources = guard.sources.lock().expect("lock");
            let now = Instant::now();
            for n in 0..MAX_SOURCES as u32 {
                sources
                    .map
                    .insert(IpAddr::from((n + 1_000).to_be_bytes()), Source::new(now));
            }
        }
        let before = tracked(&guard);
        let b: IpAddr = [192, 0, 2, 1].into();
        assert!(!guard.auth_failed(b), "untracked: no ban is claimed");
        assert_eq!(guard.admit(b), Ok(()));
        assert_eq!(tracked(&guard), before);
        assert_eq!(
            guard.admit(a),
            Err(Refused::Banned),
            "tracked ones keep their ban"
        );
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
