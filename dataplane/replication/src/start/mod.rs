//! Protocol-aware session start: each replica logs in with its own credentials, then
//! receives the client's stream from where the client's own start-up with the primary
//! ended (the paper's requirement R6, left there as future work).
//!
//! Replaying the client's bytes works only if a replica would accept the very same
//! bytes. A challenge-response login does not replay: PostgreSQL's SCRAM proof depends on
//! a nonce the server picks, and a replica with a password of its own refuses the
//! primary's. For a service with a [`Protocol`], the session therefore splits each
//! direction in two:
//!
//! - The **client's start-up** (PostgreSQL: the start-up message and the password or
//!   SASL answers; Redis: the leading `AUTH` and `HELLO` commands) goes to the primary
//!   only. Whatever the client sends after it goes to the primary and every replica, as
//!   for any service.
//! - Each **replica leg** first runs its own login, driven by a [`ReplicaLogin`] with
//!   that replica's [`ReplicaCredentials`]: the middlebox speaks the client's part itself.
//!   The replica's answers during it never reach the client. When it is logged in, the
//!   leg takes the client's stream from the end of the client's start-up on; a login the
//!   replica refuses detaches it ([`crate::DetachReason::LoginFailed`]) and never
//!   disturbs the client.
//! - The **primary's start-up answers** (PostgreSQL: up to its first ReadyForQuery;
//!   Redis: the answers to the leading commands) carry per-server values (backend keys,
//!   connection ids), so reply verification compares only what comes after them with
//!   what the replicas answer after their own login.
//!
//! The primary's conversation is the client's own, with one exception: the middlebox
//! must read the stream to copy it, so a PostgreSQL client's request for TLS or GSS
//! encryption is declined by the middlebox itself (`N`), and the client goes on in
//! plain text (libpq's default `sslmode=prefer` does; `require` refuses, with libpq's
//! own error).
//!
//! One module a protocol ([`postgres`], [`redis`]); further protocols implement
//! [`StartDialect`] and [`ReplicaLogin`] (MySQL's caching_sha2 handshake would be next).

pub mod postgres;
pub mod redis;
pub mod scram;

use std::fmt;
use std::sync::Arc;

/// A protocol whose session start the middlebox runs per replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// PostgreSQL's frontend/backend protocol 3.0.
    Postgres,
    /// Redis's RESP2/RESP3.
    Redis,
}

impl Protocol {
    /// A fresh watcher of one session's start-up.
    pub fn dialect(self) -> Box<dyn StartDialect> {
        match self {
            Self::Postgres => Box::new(postgres::PostgresStart::default()),
            Self::Redis => Box::new(redis::RedisStart::default()),
        }
    }
}

/// A password that never shows in logs: its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    /// The password itself, for the login that proves it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the middlebox logs in to one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaCredentials {
    /// The user to log in as on the replica (`None`: the client's own user).
    pub user: Option<String>,
    /// The replica's password for that user (`None`: the replica asks for none).
    pub password: Option<Secret>,
    /// PostgreSQL: the database to open on the replica (`None`: the client's).
    pub database: Option<String>,
}

/// A service's protocol and its replicas' credentials, by replica index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartConfig {
    /// The protocol spoken.
    pub protocol: Protocol,
    /// One entry per replica (missing entries: no credentials).
    pub replicas: Vec<ReplicaCredentials>,
}

/// Shared by every session of a service.
pub type StartSpec = Arc<StartConfig>;

/// What the start-up watcher made of some client bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientStep {
    /// The middlebox's own answer to the client (PostgreSQL: `N` to a TLS request).
    pub reply: Vec<u8>,
    /// Start-up bytes, for the primary only, in order (bytes held back earlier included).
    pub startup: Vec<u8>,
    /// Where in the input the client's start-up ended: from there on, every byte is for
    /// the primary and every replica. `None`: the start-up goes on.
    pub ended_at: Option<usize>,
    /// Bytes held from earlier inputs that turned out to come after the start-up: they
    /// go to everyone, ahead of the input from `ended_at`.
    pub held_after: Vec<u8>,
    /// The start-up could not be followed: `startup` then holds every byte not yet
    /// handed on (they go to the primary), and the replicas are detached.
    pub refused: Option<StartError>,
}

