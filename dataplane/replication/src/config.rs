//! Per-session limits and timeouts, and the memory bound they imply.

use std::fmt;
use std::time::Duration;

use crate::buffer::max_allocated;

/// Most replicas one session may copy to. Bounds per-session state and makes a `u16`
/// replica index always enough.
pub const MAX_REPLICAS: u16 = 64;

/// Largest accepted byte budget (1 GiB). Keeps every sum of budgets far from overflow.
pub const MAX_BUDGET_BYTES: u64 = 1 << 30;

/// Largest accepted spill budget (1 TiB): disk is cheaper than memory, and the sum stays
/// far from overflow.
pub const MAX_SPILL_BYTES: u64 = 1 << 40;

/// Limits and timeouts of one replicated session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Number of replicas the client's stream is copied to (0 = plain proxy).
    pub replica_count: u16,
    /// How far a replica may fall behind the newest client byte before it is detached.
    /// Only replicas are cut loose: the client is never slowed down on their account.
    pub replica_budget_bytes: u64,
    /// Client bytes the primary may have outstanding (buffered, not yet taken by its
    /// socket). When it is full the core stops accepting client bytes: the only
    /// backpressure in the system, and it comes from the real server.
    pub primary_budget_bytes: u64,
    /// Primary bytes buffered for the client before the core stops accepting from the
    /// primary (backpressure from the client to the primary, as a plain proxy would).
    pub response_budget_bytes: u64,
    /// A session with no client or primary traffic for this long is reset on both sides.
    pub idle_timeout: Duration,
    /// An upstream (primary or replica) not connected within this long after the session
    /// started has failed: the primary resets the session, a replica is detached.
    pub connect_timeout: Duration,
    /// Once client and primary are both closed, how long replicas still catching up may
    /// take to receive the rest of the stream and their FIN before they are aborted.
    pub drain_timeout: Duration,
    /// Reply verification ([`crate::verify`]): most answer bytes held to compare one
    /// replica's answer with the primary's; 0 turns verification off.
    pub verify_window_bytes: u64,
    /// Spilling ([`crate::session`]): most bytes of one replica's stream held on its
    /// on-disk spool at once. A replica that would fall more than its memory budget
    /// behind has its backlog moved to the spool instead of being detached, and is
    /// detached only when the spool would grow beyond this. 0 turns spilling off.
    pub spill_budget_bytes: u64,
    /// Protocol-aware session start ([`crate::start`]): replicas log in with their own
    /// credentials. `None`: every client byte goes to every replica from the first.
    pub start: Option<crate::start::StartSpec>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            replica_count: 1,
            replica_budget_bytes: 4 << 20,
            primary_budget_bytes: 1 << 20,
            response_budget_bytes: 1 << 20,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            verify_window_bytes: 0,
            spill_budget_bytes: 0,
            start: None,
        }
    }
}

