//! `ncp-middlebox run`: attaches the steering program to every configured interface,
//! starts one pinned worker per queue of the client-facing interfaces (each also owning a
//! socket on the replication NIC's queue when services name one), serves the control
//! socket (whose `stats` carry the workers' replication counters), and tears everything
//! down in reverse order when asked to stop. Services with `record` get one recorder each
//! per generation of workers, shared by all workers and finished after they have stopped.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    config::{Config, InterfaceConfig, PortRange},
    control::{self, ControlServer, Handler, InterfaceStats, Request, Response, Stats},
    driver::ConsistencyBook,
    offline::{recorder::RecordHandle, services::ServiceRecorders},
    rules::RedirectRule,
    xdp::handover::{self, Handover, Ownership, Waker},
    xdp::kernel_ports,
    xdp::steering::{AttachedMode, Steering},
    xdp::transport::{self, CLIENT_LINK, ReplicationStats, ServicePlan},
    xdp::worker::{self, LinkSpec, Worker, WorkerSpec, WorkerStats},
    xdp::xsk::XskOptions,
};

/// How long a new generation of workers retries binding a queue the previous generation's
/// socket still holds (see [`start_workers`]).
const BUSY_QUEUE_PATIENCE: Duration = Duration::from_secs(5);

/// Which data plane carries the sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// XDP steering into AF_XDP sockets and user-space TCP on pinned workers.
    #[default]
    Xdp,
    /// Kernel TCP sockets reached through an nftables redirect: the paper's own design,
    /// the fallback for hosts without AF_XDP and the baseline for benchmarks.
    Sockets,
}

/// Runs the middlebox in `mode` until `stop` is set (by SIGINT/SIGTERM in the binary).
pub fn run_mode(config: &Config, mode: Mode, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    match mode {
        Mode::Xdp => run(config, stop),
        Mode::Sockets => run_sockets(config, stop),
    }
}

/// `--mode sockets`: the kernel-socket relay, with the same control socket for `stats`.
fn run_sockets(config: &Config, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let stats = crate::sockets::StatsHandle::new();
    let handler = SocketsHandler {
        stats: stats.clone(),
    };
    let _control = ControlServer::start(&config.control_socket, handler)?;
    tracing::info!(socket = %config.control_socket.display(), "sockets-mode middlebox running; stop with SIGINT or SIGTERM");
    crate::sockets::run(config, stop, &stats)
}

struct SocketsHandler {
    stats: crate::sockets::StatsHandle,
}

impl Handler for SocketsHandler {
    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Stats => match serde_json::to_value(self.stats.snapshot()) {
                Ok(value) => Response::Stats(Stats {
                    replication: Some(value),
                    consistency: self.stats.consistency().report(),
                    ..Stats::default()
                }),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::ReplicaReset { service, replica } => {
                control::reset_replica(self.stats.consistency(), &service, replica)
            }
            Request::Services => Response::Error {
                message: "sockets mode serves the services of its configuration file".into(),
            },
            Request::ServicesSet { .. } => Response::Error {
                message: "sockets mode cannot change services at run time; restart it with the new configuration".into(),
            },
            Request::Rules | Request::RuleAdd { .. } | Request::RuleDel { .. } => Response::Error {
                message: "sockets mode has no XDP redirect rules; services are steered by nftables"
                    .into(),
            },
        }
    }
}

