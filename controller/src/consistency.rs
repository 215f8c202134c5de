//! Whether each replica of each replication is still a faithful copy of its primary, as
//! the controller reports it: the middlebox's own per-replica state (see
//! [`crate::mbstats`]) merged with what only the controller knows.
//!
//! The middlebox sees detaches and reply mismatches. It cannot see the times the
//! controller sent the client's traffic past it: a **fail-open window** (the middlebox
//! stopped answering its health probes, see [`crate::health`], and its redirects were
//! withdrawn) or a **redirect-withdrawn window** (a topology change, a lost host or switch
//! took an installed redirect away). In such a window the client's writes reach the
//! primary only, so every replica of that replication is `diverged` from the window's
//! start, with the window as a reason, until an operator who re-cloned it resets it.
//!
//! Everything here is sans-IO: windows are opened and closed with the time passed in,
//! polls are handed out as [`PollJob`]s whose results come back through
//! [`Polls::finished`], and [`merge`] is a pure function, so all of it is unit-tested
//! with made-up times.
//!
//! Memory is bounded: at most [`MAX_WINDOWS`] windows per replication (older ones are
//! folded into one spanning them, which can only make "diverged since" earlier, never
//! hide a divergence), and windows and resets of replications that no longer exist are
//! dropped.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::mbstats::{MbReplica, MiddleboxReport};
use crate::middlebox::PushError;
use crate::store::{ControlAddr, DesiredState, ReplicationSpec};

/// Windows kept per replication before the oldest are folded together.
pub const MAX_WINDOWS: usize = 16;

/// A replica's consistency state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    InStep,
    Diverged,
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InStep => "in-step",
            Self::Diverged => "diverged",
            Self::Unknown => "unknown",
        }
    }
}

/// Why the controller took a replication's traffic past its middlebox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum WindowKind {
    /// The middlebox stopped answering health probes.
    FailOpen { middlebox: Ipv4Addr },
    /// An installed redirect was withdrawn for another reason.
    RedirectWithdrawn { reason: String },
}

/// A time span in which a replication's writes reached its primary only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    #[serde(flatten)]
    pub kind: WindowKind,
    /// Ms since the Unix epoch.
    pub from_ms: u64,
    /// `None` while it lasts.
    pub to_ms: Option<u64>,
    /// Older windows folded into this one to bound memory.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub folded: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Window {
    fn describe(&self) -> String {
        let what = match &self.kind {
            WindowKind::FailOpen { middlebox } => format!("fail-open (middlebox {middlebox} down)"),
            WindowKind::RedirectWithdrawn { reason } => format!("redirect withdrawn ({reason})"),
        };
        let folded = if self.folded > 0 {
            format!(" and {} earlier window(s)", self.folded)
        } else {
            String::new()
        };
        match self.to_ms {
            Some(to) => format!("{what} from {} to {}{folded}", utc(self.from_ms), utc(to)),
            None => format!("{what} since {}{folded}", utc(self.from_ms)),
        }
    }
}

/// An operator's "this replica is in step again".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorReset {
    pub who: String,
    pub at_ms: u64,
}

/// The controller's own windows and the operators' resets. Sans-IO.
///
/// What must outlive the controller process is in [`Snapshot`]: the windows, the resets
/// and when each replication's redirect was last seen on its switch. A restarted
/// controller that finds a redirect missing (a switch wiped while it was down) can then
/// tell that the replication's writes went past the middlebox since that time
/// ([`Windows::redirect_restored`]), and a replica diverged before the restart stays
/// diverged after it.
#[derive(Debug, Default)]
pub struct Windows {
    by_replication: BTreeMap<u32, Vec<Window>>,
    resets: BTreeMap<(u32, SocketAddrV4), OperatorReset>,
    /// Ms since the Unix epoch at which each replication's redirect was last confirmed
    /// installed.
    last_installed: BTreeMap<u32, u64>,
    fail_open_events: u64,
    withdrawals: u64,
    operator_resets: u64,
}

/// What [`Windows`] keeps across restarts (the controller's consistency file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(default)]
    pub windows: BTreeMap<u32, Vec<Window>>,
    #[serde(default)]
    pub resets: Vec<SavedReset>,
    #[serde(default)]
    pub last_installed: BTreeMap<u32, u64>,
}

