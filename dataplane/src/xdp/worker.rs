//! Per-queue workers. Each runs on its own thread, pinned to its core, and owns
//! everything it touches: its AF_XDP socket (created on that core, so the UMEM is
//! allocated there), the [`XskDevice`] wrapped in its [`HandoverDevice`] layer and the
//! TCP [`Engine`] over that stack, optionally a second
//! socket/device/engine on the same queue of the replication NIC, and the
//! [`Replicator`] with its session manager. Nothing on the data path is shared between
//! workers; counters are published to the control socket through a mutex at most every
//! [`crate::xdp::transport::PUBLISH_INTERVAL`] and through relaxed atomics.
//!
//! Idle behaviour follows the configuration's poll mode: `sleep` waits in `poll(2)` on
//! every socket of the worker, bounded by the engines' and the sessions' next timers (the
//! right choice on a shared host such as the 2-core test machine); `busy` spins.

use std::{
    net::Ipv4Addr,
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use ncp_replication::ManagerConfig;
use serde::Serialize;
use smoltcp::socket::tcp::CongestionControl;

use crate::{
    config::{Congestion, LossRecovery, PollMode, PortRange, TcpTuning},
    engine::{Engine, EngineConfig, EngineDevice},
    sys::{self, PollSet},
    xdp::device::{DeviceConfig, XskDevice},
    xdp::handover::{Handover, HandoverDevice, HandoverPort, Waker},
    xdp::layers::recovery::{Recovery, RecoveryConfig, RecoveryCounters},
    xdp::transport::{
        self, Link, PUBLISH_INTERVAL, Replicator, ServicePlan, WorkerReplicationStats,
    },
    xdp::xsk::{XskOptions, XskSocket},
};

/// A worker's device stack on one link: the AF_XDP device under the hand-over layer,
/// under the loss-recovery layer (a pass-through when `[tcp] loss_recovery = "smoltcp"`).
pub type WorkerDevice = Recovery<HandoverDevice<XskDevice>>;

/// Longest sleep, so a stop request is seen promptly.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// How long a worker waits at start for the kernel to resolve its upstreams' MACs.
const RESOLVE_AT_START: Duration = Duration::from_secs(2);
/// Room per service endpoint in the connection bound for handshakes under way (a socket
/// exists from the SYN on, a session only from the accept).
const HANDSHAKES_PER_ENDPOINT: usize = 64;
/// Upper bound of connections per engine, whatever the session limit says: the session
/// limit in `[limits]` and `tcp.buffer_bytes` are the knobs to size memory with.
const MAX_ENGINE_CONNECTIONS: usize = 65_536;

/// One AF_XDP socket of a worker and the addresses its engine uses.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    /// Socket options (interface, queue, UMEM size, copy/zero-copy).
    pub socket: XskOptions,
    /// The data plane's address on that interface: source of upstream connections.
    pub address: Ipv4Addr,
    /// Owned local ports for upstream connections.
    pub ports: PortRange,
    /// IP MTU of the link's connections (their MSS is 40 less).
    pub mtu: usize,
}

/// What a worker is told at start.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// The worker's own (client-facing) queue: its socket, the interface's address and
    /// the ports it owns there (link 0).
    pub link: LinkSpec,
    /// Sockets on the same queue of replication NICs (link 1, 2, … in this order).
    pub replica_links: Vec<LinkSpec>,
    /// Core to pin to, if any.
    pub core: Option<usize>,
    /// Idle behaviour.
    pub poll: PollMode,
    /// Services, with `replica_route` naming an index into `1 + replica_links`.
    pub services: Vec<ServicePlan>,
    /// Session and memory caps of this worker.
    pub manager: ManagerConfig,
    /// Buffers and congestion control of its TCP connections.
    pub tcp: TcpTuning,
    /// Its ends of the frame hand-over per link (link 0 first), when several workers
    /// share the NICs; empty otherwise.
    pub handover: Vec<Handover>,
    /// Wakes it when another worker hands it frames (with `handover`).
    pub waker: Option<Arc<Waker>>,
}

/// Live counters of one worker, shared with the control socket.
#[derive(Debug, Default)]
pub struct WorkerStats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_kicks: AtomicU64,
    wakeups: AtomicU64,
    poll_errors: AtomicU64,
    /// Whether every socket of the worker is bound in zero-copy mode.
    zero_copy: std::sync::atomic::AtomicBool,
    replication: Mutex<WorkerReplicationStats>,
    loss_recovery: Mutex<RecoveryCounters>,
}

