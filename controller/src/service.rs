//! The running controller: switch events in, converged network out.
//!
//! Seven loops share one state: the event loop (switch connects, port changes, LLDP,
//! learning and health-reply packet-ins), the probe loop (LLDP out of every port, link
//! expiry), the host loop (held-back hosts whose port is now trusted, host expiry, ARP
//! requests for hosts replications name but nobody has seen; see [`crate::hosts`],
//! [`crate::settle`], [`crate::search`]), the health loop (ARP probes to every middlebox
//! in use, see [`crate::health`]),
//! the reconcile loop (read every switch, plan from desired state plus discovered
//! topology, apply the difference), the push loop (service lists to the registered
//! middleboxes, see [`crate::middlebox`]) and the poll loop (each registered middlebox's
//! stats: replica consistency and counters, see [`crate::consistency`]). The health
//! loop and the reconcile run open and close the fail-open and withdrawal windows that
//! mark replicas diverged. The reconcile loop runs on a timer and whenever
//! something relevant changes; runs never overlap. The push loop runs after every
//! reconcile, right after every change of the desired state and once a second; its
//! pushes run on tasks of their own, so a middlebox that does not answer holds up
//! neither the reconcile loop nor the API.
//!
//! Re-planning happens on every change that can move a route or a redirect: a switch
//! connecting or leaving, a link discovered or lost (LLDP expiry, PORT_STATUS link down or
//! port deleted), a host learned, moved or forgotten, a middlebox going down or up, a change of the
//! desired state, and a rule removed behind our back (FLOW_REMOVED; every NCP rule asks
//! for one). After a topology change the reconcile waits until the topology has been
//! quiet for [`ServiceConfig::settle`], so a network that is still connecting (a
//! restarted controller, a re-created bridge) is planned once, complete, instead of
//! having rules deleted for switches or links that are about to appear.
//!
//! A restarted controller finds the rules it installed before and changes nothing that is
//! already right: desired state comes from the store, hosts it had learned come back from
//! the known-host rules on the switches ([`discovery::host_from_rule`]), and middleboxes
//! count as healthy until they miss their probes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::consistency::{self, PollConfig, Polls, ReplicaConsistency, Snapshot, Windows};
use crate::discovery::{self, Discovery};
use crate::health::{self, Health, HealthConfig, PROBE_MAC};
use crate::hosts::{self, LearnConfig, Learned};
use crate::installer::{self, InstallReport};
use crate::lldp;
use crate::mbstats;
use crate::middlebox::{self, MiddleboxStatus, PushConfig, PushError, Pushes};
use crate::openflow::{FlowStatsRequest, Message, PacketIn, PortDesc, port};
use crate::planner::{self, Plan, PlanError};
use crate::rules::{RuleKind, cookie};
use crate::search::{self, Search, SearchConfig};
use crate::settle::Settling;
use crate::store::{DesiredState, HostSpec, ReplicationSpec, Store, StoreError};
use crate::switch::{Controller, ServerConfig, SwitchEvent};
use crate::topology::{Dpid, Host, PortRef, Topology};

/// Entries kept in the in-memory audit log.
pub const AUDIT_LEN: usize = 512;

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub server: ServerConfig,
    pub state_file: PathBuf,
    pub probe_interval: Duration,
    /// A link not confirmed by a probe for this long is forgotten.
    pub link_ttl: Duration,
    pub reconcile_interval: Duration,
    /// Install OpenFlow NORMAL as lowest-priority rule so unsteered traffic still flows.
    pub normal_fallback: bool,
    /// Learn hosts from ARP and IPv4 PACKET_INs at edge ports (see [`crate::hosts`]).
    pub learn_hosts: bool,
    pub learn: LearnConfig,
    /// Middlebox health checks for fail-open; `None` turns them off.
    pub health: Option<HealthConfig>,
    /// After a topology change, reconcile only once nothing changed for this long; host
    /// learning trusts a port only once its switch has settled this long (see
    /// [`crate::settle`]).
    pub settle: Duration,
    /// Active discovery of hosts that replications name but nobody has seen (see
    /// [`crate::search`]); `None` turns it off. Needs `learn_hosts`.
    pub search: Option<SearchConfig>,
    /// Timing of the service pushes to registered middleboxes.
    pub push: PushConfig,
    /// Timing of the consistency and counter polls of registered middleboxes.
    pub poll: PollConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            state_file: PathBuf::from("/var/lib/ncp/controller.json"),
            probe_interval: Duration::from_secs(5),
            link_ttl: Duration::from_secs(16),
            reconcile_interval: Duration::from_secs(30),
            normal_fallback: true,
            learn_hosts: true,
            learn: LearnConfig::default(),
            health: Some(HealthConfig::default()),
            settle: Duration::from_secs(1),
            search: Some(SearchConfig::default()),
            push: PushConfig::default(),
            poll: PollConfig::default(),
        }
    }
}

/// A replication with its current state, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicationStatus {
    #[serde(flatten)]
    pub spec: ReplicationSpec,
    pub installed: bool,
    pub redirection_switch: Option<Dpid>,
    pub error: Option<String>,
    /// Whether the middlebox runs this replication's service:
    /// [`middlebox::NOT_REGISTERED`], `push pending`, `configured on middlebox` or
    /// `push failed: <reason>`.
    pub middlebox_service: String,
    /// Each replica's consistency state (see [`crate::consistency`]). Not `replicas`:
    /// the flattened spec already has that key (the replicas' addresses).
    pub replica_states: Vec<ReplicaConsistency>,
    /// Bytes the mode's tunnel adds to every redirected frame on the links from the
    /// redirection switch to the middlebox (0 for `rewrite`): the MTU headroom those links
    /// would need. A registered middlebox is sent it with the service and takes it off
    /// the MSS it advertises, so links at the hosts' MTU do.
    pub tunnel_overhead_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkView {
    pub a_dpid: Dpid,
    pub a_port: u32,
    pub b_dpid: Dpid,
    pub b_port: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopologyView {
    pub switches: Vec<Dpid>,
    pub links: Vec<LinkView>,
    /// Pinned by the operator.
    pub hosts: Vec<HostSpec>,
    /// Learned from traffic (pinned addresses excluded).
    pub learned: Vec<HostSpec>,
    /// Middleboxes that do not answer health probes.
    pub middleboxes_down: Vec<Ipv4Addr>,
}

/// One change, who made it and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The API caller's name, or `controller` for what the controller did by itself.
    pub who: String,
    pub what: String,
}

