//! Configuring middleboxes: the service list each registered middlebox must run, the
//! control protocol that hands it over, and the bookkeeping of what each one acknowledged.
//!
//! The controller pushes: for every middlebox in [`DesiredState::middleboxes`] it computes
//! the complete list of services from the replications naming that middlebox
//! ([`services_for`]) and sends it whole with one `services-set` request. Sending the whole
//! list (not add/remove deltas) makes a push idempotent, so a lost answer, a restarted
//! middlebox or a restarted controller are all healed by sending the same list again. It
//! also means a registered middlebox runs exactly what the controller says: registering
//! one without replications sends it an empty list.
//!
//! # Ordering with the switches
//!
//! A redirect steers clients to the middlebox, so it goes in only once the middlebox has
//! acknowledged a list holding the replication's service ([`Pushes::serves`]; the
//! service plans the replication out until then). The other way round, a deleted
//! replication's service stays in the pushed list until a reconcile run has taken its
//! redirect off every switch. So a middlebox never receives clients for a service it
//! does not run.
//!
//! # Wire format
//!
//! Connect to the middlebox's Unix stream socket, write one line of JSON, read one line
//! of JSON, close:
//!
//! ```text
//! > {"cmd":"services-set","services":[{"name":"r1","primary":"198.18.1.2:6379","clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"replica_interface":"eth1"}]}
//! < {"result":"done"}
//! < {"result":"error","message":"..."}
//! ```
//!
//! `replica_interface` is present only when the middlebox was registered with one,
//! `"verify":"replies"` only when the replication asks for reply verification, and
//! `"tunnel_overhead_bytes":4` only in VLAN and MPLS modes (the middlebox lowers the MSS
//! it advertises by that much, so full-size segments fit the links once tagged): the
//! middlebox refuses unknown keys and `null`, and one from before either key still takes
//! a list that does not use it. A replication with a `source_port` cannot be
//! expressed as a service; [`DesiredState::validate`] refuses it for registered
//! middleboxes.
//!
//! # When a push happens
//!
//! [`Pushes::due`] decides, per middlebox: when the list differs from the one it last
//! acknowledged (or its control address changed), after a failure once a backoff has
//! passed (1 s doubling to [`PushConfig::refresh`]), and every [`PushConfig::refresh`]
//! even when nothing changed, so a middlebox that restarted with an empty configuration
//! gets its services back. At most one push per middlebox is in flight; each step of it
//! (connect, write, read) is bounded by [`PushConfig::timeout`], and pushes run on their
//! own tasks, so a stuck middlebox delays nothing but its own next push.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::consistency::service_name;
use crate::store::{
    ControlAddr, DesiredState, LoginSpec, MiddleboxSpec, RecordTarget, VerifySpec, parse_prefix,
};

/// What a replication's status says when its middlebox is not registered.
pub const NOT_REGISTERED: &str = "middlebox not registered: rules only";

/// Longest answer line read from a middlebox; a peer that sends more is broken.
pub const MAX_ANSWER: u64 = 64 * 1024;

/// Longest request line the middlebox reads (its control socket's limit). A longer list
/// fails here with a clear reason instead of as a cut-off line on the other side.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Push timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushConfig {
    /// Bound on each of connect, write and read.
    pub timeout: Duration,
    /// A middlebox in sync is sent its list again after this long (heals a restarted
    /// middlebox); also the longest retry backoff.
    pub refresh: Duration,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub retry: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            refresh: Duration::from_secs(10),
            retry: Duration::from_secs(1),
        }
    }
}

/// One service as the middlebox's `services-set` takes it. Field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// `r<replication id>`
    pub name: String,
    /// `ip:port` of the primary.
    pub primary: String,
    /// The replication's source as `a.b.c.d/len`.
    pub clients: String,
    /// Replica `ip:port`s.
    pub replicas: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_interface: Option<String>,
    /// `replies` when the replication asks for reply verification; absent when off, so a
    /// middlebox from before verification (which refuses unknown keys) still takes it.
    #[serde(default, skip_serializing_if = "VerifySpec::is_off")]
    pub verify: VerifySpec,
    /// Bytes the replication's tunnel adds to the clients' frames on their way to the
    /// middlebox (4 for VLAN and MPLS), which the middlebox takes off the MSS it
    /// advertises so that full-size segments still fit once tagged; absent for rewrite
    /// mode, for middleboxes from before it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tunnel_overhead_bytes: u16,
    /// The protocol and the replicas' secret files (paths on the middlebox's host);
    /// absent when the replication has none, for middleboxes from before them.
    #[serde(flatten)]
    pub login: LoginSpec,
    /// Where the middlebox records the service (`{"dir": …}`); absent when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordTarget>,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct Request<'a> {
    cmd: &'static str,
    services: &'a [ServiceEntry],
}

