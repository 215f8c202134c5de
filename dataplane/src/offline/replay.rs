//! Replaying recordings into a target over kernel TCP.
//!
//! One dispatcher (the caller's thread) streams events out of the recordings with
//! [`SessionReader`] and paces them; every replayed session gets its own connection and two
//! threads (one writes the recorded client bytes in order, one reads and discards the
//! target's answers so the target never stalls on a full send buffer). Sessions run
//! concurrently as they did when recorded, up to [`ReplayConfig::max_sessions`] at once;
//! beyond that the dispatcher waits for one to finish, which delays later sessions but
//! keeps threads and memory bounded. Between dispatcher and session threads the bytes
//! travel through a bounded channel, so memory stays bounded however large the recording.
//!
//! Kernel sockets rather than raw packets for the same reason the paper gives for the live
//! mode: the target's TCP stack gets a normal connection, with retransmission and flow
//! control handled by the kernel.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

use super::SessionMeta;
use super::reader::{EndKind, Event, ReadStats, SessionReader};

/// How fast to replay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// As recorded: sessions start and send at their recorded offsets.
    Original,
    /// As fast as possible (still one connection per session, in session order).
    Fast,
    /// Recorded offsets divided by this factor (2.0: twice as fast).
    Factor(f64),
}

/// A time bound of the session filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeBound {
    /// Nanoseconds since the Unix epoch.
    Absolute(u64),
    /// Nanoseconds after the start of the first session in the recordings.
    Relative(u64),
}

/// Which sessions to replay; all given conditions must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Sessions that started at or after this.
    pub from: Option<TimeBound>,
    /// Sessions that started before this.
    pub until: Option<TimeBound>,
    /// Clients in this IPv4 prefix (address, prefix length).
    pub client: Option<(Ipv4Addr, u8)>,
    /// This service name exactly.
    pub service: Option<String>,
}

impl Filter {
    fn accepts(&self, meta: &SessionMeta, first_start: u64) -> bool {
        let resolve = |b: TimeBound| match b {
            TimeBound::Absolute(t) => t,
            TimeBound::Relative(d) => first_start.saturating_add(d),
        };
        if self.from.is_some_and(|b| meta.start_ns < resolve(b)) {
            return false;
        }
        if self.until.is_some_and(|b| meta.start_ns >= resolve(b)) {
            return false;
        }
        if let Some((net, len)) = self.client {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            if u32::from(*meta.client.ip()) & mask != u32::from(net) & mask {
                return false;
            }
        }
        if self.service.as_ref().is_some_and(|s| *s != meta.service) {
            return false;
        }
        true
    }
}

/// What to replay where.
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    /// Where every session goes.
    pub target: SocketAddr,
    /// Pacing.
    pub pace: Pace,
    /// Session filter.
    pub filter: Filter,
    /// Sessions replayed at the same time at most.
    pub max_sessions: usize,
    /// Connect timeout per session.
    pub connect_timeout: Duration,
    /// After sending everything (and half-closing), how long to wait for the target's last
    /// answers and its close.
    pub drain_timeout: Duration,
}

