//! The fixed 8-byte OpenFlow header and the message type numbers of OpenFlow 1.3.

use super::bytes::{Put, Reader, Truncated};

/// Wire version number of OpenFlow 1.3.
pub const OFP_VERSION_1_3: u8 = 0x04;
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 8;

/// The message types (`ofp_type`) NCP decodes into typed messages; every other number
/// stays a raw [`super::messages::Message::Unknown`].
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    Hello = 0,
    Error = 1,
    EchoRequest = 2,
    EchoReply = 3,
    FeaturesRequest = 5,
    FeaturesReply = 6,
    SetConfig = 9,
    PacketIn = 10,
    FlowRemoved = 11,
    PortStatus = 12,
    PacketOut = 13,
    FlowMod = 14,
    GroupMod = 15,
    MultipartRequest = 18,
    MultipartReply = 19,
    BarrierRequest = 20,
    BarrierReply = 21,
}

/// A message type number outside [`MsgType`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("OpenFlow message type {0} is not one NCP decodes")]
pub struct UnknownMsgType(pub u8);

impl MsgType {
    /// Every type, in wire-number order.
    const ALL: [MsgType; 17] = [
        MsgType::Hello,
        MsgType::Error,
        MsgType::EchoRequest,
        MsgType::EchoReply,
        MsgType::FeaturesRequest,
        MsgType::FeaturesReply,
        MsgType::SetConfig,
        MsgType::PacketIn,
        MsgType::FlowRemoved,
        MsgType::PortStatus,
        MsgType::PacketOut,
        MsgType::FlowMod,
        MsgType::GroupMod,
        MsgType::MultipartRequest,
        MsgType::MultipartReply,
        MsgType::BarrierRequest,
        MsgType::BarrierReply,
    ];
}

impl TryFrom<u8> for MsgType {
    type Error = UnknownMsgType;

    fn try_from(number: u8) -> Result<Self, UnknownMsgType> {
        Self::ALL
            .into_iter()
            .find(|t| *t as u8 == number)
            .ok_or(UnknownMsgType(number))
    }
}

/// `ofp_header`: every message starts with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub msg_type: u8,
    /// Total message length including this header.
    pub length: u16,
    /// Transaction id; replies echo the request's.
    pub xid: u32,
}

impl Header {
    pub fn parse(r: &mut Reader<'_>) -> Result<Self, Truncated> {
        Ok(Self {
            version: r.u8()?,
            msg_type: r.u8()?,
            length: r.u16()?,
            xid: r.u32()?,
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.put_u8(self.version);
        out.put_u8(self.msg_type);
        out.put_u16(self.length);
        out.put_u32(self.xid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            version: 4,
            msg_type: MsgType::FlowMod as u8,
            length: 0x50,
            xid: 0xdead_beef,
        };
        let mut v = Vec::new();
        h.emit(&mut v);
        assert_eq!(v, [4, 14, 0, 0x50, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Header::parse(&mut Reader::new(&v)), Ok(h));
    }

    #[test]
    fn message_types_convert_both_ways_and_unknown_ones_are_rejected() {
        for t in MsgType::ALL {
            assert_eq!(MsgType::try_from(t as u8), Ok(t));
        }
        assert_eq!(
            MsgType::try_from(4),
            Err(UnknownMsgType(4)),
            "OFPT_EXPERIMENTER"
        );
        assert_eq!(
            MsgType::try_from(22),
            Err(UnknownMsgType(22)),
            "OFPT_QUEUE_GET_CONFIG"
        );
    }
}