impl SessionConfig {
    /// Checks the limits; the manager and `Session::new` refuse invalid configurations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.replica_count > MAX_REPLICAS {
            return Err(ConfigError::TooManyReplicas(self.replica_count));
        }
        for (name, value) in [
            ("replica_budget_bytes", self.replica_budget_bytes),
            ("primary_budget_bytes", self.primary_budget_bytes),
            ("response_budget_bytes", self.response_budget_bytes),
        ] {
            if value == 0 || value > MAX_BUDGET_BYTES {
                return Err(ConfigError::BudgetOutOfRange { name, value });
            }
        }
        if self.verify_window_bytes > MAX_BUDGET_BYTES {
            return Err(ConfigError::BudgetOutOfRange {
                name: "verify_window_bytes",
                value: self.verify_window_bytes,
            });
        }
        if self.spill_budget_bytes > MAX_SPILL_BYTES {
            return Err(ConfigError::SpillBudgetOutOfRange(self.spill_budget_bytes));
        }
        if self.spills() && self.spill_budget_bytes < self.replica_budget_bytes {
            return Err(ConfigError::SpillBudgetBelowReplicaBudget {
                spill: self.spill_budget_bytes,
                replica: self.replica_budget_bytes,
            });
        }
        Ok(())
    }

    /// Whether replicas that fall behind their memory budget spill to disk.
    pub fn spills(&self) -> bool {
        self.spill_budget_bytes > 0 && self.replica_count > 0
    }

    /// Whether the replicas' answers are compared with the primary's.
    pub fn verifies_replies(&self) -> bool {
        self.verify_window_bytes > 0 && self.replica_count > 0
    }

    /// Most buffer memory (bytes of chunks) one session with this configuration can ever
    /// hold. The client stream is stored once: its unread part is bounded by the primary
    /// budget (acceptance stops there) and by the replica budget (a replica further
    /// behind is detached before the bytes that would overrun it are stored). Reply
    /// verification adds at most one window per replica, twice over for the ring
    /// buffers' spare capacity. Spilling adds, per replica, the one backlog on its way to
    /// the spool (at most a replica budget plus the read that overran it, which the
    /// primary budget bounds).
    pub fn max_memory(&self) -> u64 {
        let upstream = if self.replica_count > 0 {
            self.primary_budget_bytes.max(self.replica_budget_bytes)
        } else {
            self.primary_budget_bytes
        };
        let verify = if self.verifies_replies() {
            self.verify_window_bytes
                .saturating_mul(u64::from(self.replica_count))
                .saturating_mul(2)
        } else {
            0
        };
        let spill = if self.spills() {
            self.replica_budget_bytes
                .saturating_add(self.primary_budget_bytes)
                .saturating_mul(u64::from(self.replica_count))
        } else {
            0
        };
        max_allocated(upstream)
            .saturating_add(max_allocated(self.response_budget_bytes))
            .saturating_add(verify)
            .saturating_add(spill)
    }
}

/// Why a [`SessionConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// More replicas than [`MAX_REPLICAS`].
    TooManyReplicas(u16),
    /// A byte budget is zero or above [`MAX_BUDGET_BYTES`].
    BudgetOutOfRange {
        /// Field name.
        name: &'static str,
        /// Rejected value.
        value: u64,
    },
    /// `spill_budget_bytes` above [`MAX_SPILL_BYTES`].
    SpillBudgetOutOfRange(u64),
    /// A spill moves up to one replica budget at a time, so a smaller spill budget could
    /// never hold one.
    SpillBudgetBelowReplicaBudget {
        /// `spill_budget_bytes`.
        spill: u64,
        /// `replica_budget_bytes`.
        replica: u64,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyReplicas(n) => {
                write!(
                    f,
                    "{n} replicas requested, at most {MAX_REPLICAS} supported"
                )
            }
            Self::BudgetOutOfRange { name, value } => {
                write!(f, "{name} = {value} is outside 1..={MAX_BUDGET_BYTES}")
            }
            Self::SpillBudgetOutOfRange(value) => {
                write!(
                    f,
                    "spill_budget_bytes = {value} is above the most supported, {MAX_SPILL_BYTES}"
                )
            }
            Self::SpillBudgetBelowReplicaBudget { spill, replica } => write!(
                f,
                "spill_budget_bytes = {spill} is below replica_budget_bytes = {replica}: \
                 a spill moves up to one replica budget at a time, so the spool could never hold one"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(SessionConfig::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_bad_limits() {
        let mut c = SessionConfig {
            replica_count: MAX_REPLICAS + 1,
            ..SessionConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::TooManyReplicas(_))));
        c.replica_count = 1;
        c.primary_budget_bytes = 0;
        assert!(c.validate().is_err());
        c.primary_budget_bytes = MAX_BUDGET_BYTES + 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn spill_budget_must_hold_one_replica_budget() {
        let mut c = SessionConfig {
            spill_budget_bytes: 1,
            ..SessionConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::SpillBudgetBelowReplicaBudget { .. })
        ));
        c.spill_budget_bytes = MAX_SPILL_BYTES + 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::SpillBudgetOutOfRange(MAX_SPILL_BYTES + 1))
        );
        c.spill_budget_bytes = c.replica_budget_bytes;
        assert_eq!(c.validate(), Ok(()));
        assert!(c.max_memory() > SessionConfig::default().max_memory());
    }

    #[test]
    fn memory_bound_ignores_replica_budget_without_replicas() {
        let c = SessionConfig {
            replica_count: 0,
            ..SessionConfig::default()
        };
        assert!(c.max_memory() < SessionConfig::default().max_memory());
    }
}
