//! Wire types of kaiwa: the WebSocket frames of both protocols and the HTTP history bodies.
//!
//! Two WebSocket protocols share the `/ws` endpoint:
//! - [`legacy`]: the frames of the Python server kaiwa replaces, accepted unchanged;
//! - [`native`]: `kaiwa.v1`, chosen with the `Sec-WebSocket-Protocol` header or a `hello` first
//!   frame, with client message ids, acks, status updates, binary media and resume.
//!
//! A third, [`path`], is the dialect of the other Python system kaiwa replaces: its clients
//! connect to `/<client_id>` (or `/ws/<client_id>`) and send no handshake frame.
//!
//! This crate holds data only (serde types and small pure helpers), so the server, the load tool
//! and any Rust client can share it without pulling in a runtime.

mod close;
mod error;
pub mod history;
pub mod legacy;
mod model;
pub mod native;
pub mod path;

pub use close::{CloseCode, reconnects};
pub use error::ErrorCode;
pub use model::{Delivery, MessageStatus, MessageType, ReplyType};

/// The `Sec-WebSocket-Protocol` value of the native protocol.
pub const SUBPROTOCOL: &str = "kaiwa.v1";