impl WorkerStats {
    /// The replication counters as last published.
    pub fn replication(&self) -> WorkerReplicationStats {
        self.replication
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// A snapshot of [`WorkerStats`] with the worker's identity.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Interface served.
    pub interface: String,
    /// Queue served.
    pub queue: u32,
    /// Core pinned to, if any.
    pub core: Option<usize>,
    /// Frames taken from the RX ring of the worker's own queue.
    pub rx_frames: u64,
    /// Bytes taken from that RX ring.
    pub rx_bytes: u64,
    /// Frames placed on the TX rings of all its links.
    pub tx_frames: u64,
    /// `sendto` kicks on those rings (copy mode needs one per batch of at most 32
    /// frames): frames per kick is the TX batch size.
    pub tx_kicks: u64,
    /// Times the worker woke from `poll(2)`.
    pub wakeups: u64,
    /// Failed sleeps: `poll(2)` or the hand-over wake-up's eventfd returned an error.
    pub poll_errors: u64,
    /// What the loss-recovery layer did, over the worker's links.
    pub loss_recovery: RecoveryCounters,
    /// Whether its sockets are bound in zero-copy mode (`false`: copy mode, asked for or
    /// fallen back to).
    pub zero_copy: bool,
}

/// A socket a worker opened: the runtime registers it in that interface's XSKMAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedSocket {
    /// Interface.
    pub interface: String,
    /// Queue.
    pub queue: u32,
    /// The AF_XDP socket's descriptor.
    pub fd: i32,
    /// Whether it is bound in zero-copy mode.
    pub zero_copy: bool,
}

/// A running worker thread.
pub struct Worker {
    spec: WorkerSpec,
    stats: Arc<WorkerStats>,
    handle: thread::JoinHandle<()>,
}

impl Worker {
    /// Starts the worker and waits until its sockets are open. Returns the worker and
    /// the sockets, which the caller registers in the XSKMAPs.
    pub fn start(
        spec: WorkerSpec,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<(Self, Vec<OpenedSocket>)> {
        let stats = Arc::new(WorkerStats::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_spec = spec.clone();
        let thread_stats = Arc::clone(&stats);
        let name = format!(
            "ncp-{}-q{}",
            spec.link.socket.interface, spec.link.socket.queue
        );
        let handle = thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(thread_spec, thread_stats, stop, ready_tx))
            .map_err(|e| anyhow::anyhow!("spawning worker {name}: {e}"))?;
        let sockets = match ready_rx.recv() {
            Ok(Ok(sockets)) => sockets,
            Ok(Err(e)) => {
                // The thread has reported its failure and returns right after; a panic on
                // the way out would add nothing to the error returned here.
                let _ = handle.join();
                return Err(anyhow::anyhow!("worker {name}: {e}"));
            }
            Err(_) => {
                // The thread ended without a word; its join result says no more than that.
                let _ = handle.join();
                return Err(anyhow::anyhow!("worker {name} exited during start-up"));
            }
        };
        stats
            .zero_copy
            .store(sockets.iter().all(|s| s.zero_copy), Ordering::Relaxed);
        Ok((
            Self {
                spec,
                stats,
                handle,
            },
            sockets,
        ))
    }

    /// Current counters.
    pub fn snapshot(&self) -> WorkerSnapshot {
        snapshot(&self.spec, &self.stats)
    }

    /// A handle on the counters that outlives borrowing the worker.
    pub fn stats_handle(&self) -> (WorkerSpec, Arc<WorkerStats>) {
        (self.spec.clone(), Arc::clone(&self.stats))
    }

    /// Waits for the thread to end (after the stop flag is set).
    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!(
                queue = self.spec.link.socket.queue,
                "worker thread panicked"
            );
        }
    }
}

/// Reads a worker's counters.
pub fn snapshot(spec: &WorkerSpec, stats: &WorkerStats) -> WorkerSnapshot {
    WorkerSnapshot {
        interface: spec.link.socket.interface.clone(),
        queue: spec.link.socket.queue,
        core: spec.core,
        rx_frames: stats.rx_frames.load(Ordering::Relaxed),
        rx_bytes: stats.rx_bytes.load(Ordering::Relaxed),
        tx_frames: stats.tx_frames.load(Ordering::Relaxed),
        tx_kicks: stats.tx_kicks.load(Ordering::Relaxed),
        wakeups: stats.wakeups.load(Ordering::Relaxed),
        poll_errors: stats.poll_errors.load(Ordering::Relaxed),
        zero_copy: stats.zero_copy.load(Ordering::Relaxed),
        loss_recovery: *stats
            .loss_recovery
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    }
}

