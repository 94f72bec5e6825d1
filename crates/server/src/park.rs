//! Parked connections: idle plain-TCP connections that have given up their task.
//!
//! Most of a fleet is idle most of the time: a device sends a reading every minute and a
//! PINGREQ in between. A tokio task per connection (its future, header and trailer, about
//! 0.8 KB) is most of what such a connection costs, so a connection that has had nothing to
//! read or write for `limits.park_idle_ms` hands its state to the [`Parker`] and its task
//! ends. The parker is one task per listener set: it keeps every parked connection in a slab,
//! moves its socket out of tokio's reactor into its own epoll set (freeing tokio's per-socket
//! registration, 256 bytes), leaves one small waker with the outbox (the router wrote to it,
//! or closed it), and keeps the keepalive deadlines in one heap with one timer. A packet the
//! router writes to the outbox the parker writes to the socket itself, without blocking, and
//! the connection stays parked (an idle subscriber that is sent a message now and then never
//! needs a task). Anything else (the socket readable or closed by the peer, more than one
//! packet queued, a close from the router, a write the socket did not take whole, the
//! deadline) resumes the connection: its socket goes back to tokio and a new task is spawned
//! with the same state, which writes what the parker left first and handles the wake-up as if
//! the connection had never stopped. Nothing is lost: bytes stay in the socket and packets in
//! the outbox until the resumed task reads them. The cost is two `epoll_ctl` calls to park
//! and two to resume.
//!
//! Only plain TCP connections park (TLS and WebSocket keep state inside their stream types).
//! Token and device-credential connections park too: a change of the auth registry wakes every
//! parked one that relies on it (one notification for the whole parker), and a token's expiry
//! is a deadline like the keepalive.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::poll_fn;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};

use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use herald_auth::AuthRegistry;
use tokio::sync::futures::OwnedNotified;

use crate::connection::{Channel, ParkedSocket};
use crate::guard::ServerStats;

/// Rounds of taking in, resuming and expiring one poll of the parker makes before it yields.
const TURNS_PER_POLL: usize = 32;

/// A connection handed over by its task: its state, its keepalive deadline, and when it must
/// be woken at the latest (that deadline, or its first token's expiry).
pub(crate) struct Parked {
    pub(crate) channel: Box<Channel<TcpStream>>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) wake_at: Option<Instant>,
}

/// Where idle connections wait without a task. Cheap to create: its task starts with the first
/// parked connection and ends when the parker is dropped.
pub(crate) struct Parker {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Tokens and device credentials: a change wakes the parked connections that rely on it.
    registry: Arc<AuthRegistry>,
    /// `parked`: connections parked right now (the `herald_connections_parked` gauge).
    stats: Arc<ServerStats>,
}

#[derive(Default)]
struct Queue {
    /// Handed over, not yet taken in by the parker task.
    arriving: Vec<Parked>,
    /// Parked connections whose outbox woke them.
    woken: Vec<SlotRef>,
    /// The parker task, when it waits.
    task: Option<Waker>,
    started: bool,
    stopped: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; if something did, the queue is still whole.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_task(mut queue: MutexGuard<'_, Queue>) {
        let task = queue.task.take();
        drop(queue);
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl Parker {
    pub(crate) fn new(stats: Arc<ServerStats>, registry: Arc<AuthRegistry>) -> Parker {
        Parker {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                registry,
                stats,
            }),
        }
    }

    /// Takes over an idle connection. Must be called on the runtime (it may start the
    /// parker's task).
    pub(crate) fn park(&self, parked: Parked) {
        // (`stopped` is set only when the parker is dropped, so never while this runs.)
        let mut queue = self.shared.lock();
        if !queue.started {
            let lot = match Lot::new(self.shared.clone()) {
                Ok(lot) => lot,
                Err(e) => {
                    // Out of file descriptors, say: the connection keeps its task.
                    drop(queue);
                    debug!(error = %e, "cannot start the parker");
                    tokio::spawn(crate::connection::resume(parked.channel, parked.deadline));
                    return;
                }
            };
            queue.started = true;
            // Outside tokio's cooperative budget, which is for tasks that serve one client.
            tokio::spawn(tokio::task::unconstrained(lot.run()));
        }
        queue.arriving.push(parked);
        Shared::wake_task(queue);
    }
}

