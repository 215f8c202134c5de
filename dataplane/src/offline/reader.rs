//! Recordings back into sessions.
//!
//! [`SessionReader`] walks one or more pcapng streams and turns TCP/IPv4 packets into
//! per-session [`Event`]s: the session opens (with its metadata from our packet comment, or
//! synthesized from the 4-tuple for foreign captures), client and server bytes in sequence
//! order, and how it ended. Its state carries over from one file to the next, so a session
//! that spans a rotation continues seamlessly when the files are given in order.
//!
//! Reassembly is keyed by 4-tuple and by sequence number: retransmitted bytes are trimmed,
//! segments that arrive early wait in a bounded per-direction buffer, and a hole that the
//! buffer cannot bridge is skipped and counted rather than letting memory grow.
//!
//! A damaged file ends that file's reading with a [`FileError`] naming the byte offset;
//! everything before it has already been delivered, and the next file is still read.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::net::SocketAddrV4;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::SessionMeta;
use super::pcapng::{
    Annotation, Block, BlockReader, FormatError, FormatErrorKind, Note, TcpSegment, parse_tcp,
};

/// How a session's recording ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndKind {
    /// The client closed (FIN).
    Fin,
    /// Reset by either side.
    Reset,
    /// The recorder cut the session loose: the recorded bytes are a prefix of the session.
    Detached,
    /// The recording(s) ended with the session still open (recorder stopped, file cut).
    Unterminated,
}

/// One step of a recorded session, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A session begins.
    Open {
        /// Reader-assigned id, unique within this reader.
        sid: u64,
        /// The session's metadata.
        meta: SessionMeta,
        /// The recorder's id, for sessions recorded by NCP.
        recorded_id: Option<u64>,
        /// The session started in an earlier file that was not read (after rotation).
        continued: bool,
        /// Packet timestamp.
        ts_ns: u64,
    },
    /// Client → server bytes, in order.
    Client {
        /// Session.
        sid: u64,
        /// The bytes.
        data: Vec<u8>,
        /// Packet timestamp.
        ts_ns: u64,
    },
    /// Server → client bytes, in order.
    Server {
        /// Session.
        sid: u64,
        /// The bytes.
        data: Vec<u8>,
        /// Packet timestamp.
        ts_ns: u64,
    },
    /// The session is over; no more events for `sid`.
    End {
        /// Session.
        sid: u64,
        /// How it ended.
        kind: EndKind,
        /// Packet timestamp (of the last packet seen, for unterminated sessions).
        ts_ns: u64,
    },
}

/// A [`FormatError`] with the file it occurred in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    /// The file, when reading from a path.
    pub path: Option<PathBuf>,
    /// What and where.
    pub error: FormatError,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

impl std::error::Error for FileError {}

/// Counters of what the reader saw and skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReadStats {
    /// Packets read.
    pub packets: u64,
    /// Packets that were not TCP/IPv4.
    pub not_tcp: u64,
    /// TCP segments that belonged to no known session (capture started mid-session).
    pub orphan_segments: u64,
    /// Bytes lost to holes in the sequence space.
    pub gap_bytes: u64,
    /// Sessions opened.
    pub sessions: u64,
    /// SYNs refused because too many sessions were open at once.
    pub sessions_refused: u64,
}

/// Out-of-order data kept per direction before a hole is given up on. Our own recordings
/// never need any; foreign captures do, within about one TCP window.
const MAX_OOO_BYTES: usize = 4 << 20;
/// Out-of-order data kept over all sessions: past it, every new early segment makes its
/// stream give up its hole. Together with [`MAX_LIVE_SESSIONS`] this bounds the reader's
/// memory on hostile or enormous captures.
const MAX_OOO_TOTAL: usize = 64 << 20;
/// Sessions tracked at once.
pub const MAX_LIVE_SESSIONS: usize = 1 << 16;

/// Reassembly state of one direction.
#[derive(Default)]
struct Stream {
    /// Next expected sequence number, once known.
    next: Option<u32>,
    /// Stream offset of `next` (64-bit, so it never wraps).
    pos: u64,
    /// Early segments by stream offset.
    ooo: BTreeMap<u64, Vec<u8>>,
    ooo_bytes: usize,
}