/// Opens one link: socket, device stack, engine.
fn open_link(
    spec: &LinkSpec,
    listen: Vec<std::net::SocketAddrV4>,
    max_connections: usize,
    tcp: TcpTuning,
    handover: Option<HandoverPort>,
) -> Result<(Link<WorkerDevice>, OpenedSocket), String> {
    let interface = spec.socket.interface.clone();
    let at = |e: &dyn std::fmt::Display| format!("{interface} queue {}: {e}", spec.socket.queue);
    let mac = sys::interface_mac(&interface).map_err(|e| at(&e))?;
    let socket = XskSocket::open(&spec.socket).map_err(|e| at(&e))?;
    let opened = OpenedSocket {
        interface: interface.clone(),
        queue: spec.socket.queue,
        fd: socket.raw_fd(),
        zero_copy: socket.is_zero_copy(),
    };
    let device_config = DeviceConfig {
        mtu: spec.mtu,
        ..DeviceConfig::new(mac)
    };
    let device = XskDevice::new(socket, &device_config).map_err(|e| at(&e))?;
    let device = HandoverDevice::new(device, handover);
    let device = Recovery::new(
        device,
        match tcp.loss_recovery {
            LossRecovery::Ncp => RecoveryConfig::enabled(),
            LossRecovery::Smoltcp => RecoveryConfig::disabled(),
        },
    );
    let mut config = EngineConfig::new(spec.address, spec.ports);
    config.listen = listen;
    // The core's budgets are the real queues; these buffers only need to cover the
    // bandwidth-delay product of a hop (the receive side is drained into the core on
    // every poll). The receive window also bounds a client's bursts toward us: bursts of
    // 256 KiB overflowed the test bed's software switch (OVS userspace datapath) by ~6 %,
    // hence the 64 KiB default, which still fills ~300 MB/s at a 0.2 ms round trip.
    config.rx_buffer = tcp.buffer_bytes;
    config.tx_buffer = tcp.buffer_bytes;
    config.congestion_control = tcp.smoltcp_congestion().into();
    config.max_connections = max_connections.clamp(1, MAX_ENGINE_CONNECTIONS);
    let engine = Engine::new(device, config).map_err(|e| at(&e))?;
    Ok((Link { interface, engine }, opened))
}

impl From<Congestion> for CongestionControl {
    fn from(congestion: Congestion) -> Self {
        match congestion {
            Congestion::Cubic => CongestionControl::Cubic,
            Congestion::Reno => CongestionControl::Reno,
            Congestion::None => CongestionControl::None,
        }
    }
}

/// Connections an engine may need: per session the client and primary (client link) or
/// the replicas on that link, the same again lingering, plus handshakes under way.
fn connection_bound(spec: &WorkerSpec, link: usize) -> usize {
    let per_session = spec
        .services
        .iter()
        .map(|s| {
            let replicas = if s.replica_route == link {
                s.replicas.len()
            } else {
                0
            };
            replicas + if link == 0 { 2 } else { 0 }
        })
        .max()
        .unwrap_or(0)
        .max(1);
    let handshakes = if link == 0 {
        spec.services.len() * HANDSHAKES_PER_ENDPOINT
    } else {
        0
    };
    spec.manager
        .max_sessions
        .saturating_mul(per_session)
        .saturating_mul(2)
        .saturating_add(handshakes)
}

type Ready = mpsc::Sender<Result<Vec<OpenedSocket>, String>>;

fn run(spec: WorkerSpec, stats: Arc<WorkerStats>, stop: Arc<AtomicBool>, ready: Ready) {
    if let Some(core) = spec.core
        && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
    {
        tracing::warn!(core, "could not pin worker to core");
    }
    if spec.services.is_empty() {
        count_only(&spec, &stats, &stop, &ready);
        return;
    }
    let mut links = Vec::new();
    let mut opened = Vec::new();
    let listen: Vec<_> = spec.services.iter().map(|s| s.primary).collect();
    for (index, link) in std::iter::once(&spec.link)
        .chain(&spec.replica_links)
        .enumerate()
    {
        let listen = if index == 0 {
            listen.clone()
        } else {
            Vec::new()
        };
        let handover = spec
            .handover
            .get(index)
            .map(|ends| HandoverPort::new(ends.clone()));
        match open_link(
            link,
            listen,
            connection_bound(&spec, index),
            spec.tcp,
            handover,
        ) {
            Ok((l, o)) => {
                links.push(l);
                opened.push(o);
            }
            Err(e) => {
                // A closed channel means `Worker::start` gave up waiting: nobody is left
                // to tell.
                let _ = ready.send(Err(e));
                return;
            }
        }
    }
    if ready.send(Ok(opened)).is_err() {
        return;
    }
    tracing::info!(
        interface = %spec.link.socket.interface,
        queue = spec.link.socket.queue,
        core = ?spec.core,
        links = links.len(),
        services = spec.services.len(),
        "worker running"
    );
    let mut replicator = Replicator::new(links, spec.services.clone(), spec.manager.clone());
    replicator.resolve_upstreams(RESOLVE_AT_START);
    let mut next_publish = Instant::now();
    let mut poll_set = PollSet::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let active = replicator.turn(now);
        if now >= next_publish {
            publish(&spec, &stats, &replicator);
            next_publish = now + PUBLISH_INTERVAL;
        }
        if active {
            continue;
        }
        match spec.poll {
            PollMode::Sleep => {
                let bound = replicator
                    .sleep_bound(now, MAX_SLEEP)
                    .min(next_publish.saturating_duration_since(now));
                if bound.is_zero() {
                    continue;
                }
                poll_set.clear();
                for link in replicator.links() {
                    if let Some(fd) = link.engine.device().readiness_fd() {
                        poll_set.add(fd);
                    }
                }
                if let Some(waker) = &spec.waker {
                    poll_set.add(waker.as_fd());
                }
                let ms = i32::try_from(bound.as_millis().max(1)).unwrap_or(i32::MAX);
                let slept = poll_set.wait(ms).map(drop);
                // Handed-over frames are taken on the next turn; a wake-up that comes
                // after this clear is for frames queued after it, so none is lost.
                let cleared = spec.waker.as_ref().map_or(Ok(()), |w| w.clear());
                if let Err(e) = slept.and(cleared) {
                    count_poll_error(&stats, &e);
                }
                stats.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            PollMode::Busy => std::hint::spin_loop(),
        }
    }
    replicator.shutdown(Instant::now());
    publish(&spec, &stats, &replicator);
}

