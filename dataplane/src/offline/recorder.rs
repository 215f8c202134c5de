//! The recording target for the data plane's workers.
//!
//! [`Recorder::start`] opens the first file and runs a writer thread; workers get cloned
//! [`RecordHandle`]s and report what their sessions do. Every handle method is a `try_send`
//! into one bounded channel, so a worker never waits on the disk: when the queue is full the
//! session's recording is *detached* — cut loose and counted, like a slow replica (R1) —
//! and the file ends that session with an annotated RST so the reader knows its recorded
//! bytes are only a prefix.
//!
//! Files are pcapng (see [`super::pcapng`]), named `{prefix}-{unix_ms:013}-{seq:04}.pcapng`
//! so that a plain sort puts them in recording order, and rotated by size or age. A session
//! that spans a rotation continues in the next file; its first packet there carries its
//! metadata again, so each file can also be replayed on its own.
//!
//! Crash safety: the writer hands whole blocks to a buffered file and flushes after every
//! batch of queued messages, so a file cut at any byte (crash, full disk, power loss after
//! the page cache) holds a prefix of whole blocks plus at most one partial block, which the
//! reader reports by offset and stops at.
//!
//! # Wiring into a worker
//!
//! The worker's owner calls [`Recorder::start`] once and gives each worker a
//! [`RecordHandle`] (`recorder.handle()`, `Clone + Send`). In the worker:
//! - when a client connection for a service with recording enabled is accepted:
//!   `let rec = handle.open_session(SessionMeta { service, client, primary, start_ns })`
//!   and keep the `Option<RecId>` in the session (None: the queue was full, not recorded);
//! - wherever the client's bytes are handed to the replication core (the same bytes the
//!   primary and replicas get): `handle.client_bytes(&rec, &bytes, now)`;
//! - the primary's answers, if `record_responses`: `handle.server_bytes(&rec, &bytes, now)`;
//! - client FIN / orderly teardown: `handle.close(rec)`; reset or timeout: `handle.abort(rec)`;
//! - export [`RecordHandle::stats`] with the worker's other counters.
//!
//! Both data planes (the XDP replicator and the sockets relay) drive sessions of the
//! replication core, and do it through the same three calls built on the ones above:
//! [`RecordHandle::open_replicated`] at accept, [`RecordHandle::accepted`] after every
//! `on_data` that took bytes, and [`RecordHandle::end`] with the session's final counters.
//!
//! No method blocks, allocates more than a copy of the bytes, or fails loudly; a detached
//! session simply stops being recorded ([`RecId::is_detached`]).

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter};
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use ncp_replication::{SessionStats, Side};
use serde::{Deserialize, Serialize};

use super::pcapng::{PcapngWriter, SynthSession, WriterOptions};
use super::{SessionMeta, now_ns, unix_ns};

/// Where and how to record.
#[derive(Clone, Debug)]
pub struct RecorderConfig {
    /// Directory for the files (created if missing).
    pub dir: PathBuf,
    /// File name prefix.
    pub file_prefix: String,
    /// Start a new file once this many bytes were written (0: never).
    pub rotate_bytes: u64,
    /// Start a new file after this many seconds (0: never).
    pub rotate_secs: u64,
    /// Capacity of the queue between workers and the writer, in messages (one message per
    /// `client_bytes`/`server_bytes`/`open`/`close` call).
    pub queue_capacity: usize,
    /// Record the primary's answers too (replay does not need them; they help inspection).
    pub record_responses: bool,
}

/// Counters, all since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecorderStats {
    /// Sessions whose recording started.
    pub sessions_opened: u64,
    /// Sessions not recorded at all: the queue was full or the writer was gone when they
    /// opened.
    pub sessions_refused: u64,
    /// Sessions whose recording was cut loose part-way (queue full, or a write failed);
    /// their files hold a prefix of the stream, marked as such.
    pub sessions_detached: u64,
    /// Client bytes queued for writing.
    pub client_bytes: u64,
    /// Primary bytes queued for writing (with `responses = true`).
    pub server_bytes: u64,
    /// Files opened (the first, rotations, reopenings after errors).
    pub files: u64,
    /// Bytes written to files, framing included.
    pub bytes_written: u64,
    /// Failed writes or file opens.
    pub write_errors: u64,
}

