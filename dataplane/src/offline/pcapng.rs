//! pcapng, both ways.
//!
//! Writing: [`PcapngWriter`] is sans-IO over any [`std::io::Write`]. It emits one Section
//! Header Block and one Interface Description Block, then Enhanced Packet Blocks that carry
//! *synthesized* Ethernet/IPv4/TCP packets: the middlebox terminates the client's TCP
//! connection, so what it has is a byte stream, not the client's packets. Synthesizing a
//! well-formed conversation (handshake, ≤ MSS data segments with consistent sequence and
//! acknowledgement numbers, valid checksums, FIN or RST) makes a recording something any
//! capture tool can open and follow, and lets the reader use one code path for our files
//! and for captures taken elsewhere.
//!
//! Session metadata (service, client, primary, start) rides as JSON in the `opt_comment` of
//! the session's SYN, behind the [`COMMENT_PREFIX`] marker, so it survives any tool that
//! preserves comments and is visible in Wireshark's packet comments.
//!
//! Reading: [`BlockReader`] walks blocks with strict length checks and a hard cap on block
//! size, never allocating from a length field before the bytes are actually there, and
//! reports the byte offset of the first damaged or incomplete block.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};

pub use ncp_common::wire::TcpSegment;
use serde::{Deserialize, Serialize};

use super::SessionMeta;
use crate::frame::{Segment, write_segment};

/// Block type of the Section Header Block (the same in both byte orders by design).
const BT_SHB: u32 = 0x0A0D_0D0A;
/// Block type of the Interface Description Block.
const BT_IDB: u32 = 0x0000_0001;
/// Block type of the Enhanced Packet Block.
const BT_EPB: u32 = 0x0000_0006;
/// Byte-order magic written in the writer's (little-endian) order.
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const OPT_SHB_USERAPPL: u16 = 4;
const OPT_IF_NAME: u16 = 2;
const OPT_IF_TSRESOL: u16 = 9;
const OPT_EPB_FLAGS: u16 = 2;

/// `epb_flags` direction bits: inbound (client → server as the middlebox saw it).
const EPB_INBOUND: u32 = 0b01;
/// `epb_flags` direction bits: outbound (the primary's answers).
const EPB_OUTBOUND: u32 = 0b10;

/// DLT/LINKTYPE for Ethernet II frames.
pub const LINKTYPE_ETHERNET: u16 = 1;
/// LINKTYPE for raw IP packets with no link-layer header.
pub const LINKTYPE_RAW: u16 = 101;
/// LINKTYPE for raw IPv4 packets (rarely used by writers, accepted by the reader).
pub const LINKTYPE_IPV4: u16 = 228;

/// Largest TCP payload per synthesized segment (Ethernet MTU 1500 minus IPv4 and TCP).
pub const MSS: usize = 1460;

/// Largest block the reader accepts. Our own blocks stay below 2 KiB plus a comment; the cap
/// leaves room for foreign captures of offloaded super-packets (64 KiB) while making sure a
/// hostile length field cannot make the reader hold more than this.
pub const MAX_BLOCK_LEN: u32 = 1 << 20;

/// Marks a packet comment that carries NCP session metadata (JSON follows).
pub const COMMENT_PREFIX: &str = "ncp-session ";

/// The receiver acknowledges at least every this many bytes, so the synthesized
/// conversation never has more than one 64 KiB window in flight (Wireshark would otherwise
/// flag it).
const ACK_EVERY: usize = 16 * MSS;

use ncp_common::wire::tcp_flags as flags;

/// Link layer of the synthesized packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// Ethernet II with locally administered MACs derived from the IPv4 addresses.
    Ethernet,
    /// Bare IPv4 packets (`LINKTYPE_RAW`), 14 bytes smaller per packet.
    RawIpv4,
}

/// Timestamp resolution announced in the Interface Description Block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TsResolution {
    /// Microseconds (the pcapng default).
    Micro,
    /// Nanoseconds.
    Nano,
}

/// Options for a new file.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Link layer of the packets.
    pub link: LinkLayer,
    /// Timestamp resolution.
    pub resolution: TsResolution,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            link: LinkLayer::Ethernet,
            resolution: TsResolution::Nano,
        }
    }
}

/// Why a session annotation was written on a packet other than the SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Note {
    /// First packet of a session in a file it did not start in (after rotation): lets a
    /// reader given only this file pick the session up mid-stream.
    Continued,
    /// The recording of this session was cut loose (queue overflow): what precedes is
    /// intact, the rest of the session is missing.
    Detached,
}

