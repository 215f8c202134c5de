//! Actions (`ofp_action_*`) and instructions (`ofp_instruction_*`).
//!
//! Unknown kinds decode to a raw variant instead of an error so that a flow-stats reply
//! listing rules of other controllers can always be read.

use super::bytes::{Put, Reader, Truncated, len16};
use super::oxm::{OxmError, OxmField};

/// The reserved port numbers (`ofp_port_no`) NCP uses.
pub mod port {
    /// Physical ports are numbered below this.
    pub const MAX: u32 = 0xffff_ff00;
    /// The switch's own L2 forwarding.
    pub const NORMAL: u32 = 0xffff_fffa;
    pub const CONTROLLER: u32 = 0xffff_fffd;
    /// The switch's local (bridge) port.
    pub const LOCAL: u32 = 0xffff_fffe;
    /// Wildcard in requests and deletes.
    pub const ANY: u32 = 0xffff_ffff;
}

/// `max_len` asking the switch to send the whole packet to the controller.
pub const OFPCML_NO_BUFFER: u16 = 0xffff;

mod action_type {
    pub const OUTPUT: u16 = 0;
    pub const PUSH_VLAN: u16 = 17;
    pub const POP_VLAN: u16 = 18;
    pub const PUSH_MPLS: u16 = 19;
    pub const POP_MPLS: u16 = 20;
    pub const GROUP: u16 = 22;
    pub const DEC_NW_TTL: u16 = 24;
    pub const SET_FIELD: u16 = 25;
}

mod instruction_type {
    pub const GOTO_TABLE: u16 = 1;
    pub const WRITE_METADATA: u16 = 2;
    pub const WRITE_ACTIONS: u16 = 3;
    pub const APPLY_ACTIONS: u16 = 4;
    pub const CLEAR_ACTIONS: u16 = 5;
}

/// Malformed action or instruction list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error("action/instruction data truncated")]
    Truncated,
    #[error("action/instruction length {0} is invalid")]
    BadLength(u16),
    #[error("set-field: {0}")]
    SetField(#[from] OxmError),
}

impl From<Truncated> for ActionError {
    fn from(_: Truncated) -> Self {
        ActionError::Truncated
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send out of `port`; `max_len` only matters for `port::CONTROLLER`.
    Output {
        port: u32,
        max_len: u16,
    },
    Group(u32),
    /// Push a tag with this TPID (0x8100 for 802.1Q).
    PushVlan(u16),
    PopVlan,
    /// Push an MPLS label stack entry with this ethertype (0x8847).
    PushMpls(u16),
    /// Pop the outermost MPLS entry; the argument is the ethertype of what is left.
    PopMpls(u16),
    DecNwTtl,
    SetField(OxmField),
    /// Any other action, `body` being what follows type and length.
    Other {
        action_type: u16,
        body: Vec<u8>,
    },
}

impl Action {
    /// Output to a port (the common case, `max_len` irrelevant).
    pub fn output(port: u32) -> Self {
        Action::Output { port, max_len: 0 }
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (ty, body): (u16, Vec<u8>) = match self {
            Action::Output { port, max_len } => {
                let mut b = Vec::with_capacity(12);
                b.put_u32(*port);
                b.put_u16(*max_len);
                b.put_zeros(6);
                (action_type::OUTPUT, b)
            }
            Action::Group(g) => (action_type::GROUP, g.to_be_bytes().to_vec()),
            Action::PushVlan(t) => (action_type::PUSH_VLAN, ethertype_body(*t)),
            Action::PopVlan => (action_type::POP_VLAN, vec![0; 4]),
            Action::PushMpls(t) => (action_type::PUSH_MPLS, ethertype_body(*t)),
            Action::PopMpls(t) => (action_type::POP_MPLS, ethertype_body(*t)),
            Action::DecNwTtl => (action_type::DEC_NW_TTL, vec![0; 4]),
            Action::SetField(f) => {
                let mut b = Vec::new();
                f.emit(&mut b);
                (action_type::SET_FIELD, b)
            }
            Action::Other { action_type, body } => (*action_type, body.clone()),
        };
        out.put_u16(ty);
        out.put_u16(0);
        out.extend_from_slice(&body);
        out.pad_to_8(start);
        let len = len16(out.len() - start);
        out.patch_u16(start + 2, len);
    }

    pub fn parse(r: &mut Reader<'_>) -> Result<Self, ActionError> {
        let (ty, mut b) = split_tlv(r)?;
        let a = match ty {
            action_type::OUTPUT => Action::Output {
                port: b.u32()?,
                max_len: b.u16()?,
            },
            action_type::GROUP => Action::Group(b.u32()?),
            action_type::PUSH_VLAN => Action::PushVlan(b.u16()?),
            action_type::POP_VLAN => Action::PopVlan,
            action_type::PUSH_MPLS => Action::PushMpls(b.u16()?),
            action_type::POP_MPLS => Action::PopMpls(b.u16()?),
            action_type::DEC_NW_TTL => Action::DecNwTtl,
            action_type::SET_FIELD => Action::SetField(OxmField::parse(&mut b)?),
            other => Action::Other {
                action_type: other,
                body: b.rest().to_vec(),
            },
        };
        Ok(a)
    }
}

fn ethertype_body(t: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(4);
    b.put_u16(t);
    b.put_zeros(2);
    b
}

/// Splits one type-length TLV (length covers the 4-byte head and must be a multiple of 8)
/// off `r`, returning the type and a reader over the body.
fn split_tlv<'a>(r: &mut Reader<'a>) -> Result<(u16, Reader<'a>), ActionError> {
    let len = r.peek_u16(2)?;
    if len < 8 || len % 8 != 0 {
        return Err(ActionError::BadLength(len));
    }
    let mut whole = Reader::new(r.bytes(usize::from(len))?);
    let ty = whole.u16()?;
    whole.skip(2)?;
    Ok((ty, whole))
}

