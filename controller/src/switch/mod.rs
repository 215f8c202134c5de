//! Switch connections: the sans-IO [`session`] state machine, the datapath-id
//! [`registry`] and the tokio [`server`].

pub mod registry;
pub mod server;
pub mod session;
pub mod tls;

pub use server::{Controller, Rejected, ServerConfig, SwitchError, SwitchEvent};
pub use session::{CloseReason, Session, SessionConfig};
pub use tls::{Credentials, SwitchMap, SwitchTls, TlsFiles};
