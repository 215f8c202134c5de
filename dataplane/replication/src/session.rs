//! The state machine of one replicated session: client, primary and N replicas.
//!
//! It owns no socket and reads no clock. The I/O layer reports what happened on each
//! connection (`on_*`), passes the current time in, sends what [`Session::pending`] gives
//! it, and carries out what [`Session::poll_action`] asks for. See the crate docs for the
//! step-by-step contract.
//!
//! Policy in one place:
//! - Client bytes go, in order and exactly once, to the primary and to every live replica.
//!   They are stored once ([`SharedBuffer`]), read by each destination at its own pace.
//! - The client is only ever held back by the primary: [`Session::receive_window`] for the
//!   client is the primary's free budget and nothing else. A replica that would fall more
//!   than its budget behind is detached instead.
//! - Client FIN: once every accepted client byte has been handed to an upstream, it gets
//!   a FIN. Primary FIN: once its bytes have been handed to the client, the client gets one.
//! - Client RST (or idle timeout): everything is reset at once.
//! - Primary refused/reset/connect timeout: the client is reset; replicas are *closed*
//!   (they get the bytes they are owed and a FIN), as at a normal end.
//! - When client and primary are both done, replicas still catching up get
//!   `drain_timeout` to finish; the rest are detached with [`DetachReason::DrainTimeout`].
//!   Replicas are never waited for beyond that, so a session always ends in bounded time.
//!   A session that verifies answers also waits, within the same `drain_timeout`, for
//!   each replica that has all its bytes to answer as much as the primary did (or to
//!   close): the tail of the answer is where missed last writes show. Running out of
//!   time there only ends the comparison; it is no detach.
//! - Spilling (`spill_budget_bytes` above 0): a replica that would fall more than its
//!   budget behind is not detached; its whole in-memory backlog is moved to its on-disk
//!   spool instead ([`Action::Spill`], [`Session::take_spill`]), freeing the memory. It is
//!   then fed from the spool ([`Session::replica_spooled`]) before any newer byte in
//!   memory, so it still gets the stream in order. Only when the spool would grow beyond
//!   `spill_budget_bytes` since it was last empty, or the I/O layer cannot write it
//!   ([`Session::spill_failed`]), is the replica detached, with
//!   [`DetachReason::SpillBudgetExceeded`]. The client is never held back either way.
//! - Protocol-aware start ([`crate::start`], sessions with `start`): the client's
//!   start-up goes to the primary only; each replica first logs in with its own
//!   credentials and takes the client's stream from the end of that start-up on. A
//!   replica whose login fails is detached with [`DetachReason::LoginFailed`].
//! - Replicas' answers are never sent anywhere. With `verify_window_bytes` set they are
//!   compared with the primary's ([`crate::verify`]); a mismatch or an overrun window is
//!   reported once per replica as [`Action::ReplyCheck`], and changes nothing else.

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use crate::buffer::SharedBuffer;
use crate::config::{ConfigError, SessionConfig};
use crate::metrics::SessionStats;
use crate::start::{
    LoginError, PrimaryStep, ReplicaCredentials, ReplicaLogin, StartDialect, StartSpec,
};
use crate::verify::{Mismatch, ReplyCheckOutcome, ReplyVerifier};

/// One of the connections of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The redirected client connection, terminated by the middlebox.
    Client,
    /// The middlebox's connection to the real server; its answers go back to the client.
    Primary,
    /// The middlebox's connection to replica number `n` (`0..replica_count`); its answers
    /// are read, compared with the primary's if the session verifies them, and dropped.
    Replica(u16),
}

/// Why a replica was cut loose from a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetachReason {
    /// Its connection attempt failed.
    Refused,
    /// Its established connection was reset or died.
    Died,
    /// It fell more than `replica_budget_bytes` behind the client stream.
    Lagged,
    /// It did not connect within `connect_timeout`.
    ConnectTimeout,
    /// It had not caught up when the drain period after the session's end ran out.
    DrainTimeout,
    /// Its spool would have grown beyond `spill_budget_bytes`, or could not be written.
    SpillBudgetExceeded,
    /// Its own login ([`crate::start`]) failed or did not finish in time, or the client's
    /// start-up could not be followed ([`Session::login_error`] says why).
    LoginFailed,
}

/// Something the I/O layer must do. Per side and session there is at most one `Connect`,
/// one `Close`, one `Reset` or `Detached`, one `ReplyCheck` and one `Spill` not yet taken
/// (plus one `Finished`), so the queue is bounded by the number of sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open the connection to this upstream (primary or replica). Emitted at creation.
    Connect(Side),
    /// Everything for this side has been handed to its socket: send a FIN (shut down the
    /// write half). Keep reading from it if the session is still running. If the session
    /// is aborted later, a `Reset` of the same side may follow.
    Close(Side),
    /// Abort this connection (RST) and release its socket.
    Reset(Side),
    /// This replica is no longer part of the session: abort its connection if it is still
    /// open, release its socket, log the reason.
    Detached {
        /// Replica index.
        replica: u16,
        /// Why.
        reason: DetachReason,
    },
    /// Reply verification of this replica ended early in this session: its answer
    /// differed from the primary's ([`Session::reply_mismatch`] says where) or the
    /// verification window was exceeded. Nothing to carry out; record and log it.
    ReplyCheck {
        /// Replica index.
        replica: u16,
        /// How it ended.
        outcome: ReplyCheckOutcome,
    },
    /// Bytes of this replica's stream were moved out of memory: take them with
    /// [`Session::take_spill`] at once and append them to the replica's spool, then feed
    /// the replica from the spool while [`Session::replica_spooled`] is above 0 (and
    /// report those writes with `on_sent` as usual). If the spool cannot take them, call
    /// [`Session::spill_failed`].
    Spill {
        /// Replica index.
        replica: u16,
    },
    /// The session is over; nothing more will be asked. Release every remaining socket
    /// (those that got `Close` may finish their orderly close in the TCP stack) and remove
    /// the session from its manager. Always the last action.
    Finished,
}