/// Frames read per ring pass when only counting.
const RX_BATCH: u32 = 64;

/// A worker without services has nothing to terminate: it takes the frames operator
/// rules steer to it, counts them and drops them, silently. (A TCP engine would answer
/// each with a RST, doubling the traffic of a flow nobody asked to be served.)
fn count_only(spec: &WorkerSpec, stats: &WorkerStats, stop: &AtomicBool, ready: &Ready) {
    let mut socket = match XskSocket::open(&spec.link.socket) {
        Ok(socket) => socket,
        Err(e) => {
            // As in `run`: a closed channel means nobody is waiting for the answer.
            let _ = ready.send(Err(format!(
                "{} queue {}: {e}",
                spec.link.socket.interface, spec.link.socket.queue
            )));
            return;
        }
    };
    let opened = OpenedSocket {
        interface: spec.link.socket.interface.clone(),
        queue: spec.link.socket.queue,
        fd: socket.raw_fd(),
        zero_copy: socket.is_zero_copy(),
    };
    if ready.send(Ok(vec![opened])).is_err() {
        return;
    }
    tracing::info!(interface = %spec.link.socket.interface, queue = spec.link.socket.queue, "worker running without services: counting and dropping steered frames");
    while !stop.load(Ordering::Relaxed) {
        let mut bytes = 0u64;
        let frames = socket.receive(RX_BATCH, |frame| bytes += frame.len() as u64);
        if frames > 0 {
            stats
                .rx_frames
                .fetch_add(u64::from(frames), Ordering::Relaxed);
            stats.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
            continue;
        }
        match spec.poll {
            PollMode::Sleep => {
                let ms = i32::try_from(MAX_SLEEP.as_millis()).unwrap_or(100);
                if let Err(e) = socket.wait(ms) {
                    count_poll_error(stats, &e);
                }
                stats.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            PollMode::Busy => std::hint::spin_loop(),
        }
    }
}

/// Counts a failed sleep; logs the first and then every power of two, as a broken
/// descriptor fails on every turn and would flood the log.
fn count_poll_error(stats: &WorkerStats, error: &std::io::Error) {
    let count = stats.poll_errors.fetch_add(1, Ordering::Relaxed) + 1;
    if count.is_power_of_two() {
        tracing::warn!(count, %error, "worker could not sleep in poll(2)");
    }
}

fn publish(spec: &WorkerSpec, stats: &WorkerStats, replicator: &Replicator<WorkerDevice>) {
    if let Some(link) = replicator.links().first() {
        let c = link.engine.device().inner().inner().socket_counters();
        stats.rx_frames.store(c.rx_frames, Ordering::Relaxed);
        stats.rx_bytes.store(c.rx_bytes, Ordering::Relaxed);
    }
    let (mut tx_frames, mut tx_kicks) = (0, 0);
    for link in replicator.links() {
        let c = link.engine.device().inner().inner().socket_counters();
        tx_frames += c.tx_frames;
        tx_kicks += c.tx_kicks;
    }
    stats.tx_frames.store(tx_frames, Ordering::Relaxed);
    stats.tx_kicks.store(tx_kicks, Ordering::Relaxed);
    let mut recovery = RecoveryCounters::default();
    for link in replicator.links() {
        recovery.add(&link.engine.device().counters());
    }
    *stats
        .loss_recovery
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = recovery;
    let mut snapshot = replicator.snapshot(&spec.link.socket.interface, spec.link.socket.queue);
    transport::add_device_counters(&mut snapshot, replicator.links());
    *stats
        .replication
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = snapshot;
}