/// The JSON carried behind [`COMMENT_PREFIX`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    /// Recorder-assigned session id, unique within one recorder run.
    pub id: u64,
    /// The session's metadata.
    #[serde(flatten)]
    pub meta: SessionMeta,
    /// Set when the annotation is not on the session's SYN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<Note>,
}

impl Annotation {
    /// Parses a packet comment; `None` if it is not ours or not valid.
    pub fn parse(comment: &str) -> Option<Annotation> {
        serde_json::from_str(comment.strip_prefix(COMMENT_PREFIX)?).ok()
    }

    fn to_comment(&self) -> String {
        // Serializing plain strings and integers cannot fail; fall back to the bare marker
        // rather than panicking in a recording path.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{COMMENT_PREFIX}{json}")
    }
}

/// Which way a synthesized segment travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToServer,
    ToClient,
}

/// Per-session state of the synthesized TCP conversation: sequence numbers, IP ids, how
/// much each side has not yet acknowledged.
#[derive(Clone, Debug)]
pub struct SynthSession {
    annotation: Annotation,
    client: SocketAddrV4,
    server: SocketAddrV4,
    /// Next sequence number the client sends.
    c_seq: u32,
    /// Next sequence number the server sends.
    s_seq: u32,
    c_ip_id: u16,
    s_ip_id: u16,
    /// Bytes the client sent that the server has not acknowledged yet.
    c_unacked: usize,
    s_unacked: usize,
    /// The next packet must carry the annotation (set after rotation).
    need_annotation: bool,
    ended: bool,
}

impl SynthSession {
    /// The recorder-assigned id.
    pub fn id(&self) -> u64 {
        self.annotation.id
    }

    /// Makes the next packet of this session carry a [`Note::Continued`] annotation; called
    /// when the session moves to a new file.
    pub fn mark_continued(&mut self) {
        self.need_annotation = true;
        self.annotation.note = Some(Note::Continued);
    }

    /// Whether FIN or RST has been written.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// Writes a pcapng stream of synthesized TCP sessions to `W`.
///
/// Every method writes whole blocks with one `write_all` each, so a `BufWriter` underneath
/// holds at most one partial block when the process dies; the reader stops cleanly there.
pub struct PcapngWriter<W: Write> {
    out: W,
    opts: WriterOptions,
    written: u64,
    block: Vec<u8>,
    packet: Vec<u8>,
}

impl<W: Write> PcapngWriter<W> {
    /// Starts a section: writes the Section Header Block and the one Interface Description
    /// Block all packets refer to.
    pub fn new(out: W, opts: WriterOptions) -> io::Result<Self> {
        let mut w = PcapngWriter {
            out,
            opts,
            written: 0,
            block: Vec::with_capacity(2048),
            packet: Vec::with_capacity(1600),
        };
        w.begin_block(BT_SHB);
        w.put_u32(BYTE_ORDER_MAGIC);
        w.put_u16(1); // major version
        w.put_u16(0); // minor version
        w.block.extend_from_slice(&u64::MAX.to_le_bytes()); // section length: unknown
        w.put_option(OPT_SHB_USERAPPL, b"ncp-dataplane offline recorder");
        w.finish_block(true)?;

        w.begin_block(BT_IDB);
        let linktype = match w.opts.link {
            LinkLayer::Ethernet => LINKTYPE_ETHERNET,
            LinkLayer::RawIpv4 => LINKTYPE_RAW,
        };
        w.put_u16(linktype);
        w.put_u16(0); // reserved
        w.put_u32(0); // snaplen: no limit
        w.put_option(OPT_IF_NAME, b"ncp");
        let resol: u8 = match w.opts.resolution {
            TsResolution::Micro => 6,
            TsResolution::Nano => 9,
        };
        w.put_option(OPT_IF_TSRESOL, &[resol]);
        w.finish_block(true)?;
        Ok(w)
    }

    /// Bytes written so far (for size-based rotation).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Gives back the underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Starts a session: SYN (carrying the metadata), SYN-ACK, ACK, all at `ts_ns`.
    pub fn open(&mut self, id: u64, meta: &SessionMeta, ts_ns: u64) -> io::Result<SynthSession> {
        // Initial sequence numbers only need to differ between sessions for realism; mix the
        // id so that replays of the same file are byte-identical.
        let isn = mix(id);
        let mut s = SynthSession {
            annotation: Annotation {
                id,
                meta: meta.clone(),
                note: None,
            },
            client: meta.client,
            server: meta.primary,
            c_seq: isn as u32,
            s_seq: (isn >> 32) as u32,
            c_ip_id: isn as u16,
            s_ip_id: (isn >> 16) as u16,
            c_unacked: 0,
            s_unacked: 0,
            need_annotation: true,
            ended: false,
        };
        self.segment(&mut s, Dir::ToServer, flags::SYN, &[], ts_ns)?;
        self.segment(&mut s, Dir::ToClient, flags::SYN | flags::ACK, &[], ts_ns)?;
        self.segment(&mut s, Dir::ToServer, flags::ACK, &[], ts_ns)?;
        Ok(s)
    }

