//! Typed OpenFlow 1.3 messages and their body layouts (everything after the header).

use super::actions::{Action, ActionError, Instruction, emit_actions, parse_actions};
use super::bytes::{Put, Reader, Truncated, len16};
use super::header::{MsgType, UnknownMsgType};
use super::layout::{Field, wire_layout};
use super::oxm::{MacAddr, Match, OxmError};

/// `OFP_NO_BUFFER`: the packet is carried in full, not held in a switch buffer.
pub const NO_BUFFER: u32 = 0xffff_ffff;
/// `OFPG_ANY`: wildcard group in requests and deletes.
pub const GROUP_ANY: u32 = 0xffff_ffff;
/// `OFPTT_ALL`: every table, for flow-stats requests and deletes.
pub const TABLE_ALL: u8 = 0xff;

/// A body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("message body truncated")]
    Truncated,
    #[error("match: {0}")]
    Match(#[from] OxmError),
    #[error("actions: {0}")]
    Actions(#[from] ActionError),
    #[error("{0}")]
    Invalid(&'static str),
}

impl From<Truncated> for BodyError {
    fn from(_: Truncated) -> Self {
        BodyError::Truncated
    }
}

/// `ofp_error_msg`. `data` usually holds the start of the offending request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    pub err_type: u16,
    pub code: u16,
    pub data: Vec<u8>,
}

/// The error types (`ofp_error_type`) NCP itself sends or checks for; others are carried
/// as plain numbers.
pub mod error_type {
    /// Sent when a switch speaks no version we do.
    pub const HELLO_FAILED: u16 = 0;
    /// What a switch answers to a FLOW_MOD whose match it cannot take.
    pub const BAD_MATCH: u16 = 4;
}

/// `ofp_switch_features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchFeatures {
    pub datapath_id: u64,
    pub n_buffers: u32,
    pub n_tables: u8,
    pub auxiliary_id: u8,
    pub capabilities: u32,
}

/// `ofp_switch_config` (SET_CONFIG / GET_CONFIG_REPLY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchConfig {
    pub flags: u16,
    /// Bytes of a packet sent to the controller when no buffer is used.
    pub miss_send_len: u16,
}

/// `ofp_port`: one physical or logical switch port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortDesc {
    pub port_no: u32,
    pub hw_addr: MacAddr,
    pub name: String,
    pub config: u32,
    pub state: u32,
    pub curr: u32,
    pub advertised: u32,
    pub supported: u32,
    pub peer: u32,
    pub curr_speed: u32,
    pub max_speed: u32,
}

/// `OFPPC_PORT_DOWN` in `config`, `OFPPS_LINK_DOWN` in `state`.
pub const PORT_CONFIG_DOWN: u32 = 1;
pub const PORT_STATE_LINK_DOWN: u32 = 1;
const PORT_DESC_LEN: usize = 64;
/// Longest port name: `OFP_MAX_PORT_NAME_LEN` (16) less the terminating NUL.
const PORT_NAME_MAX: usize = 15;