/// Runs the XDP/AF_XDP middlebox until `stop` is set: steering on every interface,
/// then the workers (each terminating the services' clients and replicating their
/// streams, see [`crate::xdp::transport`]), then the control socket.
pub fn run(config: &Config, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    // Refuse a layout the workers cannot serve, or a recording that cannot start, before
    // touching any interface.
    plan_workers(config)?;
    let mut recorders = ServiceRecorders::start(&config.services)?;
    // One book for the whole run: it outlives worker generations, so a replica's state
    // survives a change of the service list.
    let consistency = ConsistencyBook::new();
    raise_memlock_limit();
    warn_of_arp_flux(config);
    warn_of_kernel_ports(config);
    let mut steerings = Vec::new();
    for iface in &config.interfaces {
        let mut steering = Steering::attach(&iface.name, iface.xdp_mode)
            .with_context(|| format!("setting up XDP on {}", iface.name))?;
        steering.set_owned_endpoints(iface.address, iface.ports)?;
        for rule in &config.all_rules() {
            steering.insert_rule(rule)?;
        }
        steerings.push(steering);
    }

    // Workers run in generations: a new service list stops one generation and starts the
    // next (sessions in flight are reset), while the XDP programs stay attached. Each
    // generation has its own recorders, since the new list may record differently.
    let mut generation_stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let started = start_workers(
        config,
        &recorders.handles(),
        &consistency,
        &mut steerings,
        &generation_stop,
        &mut workers,
        Duration::ZERO,
    );
    if let Err(e) = started {
        generation_stop.store(true, Ordering::Relaxed);
        workers.into_iter().for_each(Worker::join);
        return Err(e);
    }

    let (reconfigure_tx, reconfigure_rx) = mpsc::channel::<Reconfigure>();
    let handler = MiddleboxHandler {
        steerings: Arc::new(Mutex::new(steerings)),
        rules: config.all_rules().into_iter().map(|r| (r.id, r)).collect(),
        workers: workers.iter().map(Worker::stats_handle).collect(),
        config: config.clone(),
        consistency: consistency.clone(),
        reconfigure: reconfigure_tx,
    };
    let steerings = Arc::clone(&handler.steerings);
    let control = ControlServer::start(&config.control_socket, handler)?;
    tracing::info!(socket = %config.control_socket.display(), "middlebox running; stop with SIGINT or SIGTERM");

    while !stop.load(Ordering::Relaxed) {
        let Ok(change) = reconfigure_rx.recv_timeout(Duration::from_millis(50)) else {
            continue;
        };
        // The new recorders first: if one cannot start, the running generation is left
        // alone and the change refused.
        let next_recorders = match ServiceRecorders::start(&change.config.services) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(error = %message, "starting the new services' recordings failed");
                let _ = change.reply.send(Err(message));
                continue;
            }
        };
        generation_stop.store(true, Ordering::Relaxed);
        workers.drain(..).for_each(Worker::join);
        // The old workers are gone: their sessions, reset at stop, end in the files.
        std::mem::replace(&mut recorders, next_recorders).finish();
        generation_stop = Arc::new(AtomicBool::new(false));
        let result = {
            let mut guard = steerings
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // The XSKMAP holds a reference to every old socket, which keeps its queue
            // bound: release them before the new generation binds the same queues.
            release_sockets(&mut guard);
            start_workers(
                &change.config,
                &recorders.handles(),
                &consistency,
                &mut guard,
                &generation_stop,
                &mut workers,
                BUSY_QUEUE_PATIENCE,
            )
        };
        let answer = result
            .map(|()| workers.iter().map(Worker::stats_handle).collect())
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &answer {
            tracing::error!(error = %e, "starting workers for the new services failed");
        }
        let _ = change.reply.send(answer);
    }
    generation_stop.store(true, Ordering::Relaxed);
    tracing::info!("stopping");
    drop(control);
    workers.into_iter().for_each(Worker::join);
    // Nothing is queued any more: this writes out what the workers recorded (sessions
    // reset at stop end as aborted) before the files are closed.
    recorders.finish();
    let steerings = match Arc::try_unwrap(steerings) {
        Ok(mutex) => mutex
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
        Err(_) => anyhow::bail!("steering still shared at shutdown"),
    };
    for steering in steerings {
        let name = steering.interface().to_owned();
        drop(steering);
        tracing::info!(interface = %name, "XDP program detached");
    }
    Ok(())
}

