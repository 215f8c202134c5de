//! The running controller: switch events in, converged network out.
//!
//! Three loops share one state: the event loop (switch connects, port changes, LLDP
//! packet-ins), the probe loop (LLDP out of every port, link expiry) and the reconcile
//! loop (plan from desired state plus discovered topology, then [`installer::sync`]). The
//! reconcile loop runs on a timer and whenever something relevant changes; runs never
//! overlap.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::discovery::{self, Discovery};
use crate::installer::{self, InstallReport};
use crate::openflow::{Message, PortDesc};
use crate::planner::{self, Plan};
use crate::store::{DesiredState, HostSpec, ReplicationSpec, Store, StoreError};
use crate::switch::{Controller, ServerConfig, SwitchEvent};
use crate::topology::{Dpid, PortRef, Topology};

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
    pub hosts: Vec<HostSpec>,
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

#[derive(Default)]
struct State {
    desired: DesiredState,
    ports: HashMap<Dpid, Vec<PortDesc>>,
    discovery: Discovery,
    last: Option<(Plan, InstallReport)>,
}

struct Inner {
    cfg: ServiceConfig,
    ctl: Controller,
    store: Store,
    state: Mutex<State>,
    kick: Notify,
    /// Serialises reconcile runs.
    running: tokio::sync::Mutex<()>,
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
        let (ctl, events) = Controller::start(cfg.server.clone()).await?;
        let inner = Arc::new(Inner {
            cfg,
            ctl,
            store,
            state: Mutex::new(State {
                desired,
                ..State::default()
            }),
            kick: Notify::new(),
            running: tokio::sync::Mutex::new(()),
        });
        let svc = Service { inner };
        tokio::spawn(svc.clone().event_loop(events));
        tokio::spawn(svc.clone().probe_loop());
        tokio::spawn(svc.clone().reconcile_loop());
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

    pub fn desired(&self) -> DesiredState {
        self.state().desired.clone()
    }

    /// Applies `change` to the desired state, persists it, and triggers a reconcile. The
    /// change is dropped again if it does not validate or cannot be saved.
    pub fn update<T>(&self, change: impl FnOnce(&mut DesiredState) -> T) -> Result<T, StoreError> {
        let out = {
            let mut st = self.state();
            let mut next = st.desired.clone();
            let out = change(&mut next);
            self.inner.store.save(&next)?;
            st.desired = next;
            out
        };
        self.kick();
        Ok(out)
    }

    pub fn status(&self) -> Vec<ReplicationStatus> {
        let st = self.state();
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
                        .map(|(_, e)| e.to_string());
                }
                ReplicationStatus {
                    spec: spec.clone(),
                    installed,
                    redirection_switch,
                    error,
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
        }
    }

    /// Plans from the current desired state and topology and syncs every connected switch.
    pub async fn reconcile_now(&self) -> ReconcileSummary {
        let _one_at_a_time = self.inner.running.lock().await;
        let switches = self.inner.ctl.connected();
        let mut plan = {
            let st = self.state();
            let mut topo = Topology::new();
            for d in &switches {
                topo.add_switch(*d);
            }
            st.discovery.apply_to(&mut topo);
            for h in st.desired.hosts() {
                if let Err(e) = topo.add_host(h) {
                    tracing::debug!(ip = %h.ip, error = %e, "host not placed");
                }
            }
            planner::plan(&topo, &st.desired.replications())
        };
        for (id, e) in &plan.failures {
            tracing::warn!(replication = id, error = %e, "cannot plan replication");
        }
        let mut base: Vec<_> = switches
            .iter()
            .flat_map(|d| discovery::base_rules(*d, self.inner.cfg.normal_fallback))
            .collect();
        base.append(&mut plan.rules);
        plan.rules = base;
        let report = installer::sync(&self.inner.ctl, &plan, &switches).await;
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
        self.state().last = Some((plan, report));
        summary
    }

    async fn event_loop(self, mut events: mpsc::Receiver<SwitchEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                SwitchEvent::Connected { dpid, .. } => {
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
                    drop(st);
                    self.kick();
                }
                SwitchEvent::Message { dpid, frame } => match frame.message {
                    Message::PacketIn(pi) => {
                        let Some(in_port) = pi.matched.in_port else {
                            continue;
                        };
                        let new = self.state().discovery.on_packet_in(
                            PortRef::new(dpid, in_port),
                            &pi.data,
                            Instant::now(),
                        );
                        if new {
                            tracing::info!(
                                dpid = format_args!("{dpid:#x}"),
                                in_port,
                                "link discovered"
                            );
                            self.kick();
                        }
                    }
                    Message::PortStatus(ps) => {
                        let mut st = self.state();
                        let ports = st.ports.entry(dpid).or_default();
                        ports.retain(|p| p.port_no != ps.desc.port_no);
                        let live = ps.desc.is_live();
                        let port_no = ps.desc.port_no;
                        if ps.reason != 1 {
                            ports.push(ps.desc);
                        }
                        if !live || ps.reason == 1 {
                            st.discovery.forget(dpid, Some(port_no));
                            drop(st);
                            self.kick();
                        }
                    }
                    Message::FlowRemoved(_) => self.kick(),
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

    async fn probe_loop(self) {
        let mut tick = tokio::time::interval(self.inner.cfg.probe_interval);
        loop {
            tick.tick().await;
            let ports: Vec<(Dpid, Vec<PortDesc>)> = self
                .state()
                .ports
                .iter()
                .map(|(d, p)| (*d, p.clone()))
                .collect();
            for (dpid, p) in ports {
                self.send_probes(dpid, &p).await;
            }
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

    async fn reconcile_loop(self) {
        loop {
            tokio::select! {
                () = self.inner.kick.notified() => {}
                () = tokio::time::sleep(self.inner.cfg.reconcile_interval) => {}
            }
            // Let a burst of changes (a whole network connecting) settle into one run.
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.reconcile_now().await;
        }
    }
}