impl ReplayConfig {
    /// Defaults for `target`.
    pub fn new(target: SocketAddr) -> Self {
        ReplayConfig {
            target,
            pace: Pace::Original,
            filter: Filter::default(),
            max_sessions: 256,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Live counters, for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Sessions whose replay started.
    pub started: AtomicU64,
    /// Sessions finished (any outcome).
    pub finished: AtomicU64,
    /// Sessions finished with an error.
    pub failed: AtomicU64,
    /// Client bytes written to the target.
    pub bytes_sent: AtomicU64,
    /// Answer bytes read (and discarded).
    pub answer_bytes: AtomicU64,
}

/// How one session's replay went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome", content = "detail")]
pub enum Outcome {
    /// Everything recorded was sent.
    Ok,
    /// No connection.
    ConnectFailed(String),
    /// The target closed or reset the connection before all recorded bytes were sent.
    TargetClosedEarly(String),
    /// Another socket error.
    Error(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok => write!(f, "ok"),
            Outcome::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            Outcome::TargetClosedEarly(e) => write!(f, "target closed early: {e}"),
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Per-session result.
#[derive(Clone, Debug, Serialize)]
pub struct SessionReport {
    /// Order of the session in the recordings (0-based, counting filtered ones too).
    pub index: u64,
    /// Metadata as recorded.
    pub meta: SessionMeta,
    /// How the recording of the session ended.
    pub recorded_end: EndKind,
    /// The session began in a file that was not given (after rotation): replayed from the
    /// middle of its stream.
    pub continued: bool,
    /// Client bytes in the recording.
    pub bytes_recorded: u64,
    /// Client bytes written to the target.
    pub bytes_sent: u64,
    /// Answer bytes read from the target.
    pub answer_bytes: u64,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Sessions found in the recordings.
    pub sessions_seen: u64,
    /// Sessions the filter left out.
    pub sessions_filtered: u64,
    /// Sessions replayed.
    pub sessions_replayed: u64,
    /// Replayed sessions with an error outcome.
    pub sessions_failed: u64,
    /// Replayed sessions whose recording is only a prefix (detached, unterminated) or
    /// starts mid-stream (continued).
    pub sessions_incomplete: u64,
    /// Sessions replayed but left out of [`Summary::sessions`] to bound memory.
    pub sessions_unlisted: u64,
    /// Client bytes written to the target.
    pub bytes_sent: u64,
    /// Answer bytes read from the target.
    pub answer_bytes: u64,
    /// Most sessions the replay had open at once (never above `max_sessions`).
    pub peak_sessions: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Damaged recordings (file and byte offset); what was intact was replayed.
    pub read_errors: Vec<String>,
    /// Reader counters.
    pub read_stats: ReadStats,
    /// One entry per replayed session, in recording order: every failed one and the first
    /// [`MAX_OK_REPORTS`] successful ones (up to [`MAX_FAILED_REPORTS`] failed).
    pub sessions: Vec<SessionReport>,
}

/// Successful sessions listed in a [`Summary`] at most.
pub const MAX_OK_REPORTS: usize = 10_000;
/// Failed sessions listed in a [`Summary`] at most.
pub const MAX_FAILED_REPORTS: usize = 10_000;

/// What travels from dispatcher to a session's writer thread.
enum Chunk {
    Data(Vec<u8>),
    End(EndKind),
}

/// Chunks buffered per session between dispatcher and writer; with ≤ 1460-byte chunks
/// from our recordings this is ≤ ~380 KiB per session.
const SESSION_QUEUE: usize = 256;
/// The writer coalesces queued chunks up to this size per `write`.
const WRITE_BATCH: usize = 64 * 1024;

/// Bytes held for sessions waiting for a free slot, over all of them. A session that would
/// exceed it is not replayed (reported as failed) rather than growing memory.
pub const PENDING_BUDGET: usize = 64 << 20;

/// A session's place in the dispatcher.
enum Slot {
    /// Its thread runs; chunks go through the channel.
    Running(Sender<Chunk>),
    /// Waiting for a free slot (more than `max_sessions` at once): its chunks are held here.
    Pending(Box<Waiting>),
}

struct Waiting {
    job: Job,
    chunks: Vec<Chunk>,
    bytes: usize,
    ended: bool,
    /// Dropped for lack of pending budget: bytes are only counted.
    overflowed: bool,
    bytes_recorded: u64,
    end: EndKind,
}

struct Dispatcher<'a> {
    cfg: &'a ReplayConfig,
    progress: Arc<Progress>,
    slots: HashMap<u64, Slot>,
    /// Pending sessions, oldest first.
    queue: VecDeque<u64>,
    /// Bytes held by pending sessions.
    pending_bytes: usize,
    threads: Vec<JoinHandle<()>>,
    done_tx: Sender<SessionReport>,
    done_rx: Receiver<SessionReport>,
    active: usize,
    /// Most sessions active at once so far.
    peak: usize,
    reports: Vec<SessionReport>,
    listed_ok: usize,
    listed_failed: usize,
    totals: Summary,
    first_start: Option<u64>,
    /// Pacing origin: (recorded ns, wall clock) of the first replayed event.
    origin: Option<(u64, Instant)>,
    seen: u64,
    filtered: u64,
}

impl Dispatcher<'_> {
    fn event(&mut self, ev: Event) -> ControlFlow<()> {
        match ev {
            Event::Open {
                sid,
                meta,
                ts_ns,
                continued,
                ..
            } => {
                self.seen += 1;
                let first = *self.first_start.get_or_insert(meta.start_ns);
                if !self.cfg.filter.accepts(&meta, first) {
                    self.filtered += 1;
                    return ControlFlow::Continue(());
                }
                self.pace(ts_ns);
                self.reap();
                let job = Job {
                    index: sid,
                    meta,
                    continued,
                    target: self.cfg.target,
                    connect_timeout: self.cfg.connect_timeout,
                    drain_timeout: self.cfg.drain_timeout,
                };
                // Waiting here for a running session to finish could deadlock (it may
                // need events that come later in the file), so over the limit the new
                // session waits in memory instead.
                if self.active < self.cfg.max_sessions.max(1) && self.queue.is_empty() {
                    self.spawn(sid, job, Vec::new(), None);
                } else {
                    self.queue.push_back(sid);
                    let w = Waiting {
                        job,
                        chunks: Vec::new(),
                        bytes: 0,
                        ended: false,
                        overflowed: false,
                        bytes_recorded: 0,
                        end: EndKind::Unterminated,
                    };
                    self.slots.insert(sid, Slot::Pending(Box::new(w)));
                }
            }
            Event::Client { sid, data, ts_ns } => match self.slots.get_mut(&sid) {
                Some(Slot::Running(tx)) => {
                    let tx = tx.clone();
                    self.pace(ts_ns);
                    // Blocks while the session's queue is full: back-pressure from a slow
                    // target reaches the reader instead of growing memory.
                    let _ = tx.send(Chunk::Data(data));
                }
                Some(Slot::Pending(w)) => {
                    w.bytes_recorded += data.len() as u64;
                    if !w.overflowed && self.pending_bytes + data.len() > PENDING_BUDGET {
                        w.overflowed = true;
                        self.pending_bytes -= w.bytes;
                        w.bytes = 0;
                        w.chunks = Vec::new();
                    }
                    if !w.overflowed {
                        self.pending_bytes += data.len();
                        w.bytes += data.len();
                        w.chunks.push(Chunk::Data(data));
                    }
                }
                None => {}
            },
            Event::Server { .. } => {}
            Event::End { sid, kind, ts_ns } => match self.slots.get_mut(&sid) {
                Some(Slot::Running(_)) => {
                    if let Some(Slot::Running(tx)) = self.slots.remove(&sid) {
                        self.pace(ts_ns);
                        let _ = tx.send(Chunk::End(kind));
                    }
                }
                Some(Slot::Pending(w)) => {
                    w.ended = true;
                    w.end = kind;
                    if !w.overflowed {
                        w.chunks.push(Chunk::End(kind));
                    }
                }
                None => {}
            },
        }
        while let Ok(r) = self.done_rx.try_recv() {
            self.collect(r);
        }
        ControlFlow::Continue(())
    }

    /// Starts a session thread, handing it chunks that were held while it waited.
    fn spawn(&mut self, sid: u64, job: Job, held: Vec<Chunk>, ended: Option<EndKind>) {
        let (tx, rx) = crossbeam_channel::bounded(SESSION_QUEUE);
        let progress = Arc::clone(&self.progress);
        let done = self.done_tx.clone();
        let fallback = SessionReport {
            index: sid,
            meta: job.meta.clone(),
            continued: job.continued,
            recorded_end: ended.unwrap_or(EndKind::Unterminated),
            bytes_recorded: 0,
            bytes_sent: 0,
            answer_bytes: 0,
            outcome: Outcome::Error("no thread for the session".into()),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("replay-{sid}"))
            .spawn(move || {
                let _ = done.send(run_session(job, &rx, &progress));
            });
        match spawned {
            Ok(h) => {
                self.progress.started.fetch_add(1, Ordering::Relaxed);
                self.active += 1;
                self.peak = self.peak.max(self.active);
                self.threads.push(h);
                for c in held {
                    // The thread is running, so this only waits for it to write.
                    let _ = tx.send(c);
                }
                if ended.is_none() {
                    self.slots.insert(sid, Slot::Running(tx));
                }
            }
            Err(_) => {
                // Out of threads: report the session as failed rather than stall.
                self.active += 1; // balanced by collect()
                let _ = self.done_tx.send(fallback);
            }
        }
    }

    /// Moves waiting sessions into free slots, oldest first.
    fn promote(&mut self) {
        while self.active < self.cfg.max_sessions.max(1) {
            let Some(sid) = self.queue.pop_front() else {
                return;
            };
            let Some(Slot::Pending(w)) = self.slots.remove(&sid) else {
                continue;
            };
            let w = *w;
            self.pending_bytes -= w.bytes;
            if w.overflowed {
                let report = SessionReport {
                    index: sid,
                    meta: w.job.meta,
                    continued: w.job.continued,
                    recorded_end: w.end,
                    bytes_recorded: w.bytes_recorded,
                    bytes_sent: 0,
                    answer_bytes: 0,
                    outcome: Outcome::Error(format!(
                        "not replayed: more than {} sessions at once and {} MiB of their data waiting",
                        self.cfg.max_sessions,
                        PENDING_BUDGET >> 20
                    )),
                };
                // Any events of it still to come find no slot and are dropped.
                self.record(report);
                continue;
            }
            let ended = w.ended.then_some(w.end);
            self.spawn(sid, w.job, w.chunks, ended);
        }
    }

    /// Joins finished threads now and then so the handle list stays short.
    fn reap(&mut self) {
        if self.threads.len() > 2 * self.cfg.max_sessions.max(1) {
            let (fin, live): (Vec<_>, Vec<_>) =
                self.threads.drain(..).partition(|t| t.is_finished());
            for t in fin {
                let _ = t.join();
            }
            self.threads = live;
        }
    }

    fn collect(&mut self, r: SessionReport) {
        self.active = self.active.saturating_sub(1);
        self.record(r);
        self.promote();
    }

    fn record(&mut self, r: SessionReport) {
        let t = &mut self.totals;
        t.sessions_replayed += 1;
        t.bytes_sent += r.bytes_sent;
        t.answer_bytes += r.answer_bytes;
        if r.continued || matches!(r.recorded_end, EndKind::Detached | EndKind::Unterminated) {
            t.sessions_incomplete += 1;
        }
        let ok = r.outcome == Outcome::Ok;
        if !ok {
            t.sessions_failed += 1;
        }
        let listed = if ok {
            &mut self.listed_ok
        } else {
            &mut self.listed_failed
        };
        let cap = if ok {
            MAX_OK_REPORTS
        } else {
            MAX_FAILED_REPORTS
        };
        if *listed < cap {
            *listed += 1;
            self.reports.push(r);
        } else {
            t.sessions_unlisted += 1;
        }
    }

    /// Sleeps until the recorded time `ts_ns` comes up on the replay clock.
    fn pace(&mut self, ts_ns: u64) {
        let factor = match self.cfg.pace {
            Pace::Fast => return,
            Pace::Original => 1.0,
            Pace::Factor(f) if f > 0.0 => f,
            Pace::Factor(_) => return,
        };
        let (rec0, wall0) = *self.origin.get_or_insert((ts_ns, Instant::now()));
        let offset = ts_ns.saturating_sub(rec0) as f64 / factor;
        let due = wall0 + Duration::from_nanos(offset as u64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// Replays `paths` (in the given order, as one recording) per `cfg`, updating `progress`.
/// Never panics on bad input: damaged files appear in [`Summary::read_errors`].
pub fn replay(paths: &[PathBuf], cfg: &ReplayConfig, progress: Arc<Progress>) -> Summary {
    let started = Instant::now();
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let mut d = Dispatcher {
        cfg,
        progress,
        slots: HashMap::new(),
        queue: VecDeque::new(),
        pending_bytes: 0,
        threads: Vec::new(),
        done_tx,
        done_rx,
        active: 0,
        peak: 0,
        reports: Vec::new(),
        listed_ok: 0,
        listed_failed: 0,
        totals: Summary::default(),
        first_start: None,
        origin: None,
        seen: 0,
        filtered: 0,
    };
    let mut reader = SessionReader::new();
    let mut read_errors = Vec::new();
    for p in paths {
        if let Err(e) = reader.read_path(p, &mut |ev| d.event(ev)) {
            read_errors.push(e.to_string());
        }
    }
    reader.finish(&mut |ev| d.event(ev));
    // Every session has had its end now: running ones finish on their own, and each one
    // that finishes lets a waiting one start.
    while d.active > 0 || !d.queue.is_empty() {
        match d.done_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(r) => d.collect(r),
            Err(_) if d.active == 0 => d.promote(),
            Err(_) => {}
        }
    }
    for t in d.threads.drain(..) {
        let _ = t.join();
    }
    let mut reports = std::mem::take(&mut d.reports);
    reports.sort_by_key(|r| r.index);
    Summary {
        sessions_seen: d.seen,
        sessions_filtered: d.filtered,
        sessions_failed: d.totals.sessions_failed,
        peak_sessions: d.peak as u64,
        seconds: started.elapsed().as_secs_f64(),
        read_errors,
        read_stats: reader.stats(),
        sessions: reports,
        ..d.totals
    }
}

/// What a session thread needs to know.
struct Job {
    index: u64,
    meta: SessionMeta,
    continued: bool,
    target: SocketAddr,
    connect_timeout: Duration,
    drain_timeout: Duration,
}

/// One session: connect, write the recorded bytes in order, half-close, drain answers.
fn run_session(job: Job, rx: &Receiver<Chunk>, progress: &Progress) -> SessionReport {
    let Job {
        index,
        meta,
        continued,
        target,
        connect_timeout,
        drain_timeout,
    } = job;
    let mut report = SessionReport {
        index,
        meta,
        continued,
        recorded_end: EndKind::Unterminated,
        bytes_recorded: 0,
        bytes_sent: 0,
        answer_bytes: 0,
        outcome: Outcome::Ok,
    };
    let stream = TcpStream::connect_timeout(&target, connect_timeout).and_then(|s| {
        s.set_nodelay(true)?;
        Ok(s)
    });
    let (mut stream, drain) = match stream.and_then(|s| {
        let r = s.try_clone()?;
        Ok((s, r))
    }) {
        Ok((s, r)) => {
            let shared = Arc::new(DrainShared {
                sent: AtomicU64::new(0),
                sent_at_close: AtomicU64::new(u64::MAX),
                writer_done: AtomicBool::new(false),
            });
            let h = spawn_drain(r, Arc::clone(&shared), drain_timeout);
            (Some(s), Some((h, shared)))
        }
        Err(e) => {
            report.outcome = Outcome::ConnectFailed(e.to_string());
            (None, None)
        }
    };

    // Consume the whole queue even after a failure, so the dispatcher never blocks on us
    // and the report knows how much was recorded.
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    let mut end = None;
    while end.is_none() {
        let Ok(first) = rx.recv() else { break };
        let mut next = Some(first);
        while let Some(c) = next {
            match c {
                Chunk::Data(d) => {
                    report.bytes_recorded += d.len() as u64;
                    if stream.is_some() {
                        batch.extend_from_slice(&d);
                    }
                }
                Chunk::End(k) => {
                    end = Some(k);
                    break;
                }
            }
            next = if batch.len() < WRITE_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Some(s) = stream.as_mut()
            && !batch.is_empty()
        {
            // Counted before writing: a target that closes once it has read everything must
            // not look early just because this thread had not updated the count yet.
            if let Some((_, shared)) = &drain {
                let upto = report.bytes_sent + batch.len() as u64;
                shared.sent.store(upto, Ordering::Release);
            }
            match s.write_all(&batch) {
                Ok(()) => {
                    report.bytes_sent += batch.len() as u64;
                    progress
                        .bytes_sent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    report.outcome = early_or_error(&e, report.bytes_sent);
                    let _ = s.shutdown(Shutdown::Both);
                    stream = None;
                }
            }
        }
        batch.clear();
    }
    report.recorded_end = end.unwrap_or(EndKind::Unterminated);

    // A target that closed while we still had bytes to send is worth reporting even when
    // the kernel accepted all our writes. (One that closes after everything was sent, like
    // an HTTP/1.0 server, is fine.) Read before our own half-close, after which the target
    // closing is the normal end.
    let closed_early = drain.as_ref().is_some_and(|(_, shared)| {
        let at = shared.sent_at_close.load(Ordering::Acquire);
        at != u64::MAX && at < report.bytes_sent
    });
    if let Some(s) = &stream {
        match report.recorded_end {
            // The original session was reset, or its recording cut short: reset this one
            // too (linger 0 makes the close an RST), so the target does not take a partial
            // stream for a complete one.
            EndKind::Reset | EndKind::Detached => {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                let _ = s.shutdown(Shutdown::Read);
            }
            _ => {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }
    if let Some((h, shared)) = drain {
        shared.writer_done.store(true, Ordering::Release);
        let answers = h.join().unwrap_or(0);
        report.answer_bytes = answers;
        progress.answer_bytes.fetch_add(answers, Ordering::Relaxed);
        if closed_early && report.outcome == Outcome::Ok && report.bytes_sent > 0 {
            report.outcome = Outcome::TargetClosedEarly(format!(
                "target closed the connection before the last of {} bytes was sent",
                report.bytes_sent
            ));
        }
    }
    progress.finished.fetch_add(1, Ordering::Relaxed);
    if report.outcome != Outcome::Ok {
        progress.failed.fetch_add(1, Ordering::Relaxed);
    }
    report
}

fn early_or_error(e: &io::Error, sent: u64) -> Outcome {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => {
            Outcome::TargetClosedEarly(format!("{e} after {sent} bytes"))
        }
        _ => Outcome::Error(format!("{e} after {sent} bytes")),
    }
}

/// What a session's writer and its drain thread share.
struct DrainShared {
    /// Bytes the writer has written so far, including a write in progress.
    sent: AtomicU64,
    /// `sent` when the target closed or reset (`u64::MAX`: it has not).
    sent_at_close: AtomicU64,
    /// The writer has finished sending.
    writer_done: AtomicBool,
}

/// Reads and discards answers until the target closes, or until `drain_timeout` after the
/// writer is done. Returns the bytes read.
fn spawn_drain(
    mut s: TcpStream,
    shared: Arc<DrainShared>,
    drain_timeout: Duration,
) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        // Short read timeouts let the thread notice the writer finishing while the target
        // stays silent (a long idle gap in an original-pace replay is not an error).
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let mut done_since: Option<Instant> = None;
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let sent = shared.sent.load(Ordering::Acquire);
                    shared.sent_at_close.store(sent, Ordering::Release);
                    break;
                }
                Ok(n) => total += n as u64,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if shared.writer_done.load(Ordering::Acquire) {
                        let since = *done_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= drain_timeout {
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    let sent = shared.sent.load(Ordering::Acquire);
                    shared.sent_at_close.store(sent, Ordering::Release);
                    break;
                }
            }
        }
        total
    })
}

/// Parses a client filter: `a.b.c.d/len` or a bare address (/32).
pub fn parse_prefix(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (
            a,
            l.parse::<u8>()
                .map_err(|_| format!("bad prefix length in {s:?}"))?,
        ),
        None => (s, 32),
    };
    if len > 32 {
        return Err(format!("prefix length {len} > 32"));
    }
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("bad IPv4 address in {s:?}"))?;
    Ok((addr, len))
}