/// An operator reset in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReset {
    pub replication: u32,
    pub replica: SocketAddrV4,
    #[serde(flatten)]
    pub reset: OperatorReset,
}

impl Windows {
    fn open(&mut self, id: u32, kind: WindowKind, at_ms: u64) -> bool {
        let list = self.by_replication.entry(id).or_default();
        if list.iter().any(|w| w.to_ms.is_none() && w.kind == kind) {
            return false;
        }
        list.push(Window {
            kind,
            from_ms: at_ms,
            to_ms: None,
            folded: 0,
        });
        if list.len() > MAX_WINDOWS {
            // Fold the two oldest: the span covers both, so nothing is hidden.
            let second = list.remove(1);
            let first = &mut list[0];
            first.to_ms = match (first.to_ms, second.to_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            first.folded = first.folded.saturating_add(second.folded).saturating_add(1);
        }
        true
    }

    fn close(&mut self, id: u32, matches: impl Fn(&WindowKind) -> bool, at_ms: u64) -> bool {
        let mut closed = false;
        for w in self.by_replication.get_mut(&id).into_iter().flatten() {
            if w.to_ms.is_none() && matches(&w.kind) {
                w.to_ms = Some(at_ms.max(w.from_ms));
                closed = true;
            }
        }
        closed
    }

    /// `middlebox` went down: every replication through it fails open from `at_ms`.
    pub fn fail_open(&mut self, desired: &DesiredState, middlebox: Ipv4Addr, at_ms: u64) {
        self.fail_open_events += 1;
        for r in desired
            .replications
            .iter()
            .filter(|r| r.middlebox == middlebox)
        {
            self.open(r.id, WindowKind::FailOpen { middlebox }, at_ms);
        }
    }

    /// `middlebox` is back (or no longer in use): its fail-open windows end at `at_ms`.
    pub fn fail_open_ended(&mut self, middlebox: Ipv4Addr, at_ms: u64) {
        let ids: Vec<u32> = self.by_replication.keys().copied().collect();
        for id in ids {
            self.close(id, |k| *k == WindowKind::FailOpen { middlebox }, at_ms);
        }
    }

    /// Replication `id`'s installed redirect was withdrawn (not by fail-open). Returns
    /// whether this opened a window.
    pub fn withdrawn(&mut self, id: u32, reason: String, at_ms: u64) -> bool {
        let opened = self.open(id, WindowKind::RedirectWithdrawn { reason }, at_ms);
        if opened {
            self.withdrawals += 1;
        }
        opened
    }

    /// Replication `id`'s redirect is installed: a withdrawal window ends.
    pub fn installed(&mut self, id: u32, at_ms: u64) {
        self.close(
            id,
            |k| matches!(k, WindowKind::RedirectWithdrawn { .. }),
            at_ms,
        );
        self.last_installed.insert(id, at_ms);
    }

    /// Replication `id`'s redirect had to be added again at `at_ms` although it had been
    /// confirmed installed before, with no window open for it (a switch lost it between
    /// two reconcile runs, or while the controller was not running). The client's writes
    /// may have gone past the middlebox since it was last confirmed: that span becomes a
    /// closed window. Returns the window's start when it opened one.
    pub fn redirect_restored(&mut self, id: u32, at_ms: u64) -> Option<u64> {
        let since = *self.last_installed.get(&id)?;
        let kind = WindowKind::RedirectWithdrawn {
            reason: "found missing on its switch and restored".into(),
        };
        if self.windows(id).iter().any(|w| w.to_ms.is_none()) {
            // Already covered by a window the controller saw open (a withdrawal it made,
            // a fail-open), which this run's install closes.
            return None;
        }
        // A window the controller saw, closed since the redirect was last confirmed (a
        // fail-open ends when the middlebox answers, the redirect returns a reconcile run
        // later): the gap is that event's tail, so that window stretches to now.
        if let Some(w) = self
            .by_replication
            .get_mut(&id)
            .into_iter()
            .flatten()
            .filter(|w| w.to_ms.is_some_and(|to| to > since))
            .max_by_key(|w| w.to_ms)
        {
            w.to_ms = Some(at_ms.max(w.to_ms.unwrap_or(at_ms)));
            return None;
        }
        if !self.open(id, kind, since) {
            return None;
        }
        self.withdrawals += 1;
        self.close(
            id,
            |k| matches!(k, WindowKind::RedirectWithdrawn { .. }),
            at_ms,
        );
        Some(since)
    }

    /// What to keep across a restart.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            windows: self.by_replication.clone(),
            resets: self
                .resets
                .iter()
                .map(|((replication, replica), reset)| SavedReset {
                    replication: *replication,
                    replica: *replica,
                    reset: reset.clone(),
                })
                .collect(),
            last_installed: self.last_installed.clone(),
        }
    }

    /// Windows as a previous run left them (its counters start from zero).
    pub fn from_snapshot(s: Snapshot) -> Self {
        Self {
            by_replication: s.windows,
            resets: s
                .resets
                .into_iter()
                .map(|r| ((r.replication, r.replica), r.reset))
                .collect(),
            last_installed: s.last_installed,
            ..Self::default()
        }
    }

    /// An operator marked `replica` of replication `id` in step at `at_ms`: windows that
    /// ended before no longer count for it, and one still open counts from `at_ms` only.
    pub fn reset(&mut self, id: u32, replica: SocketAddrV4, who: &str, at_ms: u64) {
        self.operator_resets += 1;
        self.resets.insert(
            (id, replica),
            OperatorReset {
                who: who.to_string(),
                at_ms,
            },
        );
    }

    /// Forgets replications and replicas that no longer exist.
    pub fn retain(&mut self, desired: &DesiredState) {
        self.by_replication
            .retain(|id, _| desired.replications.iter().any(|r| r.id == *id));
        self.last_installed
            .retain(|id, _| desired.replications.iter().any(|r| r.id == *id));
        self.resets.retain(|(id, replica), _| {
            desired
                .replications
                .iter()
                .any(|r| r.id == *id && replicas_of(r).contains(replica))
        });
    }

    pub fn windows(&self, id: u32) -> &[Window] {
        self.by_replication.get(&id).map_or(&[], Vec::as_slice)
    }

    pub fn last_reset(&self, id: u32, replica: SocketAddrV4) -> Option<&OperatorReset> {
        self.resets.get(&(id, replica))
    }

    /// (fail-open events, withdrawals, operator resets) since start.
    pub fn totals(&self) -> (u64, u64, u64) {
        (
            self.fail_open_events,
            self.withdrawals,
            self.operator_resets,
        )
    }
}

