//! A channel's outbox: the bounded queue from the router to one connection task.
//!
//! Every open connection has one, so its size is part of what an idle connection costs. A
//! tokio `mpsc` channel allocates its first block of 32 slots (about 2.3 KB for [`Outgoing`])
//! plus a cache-padded shared state when it is created; this queue is one 64-byte allocation
//! whose packets are boxed apart only while there are any. The
//! router is the only producer and never waits: [`Outbox::try_send`] fails when the queue is
//! full (the client does not read) or the connection has gone.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use herald_protocol::Packet;

use crate::types::Outgoing;

struct State {
    items: Items,
    /// The receiver's task, when it waits for a packet.
    waker: Option<Waker>,
    senders: u32,
    receiver_alive: bool,
}

/// The queued packets: boxed, and absent while empty (8 bytes in every outbox instead of a
/// `VecDeque`'s 32; with the counts as `u32` the shared state is a 64-byte allocation, not 96).
/// An idle connection keeps no queue memory; the next packet allocates again, which is two
/// allocations per burst, next to the socket write each burst costs anyway.
#[derive(Default)]
#[allow(clippy::box_collection)] // the extra allocation is the point: 8 bytes while idle
struct Items(Option<Box<VecDeque<Outgoing>>>);

impl Items {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |queue| queue.len())
    }

    /// `Some` only while something is queued.
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn push_back(&mut self, item: Outgoing) {
        self.0.get_or_insert_with(Box::default).push_back(item);
    }

    fn front(&self) -> Option<&Outgoing> {
        self.0.as_ref()?.front()
    }

    fn pop_front(&mut self) -> Option<Outgoing> {
        let queue = self.0.as_mut()?;
        let item = queue.pop_front();
        if queue.is_empty() {
            self.0 = None;
        }
        item
    }
}

struct Shared {
    capacity: u32,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if one did, the state is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Creates a connection's outbox holding at most `capacity` packets.
pub fn channel_outbox(capacity: usize) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX).max(1),
        state: Mutex::new(State {
            items: Items::default(),
            waker: None,
            senders: 1,
            receiver_alive: true,
        }),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

/// Why [`Outbox::try_send`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue holds `capacity` packets: the client does not read fast enough.
    Full,
    /// The connection task has gone.
    Closed,
}