    /// Bytes the client sent (one write's worth), split into ≤ [`MSS`] segments.
    pub fn client_data(&mut self, s: &mut SynthSession, data: &[u8], ts_ns: u64) -> io::Result<()> {
        self.data(s, Dir::ToServer, data, ts_ns)
    }

    /// Bytes the primary answered.
    pub fn server_data(&mut self, s: &mut SynthSession, data: &[u8], ts_ns: u64) -> io::Result<()> {
        self.data(s, Dir::ToClient, data, ts_ns)
    }

    /// Orderly end: client FIN, server FIN, client ACK.
    pub fn close(&mut self, s: &mut SynthSession, ts_ns: u64) -> io::Result<()> {
        if s.ended {
            return Ok(());
        }
        self.segment(s, Dir::ToServer, flags::FIN | flags::ACK, &[], ts_ns)?;
        self.segment(s, Dir::ToClient, flags::FIN | flags::ACK, &[], ts_ns)?;
        self.segment(s, Dir::ToServer, flags::ACK, &[], ts_ns)?;
        s.ended = true;
        Ok(())
    }

    /// Abortive end: a client RST. With `detached`, the RST carries a [`Note::Detached`]
    /// annotation so the reader knows the recording, not the client, cut the session.
    pub fn abort(&mut self, s: &mut SynthSession, detached: bool, ts_ns: u64) -> io::Result<()> {
        if s.ended {
            return Ok(());
        }
        if detached {
            s.need_annotation = true;
            s.annotation.note = Some(Note::Detached);
        }
        self.segment(s, Dir::ToServer, flags::RST | flags::ACK, &[], ts_ns)?;
        s.ended = true;
        Ok(())
    }

    fn data(&mut self, s: &mut SynthSession, dir: Dir, data: &[u8], ts_ns: u64) -> io::Result<()> {
        if s.ended || data.is_empty() {
            return Ok(());
        }
        let n = data.len().div_ceil(MSS);
        for (i, chunk) in data.chunks(MSS).enumerate() {
            let psh = if i + 1 == n { flags::PSH } else { 0 };
            self.segment(s, dir, flags::ACK | psh, chunk, ts_ns)?;
            let unacked = match dir {
                Dir::ToServer => &mut s.c_unacked,
                Dir::ToClient => &mut s.s_unacked,
            };
            *unacked += chunk.len();
            if *unacked >= ACK_EVERY || i + 1 == n {
                // The receiver's pure ACK: it models the real receiver and keeps the data in
                // flight within one window.
                *unacked = 0;
                let back = match dir {
                    Dir::ToServer => Dir::ToClient,
                    Dir::ToClient => Dir::ToServer,
                };
                self.segment(s, back, flags::ACK, &[], ts_ns)?;
            }
        }
        Ok(())
    }

    /// Builds one packet and writes it as an EPB.
    fn segment(
        &mut self,
        s: &mut SynthSession,
        dir: Dir,
        fl: u8,
        payload: &[u8],
        ts_ns: u64,
    ) -> io::Result<()> {
        let (src, dst, seq, ack, ip_id) = match dir {
            Dir::ToServer => (s.client, s.server, s.c_seq, s.s_seq, &mut s.c_ip_id),
            Dir::ToClient => (s.server, s.client, s.s_seq, s.c_seq, &mut s.s_ip_id),
        };
        let id = *ip_id;
        *ip_id = ip_id.wrapping_add(1);
        // A SYN-ACK acknowledges the SYN; a pure SYN acknowledges nothing.
        let ack = if fl & flags::ACK != 0 { ack } else { 0 };
        build_packet(
            &mut self.packet,
            self.opts.link,
            src,
            dst,
            id,
            seq,
            ack,
            fl,
            payload,
        );

        // SYN and FIN take one sequence number each.
        let advance = payload.len() as u32 + u32::from(fl & (flags::SYN | flags::FIN) != 0);
        match dir {
            Dir::ToServer => s.c_seq = s.c_seq.wrapping_add(advance),
            Dir::ToClient => s.s_seq = s.s_seq.wrapping_add(advance),
        }

        let comment = if s.need_annotation {
            s.need_annotation = false;
            Some(s.annotation.to_comment())
        } else {
            None
        };
        let direction = match dir {
            Dir::ToServer => EPB_INBOUND,
            Dir::ToClient => EPB_OUTBOUND,
        };
        self.write_epb(ts_ns, comment.as_deref(), direction)
    }