/// The replicas of `r` as addresses (stored replicas are validated `ip:port`).
pub fn replicas_of(r: &ReplicationSpec) -> Vec<SocketAddrV4> {
    r.replicas
        .iter()
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

/// The middlebox service name of replication `id` (as [`crate::middlebox::services_for`]
/// names it).
pub fn service_name(id: u32) -> String {
    format!("r{id}")
}

/// Poll timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollConfig {
    /// Between polls of one middlebox.
    pub interval: Duration,
    /// Bound on each of connect, write and read.
    pub timeout: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
        }
    }
}

/// The last poll of one middlebox.
#[derive(Debug, Default)]
pub struct Poll {
    /// The last answer read, kept while later polls fail (for the counters).
    pub report: Option<MiddleboxReport>,
    /// The last poll's error, when it failed.
    pub error: Option<String>,
    /// When the last poll finished (ms since the Unix epoch).
    pub at_ms: Option<u64>,
    started: Option<Instant>,
    in_flight: bool,
}

/// A stats poll to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollJob {
    pub ip: Ipv4Addr,
    pub addr: ControlAddr,
}

/// The consistency polls of every registered middlebox. Sans-IO.
#[derive(Debug, Default)]
pub struct Polls {
    cfg: PollConfig,
    polls: BTreeMap<Ipv4Addr, Poll>,
    ok: u64,
    failed: u64,
}