/// The router's end of a channel's outbox.
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// Queues `item` without waiting.
    pub fn try_send(&self, item: Outgoing) -> Result<(), SendError> {
        let waker = {
            let mut state = self.shared.lock();
            if !state.receiver_alive {
                return Err(SendError::Closed);
            }
            if state.items.len() >= self.shared.capacity as usize {
                return Err(SendError::Full);
            }
            state.items.push_back(item);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Whether the connection task has gone.
    pub fn is_closed(&self) -> bool {
        !self.shared.lock().receiver_alive
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Outbox {
        self.shared.lock().senders += 1;
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.waker.take()
        };
        // The receiver sees the end once the queue is drained.
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

/// The connection task's end of its outbox.
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

impl OutboxReceiver {
    /// The next packet; `None` once every [`Outbox`] is dropped and the queue is empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let mut state = self.shared.lock();
        if let Some(item) = pop(&mut state) {
            return Poll::Ready(Some(item));
        }
        if state.senders == 0 {
            return Poll::Ready(None);
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Asks for `waker` to be woken by the next packet or by the end of the outbox, without
    /// taking a packet: how a parked connection, which has no task polling it, learns that
    /// the router wrote to it. Returns true, and registers nothing, when a packet or the end
    /// is already there.
    pub fn register_waker(&self, waker: &Waker) -> bool {
        let mut state = self.shared.lock();
        if !state.items.is_empty() || state.senders == 0 {
            return true;
        }
        state.waker = Some(waker.clone());
        false
    }

    /// Waits for the next packet; `None` once every [`Outbox`] is dropped and the queue is
    /// empty.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Lets go of the outbox before the receiver is dropped, as a drop does: what is queued is
    /// dropped, and the router's sends fail from now on as to a connection that has gone (not
    /// one that does not read). For a task that is about to end and still routes a few last
    /// inputs, whose answers it would not write: they must not fill the outbox.
    pub fn close(&mut self) {
        let items = {
            let mut state = self.shared.lock();
            state.receiver_alive = false;
            state.waker = None;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock.
        drop(items);
    }

    /// Whether the router has let go of the outbox (it ended the channel, or stopped).
    pub fn is_ended(&self) -> bool {
        self.shared.lock().senders == 0
    }

    /// The next packet if one is queued.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        pop(&mut self.shared.lock())
    }

    /// Takes up to `max` packets from the front, stopping at a [`Outgoing::Close`] (which
    /// stays queued), for a parked connection that writes without its task. Registers `waker`
    /// as [`register_waker`](Self::register_waker) does when nothing is left; returns the
    /// packets and whether something is left (more packets, a close, or the outbox's end),
    /// in which case nothing is registered.
    pub fn take_packets(&mut self, max: usize, waker: &Waker) -> (Vec<Packet>, bool) {
        let mut state = self.shared.lock();
        let mut packets = Vec::new();
        while packets.len() < max && matches!(state.items.front(), Some(Outgoing::Packet(_))) {
            if let Some(Outgoing::Packet(packet)) = state.items.pop_front() {
                packets.push(packet);
            }
        }
        let left = !state.items.is_empty() || state.senders == 0;
        if !left {
            state.waker = Some(waker.clone());
        }
        (packets, left)
    }
}

fn pop(state: &mut State) -> Option<Outgoing> {
    state.items.pop_front()
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for OutboxReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxReceiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CloseReason;
    use herald_protocol::Packet;

    fn ping() -> Outgoing {
        Outgoing::Packet(Packet::PingResp)
    }

    #[tokio::test]
    async fn delivers_in_order_and_refuses_when_full() {
        let (tx, mut rx) = channel_outbox(2);
        assert_eq!(tx.try_send(ping()), Ok(()));
        assert_eq!(tx.try_send(Outgoing::Close(CloseReason::Kicked)), Ok(()));
        assert_eq!(tx.try_send(ping()), Err(SendError::Full));
        assert!(matches!(
            rx.recv().await,
            Some(Outgoing::Packet(Packet::PingResp))
        ));
        assert!(matches!(
            rx.try_recv(),
            Some(Outgoing::Close(CloseReason::Kicked))
        ));
        assert!(rx.try_recv().is_none());
        assert_eq!(tx.try_send(ping()), Ok(()));
    }

    #[test]
    fn a_closed_receiver_drops_what_is_queued_and_refuses_as_gone_not_full() {
        let (tx, mut rx) = channel_outbox(1);
        assert_eq!(tx.try_send(ping()), Ok(()));
        assert!(!tx.is_closed());
        rx.close();
        assert!(tx.is_closed());
        assert!(rx.try_recv().is_none(), "what was queued is dropped");
        assert_eq!(tx.try_send(ping()), Err(SendError::Closed));
        assert_eq!(tx.try_send(ping()), Err(SendError::Closed));
    }

    #[test]
    fn packets_are_taken_up_to_a_close_which_stays_for_the_task() {
        let (tx, mut rx) = channel_outbox(8);
        let count = Arc::new(Counter(Default::default()));
        let waker = Waker::from(count.clone());
        for _ in 0..3 {
            tx.try_send(ping()).expect("room");
        }
        tx.try_send(Outgoing::Close(CloseReason::Kicked))
            .expect("room");
        let (packets, left) = rx.take_packets(2, &waker);
        assert_eq!((packets.len(), left), (2, true), "at most the batch");
        let (packets, left) = rx.take_packets(8, &waker);
        assert_eq!((packets.len(), left), (1, true), "not past the close");
        // Something was left both times: no waker was registered, so nothing wakes it.
        tx.try_send(ping()).expect("room");
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(matches!(
            rx.try_recv(),
            Some(Outgoing::Close(CloseReason::Kicked))
        ));
        assert!(matches!(rx.try_recv(), Some(Outgoing::Packet(_))));
        // Nothing left: the waker is registered, and the next packet wakes it.
        let (packets, left) = rx.take_packets(8, &waker);
        assert_eq!((packets.len(), left), (0, false));
        tx.try_send(ping()).expect("room");
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (packets, left) = rx.take_packets(8, &waker);
        assert_eq!((packets.len(), left), (1, false));
        // The router gone: that is left for the task to see, after the packets it sent.
        tx.try_send(ping()).expect("room");
        assert!(!rx.is_ended());
        drop(tx);
        assert!(rx.is_ended(), "ended even with a packet still queued");
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        let (packets, left) = rx.take_packets(8, &waker);
        assert_eq!((packets.len(), left), (1, true));
        let (packets, left) = rx.take_packets(8, &waker);
        assert_eq!((packets.len(), left), (0, true));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_last_sender_leaving() {
        let (tx, mut rx) = channel_outbox(8);
        let second = tx.clone();
        let reader = tokio::spawn(async move {
            let first = rx.recv().await.is_some();
            let end = rx.recv().await.is_none();
            (first, end)
        });
        tokio::task::yield_now().await;
        second.try_send(ping()).expect("room");
        drop(second);
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(reader.await.expect("reader"), (true, true));
    }

    #[tokio::test]
    async fn sending_to_a_gone_receiver_fails_and_the_queue_is_freed() {
        let (tx, rx) = channel_outbox(8);
        tx.try_send(ping()).expect("room");
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(ping()), Err(SendError::Closed));
        assert!(tx.shared.lock().items.is_empty());
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel_outbox(1024);
        for _ in 0..500 {
            tx.try_send(ping()).expect("room");
        }
        while rx.try_recv().is_some() {}
        assert!(rx.shared.lock().items.0.is_none());
        // What every connection keeps (with the Arc's two counts, 64 bytes in all).
        assert!(std::mem::size_of::<Shared>() <= 48);
    }

    /// Counts its wake-ups.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_registered_waker_is_woken_without_a_packet_being_taken() {
        let (tx, rx) = channel_outbox(8);
        let counter = Arc::new(Counter(Default::default()));
        let waker = Waker::from(counter.clone());
        let woken = || counter.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(!rx.register_waker(&waker), "empty: waits");
        tx.try_send(ping()).expect("room");
        assert_eq!(woken(), 1);
        assert!(rx.register_waker(&waker), "a packet is there");
        assert_eq!(rx.shared.lock().items.len(), 1, "nothing taken");
        let mut rx = rx;
        assert!(rx.try_recv().is_some());
        assert!(!rx.register_waker(&waker));
        drop(tx);
        assert_eq!(woken(), 2, "the end wakes too");
        assert!(rx.register_waker(&waker), "ended");
    }
}