/// Counters, as the API reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Metrics {
    pub flow_mods_sent: u64,
    pub reconciles: u64,
    pub packet_ins: u64,
    pub learned_hosts: usize,
    /// Service pushes the middleboxes acknowledged.
    pub middlebox_pushes_ok: u64,
    /// Service pushes that failed (refused, timed out, unreachable).
    pub middlebox_pushes_failed: u64,
    /// Middleboxes declared down (fail-open).
    pub fail_open_events: u64,
    /// Installed redirects withdrawn for another reason than fail-open.
    pub redirect_withdrawals: u64,
    /// ARP requests for unseen hosts (one per address and switch).
    pub arp_requests_sent: u64,
    /// Learned hosts forgotten for silence.
    pub hosts_expired: u64,
    /// Learned hosts forgotten because their port turned out to carry a link.
    pub hosts_dropped_on_links: u64,
    /// Replicas marked in step by an operator.
    pub replica_resets: u64,
    /// Switch connections refused for claiming the datapath id of a connected switch
    /// that still answered an echo probe.
    pub duplicate_dpid_refused: u64,
    /// OpenFlow peers refused in the TLS handshake (no or an untrusted certificate).
    pub tls_refused: u64,
    /// Switch connections refused for claiming a datapath id their certificate does not
    /// grant.
    pub unauthorized_dpid_refused: u64,
}

/// Summary of the last reconcile run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileSummary {
    pub switches: usize,
    pub added: usize,
    pub deleted: usize,
    pub rejected: usize,
    pub conflicts: usize,
    pub unreachable: Vec<Dpid>,
}

struct State {
    desired: DesiredState,
    ports: HashMap<Dpid, Vec<PortDesc>>,
    discovery: Discovery,
    learned: Learned,
    health: Health,
    /// Switches whose rules have been read since they connected: learned hosts are
    /// recovered from a switch's first read only.
    read_once: BTreeSet<Dpid>,
    /// When ports may be believed to be edge ports and the topology to be complete.
    settling: Settling,
    /// Hosts named by replications that nobody has seen: ARP requests out.
    search: Search,
    /// Deleted replications whose redirect may still be on a switch: their services stay
    /// in the middleboxes' lists until a reconcile run has reached every switch.
    retiring: Vec<ReplicationSpec>,
    audit: VecDeque<AuditEntry>,
    last: Option<(Plan, InstallReport)>,
    pushes: Pushes,
    /// Registered middleboxes whose process did not answer its last control-socket ping:
    /// their ARP answers do not count, so they go down like a silent host.
    process_dead: std::collections::BTreeSet<Ipv4Addr>,
    /// Fail-open and withdrawal windows, operator resets.
    windows: Windows,
    /// What the consistency file holds now (written again only when this changes).
    windows_saved: Snapshot,
    /// The last stats answer of each registered middlebox.
    polls: Polls,
    /// Middleboxes to poll at once (after a reset), not at their next interval.
    poll_asap: Vec<Ipv4Addr>,
}

impl State {
    fn topology_changed(&mut self) {
        self.settling.changed(Instant::now());
    }

    /// What the middleboxes are told to run: the desired state, plus the deleted
    /// replications whose redirects may still be on the switches.
    fn push_view(&self) -> std::borrow::Cow<'_, DesiredState> {
        if self.retiring.is_empty() {
            return std::borrow::Cow::Borrowed(&self.desired);
        }
        let mut view = self.desired.clone();
        view.replications.extend(
            self.retiring
                .iter()
                .filter(|r| !self.desired.replications.iter().any(|d| d.id == r.id))
                .cloned(),
        );
        std::borrow::Cow::Owned(view)
    }

    /// Addresses that replications need located and no pinned or learned host has: the
    /// primaries, the middleboxes and single-address sources.
    fn missing_hosts(&self) -> Vec<Ipv4Addr> {
        let known: BTreeSet<Ipv4Addr> = self.all_hosts().iter().map(|h| h.ip).collect();
        let mut v: Vec<Ipv4Addr> = self
            .desired
            .replications()
            .iter()
            .flat_map(|r| {
                let source = (r.source.prefix_len() == 32).then(|| r.source.addr());
                [Some(r.primary), Some(r.middlebox), source]
            })
            .flatten()
            .filter(|ip| !known.contains(ip))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Logs and audits what a host observation changed; true when it needs a re-plan.
    fn note_learn(&mut self, learn: hosts::Learn, how: &str) -> bool {
        match learn {
            hosts::Learn::Nothing => false,
            hosts::Learn::New(h) => {
                let (dpid, port) = (h.at.dpid, h.at.port);
                tracing::info!(ip = %h.ip, mac = %h.mac, dpid = format_args!("{dpid:#x}"), port, how, "host learned");
                self.audit(
                    CONTROLLER,
                    format!(
                        "host {} ({}) learned at {dpid:#x}:{port} {how}",
                        h.ip, h.mac
                    ),
                );
                true
            }
            hosts::Learn::Moved { from, host } => {
                let (dpid, port) = (host.at.dpid, host.at.port);
                tracing::info!(ip = %host.ip, from = format_args!("{:#x}:{}", from.dpid, from.port), to = format_args!("{dpid:#x}:{port}"), "host moved; re-planning");
                self.audit(
                    CONTROLLER,
                    format!(
                        "host {} moved from {:#x}:{} to {dpid:#x}:{port}",
                        host.ip, from.dpid, from.port
                    ),
                );
                true
            }
        }
    }

    /// Logs and audits hosts forgotten for `why`.
    fn forgotten(&mut self, gone: &[Host], why: &str) {
        for h in gone {
            let (dpid, port) = (h.at.dpid, h.at.port);
            tracing::info!(ip = %h.ip, dpid = format_args!("{dpid:#x}"), port, why, "host forgotten; re-planning");
            self.audit(
                CONTROLLER,
                format!("host {} forgotten at {dpid:#x}:{port}: {why}", h.ip),
            );
        }
    }

    fn audit(&mut self, who: &str, what: String) {
        if self.audit.len() >= AUDIT_LEN {
            self.audit.pop_front();
        }
        let at_ms = now_ms();
        self.audit.push_back(AuditEntry {
            at_ms,
            who: who.to_string(),
            what,
        });
    }

    fn pinned(&self, ip: Ipv4Addr) -> bool {
        self.desired.hosts.iter().any(|h| h.ip == ip)
    }

    /// Pinned hosts, then learned ones whose address is not pinned.
    fn all_hosts(&self) -> Vec<Host> {
        let mut v = self.desired.hosts();
        v.extend(self.learned.hosts().filter(|h| !self.pinned(h.ip)).copied());
        v
    }

    /// Where the middleboxes of the replications sit, by port. A middlebox sends as other
    /// hosts (it answers the client as the primary), so nothing but its own address is
    /// learned there, and its port is exempt from the copy to the controller like a link.
    fn middlebox_ports(&self, hosts: &[Host]) -> BTreeMap<PortRef, Ipv4Addr> {
        self.desired
            .replications
            .iter()
            .filter_map(|r| hosts.iter().find(|h| h.ip == r.middlebox))
            .map(|h| (h.at, h.ip))
            .collect()
    }
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why an operator's replica reset was not done.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("no replication {0}")]
    NoReplication(u32),
    #[error("replication {id} has no replica {replica} (its replicas: {known})")]
    NoReplica {
        id: u32,
        replica: std::net::SocketAddrV4,
        known: String,
    },
    #[error(
        "middlebox {0} of this replication is not registered, so it keeps no consistency state to reset (register it: PUT /v1/middleboxes/{0})"
    )]
    NotRegistered(Ipv4Addr),
    #[error("middlebox {middlebox} did not take the reset: {error}")]
    Middlebox {
        middlebox: Ipv4Addr,
        error: PushError,
    },
}