impl Drop for Parker {
    fn drop(&mut self) {
        // Nothing is arriving: each parked connection holds the context that owns the parker.
        let mut queue = self.shared.lock();
        queue.stopped = true;
        Shared::wake_task(queue);
    }
}

/// A slot as (slab key, the generation it was taken in): an event for a slot since reused is
/// recognised as stale.
type SlotRef = (u32, u32);

/// The waker a parked connection leaves with its outbox (32 bytes with its `Arc` counts).
struct ConnectionWaker {
    slot: SlotRef,
    shared: Weak<Shared>,
}

impl Wake for ConnectionWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut queue = shared.lock();
        queue.woken.push(self.slot);
        Shared::wake_task(queue);
    }
}

/// 32 bytes: times are milliseconds on the lot's clock ([`Lot::tick`]), not `Instant`s (16 bytes
/// each), here and in the deadline heap.
struct Slot {
    channel: Box<Channel<ParkedSocket>>,
    deadline: Option<Tick>,
    wake_at: Option<Tick>,
    /// The low 32 bits of the lot's counter when the slot was taken.
    generation: u32,
    /// A token or device-credential connection: a registry change wakes it.
    relies_on_registry: bool,
}

/// The room to add to the slab or the deadline heap before one more goes in, if it is full:
/// a quarter of what it holds (at least 64), where `Vec` would double. At 10,000 parked
/// connections doubling leaves room for 16,384 (48 bytes each in the two); a quarter keeps the
/// unused part under 25% (jemalloc's large size classes are a quarter apart too) for a few
/// more copies while the parker grows.
fn growth(len: usize, capacity: usize) -> Option<usize> {
    (len >= capacity).then(|| (len / 4).max(64))
}

/// The epoll token of a slot: its key in the low 32 bits, its generation in the high ones.
fn token((key, generation): SlotRef) -> Token {
    Token((u64::from(generation) << 32 | u64::from(key)) as usize)
}

fn slot_of(token: Token) -> SlotRef {
    let token = token.0 as u64;
    ((token & 0xFFFF_FFFF) as u32, (token >> 32) as u32)
}

/// A time on the lot's clock: 1 + whole milliseconds since the lot started. Deadlines round up
/// and the present rounds down, so nothing is woken before its time.
type Tick = NonZeroU64;

/// A deadline on the clock of a lot started at `epoch`.
fn tick(epoch: Instant, at: Instant) -> Tick {
    tick_rounded(epoch, at, true)
}

/// `at` on the clock of a lot started at `epoch`, rounded up (deadlines) or down (now, so that
/// a deadline counts as passed only once it truly has).
fn tick_rounded(epoch: Instant, at: Instant, up: bool) -> Tick {
    let since = at.saturating_duration_since(epoch);
    let ms = since.as_millis() + u128::from(up && !since.subsec_nanos().is_multiple_of(1_000_000));
    let ms = u64::try_from(ms).unwrap_or(u64::MAX - 1);
    Tick::new(ms + 1).unwrap_or(Tick::MIN)
}

/// How many socket events one read of the parker's epoll set takes at most.
const EVENTS: usize = 256;

/// The parker's task state: every parked connection and their deadlines.
struct Lot {
    shared: Arc<Shared>,
    /// The parked sockets' epoll set, itself watched by tokio.
    epoll: AsyncFd<mio::Poll>,
    events: Events,
    /// Always enabled, so that no change of the auth registry is missed; re-armed when it
    /// fires.
    registry_watch: Pin<Box<OwnedNotified>>,
    slots: Slab<Slot>,
    /// The queue's two lists are swapped with these, empty but with room, at each turn: a
    /// park or a wake-up pushes into room kept from the turns before instead of allocating a
    /// list that the next turn frees (in a connect burst, about one short-lived 160-byte
    /// allocation per parked connection, in the size class of the router's sessions).
    arriving: Vec<Parked>,
    woken: Vec<SlotRef>,
    /// Keepalive deadlines: (deadline, slot). Entries of connections that have resumed since
    /// stay until their time comes and are skipped then.
    deadlines: BinaryHeap<Reverse<(Tick, SlotRef)>>,
    /// When the lot started: the origin of its [`Tick`]s.
    epoch: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    /// Counts slots taken; its value tells a reused slot from the one before.
    generation: u32,
}