#[derive(Default)]
struct Shared {
    next_id: AtomicU64,
    sessions_opened: AtomicU64,
    sessions_refused: AtomicU64,
    sessions_detached: AtomicU64,
    client_bytes: AtomicU64,
    server_bytes: AtomicU64,
    files: AtomicU64,
    bytes_written: AtomicU64,
    write_errors: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> RecorderStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RecorderStats {
            sessions_opened: l(&self.sessions_opened),
            sessions_refused: l(&self.sessions_refused),
            sessions_detached: l(&self.sessions_detached),
            client_bytes: l(&self.client_bytes),
            server_bytes: l(&self.server_bytes),
            files: l(&self.files),
            bytes_written: l(&self.bytes_written),
            write_errors: l(&self.write_errors),
        }
    }
}

/// State of one recorded session shared by the worker's handle and the writer.
struct SessionState {
    id: u64,
    /// Set by whoever gives up on the session first (handle on overflow, writer on error).
    detached: AtomicBool,
    /// Messages for this session successfully queued by the handle.
    queued: AtomicU64,
}

/// A worker's token for one recorded session.
pub struct RecId {
    state: Arc<SessionState>,
}

impl RecId {
    /// The recorder's id (it appears in the file's annotation).
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Whether this session's recording was cut loose.
    pub fn is_detached(&self) -> bool {
        self.state.detached.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for RecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecId")
            .field("id", &self.id())
            .field("detached", &self.is_detached())
            .finish()
    }
}

/// Which peer of a recorded session sent the bytes.
#[derive(Clone, Copy, Debug)]
enum Origin {
    Client,
    Server,
}

enum Msg {
    Open {
        state: Arc<SessionState>,
        meta: SessionMeta,
    },
    Bytes {
        id: u64,
        origin: Origin,
        data: Vec<u8>,
        ts_ns: u64,
    },
    Close {
        id: u64,
        ts_ns: u64,
    },
    Abort {
        id: u64,
        ts_ns: u64,
    },
    Shutdown,
}

/// The worker side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct RecordHandle {
    tx: Sender<Msg>,
    /// Ids of sessions the handles detached, for the writer to end in the file. Unbounded
    /// but holds at most one entry per session, so it never needs to block either.
    detach_tx: Sender<u64>,
    shared: Arc<Shared>,
    record_responses: bool,
}