impl Polls {
    pub fn new(cfg: PollConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Polls to start now (marked in flight): each registered middlebox once an interval
    /// has passed since its last poll started, at most one at a time; `now_too` are
    /// polled at once (after an operator's reset) unless one is in flight.
    pub fn due(
        &mut self,
        desired: &DesiredState,
        now: Instant,
        now_too: &[Ipv4Addr],
    ) -> Vec<PollJob> {
        self.polls.retain(|ip, _| desired.middlebox(*ip).is_some());
        let mut jobs = Vec::new();
        for mb in &desired.middleboxes {
            let Ok(addr) = mb.control_addr() else {
                continue;
            };
            let p = self.polls.entry(mb.ip).or_default();
            let due = !p.in_flight
                && (now_too.contains(&mb.ip)
                    || p.started.is_none_or(|s| now >= s + self.cfg.interval));
            if due {
                p.in_flight = true;
                p.started = Some(now);
                jobs.push(PollJob { ip: mb.ip, addr });
            }
        }
        jobs
    }

    /// Records a poll's outcome; returns whether it is news worth logging (a failure
    /// other than the last one, or a recovery).
    pub fn finished(
        &mut self,
        ip: Ipv4Addr,
        result: Result<MiddleboxReport, PushError>,
        at_ms: u64,
    ) -> bool {
        match &result {
            Ok(_) => self.ok += 1,
            Err(_) => self.failed += 1,
        }
        let Some(p) = self.polls.get_mut(&ip) else {
            return false;
        };
        p.in_flight = false;
        p.at_ms = Some(at_ms);
        match result {
            Ok(r) => {
                p.report = Some(r);
                p.error.take().is_some()
            }
            Err(e) => {
                let e = e.to_string();
                let news = p.error.as_ref() != Some(&e);
                p.error = Some(e);
                news
            }
        }
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<&Poll> {
        self.polls.get(&ip)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Ipv4Addr, &Poll)> {
        self.polls.iter()
    }

    /// (succeeded, failed) polls since start.
    pub fn totals(&self) -> (u64, u64) {
        (self.ok, self.failed)
    }
}

/// One replica's merged state, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaConsistency {
    pub replica: SocketAddrV4,
    pub state: State,
    /// [`ReplicaConsistency::describe`]: the state in one line, as `ncpctl status` shows it.
    pub summary: String,
    /// When it became diverged (or in step, as far as the middlebox says); ms since the
    /// Unix epoch.
    pub since_ms: Option<u64>,
    /// Why it is not in step, in words.
    pub reasons: Vec<String>,
    /// The controller's windows that count for it.
    pub windows: Vec<Window>,
    /// The middlebox's own report, when it has one.
    pub middlebox: Option<MbReplica>,
    /// Largest current lag among open sessions, when the middlebox reports it.
    pub lag_bytes: Option<u64>,
    /// Sessions it was detached from since the middlebox started, by reason.
    pub detaches: BTreeMap<String, u64>,
    /// The last operator reset.
    pub reset_by_operator: Option<OperatorReset>,
}

impl ReplicaConsistency {
    /// One line for people: `in-step`, `diverged since T (reasons)`, `unknown (reason)`,
    /// then the last operator reset.
    pub fn describe(&self) -> String {
        let reasons = if self.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.reasons.join("; "))
        };
        let mut s = match (self.state, self.since_ms) {
            (State::Diverged, Some(t)) => format!("diverged since {}{reasons}", utc(t)),
            (state, _) => format!("{}{reasons}", state.as_str()),
        };
        if let Some(r) = &self.reset_by_operator {
            s.push_str(&format!(
                "; reset by operator {} at {}",
                r.who,
                utc(r.at_ms)
            ));
        }
        s
    }
}