/// Parses a time bound: `+SECS` (after the first session), Unix seconds (`1764180000.5`),
/// or UTC RFC 3339 (`2026-11-26T18:00:00Z`, fractional seconds allowed).
pub fn parse_time(s: &str) -> Result<TimeBound, String> {
    let secs_to_ns = |x: &str| -> Result<u64, String> {
        let v: f64 = x.parse().map_err(|_| format!("bad seconds {x:?}"))?;
        if !(0.0..1.8e10).contains(&v) {
            return Err(format!("seconds out of range: {x:?}"));
        }
        Ok((v * 1e9) as u64)
    };
    if let Some(rel) = s.strip_prefix('+') {
        return Ok(TimeBound::Relative(secs_to_ns(rel)?));
    }
    if !s.contains('T') {
        return Ok(TimeBound::Absolute(secs_to_ns(s)?));
    }
    let err = || format!("bad time {s:?}: want +SECS, Unix seconds or YYYY-MM-DDTHH:MM:SS[.f]Z");
    let body = s.strip_suffix('Z').ok_or_else(err)?;
    let (date, time) = body.split_once('T').ok_or_else(err)?;
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return Err(err());
    }
    let num = |x: &str| x.parse::<i64>().map_err(|_| err());
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (hh, mm) = (num(t[0])?, num(t[1])?);
    let sec: f64 = t[2].parse().map_err(|_| err())?;
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || !(0.0..61.0).contains(&sec)
    {
        return Err(err());
    }
    // Days since the epoch from a civil date (proleptic Gregorian), per H. Hinnant's
    // well-known algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let whole = days * 86_400 + hh * 3600 + mm * 60;
    if whole < 0 {
        return Err(err());
    }
    Ok(TimeBound::Absolute(
        whole as u64 * 1_000_000_000 + (sec * 1e9) as u64,
    ))
}