/// The longest prefix of `name` that fits `PORT_NAME_MAX` bytes and ends on a character
/// boundary, so a name cut to fit the field is still valid UTF-8.
fn port_name_prefix(name: &str) -> &str {
    let mut end = name.len().min(PORT_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

impl PortDesc {
    /// A port that is up, with no features, state bits or speeds reported.
    pub fn new(port_no: u32, hw_addr: MacAddr, name: String) -> Self {
        Self {
            port_no,
            hw_addr,
            name,
            config: 0,
            state: 0,
            curr: 0,
            advertised: 0,
            supported: 0,
            peer: 0,
            curr_speed: 0,
            max_speed: 0,
        }
    }

    /// True when the port can carry traffic (administratively up and link up).
    pub fn is_live(&self) -> bool {
        self.config & PORT_CONFIG_DOWN == 0 && self.state & PORT_STATE_LINK_DOWN == 0
    }

    fn emit(&self, out: &mut Vec<u8>) {
        out.put_u32(self.port_no);
        out.put_zeros(4);
        out.extend_from_slice(&self.hw_addr.0);
        out.put_zeros(2);
        let mut name = [0u8; 16];
        // Leave room for the terminating NUL the spec requires.
        let kept = port_name_prefix(&self.name).as_bytes();
        name[..kept.len()].copy_from_slice(kept);
        out.extend_from_slice(&name);
        for v in [
            self.config,
            self.state,
            self.curr,
            self.advertised,
            self.supported,
            self.peer,
            self.curr_speed,
            self.max_speed,
        ] {
            out.put_u32(v);
        }
    }

    fn parse(r: &mut Reader<'_>) -> Result<Self, Truncated> {
        let port_no = r.u32()?;
        r.skip(4)?;
        let hw_addr = MacAddr(r.array()?);
        r.skip(2)?;
        let raw: [u8; 16] = r.array()?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        // Kept to what `emit` can write back: a switch that fills all 16 bytes, or sends
        // bytes that are not UTF-8 (each replaced by a 3-byte U+FFFD), still yields a name
        // that encodes and decodes to itself.
        let name = port_name_prefix(&String::from_utf8_lossy(&raw[..end])).to_owned();
        Ok(Self {
            port_no,
            hw_addr,
            name,
            config: r.u32()?,
            state: r.u32()?,
            curr: r.u32()?,
            advertised: r.u32()?,
            supported: r.u32()?,
            peer: r.u32()?,
            curr_speed: r.u32()?,
            max_speed: r.u32()?,
        })
    }
}

/// `ofp_packet_in`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketIn {
    pub buffer_id: u32,
    pub total_len: u16,
    pub reason: u8,
    pub table_id: u8,
    pub cookie: u64,
    /// Carries at least `in_port`.
    pub matched: Match,
    pub data: Vec<u8>,
}

/// `ofp_packet_out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketOut {
    pub buffer_id: u32,
    pub in_port: u32,
    pub actions: Vec<Action>,
    pub data: Vec<u8>,
}

/// `ofp_port_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStatus {
    /// 0 add, 1 delete, 2 modify.
    pub reason: u8,
    pub desc: PortDesc,
}

/// `ofp_flow_removed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRemoved {
    pub cookie: u64,
    pub priority: u16,
    pub reason: u8,
    pub table_id: u8,
    pub duration_sec: u32,
    pub duration_nsec: u32,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    pub packet_count: u64,
    pub byte_count: u64,
    pub matched: Match,
}

/// `ofp_flow_mod_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowModCommand {
    Add,
    Modify,
    ModifyStrict,
    Delete,
    DeleteStrict,
    Other(u8),
}

impl FlowModCommand {
    fn to_wire(self) -> u8 {
        match self {
            Self::Add => 0,
            Self::Modify => 1,
            Self::ModifyStrict => 2,
            Self::Delete => 3,
            Self::DeleteStrict => 4,
            Self::Other(v) => v,
        }
    }
    fn from_wire(v: u8) -> Self {
        match v {
            0 => Self::Add,
            1 => Self::Modify,
            2 => Self::ModifyStrict,
            3 => Self::Delete,
            4 => Self::DeleteStrict,
            v => Self::Other(v),
        }
    }
}

/// `OFPFF_SEND_FLOW_REM`: ask for FLOW_REMOVED when the rule goes away.
pub const FLOW_FLAG_SEND_FLOW_REM: u16 = 1;
/// `OFPFF_CHECK_OVERLAP`.
pub const FLOW_FLAG_CHECK_OVERLAP: u16 = 2;

/// `ofp_flow_mod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowMod {
    pub cookie: u64,
    /// For modify/delete: only rules whose cookie matches under this mask are affected.
    pub cookie_mask: u64,
    pub table_id: u8,
    pub command: FlowModCommand,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    pub priority: u16,
    pub buffer_id: u32,
    /// Delete filters; `port::ANY` / [`GROUP_ANY`] when unused.
    pub out_port: u32,
    pub out_group: u32,
    pub flags: u16,
    pub matched: Match,
    pub instructions: Vec<Instruction>,
}

impl FlowMod {
    /// An ADD with no timeouts, table 0, no buffer and no filters.
    pub fn add(cookie: u64, priority: u16, matched: Match, instructions: Vec<Instruction>) -> Self {
        Self {
            cookie,
            cookie_mask: 0,
            table_id: 0,
            command: FlowModCommand::Add,
            idle_timeout: 0,
            hard_timeout: 0,
            priority,
            buffer_id: NO_BUFFER,
            out_port: super::actions::port::ANY,
            out_group: GROUP_ANY,
            flags: 0,
            matched,
            instructions,
        }
    }

