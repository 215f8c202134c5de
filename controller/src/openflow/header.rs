//! The fixed 8-byte OpenFlow header and the message type numbers of OpenFlow 1.3.

use super::bytes::{Put, Reader, Truncated};

/// Wire version number of OpenFlow 1.3.
pub const OFP_VERSION_1_3: u8 = 0x04;
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 8;

/// Message type numbers (`ofp_type`) we care about.
pub mod msg_type {
    pub const HELLO: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const ECHO_REQUEST: u8 = 2;
    pub const ECHO_REPLY: u8 = 3;
    pub const FEATURES_REQUEST: u8 = 5;
    pub const FEATURES_REPLY: u8 = 6;
    pub const SET_CONFIG: u8 = 9;
    pub const PACKET_IN: u8 = 10;
    pub const FLOW_REMOVED: u8 = 11;
    pub const PORT_STATUS: u8 = 12;
    pub const PACKET_OUT: u8 = 13;
    pub const FLOW_MOD: u8 = 14;
    pub const GROUP_MOD: u8 = 15;
    pub const MULTIPART_REQUEST: u8 = 18;
    pub const MULTIPART_REPLY: u8 = 19;
    pub const BARRIER_REQUEST: u8 = 20;
    pub const BARRIER_REPLY: u8 = 21;
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
            msg_type: msg_type::FLOW_MOD,
            length: 0x50,
            xid: 0xdead_beef,
        };
        let mut v = Vec::new();
        h.emit(&mut v);
        assert_eq!(v, [4, 14, 0, 0x50, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Header::parse(&mut Reader::new(&v)), Ok(h));
    }
}