/// The workers XDP mode starts: one per queue of every client-facing interface. An
/// interface named as some service's `replica_interface` is a replication NIC: it gets
/// no workers of its own; instead each worker also opens a socket on the replication
/// NIC's queue with the same index and connects that service's replicas through it (the
/// paper's two-NIC layout, with the replica traffic kept on its own NIC and the worker
/// still owning all of a session's connections).
///
/// The plans carry no recorders: [`run`] hands each worker the services' recorders when
/// it starts them.
pub fn plan_workers(config: &Config) -> anyhow::Result<Vec<WorkerSpec>> {
    let replication_nics: Vec<&str> = {
        let mut names: Vec<&str> = config
            .services
            .iter()
            .filter_map(|s| s.replica_interface.as_deref())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    };
    let client_facing: Vec<&InterfaceConfig> = config
        .interfaces
        .iter()
        .filter(|i| !replication_nics.contains(&i.name.as_str()))
        .collect();
    if client_facing.is_empty() {
        anyhow::bail!(
            "every interface is some service's replica_interface; XDP mode needs one for the clients"
        );
    }
    if !replication_nics.is_empty() && client_facing.len() > 1 {
        // Two client interfaces would both want queue N of the replication NIC, and one
        // AF_XDP socket per queue is all a NIC takes.
        anyhow::bail!(
            "XDP mode supports a replica_interface only with a single client-facing interface \
             (found {})",
            client_facing.len()
        );
    }
    let nic = |name: &str| {
        config
            .interfaces
            .iter()
            .find(|i| i.name == name)
            .with_context(|| format!("replica_interface {name} is not configured"))
    };
    let mut specs = Vec::new();
    for iface in client_facing {
        // The workers of one NIC share its frames: RSS (or veth) puts frames on queues
        // without regard to who owns their session, so each link is split into port
        // shares and frames are handed to their owner (see `handover`).
        let workers = iface.queues.len();
        let shared = workers > 1 && !config.services.is_empty();
        let wakers: Vec<Arc<Waker>> = if shared {
            (0..workers)
                .map(|_| Waker::new().map(Arc::new))
                .collect::<std::io::Result<_>>()
                .context("creating the workers' eventfds")?
        } else {
            Vec::new()
        };
        let split = |name: &str, address: Ipv4Addr, ports: PortRange| {
            Ownership::split(address, ports, workers).with_context(|| {
                format!("{name}: the owned port range {ports:?} has fewer ports than the {workers} queues that share it")
            })
        };
        let mut link_ends: Vec<Vec<Handover>> = Vec::new();
        let mut shares: Vec<Vec<PortRange>> = Vec::new();
        if shared {
            let mut nics = vec![(iface.name.as_str(), iface.address, iface.ports)];
            for name in &replication_nics {
                let r = nic(name)?;
                nics.push((r.name.as_str(), r.address, r.ports));
            }
            for (name, address, ports) in nics {
                let ownership = split(name, address, ports)?;
                shares.push(ownership.shares.clone());
                link_ends.push(handover::link_handovers(&ownership, &wakers));
            }
        }
        // Worker `w`'s port share on link `l` (the whole range when nothing is shared).
        let share = |l: usize, w: usize, whole: PortRange| {
            shares
                .get(l)
                .and_then(|s| s.get(w))
                .copied()
                .unwrap_or(whole)
        };
        for (w, queue) in iface.queues.iter().enumerate() {
            let mut replica_links = Vec::new();
            for name in &replication_nics {
                let r = nic(name)?;
                if !r.queues.iter().any(|q| q.queue == queue.queue) {
                    anyhow::bail!(
                        "replication NIC {name} must list queue {} like {} does: the worker of \
                         {} queue {} connects replicas through it",
                        queue.queue,
                        iface.name,
                        iface.name,
                        queue.queue
                    );
                }
                replica_links.push(LinkSpec {
                    socket: xsk_options(r, queue.queue),
                    address: r.address,
                    ports: share(replica_links.len() + 1, w, r.ports),
                    mtu: usize::from(r.mtu),
                });
            }
            let services = config
                .services
                .iter()
                .map(|s| {
                    let link = s
                        .replica_interface
                        .as_deref()
                        .and_then(|n| replication_nics.iter().position(|r| *r == n))
                        .map_or(CLIENT_LINK, |i| i + 1);
                    ServicePlan::new(s, link)
                })
                .collect();
            specs.push(WorkerSpec {
                link: LinkSpec {
                    socket: xsk_options(iface, queue.queue),
                    address: iface.address,
                    ports: share(0, w, iface.ports),
                    mtu: usize::from(config.client_mtu(iface)),
                },
                handover: link_ends
                    .iter()
                    .filter_map(|ends| ends.get(w).cloned())
                    .collect(),
                waker: wakers.get(w).cloned(),
                replica_links,
                core: queue.core,
                poll: config.poll,
                services,
                manager: transport::manager_config(config),
                tcp: config.tcp,
            });
        }
    }
    Ok(specs)
}