/// What a reset replaced.
#[derive(Debug, Clone, Serialize)]
pub struct ResetDone {
    pub replication: u32,
    pub replica: std::net::SocketAddrV4,
    /// The state before, in one line.
    pub was: String,
    pub at_ms: u64,
}

fn host_spec(h: &Host) -> HostSpec {
    HostSpec {
        ip: h.ip,
        mac: h.mac.to_string(),
        dpid: h.at.dpid,
        port: h.at.port,
    }
}

/// Whether replication `id`'s redirect is on any switch in `flows` (as read).
fn redirect_on(flows: &BTreeMap<Dpid, Vec<crate::rules::FlowRule>>, id: u32) -> bool {
    let flow = cookie(RuleKind::Flow, id);
    flows
        .values()
        .flatten()
        .any(|r| r.cookie == flow && r.priority == crate::rules::PRIORITY_REDIRECT)
}

/// What a replication that failed with `e` is waiting for, when the failure is a host the
/// controller is searching for (see [`crate::search`]).
fn waiting_for(e: &PlanError, search: &Search) -> Option<String> {
    let ip = match e {
        PlanError::UnknownHost(ip) => *ip,
        PlanError::NoSourceHost(p) if p.prefix_len() == 32 => p.addr(),
        _ => return None,
    };
    let sent = search.requests(ip)?;
    Some(format!(
        "waiting for host {ip}: not seen yet, {sent} ARP requests sent"
    ))
}

/// Ports of `dpid` whose traffic is never copied to the controller for learning: ports
/// with a discovered link and ports where a middlebox sits.
fn exempt_ports(
    discovery: &Discovery,
    middleboxes: &BTreeMap<PortRef, Ipv4Addr>,
    dpid: Dpid,
) -> Vec<u32> {
    let mut v = discovery.link_ports(dpid);
    v.extend(
        middleboxes
            .keys()
            .filter(|p| p.dpid == dpid)
            .map(|p| p.port),
    );
    v.sort_unstable();
    v.dedup();
    v
}

/// Who the controller is in the audit log.
pub const CONTROLLER: &str = "controller";

/// The state file's sidecar with the consistency windows ([`Store::sidecar`]).
const CONSISTENCY_FILE: &str = "consistency";

struct Inner {
    cfg: ServiceConfig,
    ctl: Controller,
    store: Store,
    state: Mutex<State>,
    kick: Notify,
    /// Wakes the push loop.
    push_kick: Notify,
    /// Wakes the poll loop.
    poll_kick: Notify,
    /// Serialises reconcile runs.
    running: tokio::sync::Mutex<()>,
    /// Serialises writes of the consistency file.
    saving_windows: Mutex<()>,
    reconciles: AtomicU64,
    packet_ins: AtomicU64,
    arp_requests: AtomicU64,
    hosts_expired: AtomicU64,
    hosts_dropped_on_links: AtomicU64,
}