#[derive(Deserialize)]
struct Answer {
    result: String,
    #[serde(default)]
    message: Option<String>,
}

/// The services middlebox `mb` must run: one per replication naming it, by replication
/// id. Pure, so the wire content is unit-tested without sockets.
pub fn services_for(desired: &DesiredState, mb: &MiddleboxSpec) -> Vec<ServiceEntry> {
    let mut v: Vec<ServiceEntry> = desired
        .replications
        .iter()
        .filter(|r| r.middlebox == mb.ip)
        .map(|r| ServiceEntry {
            name: service_name(r.id),
            primary: format!("{}:{}", r.primary, r.primary_port),
            // Stored sources are validated; the fallback keeps this function total and
            // would be refused by the middlebox rather than silently widened.
            clients: parse_prefix(&r.source)
                .map(|p| format!("{}/{}", p.addr(), p.prefix_len()))
                .unwrap_or_else(|_| r.source.clone()),
            // Written back from the parsed address so that what the middlebox reads is
            // canonical (stored replicas are validated as `ip:port`).
            replicas: r
                .replicas
                .iter()
                .map(|x| {
                    x.trim()
                        .parse::<SocketAddrV4>()
                        .map_or_else(|_| x.clone(), |a| a.to_string())
                })
                .collect(),
            replica_interface: mb.replica_interface.clone(),
            verify: r.verify,
            // A mode's overhead is a few bytes; the fallback is never reached.
            tunnel_overhead_bytes: u16::try_from(r.tunnel_overhead_bytes()).unwrap_or(u16::MAX),
            login: LoginSpec {
                protocol: r.login.protocol,
                // Canonical keys, as for `replicas` (stored ones are validated).
                credentials: r
                    .login
                    .credentials
                    .iter()
                    .map(|(replica, path)| {
                        let key = replica
                            .trim()
                            .parse::<SocketAddrV4>()
                            .map_or_else(|_| replica.clone(), |a| a.to_string());
                        (key, path.clone())
                    })
                    .collect(),
            },
            record: r.record.clone(),
        })
        .collect();
    v.sort_by_key(|s| {
        s.name
            .trim_start_matches('r')
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    });
    v
}

/// The request line, newline included.
pub fn request_line(services: &[ServiceEntry]) -> String {
    let req = Request {
        cmd: "services-set",
        services,
    };
    // Serializing plain strings and vectors cannot fail.
    let mut line = serde_json::to_string(&req).unwrap_or_default();
    line.push('\n');
    line
}

/// Why a push failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("write: {0}")]
    Write(String),
    #[error("read: {0}")]
    Read(String),
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    #[error("malformed answer {0:?}")]
    Malformed(String),
    #[error("middlebox refused: {0}")]
    Refused(String),
    #[error("request of {0} bytes is above the middlebox's limit of {MAX_REQUEST}")]
    TooLarge(usize),
}

/// Interprets the middlebox's answer line.
pub fn parse_answer(line: &str) -> Result<(), PushError> {
    let line = line.trim_end_matches(['\n', '\r']);
    let short = || line.chars().take(200).collect::<String>();
    let a: Answer = serde_json::from_str(line).map_err(|_| PushError::Malformed(short()))?;
    match a.result.as_str() {
        "done" => Ok(()),
        "error" => Err(PushError::Refused(
            a.message.unwrap_or_else(|| "(no message)".to_string()),
        )),
        _ => Err(PushError::Malformed(short())),
    }
}

/// Sends `line` to the middlebox at `addr` and waits for its answer, each step bounded by
/// `timeout`.
pub async fn push(addr: &ControlAddr, line: &str, timeout: Duration) -> Result<(), PushError> {
    parse_answer(&exchange(addr, line, timeout, MAX_ANSWER).await?)
}