impl Stream {
    /// Accepts a segment's payload; returns the bytes now deliverable in order, and the
    /// number of bytes skipped over a hole.
    /// `squeezed`: the reader as a whole holds too much early data, so do not wait.
    fn accept(&mut self, seq: u32, payload: &[u8], squeezed: bool) -> (Vec<u8>, u64) {
        let next = *self.next.get_or_insert(seq);
        let ahead = seq.wrapping_sub(next);
        let mut out = Vec::new();
        let mut skipped = 0;
        if ahead > u32::MAX / 2 {
            // Starts before `next`: a retransmission, possibly with new bytes at its tail.
            let behind = next.wrapping_sub(seq) as usize;
            if behind < payload.len() {
                out.extend_from_slice(&payload[behind..]);
            }
        } else if ahead == 0 {
            out.extend_from_slice(payload);
        } else {
            if !payload.is_empty() {
                self.ooo_bytes += payload.len();
                if let Some(old) = self
                    .ooo
                    .insert(self.pos + u64::from(ahead), payload.to_vec())
                {
                    self.ooo_bytes -= old.len();
                }
            }
            if self.ooo_bytes <= MAX_OOO_BYTES && !squeezed {
                return (out, 0);
            }
            // Give the hole up: jump to the earliest buffered segment.
            if let Some(&first) = self.ooo.keys().next() {
                skipped = first - self.pos;
                self.consume(skipped);
            }
        }
        self.consume(out.len() as u64);
        // Pull in buffered segments that have become contiguous (or overlap the past).
        while let Some(entry) = self.ooo.first_entry() {
            let at = *entry.key();
            if at > self.pos {
                break;
            }
            let buf = entry.remove();
            self.ooo_bytes -= buf.len();
            let behind = (self.pos - at) as usize;
            if behind < buf.len() {
                out.extend_from_slice(&buf[behind..]);
                self.consume((buf.len() - behind) as u64);
            }
        }
        (out, skipped)
    }

    fn consume(&mut self, n: u64) {
        self.pos += n;
        if let Some(next) = &mut self.next {
            *next = next.wrapping_add(n as u32);
        }
    }
}

struct Live {
    sid: u64,
    client: Stream,
    server: Stream,
    /// Client sequence number of the SYN, to recognise its retransmissions.
    syn_seq: Option<u32>,
    last_ts: u64,
}

/// Where a reader's events go: it returns `Break` to stop the reading early.
pub type EventSink<'a> = dyn FnMut(Event) -> ControlFlow<()> + 'a;

/// One TCP segment of a capture, with what came with its packet.
struct Arrival<'s, 'p> {
    seg: &'s TcpSegment<'p>,
    /// The packet's comment, when it is one of the recorder's annotations.
    annotation: Option<Annotation>,
    /// The packet's capture time.
    ts_ns: u64,
}

/// Streaming reassembler over one or more pcapng inputs; see the module docs.
#[derive(Default)]
pub struct SessionReader {
    /// Live sessions by (client, server).
    live: HashMap<(SocketAddrV4, SocketAddrV4), Live>,
    next_sid: u64,
    stats: ReadStats,
    /// Early bytes buffered over all live sessions.
    ooo_total: usize,
}

impl SessionReader {
    /// A reader with no sessions.
    pub fn new() -> Self {
        Self::default()
    }

    /// What has been seen so far.
    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    /// Reads one file, passing events to `sink`; the sink returns `Break` to stop early.
    pub fn read_path(
        &mut self,
        path: &Path,
        sink: &mut EventSink<'_>,
    ) -> Result<ControlFlow<()>, FileError> {
        let file = File::open(path).map_err(|e| FileError {
            path: Some(path.to_path_buf()),
            error: FormatError {
                offset: 0,
                kind: FormatErrorKind::Io(e.to_string()),
            },
        })?;
        self.read_stream(BufReader::with_capacity(256 * 1024, file), sink)
            .map_err(|error| FileError {
                path: Some(path.to_path_buf()),
                error,
            })
    }