fn xsk_options(iface: &InterfaceConfig, queue: u32) -> XskOptions {
    XskOptions {
        interface: iface.name.clone(),
        queue,
        frames: iface.umem_frames,
        zero_copy: iface.zero_copy,
    }
}

/// Starts the workers of `config`, each with `recorders` (one per service, in order).
///
/// The kernel frees a closed AF_XDP socket's queue binding a little after the close, so a
/// new generation passes a `busy_patience`: a bind that finds its queue busy is retried
/// for that long (the first generation passes zero: nothing was bound before it).
fn start_workers(
    config: &Config,
    recorders: &[Option<RecordHandle>],
    consistency: &ConsistencyBook,
    steerings: &mut [Steering],
    stop: &Arc<AtomicBool>,
    workers: &mut Vec<Worker>,
    busy_patience: Duration,
) -> anyhow::Result<()> {
    let attempt = |steerings: &mut [Steering], workers: &mut Vec<Worker>| -> anyhow::Result<()> {
        for mut spec in plan_workers(config)? {
            for (plan, record) in spec.services.iter_mut().zip(recorders) {
                plan.record.clone_from(record);
                plan.consistency = consistency.clone();
            }
            let core = spec
                .core
                .map_or_else(|| "unpinned".to_owned(), |c| format!("core {c}"));
            let (worker, sockets) = Worker::start(spec, Arc::clone(stop))?;
            workers.push(worker);
            for socket in sockets {
                let steering = steerings
                    .iter_mut()
                    .find(|s| s.interface() == socket.interface)
                    .with_context(|| format!("no XDP program on {}", socket.interface))?;
                steering.register_socket(socket.queue, socket.fd)?;
                tracing::info!(
                    "{} queue {} -> worker on {core}",
                    socket.interface,
                    socket.queue
                );
            }
        }
        Ok(())
    };
    let deadline = std::time::Instant::now() + busy_patience;
    loop {
        match attempt(steerings, workers) {
            Ok(()) => return Ok(()),
            Err(e) if format!("{e:#}").contains("busy") && std::time::Instant::now() < deadline => {
                stop.store(true, Ordering::Relaxed);
                workers.drain(..).for_each(Worker::join);
                stop.store(false, Ordering::Relaxed);
                release_sockets(steerings);
                tracing::debug!(error = %format!("{e:#}"), "queue still busy; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Empties every XSKMAP slot, so that closed sockets really go away.
fn release_sockets(steerings: &mut [Steering]) {
    for steering in steerings.iter_mut() {
        for queue in 0..ncp_common::MAX_QUEUES {
            // Most slots are empty already; that error is the expected answer.
            let _ = steering.unregister_socket(queue);
        }
    }
}

/// Warns when the middlebox has several NICs and answers ARP for any of its addresses on
/// any of them (Linux's default, `arp_ignore=0`): a controller looking for the production
/// address may then learn the middlebox behind its replication NIC and steer there.
fn warn_of_arp_flux(config: &Config) {
    if config.interfaces.len() < 2 {
        return;
    }
    let read = |scope: &str| {
        ipv4_sysctl(&format!("conf/{scope}/arp_ignore")).and_then(|v| v.trim().parse::<u8>().ok())
    };
    let all = read("all").unwrap_or(0);
    let flux: Vec<&str> = config
        .interfaces
        .iter()
        .filter(|i| answers_any_address(all, read(&i.name).unwrap_or(0)))
        .map(|i| i.name.as_str())
        .collect();
    if !flux.is_empty() {
        tracing::warn!(
            interfaces = ?flux,
            "these NICs answer ARP for the middlebox's other addresses (arp_ignore=0); \
             a controller may learn the middlebox on the wrong switch port: set \
             net.ipv4.conf.all.arp_ignore=1 and arp_announce=2"
        );
    }
}

/// Warns when the kernel may hand out the workers' upstream ports as its own ephemeral
/// ports (see [`crate::xdp::kernel_ports`] for what goes wrong then).
fn warn_of_kernel_ports(config: &Config) {
    let ephemeral =
        ipv4_sysctl("ip_local_port_range").and_then(|t| kernel_ports::parse_port_range(&t));
    let reserved =
        ipv4_sysctl("ip_local_reserved_ports").and_then(|t| kernel_ports::parse_reserved(&t));
    let (Some(ephemeral), Some(reserved)) = (ephemeral, reserved) else {
        tracing::debug!("could not read the kernel's ephemeral and reserved ports");
        return;
    };
    for iface in &config.interfaces {
        let ours = iface.ports;
        if let Some((count, first)) = kernel_ports::unreserved_ephemeral(ours, ephemeral, &reserved)
        {
            tracing::warn!(
                interface = %iface.name,
                ports = %format!("{}-{}", ours.first, ours.last),
                open = count,
                first_open = first,
                kernel_ephemeral = %format!("{}-{}", ephemeral.first, ephemeral.last),
                "the kernel may take these upstream ports for its own connections, which \
                 then lose their answers to the workers, and servers holding such a \
                 connection in TIME-WAIT stall ours for a second: reserve them with \
                 sysctl -w net.ipv4.ip_local_reserved_ports={}-{}",
                ours.first,
                ours.last
            );
        }
    }
}

/// A setting under `/proc/sys/net/ipv4/` of the middlebox's network namespace, if it
/// can be read.
fn ipv4_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{path}")).ok()
}

/// Whether an interface answers ARP for addresses of other interfaces: the kernel uses
/// the larger of the `all` and the interface's `arp_ignore`.
fn answers_any_address(all: u8, iface: u8) -> bool {
    all.max(iface) == 0
}

/// AF_XDP UMEMs count against RLIMIT_MEMLOCK on older kernels; lift it where allowed.
fn raise_memlock_limit() {
    if let Err(e) = crate::sys::raise_memlock_limit() {
        // Newer kernels charge UMEMs to the memory cgroup instead: not fatal.
        tracing::debug!(error = %e, "could not raise RLIMIT_MEMLOCK; continuing");
    }
}

/// A worker's identity and live counters, as the control handler keeps them.
type WorkerHandle = (WorkerSpec, Arc<WorkerStats>);

/// A new service list for the run loop, which restarts the workers with it.
struct Reconfigure {
    config: Config,
    reply: mpsc::Sender<Result<Vec<WorkerHandle>, String>>,
}

struct MiddleboxHandler {
    steerings: Arc<Mutex<Vec<Steering>>>,
    rules: BTreeMap<u32, RedirectRule>,
    workers: Vec<WorkerHandle>,
    /// The configuration the current workers run.
    config: Config,
    /// The replicas' consistency, written by the workers.
    consistency: ConsistencyBook,
    reconfigure: mpsc::Sender<Reconfigure>,
}

impl MiddleboxHandler {
    fn stats(&self, steerings: &[Steering]) -> Response {
        let mut stats = Stats::default();
        for steering in steerings {
            match steering.counters() {
                Ok(xdp) => stats.interfaces.push(InterfaceStats {
                    name: steering.interface().to_owned(),
                    mode: match steering.mode() {
                        AttachedMode::Driver => "driver".into(),
                        AttachedMode::Generic => "generic".into(),
                    },
                    xdp,
                }),
                Err(e) => {
                    return Response::Error {
                        message: e.to_string(),
                    };
                }
            }
        }
        stats.consistency = self.consistency.report();
        stats.workers = self
            .workers
            .iter()
            .map(|(spec, counters)| worker::snapshot(spec, counters).into())
            .collect();
        let replication = ReplicationStats::from_workers(
            self.workers.iter().map(|(_, c)| c.replication()).collect(),
        );
        match serde_json::to_value(replication) {
            Ok(value) => stats.replication = Some(value),
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                };
            }
        }
        Response::Stats(stats)
    }

    fn add_rule(&mut self, steerings: &mut [Steering], rule: RedirectRule) -> Response {
        if let Err(e) = rule.validate() {
            return Response::Error {
                message: format!("rule {rule}: {e}"),
            };
        }
        if let Some(old) = self.rules.get(&rule.id).copied() {
            for steering in steerings.iter_mut() {
                if let Err(e) = steering.remove_rule(&old) {
                    tracing::warn!(error = %e, "removing the rule being replaced");
                }
            }
        }
        for steering in steerings.iter_mut() {
            if let Err(e) = steering.insert_rule(&rule) {
                return Response::Error {
                    message: e.to_string(),
                };
            }
        }
        tracing::info!(%rule, "rule installed");
        self.rules.insert(rule.id, rule);
        Response::Done
    }

    fn remove_rule(&mut self, steerings: &mut [Steering], id: u32) -> Response {
        let Some(rule) = self.rules.remove(&id) else {
            return Response::Error {
                message: format!("no rule with id {id}"),
            };
        };
        for steering in steerings.iter_mut() {
            if let Err(e) = steering.remove_rule(&rule) {
                return Response::Error {
                    message: e.to_string(),
                };
            }
        }
        tracing::info!(%rule, "rule removed");
        Response::Done
    }
}

impl MiddleboxHandler {
    /// Replaces the services: checks the new configuration, swaps the implied redirect
    /// rules, then has the run loop restart the workers with it.
    fn set_services(&mut self, services: Vec<crate::config::ServiceConfig>) -> Response {
        if services == self.config.services {
            return Response::Done;
        }
        let mut next = self.config.clone();
        next.services = services;
        if let Err(e) = next
            .validate(crate::config::available_cores())
            .and_then(|()| {
                plan_workers(&next)
                    .map_err(|e| crate::config::ConfigError::Invalid(format!("{e:#}")))
            })
        {
            return Response::Error {
                message: format!("services refused: {e}"),
            };
        }
        {
            let mut steerings = self
                .steerings
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let old: Vec<RedirectRule> = self
                .rules
                .values()
                .filter(|r| r.id >= crate::config::SERVICE_RULE_ID_BASE)
                .copied()
                .collect();
            for rule in old {
                for steering in steerings.iter_mut() {
                    if let Err(e) = steering.remove_rule(&rule) {
                        tracing::warn!(error = %e, "removing a service rule");
                    }
                }
                self.rules.remove(&rule.id);
            }
            for rule in next
                .all_rules()
                .into_iter()
                .filter(|r| r.id >= crate::config::SERVICE_RULE_ID_BASE)
            {
                for steering in steerings.iter_mut() {
                    if let Err(e) = steering.insert_rule(&rule) {
                        return Response::Error {
                            message: e.to_string(),
                        };
                    }
                }
                self.rules.insert(rule.id, rule);
            }
        }
        let (reply, answer) = mpsc::channel();
        if self
            .reconfigure
            .send(Reconfigure {
                config: next.clone(),
                reply,
            })
            .is_err()
        {
            return Response::Error {
                message: "the middlebox is shutting down".into(),
            };
        }
        match answer.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(workers)) => {
                self.workers = workers;
                let names: Vec<&str> = next.services.iter().map(|s| s.name.as_str()).collect();
                tracing::info!(services = ?names, "services replaced; workers restarted");
                // Replicas no longer configured leave the book; new ones joined it as
                // unknown when the workers started.
                self.consistency.retain(|service, replica| {
                    next.services
                        .iter()
                        .any(|s| s.name == service && s.replicas.contains(&replica))
                });
                self.config = next;
                Response::Done
            }
            Ok(Err(message)) => Response::Error { message },
            Err(_) => Response::Error {
                message: "workers did not restart within 20 s".into(),
            },
        }
    }
}

