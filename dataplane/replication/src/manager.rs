//! All sessions of one worker: admission (session and memory caps), ids, timers, metrics.
//!
//! Memory is bounded by reservation: admitting a session reserves the most buffer memory
//! it can ever hold ([`SessionConfig::max_memory`]). A session never exceeds its
//! reservation, so the sum over sessions never exceeds the cap and no session ever has to
//! be slowed down or cut short because of another one. The price is that the cap counts
//! worst cases, not current use (both are reported in [`Metrics`]).
//!
//! Timers use a min-heap whose entries may be early but never late: an entry is pushed
//! only when a session's deadline moves *earlier* than what is registered. When an early
//! entry fires, the session is asked, finds nothing due, and its real deadline is
//! registered. Idle deadlines, which move later on every byte, thus cost no heap work on
//! the data path.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::Instant;

use crate::config::{ConfigError, SessionConfig};
use crate::metrics::{Metrics, SessionStats};
use crate::session::Session;

/// Identifies a session within its manager; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Limits of a [`Manager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Most sessions open at once.
    pub max_sessions: usize,
    /// Most buffer memory reserved by open sessions at once.
    pub max_memory_bytes: u64,
    /// Configuration used by [`Manager::open`].
    pub session: SessionConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            max_sessions: 1024,
            max_memory_bytes: 1 << 30,
            session: SessionConfig::default(),
        }
    }
}

/// Why a new session was not admitted. The caller resets the client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `max_sessions` are already open.
    SessionLimit,
    /// The session's reservation would exceed `max_memory_bytes`.
    MemoryLimit {
        /// What this session would reserve.
        needed: u64,
        /// What is still free.
        available: u64,
    },
    /// The session configuration is invalid.
    InvalidConfig(ConfigError),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SessionLimit => write!(f, "session limit reached"),
            Self::MemoryLimit { needed, available } => write!(
                f,
                "memory limit reached: session needs {needed} bytes, {available} free"
            ),
            Self::InvalidConfig(e) => write!(f, "invalid session configuration: {e}"),
        }
    }
}

impl std::error::Error for Refusal {}

#[derive(Debug)]
struct Slot {
    session: Session,
    reservation: u64,
    /// Deadline registered in the heap; never later than the session's real deadline.
    timer: Option<Instant>,
}

type TimerHeap = BinaryHeap<Reverse<(Instant, SessionId)>>;

/// Registers the session's deadline if it is earlier than what the heap already has.
fn register(timers: &mut TimerHeap, id: SessionId, slot: &mut Slot) {
    if let Some(d) = slot.session.poll_timeout()
        && slot.timer.is_none_or(|t| d < t)
    {
        slot.timer = Some(d);
        timers.push(Reverse((d, id)));
    }
}

/// The sessions of one worker. Single-threaded by design: each worker owns one.
#[derive(Debug)]
pub struct Manager {
    config: ManagerConfig,
    /// By the manager's own ids, which no peer chooses: a fast hasher.
    sessions: FxHashMap<SessionId, Slot>,
    timers: TimerHeap,
    next_id: u64,
    reserved: u64,
    /// Counters of removed sessions, plus admission counters.
    retired: Metrics,
}

impl Manager {
    /// An empty manager.
    pub fn new(config: ManagerConfig) -> Self {
        Self {
            config,
            sessions: FxHashMap::default(),
            timers: BinaryHeap::new(),
            next_id: 0,
            reserved: 0,
            retired: Metrics::default(),
        }
    }

    /// Admits a session for a newly accepted client with the manager's default config.
    pub fn open(&mut self, now: Instant) -> Result<SessionId, Refusal> {
        let config = self.config.session.clone();
        self.open_with(config, now)
    }

    /// Admits a session with its own configuration (e.g. the flow's replica count).
    /// On refusal the caller resets the client; the refusal is counted.
    pub fn open_with(&mut self, config: SessionConfig, now: Instant) -> Result<SessionId, Refusal> {
        if self.sessions.len() >= self.config.max_sessions {
            self.retired.sessions_refused_limit += 1;
            return Err(Refusal::SessionLimit);
        }
        if let Err(e) = config.validate() {
            self.retired.sessions_refused_config += 1;
            return Err(Refusal::InvalidConfig(e));
        }
        let needed = config.max_memory();
        let available = self.config.max_memory_bytes.saturating_sub(self.reserved);
        if needed > available {
            self.retired.sessions_refused_memory += 1;
            return Err(Refusal::MemoryLimit { needed, available });
        }
        let session = match Session::new(config, now) {
            Ok(s) => s,
            Err(e) => {
                self.retired.sessions_refused_config += 1;
                return Err(Refusal::InvalidConfig(e));
            }
        };
        let id = SessionId(self.next_id);
        self.next_id += 1;
        self.reserved += needed;
        self.retired.sessions_total += 1;
        let mut slot = Slot {
            session,
            reservation: needed,
            timer: None,
        };
        register(&mut self.timers, id, &mut slot);
        self.sessions.insert(id, slot);
        Ok(id)
    }