    /// A DELETE_STRICT of exactly the rule with this match and priority, restricted to
    /// rules whose cookie equals `cookie` so that a foreign rule with the same match
    /// survives.
    pub fn delete_strict(cookie: u64, priority: u16, matched: Match) -> Self {
        Self {
            cookie,
            cookie_mask: u64::MAX,
            command: FlowModCommand::DeleteStrict,
            ..Self::add(cookie, priority, matched, Vec::new())
        }
    }
}

/// `ofp_bucket` of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub weight: u16,
    pub watch_port: u32,
    pub watch_group: u32,
    pub actions: Vec<Action>,
}

/// `ofp_group_mod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMod {
    /// 0 add, 1 modify, 2 delete.
    pub command: u16,
    /// 0 all, 1 select, 2 indirect, 3 fast failover.
    pub group_type: u8,
    pub group_id: u32,
    pub buckets: Vec<Bucket>,
}

/// Request for `OFPMP_FLOW` (individual flow statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowStatsRequest {
    pub table_id: u8,
    pub out_port: u32,
    pub out_group: u32,
    pub cookie: u64,
    pub cookie_mask: u64,
    pub matched: Match,
}

impl FlowStatsRequest {
    /// All flows in all tables whose cookie matches `cookie` under `cookie_mask`.
    pub fn by_cookie(cookie: u64, cookie_mask: u64) -> Self {
        Self {
            table_id: TABLE_ALL,
            out_port: super::actions::port::ANY,
            out_group: GROUP_ANY,
            cookie,
            cookie_mask,
            matched: Match::default(),
        }
    }
}

/// One `ofp_flow_stats` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowStats {
    pub table_id: u8,
    pub duration_sec: u32,
    pub duration_nsec: u32,
    pub priority: u16,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    pub flags: u16,
    pub cookie: u64,
    pub packet_count: u64,
    pub byte_count: u64,
    pub matched: Match,
    pub instructions: Vec<Instruction>,
}

mod multipart_type {
    pub const FLOW: u16 = 1;
    pub const PORT_DESC: u16 = 13;
}

