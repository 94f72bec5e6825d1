//! The broker's state and the one task that owns it.
//!
//! Connection tasks send [`Input`]s; the router answers through each channel's [`Outbox`] with
//! [`Outgoing`] packets, keeps sessions, subscriptions, inflight and offline queues and retained
//! messages, hands what must be durable to the [`persist::Persister`], and reports every
//! channel's life as [`Event`]s. It never touches a socket and never blocks on a client.

mod channel_outbox;
mod connect;
pub mod outbox;
pub mod persist;
mod presence;
mod publish;
mod router;
mod session;
mod sessions;
mod subscribe;
pub mod tree;
mod types;

pub use channel_outbox::{Outbox, OutboxReceiver, SendError, channel_outbox};
pub use outbox::{OutboxEntry, SinkQueue};
pub use presence::PresenceEvent;
pub use router::{Route, Router, RouterHandle, RouterStats};
pub use types::*;
