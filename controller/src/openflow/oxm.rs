//! OXM (OpenFlow Extensible Match) TLVs and the `ofp_match` structure built from them.
//!
//! [`Match`] is a typed, canonical value: the planner builds one, the decoder rebuilds one
//! from a switch's flow-stats reply, and the reconciler compares the two with `==`. That is
//! why prefixes are normalised (host bits cleared, /32 carried without a mask, exactly as
//! Open vSwitch reports them back) and why fields we do not model are kept verbatim in
//! [`Match::other`] rather than rejected: foreign rules on a switch must still decode.

use std::fmt;
use std::net::Ipv4Addr;

use super::bytes::{Put, Reader, Truncated, len16};

/// OXM class of the fields defined by the OpenFlow specification.
pub const OXM_CLASS_OPENFLOW_BASIC: u16 = 0x8000;
/// `ofp_match.type` for OXM matches (the only kind OpenFlow 1.3 allows).
pub const OFPMT_OXM: u16 = 1;
/// Bit of the `vlan_vid` field saying a VLAN tag is present.
pub const OFPVID_PRESENT: u16 = 0x1000;

/// OXM field numbers in the OpenFlow-basic class.
pub mod field {
    pub const IN_PORT: u8 = 0;
    pub const METADATA: u8 = 2;
    pub const ETH_DST: u8 = 3;
    pub const ETH_SRC: u8 = 4;
    pub const ETH_TYPE: u8 = 5;
    pub const VLAN_VID: u8 = 6;
    pub const IP_PROTO: u8 = 10;
    pub const IPV4_SRC: u8 = 11;
    pub const IPV4_DST: u8 = 12;
    pub const TCP_SRC: u8 = 13;
    pub const TCP_DST: u8 = 14;
    pub const MPLS_LABEL: u8 = 34;
}

/// Well-known values used with `eth_type` / `ip_proto`.
pub const ETH_TYPE_IPV4: u16 = 0x0800;
pub const ETH_TYPE_VLAN: u16 = 0x8100;
pub const ETH_TYPE_MPLS: u16 = 0x8847;
pub const ETH_TYPE_LLDP: u16 = 0x88cc;
pub const IP_PROTO_TCP: u8 = 6;

/// A 48-bit Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts
                .next()
                .ok_or_else(|| format!("short MAC address {s:?}"))?;
            *b = u8::from_str_radix(p, 16).map_err(|e| format!("bad MAC address {s:?}: {e}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("long MAC address {s:?}"));
        }
        Ok(MacAddr(out))
    }
}