/// What the middlebox says about one replica, in the merge's terms.
fn middlebox_side(
    service: &str,
    replica: SocketAddrV4,
    registered: bool,
    poll: Option<&Poll>,
) -> (State, Option<u64>, Vec<String>, Option<MbReplica>) {
    if !registered {
        let why = "middlebox not registered: no consistency report".to_string();
        return (State::Unknown, None, vec![why], None);
    }
    let Some(poll) = poll.filter(|p| p.at_ms.is_some()) else {
        return (
            State::Unknown,
            None,
            vec!["middlebox not polled yet".into()],
            None,
        );
    };
    if let Some(e) = &poll.error {
        // Its state may have changed since the last answer (a restart makes it unknown).
        return (
            State::Unknown,
            None,
            vec![format!("middlebox unreachable: {e}")],
            None,
        );
    }
    let Some(r) = poll
        .report
        .as_ref()
        .and_then(|r| r.replica(service, replica))
    else {
        let why = "the middlebox does not report this replica (service not configured there yet)";
        return (State::Unknown, None, vec![why.into()], None);
    };
    let state = match r.state.as_str() {
        "in-step" => State::InStep,
        "diverged" => State::Diverged,
        _ => State::Unknown,
    };
    let mut reasons = Vec::new();
    let detached: u64 = r.reasons.detached.values().sum();
    if detached > 0 {
        let by: Vec<String> = r
            .reasons
            .detached
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        reasons.push(format!(
            "detached from {detached} session(s): {}",
            by.join(", ")
        ));
    }
    if r.reasons.reply_mismatch > 0 {
        let at = r
            .first_mismatch
            .as_ref()
            .map(|m| format!(", first at answer offset {}", m.offset))
            .unwrap_or_default();
        reasons.push(format!(
            "reply mismatch in {} session(s){at}",
            r.reasons.reply_mismatch
        ));
    }
    if reasons.is_empty()
        && state != State::InStep
        && let Some(why) = &r.last_reason
    {
        reasons.push(why.clone());
    }
    (state, Some(r.since_unix_ms), reasons, Some(r.clone()))
}