/// Encodes an action list back to back.
pub fn emit_actions(actions: &[Action], out: &mut Vec<u8>) {
    for a in actions {
        a.emit(out);
    }
}

/// Decodes a whole buffer as an action list.
pub fn parse_actions(buf: &[u8]) -> Result<Vec<Action>, ActionError> {
    let mut r = Reader::new(buf);
    let mut v = Vec::new();
    while !r.is_empty() {
        v.push(Action::parse(&mut r)?);
    }
    Ok(v)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Instruction {
    GotoTable(u8),
    WriteMetadata {
        metadata: u64,
        mask: u64,
    },
    WriteActions(Vec<Action>),
    ApplyActions(Vec<Action>),
    ClearActions,
    Other {
        instruction_type: u16,
        body: Vec<u8>,
    },
}

impl Instruction {
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let ty = match self {
            Instruction::GotoTable(_) => instruction_type::GOTO_TABLE,
            Instruction::WriteMetadata { .. } => instruction_type::WRITE_METADATA,
            Instruction::WriteActions(_) => instruction_type::WRITE_ACTIONS,
            Instruction::ApplyActions(_) => instruction_type::APPLY_ACTIONS,
            Instruction::ClearActions => instruction_type::CLEAR_ACTIONS,
            Instruction::Other {
                instruction_type, ..
            } => *instruction_type,
        };
        out.put_u16(ty);
        out.put_u16(0);
        match self {
            Instruction::GotoTable(t) => {
                out.put_u8(*t);
                out.put_zeros(3);
            }
            Instruction::WriteMetadata { metadata, mask } => {
                out.put_zeros(4);
                out.put_u64(*metadata);
                out.put_u64(*mask);
            }
            Instruction::WriteActions(a) | Instruction::ApplyActions(a) => {
                out.put_zeros(4);
                emit_actions(a, out);
            }
            Instruction::ClearActions => out.put_zeros(4),
            Instruction::Other { body, .. } => out.extend_from_slice(body),
        }
        out.pad_to_8(start);
        let len = len16(out.len() - start);
        out.patch_u16(start + 2, len);
    }

    pub fn parse(r: &mut Reader<'_>) -> Result<Self, ActionError> {
        let (ty, mut b) = split_tlv(r)?;
        let i = match ty {
            instruction_type::GOTO_TABLE => Instruction::GotoTable(b.u8()?),
            instruction_type::WRITE_METADATA => {
                b.skip(4)?;
                Instruction::WriteMetadata {
                    metadata: b.u64()?,
                    mask: b.u64()?,
                }
            }
            instruction_type::WRITE_ACTIONS | instruction_type::APPLY_ACTIONS => {
                b.skip(4)?;
                let actions = parse_actions(b.rest())?;
                if ty == instruction_type::WRITE_ACTIONS {
                    Instruction::WriteActions(actions)
                } else {
                    Instruction::ApplyActions(actions)
                }
            }
            instruction_type::CLEAR_ACTIONS => Instruction::ClearActions,
            other => Instruction::Other {
                instruction_type: other,
                body: b.rest().to_vec(),
            },
        };
        Ok(i)
    }
}

pub fn emit_instructions(instructions: &[Instruction], out: &mut Vec<u8>) {
    for i in instructions {
        i.emit(out);
    }
}

pub fn parse_instructions(buf: &[u8]) -> Result<Vec<Instruction>, ActionError> {
    let mut r = Reader::new(buf);
    let mut v = Vec::new();
    while !r.is_empty() {
        v.push(Instruction::parse(&mut r)?);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openflow::oxm::MacAddr;

    #[test]
    fn output_bytes() {
        let mut v = Vec::new();
        Action::output(2).emit(&mut v);
        assert_eq!(v, [0, 0, 0, 16, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn set_field_is_padded() {
        let mut v = Vec::new();
        Action::SetField(OxmField::EthDst(MacAddr([2, 0, 0, 0, 0, 9]))).emit(&mut v);
        // 4 head + 4 oxm head + 6 mac = 14, padded to 16.
        assert_eq!(v, [0, 25, 0, 16, 0x80, 0, 6, 6, 2, 0, 0, 0, 0, 9, 0, 0]);
    }

    #[test]
    fn instructions_roundtrip() {
        let ins = vec![
            Instruction::WriteMetadata {
                metadata: 0x11,
                mask: 0xff,
            },
            Instruction::ApplyActions(vec![
                Action::PushVlan(0x8100),
                Action::SetField(OxmField::VlanVid(42)),
                Action::PopVlan,
                Action::PushMpls(0x8847),
                Action::SetField(OxmField::MplsLabel(77)),
                Action::PopMpls(0x0800),
                Action::Group(5),
                Action::DecNwTtl,
                Action::Output {
                    port: port::CONTROLLER,
                    max_len: OFPCML_NO_BUFFER,
                },
                Action::Other {
                    action_type: 11,
                    body: vec![0; 4],
                },
            ]),
            Instruction::GotoTable(1),
            Instruction::ClearActions,
        ];
        let mut v = Vec::new();
        emit_instructions(&ins, &mut v);
        assert_eq!(parse_instructions(&v), Ok(ins));
    }

    #[test]
    fn bad_lengths_are_rejected() {
        assert_eq!(parse_actions(&[0, 0, 0, 4]), Err(ActionError::BadLength(4)));
        assert_eq!(
            parse_actions(&[0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(ActionError::BadLength(12))
        );
        assert_eq!(
            parse_actions(&[0, 0, 0, 16, 0, 0]),
            Err(ActionError::Truncated)
        );
    }
}