/// Handle on the running service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    /// Loads the desired state, starts listening for switches and starts the loops.
    pub async fn start(cfg: ServiceConfig) -> anyhow::Result<Service> {
        let store = Store::new(&cfg.state_file);
        let desired = store.load()?;
        // The windows of earlier runs: a replica diverged before a restart stays so, and
        // a redirect found missing after one is known to have let writes past.
        let saved: Snapshot = store.load_sidecar(CONSISTENCY_FILE)?;
        let (ctl, events) = Controller::start(cfg.server.clone()).await?;
        let inner = Arc::new(Inner {
            ctl,
            store,
            state: Mutex::new(State {
                desired,
                ports: HashMap::new(),
                discovery: Discovery::default(),
                learned: Learned::new(cfg.learn),
                health: Health::new(cfg.health.unwrap_or_default()),
                read_once: BTreeSet::new(),
                settling: Settling::new(cfg.settle),
                search: Search::new(cfg.search.unwrap_or_default()),
                retiring: Vec::new(),
                audit: VecDeque::new(),
                last: None,
                pushes: Pushes::new(cfg.push),
                process_dead: std::collections::BTreeSet::new(),
                windows: Windows::from_snapshot(saved.clone()),
                windows_saved: saved,
                polls: Polls::new(cfg.poll),
                poll_asap: Vec::new(),
            }),
            cfg,
            kick: Notify::new(),
            push_kick: Notify::new(),
            poll_kick: Notify::new(),
            running: tokio::sync::Mutex::new(()),
            saving_windows: Mutex::new(()),
            reconciles: AtomicU64::new(0),
            packet_ins: AtomicU64::new(0),
            arp_requests: AtomicU64::new(0),
            hosts_expired: AtomicU64::new(0),
            hosts_dropped_on_links: AtomicU64::new(0),
        });
        let svc = Service { inner };
        tokio::spawn(svc.clone().event_loop(events));
        tokio::spawn(svc.clone().probe_loop());
        tokio::spawn(svc.clone().reconcile_loop());
        tokio::spawn(svc.clone().push_loop());
        tokio::spawn(svc.clone().poll_loop());
        if svc.inner.cfg.learn_hosts {
            tokio::spawn(svc.clone().host_loop());
        }
        if let Some(h) = svc.inner.cfg.health {
            tokio::spawn(svc.clone().health_loop(h));
        }
        Ok(svc)
    }

    pub fn controller(&self) -> &Controller {
        &self.inner.ctl
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few field updates; a poisoned lock still holds a
        // consistent state.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for a reconcile run soon.
    pub fn kick(&self) {
        self.inner.kick.notify_one();
    }

    /// Asks the push loop to look at the middleboxes now.
    fn kick_push(&self) {
        self.inner.push_kick.notify_one();
    }

    pub fn desired(&self) -> DesiredState {
        self.state().desired.clone()
    }

    /// Applies `change` to the desired state, persists it, logs it with `who` made it, and
    /// triggers a reconcile. `change` returns its result and, when it changed anything, a
    /// description for the log. The change is dropped again if it does not validate or
    /// cannot be saved.
    pub fn update<T>(
        &self,
        who: &str,
        change: impl FnOnce(&mut DesiredState) -> (T, Option<String>),
    ) -> Result<T, StoreError> {
        let out = {
            let mut st = self.state();
            let mut next = st.desired.clone();
            let (out, what) = change(&mut next);
            let Some(what) = what else {
                return Ok(out);
            };
            if let Err(e) = self.inner.store.save(&next) {
                tracing::warn!(who, change = %what, error = %e, "change refused");
                return Err(e);
            }
            tracing::info!(who, change = %what, "desired state changed");
            st.audit(who, what);
            let installed = st.last.as_ref().map(|(_, r)| r.installed.clone());
            let gone: Vec<ReplicationSpec> = st
                .desired
                .replications
                .iter()
                .filter(|r| !next.replications.iter().any(|n| n.id == r.id))
                .filter(|r| installed.as_ref().is_some_and(|i| i.contains(&r.id)))
                .cloned()
                .collect();
            st.retiring.extend(gone);
            st.desired = next;
            out
        };
        self.kick();
        // Middleboxes need not wait for the switches: their lists depend on desired
        // state only.
        self.kick_push();
        Ok(out)
    }

    /// The audit log, oldest first.
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.state().audit.iter().cloned().collect()
    }

    pub fn metrics(&self) -> Metrics {
        let st = self.state();
        let (middlebox_pushes_ok, middlebox_pushes_failed) = st.pushes.totals();
        let (fail_open_events, redirect_withdrawals, replica_resets) = st.windows.totals();
        Metrics {
            fail_open_events,
            redirect_withdrawals,
            replica_resets,
            flow_mods_sent: self.inner.ctl.flow_mods_sent(),
            reconciles: self.inner.reconciles.load(Ordering::Relaxed),
            packet_ins: self.inner.packet_ins.load(Ordering::Relaxed),
            arp_requests_sent: self.inner.arp_requests.load(Ordering::Relaxed),
            hosts_expired: self.inner.hosts_expired.load(Ordering::Relaxed),
            hosts_dropped_on_links: self.inner.hosts_dropped_on_links.load(Ordering::Relaxed),
            learned_hosts: st.learned.len(),
            middlebox_pushes_ok,
            middlebox_pushes_failed,
            duplicate_dpid_refused: self.inner.ctl.duplicate_claims_refused(),
            tls_refused: self.inner.ctl.tls_refused(),
            unauthorized_dpid_refused: self.inner.ctl.unauthorized_claims(),
        }
    }

    /// Registered middleboxes with their push status.
    pub fn middleboxes(&self) -> Vec<MiddleboxStatus> {
        let st = self.state();
        st.pushes.status(&st.push_view())
    }

    /// What a replication through `middlebox` reports as its `middlebox_service`.
    pub fn middlebox_service(&self, middlebox: Ipv4Addr) -> String {
        let st = self.state();
        st.pushes.replication_state(&st.push_view(), middlebox)
    }

    /// An operator (`who`) says `replica` of replication `id` is in step again (it was
    /// re-cloned): the middlebox is told first (`replica-reset`), then the controller's
    /// own windows stop counting for it. Audited and logged.
    pub async fn reset_replica(
        &self,
        who: &str,
        id: u32,
        replica: std::net::SocketAddrV4,
    ) -> Result<ResetDone, ResetError> {
        let (mb, addr, was) = {
            let st = self.state();
            let r = st
                .desired
                .replications
                .iter()
                .find(|r| r.id == id)
                .ok_or(ResetError::NoReplication(id))?;
            if !consistency::replicas_of(r).contains(&replica) {
                return Err(ResetError::NoReplica {
                    id,
                    replica,
                    known: r.replicas.join(", "),
                });
            }
            let addr = st
                .desired
                .middlebox(r.middlebox)
                .and_then(|m| m.control_addr().ok())
                .ok_or(ResetError::NotRegistered(r.middlebox))?;
            let was = consistency::merge(&st.desired, &st.polls, &st.windows)
                .remove(&id)
                .and_then(|l| l.into_iter().find(|x| x.replica == replica))
                .map(|x| x.summary)
                .unwrap_or_default();
            (r.middlebox, addr, was)
        };
        let service = consistency::service_name(id);
        middlebox::reset_replica(&addr, &service, replica, self.inner.cfg.poll.timeout)
            .await
            .map_err(|error| {
                tracing::warn!(who, replication = id, %replica, middlebox = %mb, error = %error, "replica reset failed");
                ResetError::Middlebox { middlebox: mb, error }
            })?;
        let at_ms = now_ms();
        {
            let mut st = self.state();
            st.windows.reset(id, replica, who, at_ms);
            st.audit(
                who,
                format!("mark replica {replica} of replication {id} in step (was: {was})"),
            );
            if !st.poll_asap.contains(&mb) {
                st.poll_asap.push(mb);
            }
        }
        self.save_windows();
        tracing::info!(who, replication = id, %replica, middlebox = %mb, at_ms, was = %was, "replica marked in step by the operator");
        self.inner.poll_kick.notify_one();
        Ok(ResetDone {
            replication: id,
            replica,
            was,
            at_ms,
        })
    }

    /// Everything `GET /metrics` shows, now.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let counters = self.metrics();
        let st = self.state();
        let (polls_ok, polls_failed) = st.polls.totals();
        crate::metrics::Snapshot {
            switches_connected: self.inner.ctl.connected().len(),
            fail_open_events: counters.fail_open_events,
            withdrawals: counters.redirect_withdrawals,
            operator_resets: counters.replica_resets,
            polls_ok,
            polls_failed,
            replicas: consistency::merge(&st.desired, &st.polls, &st.windows),
            middleboxes: st
                .polls
                .iter()
                .filter_map(|(ip, p)| p.report.clone().map(|r| (*ip, p.error.is_none(), r)))
                .collect(),
            counters,
        }
    }

    pub fn status(&self) -> Vec<ReplicationStatus> {
        let st = self.state();
        let pushed = st.pushes.replication_states(&st.push_view());
        let mut replicas = consistency::merge(&st.desired, &st.polls, &st.windows);
        st.desired
            .replications
            .iter()
            .map(|spec| {
                let (mut installed, mut redirection_switch, mut error) = (false, None, None);
                if let Some((plan, report)) = &st.last {
                    installed = report.installed.contains(&spec.id);
                    redirection_switch = plan
                        .plans
                        .iter()
                        .find(|p| p.id == spec.id)
                        .map(|p| p.redirection_switch);
                    error = plan
                        .failures
                        .iter()
                        .find(|(id, _)| *id == spec.id)
                        .map(|(_, e)| waiting_for(e, &st.search).unwrap_or_else(|| e.to_string()));
                }
                ReplicationStatus {
                    spec: spec.clone(),
                    installed,
                    redirection_switch,
                    error,
                    middlebox_service: pushed
                        .get(&spec.middlebox)
                        .cloned()
                        .unwrap_or_else(|| middlebox::NOT_REGISTERED.to_string()),
                    replica_states: replicas.remove(&spec.id).unwrap_or_default(),
                    tunnel_overhead_bytes: spec.tunnel_overhead_bytes(),
                }
            })
            .collect()
    }

    pub fn topology(&self) -> TopologyView {
        let st = self.state();
        TopologyView {
            switches: self.inner.ctl.connected(),
            links: st
                .discovery
                .links()
                .map(|(a, b)| LinkView {
                    a_dpid: a.dpid,
                    a_port: a.port,
                    b_dpid: b.dpid,
                    b_port: b.port,
                })
                .collect(),
            hosts: st.desired.hosts.clone(),
            learned: st
                .learned
                .hosts()
                .filter(|h| !st.pinned(h.ip))
                .map(host_spec)
                .collect(),
            middleboxes_down: st.health.down(),
        }
    }

    /// Reads every connected switch, plans from the current desired state and topology,
    /// and applies the difference.
    pub async fn reconcile_now(&self) -> ReconcileSummary {
        let _one_at_a_time = self.inner.running.lock().await;
        self.inner.reconciles.fetch_add(1, Ordering::Relaxed);
        let switches = self.inner.ctl.connected();
        let (flows, report) = installer::read(&self.inner.ctl, &switches).await;
        let cfg = &self.inner.cfg;
        let mut plan = {
            let mut st = self.state();
            let now = Instant::now();
            for (dpid, rules) in &flows {
                if !st.read_once.insert(*dpid) || !cfg.learn_hosts {
                    continue;
                }
                for h in rules.iter().filter_map(discovery::host_from_rule) {
                    if !st.pinned(h.ip) && st.learned.recover(h, now) {
                        tracing::info!(ip = %h.ip, dpid = format_args!("{:#x}", h.at.dpid), port = h.at.port, "learned host recovered from its switch");
                    }
                }
            }
            let mut topo = Topology::new();
            for d in &switches {
                topo.add_switch(*d);
            }
            st.discovery.apply_to(&mut topo);
            for h in st.all_hosts() {
                if let Err(e) = topo.add_host(h) {
                    tracing::debug!(ip = %h.ip, error = %e, "host not placed");
                }
            }
            let (up, down): (Vec<_>, Vec<_>) = st
                .desired
                .replications()
                .into_iter()
                .partition(|r| st.health.is_up(r.middlebox));
            // A redirect goes in only once its middlebox runs the service; one already on
            // the switches (a restarted controller) stays while the push catches up.
            let (up, unserved): (Vec<_>, Vec<_>) = up.into_iter().partition(|r| {
                st.pushes.serves(&st.desired, r.middlebox, r.id) || redirect_on(&flows, r.id)
            });
            let mut plan = planner::plan(&topo, &up);
            plan.failures.extend(
                down.iter()
                    .map(|r| (r.id, PlanError::MiddleboxDown(r.middlebox))),
            );
            plan.failures.extend(
                unserved
                    .iter()
                    .map(|r| (r.id, PlanError::ServiceNotAcknowledged(r.middlebox))),
            );
            let mut base = Vec::new();
            let hosts: Vec<Host> = topo.hosts().copied().collect();
            let mb_ports = st.middlebox_ports(&hosts);
            for d in &switches {
                base.extend(discovery::base_rules(*d, cfg.normal_fallback));
                // Health probes and host searches are answered to the same MAC.
                if cfg.health.is_some() || self.searching() {
                    base.push(discovery::probe_reply_rule(*d));
                }
                if cfg.learn_hosts {
                    base.extend(discovery::learning_rules(
                        *d,
                        cfg.normal_fallback,
                        exempt_ports(&st.discovery, &mb_ports, *d),
                        &hosts,
                    ));
                }
            }
            base.append(&mut plan.rules);
            plan.rules = base;
            plan
        };
        plan.failures.sort_by_key(|(id, _)| *id);
        for (id, e) in &plan.failures {
            tracing::debug!(replication = id, error = %e, "replication not planned");
        }
        let report = installer::sync_read(&self.inner.ctl, &plan, &flows, report).await;
        let summary = ReconcileSummary {
            switches: switches.len(),
            added: report.switches.values().map(|s| s.added).sum(),
            deleted: report.switches.values().map(|s| s.deleted).sum(),
            rejected: report.switches.values().map(|s| s.rejected.len()).sum(),
            conflicts: report.switches.values().map(|s| s.conflicts.len()).sum(),
            unreachable: report
                .switches
                .iter()
                .filter(|(_, s)| s.error.is_some())
                .map(|(d, _)| *d)
                .collect(),
        };
        if summary.added + summary.deleted + summary.rejected + summary.conflicts > 0 {
            tracing::info!(?summary, installed = ?report.installed, "reconciled");
        }
        // Switches that now carry the rule lifting LLDP for the first time: probe every
        // switch again, so the links toward them are found now rather than a probe
        // interval later, while their ports are still untrusted.
        let newly_ready = {
            let mut st = self.state();
            let now = Instant::now();
            report
                .switches
                .iter()
                .filter(|(_, s)| s.error.is_none())
                .filter(|(d, _)| st.settling.switch_ready(**d, now))
                .count()
        };
        if newly_ready > 0 {
            self.probe_all().await;
        }
        // Report changes of a replication's fate once, not on every run.
        {
            let mut st = self.state();
            let before: BTreeSet<u32> = st
                .last
                .as_ref()
                .map(|(_, r)| r.installed.clone())
                .unwrap_or_default();
            let now = now_ms();
            for (id, e) in &plan.failures {
                if before.contains(id) {
                    tracing::warn!(replication = id, error = %e, "replication withdrawn");
                    // Fail-open has its own window (opened by the health loop).
                    if !matches!(e, PlanError::MiddleboxDown(_))
                        && st.windows.withdrawn(*id, e.to_string(), now)
                    {
                        st.audit(
                            CONTROLLER,
                            format!("redirect of replication {id} withdrawn: {e}"),
                        );
                    }
                }
            }
            for id in &report.redirects_added {
                if let Some(since) = st.windows.redirect_restored(*id, now) {
                    tracing::warn!(
                        replication = id,
                        since = %consistency::utc(since),
                        "redirect was missing on its switch and is restored; the replicas may have missed writes since it was last seen"
                    );
                    st.audit(
                        CONTROLLER,
                        format!(
                            "redirect of replication {id} found missing and restored; its replicas may have missed writes since {}",
                            consistency::utc(since)
                        ),
                    );
                }
            }
            for id in &report.installed {
                st.windows.installed(*id, now);
            }
            let st = &mut *st;
            st.windows.retain(&st.desired);
            // Every switch answered: the redirects of deleted replications are gone, so
            // their services may leave the middleboxes' lists.
            if summary.unreachable.is_empty() {
                st.retiring.clear();
            }
            st.last = Some((plan, report));
        }
        self.save_windows();
        self.kick_push();
        summary
    }

    /// Writes the consistency file when the windows, resets or install times changed
    /// since it was last written. A failure is logged and retried at the next call.
    fn save_windows(&self) {
        // One writer at a time, snapshot taken inside: two saves racing on the same
        // temporary file could otherwise leave an older snapshot, or a torn one.
        let _writing = self
            .inner
            .saving_windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let snapshot = {
            let st = self.state();
            let now = st.windows.snapshot();
            if now == st.windows_saved {
                return;
            }
            now
        };
        match self.inner.store.save_sidecar(CONSISTENCY_FILE, &snapshot) {
            Ok(()) => self.state().windows_saved = snapshot,
            Err(e) => {
                tracing::error!(error = %e, "consistency file not written; replica states may not survive a restart")
            }
        }
    }

    /// Handles a PACKET_IN: LLDP probe, health-probe reply, or a frame to learn from.
    fn on_packet_in(&self, dpid: Dpid, pi: &PacketIn) {
        self.inner.packet_ins.fetch_add(1, Ordering::Relaxed);
        let Some(in_port) = pi.matched.in_port else {
            return;
        };
        let at = PortRef::new(dpid, in_port);
        let now = Instant::now();
        if let Some((d, p)) = lldp::parse_probe(&pi.data) {
            let from = PortRef::new(d, p);
            let mut st = self.state();
            if st.discovery.observe(from, at, now) {
                // Hosts "seen" on these ports were traffic passing through.
                let mut dropped = st.learned.drop_port(from);
                dropped.extend(st.learned.drop_port(at));
                st.forgotten(&dropped, "the port carries a link");
                st.topology_changed();
                drop(st);
                self.inner.hosts_dropped_on_links.fetch_add(
                    u64::try_from(dropped.len()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                tracing::info!(
                    dpid = format_args!("{dpid:#x}"),
                    in_port,
                    from = format_args!("{d:#x}:{p}"),
                    dropped_hosts = dropped.len(),
                    "link discovered"
                );
                self.kick();
            }
            return;
        }
        let Some(sender) = hosts::parse_sender(&pi.data) else {
            return;
        };
        let mut kick = false;
        let mut st = self.state();
        if sender.arp_op == Some(2)
            && sender.eth_dst == PROBE_MAC
            && !st.process_dead.contains(&sender.ip)
            && let Some(c) = st.health.answered(sender.ip)
        {
            tracing::info!(middlebox = %c.ip, "middlebox answers again; restoring its redirects");
            st.audit(CONTROLLER, format!("middlebox {} up", c.ip));
            st.windows.fail_open_ended(c.ip, now_ms());
            kick = true;
        }
        if self.inner.cfg.learn_hosts
            && in_port <= port::MAX
            && !st.discovery.is_link_port(at)
            && !st.pinned(sender.ip)
            && st
                .middlebox_ports(&st.all_hosts())
                .get(&at)
                .is_none_or(|mb| *mb == sender.ip)
        {
            let trusted = st.settling.trusted(at, now);
            let heard = if search::answers_us(sender.eth_dst, sender.arp_op) {
                hosts::Heard::Answer
            } else {
                hosts::Heard::Traffic
            };
            let learn = st
                .learned
                .observe(sender.ip, sender.mac, at, now, trusted, heard);
            kick |= st.note_learn(learn, heard.describe());
        }
        drop(st);
        if kick {
            self.kick();
        }
    }

    async fn event_loop(self, mut events: mpsc::Receiver<SwitchEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                SwitchEvent::Connected { dpid, .. } => {
                    self.state().topology_changed();
                    let svc = self.clone();
                    tokio::spawn(async move {
                        match svc.inner.ctl.port_desc(dpid).await {
                            Ok(ports) => {
                                svc.send_probes(dpid, &ports).await;
                                svc.state().ports.insert(dpid, ports);
                            }
                            Err(e) => {
                                tracing::warn!(dpid = format_args!("{dpid:#x}"), error = %e, "no port list")
                            }
                        }
                        svc.kick();
                    });
                }
                SwitchEvent::Disconnected { dpid, .. } => {
                    let mut st = self.state();
                    st.ports.remove(&dpid);
                    st.discovery.forget(dpid, None);
                    st.read_once.remove(&dpid);
                    st.settling.switch_gone(dpid, Instant::now());
                    drop(st);
                    self.kick();
                }
                SwitchEvent::Message { dpid, frame } => match frame.message {
                    Message::PacketIn(pi) => self.on_packet_in(dpid, &pi),
                    Message::PortStatus(ps) => {
                        let live = ps.desc.is_live() && ps.reason != 1;
                        let port_no = ps.desc.port_no;
                        let desc = ps.desc.clone();
                        let lost = {
                            let mut st = self.state();
                            let ports = st.ports.entry(dpid).or_default();
                            ports.retain(|p| p.port_no != ps.desc.port_no);
                            if ps.reason != 1 {
                                ports.push(ps.desc);
                            }
                            if live {
                                st.settling
                                    .port_up(PortRef::new(dpid, port_no), Instant::now());
                            }
                            let lost = if live {
                                0
                            } else {
                                st.discovery.forget(dpid, Some(port_no))
                            };
                            if lost > 0 {
                                st.topology_changed();
                            }
                            lost
                        };
                        if lost > 0 {
                            tracing::info!(
                                dpid = format_args!("{dpid:#x}"),
                                port = port_no,
                                "link down; re-planning"
                            );
                            self.kick();
                        }
                        if live {
                            // A port that comes up may carry a new link: probe it now.
                            self.send_probes(dpid, std::slice::from_ref(&desc)).await;
                        }
                    }
                    Message::FlowRemoved(fr) if crate::rules::is_ncp_cookie(fr.cookie) => {
                        tracing::debug!(
                            dpid = format_args!("{dpid:#x}"),
                            cookie = format_args!("{:#x}", fr.cookie),
                            reason = fr.reason,
                            "NCP rule removed on the switch"
                        );
                        self.kick();
                    }
                    _ => {}
                },
            }
        }
    }

    async fn send_probes(&self, dpid: Dpid, ports: &[PortDesc]) {
        for m in discovery::probes(dpid, ports, self.inner.cfg.link_ttl) {
            if let Err(e) = self.inner.ctl.send(dpid, m).await {
                tracing::debug!(dpid = format_args!("{dpid:#x}"), error = %e, "probe not sent");
                return;
            }
        }
    }

    /// Sends LLDP probes out of every port of every switch whose ports are known.
    async fn probe_all(&self) {
        let ports: Vec<(Dpid, Vec<PortDesc>)> = self
            .state()
            .ports
            .iter()
            .map(|(d, p)| (*d, p.clone()))
            .collect();
        for (dpid, p) in ports {
            self.send_probes(dpid, &p).await;
        }
    }

    async fn probe_loop(self) {
        let mut tick = tokio::time::interval(self.inner.cfg.probe_interval);
        loop {
            tick.tick().await;
            self.probe_all().await;
            let gone = self
                .state()
                .discovery
                .expire(Instant::now(), self.inner.cfg.link_ttl);
            if !gone.is_empty() {
                tracing::info!(?gone, "links expired");
                self.kick();
            }
        }
    }

    /// Probes every middlebox in use (see [`crate::health`]).
    async fn health_loop(self, cfg: HealthConfig) {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Fail-open windows open and close here and on probe answers: keep them on
            // disk as they change (a no-op when nothing did).
            self.save_windows();
            let (probes, changes) = {
                let mut st = self.state();
                let hosts = st.all_hosts();
                let mut located: Vec<Host> = Vec::new();
                for r in &st.desired.replications {
                    if let Some(h) = hosts.iter().find(|h| h.ip == r.middlebox)
                        && !located.iter().any(|l| l.ip == h.ip)
                    {
                        located.push(*h);
                    }
                }
                let ips: Vec<Ipv4Addr> = located.iter().map(|h| h.ip).collect();
                let down_before = st.health.down();
                let changes = st.health.round(&ips);
                let now = now_ms();
                for c in &changes {
                    st.audit(CONTROLLER, format!("middlebox {} down", c.ip));
                    let st = &mut *st;
                    st.windows.fail_open(&st.desired, c.ip, now);
                }
                // A middlebox no longer in use is no longer down: its window ends too.
                for ip in down_before {
                    if st.health.is_up(ip) {
                        st.windows.fail_open_ended(ip, now);
                    }
                }
                (located, changes)
            };
            for c in &changes {
                tracing::warn!(
                    middlebox = %c.ip,
                    failures = cfg.failures,
                    "middlebox stopped answering; withdrawing its redirects (fail-open)"
                );
            }
            if !changes.is_empty() {
                self.kick();
            }
            // Registered middleboxes are also asked through their control socket whether
            // the process runs; the answer is in by the next round.
            let controls: Vec<(Ipv4Addr, crate::store::ControlAddr)> = {
                let st = self.state();
                st.desired
                    .middleboxes
                    .iter()
                    .filter(|m| probes.iter().any(|h| h.ip == m.ip))
                    .filter_map(|m| m.control_addr().ok().map(|a| (m.ip, a)))
                    .collect()
            };
            for (ip, addr) in controls {
                let svc = self.clone();
                let wait = cfg.interval;
                tokio::spawn(async move {
                    let running = middlebox::ping(&addr, wait).await;
                    let mut st = svc.state();
                    if let Some(running) = running {
                        st.process_dead.remove(&ip);
                        if st.pushes.check_running(ip, &running) {
                            tracing::info!(middlebox = %ip, "middlebox runs without services it acknowledged (restarted?); pushing them again");
                            drop(st);
                            svc.inner.push_kick.notify_one();
                        }
                    } else if st.process_dead.insert(ip) {
                        tracing::warn!(middlebox = %ip, "middlebox process does not answer on its control socket");
                    }
                });
            }
            for h in probes {
                let msg = health::probe_out(h.ip, h.mac, &[h.at.port]);
                if let Err(e) = self.inner.ctl.send(h.at.dpid, msg).await {
                    tracing::debug!(middlebox = %h.ip, error = %e, "health probe not sent");
                }
            }
        }
    }

    /// Starts the pushes that are due (see [`middlebox::Pushes::due`]), each on its own
    /// task: this loop never waits for a middlebox.
    async fn push_loop(self) {
        let timeout = self.inner.cfg.push.timeout;
        loop {
            tokio::select! {
                () = self.inner.push_kick.notified() => {}
                // Retries and refreshes come due by time alone.
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let jobs = {
                let mut st = self.state();
                let st = &mut *st;
                let view = st.push_view().into_owned();
                st.pushes.due(&view, Instant::now())
            };
            for job in jobs {
                let svc = self.clone();
                tokio::spawn(async move {
                    let result = middlebox::push(&job.addr, &job.line, timeout).await;
                    let news = svc.state().pushes.finished(&job, &result, Instant::now());
                    match &result {
                        Ok(()) if news => tracing::info!(
                            middlebox = %job.ip,
                            control = %job.control,
                            services = job.names.len(),
                            "middlebox configured"
                        ),
                        Ok(()) => tracing::debug!(middlebox = %job.ip, "middlebox still in sync"),
                        Err(e) if news => tracing::warn!(
                            middlebox = %job.ip,
                            control = %job.control,
                            services = job.names.len(),
                            error = %e,
                            "service push to middlebox failed; will retry"
                        ),
                        // The same failure again: GET /v1/middleboxes shows it, the log
                        // need not say it every retry.
                        Err(e) => {
                            tracing::debug!(middlebox = %job.ip, error = %e, "service push failed again")
                        }
                    }
                    // A service newly acknowledged lets its redirect go in.
                    if result.is_ok() && news {
                        svc.kick();
                    }
                    // The list may have changed while this push was out.
                    svc.kick_push();
                });
            }
        }
    }

    /// Asks every registered middlebox for its stats (consistency state and counters)
    /// each [`PollConfig::interval`], and at once after a reset. Polls run on tasks of
    /// their own, each step bounded by [`PollConfig::timeout`], at most one per
    /// middlebox: a stuck middlebox holds up nothing but its own next poll.
    async fn poll_loop(self) {
        let cfg = self.inner.cfg.poll;
        // Often enough that a poll starts close to its due time.
        let tick = (cfg.interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::select! {
                () = self.inner.poll_kick.notified() => {}
                () = tokio::time::sleep(tick) => {}
            }
            let jobs = {
                let mut st = self.state();
                let st = &mut *st;
                let jobs = st.polls.due(&st.desired, Instant::now(), &st.poll_asap);
                // A middlebox whose poll was in flight is asked again once that one is
                // back: its answer may predate the reset.
                let desired = &st.desired;
                st.poll_asap.retain(|ip| {
                    desired.middlebox(*ip).is_some() && !jobs.iter().any(|j| j.ip == *ip)
                });
                jobs
            };
            for job in jobs {
                let svc = self.clone();
                tokio::spawn(async move {
                    let result = middlebox::exchange(
                        &job.addr,
                        mbstats::STATS_REQUEST,
                        cfg.timeout,
                        mbstats::MAX_STATS_ANSWER,
                    )
                    .await
                    .and_then(|line| mbstats::parse_stats(&line));
                    let error = result.as_ref().err().map(ToString::to_string);
                    let news = svc.state().polls.finished(job.ip, result, now_ms());
                    match error {
                        Some(e) if news => {
                            tracing::warn!(middlebox = %job.ip, error = %e, "middlebox stats poll failed; its replicas show as unknown")
                        }
                        None if news => {
                            tracing::info!(middlebox = %job.ip, "middlebox stats poll answers again")
                        }
                        _ => {}
                    }
                });
            }
        }
    }

    /// Whether unseen hosts are searched for (see [`crate::search`]).
    fn searching(&self) -> bool {
        self.inner.cfg.learn_hosts && self.inner.cfg.search.is_some()
    }

    /// Host bookkeeping on the controller's clock: candidates whose port is now trusted
    /// become hosts, silent hosts expire, and unseen hosts that replications name are
    /// asked for. Each change re-plans.
    async fn host_loop(self) {
        let cfg = &self.inner.cfg;
        let retry = cfg.search.map_or(Duration::from_secs(1), |s| s.first_retry);
        let tick = (cfg.settle / 4)
            .min(retry)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        // A candidate older than this saw a network that has changed since.
        let max_age = (cfg.settle * 4).max(Duration::from_secs(2));
        loop {
            tokio::time::sleep(tick).await;
            let (promoted, silent) = {
                let mut st = self.state();
                let st = &mut *st;
                let now = Instant::now();
                let (settling, discovery) = (&st.settling, &st.discovery);
                let changes = st.learned.promote(now, max_age, |p| {
                    settling.trusted(p, now) && !discovery.is_link_port(p)
                });
                let mut promoted = false;
                for (learn, heard) in changes {
                    promoted |= st.note_learn(learn, heard.describe());
                }
                (promoted, st.learned.silent(now))
            };
            let expired = self.expire_silent(silent).await;
            if promoted || expired {
                self.kick();
            }
            if self.searching() {
                self.search_round().await;
            }
        }
    }

    /// Hosts silent for the expiry time: their known-host rules' counters are read first
    /// (the switch no longer copies a known host's IPv4 to us), those still silent are
    /// asked with an ARP request out of their own port, and those that did not answer in
    /// time are forgotten. Returns whether any host was forgotten.
    async fn expire_silent(&self, silent: Vec<Host>) -> bool {
        for h in &silent {
            let req =
                FlowStatsRequest::by_cookie(cookie(RuleKind::Host, u32::from(h.ip)), u64::MAX);
            // An unreadable switch counts nothing: the host stays silent.
            if let Ok(stats) = self.inner.ctl.flow_stats(h.at.dpid, req).await {
                let packets = stats.iter().map(|s| s.packet_count).sum();
                self.state().learned.counted(h.ip, packets, Instant::now());
            }
        }
        let expiry = {
            let mut st = self.state();
            let expiry = st.learned.expire(Instant::now());
            st.forgotten(&expiry.gone, "silent for the host expiry time");
            expiry
        };
        for h in &expiry.ask {
            let msg = health::probe_out(h.ip, h.mac, &[h.at.port]);
            if let Err(e) = self.inner.ctl.send(h.at.dpid, msg).await {
                tracing::debug!(ip = %h.ip, error = %e, "ARP request to a silent host not sent");
            }
        }
        self.inner.hosts_expired.fetch_add(
            u64::try_from(expiry.gone.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        !expiry.gone.is_empty()
    }

    /// Sends the ARP requests that are due for hosts replications name but nobody has
    /// seen: one PACKET_OUT per address and switch, out of the switch's edge ports.
    async fn search_round(&self) {
        let requests: Vec<(Dpid, Message)> = {
            let mut st = self.state();
            let now = Instant::now();
            let missing = st.missing_hosts();
            st.search.want(missing, now);
            let due = st.search.due(now);
            if due.is_empty() {
                return;
            }
            tracing::debug!(?due, "asking for unseen hosts");
            let mut out = Vec::new();
            for (dpid, ports) in &st.ports {
                let edge = search::edge_ports(ports, &st.discovery.link_ports(*dpid));
                out.extend(
                    due.iter()
                        .filter_map(|ip| search::request(*ip, &edge))
                        .map(|m| (*dpid, m)),
                );
            }
            out
        };
        for (dpid, msg) in requests {
            match self.inner.ctl.send(dpid, msg).await {
                Ok(()) => {
                    self.inner.arp_requests.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(dpid = format_args!("{dpid:#x}"), error = %e, "ARP request not sent")
                }
            }
        }
    }

    async fn reconcile_loop(self) {
        let settle = self.inner.cfg.settle;
        loop {
            tokio::select! {
                () = self.inner.kick.notified() => {}
                () = tokio::time::sleep(self.inner.cfg.reconcile_interval) => {}
            }
            // Let a burst of changes (a whole network connecting) settle into one run.
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Wait for a quiet topology, but not forever on a flapping one.
            let waiting = Instant::now();
            loop {
                let wait = self.state().settling.wait(Instant::now());
                if wait.is_zero() || waiting.elapsed() >= settle * 5 {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
            self.reconcile_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LoginSpec, ModeSpec, VerifySpec};

    #[test]
    fn the_status_says_what_headroom_a_tunnel_needs() {
        let spec = |mode| ReplicationSpec {
            id: 1,
            source: "198.18.3.11".into(),
            source_port: None,
            primary: "198.18.4.31".parse().expect("address"),
            primary_port: 5432,
            middlebox: "198.18.4.99".parse().expect("address"),
            replicas: Vec::new(),
            mode,
            verify: VerifySpec::Off,
            login: LoginSpec::default(),
            record: None,
        };
        assert_eq!(spec(ModeSpec::Rewrite).tunnel_overhead_bytes(), 0);
        assert_eq!(spec(ModeSpec::Vlan { vid: 100 }).tunnel_overhead_bytes(), 4);
        assert_eq!(
            spec(ModeSpec::Mpls { label: 17 }).tunnel_overhead_bytes(),
            4
        );
    }
}