/// However the parker's task ends (the parker dropped, the runtime shutting down, a panic),
/// no connection is left behind without a task: each goes back to one, so that it still ends
/// through its own exit and the router hears of it. A later park starts a new task.
impl Drop for Lot {
    fn drop(&mut self) {
        let arriving = {
            let mut queue = self.shared.lock();
            queue.started = false;
            queue.task = None;
            std::mem::take(&mut queue.arriving)
        };
        let slots: Vec<Slot> = self.slots.drain().collect();
        self.shared
            .stats
            .parked
            .fetch_sub(slots.len() as u64, Ordering::Relaxed);
        // Without a runtime (it is shutting down) the connections are simply dropped, as
        // their tasks would be.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let _on_runtime = runtime.enter();
        for parked in arriving {
            tokio::spawn(crate::connection::resume(parked.channel, parked.deadline));
        }
        for slot in slots {
            self.wake_slot(slot);
        }
    }
}

impl Lot {
    /// Must run on the runtime (the epoll set is registered with tokio).
    fn new(shared: Arc<Shared>) -> std::io::Result<Lot> {
        // tokio 1.54 deprecates the safe constructor because a `T` might change or close the
        // descriptor it reports while registered. `mio::Poll` owns its epoll descriptor from
        // creation to drop and never replaces it, and the `AsyncFd` owns the `Poll`, so the
        // descriptor stays the one registered for as long as the registration exists.
        #[allow(deprecated)]
        let epoll = AsyncFd::with_interest(mio::Poll::new()?, tokio::io::Interest::READABLE)?;
        let registry_watch = shared.registry.watch();
        Ok(Lot {
            shared,
            epoll,
            registry_watch,
            events: Events::with_capacity(EVENTS),
            slots: Slab::new(),
            arriving: Vec::new(),
            woken: Vec::new(),
            deadlines: BinaryHeap::new(),
            epoch: Instant::now(),
            timer: None,
            generation: 0,
        })
    }

