//! Sans-IO replication core of the NCP middlebox (paper section III-B).
//!
//! The middlebox terminates a redirected client connection, opens its own connections to
//! the primary server and to each replica, copies the client's byte stream to all of them
//! and returns only the primary's answers. This crate is the logic of that copy — what
//! goes to whom, buffering, the slow-replica policy, half-close and reset propagation,
//! timeouts, admission — as state machines that take events, bytes and the current time
//! and return bytes to send and actions. It has no sockets, no clock and no threads, so
//! every behaviour is tested deterministically in memory.
//!
//! Modules, one job each:
//! - [`buffer`]: one stored copy of a stream, read by several destinations.
//! - [`config`]: per-session limits and the memory bound they imply.
//! - [`session`]: the per-session state machine.
//! - [`manager`]: admission caps, session ids, timers, metrics over sessions.
//! - [`metrics`]: counters and snapshots.
//! - [`verify`]: replicas' answers compared with the primary's.
//! - [`start`]: protocol-aware session start: replicas log in with their own credentials.
//!
//! # Contract for the I/O layer
//!
//! Time is any monotonic [`std::time::Instant`] passed in (tests simulate it).
//!
//! 1. **Accept.** For each new client connection call [`Manager::open`] (or
//!    [`Manager::open_with`] for a flow-specific [`SessionConfig`]). On `Err` reset the
//!    client; the refusal is already counted.
//! 2. **Actions.** After *every* call into a session, drain
//!    [`Session::poll_action`] until `None` and carry each out:
//!    - `Connect(side)`: start connecting to the primary / replica `n`.
//!    - `Close(side)`: all bytes for that side were handed to its socket; shut down its
//!      write half (FIN). Keep reading from it.
//!    - `Reset(side)`: abort that connection and release its socket.
//!    - `Detached { replica, reason }`: abort the replica's connection if still open,
//!      release it, log `reason` (the counter is kept here).
//!    - `ReplyCheck { replica, outcome }` (sessions with `verify_window_bytes`): the
//!      replica's answers stopped being verified, because they differed from the
//!      primary's ([`Session::reply_mismatch`] says where) or ran beyond the window.
//!      Nothing to carry out: record it.
//!    - `Spill { replica }` (sessions with `spill_budget_bytes`): the replica fell more
//!      than its memory budget behind and its backlog left memory: take it at once with
//!      [`Session::take_spill`] and append it to the replica's spool; if that fails,
//!      call [`Session::spill_failed`] (the replica is then detached).
//!    - `Finished`: always last. Release the session's remaining sockets (sockets that got
//!      `Close` may complete their orderly close in the TCP stack) and call
//!      [`Manager::remove`].
//! 3. **Connection events.** Handshake done → [`Session::on_connected`]; attempt failed →
//!    [`Session::on_refused`]; RST or fatal error on an established connection →
//!    [`Session::on_reset`] (the socket is gone; no `Reset` action will follow for it).
//! 4. **Reading.** For the client and the primary, read at most
//!    [`Session::receive_window`] bytes and pass them to [`Session::on_data`]; it returns
//!    how many it took (all of them when the window was respected). Bytes it did not take
//!    stay in the socket. When the window is 0 stop reading that side: for the client this
//!    happens only when the primary's queue is full (replicas never cause it). Read
//!    replicas unconditionally and pass everything to `on_data`; it is counted and
//!    dropped. Only after all bytes before a FIN were accepted, report the FIN with
//!    [`Session::on_fin`]. Because the TCP stack's own receive buffer is drained into the
//!    core only up to the window, keep that buffer modest; the core's budgets are the
//!    real queues.
//! 5. **Writing.** For each side with room in its socket: take
//!    `let buf = session.pending(side)`, write a prefix of it, report the written length
//!    with [`Session::on_sent`]; repeat while the socket takes everything and `pending` is
//!    non-empty (a slice ends at a storage chunk boundary). A replica with
//!    [`Session::spool_pending`] above 0 gets that many bytes from its spool first (its
//!    `pending` is empty meanwhile), reported with `on_sent` the same way. After `on_sent(Primary, ..)`
//!    the client's window may have reopened: resume reading the client.
//! 6. **Timers.** Sleep at most until [`Manager::poll_timeout`]; on wake call
//!    [`Manager::handle_timeout`] and drain the actions of the sessions it reports.
//!    Access sessions through [`Manager::session_mut`]: its guard keeps the timer heap
//!    up to date.
//!
//! # Example
//!
//! A client request relayed to a primary and one replica, with in-memory "sockets":
//!
//! ```
//! use std::time::Instant;
//! use ncp_replication::{Action, Manager, ManagerConfig, Side};
//!
//! let now = Instant::now();
//! let mut manager = Manager::new(ManagerConfig::default());
//! let id = manager.open(now).expect("admitted");
//! let mut s = manager.session_mut(id).expect("open");
//! assert_eq!(s.poll_action(), Some(Action::Connect(Side::Primary)));
//! assert_eq!(s.poll_action(), Some(Action::Connect(Side::Replica(0))));
//! s.on_connected(Side::Primary, now)?;
//! s.on_connected(Side::Replica(0), now)?;
//!
//! // The client's request is stored once and offered to both upstreams.
//! let request = b"GET / HTTP/1.0\r\n\r\n";
//! assert!(s.receive_window(Side::Client) >= request.len());
//! assert_eq!(s.on_data(Side::Client, request, now)?, request.len());
//! s.on_fin(Side::Client, now)?;
//! for side in [Side::Primary, Side::Replica(0)] {
//!     let out = s.pending(side).to_vec(); // a real I/O layer writes this to the socket
//!     assert_eq!(out, request);
//!     s.on_sent(side, out.len(), now)?;
//! }
//! assert_eq!(s.poll_action(), Some(Action::Close(Side::Primary)));
//! assert_eq!(s.poll_action(), Some(Action::Close(Side::Replica(0))));
//!
//! // Only the primary's answer reaches the client; the replica's is counted and dropped.
//! s.on_data(Side::Replica(0), b"HTTP/1.0 200 OK (replica)", now)?;
//! s.on_data(Side::Primary, b"HTTP/1.0 200 OK", now)?;
//! s.on_fin(Side::Primary, now)?;
//! assert_eq!(s.pending(Side::Client), b"HTTP/1.0 200 OK");
//! s.on_sent(Side::Client, 15, now)?;
//! assert_eq!(s.poll_action(), Some(Action::Close(Side::Client)));
//! assert_eq!(s.poll_action(), Some(Action::Finished));
//! drop(s);
//! manager.remove(id);
//! assert_eq!(manager.metrics().totals.primary_bytes_out, request.len() as u64);
//! # Ok::<(), ncp_replication::Error>(())
//! ```
//!
//! Calls with an invalid argument (unknown replica index, more bytes reported sent than
//! were pending, data after a FIN) return an [`Error`] and change nothing; events that no
//! longer apply (a late event for a side that is already gone) are ignored. Both are
//! counted in [`SessionStats::ignored_inputs`]. No input panics.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod buffer;
pub mod config;
pub mod manager;
pub mod metrics;
pub mod session;
pub mod start;
pub mod verify;

pub use config::{ConfigError, MAX_REPLICAS, SessionConfig};
pub use manager::{Manager, ManagerConfig, Refusal, SessionId, SessionMut};
pub use metrics::{DetachCounts, Metrics, SessionStats};
pub use session::{Action, DetachReason, Error, Session, Side};
pub use verify::{Mismatch, ReplyCheckOutcome};
