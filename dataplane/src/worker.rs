//! Per-queue workers: each owns one AF_XDP socket (created on its own pinned core, so the
//! UMEM is allocated there), reads frames and, at this stage, counts and drops them. The
//! TCP engine plugs in where frames are handled.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
};

use serde::Serialize;

use crate::{
    config::PollMode,
    xsk::{XskOptions, XskSocket},
};

/// Frames read per ring pass.
const RX_BATCH: u32 = 64;
/// How long a sleeping worker waits in `poll(2)` before it checks for shutdown.
const IDLE_WAIT_MS: i32 = 100;

/// What a worker is told at start.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// Socket options (interface, queue, UMEM size, copy/zero-copy).
    pub socket: XskOptions,
    /// Core to pin to, if any.
    pub core: Option<usize>,
    /// Idle behaviour.
    pub poll: PollMode,
}

/// Live counters of one worker, shared with the control socket.
#[derive(Debug, Default)]
pub struct WorkerStats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    wakeups: AtomicU64,
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
    /// Frames taken from the RX ring.
    pub rx_frames: u64,
    /// Bytes taken from the RX ring.
    pub rx_bytes: u64,
    /// Times the worker woke from `poll(2)`.
    pub wakeups: u64,
}

/// A running worker thread.
pub struct Worker {
    spec: WorkerSpec,
    stats: Arc<WorkerStats>,
    handle: thread::JoinHandle<()>,
}

impl Worker {
    /// Starts the worker and waits until its socket is open. Returns the worker and the
    /// socket's descriptor, which the caller registers in the XSKMAP.
    pub fn start(spec: WorkerSpec, stop: Arc<AtomicBool>) -> anyhow::Result<(Self, i32)> {
        let stats = Arc::new(WorkerStats::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_spec = spec.clone();
        let thread_stats = Arc::clone(&stats);
        let name = format!("ncp-{}-q{}", spec.socket.interface, spec.socket.queue);
        let handle = thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(thread_spec, thread_stats, stop, ready_tx))
            .map_err(|e| anyhow::anyhow!("spawning worker {name}: {e}"))?;
        let fd = match ready_rx.recv() {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(anyhow::anyhow!("worker {name}: {e}"));
            }
            Err(_) => {
                let _ = handle.join();
                return Err(anyhow::anyhow!("worker {name} exited during start-up"));
            }
        };
        Ok((
            Self {
                spec,
                stats,
                handle,
            },
            fd,
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
            tracing::error!(queue = self.spec.socket.queue, "worker thread panicked");
        }
    }
}

/// Reads a worker's counters.
pub fn snapshot(spec: &WorkerSpec, stats: &WorkerStats) -> WorkerSnapshot {
    WorkerSnapshot {
        interface: spec.socket.interface.clone(),
        queue: spec.socket.queue,
        core: spec.core,
        rx_frames: stats.rx_frames.load(Ordering::Relaxed),
        rx_bytes: stats.rx_bytes.load(Ordering::Relaxed),
        wakeups: stats.wakeups.load(Ordering::Relaxed),
    }
}

fn run(
    spec: WorkerSpec,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<i32, String>>,
) {
    if let Some(core) = spec.core
        && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
    {
        tracing::warn!(core, "could not pin worker to core");
    }
    let mut socket = match XskSocket::open(&spec.socket) {
        Ok(socket) => socket,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    if ready.send(Ok(socket.raw_fd())).is_err() {
        return;
    }
    tracing::info!(
        interface = %spec.socket.interface,
        queue = spec.socket.queue,
        core = ?spec.core,
        frames = socket.frames(),
        "worker running"
    );
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
                socket.wait(IDLE_WAIT_MS);
                stats.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            PollMode::Busy => std::hint::spin_loop(),
        }
    }
}