impl RecordHandle {
    /// Starts recording a session; `None` if the queue is full (counted, not recorded).
    pub fn open_session(&self, meta: SessionMeta) -> Option<RecId> {
        let state = Arc::new(SessionState {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            detached: AtomicBool::new(false),
            queued: AtomicU64::new(1),
        });
        match self.tx.try_send(Msg::Open {
            state: Arc::clone(&state),
            meta,
        }) {
            Ok(()) => {
                self.shared.sessions_opened.fetch_add(1, Ordering::Relaxed);
                Some(RecId { state })
            }
            Err(_) => {
                self.shared.sessions_refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Bytes the client sent, in order.
    pub fn client_bytes(&self, id: &RecId, data: &[u8], ts: SystemTime) {
        self.queue_bytes(id, Origin::Client, data, ts);
    }

    /// Bytes the primary answered (ignored unless `record_responses`).
    pub fn server_bytes(&self, id: &RecId, data: &[u8], ts: SystemTime) {
        if self.record_responses {
            self.queue_bytes(id, Origin::Server, data, ts);
        }
    }

    /// Queues one peer's bytes for the writer and counts them once they are queued.
    fn queue_bytes(&self, id: &RecId, origin: Origin, data: &[u8], ts: SystemTime) {
        if data.is_empty() || id.is_detached() {
            return;
        }
        let msg = Msg::Bytes {
            id: id.id(),
            origin,
            data: data.to_vec(),
            ts_ns: unix_ns(ts),
        };
        if self.send(id, msg) {
            let queued = match origin {
                Origin::Client => &self.shared.client_bytes,
                Origin::Server => &self.shared.server_bytes,
            };
            queued.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }

    /// The session ended in order.
    pub fn close(&self, id: RecId) {
        if !id.is_detached() {
            self.send(
                &id,
                Msg::Close {
                    id: id.id(),
                    ts_ns: now_ns(),
                },
            );
        }
    }

    /// The session was reset or timed out.
    pub fn abort(&self, id: RecId) {
        if !id.is_detached() {
            self.send(
                &id,
                Msg::Abort {
                    id: id.id(),
                    ts_ns: now_ns(),
                },
            );
        }
    }

    /// Counters of the whole recorder.
    pub fn stats(&self) -> RecorderStats {
        self.shared.snapshot()
    }

    /// Queues `msg` for `id`'s session or detaches the session; true if queued.
    fn send(&self, id: &RecId, msg: Msg) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => {
                id.state.queued.fetch_add(1, Ordering::Release);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                if !id.state.detached.swap(true, Ordering::AcqRel) {
                    self.shared
                        .sessions_detached
                        .fetch_add(1, Ordering::Relaxed);
                    // Unbounded channel: never full; if the writer is gone nobody cares.
                    let _ = self.detach_tx.try_send(id.id());
                }
                false
            }
        }
    }
}

// By hand: channels and shared counters are nothing to print. Whether a service has a
// handle at all is what its plan's `Debug` needs to show.
impl fmt::Debug for RecordHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordHandle")
            .field("record_responses", &self.record_responses)
            .finish_non_exhaustive()
    }
}

/// What a data plane does with a session of the replication core: the same in XDP mode
/// and in sockets mode, so that both record exactly alike.
impl RecordHandle {
    /// Starts recording a session of `service` from `client` to `primary`, starting now.
    /// `None` when the recorder's queue is full: the session is served, unrecorded, and
    /// the recorder counts it as refused.
    pub fn open_replicated(
        &self,
        service: &str,
        client: SocketAddrV4,
        primary: SocketAddrV4,
    ) -> Option<RecId> {
        self.open_session(SessionMeta {
            service: service.to_owned(),
            client,
            primary,
            start_ns: now_ns(),
        })
    }

    /// Records `taken` bytes that the core's `on_data` accepted from `side`: the client's
    /// always, the primary's when the recorder keeps responses, the replicas' never (they
    /// are not part of the conversation a replay reproduces). Called with exactly what
    /// the core took, in the order it took it, so the file holds the stream the primary
    /// and replicas were given.
    pub fn accepted(&self, id: &RecId, side: Side, taken: &[u8], ts: SystemTime) {
        match side {
            Side::Client => self.client_bytes(id, taken, ts),
            Side::Primary => self.server_bytes(id, taken, ts),
            Side::Replica(_) => {}
        }
    }

    /// Ends a session's recording from the session's final counters (`None`: the core
    /// had already forgotten it). A session the core tore down (client reset, primary
    /// failure, idle timeout) is marked aborted, so a replay knows its stream may be
    /// cut short; anything else ended in order.
    pub fn end(&self, id: RecId, outcome: Option<&SessionStats>) {
        let clean = outcome.is_some_and(|s| {
            s.client_resets == 0 && s.primary_failures == 0 && s.idle_timeouts == 0
        });
        if clean {
            self.close(id);
        } else {
            self.abort(id);
        }
    }
}

