//! The MQTT vocabulary of Herald: packets, the wire codec, client ids, topic names and filters.
//!
//! The third-party codec (`rmqtt-codec`) stays behind [`codec::Codec`]; the rest of the broker
//! only sees the types defined here. This crate is pure: no sockets, no tasks, no clocks.

pub mod client_id;
pub mod codec;
pub mod packet;
pub mod topic;

pub use bytes::Bytes;
pub use client_id::{ClientId, ClientIdError};
pub use codec::{Codec, DecodeError, EncodeError};
pub use packet::{
    ConnAck, Connect, ConnectReturnCode, Packet, PacketId, Protocol, Publish, QoS, SubAckCode, Will,
};
pub use topic::{Topic, TopicError};
