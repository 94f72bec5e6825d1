//! Parked connections: idle plain-TCP connections that have given up their task.
//!
//! Most of a fleet is idle most of the time: a device sends a reading every minute and a
//! PINGREQ in between. A tokio task per connection (its future, header and trailer, about
//! 0.8 KB) is most of what such a connection costs, so a connection that has had nothing to
//! read or write for `limits.park_idle_ms` hands its state to the [`Parker`] and its task
//! ends. The parker is one task per listener set: it keeps every parked connection in a slab,
//! registers one small waker per connection with the socket (readable, or closed by the peer)
//! and with the outbox (the router wrote to it, or closed it), and keeps their keepalive
//! deadlines in one heap with one timer. Whichever comes first resumes the connection: a new
//! task is spawned with the same state and the wake-up is handled there, as if the connection
//! had never stopped. Parking and resuming make no socket system call (the socket stays
//! registered with tokio) and lose nothing: bytes stay in the socket and packets in the outbox
//! until the resumed task reads them.
//!
//! Only plain TCP connections without a periodic credential check park (TLS and WebSocket
//! streams keep their task; token and device-credential connections re-check every second).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};

use slab::Slab;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::connection::Channel;
use crate::guard::ServerStats;

/// Rounds of taking in, resuming and expiring one poll of the parker makes before it yields.
const TURNS_PER_POLL: usize = 32;

/// A connection handed over by its task: its state and its keepalive deadline.
pub(crate) struct Parked {
    pub(crate) channel: Box<Channel<TcpStream>>,
    pub(crate) deadline: Option<Instant>,
}

/// Where idle connections wait without a task. Cheap to create: its task starts with the first
/// parked connection and ends when the parker is dropped.
pub(crate) struct Parker {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// `parked`: connections parked right now (the `herald_connections_parked` gauge).
    stats: Arc<ServerStats>,
}

#[derive(Default)]
struct Queue {
    /// Handed over, not yet taken in by the parker task.
    arriving: Vec<Parked>,
    /// Parked connections whose socket or outbox woke them: (slab key, generation).
    woken: Vec<(usize, u64)>,
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
    pub(crate) fn new(stats: Arc<ServerStats>) -> Parker {
        Parker {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                stats,
            }),
        }
    }

    /// Takes over an idle connection. Must be called on the runtime (it may start the
    /// parker's task).
    pub(crate) fn park(&self, parked: Parked) {
        let mut queue = self.shared.lock();
        if queue.stopped {
            // Not reachable while the channel holds the context that owns this parker; if it
            // were, the connection keeps its task rather than being dropped unannounced.
            drop(queue);
            tokio::spawn(crate::connection::resume(parked));
            return;
        }
        self.shared.stats.parked.fetch_add(1, Ordering::Relaxed);
        queue.arriving.push(parked);
        if !queue.started {
            queue.started = true;
            drop(queue);
            let lot = Lot::new(self.shared.clone());
            // Outside tokio's cooperative budget: taking in a large batch must not make
            // `poll_read_ready` report "not ready, try later" for sockets that are idle.
            tokio::spawn(tokio::task::unconstrained(lot.run()));
            return;
        }
        Shared::wake_task(queue);
    }
}

impl Drop for Parker {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.stopped = true;
        let arriving = std::mem::take(&mut queue.arriving);
        Shared::wake_task(queue);
        drop(arriving);
    }
}

/// The waker a parked connection leaves with its socket and its outbox.
struct ConnectionWaker {
    key: usize,
    generation: u64,
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
        queue.woken.push((self.key, self.generation));
        Shared::wake_task(queue);
    }
}

struct Slot {
    parked: Parked,
    generation: u64,
}