/// The consistency of every replica of every replication, by replication id: the
/// middlebox's report (see [`Polls`]) merged with the controller's [`Windows`].
///
/// - A window that counts (not ended before the replica's last operator reset) makes it
///   `diverged` from the window's start (or the reset, if later).
/// - Otherwise the middlebox's state stands; a middlebox not registered, not yet polled,
///   unreachable or silent about this replica leaves it `unknown`, never `in-step`.
/// - Diverged since the earliest of the middlebox's and the windows' times.
pub fn merge(
    desired: &DesiredState,
    polls: &Polls,
    windows: &Windows,
) -> BTreeMap<u32, Vec<ReplicaConsistency>> {
    let mut out = BTreeMap::new();
    for r in &desired.replications {
        let service = service_name(r.id);
        let registered = desired.middlebox(r.middlebox).is_some();
        let poll = polls.get(r.middlebox);
        let mut list = Vec::new();
        for replica in replicas_of(r) {
            let reset = windows.last_reset(r.id, replica).cloned();
            let reset_at = reset.as_ref().map_or(0, |x| x.at_ms);
            let counting: Vec<Window> = windows
                .windows(r.id)
                .iter()
                .filter(|w| w.to_ms.is_none_or(|to| to > reset_at))
                .map(|w| Window {
                    from_ms: w.from_ms.max(reset_at),
                    ..w.clone()
                })
                .collect();
            let (mb_state, mb_since, mb_reasons, mb_entry) =
                middlebox_side(&service, replica, registered, poll);
            let window_since = counting.iter().map(|w| w.from_ms).min();
            let (state, since_ms, mut reasons) = if let Some(ws) = window_since {
                let since = match (mb_state, mb_since) {
                    (State::Diverged, Some(m)) => ws.min(m),
                    _ => ws,
                };
                let kept = if mb_state == State::Diverged {
                    mb_reasons
                } else {
                    Vec::new()
                };
                (State::Diverged, Some(since), kept)
            } else {
                (mb_state, mb_since, mb_reasons)
            };
            reasons.extend(counting.iter().map(Window::describe));
            let counters = poll
                .filter(|p| p.error.is_none())
                .and_then(|p| p.report.as_ref())
                .and_then(|rep| rep.counters.get(&(service.clone(), replica)));
            let mut merged = ReplicaConsistency {
                replica,
                state,
                summary: String::new(),
                since_ms,
                reasons,
                windows: counting,
                middlebox: mb_entry,
                lag_bytes: counters.map(|c| c.lag_bytes),
                detaches: counters.map(|c| c.detached.clone()).unwrap_or_default(),
                reset_by_operator: reset,
            };
            merged.summary = merged.describe();
            list.push(merged);
        }
        out.insert(r.id, list);
    }
    out
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for people.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian, 400-year eras).
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mbstats::{MbReasons, MbVerification, ReplicaCounters};
    use crate::store::{MiddleboxSpec, ModeSpec};

    const MB: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
    const A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 3), 6379);
    const B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 4), 6379);

    fn desired(registered: bool) -> DesiredState {
        DesiredState {
            middleboxes: if registered {
                vec![MiddleboxSpec {
                    ip: MB,
                    control: "unix:/run/ncp/mb.sock".into(),
                    replica_interface: None,
                }]
            } else {
                vec![]
            },
            replications: vec![ReplicationSpec {
                id: 1,
                source: "198.18.1.1".into(),
                source_port: None,
                primary: Ipv4Addr::new(198, 18, 1, 2),
                primary_port: 6379,
                middlebox: MB,
                replicas: vec![A.to_string(), B.to_string()],
                mode: ModeSpec::Rewrite,
                verify: Default::default(),
                login: Default::default(),
                record: None,
            }],
            ..Default::default()
        }
    }

    fn entry(replica: SocketAddrV4, state: &str, since: u64) -> MbReplica {
        MbReplica {
            service: "r1".into(),
            replica,
            state: state.into(),
            since_unix_ms: since,
            reasons: MbReasons::default(),
            last_reason: None,
            first_mismatch: None,
            verification: MbVerification::default(),
        }
    }

    /// Polls holding one answer with `entries`, finished at `at_ms`.
    fn polled(d: &DesiredState, entries: Vec<MbReplica>, at_ms: u64) -> Polls {
        let mut p = Polls::new(PollConfig::default());
        let jobs = p.due(d, Instant::now(), &[]);
        assert_eq!(jobs.len(), 1);
        let mut report = MiddleboxReport {
            consistency: entries,
            ..MiddleboxReport::default()
        };
        report.counters.insert(
            ("r1".into(), A),
            ReplicaCounters {
                lag_bytes: 512,
                ..ReplicaCounters::default()
            },
        );
        p.finished(MB, Ok(report), at_ms);
        p
    }

    fn find(m: &BTreeMap<u32, Vec<ReplicaConsistency>>, r: SocketAddrV4) -> ReplicaConsistency {
        m[&1]
            .iter()
            .find(|x| x.replica == r)
            .cloned()
            .expect("replica listed")
    }

    #[test]
    fn middlebox_state_stands_without_windows_and_gaps_are_unknown() {
        let d = desired(true);
        let mut diverged = entry(B, "diverged", 5_000);
        diverged.reasons.detached.insert("lagged".into(), 2);
        diverged.reasons.reply_mismatch = 1;
        diverged.first_mismatch = Some(crate::mbstats::MbMismatch {
            offset: 42,
            ..Default::default()
        });
        let p = polled(&d, vec![entry(A, "in-step", 1_000), diverged], 6_000);
        let m = merge(&d, &p, &Windows::default());
        let a = find(&m, A);
        assert_eq!(a.state, State::InStep);
        assert_eq!(a.describe(), "in-step");
        assert_eq!(a.lag_bytes, Some(512));
        let b = find(&m, B);
        assert_eq!(b.state, State::Diverged);
        assert_eq!(b.since_ms, Some(5_000));
        assert_eq!(
            b.describe(),
            "diverged since 1970-01-01T00:00:05Z (detached from 2 session(s): lagged 2; \
             reply mismatch in 1 session(s), first at answer offset 42)"
        );

        // Not registered, never polled, unreachable, not reported: unknown, never in step.
        let m = merge(&desired(false), &Polls::default(), &Windows::default());
        assert_eq!(find(&m, A).state, State::Unknown);
        assert!(find(&m, A).reasons[0].contains("not registered"));
        let m = merge(&d, &Polls::default(), &Windows::default());
        assert!(find(&m, A).describe().contains("not polled yet"));
        let mut p = polled(&d, vec![entry(A, "in-step", 1_000)], 6_000);
        let m = merge(&d, &p, &Windows::default());
        assert!(
            find(&m, B)
                .describe()
                .starts_with("unknown (the middlebox does not report")
        );
        p.due(&d, Instant::now() + Duration::from_secs(3), &[]);
        assert!(p.finished(MB, Err(PushError::Connect("refused".into())), 9_000));
        let m = merge(&d, &p, &Windows::default());
        assert_eq!(find(&m, A).state, State::Unknown);
        assert_eq!(
            find(&m, A).describe(),
            "unknown (middlebox unreachable: connect: refused)"
        );
        assert_eq!(find(&m, A).lag_bytes, None);
        assert_eq!(p.totals(), (1, 1));
    }

    #[test]
    fn fail_open_and_withdrawal_windows_diverge_every_replica_until_reset() {
        let d = desired(true);
        let p = polled(
            &d,
            vec![entry(A, "in-step", 1_000), entry(B, "unknown", 1_000)],
            2_000,
        );
        let mut w = Windows::default();
        w.fail_open(&d, MB, 10_000);
        w.fail_open(&d, MB, 10_500); // still the same window
        assert_eq!(w.windows(1).len(), 1);
        let m = merge(&d, &p, &w);
        let a = find(&m, A);
        assert_eq!(a.state, State::Diverged, "an open window");
        assert_eq!(
            a.describe(),
            "diverged since 1970-01-01T00:00:10Z (fail-open (middlebox 198.18.1.3 down) since 1970-01-01T00:00:10Z)"
        );
        assert_eq!(
            find(&m, B).state,
            State::Diverged,
            "divergence overrides unknown"
        );
        w.fail_open_ended(MB, 12_000);
        assert!(w.withdrawn(1, "no route to the middlebox".into(), 20_000));
        assert!(!w.withdrawn(1, "no route to the middlebox".into(), 21_000));
        w.installed(1, 22_000);
        let a = find(&merge(&d, &p, &w), A);
        assert_eq!(a.since_ms, Some(10_000));
        assert_eq!(a.windows.len(), 2);
        assert_eq!(
            a.reasons,
            [
                "fail-open (middlebox 198.18.1.3 down) from 1970-01-01T00:00:10Z to 1970-01-01T00:00:12Z",
                "redirect withdrawn (no route to the middlebox) from 1970-01-01T00:00:20Z to 1970-01-01T00:00:22Z",
            ]
        );

        // The operator resets A: its windows no longer count, B's still do.
        w.reset(1, A, "alice", 30_000);
        let m = merge(&d, &p, &w);
        let a = find(&m, A);
        assert_eq!(a.state, State::InStep);
        assert_eq!(
            a.describe(),
            "in-step; reset by operator alice at 1970-01-01T00:00:30Z"
        );
        assert_eq!(find(&m, B).state, State::Diverged);

        // A window still open at the reset counts from the reset on.
        w.fail_open(&d, MB, 40_000);
        w.reset(1, B, "bob", 45_000);
        let b = find(&merge(&d, &p, &w), B);
        assert_eq!(b.since_ms, Some(45_000));
        assert_eq!(b.windows.len(), 1);
        assert_eq!(w.totals(), (3, 1, 2));

        // A replica the middlebox also says diverged: the earlier time wins, both reasons.
        let mut late = entry(A, "diverged", 50_000);
        late.last_reason = Some("detached from a session: it lagged".into());
        let p = polled(&d, vec![late], 60_000);
        let a = find(&merge(&d, &p, &w), A);
        assert_eq!(a.since_ms, Some(40_000));
        assert_eq!(a.reasons.len(), 2, "{:?}", a.reasons);
        assert!(a.reasons[0].contains("lagged"));
    }

    #[test]
    fn a_redirect_found_missing_and_restored_diverges_the_replicas_since_it_was_last_seen() {
        let d = desired(true);
        let p = polled(&d, vec![entry(A, "in-step", 1_000)], 2_000);
        let mut w = Windows::default();
        assert_eq!(
            w.redirect_restored(1, 5_000),
            None,
            "never installed: a first install"
        );
        w.installed(1, 10_000);
        w.installed(1, 15_000);
        assert_eq!(find(&merge(&d, &p, &w), A).state, State::InStep);
        // The switch lost the redirect unseen (wiped while the controller was down).
        assert_eq!(w.redirect_restored(1, 40_000), Some(15_000));
        w.installed(1, 40_000);
        let a = find(&merge(&d, &p, &w), A);
        assert_eq!(a.state, State::Diverged);
        assert_eq!(a.since_ms, Some(15_000));
        assert_eq!(
            a.reasons,
            [
                "redirect withdrawn (found missing on its switch and restored) from \
              1970-01-01T00:00:15Z to 1970-01-01T00:00:40Z"
            ]
        );
        // A withdrawal the controller made itself is its own window, not a second one.
        assert!(w.withdrawn(1, "no route".into(), 50_000));
        assert_eq!(w.redirect_restored(1, 55_000), None);
        w.installed(1, 55_000);
        assert_eq!(w.windows(1).len(), 2);
        assert_eq!(w.totals().1, 2);
        // A fail-open that ended (the middlebox answered) before the redirect came back:
        // its window stretches over the gap instead of a "found missing" one.
        w.fail_open(&d, MB, 60_000);
        w.fail_open_ended(MB, 62_000);
        assert_eq!(w.redirect_restored(1, 63_000), None);
        w.installed(1, 63_000);
        let last = w.windows(1).last().cloned().expect("window");
        assert_eq!((last.from_ms, last.to_ms), (60_000, Some(63_000)));
        assert_eq!(w.windows(1).len(), 3);
    }

    #[test]
    fn the_windows_resets_and_install_times_survive_a_restart() {
        let d = desired(true);
        let p = polled(&d, vec![entry(A, "in-step", 1_000)], 2_000);
        let mut w = Windows::default();
        w.fail_open(&d, MB, 10_000);
        w.fail_open_ended(MB, 12_000);
        w.reset(1, B, "alice", 13_000);
        w.installed(1, 14_000);
        let text = serde_json::to_string(&w.snapshot()).unwrap();
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back, w.snapshot());
        let mut restarted = Windows::from_snapshot(back);
        assert_eq!(merge(&d, &p, &restarted), merge(&d, &p, &w));
        assert_eq!(find(&merge(&d, &p, &restarted), A).state, State::Diverged);
        // The install time came along: a redirect missing after the restart is a window.
        assert_eq!(restarted.redirect_restored(1, 30_000), Some(14_000));
        // A file from before install times were kept still reads.
        let old: Snapshot = serde_json::from_str(r#"{"windows":{}}"#).unwrap();
        assert_eq!(old, Snapshot::default());
    }

    #[test]
    fn windows_are_bounded_and_forgotten_with_their_replication() {
        let mut d = desired(true);
        let mut w = Windows::default();
        for i in 0..40u64 {
            w.fail_open(&d, MB, 1_000 * (2 * i + 1));
            w.fail_open_ended(MB, 1_000 * (2 * i + 2));
        }
        let list = w.windows(1);
        assert_eq!(list.len(), MAX_WINDOWS);
        assert_eq!(list[0].from_ms, 1_000, "the earliest start is kept");
        assert_eq!(list[0].folded, 40 - 16);
        assert_eq!(list.iter().map(|x| x.folded + 1).sum::<u32>(), 40);
        w.reset(1, A, "op", 5);
        d.replications[0].replicas.retain(|r| *r != A.to_string());
        w.retain(&d);
        assert!(w.last_reset(1, A).is_none());
        d.replications.clear();
        w.retain(&d);
        assert!(w.windows(1).is_empty());
    }

    #[test]
    fn polls_are_periodic_one_at_a_time_and_on_demand() {
        let d = desired(true);
        let mut p = Polls::new(PollConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        assert_eq!(p.due(&d, t0, &[]).len(), 1);
        assert!(
            p.due(&d, t0 + Duration::from_secs(5), &[MB]).is_empty(),
            "in flight"
        );
        assert!(!p.finished(MB, Ok(MiddleboxReport::default()), 1));
        assert!(p.due(&d, t0 + Duration::from_secs(1), &[]).is_empty());
        assert_eq!(
            p.due(&d, t0 + Duration::from_secs(1), &[MB]).len(),
            1,
            "asked for"
        );
        p.finished(MB, Err(PushError::Read("x".into())), 2);
        assert_eq!(
            p.due(&d, t0 + Duration::from_secs(3), &[]).len(),
            1,
            "interval"
        );
        assert!(
            !p.finished(MB, Err(PushError::Read("x".into())), 3),
            "same failure"
        );
        assert!(
            p.due(&desired(false), t0 + Duration::from_secs(9), &[])
                .is_empty()
        );
        assert!(p.get(MB).is_none(), "unregistered: forgotten");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_601_599_999), "2026-12-06T23:59:59Z");
    }
}