    /// Reads one pcapng stream, passing events to `sink`. On a format error, the events for
    /// everything before the damaged block have been delivered.
    pub fn read_stream<R: Read>(
        &mut self,
        input: R,
        sink: &mut EventSink<'_>,
    ) -> Result<ControlFlow<()>, FormatError> {
        let mut blocks = BlockReader::new(input);
        while let Some(block) = blocks.next_block()? {
            let Block::Packet(p) = block else { continue };
            self.stats.packets += 1;
            let Some(seg) = parse_tcp(p.linktype, p.data) else {
                self.stats.not_tcp += 1;
                continue;
            };
            let annotation = p.comment.and_then(Annotation::parse);
            let arrival = Arrival {
                seg: &seg,
                annotation,
                ts_ns: p.ts_ns,
            };
            if self.segment(arrival, sink).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Ends every session still open (as [`EndKind::Unterminated`]); call after the last
    /// input.
    pub fn finish(&mut self, sink: &mut EventSink<'_>) {
        let mut rest: Vec<Live> = self.live.drain().map(|(_, l)| l).collect();
        self.ooo_total = 0;
        rest.sort_by_key(|l| l.sid);
        for l in rest {
            if sink(Event::End {
                sid: l.sid,
                kind: EndKind::Unterminated,
                ts_ns: l.last_ts,
            })
            .is_break()
            {
                return;
            }
        }
    }

    fn segment(&mut self, arrival: Arrival<'_, '_>, sink: &mut EventSink<'_>) -> ControlFlow<()> {
        let Arrival { seg, ts_ns, .. } = arrival;
        let fwd = (seg.src, seg.dst);
        let rev = (seg.dst, seg.src);
        let from_client = if self.live.contains_key(&fwd) {
            true
        } else if self.live.contains_key(&rev) {
            false
        } else {
            // No session: only a SYN or one of our annotations can start one.
            return self.start(arrival, sink);
        };
        if seg.syn() && !seg.ack() && from_client {
            let same_syn = self.live.get(&fwd).and_then(|l| l.syn_seq) == Some(seg.seq);
            if same_syn {
                return ControlFlow::Continue(()); // retransmitted SYN
            }
            // The 4-tuple was reused: the old session ended without us seeing it end.
            if let Some(old) = self.live.remove(&fwd) {
                self.ooo_total -= old.client.ooo_bytes + old.server.ooo_bytes;
                sink(Event::End {
                    sid: old.sid,
                    kind: EndKind::Unterminated,
                    ts_ns: old.last_ts,
                })?;
            }
            return self.start(arrival, sink);
        }
        let key = if from_client { fwd } else { rev };
        let Some(live) = self.live.get_mut(&key) else {
            return ControlFlow::Continue(());
        };
        live.last_ts = ts_ns;
        let sid = live.sid;
        if seg.syn() {
            // SYN-ACK: the server's sequence space starts after it.
            if !from_client && live.server.next.is_none() {
                live.server.next = Some(seg.seq.wrapping_add(1));
            }
            return ControlFlow::Continue(());
        }
        let stream = if from_client {
            &mut live.client
        } else {
            &mut live.server
        };
        let before = stream.ooo_bytes;
        let squeezed = self.ooo_total + seg.payload.len() > MAX_OOO_TOTAL;
        let (data, skipped) = stream.accept(seg.seq, seg.payload, squeezed);
        self.ooo_total = self.ooo_total + stream.ooo_bytes - before;
        self.stats.gap_bytes += skipped;
        if !data.is_empty() {
            sink(if from_client {
                Event::Client { sid, data, ts_ns }
            } else {
                Event::Server { sid, data, ts_ns }
            })?;
        }
        let end = if seg.rst() {
            let detached = arrival
                .annotation
                .is_some_and(|a| a.note == Some(Note::Detached));
            Some(if detached {
                EndKind::Detached
            } else {
                EndKind::Reset
            })
        } else if seg.fin() && from_client {
            // The client's stream is complete at its FIN; the server's FIN and last ACK
            // that follow belong to no session any more and are dropped quietly.
            Some(EndKind::Fin)
        } else {
            None
        };
        if let Some(kind) = end {
            if let Some(old) = self.live.remove(&key) {
                self.ooo_total -= old.client.ooo_bytes + old.server.ooo_bytes;
                // Early bytes still waiting for a hole to fill will never be delivered.
                self.stats.gap_bytes += (old.client.ooo_bytes + old.server.ooo_bytes) as u64;
            }
            sink(Event::End { sid, kind, ts_ns })?;
        }
        ControlFlow::Continue(())
    }

    fn start(&mut self, arrival: Arrival<'_, '_>, sink: &mut EventSink<'_>) -> ControlFlow<()> {
        let Arrival {
            seg,
            annotation,
            ts_ns,
        } = arrival;
        let is_syn = seg.syn() && !seg.ack();
        let (meta, recorded_id, continued) = match annotation {
            Some(a) if is_syn || a.note == Some(Note::Continued) => (a.meta, Some(a.id), !is_syn),
            _ if is_syn => (
                SessionMeta {
                    service: String::new(),
                    client: seg.src,
                    primary: seg.dst,
                    start_ns: ts_ns,
                },
                None,
                false,
            ),
            _ => {
                // Bare ACKs, FINs and RSTs of sessions already ended are expected noise.
                if !seg.payload.is_empty() {
                    self.stats.orphan_segments += 1;
                }
                return ControlFlow::Continue(());
            }
        };
        if self.live.len() >= MAX_LIVE_SESSIONS {
            self.stats.sessions_refused += 1;
            return ControlFlow::Continue(());
        }
        let from_client = seg.src == meta.client;
        if !from_client && seg.dst != meta.client {
            // An annotation that does not match its packet: not ours to trust.
            self.stats.orphan_segments += 1;
            return ControlFlow::Continue(());
        }
        let sid = self.next_sid;
        self.next_sid += 1;
        self.stats.sessions += 1;
        // Keyed by the packet's own addresses, which are what later packets will carry.
        let key = if from_client {
            (seg.src, seg.dst)
        } else {
            (seg.dst, seg.src)
        };
        let mut live = Live {
            sid,
            client: Stream::default(),
            server: Stream::default(),
            syn_seq: is_syn.then_some(seg.seq),
            last_ts: ts_ns,
        };
        if is_syn {
            live.client.next = Some(seg.seq.wrapping_add(1));
        }
        self.live.insert(key, live);
        sink(Event::Open {
            sid,
            meta,
            recorded_id,
            continued,
            ts_ns,
        })?;
        if is_syn {
            return ControlFlow::Continue(());
        }
        // A continued session's first packet may already carry data (or its end).
        let rest = Arrival {
            seg,
            annotation: None,
            ts_ns,
        };
        self.segment(rest, sink)
    }
}

/// A whole session, as collected by [`read_files`] / [`read_bytes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedSession {
    /// Metadata.
    pub meta: SessionMeta,
    /// The recorder's id, for NCP recordings.
    pub recorded_id: Option<u64>,
    /// Started in a file that was not read.
    pub continued: bool,
    /// All client → server bytes.
    pub client: Vec<u8>,
    /// All server → client bytes.
    pub server: Vec<u8>,
    /// How it ended.
    pub end: EndKind,
}

/// Everything in a set of recordings, in memory.
#[derive(Clone, Debug, Default)]
pub struct Recording {
    /// Sessions in the order they opened.
    pub sessions: Vec<RecordedSession>,
    /// One entry per damaged file.
    pub errors: Vec<FileError>,
    /// Reader counters.
    pub stats: ReadStats,
}

/// Collects events into whole sessions.
#[derive(Default)]
struct Collector {
    sessions: Vec<RecordedSession>,
    index: HashMap<u64, usize>,
}

impl Collector {
    fn push(&mut self, ev: Event) -> ControlFlow<()> {
        match ev {
            Event::Open {
                sid,
                meta,
                recorded_id,
                continued,
                ..
            } => {
                self.index.insert(sid, self.sessions.len());
                self.sessions.push(RecordedSession {
                    meta,
                    recorded_id,
                    continued,
                    client: Vec::new(),
                    server: Vec::new(),
                    end: EndKind::Unterminated,
                });
            }
            Event::Client { sid, data, .. } => {
                if let Some(&i) = self.index.get(&sid) {
                    self.sessions[i].client.extend_from_slice(&data);
                }
            }
            Event::Server { sid, data, .. } => {
                if let Some(&i) = self.index.get(&sid) {
                    self.sessions[i].server.extend_from_slice(&data);
                }
            }
            Event::End { sid, kind, .. } => {
                if let Some(i) = self.index.remove(&sid) {
                    self.sessions[i].end = kind;
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// Reads whole recordings into memory (tests, tools, small files; replay streams instead).
/// Damaged files are reported in [`Recording::errors`], with everything intact returned.
pub fn read_files<P: AsRef<Path>>(paths: &[P]) -> Recording {
    let mut reader = SessionReader::new();
    let mut c = Collector::default();
    let mut errors = Vec::new();
    for p in paths {
        if let Err(e) = reader.read_path(p.as_ref(), &mut |ev| c.push(ev)) {
            errors.push(e);
        }
    }
    reader.finish(&mut |ev| c.push(ev));
    Recording {
        sessions: c.sessions,
        errors,
        stats: reader.stats(),
    }
}

/// [`read_files`] for an in-memory recording.
pub fn read_bytes(bytes: &[u8]) -> Recording {
    let mut reader = SessionReader::new();
    let mut c = Collector::default();
    let mut errors = Vec::new();
    if let Err(error) = reader.read_stream(bytes, &mut |ev| c.push(ev)) {
        errors.push(FileError { path: None, error });
    }
    reader.finish(&mut |ev| c.push(ev));
    Recording {
        sessions: c.sessions,
        errors,
        stats: reader.stats(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_reorders_trims_and_skips_holes() {
        let mut s = Stream {
            next: Some(u32::MAX - 2), // wraps during the test
            ..Stream::default()
        };
        let (a, _) = s.accept(u32::MAX - 2, b"abc", false);
        assert_eq!(a, b"abc");
        let (b, _) = s.accept(3, b"ghi", false); // early
        assert!(b.is_empty());
        let (c, _) = s.accept(u32::MAX - 1, b"bcdef", false); // overlaps the past, fills the hole
        assert_eq!(c, b"defghi");
        let (d, _) = s.accept(4, b"hi", false); // pure retransmission
        assert!(d.is_empty());
        // A hole too wide to wait for.
        let big = vec![1u8; MAX_OOO_BYTES + 1];
        let (e, skipped) = s.accept(6 + 10, &big, false);
        assert_eq!(skipped, 10);
        assert_eq!(e.len(), big.len());
    }
}