/// A call the session could not apply. The session state is unchanged and the call is
/// counted in [`SessionStats::ignored_inputs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Replica index not below `replica_count`.
    UnknownReplica(u16),
    /// The event does not exist for this side (e.g. `on_connected(Client)`).
    NotApplicable(Side),
    /// Data reported after that side's FIN.
    DataAfterFin(Side),
    /// Data reported from an upstream that was never reported connected.
    NotConnected(Side),
    /// `on_sent` reported more bytes than were pending for that side.
    SentTooMuch {
        /// The side.
        side: Side,
        /// Bytes reported.
        sent: usize,
        /// Bytes that were pending.
        pending: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownReplica(i) => write!(f, "no replica with index {i} in this session"),
            Self::NotApplicable(s) => write!(f, "event does not apply to {s:?}"),
            Self::DataAfterFin(s) => write!(f, "data from {s:?} after its FIN"),
            Self::NotConnected(s) => write!(f, "data from {s:?} before it connected"),
            Self::SentTooMuch {
                side,
                sent,
                pending,
            } => write!(
                f,
                "{sent} bytes reported sent to {side:?}, only {pending} pending"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Life of an upstream connection as the core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connecting,
    Open,
    /// Our FIN was requested; for a replica this is the successful end.
    FinSent,
    /// Failed, detached or reset: the core no longer uses it.
    Gone,
}

impl Link {
    fn is_live(self) -> bool {
        matches!(self, Self::Connecting | Self::Open)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Client and/or primary still running.
    Open,
    /// Client and primary done; replicas catching up until the deadline (if any).
    Draining(Option<Instant>),
    /// `Action::Finished` queued.
    Finished,
}

/// A replica's on-disk spool as the core accounts for it; the bytes themselves are the
/// I/O layer's.
#[derive(Debug, Default)]
struct Spool {
    /// Stream bytes on the spool (or on their way there) not yet handed to the replica:
    /// they come before every byte the replica still has in memory.
    unread: u64,
    /// Bytes appended since the spool was last empty: what it occupies on disk.
    used: u64,
    /// Spilled bytes the I/O layer has not taken yet.
    outbox: Vec<u8>,
}

/// Index of the primary's reader in the upstream buffer; replica `i` reads as `i + 1`.
const PRIMARY_READER: usize = 0;
/// Index of the client's reader in the downstream buffer.
const CLIENT_READER: usize = 0;

/// One replicated client connection. See the module docs for the policy.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    last_activity: Instant,
    /// When upstreams still connecting give up (`None` if it overflowed `Instant`).
    connect_deadline: Option<Instant>,
    /// Client → primary and replicas.
    upstream: SharedBuffer,
    /// Primary → client.
    downstream: SharedBuffer,
    /// Client sent FIN.
    client_eof: bool,
    /// Our FIN to the client was requested.
    client_fin_sent: bool,
    /// The client connection is reset (by it or by us): nothing more flows to or from it.
    client_gone: bool,
    primary: Link,
    /// Primary sent FIN.
    primary_eof: bool,
    replicas: Vec<Link>,
    /// Per replica (empty unless the session spills).
    spools: Vec<Spool>,
    actions: VecDeque<Action>,
    stats: SessionStats,
    /// Replicas' answers compared with the primary's (`None`: the service does not verify).
    verify: Option<ReplyVerifier>,
    /// The protocol-aware start (`None`: every byte goes to everyone from the first).
    start: Option<Start>,
}

/// A session's protocol-aware start: the client's start-up, the primary's answers to
/// it, and each replica's own login.
#[derive(Debug)]
struct Start {
    spec: StartSpec,
    dialect: Box<dyn StartDialect>,
    /// The client's start-up has ended (or could not be followed): its bytes go to
    /// everyone now.
    client_ended: bool,
    /// The primary's start-up answers have ended: its answers are verified from here.
    primary_ended: bool,
    legs: Vec<Leg>,
    /// Per replica, why its login failed.
    errors: Vec<Option<String>>,
}

/// Where one replica's login stands.
#[derive(Debug)]
enum Leg {
    /// Not connected yet, or the client has not said enough to log in for it.
    Waiting,
    /// The middlebox is logging in: `out` is what it still has to send.
    LoggingIn {
        login: Box<dyn ReplicaLogin>,
        out: Vec<u8>,
        /// Past this, the replica is detached.
        deadline: Option<Instant>,
    },
    /// Logged in: it takes the client's stream.
    Ready,
}

impl Session {
    /// Starts a session for a client connection that was just accepted. The first actions
    /// ask to connect the primary and every replica.
    pub fn new(config: SessionConfig, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let n = config.replica_count;
        let mut actions = VecDeque::with_capacity(usize::from(n) + 2);
        actions.push_back(Action::Connect(Side::Primary));
        actions.extend((0..n).map(|i| Action::Connect(Side::Replica(i))));
        Ok(Self {
            connect_deadline: now.checked_add(config.connect_timeout),
            phase: Phase::Open,
            last_activity: now,
            upstream: SharedBuffer::new(1 + usize::from(n)),
            downstream: SharedBuffer::new(1),
            client_eof: false,
            client_fin_sent: false,
            client_gone: false,
            primary: Link::Connecting,
            primary_eof: false,
            replicas: vec![Link::Connecting; usize::from(n)],
            spools: if config.spills() {
                (0..n).map(|_| Spool::default()).collect()
            } else {
                Vec::new()
            },
            actions,
            stats: SessionStats::with_replicas(n),
            verify: config
                .verifies_replies()
                .then(|| ReplyVerifier::new(n, config.verify_window_bytes)),
            start: config.start.clone().filter(|_| n > 0).map(|spec| Start {
                dialect: spec.protocol.dialect(),
                client_ended: false,
                primary_ended: false,
                legs: (0..n).map(|_| Leg::Waiting).collect(),
                errors: vec![None; usize::from(n)],
                spec,
            }),
            config,
        })
    }

    /// The configuration the session runs with.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Next thing the I/O layer must do, in order. Drain after every input.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// `true` once `Action::Finished` has been queued.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Counters of this session.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Bytes the replica still has to receive (in memory and on its spool), `None` if
    /// the index is unknown or the replica is detached or done.
    pub fn replica_lag(&self, replica: u16) -> Option<u64> {
        let memory = self.upstream.lag(usize::from(replica) + 1)?;
        Some(memory + self.replica_spooled(replica))
    }

    /// Bytes of the replica's stream on its spool not yet handed to it. While above 0,
    /// [`Session::pending`] gives the replica nothing: feed it this many bytes from the
    /// spool first, in order, and report them with [`Session::on_sent`].
    pub fn replica_spooled(&self, replica: u16) -> u64 {
        self.spools
            .get(usize::from(replica))
            .map_or(0, |s| s.unread)
    }

    /// Of [`Session::replica_spooled`], what may be handed to the replica's socket now:
    /// all of it once its connection is open, nothing while it is still connecting.
    pub fn spool_pending(&self, replica: u16) -> u64 {
        if self.replicas.get(usize::from(replica)) == Some(&Link::Open)
            && self.replica_ready(replica)
        {
            self.replica_spooled(replica)
        } else {
            0
        }
    }

    /// The bytes announced by [`Action::Spill`], to append to the replica's spool (empty
    /// if there are none). They count as spooled from the moment they were spilled.
    pub fn take_spill(&mut self, replica: u16) -> Vec<u8> {
        self.spools
            .get_mut(usize::from(replica))
            .map(|s| std::mem::take(&mut s.outbox))
            .unwrap_or_default()
    }

    /// The I/O layer could not append to the replica's spool (disk full or slow, write
    /// error): the replica missed those bytes and is detached with
    /// [`DetachReason::SpillBudgetExceeded`].
    pub fn spill_failed(&mut self, replica: u16, now: Instant) -> Result<(), Error> {
        self.check_side(Side::Replica(replica))?;
        if self
            .replicas
            .get(usize::from(replica))
            .is_some_and(|l| l.is_live())
        {
            self.detach(replica, DetachReason::SpillBudgetExceeded);
        } else {
            self.stats.ignored_inputs += 1;
        }
        self.progress(now);
        Ok(())
    }

    /// Whether the replica is still part of the session (connecting or receiving).
    pub fn replica_is_live(&self, replica: u16) -> bool {
        self.replicas
            .get(usize::from(replica))
            .is_some_and(|l| l.is_live())
    }

    /// Why the replica was detached with [`DetachReason::LoginFailed`], in this session.
    pub fn login_error(&self, replica: u16) -> Option<&str> {
        self.start
            .as_ref()?
            .errors
            .get(usize::from(replica))?
            .as_deref()
    }

    /// Whether the replica takes the client's stream: always, unless the session runs a
    /// protocol-aware start and the replica is not logged in yet.
    fn replica_ready(&self, replica: u16) -> bool {
        self.start
            .as_ref()
            .is_none_or(|s| matches!(s.legs.get(usize::from(replica)), Some(Leg::Ready)))
    }

    /// Where the replica's answer first differed from the primary's in this session, if
    /// it did (reported by [`Action::ReplyCheck`]).
    pub fn reply_mismatch(&self, replica: u16) -> Option<&Mismatch> {
        self.verify.as_ref()?.mismatch(replica)
    }

    /// Bytes of the replica's answer found equal to the primary's so far (0 when the
    /// session does not verify).
    pub fn reply_bytes_compared(&self, replica: u16) -> u64 {
        self.verify
            .as_ref()
            .map_or(0, |v| v.bytes_compared(replica))
    }

    /// Bytes currently held for destinations that have not taken them yet.
    pub fn buffered_bytes(&self) -> u64 {
        self.upstream.buffered() + self.downstream.buffered()
    }

    /// Chunk memory currently held; never above `config().max_memory()`.
    pub fn allocated_bytes(&self) -> u64 {
        self.upstream.allocated() + self.downstream.allocated()
    }

    /// When [`Session::handle_timeout`] must be called next (`None`: no timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let connecting =
            self.primary == Link::Connecting || self.replicas.contains(&Link::Connecting);
        let connect = self.connect_deadline.filter(|_| connecting);
        let login = self.start.as_ref().and_then(|s| {
            s.legs
                .iter()
                .filter_map(|l| match l {
                    Leg::LoggingIn { deadline, .. } => *deadline,
                    _ => None,
                })
                .min()
        });
        let connect = match (connect, login) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let other = match self.phase {
            Phase::Open => self.last_activity.checked_add(self.config.idle_timeout),
            Phase::Draining(until) => until,
            Phase::Finished => return None,
        };
        match (connect, other) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How many bytes the core accepts from `side` right now; read at most that much
    /// from its socket before calling [`Session::on_data`].
    ///
    /// - Client: the primary's free budget (0 when the primary's queue is full, after the
    ///   client's FIN, or once the session is ending). Replicas never shrink it.
    /// - Primary: the free response budget toward the client.
    /// - Replica: unbounded (`usize::MAX`): their answers are always read (and dropped).
    pub fn receive_window(&self, side: Side) -> usize {
        if self.phase != Phase::Open {
            return match side {
                Side::Replica(i) if usize::from(i) < self.replicas.len() => usize::MAX,
                _ => 0,
            };
        }
        match side {
            Side::Client => {
                if self.client_eof || self.client_gone || self.primary == Link::Gone {
                    return 0;
                }
                let used = self.upstream.lag(PRIMARY_READER).unwrap_or(0);
                to_usize(self.config.primary_budget_bytes.saturating_sub(used))
            }
            Side::Primary => {
                if self.primary_eof
                    || self.client_gone
                    || !matches!(self.primary, Link::Open | Link::FinSent)
                {
                    return 0;
                }
                let used = self.downstream.lag(CLIENT_READER).unwrap_or(0);
                to_usize(self.config.response_budget_bytes.saturating_sub(used))
            }
            Side::Replica(i) if usize::from(i) < self.replicas.len() => usize::MAX,
            Side::Replica(_) => 0,
        }
    }

    /// The next contiguous bytes to hand to `side`'s socket (empty: nothing to send now).
    /// Report what the socket took with [`Session::on_sent`], then ask again: a slice ends
    /// at a storage chunk boundary, not necessarily at the end of the data.
    pub fn pending(&self, side: Side) -> &[u8] {
        match side {
            Side::Client if !self.client_gone && !self.client_fin_sent => {
                self.downstream.readable(CLIENT_READER)
            }
            Side::Primary if self.primary == Link::Open => self.upstream.readable(PRIMARY_READER),
            Side::Replica(i) if self.replicas.get(usize::from(i)) == Some(&Link::Open) => {
                match self.start.as_ref().and_then(|s| s.legs.get(usize::from(i))) {
                    Some(Leg::LoggingIn { out, .. }) => out,
                    Some(Leg::Waiting) => &[],
                    _ if self.replica_spooled(i) == 0 => self.upstream.readable(usize::from(i) + 1),
                    _ => &[],
                }
            }
            _ => &[],
        }
    }

    /// The upstream `side` finished its connection handshake.
    pub fn on_connected(&mut self, side: Side, now: Instant) -> Result<(), Error> {
        let link = self.link_mut(side)?;
        if *link == Link::Connecting {
            *link = Link::Open;
            if side == Side::Primary {
                self.last_activity = now;
            }
        } else {
            self.stats.ignored_inputs += 1;
        }
        self.progress(now);
        Ok(())
    }

    /// The connection attempt to upstream `side` failed (RST to the SYN, unreachable...).
    /// Same handling as [`Session::on_reset`]; the client never "refuses".
    pub fn on_refused(&mut self, side: Side, now: Instant) -> Result<(), Error> {
        if side == Side::Client {
            return self.reject(Error::NotApplicable(side));
        }
        self.on_reset(side, now)
    }

    /// `side`'s connection was reset or died (its socket is gone: do not expect a `Reset`
    /// action for it). Client: everything is aborted. Primary: the client is reset and the
    /// replicas are closed. Replica: it is detached.
    pub fn on_reset(&mut self, side: Side, now: Instant) -> Result<(), Error> {
        self.check_side(side)?;
        if self.phase == Phase::Finished {
            self.stats.ignored_inputs += 1;
            return Ok(());
        }
        match side {
            Side::Client => {
                if self.client_gone || self.phase != Phase::Open {
                    self.stats.ignored_inputs += 1;
                } else {
                    self.client_gone = true;
                    self.stats.client_resets += 1;
                    self.abort_all(false);
                }
            }
            Side::Primary => {
                if self.primary == Link::Gone || self.phase != Phase::Open {
                    self.stats.ignored_inputs += 1;
                } else {
                    self.primary_failed(false);
                }
            }
            Side::Replica(i) => match self.replicas.get(usize::from(i)) {
                Some(Link::Connecting) => self.detach(i, DetachReason::Refused),
                Some(Link::Open) => self.detach(i, DetachReason::Died),
                Some(Link::FinSent) => {
                    // It had everything; only its answer is cut short.
                    if let Some(v) = &mut self.verify {
                        v.stop(i);
                    }
                    self.stats.ignored_inputs += 1;
                }
                _ => self.stats.ignored_inputs += 1,
            },
        }
        self.progress(now);
        Ok(())
    }

    /// `side` sent a FIN. Report it only after every byte before it was accepted by
    /// [`Session::on_data`] (the window may force you to hold data back first).
    pub fn on_fin(&mut self, side: Side, now: Instant) -> Result<(), Error> {
        self.check_side(side)?;
        match side {
            Side::Client if !self.client_eof && !self.client_gone => {
                self.client_eof = true;
                self.last_activity = now;
            }
            Side::Primary
                if !self.primary_eof && matches!(self.primary, Link::Open | Link::FinSent) =>
            {
                self.primary_eof = true;
                self.last_activity = now;
                if let Some(v) = &mut self.verify {
                    let actions = &mut self.actions;
                    v.on_primary_end(|replica, outcome| {
                        actions.push_back(Action::ReplyCheck { replica, outcome });
                    });
                }
            }
            // A replica closing its sending half changes nothing on the way to it (it
            // may still receive), but its answer is over: nothing more to compare.
            Side::Replica(i) => {
                if let Some(v) = &mut self.verify {
                    v.stop(i);
                }
            }
            _ => self.stats.ignored_inputs += 1,
        }
        self.progress(now);
        Ok(())
    }

    /// Bytes read from `side`. Returns how many were accepted (a prefix of `data`); keep
    /// the rest in the socket and offer it again once the window reopens.
    ///
    /// Client and primary bytes are accepted up to [`Session::receive_window`]; replica
    /// bytes are always accepted in full, compared if the session verifies, and dropped.
    pub fn on_data(&mut self, side: Side, data: &[u8], now: Instant) -> Result<usize, Error> {
        self.check_side(side)?;
        let accepted = match side {
            Side::Client => {
                if self.client_eof {
                    return self.reject(Error::DataAfterFin(side));
                }
                let n = data.len().min(self.receive_window(side));
                if n > 0 {
                    self.push_client(&data[..n]);
                    self.last_activity = now;
                } else if !data.is_empty() && self.phase != Phase::Open {
                    self.stats.ignored_inputs += 1;
                }
                n
            }
            Side::Primary => {
                if self.primary_eof {
                    return self.reject(Error::DataAfterFin(side));
                }
                if self.primary == Link::Connecting {
                    return self.reject(Error::NotConnected(side));
                }
                let n = data.len().min(self.receive_window(side));
                if n > 0 {
                    self.downstream.push(&data[..n]);
                    self.stats.primary_bytes_in += n as u64;
                    self.last_activity = now;
                    let compared = self.primary_comparable(&data[..n]);
                    if let Some(v) = &mut self.verify {
                        let actions = &mut self.actions;
                        v.on_primary(&data[compared..n], |replica, outcome| {
                            actions.push_back(Action::ReplyCheck { replica, outcome });
                        });
                    }
                }
                n
            }
            Side::Replica(i) => {
                self.stats.replica_bytes_dropped += data.len() as u64;
                if !self.replica_ready(i) {
                    self.on_login_reply(i, data, now);
                    self.progress(now);
                    return Ok(data.len());
                }
                // After `Finished` nothing more is reported.
                if let Some(v) = self
                    .verify
                    .as_mut()
                    .filter(|_| self.phase != Phase::Finished)
                {
                    let actions = &mut self.actions;
                    v.on_replica(i, data, |replica, outcome| {
                        actions.push_back(Action::ReplyCheck { replica, outcome });
                    });
                }
                data.len()
            }
        };
        self.progress(now);
        Ok(accepted)
    }

    /// The I/O layer handed `n` bytes of [`Session::pending`]`(side)` to `side`'s socket.
    pub fn on_sent(&mut self, side: Side, n: usize, now: Instant) -> Result<(), Error> {
        self.check_side(side)?;
        if n == 0 {
            return Ok(());
        }
        if let Side::Replica(i) = side
            && let Some(Leg::LoggingIn { out, .. }) = self
                .start
                .as_mut()
                .and_then(|s| s.legs.get_mut(usize::from(i)))
        {
            if n > out.len() {
                let pending = out.len() as u64;
                return self.reject(Error::SentTooMuch {
                    side,
                    sent: n,
                    pending,
                });
            }
            out.drain(..n);
            return Ok(());
        }
        if let Side::Replica(i) = side
            && self.replica_spooled(i) > 0
        {
            return self.on_sent_from_spool(i, n, now);
        }
        let (buf, reader) = match side {
            Side::Client => (&mut self.downstream, CLIENT_READER),
            Side::Primary => (&mut self.upstream, PRIMARY_READER),
            Side::Replica(i) => (&mut self.upstream, usize::from(i) + 1),
        };
        let Some(lag) = buf.lag(reader) else {
            // Late report for a side that was detached or is done: harmless.
            self.stats.ignored_inputs += 1;
            return Ok(());
        };
        if !buf.consume(reader, n as u64) {
            return self.reject(Error::SentTooMuch {
                side,
                sent: n,
                pending: lag,
            });
        }
        match side {
            Side::Client => {
                self.stats.client_bytes_out += n as u64;
                self.last_activity = now;
            }
            Side::Primary => {
                self.stats.primary_bytes_out += n as u64;
                self.last_activity = now;
            }
            Side::Replica(i) => {
                if let Some(c) = self.stats.replica_bytes_out.get_mut(usize::from(i)) {
                    *c += n as u64;
                }
            }
        }
        self.progress(now);
        Ok(())
    }

    /// `n` bytes from the replica's spool were handed to its socket.
    fn on_sent_from_spool(&mut self, i: u16, n: usize, now: Instant) -> Result<(), Error> {
        let slot = usize::from(i);
        if self.replicas.get(slot) != Some(&Link::Open) {
            return self.reject(Error::NotConnected(Side::Replica(i)));
        }
        let Some(spool) = self.spools.get_mut(slot) else {
            return self.reject(Error::UnknownReplica(i));
        };
        if n as u64 > spool.unread {
            let pending = spool.unread;
            return self.reject(Error::SentTooMuch {
                side: Side::Replica(i),
                sent: n,
                pending,
            });
        }
        spool.unread -= n as u64;
        if spool.unread == 0 {
            // Empty: the I/O layer starts a new spool next time, so the disk it used is
            // free again.
            spool.used = 0;
        }
        for counter in [
            &mut self.stats.replica_bytes_out,
            &mut self.stats.replica_bytes_replayed,
        ] {
            if let Some(c) = counter.get_mut(slot) {
                *c += n as u64;
            }
        }
        self.progress(now);
        Ok(())
    }

    /// Fires every timer due at `now`: connect timeouts, idle timeout, end of drain.
    /// Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Finished {
            return;
        }
        if self.connect_deadline.is_some_and(|d| d <= now) {
            if self.primary == Link::Connecting {
                self.primary_failed(true);
            }
            for i in 0..self.replica_count() {
                if self.replicas.get(usize::from(i)) == Some(&Link::Connecting) {
                    self.detach(i, DetachReason::ConnectTimeout);
                }
            }
        }
        let late: Vec<u16> = self.start.as_ref().map_or_else(Vec::new, |s| {
            (0u16..)
                .zip(&s.legs)
                .filter(|(_, l)| matches!(l, Leg::LoggingIn { deadline: Some(d), .. } if *d <= now))
                .map(|(i, _)| i)
                .collect()
        });
        for i in late {
            self.login_failed(i, "it did not finish its login in time".to_owned());
        }
        match self.phase {
            // A primary that just timed out has already ended the session's main part;
            // its replicas drain instead of being reset.
            Phase::Open if !self.client_gone => {
                let idle_at = self.last_activity.checked_add(self.config.idle_timeout);
                if idle_at.is_some_and(|d| d <= now) {
                    self.stats.idle_timeouts += 1;
                    self.abort_all(true);
                }
            }
            Phase::Draining(Some(until)) if until <= now => {
                for i in 0..self.replica_count() {
                    if self
                        .replicas
                        .get(usize::from(i))
                        .is_some_and(|l| l.is_live())
                    {
                        self.detach(i, DetachReason::DrainTimeout);
                    }
                }
                // Answers still awaited are not compared any further.
                if let Some(v) = &mut self.verify {
                    (0..self.config.replica_count).for_each(|i| v.stop(i));
                }
            }
            _ => {}
        }
        self.progress(now);
    }

    fn replica_count(&self) -> u16 {
        self.config.replica_count
    }

    fn check_side(&mut self, side: Side) -> Result<(), Error> {
        match side {
            Side::Replica(i) if i >= self.replica_count() => {
                self.stats.ignored_inputs += 1;
                Err(Error::UnknownReplica(i))
            }
            _ => Ok(()),
        }
    }

    fn reject<T>(&mut self, e: Error) -> Result<T, Error> {
        self.stats.ignored_inputs += 1;
        Err(e)
    }

    fn link_mut(&mut self, side: Side) -> Result<&mut Link, Error> {
        self.check_side(side)?;
        match side {
            Side::Client => self.reject(Error::NotApplicable(side)),
            Side::Primary => Ok(&mut self.primary),
            Side::Replica(i) => match self.replicas.get_mut(usize::from(i)) {
                Some(l) => Ok(l),
                None => Err(Error::UnknownReplica(i)),
            },
        }
    }

    /// Accepted client bytes: while a protocol-aware start follows the client's start-up,
    /// its bytes go to the primary only (and the middlebox's own answers to the client);
    /// everything else is stored for all upstreams.
    fn push_client(&mut self, data: &[u8]) {
        let Some(start) = self.start.as_mut().filter(|s| !s.client_ended) else {
            self.push_upstream(data);
            return;
        };
        let step = start.dialect.on_client(data);
        if step.ended_at.is_some() || step.refused.is_some() {
            start.client_ended = true;
        }
        if !step.reply.is_empty() && !self.client_gone && !self.client_fin_sent {
            self.downstream.push(&step.reply);
        }
        if !step.startup.is_empty() {
            // Stored once for the primary's reader; every replica's reader skips them.
            self.upstream.push(&step.startup);
            self.stats.client_bytes_in += step.startup.len() as u64;
            for i in 0..self.replica_count() {
                self.upstream
                    .consume(usize::from(i) + 1, step.startup.len() as u64);
            }
        }
        if let Some(error) = step.refused {
            for i in 0..self.replica_count() {
                self.login_failed(i, error.to_string());
            }
        }
        if !step.held_after.is_empty() {
            self.push_upstream(&step.held_after);
        }
        if let Some(at) = step.ended_at
            && let Some(rest) = data.get(at..).filter(|r| !r.is_empty())
        {
            self.push_upstream(rest);
        }
    }

    /// Where in these primary bytes verification may start: after the primary's answers
    /// to the client's start-up, which carry per-server values.
    fn primary_comparable(&mut self, data: &[u8]) -> usize {
        let Some(start) = self.start.as_mut().filter(|s| !s.primary_ended) else {
            return 0;
        };
        match start.dialect.on_primary(data) {
            PrimaryStep::StartingUp => data.len(),
            PrimaryStep::Ended(at) => {
                start.primary_ended = true;
                at.min(data.len())
            }
            PrimaryStep::NotComparable => {
                start.primary_ended = true;
                if let Some(v) = &mut self.verify {
                    (0..self.config.replica_count).for_each(|i| v.stop(i));
                }
                data.len()
            }
            PrimaryStep::Refused => {
                start.primary_ended = true;
                for i in 0..self.replica_count() {
                    self.login_failed(i, "the primary refused the client's login".to_owned());
                }
                data.len()
            }
        }
    }

    /// Begins the login of every connected replica the client's start-up allows for.
    fn start_logins(&mut self, now: Instant) {
        let Some(start) = self.start.as_mut() else {
            return;
        };
        let mut failed = Vec::new();
        // Borrowed, not cloned: this runs after every input while a leg waits.
        let none = ReplicaCredentials::default();
        for (i, leg) in (0u16..).zip(start.legs.iter_mut()) {
            if !matches!(leg, Leg::Waiting)
                || self.replicas.get(usize::from(i)) != Some(&Link::Open)
            {
                continue;
            }
            let credentials = start.spec.replicas.get(usize::from(i)).unwrap_or(&none);
            match start.dialect.replica_login(credentials) {
                None => {}
                Some(Ok(mut login)) if login.logged_in() => {
                    login.take_output();
                    *leg = Leg::Ready;
                }
                Some(Ok(mut login)) => {
                    *leg = Leg::LoggingIn {
                        out: login.take_output(),
                        login,
                        deadline: now.checked_add(self.config.connect_timeout),
                    };
                }
                Some(Err(e)) => failed.push((i, e)),
            }
        }
        for (i, e) in failed {
            self.login_failed(i, e.to_string());
        }
    }

    /// A replica's answer during its login.
    fn on_login_reply(&mut self, i: u16, data: &[u8], now: Instant) {
        let live = self.replica_is_live(i);
        let leg = self
            .start
            .as_mut()
            .and_then(|s| s.legs.get_mut(usize::from(i)));
        let result = match leg {
            Some(Leg::LoggingIn { login, out, .. }) => login.on_reply(data).map(|()| {
                out.extend(login.take_output());
                login.logged_in()
            }),
            Some(Leg::Waiting) if live => Err(LoginError::Failed(
                "the replica spoke before its login began".into(),
            )),
            _ => return,
        };
        match result {
            Ok(true) => {
                if let Some(leg) = self
                    .start
                    .as_mut()
                    .and_then(|s| s.legs.get_mut(usize::from(i)))
                {
                    *leg = Leg::Ready;
                }
                self.last_activity = self.last_activity.max(now);
            }
            Ok(false) => {}
            Err(e) => self.login_failed(i, e.to_string()),
        }
    }

    /// Detaches a live replica whose login failed, keeping the reason for the logs.
    fn login_failed(&mut self, i: u16, why: String) {
        if !self.replica_is_live(i) {
            return;
        }
        if let Some(start) = self.start.as_mut() {
            if let Some(slot) = start.errors.get_mut(usize::from(i)) {
                *slot = Some(why);
            }
            if let Some(leg) = start.legs.get_mut(usize::from(i)) {
                *leg = Leg::Waiting;
            }
        }
        self.detach(i, DetachReason::LoginFailed);
    }

    /// Stores accepted client bytes. Replicas that these bytes would push past their
    /// budget either spill their backlog (with these bytes) to their spool, when the
    /// session spills and the spool has room, or are detached first, so memory never
    /// exceeds `config.max_memory()` and the client is never held back for them.
    fn push_upstream(&mut self, data: &[u8]) {
        let n = data.len() as u64;
        // Bit `i`: replica `i` spills once the bytes are stored (at most 64 replicas).
        let mut spilling = 0u64;
        for i in 0..self.replica_count() {
            let Some(lag) = self.upstream.lag(usize::from(i) + 1) else {
                continue;
            };
            let live = self
                .replicas
                .get(usize::from(i))
                .is_some_and(|l| l.is_live());
            if !live || lag + n <= self.config.replica_budget_bytes {
                continue;
            }
            match self.spools.get(usize::from(i)) {
                Some(spool) if spool.used + lag + n <= self.config.spill_budget_bytes => {
                    spilling |= 1 << i;
                }
                Some(_) => self.detach(i, DetachReason::SpillBudgetExceeded),
                None => self.detach(i, DetachReason::Lagged),
            }
        }
        self.upstream.push(data);
        self.stats.client_bytes_in += n;
        for i in (0..self.replica_count()).filter(|i| spilling & (1 << i) != 0) {
            self.spill(i);
        }
    }

    /// Moves replica `i`'s whole in-memory backlog to its spool's outbox and asks the I/O
    /// layer to take it.
    fn spill(&mut self, i: u16) {
        let reader = usize::from(i) + 1;
        let Some(spool) = self.spools.get_mut(usize::from(i)) else {
            return;
        };
        let announce = spool.outbox.is_empty();
        let mut moved = 0u64;
        loop {
            let slice = self.upstream.readable(reader);
            if slice.is_empty() {
                break;
            }
            spool.outbox.extend_from_slice(slice);
            let len = slice.len() as u64;
            if !self.upstream.consume(reader, len) {
                break;
            }
            moved += len;
        }
        spool.unread += moved;
        spool.used += moved;
        if let Some(c) = self.stats.replica_bytes_spilled.get_mut(usize::from(i)) {
            *c += moved;
        }
        if announce && moved > 0 {
            self.actions.push_back(Action::Spill { replica: i });
        }
    }

    fn detach(&mut self, i: u16, reason: DetachReason) {
        if let Some(l) = self.replicas.get_mut(usize::from(i)) {
            *l = Link::Gone;
        }
        self.upstream.detach(usize::from(i) + 1);
        if let Some(spool) = self.spools.get_mut(usize::from(i)) {
            *spool = Spool::default();
        }
        if let Some(v) = &mut self.verify {
            v.stop(i);
        }
        self.stats.detached.record(reason);
        self.actions
            .push_back(Action::Detached { replica: i, reason });
    }

    /// Primary refused, reset, or timed out connecting: the client cannot be served, so it
    /// is reset. No more client bytes will come, so replicas are closed once they have
    /// what was accepted.
    fn primary_failed(&mut self, abort_primary: bool) {
        if abort_primary {
            self.actions.push_back(Action::Reset(Side::Primary));
        }
        self.primary = Link::Gone;
        self.upstream.detach(PRIMARY_READER);
        self.stats.primary_failures += 1;
        if !self.client_gone {
            self.client_gone = true;
            self.actions.push_back(Action::Reset(Side::Client));
        }
        self.downstream.detach_all();
    }

    /// Resets everything still open: client reset (the client's own RST when
    /// `reset_client` is false) or idle timeout.
    fn abort_all(&mut self, reset_client: bool) {
        if reset_client && !self.client_gone {
            self.actions.push_back(Action::Reset(Side::Client));
        }
        self.client_gone = true;
        if self.primary != Link::Gone {
            self.primary = Link::Gone;
            self.actions.push_back(Action::Reset(Side::Primary));
        }
        for (i, l) in (0u16..).zip(self.replicas.iter_mut()) {
            if l.is_live() {
                *l = Link::Gone;
                self.actions.push_back(Action::Reset(Side::Replica(i)));
            }
        }
        self.finish();
    }

    /// Whether a replica that has all its bytes still owes answers to compare.
    fn awaits_answers(&self) -> bool {
        let Some(v) = &self.verify else {
            return false;
        };
        (0u16..)
            .zip(&self.replicas)
            .any(|(i, l)| *l == Link::FinSent && v.is_behind(i))
    }

    fn finish(&mut self) {
        self.spools.iter_mut().for_each(|s| *s = Spool::default());
        self.upstream.detach_all();
        self.downstream.detach_all();
        self.phase = Phase::Finished;
        self.actions.push_back(Action::Finished);
    }

    /// Derives FINs and the end of the session from the current state. Called after
    /// every input.
    fn progress(&mut self, now: Instant) {
        if self.phase == Phase::Finished {
            return;
        }
        self.start_logins(now);
        // No more client bytes: each upstream gets its FIN once it has everything.
        if self.client_eof || self.client_gone {
            if self.client_eof
                && self.primary == Link::Open
                && self.upstream.lag(PRIMARY_READER) == Some(0)
            {
                self.primary = Link::FinSent;
                self.actions.push_back(Action::Close(Side::Primary));
            }
            for i in 0..self.replica_count() {
                let reader = usize::from(i) + 1;
                let slot = usize::from(i);
                if self.replicas.get(slot) == Some(&Link::Open)
                    && self.upstream.lag(reader) == Some(0)
                    && self.spools.get(slot).is_none_or(|s| s.unread == 0)
                {
                    if let Some(l) = self.replicas.get_mut(slot) {
                        *l = Link::FinSent;
                    }
                    self.upstream.detach(reader);
                    self.actions.push_back(Action::Close(Side::Replica(i)));
                }
            }
        }
        if self.primary_eof
            && !self.client_fin_sent
            && !self.client_gone
            && self.downstream.lag(CLIENT_READER) == Some(0)
        {
            self.client_fin_sent = true;
            self.downstream.detach(CLIENT_READER);
            self.actions.push_back(Action::Close(Side::Client));
        }
        let main_done = self.client_gone
            || (self.client_eof
                && self.primary == Link::FinSent
                && self.primary_eof
                && self.client_fin_sent);
        if !main_done {
            return;
        }
        if !self.replicas.iter().any(|l| l.is_live()) && !self.awaits_answers() {
            self.finish();
        } else if self.phase == Phase::Open {
            self.phase = Phase::Draining(now.checked_add(self.config.drain_timeout));
        }
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}
