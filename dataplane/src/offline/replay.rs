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

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
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

/// Per-session result.
#[derive(Clone, Debug, Serialize)]
pub struct SessionReport {
    /// Order of the session in the recordings (0-based, counting filtered ones too).
    pub index: u64,
    /// Metadata as recorded.
    pub meta: SessionMeta,
    /// How the recording of the session ended.
    pub recorded_end: EndKind,
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
    /// Client bytes written to the target.
    pub bytes_sent: u64,
    /// Answer bytes read from the target.
    pub answer_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Damaged recordings (file and byte offset); what was intact was replayed.
    pub read_errors: Vec<String>,
    /// Reader counters.
    pub read_stats: ReadStats,
    /// One entry per replayed session, in recording order.
    pub sessions: Vec<SessionReport>,
}

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

struct Slot {
    tx: Sender<Chunk>,
}

struct Dispatcher<'a> {
    cfg: &'a ReplayConfig,
    progress: Arc<Progress>,
    slots: HashMap<u64, Slot>,
    skipped: HashMap<u64, ()>,
    threads: Vec<JoinHandle<()>>,
    done_tx: Sender<SessionReport>,
    done_rx: Receiver<SessionReport>,
    active: usize,
    reports: Vec<SessionReport>,
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
                sid, meta, ts_ns, ..
            } => {
                self.seen += 1;
                let first = *self.first_start.get_or_insert(meta.start_ns);
                if !self.cfg.filter.accepts(&meta, first) {
                    self.filtered += 1;
                    self.skipped.insert(sid, ());
                    return ControlFlow::Continue(());
                }
                self.pace(ts_ns);
                while self.active >= self.cfg.max_sessions.max(1) {
                    match self.done_rx.recv() {
                        Ok(r) => self.collect(r),
                        Err(_) => break,
                    }
                }
                let (tx, rx) = crossbeam_channel::bounded(SESSION_QUEUE);
                let target = self.cfg.target;
                let progress = Arc::clone(&self.progress);
                let done = self.done_tx.clone();
                let connect_timeout = self.cfg.connect_timeout;
                let drain_timeout = self.cfg.drain_timeout;
                let spawned = std::thread::Builder::new()
                    .name(format!("replay-{sid}"))
                    .spawn(move || {
                        let r = run_session(
                            sid,
                            meta,
                            target,
                            connect_timeout,
                            drain_timeout,
                            &rx,
                            &progress,
                        );
                        let _ = done.send(r);
                    });
                match spawned {
                    Ok(h) => {
                        self.progress.started.fetch_add(1, Ordering::Relaxed);
                        self.active += 1;
                        self.threads.push(h);
                        self.slots.insert(sid, Slot { tx });
                    }
                    Err(_) => {
                        // Out of threads: count it as filtered-out rather than stall.
                        self.filtered += 1;
                        self.skipped.insert(sid, ());
                    }
                }
                // Reap finished threads now and then so the handle list stays short.
                if self.threads.len() > 2 * self.cfg.max_sessions.max(1) {
                    let (fin, live): (Vec<_>, Vec<_>) =
                        self.threads.drain(..).partition(|t| t.is_finished());
                    for t in fin {
                        let _ = t.join();
                    }
                    self.threads = live;
                }
            }
            Event::Client { sid, data, ts_ns } => {
                if let Some(slot) = self.slots.get(&sid) {
                    let tx = slot.tx.clone();
                    self.pace(ts_ns);
                    // Blocks while the session's queue is full: back-pressure from a slow
                    // target reaches the reader instead of growing memory.
                    let _ = tx.send(Chunk::Data(data));
                }
            }
            Event::Server { .. } => {}
            Event::End { sid, kind, ts_ns } => {
                self.skipped.remove(&sid);
                if let Some(slot) = self.slots.remove(&sid) {
                    self.pace(ts_ns);
                    let _ = slot.tx.send(Chunk::End(kind));
                }
            }
        }
        while let Ok(r) = self.done_rx.try_recv() {
            self.collect(r);
        }
        ControlFlow::Continue(())
    }

    fn collect(&mut self, r: SessionReport) {
        self.active = self.active.saturating_sub(1);
        self.reports.push(r);
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
        skipped: HashMap::new(),
        threads: Vec::new(),
        done_tx,
        done_rx,
        active: 0,
        reports: Vec::new(),
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
    // Whatever is left (should be nothing after finish) ends normally.
    for (_, slot) in d.slots.drain() {
        let _ = slot.tx.send(Chunk::End(EndKind::Unterminated));
    }
    for t in d.threads.drain(..) {
        let _ = t.join();
    }
    while let Ok(r) = d.done_rx.try_recv() {
        d.reports.push(r);
    }
    let mut reports = std::mem::take(&mut d.reports);
    reports.sort_by_key(|r| r.index);
    let failed = reports.iter().filter(|r| r.outcome != Outcome::Ok).count() as u64;
    Summary {
        sessions_seen: d.seen,
        sessions_filtered: d.filtered,
        sessions_replayed: reports.len() as u64,
        sessions_failed: failed,
        bytes_sent: reports.iter().map(|r| r.bytes_sent).sum(),
        answer_bytes: reports.iter().map(|r| r.answer_bytes).sum(),
        seconds: started.elapsed().as_secs_f64(),
        read_errors,
        read_stats: reader.stats(),
        sessions: reports,
    }
}

/// One session: connect, write the recorded bytes in order, half-close, drain answers.
fn run_session(
    index: u64,
    meta: SessionMeta,
    target: SocketAddr,
    connect_timeout: Duration,
    drain_timeout: Duration,
    rx: &Receiver<Chunk>,
    progress: &Progress,
) -> SessionReport {
    let mut report = SessionReport {
        index,
        meta,
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
            let peer_closed = Arc::new(AtomicBool::new(false));
            let writer_done = Arc::new(AtomicBool::new(false));
            let h = spawn_drain(
                r,
                Arc::clone(&peer_closed),
                Arc::clone(&writer_done),
                drain_timeout,
            );
            (Some(s), Some((h, peer_closed, writer_done)))
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

    // A close by the target before we were done sending is worth reporting even when the
    // kernel accepted all our writes. Checked before our own half-close, after which the
    // target closing is the normal end.
    let closed_early = drain
        .as_ref()
        .is_some_and(|(_, peer_closed, _)| peer_closed.load(Ordering::Acquire));
    if let Some(s) = &stream {
        match report.recorded_end {
            // The client reset the original session: drop the connection as well.
            EndKind::Reset => {
                let _ = s.shutdown(Shutdown::Both);
            }
            _ => {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }
    if let Some((h, _, writer_done)) = drain {
        writer_done.store(true, Ordering::Release);
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

/// Reads and discards answers until the target closes, or until `drain_timeout` after the
/// writer is done. Returns the bytes read.
fn spawn_drain(
    mut s: TcpStream,
    peer_closed: Arc<AtomicBool>,
    writer_done: Arc<AtomicBool>,
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
                    peer_closed.store(true, Ordering::Release);
                    break;
                }
                Ok(n) => total += n as u64,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if writer_done.load(Ordering::Acquire) {
                        let since = *done_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= drain_timeout {
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    peer_closed.store(true, Ordering::Release);
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

/// Convenience for callers that print addresses.
pub fn fmt_addr(a: &SocketAddrV4) -> String {
    a.to_string()
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