    /// Read access to a session.
    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id).map(|s| &s.session)
    }

    /// Mutable access to a session. The guard re-registers the session's timer when it is
    /// dropped, so every input made through it is seen by [`Manager::poll_timeout`].
    pub fn session_mut(&mut self, id: SessionId) -> Option<SessionMut<'_>> {
        let slot = self.sessions.get_mut(&id)?;
        Some(SessionMut {
            id,
            slot,
            timers: &mut self.timers,
        })
    }

    /// Ids of the open sessions (any order).
    pub fn ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// `true` if no session is open.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Removes a session, releasing its reservation and folding its counters into the
    /// totals. Call it after the session's `Action::Finished`; removing a running session
    /// is allowed (e.g. at shutdown: reset its sockets yourself) and counted.
    pub fn remove(&mut self, id: SessionId) -> Option<SessionStats> {
        let slot = self.sessions.remove(&id)?;
        self.reserved = self.reserved.saturating_sub(slot.reservation);
        if !slot.session.is_finished() {
            self.retired.sessions_removed_unfinished += 1;
        }
        let stats = slot.session.stats().clone();
        self.retired.totals.add(&stats);
        if self.sessions.is_empty() {
            // Nothing left to wake up for: spare the caller stale wakeups.
            self.timers.clear();
        } else if self.timers.len() > 2 * self.sessions.len() + 64 {
            self.rebuild_timers();
        }
        Some(stats)
    }

    /// When [`Manager::handle_timeout`] must be called next. May be early, never late.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Runs the timers due at `now`. The ids of sessions whose timers ran are appended to
    /// `touched`: drain their actions.
    pub fn handle_timeout(&mut self, now: Instant, touched: &mut Vec<SessionId>) {
        let mut due = Vec::new();
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(slot) = self.sessions.get_mut(&id) {
                // Entries that no longer match the registered deadline are stale.
                if slot.timer == Some(t) {
                    slot.timer = None;
                    due.push(id);
                }
            }
        }
        for id in due {
            if let Some(slot) = self.sessions.get_mut(&id) {
                slot.session.handle_timeout(now);
                register(&mut self.timers, id, slot);
                touched.push(id);
            }
        }
    }

    /// A snapshot of counters and gauges over all sessions, open and removed.
    pub fn metrics(&self) -> Metrics {
        let mut m = self.retired.clone();
        m.sessions_active = self.sessions.len() as u64;
        m.memory_reserved_bytes = self.reserved;
        for slot in self.sessions.values() {
            let s = &slot.session;
            m.totals.add(s.stats());
            m.memory_buffered_bytes += s.buffered_bytes();
            m.memory_allocated_bytes += s.allocated_bytes();
            let n = s.config().replica_count;
            if m.replica_lag_max_bytes.len() < usize::from(n) {
                m.replica_lag_max_bytes.resize(usize::from(n), 0);
            }
            for (i, max) in (0..n).zip(m.replica_lag_max_bytes.iter_mut()) {
                *max = (*max).max(s.replica_lag(i).unwrap_or(0));
            }
        }
        m
    }

    fn rebuild_timers(&mut self) {
        self.timers.clear();
        for (id, slot) in &mut self.sessions {
            slot.timer = None;
            register(&mut self.timers, *id, slot);
        }
    }
}

/// Mutable access to one session of a [`Manager`]; keeps the manager's timers right.
#[derive(Debug)]
pub struct SessionMut<'a> {
    id: SessionId,
    slot: &'a mut Slot,
    timers: &'a mut TimerHeap,
}

impl SessionMut<'_> {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }
}

impl Deref for SessionMut<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.slot.session
    }
}

impl DerefMut for SessionMut<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.slot.session
    }
}

impl Drop for SessionMut<'_> {
    fn drop(&mut self) {
        register(self.timers, self.id, self.slot);
    }
}