/// The parker's task state: every parked connection and their deadlines.
struct Lot {
    shared: Arc<Shared>,
    slots: Slab<Slot>,
    /// Keepalive deadlines: (deadline, slab key, generation). Entries of connections that
    /// have resumed since stay until their time comes and are skipped then.
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    timer: Option<Pin<Box<Sleep>>>,
    generation: u64,
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
        let left: Vec<Parked> = self
            .slots
            .drain()
            .map(|slot| slot.parked)
            .chain(arriving)
            .collect();
        self.shared
            .stats
            .parked
            .fetch_sub(left.len() as u64, Ordering::Relaxed);
        // Without a runtime (it is shutting down) the connections are simply dropped, as
        // their tasks would be.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            for parked in left {
                runtime.spawn(crate::connection::resume(parked));
            }
        }
    }
}

impl Lot {
    fn new(shared: Arc<Shared>) -> Lot {
        Lot {
            shared,
            slots: Slab::new(),
            deadlines: BinaryHeap::new(),
            timer: None,
            generation: 0,
        }
    }

    async fn run(mut self) {
        poll_fn(|cx| self.poll(cx)).await;
        debug!(parked = self.slots.len(), "parker stopped");
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..TURNS_PER_POLL {
            let (arriving, woken) = {
                let mut queue = self.shared.lock();
                if queue.stopped {
                    return Poll::Ready(());
                }
                if queue.arriving.is_empty() && queue.woken.is_empty() {
                    queue.task = Some(cx.waker().clone());
                }
                (
                    std::mem::take(&mut queue.arriving),
                    std::mem::take(&mut queue.woken),
                )
            };
            let had_work = !arriving.is_empty() || !woken.is_empty();
            for parked in arriving {
                self.take_in(parked);
            }
            for (key, generation) in woken {
                if self
                    .slots
                    .get(key)
                    .is_some_and(|slot| slot.generation == generation)
                {
                    self.resume(key);
                }
            }
            let now = Instant::now();
            while let Some(Reverse((deadline, key, generation))) = self.deadlines.peek().copied() {
                if deadline > now {
                    break;
                }
                self.deadlines.pop();
                if self
                    .slots
                    .get(key)
                    .is_some_and(|slot| slot.generation == generation)
                {
                    // The resumed task finds its deadline passed and closes with
                    // `keepalive_timeout`, through the same exit as any connection.
                    self.resume(key);
                }
            }
            let timer_fired = match self.deadlines.peek() {
                Some(Reverse((next, _, _))) => {
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*next)));
                    if timer.deadline() != *next {
                        timer.as_mut().reset(*next);
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

    /// Registers a newly parked connection's waker with its socket and its outbox; resumes it
    /// at once if either is already ready (bytes or a packet arrived while it was handed over).
    fn take_in(&mut self, parked: Parked) {
        self.generation += 1;
        let generation = self.generation;
        let entry = self.slots.vacant_entry();
        let key = entry.key();
        let waker = Waker::from(Arc::new(ConnectionWaker {
            key,
            generation,
            shared: Arc::downgrade(&self.shared),
        }));
        let mut cx = Context::from_waker(&waker);
        let ready = parked.channel.poll_socket_ready(&mut cx)
            || parked.channel.outbox_rx.register_waker(&waker);
        let deadline = parked.deadline;
        entry.insert(Slot { parked, generation });
        if ready {
            self.resume(key);
            return;
        }
        if let Some(deadline) = deadline {
            self.deadlines.push(Reverse((deadline, key, generation)));
            // A connection that parks and resumes often leaves a deadline behind each time;
            // rebuild the heap before those outnumber the parked connections.
            if self.deadlines.len() > 2 * self.slots.len() + 64 {
                self.deadlines = self
                    .slots
                    .iter()
                    .filter_map(|(key, slot)| {
                        let deadline = slot.parked.deadline?;
                        Some(Reverse((deadline, key, slot.generation)))
                    })
                    .collect();
            }
        }
    }

    fn resume(&mut self, key: usize) {
        let slot = self.slots.remove(key);
        self.shared.stats.parked.fetch_sub(1, Ordering::Relaxed);
        tokio::spawn(crate::connection::resume(slot.parked));
    }
}
