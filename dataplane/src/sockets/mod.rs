//! `--mode sockets`: the replication relay on ordinary kernel TCP sockets — the paper's
//! own middlebox design (section III-B: user-level sockets after the middlebox kernel
//! rewrote the destination, and new TCP connections to the primary and every replica).
//!
//! For each configured service ([`crate::config::ServiceConfig`]):
//! 1. a listening socket per worker on one kernel-chosen port (`SO_REUSEPORT`, so the
//!    kernel spreads connections over the workers);
//! 2. an nftables rule in table `ncp_sockets` (see [`nat`]) redirecting the service's
//!    clients' connections for the primary's address and port to that port. The network
//!    (the controller's redirect, or in tests a static neighbour entry) delivers those
//!    frames to this host; the kernel terminates TCP for us;
//! 3. per accepted client, a session of the sans-IO core ([`ncp_replication`]) and kernel
//!    connections to the primary and to every replica. The core decides what goes where:
//!    client bytes to the primary and the replicas, primary bytes to the client, replica
//!    bytes read and dropped, slow or dead replicas detached, never waiting on a replica.
//!
//! 4. for a service with `record` (offline asynchronous mode), one recorder writing
//!    pcapng files named after the service: every client byte the core accepts (and the
//!    primary's answers, with `responses = true`) is recorded, besides or instead of the
//!    live replicas. Recording never holds the worker up: a recorder that falls behind
//!    loses sessions' recordings, counted in the service's `recording` stats.
//!
//! Each worker is one thread with one mio event loop owning its listeners, sockets and
//! [`ncp_replication::Manager`]; nothing is shared between workers but the stats mutex.
//! Workers come from the configuration's queues (one per `[[interfaces]].queues` entry,
//! pinned to its `core` if given), so the same file sizes both modes.
//!
//! What the configuration means here: `services` and `limits` (per worker) as documented;
//! `replica_interface` binds replica connections to that interface's device and
//! `address`; the AF_XDP settings (`poll`, `ports`, `xdp_mode`, `zero_copy`,
//! `umem_frames`) and operator `rules` without a service are not used — upstream
//! connections take ordinary kernel ephemeral ports.
//!
//! Memory: the core's budgets (per session, reserved against `limits.max_buffer_bytes`)
//! are the relay's own queues. On top of them each socket has the kernel's buffers
//! (autotuned, bounded by `net.ipv4.tcp_rmem`/`tcp_wmem`); the relay reads a client or
//! primary only as far as the core's window allows, so a full budget pushes back through
//! TCP flow control rather than piling up here. Upstream sockets of a finished session
//! that still have a talking peer are drained and discarded for up to the drain timeout
//! before they are closed, so a replica never gets a RST that could cost it data it was
//! already sent (at most `limits.max_sessions` such sockets per worker).
//!
//! Limits of this mode: the client sees the middlebox's TCP stack (its handshake succeeds
//! before the primary is even contacted; a refusing primary shows up as a reset right
//! after connecting); only connections arriving from the network are redirected (the
//! prerouting hook), not ones made on the middlebox host itself.
//!
//! # Wiring it into `ncp-middlebox`
//!
//! ```no_run
//! # use std::sync::{Arc, atomic::AtomicBool};
//! # fn wire(config: &ncp_dataplane::config::Config, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
//! use ncp_dataplane::sockets;
//!
//! let stats = sockets::StatsHandle::new();
//! // Give a clone to the control-socket handler; on `Request::Stats` it serialises
//! // `stats.snapshot()` (a `SocketsStats`, `Serialize`) into the response.
//! let for_control = stats.clone();
//! # let _ = for_control;
//! // Blocks until `stop` is set (SIGINT/SIGTERM), then resets open sessions and removes
//! // the nftables table. Needs CAP_NET_ADMIN (nft) in the middlebox's network namespace.
//! sockets::run(config, stop, &stats)?;
//! # Ok(())
//! # }
//! ```

mod conn;
pub mod nat;
mod relay;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

pub use crate::driver::{
    PUBLISH_INTERVAL,
    stats::{
        DetachStats, DropStats, RecordingStats, RefusalStats, ReplicaStats, ServiceStats,
        SocketsStats, StatsHandle,
    },
};
pub use conn::SourceBinding;