impl Handler for MiddleboxHandler {
    fn handle(&mut self, request: Request) -> Response {
        let request = match request {
            Request::ServicesSet { services } => return self.set_services(services),
            Request::Services => {
                return Response::Services {
                    services: self.config.services.clone(),
                };
            }
            Request::ReplicaReset { service, replica } => {
                return control::reset_replica(&self.consistency, &service, replica);
            }
            other => other,
        };
        let steerings = Arc::clone(&self.steerings);
        let mut steerings = steerings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match request {
            Request::Stats => self.stats(&steerings),
            Request::Rules => Response::Rules {
                rules: self.rules.values().copied().collect(),
            },
            Request::RuleAdd { rule } => self.add_rule(&mut steerings, rule),
            Request::RuleDel { id } => self.remove_rule(&mut steerings, id),
            Request::Services | Request::ServicesSet { .. } | Request::ReplicaReset { .. } => {
                Response::Error {
                    message: "handled above".into(),
                }
            }
        }
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    fn config(eth0_queues: &str, replica_interface: &str) -> Config {
        toml::from_str(&format!(
            r#"
            [[interfaces]]
            name = "eth0"
            address = "198.18.1.4"
            queues = {eth0_queues}
            [[interfaces]]
            name = "eth1"
            address = "198.18.2.4"
            queues = [{{ queue = 0 }}, {{ queue = 1 }}]
            [[services]]
            name = "svc"
            primary = "198.18.1.2:80"
            replicas = ["198.18.2.3:80"]
            {replica_interface}
            "#
        ))
        .unwrap()
    }

    #[test]
    fn a_replication_nic_rides_along_with_the_client_facing_worker() {
        let workers =
            plan_workers(&config("[{ queue = 0 }]", "replica_interface = \"eth1\"")).unwrap();
        assert_eq!(workers.len(), 1, "eth1 gets no worker of its own");
        assert_eq!(workers[0].link.socket.interface, "eth0");
        assert_eq!(workers[0].replica_links.len(), 1);
        assert_eq!(workers[0].replica_links[0].socket.interface, "eth1");
        assert_eq!(workers[0].replica_links[0].socket.queue, 0);
        assert_eq!(workers[0].services[0].replica_route, 1);
        assert!(workers[0].handover.is_empty(), "one worker shares nothing");
        // Without a replication NIC eth1 serves clients too, with its two queues.
        let workers = plan_workers(&config("[{ queue = 0 }]", "")).unwrap();
        assert_eq!(workers.len(), 3);
    }

    #[test]
    fn a_tunnelled_service_lowers_the_client_links_mtu_only() {
        let mut c = config("[{ queue = 0 }]", "replica_interface = \"eth1\"");
        c.services[0].tunnel_overhead_bytes = 4;
        let workers = plan_workers(&c).unwrap();
        assert_eq!(workers[0].link.mtu, 1496, "clients arrive tagged: MSS 1456");
        assert_eq!(
            workers[0].replica_links[0].mtu, 1500,
            "replicas are not tunnelled"
        );
    }

    #[test]
    fn workers_of_one_nic_share_its_ports_and_hand_frames_over() {
        let workers = plan_workers(&config(
            "[{ queue = 0 }, { queue = 1 }]",
            "replica_interface = \"eth1\"",
        ))
        .unwrap();
        assert_eq!(workers.len(), 2);
        for (w, spec) in workers.iter().enumerate() {
            assert_eq!(spec.handover.len(), 2, "client link and replication link");
            assert_eq!(spec.handover[0].me, w);
            assert!(spec.waker.is_some());
        }
        // Disjoint shares of the owned ranges, on both links.
        let (a, b) = (&workers[0], &workers[1]);
        assert!(
            a.link.ports.last < b.link.ports.first,
            "{:?} {:?}",
            a.link.ports,
            b.link.ports
        );
        let (ra, rb) = (a.replica_links[0].ports, b.replica_links[0].ports);
        assert!(ra.last < rb.first, "{ra:?} {rb:?}");
        assert_eq!(
            a.handover[0].ownership.shares,
            vec![a.link.ports, b.link.ports]
        );
    }

    #[test]
    fn a_recording_service_is_planned_and_gets_its_recorder_only_at_start() {
        let mut c = config("[{ queue = 0 }]", "replica_interface = \"eth1\"");
        c.services[0].record = Some(toml::from_str(r#"dir = "/var/lib/ncp/rec""#).unwrap());
        let workers = plan_workers(&c).unwrap();
        assert_eq!(workers.len(), 1);
        assert!(workers[0].services[0].record.is_none());
    }

    #[test]
    fn layouts_the_workers_cannot_serve_are_refused() {
        let e =
            plan_workers(&config("[{ queue = 3 }]", "replica_interface = \"eth1\"")).unwrap_err();
        assert!(e.to_string().contains("must list queue 3"), "{e}");
    }
}

#[cfg(test)]
mod arp_flux_tests {
    use super::answers_any_address;

    #[test]
    fn a_nic_answers_for_other_addresses_only_when_both_settings_allow_it() {
        assert!(answers_any_address(0, 0));
        assert!(!answers_any_address(1, 0), "`all` set");
        assert!(!answers_any_address(0, 1), "the interface set");
        assert!(!answers_any_address(2, 0));
    }
}