    fn write_epb(&mut self, ts_ns: u64, comment: Option<&str>, direction: u32) -> io::Result<()> {
        let ts = match self.opts.resolution {
            TsResolution::Nano => ts_ns,
            TsResolution::Micro => ts_ns / 1_000,
        };
        self.begin_block(BT_EPB);
        self.put_u32(0); // interface id
        self.put_u32((ts >> 32) as u32);
        self.put_u32(ts as u32);
        let len = self.packet.len() as u32;
        self.put_u32(len); // captured length
        self.put_u32(len); // original length
        self.block.extend_from_slice(&self.packet);
        pad4(&mut self.block);
        if let Some(c) = comment {
            self.put_option(OPT_COMMENT, c.as_bytes());
        }
        self.put_option(OPT_EPB_FLAGS, &direction.to_le_bytes());
        self.finish_block(true)
    }

    fn begin_block(&mut self, ty: u32) {
        self.block.clear();
        self.put_u32(ty);
        self.put_u32(0); // total length, patched in finish_block
    }

    fn finish_block(&mut self, has_options: bool) -> io::Result<()> {
        if has_options {
            self.put_u16(OPT_END);
            self.put_u16(0);
        }
        let total = self.block.len() as u32 + 4;
        self.block[4..8].copy_from_slice(&total.to_le_bytes());
        self.put_u32(total);
        self.out.write_all(&self.block)?;
        self.written += u64::from(total);
        Ok(())
    }

    fn put_u16(&mut self, v: u16) {
        self.block.extend_from_slice(&v.to_le_bytes());
    }

    fn put_u32(&mut self, v: u32) {
        self.block.extend_from_slice(&v.to_le_bytes());
    }

    fn put_option(&mut self, code: u16, value: &[u8]) {
        // Option values are at most 65535 bytes; longer comments are cut (ours are a few
        // hundred bytes, a service name would have to be absurd to hit this).
        let value = &value[..value.len().min(usize::from(u16::MAX))];
        self.put_u16(code);
        self.put_u16(value.len() as u16);
        self.block.extend_from_slice(value);
        pad4(&mut self.block);
    }
}

fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// splitmix64: spreads session ids into unrelated-looking initial sequence numbers.
fn mix(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A locally administered unicast MAC that embeds the IPv4 address, so each endpoint keeps
/// one stable MAC across sessions and files.
fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

/// Builds one Ethernet (optional)/IPv4/TCP packet with valid checksums into `out`.
#[allow(
    clippy::too_many_arguments,
    reason = "a flat packet description is clearest here"
)]
fn build_packet(
    out: &mut Vec<u8>,
    link: LinkLayer,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ip_id: u16,
    seq: u32,
    ack: u32,
    fl: u8,
    payload: &[u8],
) {
    // SYNs announce the MSS the segments below respect.
    let mss_option = [2, 4, (MSS >> 8) as u8, MSS as u8];
    let options: &[u8] = if fl & flags::SYN != 0 {
        &mss_option
    } else {
        &[]
    };
    let macs = (link == LinkLayer::Ethernet).then(|| (mac_for(*src.ip()), mac_for(*dst.ip())));
    write_segment(
        out,
        &Segment {
            macs,
            src,
            dst,
            ip_id,
            seq,
            ack,
            flags: fl,
            window: u16::MAX,
            options,
            payload,
        },
    );
}

// ---------------------------------------------------------------------------------------
// Reading

/// What is wrong with a pcapng stream, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("byte offset {offset}: {kind}")]
pub struct FormatError {
    /// Offset of the start of the offending block (or of the failed read).
    pub offset: u64,
    /// What is wrong.
    pub kind: FormatErrorKind,
}

/// The kinds of [`FormatError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatErrorKind {
    /// The stream does not start with a Section Header Block.
    #[error("not a pcapng file (no section header block)")]
    NotPcapng,
    /// Unknown byte-order magic in a Section Header Block.
    #[error("bad byte-order magic {0:#010x}")]
    BadByteOrder(u32),
    /// A pcapng major version this reader does not know.
    #[error("unsupported pcapng version {0}")]
    UnsupportedVersion(u16),
    /// The file ends inside a block.
    #[error("truncated block: {have} of {need} bytes present")]
    Truncated {
        /// Bytes of the block present.
        have: u64,
        /// Bytes the block should have.
        need: u64,
    },
    /// A block length that is too small or not a multiple of 4.
    #[error("invalid block length {0}")]
    BadLength(u32),
    /// A block length above [`MAX_BLOCK_LEN`].
    #[error("block length {0} exceeds the limit of {MAX_BLOCK_LEN} bytes")]
    TooLarge(u32),
    /// The trailing copy of the block length differs from the leading one.
    #[error("block length {first} does not match trailing length {last}")]
    LengthMismatch {
        /// Leading length.
        first: u32,
        /// Trailing length.
        last: u32,
    },
    /// A block whose fields contradict its length.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A packet refers to an interface that was never described.
    #[error("packet for undeclared interface {0}")]
    UnknownInterface(u32),
    /// The underlying reader failed.
    #[error("read error: {0}")]
    Io(String),
}