/// What the watcher made of some of the primary's answer bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum PrimaryStep {
    /// All of them belong to the primary's start-up answers.
    StartingUp,
    /// The start-up answers end at this index of the input; verification starts there.
    Ended(usize),
    /// The answers are not the protocol's: nothing after them is comparable.
    NotComparable,
    /// The primary refused the client's start-up but keeps the connection (Redis): it
    /// will refuse what follows, which the logged-in replicas would carry out, so they
    /// are detached from the session.
    Refused,
}

/// One session's start-up as a protocol sees it, from the client's and the primary's
/// bytes. Inputs are the streams in order, each byte once.
pub trait StartDialect: fmt::Debug + Send {
    /// The client's bytes while its start-up runs (not called after it ended or was
    /// refused).
    fn on_client(&mut self, data: &[u8]) -> ClientStep;

    /// The primary's bytes while its start-up answers run (not called after they ended).
    fn on_primary(&mut self, data: &[u8]) -> PrimaryStep;

    /// The login for a replica with `credentials`, once the client's start-up has said
    /// enough to build it (PostgreSQL: its start-up message; Redis: its leading
    /// commands); `None` until then.
    fn replica_login(
        &self,
        credentials: &ReplicaCredentials,
    ) -> Option<Result<Box<dyn ReplicaLogin>, LoginError>>;
}

/// The middlebox's side of one replica's login.
pub trait ReplicaLogin: fmt::Debug + Send {
    /// Bytes to send to the replica now (taken: the next call returns only newer ones).
    fn take_output(&mut self) -> Vec<u8>;

    /// The replica's answer bytes during its login.
    fn on_reply(&mut self, data: &[u8]) -> Result<(), LoginError>;

    /// Whether the replica is logged in and ready for the client's stream.
    fn logged_in(&self) -> bool;
}

/// Why a replica's login failed; the replica is detached with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// The replica refused the login (wrong password, unknown user...), in its words.
    Refused(String),
    /// The login could not be carried out (unsupported method, protocol error...).
    Failed(String),
}

impl fmt::Display for LoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(why) => write!(f, "authentication failed: {why}"),
            Self::Failed(why) => write!(f, "login failed: {why}"),
        }
    }
}

impl std::error::Error for LoginError {}

/// Why the client's start-up could not be followed. The primary still gets every byte;
/// the replicas are detached from the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client start-up not understood: {}", self.0)
    }
}

impl std::error::Error for StartError {}

/// A login with nothing to say: the replica takes the stream at once (a PostgreSQL
/// cancel request, after which there is no stream; a Redis client that needs no login on
/// a replica without password).
#[derive(Debug, Default)]
pub struct NoLogin;

impl ReplicaLogin for NoLogin {
    fn take_output(&mut self) -> Vec<u8> {
        Vec::new()
    }

    fn on_reply(&mut self, _data: &[u8]) -> Result<(), LoginError> {
        Err(LoginError::Failed(
            "the replica answered before the client's stream reached it".into(),
        ))
    }

    fn logged_in(&self) -> bool {
        true
    }
}

/// Helpers the protocols' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use super::{PrimaryStep, StartDialect};

    /// Feeds the primary's `answers` in chunks of `split`; returns where in them the
    /// start-up answers ended, if they did (panics if they are not comparable).
    pub fn primary_end(
        dialect: &mut dyn StartDialect,
        answers: &[u8],
        split: usize,
    ) -> Option<usize> {
        let mut offset = 0;
        for chunk in answers.chunks(split) {
            match dialect.on_primary(chunk) {
                PrimaryStep::StartingUp => offset += chunk.len(),
                PrimaryStep::Ended(i) => return Some(offset + i),
                other => panic!("valid answers: {other:?}"),
            }
        }
        None
    }
}
