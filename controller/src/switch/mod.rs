//! Switch connections: the sans-IO [`session`] state machine and the tokio [`server`].

pub mod server;
pub mod session;

pub use server::{Controller, Rejected, ServerConfig, SwitchError, SwitchEvent};
pub use session::{CloseReason, Session, SessionConfig};