/// One described interface of the current section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    /// LINKTYPE of its packets.
    pub linktype: u16,
    /// Timestamp units per second.
    units_per_sec: u64,
}

/// One packet read from an Enhanced Packet Block.
#[derive(Debug)]
pub struct PacketRef<'a> {
    /// Offset of the block in the stream.
    pub offset: u64,
    /// Timestamp in nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// LINKTYPE of `data`.
    pub linktype: u16,
    /// The captured bytes.
    pub data: &'a [u8],
    /// The `opt_comment`, if present and UTF-8.
    pub comment: Option<&'a str>,
}

/// A block as seen by [`BlockReader::next_block`].
#[derive(Debug)]
pub enum Block<'a> {
    /// A Section Header Block (interfaces reset).
    Section,
    /// An Interface Description Block.
    Interface(Interface),
    /// An Enhanced Packet Block.
    Packet(PacketRef<'a>),
    /// Any other block type, skipped.
    Other(u32),
}

/// Reads pcapng blocks one at a time, with bounded memory.
pub struct BlockReader<R: Read> {
    input: R,
    offset: u64,
    big_endian: bool,
    started: bool,
    interfaces: Vec<Interface>,
    buf: Vec<u8>,
}

/// At most this many interfaces per section: bounds the table a hostile file can grow.
const MAX_INTERFACES: usize = 4096;