use crate::config::Config;
use crate::driver::manager_config;
use crate::offline::services::ServiceRecorders;
use nat::{NatTable, Redirect};
use relay::{ServicePlan, WorkerSetup};

/// How often the supervising thread checks `stop` and its workers.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(50);

/// Knobs of the socket relay that the configuration file does not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// One entry per worker thread: the core to pin it to (`None`: unpinned).
    pub workers: Vec<Option<usize>>,
    /// Address the listeners bind (the redirect rewrites the destination to the receiving
    /// interface's address, so the wildcard is the right default).
    pub listen_address: Ipv4Addr,
    /// nftables table (in the `ip` family) created at start and deleted at stop.
    pub nft_table: String,
}

impl Options {
    /// One worker per configured queue of the client-facing interfaces, pinned like the
    /// AF_XDP workers would be. An interface that only carries replica traffic (a
    /// service's `replica_interface`) gets no worker: the kernel routes the relay's
    /// replica connections there, and an extra worker would make the sockets relay look
    /// cheaper per core than it is. With no client-facing interface left, every queue
    /// counts.
    pub fn from_config(config: &Config) -> Self {
        let replica_only = |name: &str| {
            config
                .services
                .iter()
                .any(|s| s.replica_interface.as_deref() == Some(name))
        };
        let cores = |client_facing_only: bool| -> Vec<Option<usize>> {
            config
                .interfaces
                .iter()
                .filter(|i| !client_facing_only || !replica_only(&i.name))
                .flat_map(|i| i.queues.iter().map(|q| q.core))
                .collect()
        };
        let mut workers = cores(true);
        if workers.is_empty() {
            workers = cores(false);
        }
        if workers.is_empty() {
            workers.push(None);
        }
        Self {
            workers,
            listen_address: Ipv4Addr::UNSPECIFIED,
            nft_table: nat::DEFAULT_TABLE.to_owned(),
        }
    }
}

/// Runs the socket relay for `config.services` until `stop` is set. Counters are
/// published into `stats` (see [`StatsHandle::snapshot`]). Uses
/// [`Options::from_config`]; see the module docs for how to wire it.
pub fn run(config: &Config, stop: Arc<AtomicBool>, stats: &StatsHandle) -> anyhow::Result<()> {
    run_with(config, &Options::from_config(config), stop, stats)
}

