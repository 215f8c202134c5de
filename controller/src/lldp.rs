//! LLDP probes for link discovery: build the frame a switch port sends, and read back
//! which switch port sent a frame that arrived elsewhere.
//!
//! The chassis id names the datapath (`dpid:<16 hex digits>`, locally assigned subtype)
//! and the port id carries the OpenFlow port number as 4 big-endian bytes, so a probe
//! identifies its origin without any controller-side bookkeeping.

use crate::openflow::MacAddr;
use crate::openflow::oxm::ETH_TYPE_LLDP;
use crate::topology::Dpid;

/// Nearest-bridge group address: switches never forward frames sent to it.
pub const LLDP_MULTICAST: MacAddr = MacAddr([0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e]);

const TLV_END: u8 = 0;
const TLV_CHASSIS_ID: u8 = 1;
const TLV_PORT_ID: u8 = 2;
const TLV_TTL: u8 = 3;
const SUBTYPE_LOCAL: u8 = 7;
const CHASSIS_PREFIX: &str = "dpid:";

fn put_tlv(out: &mut Vec<u8>, ty: u8, value: &[u8]) {
    // 7-bit type, 9-bit length; our values are all far below 512 bytes.
    let len = u16::try_from(value.len()).unwrap_or(0x1ff).min(0x1ff);
    let head = (u16::from(ty) << 9) | len;
    out.extend_from_slice(&head.to_be_bytes());
    out.extend_from_slice(value);
}

/// An LLDP frame announcing `(dpid, port)`, sent from the port's own MAC.
pub fn probe(dpid: Dpid, port: u32, src: MacAddr, ttl_secs: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&LLDP_MULTICAST.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ETH_TYPE_LLDP.to_be_bytes());
    let mut chassis = vec![SUBTYPE_LOCAL];
    chassis.extend_from_slice(format!("{CHASSIS_PREFIX}{dpid:016x}").as_bytes());
    put_tlv(&mut f, TLV_CHASSIS_ID, &chassis);
    let mut port_id = vec![SUBTYPE_LOCAL];
    port_id.extend_from_slice(&port.to_be_bytes());
    put_tlv(&mut f, TLV_PORT_ID, &port_id);
    put_tlv(&mut f, TLV_TTL, &ttl_secs.to_be_bytes());
    put_tlv(&mut f, TLV_END, &[]);
    // Pad to the Ethernet minimum (60 bytes without FCS).
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// The `(dpid, port)` a probe announces, or `None` for anything that is not one of ours.
pub fn parse_probe(frame: &[u8]) -> Option<(Dpid, u32)> {
    if frame.get(12..14)? != ETH_TYPE_LLDP.to_be_bytes() {
        return None;
    }
    let mut rest = frame.get(14..)?;
    let (mut dpid, mut port) = (None, None);
    loop {
        let head = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        let ty = u8::try_from(head >> 9).ok()?;
        let len = usize::from(head & 0x1ff);
        let value = rest.get(2..2 + len)?;
        rest = &rest[2 + len..];
        match ty {
            TLV_END => break,
            TLV_CHASSIS_ID => {
                let (&sub, text) = value.split_first()?;
                let text = std::str::from_utf8(text).ok()?;
                let hex = text.strip_prefix(CHASSIS_PREFIX)?;
                if sub != SUBTYPE_LOCAL || hex.len() != 16 {
                    return None;
                }
                dpid = Some(u64::from_str_radix(hex, 16).ok()?);
            }
            TLV_PORT_ID => {
                let (&sub, num) = value.split_first()?;
                if sub != SUBTYPE_LOCAL {
                    return None;
                }
                port = Some(u32::from_be_bytes(num.try_into().ok()?));
            }
            _ => {}
        }
    }
    Some((dpid?, port?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_roundtrip_and_layout() {
        let f = probe(0x21, 3, MacAddr([2, 0, 0, 0, 0, 7]), 120);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &LLDP_MULTICAST.0);
        assert_eq!(&f[12..14], &[0x88, 0xcc]);
        // Chassis TLV: type 1, length 1 + 5 + 16 = 22.
        assert_eq!(&f[14..17], &[0x02, 22, SUBTYPE_LOCAL]);
        assert_eq!(parse_probe(&f), Some((0x21, 3)));
    }

    #[test]
    fn foreign_and_broken_frames_are_ignored() {
        let good = probe(1, 2, MacAddr::default(), 10);
        assert_eq!(parse_probe(&good[..20]), None);
        let mut ip = good.clone();
        ip[12] = 0x08;
        ip[13] = 0x00;
        assert_eq!(parse_probe(&ip), None);
        let mut other_chassis = good.clone();
        other_chassis[17] = b'x';
        assert_eq!(parse_probe(&other_chassis), None);
        for cut in 0..good.len() {
            let _ = parse_probe(&good[..cut]);
        }
    }
}