/// `OFPMPF_REPLY_MORE`: more parts of this reply follow with the same xid.
pub const MULTIPART_MORE: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultipartRequest {
    PortDesc,
    Flow(FlowStatsRequest),
    Other {
        mp_type: u16,
        flags: u16,
        body: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultipartReplyBody {
    PortDesc(Vec<PortDesc>),
    Flow(Vec<FlowStats>),
    Other { mp_type: u16, body: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartReply {
    /// [`MULTIPART_MORE`] when the reply continues in another message.
    pub flags: u16,
    pub body: MultipartReplyBody,
}

/// Every message the controller understands. Types outside this set decode to
/// [`Message::Unknown`] so a connection survives, e.g., vendor extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Versions offered in the version bitmap (empty when the peer sent no bitmap).
    Hello {
        versions: Vec<u8>,
    },
    Error(ErrorMsg),
    EchoRequest(Vec<u8>),
    EchoReply(Vec<u8>),
    FeaturesRequest,
    FeaturesReply(SwitchFeatures),
    SetConfig(SwitchConfig),
    PacketIn(PacketIn),
    FlowRemoved(FlowRemoved),
    PortStatus(PortStatus),
    PacketOut(PacketOut),
    FlowMod(FlowMod),
    GroupMod(GroupMod),
    MultipartRequest(MultipartRequest),
    MultipartReply(MultipartReply),
    BarrierRequest,
    BarrierReply,
    Unknown {
        version: u8,
        msg_type: u8,
        body: Vec<u8>,
    },
}

const HELLO_ELEM_VERSIONBITMAP: u16 = 1;

// Wire order of the fixed-layout bodies (OpenFlow 1.3, section 7), one list each for both
// directions.
wire_layout!(ErrorMsg {
    err_type,
    code,
    data
});
wire_layout!(SwitchFeatures {
    datapath_id,
    n_buffers,
    n_tables,
    auxiliary_id pad 2,
    capabilities pad 4,
});
wire_layout!(SwitchConfig {
    flags,
    miss_send_len
});
wire_layout!(PacketIn {
    buffer_id,
    total_len,
    reason,
    table_id,
    cookie,
    matched pad 2,
    data,
});
wire_layout!(FlowRemoved {
    cookie,
    priority,
    reason,
    table_id,
    duration_sec,
    duration_nsec,
    idle_timeout,
    hard_timeout,
    packet_count,
    byte_count,
    matched,
});
wire_layout!(PortStatus { reason pad 7, desc });
wire_layout!(FlowMod {
    cookie,
    cookie_mask,
    table_id,
    command,
    idle_timeout,
    hard_timeout,
    priority,
    buffer_id,
    out_port,
    out_group,
    flags pad 2,
    matched,
    instructions,
});
// After the entry's own u16 length.
wire_layout!(Bucket { weight, watch_port, watch_group pad 4, actions });
wire_layout!(FlowStatsRequest {
    table_id pad 3,
    out_port,
    out_group pad 4,
    cookie,
    cookie_mask,
    matched,
});
// After the entry's own u16 length.
wire_layout!(FlowStats {
    table_id pad 1,
    duration_sec,
    duration_nsec,
    priority,
    idle_timeout,
    hard_timeout,
    flags pad 4,
    cookie,
    packet_count,
    byte_count,
    matched,
    instructions,
});

impl Field for FlowModCommand {
    fn put(&self, out: &mut Vec<u8>) {
        out.put_u8(self.to_wire());
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        Ok(Self::from_wire(r.u8()?))
    }
}

impl Field for PortDesc {
    fn put(&self, out: &mut Vec<u8>) {
        self.emit(out);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        Ok(Self::parse(r)?)
    }
}

impl Message {
    /// The `ofp_type` number of this message.
    pub fn msg_type(&self) -> u8 {
        let known = match self {
            Message::Hello { .. } => MsgType::Hello,
            Message::Error(_) => MsgType::Error,
            Message::EchoRequest(_) => MsgType::EchoRequest,
            Message::EchoReply(_) => MsgType::EchoReply,
            Message::FeaturesRequest => MsgType::FeaturesRequest,
            Message::FeaturesReply(_) => MsgType::FeaturesReply,
            Message::SetConfig(_) => MsgType::SetConfig,
            Message::PacketIn(_) => MsgType::PacketIn,
            Message::FlowRemoved(_) => MsgType::FlowRemoved,
            Message::PortStatus(_) => MsgType::PortStatus,
            Message::PacketOut(_) => MsgType::PacketOut,
            Message::FlowMod(_) => MsgType::FlowMod,
            Message::GroupMod(_) => MsgType::GroupMod,
            Message::MultipartRequest(_) => MsgType::MultipartRequest,
            Message::MultipartReply(_) => MsgType::MultipartReply,
            Message::BarrierRequest => MsgType::BarrierRequest,
            Message::BarrierReply => MsgType::BarrierReply,
            Message::Unknown { msg_type, .. } => return *msg_type,
        };
        known as u8
    }

    /// Appends the body (everything after the header).
    pub fn emit_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello { versions } => {
                if versions.is_empty() {
                    return;
                }
                let words = versions
                    .iter()
                    .map(|v| usize::from(*v) / 32)
                    .max()
                    .unwrap_or(0)
                    + 1;
                let mut bitmap = vec![0u32; words];
                for v in versions {
                    bitmap[usize::from(*v) / 32] |= 1 << (v % 32);
                }
                let start = out.len();
                out.put_u16(HELLO_ELEM_VERSIONBITMAP);
                out.put_u16(len16(4 + 4 * words));
                for w in bitmap {
                    out.put_u32(w);
                }
                out.pad_to_8(start);
            }
            Message::Error(e) => e.emit_fields(out),
            Message::EchoRequest(d) | Message::EchoReply(d) => out.extend_from_slice(d),
            Message::FeaturesRequest | Message::BarrierRequest | Message::BarrierReply => {}
            Message::FeaturesReply(f) => f.emit_fields(out),
            Message::SetConfig(c) => c.emit_fields(out),
            Message::PacketIn(p) => p.emit_fields(out),
            Message::FlowRemoved(f) => f.emit_fields(out),
            Message::PortStatus(p) => p.emit_fields(out),
            Message::PacketOut(p) => {
                out.put_u32(p.buffer_id);
                out.put_u32(p.in_port);
                let len_at = out.len();
                out.put_u16(0);
                out.put_zeros(6);
                let start = out.len();
                emit_actions(&p.actions, out);
                let alen = len16(out.len() - start);
                out.patch_u16(len_at, alen);
                out.extend_from_slice(&p.data);
            }
            Message::FlowMod(f) => f.emit_fields(out),
            Message::GroupMod(g) => {
                out.put_u16(g.command);
                out.put_u8(g.group_type);
                out.put_u8(0);
                out.put_u32(g.group_id);
                for b in &g.buckets {
                    let start = out.len();
                    out.put_u16(0);
                    b.emit_fields(out);
                    let blen = len16(out.len() - start);
                    out.patch_u16(start, blen);
                }
            }
            Message::MultipartRequest(m) => {
                let (ty, flags) = match m {
                    MultipartRequest::PortDesc => (multipart_type::PORT_DESC, 0),
                    MultipartRequest::Flow(_) => (multipart_type::FLOW, 0),
                    MultipartRequest::Other { mp_type, flags, .. } => (*mp_type, *flags),
                };
                out.put_u16(ty);
                out.put_u16(flags);
                out.put_zeros(4);
                match m {
                    MultipartRequest::PortDesc => {}
                    MultipartRequest::Flow(f) => f.emit_fields(out),
                    MultipartRequest::Other { body, .. } => out.extend_from_slice(body),
                }
            }
            Message::MultipartReply(m) => {
                let ty = match &m.body {
                    MultipartReplyBody::PortDesc(_) => multipart_type::PORT_DESC,
                    MultipartReplyBody::Flow(_) => multipart_type::FLOW,
                    MultipartReplyBody::Other { mp_type, .. } => *mp_type,
                };
                out.put_u16(ty);
                out.put_u16(m.flags);
                out.put_zeros(4);
                match &m.body {
                    MultipartReplyBody::PortDesc(ports) => {
                        for p in ports {
                            p.emit(out);
                        }
                    }
                    MultipartReplyBody::Flow(flows) => {
                        for f in flows {
                            emit_flow_stats(f, out);
                        }
                    }
                    MultipartReplyBody::Other { body, .. } => out.extend_from_slice(body),
                }
            }
            Message::Unknown { body, .. } => out.extend_from_slice(body),
        }
    }

    /// Decodes a body of the given type. `version` only matters for HELLO (any version
    /// may say hello); the codec routes other versions to [`Message::Unknown`].
    pub fn parse_body(version: u8, msg_type: u8, body: &[u8]) -> Result<Self, BodyError> {
        let mut r = Reader::new(body);
        let m = match MsgType::try_from(msg_type) {
            Ok(MsgType::Hello) => Message::Hello {
                versions: parse_hello(&mut r)?,
            },
            Ok(MsgType::Error) => Message::Error(ErrorMsg::parse_fields(&mut r)?),
            Ok(MsgType::EchoRequest) => Message::EchoRequest(r.rest().to_vec()),
            Ok(MsgType::EchoReply) => Message::EchoReply(r.rest().to_vec()),
            Ok(MsgType::FeaturesRequest) => Message::FeaturesRequest,
            Ok(MsgType::FeaturesReply) => {
                Message::FeaturesReply(SwitchFeatures::parse_fields(&mut r)?)
            }
            Ok(MsgType::SetConfig) => Message::SetConfig(SwitchConfig::parse_fields(&mut r)?),
            Ok(MsgType::PacketIn) => Message::PacketIn(PacketIn::parse_fields(&mut r)?),
            Ok(MsgType::FlowRemoved) => Message::FlowRemoved(FlowRemoved::parse_fields(&mut r)?),
            Ok(MsgType::PortStatus) => Message::PortStatus(PortStatus::parse_fields(&mut r)?),
            Ok(MsgType::PacketOut) => {
                let buffer_id = r.u32()?;
                let in_port = r.u32()?;
                let alen = usize::from(r.u16()?);
                r.skip(6)?;
                let actions = parse_actions(r.bytes(alen)?)?;
                Message::PacketOut(PacketOut {
                    buffer_id,
                    in_port,
                    actions,
                    data: r.rest().to_vec(),
                })
            }
            Ok(MsgType::FlowMod) => Message::FlowMod(FlowMod::parse_fields(&mut r)?),
            Ok(MsgType::GroupMod) => {
                let command = r.u16()?;
                let group_type = r.u8()?;
                r.skip(1)?;
                let group_id = r.u32()?;
                let mut buckets = Vec::new();
                while !r.is_empty() {
                    let len = usize::from(r.peek_u16(0)?);
                    if len < 16 {
                        return Err(BodyError::Invalid("bucket shorter than its header"));
                    }
                    let mut b = Reader::new(r.bytes(len)?);
                    b.skip(2)?;
                    buckets.push(Bucket::parse_fields(&mut b)?);
                }
                Message::GroupMod(GroupMod {
                    command,
                    group_type,
                    group_id,
                    buckets,
                })
            }
            Ok(MsgType::MultipartRequest) => {
                let mp_type = r.u16()?;
                let flags = r.u16()?;
                r.skip(4)?;
                Message::MultipartRequest(match mp_type {
                    multipart_type::PORT_DESC => MultipartRequest::PortDesc,
                    multipart_type::FLOW => {
                        MultipartRequest::Flow(FlowStatsRequest::parse_fields(&mut r)?)
                    }
                    _ => MultipartRequest::Other {
                        mp_type,
                        flags,
                        body: r.rest().to_vec(),
                    },
                })
            }
            Ok(MsgType::MultipartReply) => {
                let mp_type = r.u16()?;
                let flags = r.u16()?;
                r.skip(4)?;
                let body = match mp_type {
                    multipart_type::PORT_DESC => {
                        if !r.remaining().is_multiple_of(PORT_DESC_LEN) {
                            return Err(BodyError::Invalid("port list not a multiple of 64"));
                        }
                        let mut ports = Vec::new();
                        while !r.is_empty() {
                            ports.push(PortDesc::parse(&mut r)?);
                        }
                        MultipartReplyBody::PortDesc(ports)
                    }
                    multipart_type::FLOW => {
                        let mut flows = Vec::new();
                        while !r.is_empty() {
                            flows.push(parse_flow_stats(&mut r)?);
                        }
                        MultipartReplyBody::Flow(flows)
                    }
                    _ => MultipartReplyBody::Other {
                        mp_type,
                        body: r.rest().to_vec(),
                    },
                };
                Message::MultipartReply(MultipartReply { flags, body })
            }
            Ok(MsgType::BarrierRequest) => Message::BarrierRequest,
            Ok(MsgType::BarrierReply) => Message::BarrierReply,
            Err(UnknownMsgType(other)) => Message::Unknown {
                version,
                msg_type: other,
                body: r.rest().to_vec(),
            },
        };
        Ok(m)
    }
}

/// Reads the HELLO elements and returns the versions named in its version bitmaps, in
/// ascending order.
/// Unknown element types are skipped, as the spec asks.
fn parse_hello(r: &mut Reader<'_>) -> Result<Vec<u8>, BodyError> {
    let mut versions = Vec::new();
    while r.remaining() >= 4 {
        let ty = r.u16()?;
        let len = usize::from(r.u16()?);
        if len < 4 {
            return Err(BodyError::Invalid("hello element shorter than its header"));
        }
        let mut body = Reader::new(r.bytes(len - 4)?);
        // Elements are padded to 8 bytes; tolerate a missing pad on the last one.
        let pad = (8 - len % 8) % 8;
        r.skip(pad.min(r.remaining()))?;
        if ty == HELLO_ELEM_VERSIONBITMAP {
            let mut word_no: u32 = 0;
            while body.remaining() >= 4 {
                let w = body.u32()?;
                for bit in 0..32u32 {
                    if w & (1 << bit) != 0
                        && let Ok(v) = u8::try_from(word_no * 32 + bit)
                    {
                        versions.push(v);
                    }
                }
                word_no = word_no.saturating_add(1);
            }
        }
    }
    // Several bitmap elements name one set of versions: keep it in the one order the
    // encoder writes (a single bitmap), so a HELLO decodes the same after re-encoding.
    versions.sort_unstable();
    versions.dedup();
    Ok(versions)
}

fn emit_flow_stats(f: &FlowStats, out: &mut Vec<u8>) {
    let start = out.len();
    out.put_u16(0);
    f.emit_fields(out);
    let len = len16(out.len() - start);
    out.patch_u16(start, len);
}

fn parse_flow_stats(r: &mut Reader<'_>) -> Result<FlowStats, BodyError> {
    let len = usize::from(r.peek_u16(0)?);
    if len < 56 {
        return Err(BodyError::Invalid(
            "flow stats entry shorter than its header",
        ));
    }
    let mut e = Reader::new(r.bytes(len)?);
    e.skip(2)?;
    FlowStats::parse_fields(&mut e)
}