/// One request-answer exchange on the middlebox's control socket: connect, write `line`,
/// read one answer line of at most `max_answer` bytes, each step bounded by `timeout`.
/// Returns the answer line, newline included.
pub async fn exchange(
    addr: &ControlAddr,
    line: &str,
    timeout: Duration,
    max_answer: u64,
) -> Result<String, PushError> {
    if line.len() > MAX_REQUEST {
        return Err(PushError::TooLarge(line.len()));
    }
    let ControlAddr::Unix(path) = addr;
    let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
        .await
        .map_err(|_| PushError::Timeout("connect", timeout))?
        .map_err(|e| PushError::Connect(e.to_string()))?;
    let (rd, mut wr) = stream.into_split();
    tokio::time::timeout(timeout, wr.write_all(line.as_bytes()))
        .await
        .map_err(|_| PushError::Timeout("write", timeout))?
        .map_err(|e| PushError::Write(e.to_string()))?;
    let mut answer = String::new();
    let mut rd = BufReader::new(rd.take(max_answer));
    let n = tokio::time::timeout(timeout, rd.read_line(&mut answer))
        .await
        .map_err(|_| PushError::Timeout("read", timeout))?
        .map_err(|e| PushError::Read(e.to_string()))?;
    if n == 0 {
        return Err(PushError::Read("closed without an answer".into()));
    }
    if !answer.ends_with('\n') {
        return Err(PushError::Malformed(format!(
            "{} bytes without a newline",
            answer.len()
        )));
    }
    Ok(answer)
}

/// Tells the middlebox at `addr` that `replica` of `service` is in step again (an
/// operator re-cloned it): its `replica-reset` request.
pub async fn reset_replica(
    addr: &ControlAddr,
    service: &str,
    replica: SocketAddrV4,
    timeout: Duration,
) -> Result<(), PushError> {
    let line = format!(
        "{}\n",
        serde_json::json!({ "cmd": "replica-reset", "service": service, "replica": replica.to_string() })
    );
    parse_answer(&exchange(addr, &line, timeout, MAX_ANSWER).await?)
}

/// Asks the middlebox process whether it is alive: one `services` request on its control
/// socket. Returns the names of the services it runs (any well-formed answer within
/// `timeout` counts as alive), or `None` when it does not answer. The ARP probe of
/// [`crate::health`] shows that the middlebox *host* is on the network; this shows that the
/// NCP process behind it is running, so a crashed data plane fails open too, and what it
/// runs, so a restarted one is given its services at once ([`Pushes::check_running`]).
pub async fn ping(addr: &ControlAddr, timeout: Duration) -> Option<BTreeSet<String>> {
    // The whole exchange, not each step, must fit in `timeout`: the answer is wanted by
    // the next probe round.
    let exchange = exchange(addr, "{\"cmd\":\"services\"}\n", timeout, MAX_ANSWER);
    let answer = tokio::time::timeout(timeout, exchange).await.ok()?.ok()?;
    running_services(answer.trim_end())
}

/// The service names in a middlebox's answer to `services`; `None` for an answer that is
/// not one (an error answer still shows the process alive: an empty list).
fn running_services(answer: &str) -> Option<BTreeSet<String>> {
    #[derive(Deserialize)]
    struct Named {
        name: String,
    }
    /// Any answer (`result` present); the list only in a `services` one.
    #[derive(Deserialize)]
    struct ServicesAnswer {
        #[serde(rename = "result")]
        _result: String,
        #[serde(default)]
        services: Vec<Named>,
    }
    let listed: ServicesAnswer = serde_json::from_str(answer).ok()?;
    Some(listed.services.into_iter().map(|n| n.name).collect())
}

/// The last push attempt to a middlebox, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A registered middlebox with its push status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MiddleboxStatus {
    #[serde(flatten)]
    pub spec: MiddleboxSpec,
    /// Names of the services it must run.
    pub services: Vec<String>,
    /// Whether its last acknowledged list is the current one.
    pub in_sync: bool,
    pub push_in_flight: bool,
    pub last_push: Option<Attempt>,
    /// When it last acknowledged a push (ms since the Unix epoch).
    pub last_ok_at_ms: Option<u64>,
    pub pushes_ok: u64,
    pub pushes_failed: u64,
}

/// Per-middlebox push bookkeeping.
#[derive(Debug, Default)]
struct Track {
    /// (control address, request line) the middlebox last answered `done` to.
    acked: Option<(String, String)>,
    /// The names of the services in that list.
    acked_names: BTreeSet<String>,
    acked_at: Option<Instant>,
    last: Option<Attempt>,
    last_ok_at_ms: Option<u64>,
    /// Consecutive failures, for the backoff.
    failures: u32,
    failed_at: Option<Instant>,
    in_flight: bool,
    ok: u64,
    failed: u64,
}