impl<R: Read> BlockReader<R> {
    /// Wraps a reader positioned at the start of a pcapng stream.
    pub fn new(input: R) -> Self {
        BlockReader {
            input,
            offset: 0,
            big_endian: false,
            started: false,
            interfaces: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Offset of the next block.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next block; `Ok(None)` at a clean end of stream (between blocks). After an error
    /// the stream is left where it failed: callers stop reading.
    pub fn next_block(&mut self) -> Result<Option<Block<'_>>, FormatError> {
        let start = self.offset;
        let err = |kind| FormatError {
            offset: start,
            kind,
        };
        self.buf.clear();
        let got = self
            .buffer_at_least(8)
            .map_err(|e| err(FormatErrorKind::Io(e.to_string())))?;
        if got == 0 {
            return Ok(None);
        }
        if got < 8 {
            return Err(err(FormatErrorKind::Truncated {
                have: got as u64,
                need: 8,
            }));
        }
        let raw_type = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
        let is_shb = u32::from_le_bytes(raw_type) == BT_SHB;
        if !self.started && !is_shb {
            return Err(err(FormatErrorKind::NotPcapng));
        }
        if is_shb {
            // The byte order of the length is only known after the magic that follows it.
            let got = self
                .buffer_at_least(12)
                .map_err(|e| err(FormatErrorKind::Io(e.to_string())))?;
            if got < 12 {
                return Err(err(FormatErrorKind::Truncated {
                    have: got as u64,
                    need: 12,
                }));
            }
            let magic = [self.buf[8], self.buf[9], self.buf[10], self.buf[11]];
            self.big_endian = match u32::from_le_bytes(magic) {
                BYTE_ORDER_MAGIC => false,
                m if m.swap_bytes() == BYTE_ORDER_MAGIC => true,
                m => return Err(err(FormatErrorKind::BadByteOrder(m))),
            };
        }
        let ty = self.u32_at(0);
        let len = self.u32_at(4);
        if len < 12 || !len.is_multiple_of(4) || (is_shb && len < 28) {
            return Err(err(FormatErrorKind::BadLength(len)));
        }
        if len > MAX_BLOCK_LEN {
            return Err(err(FormatErrorKind::TooLarge(len)));
        }
        // Only now, with the length bounded, read the rest; `buffer_at_least` grows the buffer as bytes
        // arrive, so a truncated file never costs the announced length.
        let got = self
            .buffer_at_least(len as usize)
            .map_err(|e| err(FormatErrorKind::Io(e.to_string())))?;
        if got < len as usize {
            return Err(err(FormatErrorKind::Truncated {
                have: got as u64,
                need: u64::from(len),
            }));
        }
        let last = self.u32_at(len as usize - 4);
        if last != len {
            return Err(err(FormatErrorKind::LengthMismatch { first: len, last }));
        }
        self.offset += u64::from(len);
        let body_end = len as usize - 4;
        match ty {
            BT_SHB => {
                let major = self.u16_at(12);
                if major != 1 {
                    return Err(err(FormatErrorKind::UnsupportedVersion(major)));
                }
                self.started = true;
                self.interfaces.clear();
                Ok(Some(Block::Section))
            }
            BT_IDB => {
                if body_end < 16 {
                    return Err(err(FormatErrorKind::Malformed(
                        "interface description block",
                    )));
                }
                let linktype = self.u16_at(8);
                let mut units_per_sec = 1_000_000;
                for (code, value) in self.options(16, body_end).map_err(err)? {
                    if code == OPT_IF_TSRESOL && !value.is_empty() {
                        let v = value[0];
                        units_per_sec = if v & 0x80 == 0 {
                            10u64.checked_pow(u32::from(v))
                        } else {
                            1u64.checked_shl(u32::from(v & 0x7f))
                        }
                        .ok_or(err(FormatErrorKind::Malformed("if_tsresol")))?;
                    }
                }
                if self.interfaces.len() >= MAX_INTERFACES {
                    return Err(err(FormatErrorKind::Malformed("too many interfaces")));
                }
                let iface = Interface {
                    linktype,
                    units_per_sec,
                };
                self.interfaces.push(iface);
                Ok(Some(Block::Interface(iface)))
            }
            BT_EPB => {
                if body_end < 28 {
                    return Err(err(FormatErrorKind::Malformed("enhanced packet block")));
                }
                let if_id = self.u32_at(8);
                let iface = *self
                    .interfaces
                    .get(if_id as usize)
                    .ok_or(err(FormatErrorKind::UnknownInterface(if_id)))?;
                let ts = (u64::from(self.u32_at(12)) << 32) | u64::from(self.u32_at(16));
                let caplen = self.u32_at(20) as usize;
                let data_end = 28usize
                    .checked_add(caplen)
                    .filter(|&e| e <= body_end)
                    .ok_or(err(FormatErrorKind::Malformed(
                        "enhanced packet block captured length",
                    )))?;
                let opts_start = (data_end + 3) & !3;
                let mut comment = None;
                if opts_start < body_end {
                    for (code, value) in self.options(opts_start, body_end).map_err(err)? {
                        if code == OPT_COMMENT {
                            comment = std::str::from_utf8(value).ok();
                        }
                    }
                }
                let ts_ns =
                    (u128::from(ts) * 1_000_000_000 / u128::from(iface.units_per_sec)) as u64;
                Ok(Some(Block::Packet(PacketRef {
                    offset: start,
                    ts_ns,
                    linktype: iface.linktype,
                    data: &self.buf[28..data_end],
                    comment,
                })))
            }
            other => Ok(Some(Block::Other(other))),
        }
    }

    /// Parses the option list in `buf[from..to]`.
    fn options(&self, from: usize, to: usize) -> Result<Vec<(u16, &[u8])>, FormatErrorKind> {
        let mut out = Vec::new();
        let mut at = from;
        while at + 4 <= to {
            let code = self.u16_at(at);
            let len = usize::from(self.u16_at(at + 2));
            if code == OPT_END {
                break;
            }
            let end = at + 4 + len;
            if end > to {
                return Err(FormatErrorKind::Malformed("option length"));
            }
            out.push((code, &self.buf[at + 4..end]));
            at = (end + 3) & !3;
        }
        Ok(out)
    }

    /// Reads until `buf` holds `want` bytes or the input ends; returns how many it holds.
    fn buffer_at_least(&mut self, want: usize) -> io::Result<usize> {
        while self.buf.len() < want {
            let have = self.buf.len();
            // Grow in steps so the allocation follows the bytes actually read.
            let step = (want - have).min(64 * 1024);
            self.buf.resize(have + step, 0);
            match self.input.read(&mut self.buf[have..]) {
                Ok(0) => {
                    self.buf.truncate(have);
                    break;
                }
                Ok(n) => self.buf.truncate(have + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.buf.truncate(have),
                Err(e) => {
                    self.buf.truncate(have);
                    return Err(e);
                }
            }
        }
        Ok(self.buf.len())
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b = [
            self.buf[at],
            self.buf[at + 1],
            self.buf[at + 2],
            self.buf[at + 3],
        ];
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = [self.buf[at], self.buf[at + 1]];
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }
}

/// Finds the TCP segment in a captured packet with the one parser
/// ([`ncp_common::wire`]); `None` for anything else (ARP, UDP, IPv6, fragments, more than
/// one VLAN tag, truncated captures). Checksums are not verified: captures taken with
/// offload on carry partial ones.
pub fn parse_tcp(linktype: u16, data: &[u8]) -> Option<TcpSegment<'_>> {
    let segment = match linktype {
        LINKTYPE_ETHERNET => TcpSegment::parse_ethernet(data),
        LINKTYPE_RAW | LINKTYPE_IPV4 => TcpSegment::parse(data, 0),
        _ => return None,
    };
    segment.ok().flatten()
}

#[cfg(test)]
mod tests {
    use ncp_common::wire::{checksum, pseudo_header_sum};