/// The owner side: starts and stops the writer thread.
pub struct Recorder {
    handle: RecordHandle,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Creates the directory, opens the first file (so configuration errors surface here)
    /// and starts the writer thread.
    pub fn start(cfg: RecorderConfig) -> io::Result<Recorder> {
        if cfg.queue_capacity == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queue_capacity must be > 0",
            ));
        }
        fs::create_dir_all(&cfg.dir)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity);
        let (detach_tx, detach_rx) = crossbeam_channel::unbounded();
        let mut writer = Writer {
            file: None,
            file_seq: 0,
            closed_bytes: 0,
            header_bytes: 0,
            opened_at: Instant::now(),
            sessions: HashMap::new(),
            pending_detach: Vec::new(),
            shared: Arc::clone(&shared),
            cfg: cfg.clone(),
        };
        writer.open_file()?;
        let thread = std::thread::Builder::new()
            .name("ncp-recorder".into())
            .spawn(move || writer.run(&rx, &detach_rx))?;
        Ok(Recorder {
            handle: RecordHandle {
                tx,
                detach_tx,
                shared,
                record_responses: cfg.record_responses,
            },
            thread: Some(thread),
        })
    }

    /// A handle for a worker.
    pub fn handle(&self) -> RecordHandle {
        self.handle.clone()
    }

    /// Counters.
    pub fn stats(&self) -> RecorderStats {
        self.handle.stats()
    }

    /// Writes everything queued so far, closes the file and stops the writer. Sessions
    /// still open stay open in the file (the reader reports them as unterminated).
    pub fn finish(mut self) -> RecorderStats {
        self.stop();
        self.handle.stats()
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            // The owner may wait here (it is not a worker): a blocking send keeps the order
            // after everything already queued.
            let _ = self.handle.tx.send(Msg::Shutdown);
            let _ = t.join();
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Live {
    state: Arc<SessionState>,
    synth: SynthSession,
    /// Messages of this session the writer has handled.
    handled: u64,
}

struct Writer {
    file: Option<PcapngWriter<BufWriter<File>>>,
    file_seq: u64,
    /// Bytes in files already closed (for the running total).
    closed_bytes: u64,
    /// Size of a new file's headers (a file this size holds no packets).
    header_bytes: u64,
    opened_at: Instant,
    sessions: HashMap<u64, Live>,
    /// Detached sessions whose queued messages are not all handled yet.
    pending_detach: Vec<u64>,
    shared: Arc<Shared>,
    cfg: RecorderConfig,
}

/// Messages handled between flushes at most; bounds the data at risk and the latency of
/// the rotation check under sustained load.
const BATCH: usize = 1024;

impl Writer {
    fn run(&mut self, rx: &Receiver<Msg>, detach_rx: &Receiver<u64>) {
        loop {
            let wait = self.until_rotation().min(Duration::from_millis(200));
            let first = match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            let mut next = first;
            let mut n = 0;
            while let Some(m) = next {
                if matches!(m, Msg::Shutdown) {
                    stop = true;
                    break;
                }
                self.handle(m);
                n += 1;
                next = if n < BATCH { rx.try_recv().ok() } else { None };
            }
            while let Ok(id) = detach_rx.try_recv() {
                self.pending_detach.push(id);
            }
            self.settle_detached();
            self.flush();
            if stop {
                break;
            }
            if self.until_rotation().is_zero() || self.file.is_none() {
                self.rotate();
            }
        }
        self.flush();
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Open { state, meta } => {
                let Some(file) = self.file.as_mut() else {
                    self.detach_state(&state);
                    return;
                };
                match file.open(state.id, &meta, meta.start_ns) {
                    Ok(synth) => {
                        self.sessions.insert(
                            state.id,
                            Live {
                                state,
                                synth,
                                handled: 1,
                            },
                        );
                    }
                    Err(_) => self.write_failed(),
                }
            }
            Msg::Bytes {
                id,
                origin,
                data,
                ts_ns,
            } => self.with(id, |f, s| match origin {
                Origin::Client => f.client_data(s, &data, ts_ns),
                Origin::Server => f.server_data(s, &data, ts_ns),
            }),
            Msg::Close { id, ts_ns } => {
                self.with(id, |f, s| f.close(s, ts_ns));
                self.sessions.remove(&id);
            }
            Msg::Abort { id, ts_ns } => {
                self.with(id, |f, s| f.abort(s, false, ts_ns));
                self.sessions.remove(&id);
            }
            Msg::Shutdown => {}
        }
    }

    fn with(
        &mut self,
        id: u64,
        f: impl FnOnce(&mut PcapngWriter<BufWriter<File>>, &mut SynthSession) -> io::Result<()>,
    ) {
        let (Some(file), Some(live)) = (self.file.as_mut(), self.sessions.get_mut(&id)) else {
            return;
        };
        live.handled += 1;
        if f(file, &mut live.synth).is_err() {
            self.write_failed();
        }
    }

    /// Ends detached sessions once everything their handle queued has been written.
    fn settle_detached(&mut self) {
        let now = now_ns();
        let mut i = 0;
        while i < self.pending_detach.len() {
            let id = self.pending_detach[i];
            let done = match self.sessions.get(&id) {
                None => true, // already closed, or lost with a failed file
                Some(l) => l.handled >= l.state.queued.load(Ordering::Acquire),
            };
            if done {
                self.pending_detach.swap_remove(i);
                if let Some(mut l) = self.sessions.remove(&id)
                    && let Some(f) = self.file.as_mut()
                    && f.abort(&mut l.synth, true, now).is_err()
                {
                    self.write_failed();
                }
            } else {
                i += 1;
            }
        }
    }

    fn until_rotation(&self) -> Duration {
        let mut d = Duration::from_secs(3600);
        let has_packets = self
            .file
            .as_ref()
            .is_some_and(|f| f.bytes_written() > self.header_bytes);
        // An idle recorder keeps its (empty) file rather than leaving a trail of them.
        if self.cfg.rotate_secs > 0 && has_packets {
            d = Duration::from_secs(self.cfg.rotate_secs).saturating_sub(self.opened_at.elapsed());
        }
        if self.cfg.rotate_bytes > 0
            && let Some(f) = &self.file
            && f.bytes_written() >= self.cfg.rotate_bytes
        {
            d = Duration::ZERO;
        }
        d
    }

    fn rotate(&mut self) {
        self.flush();
        let had_file = self.file.is_some();
        if let Some(f) = self.file.take() {
            self.closed_bytes += f.bytes_written();
        }
        if !had_file && self.opened_at.elapsed() < Duration::from_secs(1) {
            return; // after a failure, retry at most once a second
        }
        if self.open_file().is_err() {
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for l in self.sessions.values_mut() {
            l.synth.mark_continued();
        }
    }

    fn open_file(&mut self) -> io::Result<()> {
        self.opened_at = Instant::now();
        let ms = now_ns() / 1_000_000;
        let name = format!(
            "{}-{ms:013}-{:04}.pcapng",
            self.cfg.file_prefix, self.file_seq
        );
        self.file_seq += 1;
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.cfg.dir.join(name))?;
        let w = PcapngWriter::new(
            BufWriter::with_capacity(256 * 1024, f),
            WriterOptions::default(),
        )?;
        self.shared.files.fetch_add(1, Ordering::Relaxed);
        self.header_bytes = w.bytes_written();
        self.file = Some(w);
        Ok(())
    }

    fn flush(&mut self) {
        let Some(f) = self.file.as_mut() else { return };
        if f.flush().is_err() {
            self.write_failed();
        }
        if let Some(f) = &self.file {
            self.shared
                .bytes_written
                .store(self.closed_bytes + f.bytes_written(), Ordering::Relaxed);
        }
    }

    /// A write failed: the file is abandoned, and so are the sessions in it (their streams
    /// in the file can no longer be made consistent). Handles stop sending for them.
    fn write_failed(&mut self) {
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.file.take() {
            self.closed_bytes += f.bytes_written();
        }
        for (_, l) in self.sessions.drain() {
            if !l.state.detached.swap(true, Ordering::AcqRel) {
                self.shared
                    .sessions_detached
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn detach_state(&self, state: &SessionState) {
        if !state.detached.swap(true, Ordering::AcqRel) {
            self.shared
                .sessions_detached
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_and_ids_can_live_in_worker_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RecordHandle>();
        send_sync::<RecId>();
    }

    #[test]
    fn a_zero_queue_is_refused() {
        let cfg = RecorderConfig {
            dir: std::env::temp_dir(),
            file_prefix: "never".into(),
            rotate_bytes: 0,
            rotate_secs: 0,
            queue_capacity: 0,
            record_responses: false,
        };
        assert!(Recorder::start(cfg).is_err());
    }
}