/// A push to start: the middlebox, where to reach it and what to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub ip: Ipv4Addr,
    pub addr: ControlAddr,
    pub control: String,
    pub line: String,
    /// Names of the services in `line`.
    pub names: BTreeSet<String>,
}

/// What every registered middlebox acknowledged, and when to push again. Sans-IO: the
/// service runs the [`Job`]s it hands out and reports back with [`Pushes::finished`].
#[derive(Debug)]
pub struct Pushes {
    cfg: PushConfig,
    tracks: BTreeMap<Ipv4Addr, Track>,
    /// Pushes acknowledged and failed, over all middleboxes ever registered.
    total_ok: u64,
    total_failed: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Pushes {
    pub fn new(cfg: PushConfig) -> Self {
        Self {
            cfg,
            tracks: BTreeMap::new(),
            total_ok: 0,
            total_failed: 0,
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.cfg.retry.saturating_mul(factor).min(self.cfg.refresh)
    }

    /// The pushes to start now, marked in flight. Middleboxes no longer registered are
    /// forgotten (unregistering stops the pushes; it does not clear the middlebox).
    pub fn due(&mut self, desired: &DesiredState, now: Instant) -> Vec<Job> {
        self.tracks.retain(|ip, _| desired.middlebox(*ip).is_some());
        let mut jobs = Vec::new();
        for mb in &desired.middleboxes {
            // Validated when stored; an unparsable address is skipped, not pushed.
            let Ok(addr) = mb.control_addr() else {
                continue;
            };
            let services = services_for(desired, mb);
            let line = request_line(&services);
            let backoff = self.backoff(self.tracks.get(&mb.ip).map_or(0, |t| t.failures));
            let refresh = self.cfg.refresh;
            let t = self.tracks.entry(mb.ip).or_default();
            if t.in_flight {
                continue;
            }
            let due = if t.failures > 0 {
                t.failed_at.is_none_or(|f| now >= f + backoff)
            } else {
                let same = t
                    .acked
                    .as_ref()
                    .is_some_and(|(c, l)| *c == mb.control && *l == line);
                !same || t.acked_at.is_none_or(|a| now >= a + refresh)
            };
            if due {
                t.in_flight = true;
                jobs.push(Job {
                    ip: mb.ip,
                    addr,
                    control: mb.control.clone(),
                    line,
                    names: services.into_iter().map(|s| s.name).collect(),
                });
            }
        }
        jobs
    }

    /// Records the outcome of `job`. Returns whether it is news worth logging: a list
    /// the middlebox did not have before, a recovery, or a failure other than the last
    /// one (not a refresh that changed nothing, nor the same failure every retry).
    pub fn finished(&mut self, job: &Job, result: &Result<(), PushError>, now: Instant) -> bool {
        if result.is_ok() {
            self.total_ok += 1;
        } else {
            self.total_failed += 1;
        }
        // A middlebox unregistered while its push was in flight has no track any more.
        let Some(t) = self.tracks.get_mut(&job.ip) else {
            return true;
        };
        t.in_flight = false;
        let news = match result {
            Ok(()) => {
                t.failures > 0
                    || t.acked
                        .as_ref()
                        .is_none_or(|(c, l)| *c != job.control || *l != job.line)
            }
            Err(e) => t
                .last
                .as_ref()
                .and_then(|a| a.error.as_deref())
                .is_none_or(|last| *last != e.to_string()),
        };
        let at_ms = now_ms();
        match result {
            Ok(()) => {
                t.acked = Some((job.control.clone(), job.line.clone()));
                t.acked_names = job.names.clone();
                t.acked_at = Some(now);
                t.failures = 0;
                t.failed_at = None;
                t.ok += 1;
                t.last_ok_at_ms = Some(at_ms);
                t.last = Some(Attempt {
                    at_ms,
                    ok: true,
                    error: None,
                });
            }
            Err(e) => {
                // What the middlebox runs now is unknown: it may have applied the list
                // and lost the answer, or kept its old one. Push again either way. The
                // services it acknowledged before are kept: a failed push (of a longer
                // or a shorter list) does not take them away from a running middlebox.
                t.acked = None;
                t.failures = t.failures.saturating_add(1);
                t.failed_at = Some(now);
                t.failed += 1;
                t.last = Some(Attempt {
                    at_ms,
                    ok: false,
                    error: Some(e.to_string()),
                });
            }
        }
        news
    }

    /// Compares what middlebox `ip` says it runs with what it acknowledged. A service it
    /// acknowledged and no longer runs means the process restarted (or lost its list):
    /// the acknowledgement is forgotten so that [`Pushes::due`] pushes at once instead of
    /// at the next refresh, while the redirect would send clients into a middlebox
    /// without the service. Returns whether a push is now due.
    pub fn check_running(&mut self, ip: Ipv4Addr, running: &BTreeSet<String>) -> bool {
        let Some(t) = self.tracks.get_mut(&ip) else {
            return false;
        };
        if t.in_flight || t.acked.is_none() || t.acked_names.is_subset(running) {
            return false;
        }
        t.acked = None;
        t.acked_at = None;
        true
    }

    /// Status of every registered middlebox.
    pub fn status(&self, desired: &DesiredState) -> Vec<MiddleboxStatus> {
        desired
            .middleboxes
            .iter()
            .map(|mb| {
                let services = services_for(desired, mb);
                let t = self.tracks.get(&mb.ip);
                MiddleboxStatus {
                    spec: mb.clone(),
                    services: services.iter().map(|s| s.name.clone()).collect(),
                    in_sync: t.is_some_and(|t| self.in_sync(t, mb, &services)),
                    push_in_flight: t.is_some_and(|t| t.in_flight),
                    last_push: t.and_then(|t| t.last.clone()),
                    last_ok_at_ms: t.and_then(|t| t.last_ok_at_ms),
                    pushes_ok: t.map_or(0, |t| t.ok),
                    pushes_failed: t.map_or(0, |t| t.failed),
                }
            })
            .collect()
    }

    fn in_sync(&self, t: &Track, mb: &MiddleboxSpec, services: &[ServiceEntry]) -> bool {
        t.acked
            .as_ref()
            .is_some_and(|(c, l)| *c == mb.control && *l == request_line(services))
    }

    /// Where a replication through `middlebox` stands, for its status: not registered,
    /// configured (the middlebox acknowledged the current list, which holds it), the last
    /// push's error, or pending.
    pub fn replication_state(&self, desired: &DesiredState, middlebox: Ipv4Addr) -> String {
        match desired.middlebox(middlebox) {
            Some(mb) => self.state_of(desired, mb),
            None => NOT_REGISTERED.to_string(),
        }
    }

    /// [`Pushes::replication_state`] for every registered middlebox at once: the service
    /// list is computed once per middlebox, not once per replication.
    pub fn replication_states(&self, desired: &DesiredState) -> BTreeMap<Ipv4Addr, String> {
        desired
            .middleboxes
            .iter()
            .map(|mb| (mb.ip, self.state_of(desired, mb)))
            .collect()
    }

    fn state_of(&self, desired: &DesiredState, mb: &MiddleboxSpec) -> String {
        let Some(t) = self.tracks.get(&mb.ip) else {
            return "push pending".to_string();
        };
        let services = services_for(desired, mb);
        if self.in_sync(t, mb, &services) {
            return "configured on middlebox".to_string();
        }
        // An older acknowledged list may hold this service too, but perhaps with other
        // content (replicas, interface): only the current list counts as configured.
        match &t.last {
            Some(Attempt {
                ok: false,
                error: Some(e),
                ..
            }) => format!("push failed: {e}"),
            _ => "push pending".to_string(),
        }
    }

    /// Whether registered middlebox `middlebox` has acknowledged a list holding the
    /// service of replication `id` (in any version: a change of its replicas does not
    /// make the middlebox stop serving it). Unregistered middleboxes have no service to
    /// wait for.
    pub fn serves(&self, desired: &DesiredState, middlebox: Ipv4Addr, id: u32) -> bool {
        if desired.middlebox(middlebox).is_none() {
            return true;
        }
        self.tracks
            .get(&middlebox)
            .is_some_and(|t| t.acked_names.contains(&service_name(id)))
    }

    /// (acknowledged, failed) pushes over all middleboxes, kept across unregistering.
    pub fn totals(&self) -> (u64, u64) {
        (self.total_ok, self.total_failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ModeSpec, ReplicationSpec};

    fn mb(iface: Option<&str>) -> MiddleboxSpec {
        MiddleboxSpec {
            ip: Ipv4Addr::new(198, 18, 1, 3),
            control: "unix:/run/ncp/mb.sock".into(),
            replica_interface: iface.map(str::to_string),
        }
    }

    fn rep(id: u32, source: &str, middlebox: [u8; 4]) -> ReplicationSpec {
        ReplicationSpec {
            id,
            source: source.into(),
            source_port: None,
            primary: Ipv4Addr::new(198, 18, 1, 2),
            primary_port: 6379 + u16::try_from(id).unwrap_or(0),
            middlebox: Ipv4Addr::from(middlebox),
            replicas: vec!["198.18.2.3:6379".into()],
            mode: ModeSpec::Rewrite,
            verify: Default::default(),
            login: Default::default(),
            record: None,
        }
    }

    fn state(iface: Option<&str>) -> DesiredState {
        DesiredState {
            middleboxes: vec![mb(iface)],
            replications: vec![
                rep(12, "198.18.5.77/16", [198, 18, 1, 3]),
                rep(0, "198.18.1.1", [198, 18, 1, 3]),
                rep(3, "198.18.1.1", [198, 18, 9, 9]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn golden_request_line() {
        let mut d = state(Some("eth1"));
        d.replications.retain(|r| r.id == 0);
        d.replications[0].primary_port = 6379;
        let line = request_line(&services_for(&d, &d.middleboxes[0]));
        assert_eq!(
            line,
            concat!(
                r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","#,
                r#""clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"replica_interface":"eth1"}]}"#,
                "\n"
            )
        );
        // Without a replication NIC the key is absent, not null.
        let d = DesiredState {
            middleboxes: vec![mb(None)],
            ..d
        };
        assert_eq!(
            request_line(&services_for(&d, &d.middleboxes[0])),
            concat!(
                r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","#,
                r#""clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"]}]}"#,
                "\n"
            )
        );
        // Reply verification is the service's `verify` key, present only when on.
        let mut verified = d.clone();
        verified.replications[0].verify = VerifySpec::Replies;
        assert_eq!(
            request_line(&services_for(&verified, &verified.middleboxes[0])),
            concat!(
                r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","#,
                r#""clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"verify":"replies"}]}"#,
                "\n"
            )
        );
        // A replicated protocol's login: `protocol` and the secret files' paths.
        let mut logged_in = d.clone();
        logged_in.replications[0].login = LoginSpec {
            protocol: Some(crate::store::ProtocolSpec::Redis),
            credentials: [("198.18.2.3:6379".into(), "/etc/ncp/r.secret".into())].into(),
        };
        assert_eq!(
            request_line(&services_for(&logged_in, &logged_in.middleboxes[0])),
            concat!(
                r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","#,
                r#""clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"protocol":"redis","#,
                r#""credentials":{"198.18.2.3:6379":"/etc/ncp/r.secret"}}]}"#,
                "\n"
            )
        );
        // A recorded replication: the middlebox's `record` table, defaults left to it; the
        // data plane reads that line as its own service list.
        let mut recorded = d.clone();
        recorded.replications[0].record = Some(crate::store::RecordTarget {
            dir: "/var/lib/ncp/rec".into(),
        });
        let line = request_line(&services_for(&recorded, &recorded.middleboxes[0]));
        assert_eq!(
            line,
            concat!(
                r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","#,
                r#""clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"#,
                r#""record":{"dir":"/var/lib/ncp/rec"}}]}"#,
                "\n"
            )
        );
        // A tunnel mode's overhead, which the middlebox takes off its MSS.
        let mut tunnelled = d.clone();
        tunnelled.replications[0].mode = ModeSpec::Mpls { label: 17 };
        assert_eq!(
            request_line(&services_for(&tunnelled, &tunnelled.middleboxes[0])),
            concat!(
                r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","#,
                r#""clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"tunnel_overhead_bytes":4}]}"#,
                "\n"
            )
        );
        assert_eq!(
            request_line(&[]),
            "{\"cmd\":\"services-set\",\"services\":[]}\n"
        );
    }

    #[test]
    fn service_list_is_this_middleboxes_replications_by_id() {
        let d = state(None);
        let s = services_for(&d, &d.middleboxes[0]);
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["r0", "r12"], "r3 goes through another middlebox");
        // The prefix is normalised: host bits cleared, as the middlebox stores it.
        assert_eq!(s[1].clients, "198.18.0.0/16");
        assert_eq!(s[1].primary, "198.18.1.2:6391");
        assert_eq!(s[0].replicas, ["198.18.2.3:6379"]);
        let empty = DesiredState {
            replications: vec![],
            ..d.clone()
        };
        assert!(services_for(&empty, &empty.middleboxes[0]).is_empty());
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer("{\"result\":\"done\"}\n"), Ok(()));
        assert_eq!(
            parse_answer(r#"{"result":"error","message":"no eth1"}"#),
            Err(PushError::Refused("no eth1".into()))
        );
        assert!(matches!(
            parse_answer("{\"result\":\"maybe\"}"),
            Err(PushError::Malformed(_))
        ));
        assert!(matches!(parse_answer("ok"), Err(PushError::Malformed(_))));
        assert!(matches!(parse_answer(""), Err(PushError::Malformed(_))));
    }

    /// A one-shot peer on a Unix socket that reads the request and then writes `reply`
    /// and closes.
    async fn peer(name: &str, reply: &'static [u8]) -> (ControlAddr, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ncpc-mbpeer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            if let Ok((s, _)) = l.accept().await {
                let (rd, mut wr) = s.into_split();
                let mut line = String::new();
                let _ = BufReader::new(rd).read_line(&mut line).await;
                let _ = wr.write_all(reply).await;
            }
        });
        (ControlAddr::Unix(path.clone()), path)
    }

    #[tokio::test]
    async fn broken_peers_are_errors_not_panics() {
        let t = Duration::from_secs(2);
        let line = request_line(&[]);
        let (a, p) = peer("done", b"{\"result\":\"done\"}\n").await;
        assert_eq!(push(&a, &line, t).await, Ok(()));
        let _ = std::fs::remove_file(p);
        let (a, p) = peer("closed", b"").await;
        assert!(matches!(push(&a, &line, t).await, Err(PushError::Read(_))));
        let _ = std::fs::remove_file(p);
        let (a, p) = peer("partial", b"{\"result\":\"do").await;
        assert!(matches!(
            push(&a, &line, t).await,
            Err(PushError::Malformed(_))
        ));
        let _ = std::fs::remove_file(p);
        let (a, p) = peer("binary", b"\xff\xfe\n").await;
        assert!(push(&a, &line, t).await.is_err());
        let _ = std::fs::remove_file(&p);
        let missing = ControlAddr::Unix(p.with_file_name("nobody.sock"));
        assert!(matches!(
            push(&missing, &line, t).await,
            Err(PushError::Connect(_))
        ));
        let huge = "x".repeat(MAX_REQUEST + 1);
        assert_eq!(
            push(&missing, &huge, t).await,
            Err(PushError::TooLarge(MAX_REQUEST + 1))
        );
        if let Some(dir) = p.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn pushes_when_changed_failed_or_stale() {
        let cfg = PushConfig {
            timeout: Duration::from_secs(2),
            refresh: Duration::from_secs(10),
            retry: Duration::from_secs(1),
        };
        let mut p = Pushes::new(cfg);
        let mut d = state(None);
        let t0 = Instant::now();
        let jobs = p.due(&d, t0);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].names.len(), 2);
        assert!(p.due(&d, t0).is_empty(), "one push in flight at a time");
        assert!(p.finished(&jobs[0], &Ok(()), t0), "a new list is news");
        assert!(p.status(&d)[0].in_sync);
        assert_eq!(
            p.replication_state(&d, d.middleboxes[0].ip),
            "configured on middlebox"
        );
        assert_eq!(
            p.replication_state(&d, Ipv4Addr::new(198, 18, 9, 9)),
            NOT_REGISTERED
        );
        assert!(p.due(&d, t0 + Duration::from_secs(5)).is_empty(), "in sync");
        let again = p.due(&d, t0 + Duration::from_secs(10));
        assert_eq!(again.len(), 1, "periodic refresh");
        assert!(
            !p.finished(&again[0], &Ok(()), t0 + Duration::from_secs(10)),
            "a refresh that changed nothing is not news"
        );

        // A change is pushed at once; a failure is retried with a growing backoff.
        d.replications.retain(|r| r.id != 12);
        let t1 = t0 + Duration::from_secs(11);
        let j = p.due(&d, t1);
        assert_eq!(j.len(), 1);
        assert_eq!(j[0].names.len(), 1);
        p.finished(&j[0], &Err(PushError::Refused("bad".into())), t1);
        let st = &p.status(&d)[0];
        assert!(!st.in_sync);
        assert_eq!(st.last_push.as_ref().map(|a| a.ok), Some(false));
        assert!(
            p.replication_state(&d, st.spec.ip)
                .contains("middlebox refused: bad")
        );
        assert!(p.due(&d, t1 + Duration::from_millis(500)).is_empty());
        let j = p.due(&d, t1 + Duration::from_secs(1));
        assert_eq!(j.len(), 1, "retried after 1 s");
        let timeout = Err(PushError::Timeout("read", cfg.timeout));
        assert!(
            p.finished(&j[0], &timeout, t1 + Duration::from_secs(1)),
            "another failure is news"
        );
        assert!(
            p.due(&d, t1 + Duration::from_millis(2500)).is_empty(),
            "backoff doubled"
        );
        let j = p.due(&d, t1 + Duration::from_secs(3));
        assert_eq!(j.len(), 1);
        assert!(
            !p.finished(&j[0], &timeout, t1 + Duration::from_secs(3)),
            "the same failure again is not"
        );
        assert!(p.due(&d, t1 + Duration::from_secs(6)).is_empty(), "4 s now");
        let j = p.due(&d, t1 + Duration::from_secs(7));
        assert_eq!(j.len(), 1);
        assert!(
            p.finished(&j[0], &Ok(()), t1 + Duration::from_secs(7)),
            "recovery"
        );
        assert_eq!(p.totals(), (3, 3));

        // Changing the control address or the replica interface is a different push.
        let mut p = Pushes::new(cfg);
        let j = p.due(&d, t0);
        p.finished(&j[0], &Ok(()), t0);
        d.middleboxes[0].replica_interface = Some("eth1".into());
        assert_eq!(p.due(&d, t0).len(), 1);

        // Unregistered: forgotten, nothing pushed.
        d.middleboxes.clear();
        assert!(p.due(&d, t0).is_empty());
        assert!(p.status(&d).is_empty());
    }

    #[test]
    fn a_service_counts_as_served_once_acknowledged_and_until_a_list_without_it() {
        let mut p = Pushes::new(PushConfig::default());
        let mut d = state(None);
        let mb_ip = d.middleboxes[0].ip;
        let t0 = Instant::now();
        // Replication 3's middlebox is not registered: nothing to wait for.
        assert!(p.serves(&d, Ipv4Addr::new(198, 18, 9, 9), 3));
        assert!(!p.serves(&d, mb_ip, 12), "nothing pushed yet");
        let j = p.due(&d, t0);
        assert!(!p.serves(&d, mb_ip, 12), "pushed, not acknowledged");
        p.finished(&j[0], &Ok(()), t0);
        assert!(p.serves(&d, mb_ip, 12) && p.serves(&d, mb_ip, 0));
        // A failed push of a shorter list takes nothing away; an acknowledged one does.
        d.replications.retain(|r| r.id != 12);
        let j = p.due(&d, t0);
        p.finished(&j[0], &Err(PushError::Refused("busy".into())), t0);
        assert!(p.serves(&d, mb_ip, 12));
        let j = p.due(&d, t0 + Duration::from_secs(1));
        p.finished(&j[0], &Ok(()), t0 + Duration::from_secs(1));
        assert!(!p.serves(&d, mb_ip, 12));
        assert!(p.serves(&d, mb_ip, 0));
    }

    #[test]
    fn a_middlebox_that_lost_its_services_gets_them_again_without_waiting_for_the_refresh() {
        let mut p = Pushes::new(PushConfig::default());
        let d = state(None);
        let mb_ip = d.middleboxes[0].ip;
        let t0 = Instant::now();
        let all: BTreeSet<String> = services_for(&d, &d.middleboxes[0])
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert!(
            !p.check_running(mb_ip, &BTreeSet::new()),
            "nothing acknowledged yet"
        );
        let j = p.due(&d, t0);
        assert!(
            !p.check_running(mb_ip, &BTreeSet::new()),
            "a push in flight"
        );
        p.finished(&j[0], &Ok(()), t0);
        assert!(!p.check_running(mb_ip, &all), "runs what it acknowledged");
        assert!(p.due(&d, t0 + Duration::from_secs(1)).is_empty(), "in sync");
        // Restarted: it answers its ping with an empty list.
        assert!(p.check_running(mb_ip, &BTreeSet::new()));
        assert_eq!(
            p.due(&d, t0 + Duration::from_secs(1)).len(),
            1,
            "pushed at once"
        );
        assert!(
            p.serves(&d, mb_ip, 0),
            "the redirect is not pulled for a moment's gap"
        );
    }

    #[test]
    fn the_ping_reads_the_running_services_from_any_well_formed_answer() {
        let listed = running_services(
            r#"{"result":"services","services":[{"name":"r1","primary":"x"},{"name":"r7"}]}"#,
        );
        assert_eq!(
            listed,
            Some(BTreeSet::from(["r1".to_owned(), "r7".to_owned()]))
        );
        assert_eq!(
            running_services(r#"{"result":"error","message":"busy"}"#),
            Some(BTreeSet::new())
        );
        assert_eq!(running_services("not json"), None);
    }
}