    async fn run(mut self) {
        poll_fn(|cx| self.poll(cx)).await;
        debug!(parked = self.slots.len(), "parker stopped");
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..TURNS_PER_POLL {
            let mut arriving = std::mem::take(&mut self.arriving);
            let mut woken = std::mem::take(&mut self.woken);
            {
                let mut queue = self.shared.lock();
                if queue.stopped {
                    return Poll::Ready(());
                }
                if queue.arriving.is_empty() && queue.woken.is_empty() {
                    queue.task = Some(cx.waker().clone());
                }
                std::mem::swap(&mut queue.arriving, &mut arriving);
                std::mem::swap(&mut queue.woken, &mut woken);
            }
            let mut ready = self.ready_sockets(cx);
            if self.registry_watch.as_mut().poll(cx).is_ready() {
                // Tokens or credentials were revoked, refreshed or removed: every parked
                // connection that relies on them checks again, in its own task.
                self.registry_watch = self.shared.registry.watch();
                ready.extend(
                    self.slots
                        .iter()
                        .filter(|(_, slot)| slot.relies_on_registry)
                        .map(|(key, slot)| (key as u32, slot.generation)),
                );
            }
            let had_work = !arriving.is_empty() || !woken.is_empty() || !ready.is_empty();
            for slot in ready {
                if self.holds(slot) {
                    self.resume(slot.0 as usize);
                }
            }
            // The router wrote to these: written from here when that is all they need.
            for slot in woken.drain(..) {
                if self.holds(slot) {
                    self.write_or_resume(slot);
                }
            }
            for parked in arriving.drain(..) {
                self.take_in(parked);
            }
            self.arriving = arriving;
            self.woken = woken;
            let now = tick_rounded(self.epoch, Instant::now(), false);
            while let Some(Reverse((deadline, slot))) = self.deadlines.peek().copied() {
                if deadline > now {
                    break;
                }
                self.deadlines.pop();
                if self.holds(slot) {
                    // The resumed task finds its deadline passed and closes with
                    // `keepalive_timeout`, through the same exit as any connection.
                    self.resume(slot.0 as usize);
                }
            }
            let timer_fired = match self.deadlines.peek() {
                Some(&Reverse((next, _))) => {
                    let next = self.instant(next);
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
                    if timer.deadline() != next {
                        timer.as_mut().reset(next);
                    }
                    timer.as_mut().poll(cx).is_ready()
                }
                None => {
                    self.timer = None;
                    false
                }
            };
            if !had_work && !timer_fired {
                return Poll::Pending;
            }
        }
        // Work keeps arriving: let the worker run other tasks, then go on. (The task runs
        // outside tokio's budget, so it has to yield by itself.)
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The slots whose sockets became readable (bytes, or the peer closing); registers for the
    /// next ones when all are taken.
    fn ready_sockets(&mut self, cx: &mut Context<'_>) -> Vec<SlotRef> {
        let mut ready = Vec::new();
        loop {
            let mut guard = match self.epoll.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => {
                    warn!(error = %e, "parked connections' epoll set failed");
                    return ready;
                }
                Poll::Pending => return ready,
            };
            if let Err(e) = guard
                .get_inner_mut()
                .poll(&mut self.events, Some(std::time::Duration::ZERO))
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                warn!(error = %e, "reading the parked connections' epoll set failed");
                return ready;
            }
            let mut taken = 0;
            for event in self.events.iter() {
                ready.push(slot_of(event.token()));
                taken += 1;
            }
            if taken < EVENTS {
                // All taken: wait for the next ones (tokio keeps an event that comes after
                // this read, so none is missed).
                guard.clear_ready();
                return ready;
            }
            if ready.len() >= 4 * EVENTS {
                // More are waiting: the next turn takes them.
                return ready;
            }
        }
    }

    /// Takes a newly parked connection: leaves its waker with the outbox and moves its socket
    /// into the epoll set. Resumes it at once if the outbox already has something (a packet
    /// that came while it was handed over); bytes that came meanwhile make the socket readable
    /// in the set at once.
    fn take_in(&mut self, parked: Parked) {
        self.generation = self.generation.wrapping_add(1);
        // The key the slot will take: nothing enters the slab before it is inserted below.
        let key = self.slots.vacant_key();
        let slot = (key as u32, self.generation);
        let waker = self.waker(slot);
        let Parked {
            channel,
            deadline,
            wake_at,
        } = parked;
        // The outbox already has something, or the registry changed since the connection last
        // checked its credentials (the watch above would not tell of that change): no parking.
        if channel.outbox_rx.register_waker(&waker) || channel.registry_moved_on() {
            tokio::spawn(crate::connection::resume(channel, deadline));
            return;
        }
        let mut channel = match channel.unregister() {
            Ok(channel) => channel,
            Err(lost) => {
                tokio::spawn(lost.abandon());
                return;
            }
        };
        let registry = self.epoll.get_ref().registry();
        if let Err(e) = registry.register(channel.socket_mut(), token(slot), Interest::READABLE) {
            debug!(error = %e, "cannot watch a parked socket; it keeps its task");
            respawn(channel, deadline);
            return;
        }
        let relies_on_registry = channel.relies_on_registry();
        let epoch = self.epoch;
        let wake_at = wake_at.map(|at| tick(epoch, at));
        if let Some(more) = growth(self.slots.len(), self.slots.capacity()) {
            self.slots.reserve_exact(more);
        }
        let inserted = self.slots.insert(Slot {
            channel,
            deadline: deadline.map(|at| tick(epoch, at)),
            wake_at,
            generation: self.generation,
            relies_on_registry,
        });
        debug_assert_eq!(inserted, key);
        self.shared.stats.parked.fetch_add(1, Ordering::Relaxed);
        if let Some(wake_at) = wake_at {
            if let Some(more) = growth(self.deadlines.len(), self.deadlines.capacity()) {
                self.deadlines.reserve_exact(more);
            }
            self.deadlines.push(Reverse((wake_at, slot)));
            // A connection that parks and resumes often leaves a deadline behind each time;
            // rebuild the heap before those outnumber the parked connections.
            if self.deadlines.len() > 2 * self.slots.len() + 64 {
                self.deadlines = self
                    .slots
                    .iter()
                    .filter_map(|(key, slot)| {
                        Some(Reverse((slot.wake_at?, (key as u32, slot.generation))))
                    })
                    .collect();
            }
        }
    }

    /// The waker a slot leaves with its outbox.
    fn waker(&self, slot: SlotRef) -> Waker {
        Waker::from(Arc::new(ConnectionWaker {
            slot,
            shared: Arc::downgrade(&self.shared),
        }))
    }

    /// A parked connection the router wrote to: the parker writes the packet itself when it is
    /// the only one queued and the socket takes it whole (a device that is sent a message now
    /// and then never leaves the parker); otherwise the connection resumes. A subscriber that
    /// gets a stream resumes too, at its first wake-up with two packets waiting, so the one
    /// parker never becomes the writer of busy connections.
    fn write_or_resume(&mut self, slot: SlotRef) {
        let waker = self.waker(slot);
        let key = slot.0 as usize;
        let written = self
            .slots
            .get_mut(key)
            .and_then(|parked| parked.channel.write_in_place(&waker));
        match written {
            Some(packets) => {
                let stats = &self.shared.stats;
                stats
                    .parked_writes
                    .fetch_add(packets as u64, Ordering::Relaxed);
            }
            None => self.resume(key),
        }
    }

    /// Whether `slot` is still the connection parked there.
    fn holds(&self, (key, generation): SlotRef) -> bool {
        self.slots
            .get(key as usize)
            .is_some_and(|slot| slot.generation == generation)
    }

    fn instant(&self, tick: Tick) -> Instant {
        self.epoch + std::time::Duration::from_millis(tick.get() - 1)
    }

    fn resume(&mut self, key: usize) {
        let slot = self.slots.remove(key);
        self.shared.stats.parked.fetch_sub(1, Ordering::Relaxed);
        self.wake_slot(slot);
    }

    /// Moves a slot's socket back to tokio and gives the connection a task. Must run on the
    /// runtime.
    fn wake_slot(&self, mut slot: Slot) {
        // Failing to leave the set is harmless: the socket is registered with tokio next,
        // and a closed socket leaves every epoll set anyway.
        let _ = self
            .epoll
            .get_ref()
            .registry()
            .deregister(slot.channel.socket_mut());
        respawn(slot.channel, slot.deadline.map(|at| self.instant(at)));
    }
}