/// Parses `original`, `fast` or `factor:N`.
pub fn parse_pace(s: &str) -> Result<Pace, String> {
    match s {
        "original" => Ok(Pace::Original),
        "fast" => Ok(Pace::Fast),
        _ => {
            let f = s
                .strip_prefix("factor:")
                .and_then(|n| n.parse::<f64>().ok())
                .filter(|f| *f > 0.0 && f.is_finite())
                .ok_or_else(|| {
                    format!("bad pace {s:?}: want original, fast or factor:N (N > 0)")
                })?;
            Ok(Pace::Factor(f))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_times_prefixes_and_paces() {
        assert_eq!(parse_time("+1.5"), Ok(TimeBound::Relative(1_500_000_000)));
        assert_eq!(parse_time("10"), Ok(TimeBound::Absolute(10_000_000_000)));
        assert_eq!(
            parse_time("1970-01-02T00:00:01.5Z"),
            Ok(TimeBound::Absolute(86_401_500_000_000))
        );
        assert_eq!(
            parse_time("2000-03-01T00:00:00Z"),
            Ok(TimeBound::Absolute(951_868_800_000_000_000))
        );
        assert!(parse_time("2000-13-01T00:00:00Z").is_err());
        assert!(parse_time("yesterday").is_err());
        assert_eq!(
            parse_prefix("198.18.0.0/15"),
            Ok((Ipv4Addr::new(198, 18, 0, 0), 15))
        );
        assert!(parse_prefix("198.18.0.0/33").is_err());
        assert_eq!(parse_pace("factor:2"), Ok(Pace::Factor(2.0)));
        assert!(parse_pace("factor:0").is_err());
    }

    #[test]
    fn filter_matches_prefix_service_and_time() {
        let meta = SessionMeta {
            service: "kv".into(),
            client: "198.19.1.2:1000".parse().unwrap(),
            primary: "198.18.0.1:80".parse().unwrap(),
            start_ns: 5_000,
        };
        let mut f = Filter {
            client: Some((Ipv4Addr::new(198, 18, 0, 0), 15)),
            service: Some("kv".into()),
            from: Some(TimeBound::Relative(1_000)),
            until: Some(TimeBound::Absolute(6_000)),
        };
        assert!(f.accepts(&meta, 4_000));
        assert!(!f.accepts(&meta, 4_500)); // from = 5_500
        f.client = Some((Ipv4Addr::new(198, 18, 0, 0), 16));
        assert!(!f.accepts(&meta, 4_000));
        f.client = Some((Ipv4Addr::UNSPECIFIED, 0));
        assert!(f.accepts(&meta, 4_000));
    }
}
