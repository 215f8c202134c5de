//! Offline asynchronous mode (paper §II): client sessions are persisted to files and
//! replayed to a replica later, for deployments whose recovery objective is minutes or hours
//! rather than seconds.
//!
//! - [`pcapng`]: a sans-IO pcapng writer that turns a session's byte streams into
//!   synthesized TCP/IPv4 packets (so Wireshark can open and follow the recordings), and the
//!   block-level pcapng parser used to read them back;
//! - [`recorder`]: the non-blocking recording target fed by the data plane's workers, with a
//!   writer thread, bounded queue and file rotation;
//! - [`services`]: one recorder per recording service, started and finished around a data
//!   plane's workers (either mode);
//! - [`reader`]: turns recordings (ours or any pcapng of TCP/IPv4) back into per-session
//!   client byte streams, reassembled in sequence order, with clear errors for damaged
//!   files;
//! - [`replay`]: sends recorded sessions to a target over kernel TCP sockets, concurrently
//!   and paced like the original (the `ncp-replay` binary is a thin CLI around it).
//!
//! Why pcapng and not a private format: operators can inspect a recording with tools they
//! already have (`tshark -z follow,tcp`), and the per-session metadata the replayer needs
//! rides in packet comments that those tools show but otherwise ignore.

use std::net::SocketAddrV4;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod pcapng;
pub mod reader;
pub mod recorder;
pub mod replay;
pub mod services;
#[cfg(test)]
pub(crate) mod testing;

/// What the replayer needs to know about a recorded session beyond its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// Name of the replicated service (the operator's configuration name).
    pub service: String,
    /// The client's address and port as seen by the middlebox.
    pub client: SocketAddrV4,
    /// The primary destination's address and port.
    pub primary: SocketAddrV4,
    /// When the session started, nanoseconds since the Unix epoch.
    pub start_ns: u64,
}

/// Nanoseconds since the Unix epoch for `t` (0 before the epoch, saturating far after it).
pub fn unix_ns(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        Err(_) => 0,
    }
}

/// The current wall-clock time in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    unix_ns(SystemTime::now())
}

/// The inverse of [`unix_ns`].
pub fn from_unix_ns(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}