/// [`run`] with explicit [`Options`].
///
/// Start-up order: listeners (so the redirect never points at a closed port), then the
/// recorders (so a bad recording directory fails the start, and the first session already
/// has a file), then the nftables table, then the workers. Stop order: workers (open
/// sessions are reset), then the recorders (flushed and closed), then the table. A worker
/// that fails stops the others and its error is returned.
pub fn run_with(
    config: &Config,
    options: &Options,
    stop: Arc<AtomicBool>,
    stats: &StatsHandle,
) -> anyhow::Result<()> {
    if config.services.is_empty() {
        bail!("sockets mode relays configured [[services]], and there are none");
    }
    let workers = options.workers.len().max(1);
    let (mut plans, listeners) = bind_services(config, options, workers)?;
    let recorders = ServiceRecorders::start(&config.services)?;
    for (plan, record) in plans.iter_mut().zip(recorders.handles()) {
        plan.record = record;
    }
    let redirects: Vec<Redirect> = plans
        .iter()
        .map(|p| Redirect {
            clients: p.clients,
            primary: p.primary,
            port: p.listen_port,
        })
        .collect();
    let initial = SocketsStats {
        workers: 1,
        services: plans
            .iter()
            .map(|p| ServiceStats::new(&p.name, p.primary, p.listen_port, &p.replicas))
            .collect(),
        ..SocketsStats::default()
    };
    stats.reset(workers, &initial);
    stats.set_recorders(plans.iter().map(|p| p.record.clone()).collect());
    for plan in &mut plans {
        plan.consistency = stats.consistency().clone();
    }
    let services: Arc<[ServicePlan]> = plans.into();
    let nat = NatTable::install(&options.nft_table, &redirects)?;

    let halt = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(workers);
    let mut failure = None;
    for (index, listeners) in listeners.into_iter().enumerate() {
        let core = options.workers.get(index).copied().flatten();
        let setup = WorkerSetup {
            index,
            services: Arc::clone(&services),
            listeners,
            manager: manager_config(config),
            max_lingering: config.limits.max_sessions,
            stats: stats.clone(),
        };
        let halt = Arc::clone(&halt);
        let spawned = thread::Builder::new()
            .name(format!("ncp-sockets-{index}"))
            .spawn(move || {
                if let Some(core) = core
                    && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
                {
                    tracing::warn!(core, "could not pin socket worker to core");
                }
                relay::run(setup, &halt)
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                failure = Some(anyhow!(e).context("starting a socket worker"));
                break;
            }
        }
    }
    if failure.is_none() {
        tracing::info!(workers, services = services.len(), "socket relay running");
        while !stop.load(Ordering::Relaxed) && !handles.iter().any(|h| h.is_finished()) {
            thread::sleep(SUPERVISE_INTERVAL);
        }
    }
    halt.store(true, Ordering::Relaxed);
    for h in handles {
        let result = h
            .join()
            .unwrap_or_else(|_| Err(anyhow!("a socket worker panicked")));
        if let Err(e) = result {
            tracing::error!(error = %e, "socket worker failed");
            failure.get_or_insert(e);
        }
    }
    // Workers are gone, so nothing more is queued: this writes out everything they
    // recorded (sessions reset at stop end as aborted) before the files are closed.
    recorders.finish();
    drop(nat);
    tracing::info!("socket relay stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Binds every service's listeners (index: worker, then service) and resolves its plan.
fn bind_services(
    config: &Config,
    options: &Options,
    workers: usize,
) -> anyhow::Result<(Vec<ServicePlan>, Vec<Vec<std::net::TcpListener>>)> {
    let mut listeners: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut plans = Vec::with_capacity(config.services.len());
    for service in &config.services {
        let mut port = 0;
        for per_worker in &mut listeners {
            let address = SocketAddrV4::new(options.listen_address, port);
            let socket = conn::listener(address, config.tunnel_mss(service))
                .with_context(|| format!("listening for service {}", service.name))?;
            if port == 0 {
                port = match socket.local_addr()? {
                    SocketAddr::V4(a) => a.port(),
                    SocketAddr::V6(a) => a.port(),
                };
            }
            per_worker.push(socket);
        }
        let replica_source = match &service.replica_interface {
            None => None,
            Some(name) => {
                let iface = config
                    .interfaces
                    .iter()
                    .find(|i| &i.name == name)
                    .with_context(|| {
                        format!(
                            "service {}: replica_interface {name} is not configured",
                            service.name
                        )
                    })?;
                Some(SourceBinding {
                    address: iface.address,
                    device: iface.name.clone(),
                })
            }
        };
        tracing::info!(service = %service.name, primary = %service.primary, port, replicas = service.replicas.len(), "listening");
        let mut plan = ServicePlan::new(service, replica_source);
        plan.listen_port = port;
        plans.push(plan);
    }
    Ok((plans, listeners))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(replica_interface: Option<&str>) -> Config {
        let replica_line = replica_interface
            .map(|name| format!("replica_interface = \"{name}\""))
            .unwrap_or_default();
        let text = format!(
            r#"
            [[interfaces]]
            name = "client0"
            address = "198.18.1.4"
            queues = [{{ queue = 0, core = 0 }}]
            [[interfaces]]
            name = "repl0"
            address = "198.18.2.4"
            queues = [{{ queue = 0, core = 1 }}]
            [[services]]
            name = "redis"
            primary = "198.18.1.2:6379"
            replicas = ["198.18.2.3:6379"]
            {replica_line}
            "#
        );
        let config: Config = toml::from_str(&text).expect("test config parses");
        config.validate(2).expect("test config is valid");
        config
    }

    #[test]
    fn the_replication_interface_gets_no_relay_worker() {
        assert_eq!(
            Options::from_config(&config(Some("repl0"))).workers,
            vec![Some(0)]
        );
    }

    #[test]
    fn without_a_replication_interface_every_queue_gets_a_worker() {
        assert_eq!(
            Options::from_config(&config(None)).workers,
            vec![Some(0), Some(1)]
        );
    }
}