/// Moves a socket back to tokio and gives its connection a task again (or, if the socket was
/// lost on the way, tells the router it closed). Must run on the runtime.
fn respawn(channel: Box<Channel<ParkedSocket>>, deadline: Option<Instant>) {
    match channel.register() {
        Ok(channel) => tokio::spawn(crate::connection::resume(channel, deadline)),
        Err(lost) => tokio::spawn(lost.abandon()),
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_slab_and_the_heap_grow_by_a_quarter() {
        assert_eq!(growth(0, 0), Some(64));
        assert_eq!(growth(10, 64), None);
        assert_eq!(growth(10_000, 10_000), Some(2_500));
        let mut slab: Slab<u64> = Slab::new();
        let mut heap: BinaryHeap<u64> = BinaryHeap::new();
        for i in 0..10_000 {
            if let Some(more) = growth(slab.len(), slab.capacity()) {
                slab.reserve_exact(more);
            }
            slab.insert(i);
            if let Some(more) = growth(heap.len(), heap.capacity()) {
                heap.reserve_exact(more);
            }
            heap.push(i);
        }
        // Doubling would have left room for 16,384.
        assert!(slab.capacity() <= 12_500, "{}", slab.capacity());
        assert!(heap.capacity() <= 12_500, "{}", heap.capacity());
    }

    #[test]
    fn deadlines_round_up_and_the_present_down() {
        let epoch = Instant::now();
        let at = epoch + Duration::from_micros(5_900);
        assert_eq!(
            tick(epoch, at).get(),
            7,
            "5.9 ms: the 6th millisecond, plus one"
        );
        assert_eq!(tick_rounded(epoch, at, false).get(), 6);
        assert_eq!(tick(epoch, epoch + Duration::from_millis(6)).get(), 7);
        // Not passed at 5.9 ms; passed at 6 ms.
        let deadline = tick(epoch, epoch + Duration::from_millis(6));
        assert!(deadline > tick_rounded(epoch, at, false));
        assert!(deadline <= tick_rounded(epoch, epoch + Duration::from_millis(6), false));
        assert_eq!(
            tick(epoch, epoch - Duration::from_secs(1)).get(),
            1,
            "before the lot"
        );
    }

    #[test]
    fn a_parked_slot_is_small() {
        // One per parked connection, in a slab that grows by doubling (docs/benchmarks.md).
        assert!(std::mem::size_of::<Slot>() <= 32);
        assert!(std::mem::size_of::<Reverse<(Tick, SlotRef)>>() <= 16);
    }
}