    use super::*;

    fn meta() -> SessionMeta {
        SessionMeta {
            service: "svc".into(),
            client: "198.18.0.1:40000".parse().unwrap(),
            primary: "198.18.0.2:6379".parse().unwrap(),
            start_ns: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn checksums_verify_to_zero() {
        let mut p = Vec::new();
        let m = meta();
        build_packet(
            &mut p,
            LinkLayer::RawIpv4,
            m.client,
            m.primary,
            7,
            1,
            2,
            flags::ACK,
            b"hello",
        );
        assert_eq!(checksum(&p[..20], 0), 0);
        let pseudo = pseudo_header_sum(*m.client.ip(), *m.primary.ip(), 6, p.len() - 20);
        assert_eq!(checksum(&p[20..], pseudo), 0);
    }

    #[test]
    fn blocks_round_trip_with_comment_and_segments() {
        let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
        let mut s = w.open(3, &meta(), 5).unwrap();
        w.client_data(&mut s, &[7u8; 3000], 6).unwrap();
        w.close(&mut s, 7).unwrap();
        let bytes = w.into_inner();
        let mut r = BlockReader::new(&bytes[..]);
        let mut payload = Vec::new();
        let mut annotations = 0;
        while let Some(b) = r.next_block().unwrap() {
            if let Block::Packet(p) = b {
                if let Some(a) = p.comment.and_then(Annotation::parse) {
                    assert_eq!(a.meta, meta());
                    annotations += 1;
                }
                let seg = parse_tcp(p.linktype, p.data).unwrap();
                assert!(seg.payload.len() <= MSS);
                if seg.src == meta().client {
                    payload.extend_from_slice(seg.payload);
                }
            }
        }
        assert_eq!(annotations, 1);
        assert_eq!(payload, vec![7u8; 3000]);
        assert_eq!(r.offset(), bytes.len() as u64);
    }

    /// Rewrites one of our little-endian files in big-endian byte order, field by field,
    /// as a big-endian machine would have written it.
    fn to_big_endian(le: &[u8]) -> Vec<u8> {
        fn swap(out: &mut [u8], at: usize, n: usize) {
            out[at..at + n].reverse();
        }
        let mut out = le.to_vec();
        let mut at = 0;
        while at < le.len() {
            let ty = u32::from_le_bytes(le[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(le[at + 4..at + 8].try_into().unwrap()) as usize;
            swap(&mut out, at, 4);
            swap(&mut out, at + 4, 4);
            swap(&mut out, at + len - 4, 4);
            // Fixed fields (offset, size), then where the options start.
            let (fixed, opts): (&[(usize, usize)], usize) = match ty {
                BT_SHB => (&[(8, 4), (12, 2), (14, 2), (16, 8)], 24),
                BT_IDB => (&[(8, 2), (10, 2), (12, 4)], 16),
                BT_EPB => {
                    let caplen = u32::from_le_bytes(le[at + 20..at + 24].try_into().unwrap());
                    let fields: &[(usize, usize)] = &[(8, 4), (12, 4), (16, 4), (20, 4), (24, 4)];
                    (fields, 28 + (caplen as usize).div_ceil(4) * 4)
                }
                _ => unreachable!(),
            };
            for &(off, n) in fixed {
                swap(&mut out, at + off, n);
            }
            let mut o = at + opts;
            while o + 4 <= at + len - 4 {
                let code = u16::from_le_bytes([le[o], le[o + 1]]);
                let olen = usize::from(u16::from_le_bytes([le[o + 2], le[o + 3]]));
                swap(&mut out, o, 2);
                swap(&mut out, o + 2, 2);
                if ty == BT_EPB && code == OPT_EPB_FLAGS {
                    swap(&mut out, o + 4, 4);
                }
                if code == OPT_END {
                    break;
                }
                o += 4 + olen.div_ceil(4) * 4;
            }
            at += len;
        }
        out
    }

    #[test]
    fn big_endian_sections_read_the_same() {
        let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
        let mut s = w.open(4, &meta(), 1_000).unwrap();
        w.client_data(&mut s, b"big-endian", 2_000).unwrap();
        w.close(&mut s, 3_000).unwrap();
        let le = w.into_inner();
        let be = to_big_endian(&le);
        assert_ne!(le, be);
        let collect = |bytes: &[u8]| {
            let mut r = BlockReader::new(bytes);
            let mut v = Vec::new();
            while let Some(b) = r.next_block().unwrap() {
                if let Block::Packet(p) = b {
                    v.push((p.ts_ns, p.data.to_vec(), p.comment.map(str::to_owned)));
                }
            }
            v
        };
        let (a, b) = (collect(&le), collect(&be));
        assert_eq!(a, b);
        assert_eq!(a.len(), 8);
        assert_eq!(a[0].0, 1_000);
    }

    #[test]
    fn hostile_length_is_refused_without_allocating() {
        let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
        let _ = w.open(1, &meta(), 1).unwrap();
        let mut bytes = w.into_inner();
        let mut r = BlockReader::new(&bytes[..]);
        r.next_block().unwrap();
        r.next_block().unwrap();
        let epb_at = r.offset() as usize;
        bytes[epb_at + 4..epb_at + 8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let mut r = BlockReader::new(&bytes[..]);
        r.next_block().unwrap();
        r.next_block().unwrap();
        let e = r.next_block().unwrap_err();
        assert_eq!(e.offset, epb_at as u64);
        assert!(matches!(e.kind, FormatErrorKind::TooLarge(_)));
        assert!(r.buf.capacity() < 1 << 16);
    }

    /// The pcapng_reader fuzz target's seeds (after the byte that picks the target's read
    /// size): recordings as the recorder writes them, in both byte orders and both link
    /// layers, with a session that ends, one cut loose and one continued from an earlier
    /// file. The frame_parser target's seeds (after 8 bytes of steering tables: owned
    /// address, first and last owned port) are the Ethernet frames of the first one, and a
    /// VLAN-tagged one.
    #[test]
    fn fuzz_seeds_are_recordings() {
        let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
        let mut s = w.open(1, &meta(), 1_000).unwrap();
        w.client_data(&mut s, b"*1\r\n$4\r\nPING\r\n", 2_000)
            .unwrap();
        w.server_data(&mut s, b"+PONG\r\n", 3_000).unwrap();
        w.close(&mut s, 4_000).unwrap();
        let ethernet = w.into_inner();

        let raw = WriterOptions {
            link: LinkLayer::RawIpv4,
            resolution: TsResolution::Micro,
        };
        let mut w = PcapngWriter::new(Vec::new(), raw).unwrap();
        let mut cut = w.open(2, &meta(), 1_000).unwrap();
        w.client_data(&mut cut, &[b'x'; 1600], 2_000).unwrap();
        w.abort(&mut cut, true, 3_000).unwrap();
        let mut later = SessionMeta {
            client: "198.18.0.9:40001".parse().unwrap(),
            ..meta()
        };
        later.start_ns += 1;
        let mut continued = w.open(3, &later, 4_000).unwrap();
        continued.mark_continued();
        w.client_data(&mut continued, b"GET / HTTP/1.1\r\n\r\n", 5_000)
            .unwrap();
        w.abort(&mut continued, false, 6_000).unwrap();
        let raw = w.into_inner();

        let with_piece = |bytes: &[u8]| [&[7u8][..], bytes].concat();
        let recordings = vec![
            ("ethernet-le".to_string(), with_piece(&ethernet)),
            (
                "ethernet-be".to_string(),
                with_piece(&to_big_endian(&ethernet)),
            ),
            ("raw-ipv4-detached-continued".to_string(), with_piece(&raw)),
        ];
        ncp_testbed::fuzz_seeds::sync("pcapng_reader", &recordings);

        // Owned: the primary's address, ports 6000..=7000 (so the client's segments to
        // port 6379 are steered).
        let tables = [198, 18, 0, 2, 0x17, 0x70, 0x1b, 0x58];
        let mut frames = Vec::new();
        let mut r = BlockReader::new(&ethernet[..]);
        while let Some(b) = r.next_block().unwrap() {
            if let Block::Packet(p) = b {
                let name = format!("frame-{:02}", frames.len());
                frames.push((name, [&tables[..], p.data].concat()));
            }
        }
        let (_, first) = &frames[0];
        let mut tagged = first[..8 + 12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x1f]);
        tagged.extend_from_slice(&first[8 + 12..]);
        frames.push(("frame-vlan".into(), tagged));
        ncp_testbed::fuzz_seeds::sync("frame_parser", &frames);
    }
}