/// An IPv4 prefix in canonical form (host bits zero, `len` <= 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Prefix {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Prefix {
    /// Builds a prefix, clearing host bits; `len` above 32 is clamped to 32.
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        let addr = Ipv4Addr::from(u32::from(addr) & Self::mask_of(len));
        Self { addr, len }
    }

    /// A single host (/32).
    pub fn host(addr: Ipv4Addr) -> Self {
        Self::new(addr, 32)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn mask(&self) -> u32 {
        Self::mask_of(self.len)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    fn mask_of(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    /// Interprets a wire mask; only contiguous (prefix) masks are representable.
    fn from_mask(addr: u32, mask: u32) -> Option<Self> {
        let len = mask.leading_ones();
        if mask.checked_shl(len).unwrap_or(0) != 0 {
            return None;
        }
        u8::try_from(len)
            .ok()
            .map(|l| Self::new(Ipv4Addr::from(addr), l))
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One OXM TLV we do not model, kept byte-exact so it re-encodes identically.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawOxm {
    pub class: u16,
    pub field: u8,
    pub has_mask: bool,
    /// Value followed by mask when `has_mask`.
    pub payload: Vec<u8>,
}

/// A single OXM field; also the payload of the set-field action.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OxmField {
    InPort(u32),
    Metadata(u64),
    EthDst(MacAddr),
    EthSrc(MacAddr),
    EthType(u16),
    /// 12-bit VLAN id; the wire value carries [`OFPVID_PRESENT`] in addition.
    VlanVid(u16),
    IpProto(u8),
    Ipv4Src(Ipv4Prefix),
    Ipv4Dst(Ipv4Prefix),
    TcpSrc(u16),
    TcpDst(u16),
    /// 20-bit MPLS label.
    MplsLabel(u32),
    Other(RawOxm),
}

/// Malformed OXM data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OxmError {
    #[error("OXM data truncated")]
    Truncated,
    #[error("OXM field {0} has a bad length {1}")]
    BadLength(u8, u8),
    #[error("OXM field {0} appears twice in one match")]
    Duplicate(u8),
    #[error("match type {0} is not OXM")]
    BadMatchType(u16),
}

impl From<Truncated> for OxmError {
    fn from(_: Truncated) -> Self {
        OxmError::Truncated
    }
}

fn put_tlv(out: &mut Vec<u8>, field: u8, has_mask: bool, payload: &[u8]) {
    out.put_u16(OXM_CLASS_OPENFLOW_BASIC);
    out.put_u8((field << 1) | u8::from(has_mask));
    out.put_u8(u8::try_from(payload.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(payload);
}

fn put_prefix(out: &mut Vec<u8>, field: u8, p: &Ipv4Prefix) {
    let addr = u32::from(p.addr).to_be_bytes();
    if p.len == 32 {
        put_tlv(out, field, false, &addr);
    } else {
        let mut payload = addr.to_vec();
        payload.extend_from_slice(&p.mask().to_be_bytes());
        put_tlv(out, field, true, &payload);
    }
}

impl OxmField {
    /// Appends this field's TLV.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            OxmField::InPort(p) => put_tlv(out, field::IN_PORT, false, &p.to_be_bytes()),
            OxmField::Metadata(m) => put_tlv(out, field::METADATA, false, &m.to_be_bytes()),
            OxmField::EthDst(m) => put_tlv(out, field::ETH_DST, false, &m.0),
            OxmField::EthSrc(m) => put_tlv(out, field::ETH_SRC, false, &m.0),
            OxmField::EthType(t) => put_tlv(out, field::ETH_TYPE, false, &t.to_be_bytes()),
            OxmField::VlanVid(v) => put_tlv(
                out,
                field::VLAN_VID,
                false,
                &((v & 0x0fff) | OFPVID_PRESENT).to_be_bytes(),
            ),
            OxmField::IpProto(p) => put_tlv(out, field::IP_PROTO, false, &[*p]),
            OxmField::Ipv4Src(p) => put_prefix(out, field::IPV4_SRC, p),
            OxmField::Ipv4Dst(p) => put_prefix(out, field::IPV4_DST, p),
            OxmField::TcpSrc(p) => put_tlv(out, field::TCP_SRC, false, &p.to_be_bytes()),
            OxmField::TcpDst(p) => put_tlv(out, field::TCP_DST, false, &p.to_be_bytes()),
            OxmField::MplsLabel(l) => put_tlv(
                out,
                field::MPLS_LABEL,
                false,
                &(l & 0x000f_ffff).to_be_bytes(),
            ),
            OxmField::Other(raw) => {
                out.put_u16(raw.class);
                out.put_u8((raw.field << 1) | u8::from(raw.has_mask));
                out.put_u8(u8::try_from(raw.payload.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&raw.payload);
            }
        }
    }

    /// Parses one TLV. Known fields with a shape we do not model (a mask on a field we
    /// only match exactly, a VLAN match without the present bit, ...) become `Other`.
    pub fn parse(r: &mut Reader<'_>) -> Result<Self, OxmError> {
        let class = r.u16()?;
        let fh = r.u8()?;
        let len = r.u8()?;
        let payload = r.bytes(usize::from(len))?;
        let field_no = fh >> 1;
        let has_mask = fh & 1 == 1;
        let raw = || {
            OxmField::Other(RawOxm {
                class,
                field: field_no,
                has_mask,
                payload: payload.to_vec(),
            })
        };
        if class != OXM_CLASS_OPENFLOW_BASIC {
            return Ok(raw());
        }
        let want = |n: usize| -> Result<&[u8], OxmError> {
            if payload.len() == n {
                Ok(payload)
            } else {
                Err(OxmError::BadLength(field_no, len))
            }
        };
        let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let f = match (field_no, has_mask) {
            (field::IN_PORT, false) => OxmField::InPort(be32(want(4)?)),
            (field::METADATA, false) => {
                let b = want(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                OxmField::Metadata(u64::from_be_bytes(a))
            }
            (field::ETH_DST | field::ETH_SRC, false) => {
                let b = want(6)?;
                let mut a = [0u8; 6];
                a.copy_from_slice(b);
                if field_no == field::ETH_DST {
                    OxmField::EthDst(MacAddr(a))
                } else {
                    OxmField::EthSrc(MacAddr(a))
                }
            }
            (field::ETH_TYPE, false) => OxmField::EthType(be16(want(2)?)),
            (field::VLAN_VID, false) => {
                let v = be16(want(2)?);
                if v & OFPVID_PRESENT != 0 {
                    OxmField::VlanVid(v & 0x0fff)
                } else {
                    raw()
                }
            }
            (field::IP_PROTO, false) => OxmField::IpProto(want(1)?[0]),
            (field::IPV4_SRC | field::IPV4_DST, _) => {
                let prefix = if has_mask {
                    let b = want(8)?;
                    Ipv4Prefix::from_mask(be32(&b[..4]) & be32(&b[4..]), be32(&b[4..]))
                } else {
                    Some(Ipv4Prefix::host(Ipv4Addr::from(be32(want(4)?))))
                };
                match (prefix, field_no) {
                    (None, _) => raw(),
                    (Some(p), field::IPV4_SRC) => OxmField::Ipv4Src(p),
                    (Some(p), _) => OxmField::Ipv4Dst(p),
                }
            }
            (field::TCP_SRC, false) => OxmField::TcpSrc(be16(want(2)?)),
            (field::TCP_DST, false) => OxmField::TcpDst(be16(want(2)?)),
            (field::MPLS_LABEL, false) => OxmField::MplsLabel(be32(want(4)?) & 0x000f_ffff),
            _ => raw(),
        };
        Ok(f)
    }

    fn field_number(&self) -> Option<u8> {
        Some(match self {
            OxmField::InPort(_) => field::IN_PORT,
            OxmField::Metadata(_) => field::METADATA,
            OxmField::EthDst(_) => field::ETH_DST,
            OxmField::EthSrc(_) => field::ETH_SRC,
            OxmField::EthType(_) => field::ETH_TYPE,
            OxmField::VlanVid(_) => field::VLAN_VID,
            OxmField::IpProto(_) => field::IP_PROTO,
            OxmField::Ipv4Src(_) => field::IPV4_SRC,
            OxmField::Ipv4Dst(_) => field::IPV4_DST,
            OxmField::TcpSrc(_) => field::TCP_SRC,
            OxmField::TcpDst(_) => field::TCP_DST,
            OxmField::MplsLabel(_) => field::MPLS_LABEL,
            OxmField::Other(_) => return None,
        })
    }
}

/// An OpenFlow 1.3 match. `None` means wildcarded.
///
/// The caller is responsible for prerequisites (e.g. `tcp_dst` needs `ip_proto = 6`, which
/// needs `eth_type = 0x0800`); switches reject a FLOW_MOD that breaks them with
/// `OFPBMC_BAD_PREREQ`, and the planner always sets them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Match {
    pub in_port: Option<u32>,
    pub metadata: Option<u64>,
    pub eth_dst: Option<MacAddr>,
    pub eth_src: Option<MacAddr>,
    pub eth_type: Option<u16>,
    pub vlan_vid: Option<u16>,
    pub ip_proto: Option<u8>,
    pub ipv4_src: Option<Ipv4Prefix>,
    pub ipv4_dst: Option<Ipv4Prefix>,
    pub tcp_src: Option<u16>,
    pub tcp_dst: Option<u16>,
    pub mpls_label: Option<u32>,
    /// Fields outside the model, sorted so that equality does not depend on wire order.
    pub other: Vec<RawOxm>,
}

impl Match {
    /// Everything of one Ethernet type (the match of most of the controller's own rules).
    pub fn eth_type(eth_type: u16) -> Self {
        Self {
            eth_type: Some(eth_type),
            ..Self::default()
        }
    }

    /// Everything arriving on one port.
    pub fn in_port(port: u32) -> Self {
        Self {
            in_port: Some(port),
            ..Self::default()
        }
    }

    /// The fields in canonical (field-number) order, then the unmodelled ones.
    pub fn fields(&self) -> Vec<OxmField> {
        let mut v = Vec::new();
        v.extend(self.in_port.map(OxmField::InPort));
        v.extend(self.metadata.map(OxmField::Metadata));
        v.extend(self.eth_dst.map(OxmField::EthDst));
        v.extend(self.eth_src.map(OxmField::EthSrc));
        v.extend(self.eth_type.map(OxmField::EthType));
        v.extend(self.vlan_vid.map(OxmField::VlanVid));
        v.extend(self.ip_proto.map(OxmField::IpProto));
        v.extend(self.ipv4_src.map(OxmField::Ipv4Src));
        v.extend(self.ipv4_dst.map(OxmField::Ipv4Dst));
        v.extend(self.tcp_src.map(OxmField::TcpSrc));
        v.extend(self.tcp_dst.map(OxmField::TcpDst));
        v.extend(self.mpls_label.map(OxmField::MplsLabel));
        v.extend(self.other.iter().cloned().map(OxmField::Other));
        v
    }

    /// Appends `ofp_match` (type, length, OXMs, padding to 8 bytes).
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.put_u16(OFPMT_OXM);
        out.put_u16(0);
        for f in self.fields() {
            f.emit(out);
        }
        let len = len16(out.len() - start);
        out.patch_u16(start + 2, len);
        out.pad_to_8(start);
    }

    /// Parses `ofp_match` including its trailing padding.
    pub fn parse(r: &mut Reader<'_>) -> Result<Self, OxmError> {
        let mtype = r.u16()?;
        let len = usize::from(r.u16()?);
        if mtype != OFPMT_OXM {
            return Err(OxmError::BadMatchType(mtype));
        }
        if len < 4 {
            return Err(OxmError::Truncated);
        }
        let body = r.bytes(len - 4)?;
        r.skip((8 - len % 8) % 8)?;
        let mut m = Match::default();
        let mut fr = Reader::new(body);
        while !fr.is_empty() {
            let f = OxmField::parse(&mut fr)?;
            m.insert(f)?;
        }
        m.other.sort();
        Ok(m)
    }

    fn insert(&mut self, f: OxmField) -> Result<(), OxmError> {
        fn set<T>(slot: &mut Option<T>, v: T, n: Option<u8>) -> Result<(), OxmError> {
            if slot.is_some() {
                return Err(OxmError::Duplicate(n.unwrap_or(u8::MAX)));
            }
            *slot = Some(v);
            Ok(())
        }
        let n = f.field_number();
        match f {
            OxmField::InPort(v) => set(&mut self.in_port, v, n),
            OxmField::Metadata(v) => set(&mut self.metadata, v, n),
            OxmField::EthDst(v) => set(&mut self.eth_dst, v, n),
            OxmField::EthSrc(v) => set(&mut self.eth_src, v, n),
            OxmField::EthType(v) => set(&mut self.eth_type, v, n),
            OxmField::VlanVid(v) => set(&mut self.vlan_vid, v, n),
            OxmField::IpProto(v) => set(&mut self.ip_proto, v, n),
            OxmField::Ipv4Src(v) => set(&mut self.ipv4_src, v, n),
            OxmField::Ipv4Dst(v) => set(&mut self.ipv4_dst, v, n),
            OxmField::TcpSrc(v) => set(&mut self.tcp_src, v, n),
            OxmField::TcpDst(v) => set(&mut self.tcp_dst, v, n),
            OxmField::MplsLabel(v) => set(&mut self.mpls_label, v, n),
            OxmField::Other(raw) => {
                self.other.push(raw);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_canonical() {
        let p = Ipv4Prefix::new(Ipv4Addr::new(198, 18, 1, 77), 24);
        assert_eq!(p.addr(), Ipv4Addr::new(198, 18, 1, 0));
        assert_eq!(p.mask(), 0xffff_ff00);
        assert!(p.contains(Ipv4Addr::new(198, 18, 1, 3)));
        assert!(!p.contains(Ipv4Addr::new(198, 18, 2, 3)));
        assert_eq!(Ipv4Prefix::new(Ipv4Addr::new(1, 2, 3, 4), 0).mask(), 0);
        assert_eq!(
            Ipv4Prefix::new(Ipv4Addr::new(1, 2, 3, 4), 99).prefix_len(),
            32
        );
    }

    #[test]
    fn match_bytes_are_exact() {
        let m = Match {
            eth_type: Some(ETH_TYPE_IPV4),
            ipv4_src: Some(Ipv4Prefix::new(Ipv4Addr::new(198, 18, 0, 0), 16)),
            ..Match::default()
        };
        let mut v = Vec::new();
        m.emit(&mut v);
        #[rustfmt::skip]
        let want = [
            0x00, 0x01, 0x00, 0x16,             // OXM match, length 22
            0x80, 0x00, 0x0a, 0x02, 0x08, 0x00, // eth_type=0x0800
            0x80, 0x00, 0x17, 0x08,             // ipv4_src, has mask, 8 bytes
            198, 18, 0, 0, 255, 255, 0, 0,
            0, 0,                               // pad to 24
        ];
        assert_eq!(v, want);
        assert_eq!(Match::parse(&mut Reader::new(&v)), Ok(m));
    }

    #[test]
    fn full_match_roundtrip() {
        let m = Match {
            in_port: Some(3),
            metadata: Some(7),
            eth_dst: Some(MacAddr([2, 0, 0, 0, 0, 1])),
            eth_src: Some(MacAddr([2, 0, 0, 0, 0, 2])),
            eth_type: Some(ETH_TYPE_IPV4),
            vlan_vid: Some(100),
            ip_proto: Some(IP_PROTO_TCP),
            ipv4_src: Some(Ipv4Prefix::host(Ipv4Addr::new(198, 18, 0, 1))),
            ipv4_dst: Some(Ipv4Prefix::host(Ipv4Addr::new(198, 18, 0, 2))),
            tcp_src: Some(1234),
            tcp_dst: Some(80),
            mpls_label: Some(0xabcde),
            other: vec![RawOxm {
                class: 0x8000,
                field: 7,
                has_mask: false,
                payload: vec![3],
            }],
        };
        let mut v = Vec::new();
        m.emit(&mut v);
        assert_eq!(v.len() % 8, 0);
        assert_eq!(Match::parse(&mut Reader::new(&v)), Ok(m));
    }

    #[test]
    fn full_mask_decodes_as_host_and_odd_mask_is_kept_raw() {
        let mut v = Vec::new();
        v.extend_from_slice(&[0, 1, 0, 4 + 12 + 12]);
        v.extend_from_slice(&[0x80, 0, 0x17, 8, 1, 2, 3, 4, 255, 255, 255, 255]);
        v.extend_from_slice(&[0x80, 0, 0x19, 8, 1, 2, 3, 4, 255, 0, 255, 0]);
        v.pad_to_8(0);
        let m = Match::parse(&mut Reader::new(&v)).expect("valid match");
        assert_eq!(
            m.ipv4_src,
            Some(Ipv4Prefix::host(Ipv4Addr::new(1, 2, 3, 4)))
        );
        assert_eq!(m.ipv4_dst, None);
        assert_eq!(m.other.len(), 1);
    }

    #[test]
    fn duplicates_and_bad_lengths_are_errors() {
        let mut v = vec![0, 1, 0, 4 + 6 + 6];
        v.extend_from_slice(&[0x80, 0, 0x0a, 2, 8, 0, 0x80, 0, 0x0a, 2, 8, 0]);
        v.pad_to_8(0);
        assert_eq!(
            Match::parse(&mut Reader::new(&v)),
            Err(OxmError::Duplicate(5))
        );
        let mut v = vec![0, 1, 0, 4 + 5];
        v.extend_from_slice(&[0x80, 0, 0x0a, 1, 8]);
        v.pad_to_8(0);
        assert_eq!(
            Match::parse(&mut Reader::new(&v)),
            Err(OxmError::BadLength(5, 1))
        );
    }

    #[test]
    fn mac_parse_and_display() {
        let m: MacAddr = "02:00:00:aa:bb:0c".parse().expect("valid mac");
        assert_eq!(m.to_string(), "02:00:00:aa:bb:0c");
        assert!("02:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:00:00".parse::<MacAddr>().is_err());
    }
}
