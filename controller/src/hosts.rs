//! Host learning from PACKET_INs (ARP and IPv4) at edge ports. Pure: the service feeds it
//! frames with the port they arrived on and asks where hosts are.
//!
//! A port is an *edge* port when LLDP discovery knows no link on it; only frames arriving
//! on edge ports teach anything, because a frame on a link port is just passing through.
//! Observations at a port that later turns out to carry a link are dropped again
//! ([`Learned::drop_port`]), which covers the first moments after a switch connects,
//! before its links are discovered.
//!
//! A host seen at a different edge port than before has *moved*; the caller re-plans. To
//! keep a spoofing or mis-wired host from making a real one flap, a host moves at most
//! once per [`LearnConfig::move_holddown`]. Hosts pinned by the operator always win over
//! learned ones (the service merges them, pins first). The table is bounded.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::openflow::MacAddr;
use crate::topology::{Host, PortRef};

pub const ETH_TYPE_ARP: u16 = 0x0806;
const ETH_TYPE_IPV4: u16 = 0x0800;

/// Sender of a frame: its source MAC and IPv4 address, and what told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// `Some(op)` for ARP (1 request, 2 reply), `None` for IPv4.
    pub arp_op: Option<u16>,
    /// Destination MAC of the frame.
    pub eth_dst: MacAddr,
}

fn mac_at(b: &[u8], at: usize) -> Option<MacAddr> {
    let s: [u8; 6] = b.get(at..at + 6)?.try_into().ok()?;
    Some(MacAddr(s))
}

fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(s))
}

/// Who sent this Ethernet frame, for untagged ARP (Ethernet/IPv4) and IPv4 frames.
/// Anything else, truncated or malformed yields `None`; the frame may be cut short by the
/// switch (PACKET_IN `max_len`), so only the headers are needed.
pub fn parse_sender(frame: &[u8]) -> Option<Sender> {
    let eth_dst = mac_at(frame, 0)?;
    let eth_src = mac_at(frame, 6)?;
    let ty = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    match ty {
        ETH_TYPE_ARP => {
            let arp = frame.get(14..42)?;
            // htype Ethernet, ptype IPv4, hlen 6, plen 4.
            if arp[..6] != [0, 1, 0x08, 0x00, 6, 4] {
                return None;
            }
            let op = u16::from_be_bytes([arp[6], arp[7]]);
            let sha = mac_at(arp, 8)?;
            let spa = ip_at(arp, 14)?;
            // An ARP whose sender MAC is not the frame's source is relayed or forged.
            (sha == eth_src).then_some(Sender {
                mac: sha,
                ip: spa,
                arp_op: Some(op),
                eth_dst,
            })
        }
        ETH_TYPE_IPV4 => {
            let ip = frame.get(14..34)?;
            if ip[0] >> 4 != 4 {
                return None;
            }
            Some(Sender {
                mac: eth_src,
                ip: ip_at(ip, 12)?,
                arp_op: None,
                eth_dst,
            })
        }
        _ => None,
    }
}

/// Whether an address/MAC pair can be a host's own.
fn plausible(mac: MacAddr, ip: Ipv4Addr) -> bool {
    let multicast_mac = mac.0[0] & 1 == 1;
    !multicast_mac
        && mac.0 != [0; 6]
        && !ip.is_unspecified()
        && !ip.is_broadcast()
        && !ip.is_multicast()
        && !ip.is_loopback()
}

#[derive(Debug, Clone, Copy)]
pub struct LearnConfig {
    /// Most hosts kept; observations of further hosts are ignored.
    pub max_hosts: usize,
    /// A host moves at most once in this time.
    pub move_holddown: Duration,
}

impl Default for LearnConfig {
    fn default() -> Self {
        Self {
            max_hosts: 4096,
            move_holddown: Duration::from_secs(1),
        }
    }
}

/// What an observation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Nothing new (known host, same place), or ignored.
    Nothing,
    New(Host),
    Moved {
        from: PortRef,
        host: Host,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    host: Host,
    moved_at: Instant,
}

/// Learned hosts by IPv4 address.
#[derive(Debug, Clone, Default)]
pub struct Learned {
    cfg: LearnConfig,
    hosts: BTreeMap<Ipv4Addr, Entry>,
}

impl Learned {
    pub fn new(cfg: LearnConfig) -> Self {
        Self {
            cfg,
            hosts: BTreeMap::new(),
        }
    }

    /// Records that `mac`/`ip` sent a frame into edge port `at`.
    pub fn observe(&mut self, ip: Ipv4Addr, mac: MacAddr, at: PortRef, now: Instant) -> Learn {
        if !plausible(mac, ip) {
            return Learn::Nothing;
        }
        let host = Host { ip, mac, at };
        let full = self.hosts.len() >= self.cfg.max_hosts;
        match self.hosts.get_mut(&ip) {
            Some(e) if e.host == host => Learn::Nothing,
            Some(e) => {
                if now.saturating_duration_since(e.moved_at) < self.cfg.move_holddown {
                    return Learn::Nothing;
                }
                let from = e.host.at;
                *e = Entry {
                    host,
                    moved_at: now,
                };
                Learn::Moved { from, host }
            }
            None if full => Learn::Nothing,
            None => {
                self.hosts.insert(
                    ip,
                    Entry {
                        host,
                        moved_at: now,
                    },
                );
                Learn::New(host)
            }
        }
    }

    /// Adds a host read back from a switch (a restarted controller recovering what it had
    /// learned) unless the address is already known.
    pub fn recover(&mut self, host: Host, now: Instant) -> bool {
        if self.hosts.contains_key(&host.ip)
            || self.hosts.len() >= self.cfg.max_hosts
            || !plausible(host.mac, host.ip)
        {
            return false;
        }
        self.hosts.insert(
            host.ip,
            Entry {
                host,
                // Recovered hosts may move at once.
                moved_at: now.checked_sub(self.cfg.move_holddown).unwrap_or(now),
            },
        );
        true
    }

    /// Forgets hosts seen at `at`: the port carries a link, so they were passing through.
    pub fn drop_port(&mut self, at: PortRef) -> usize {
        let before = self.hosts.len();
        self.hosts.retain(|_, e| e.host.at != at);
        before - self.hosts.len()
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<&Host> {
        self.hosts.get(&ip).map(|e| &e.host)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values().map(|e| &e.host)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0xc6, 0x12, 3, 0x0b]);

    fn arp(op: u16, sha: MacAddr, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&sha.0);
        f.extend_from_slice(&ETH_TYPE_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sha.0);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&tpa);
        f
    }

    fn ipv4(src_mac: MacAddr, src: [u8; 4]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&src_mac.0);
        f.extend_from_slice(&ETH_TYPE_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&[198, 18, 3, 21]);
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn senders_of_arp_and_ipv4() {
        let s = parse_sender(&arp(1, MAC, [198, 18, 3, 11], [198, 18, 3, 21])).expect("arp");
        assert_eq!(
            (s.mac, s.ip, s.arp_op),
            (MAC, Ipv4Addr::new(198, 18, 3, 11), Some(1))
        );
        let s = parse_sender(&ipv4(MAC, [198, 18, 3, 11])).expect("ipv4");
        assert_eq!((s.ip, s.arp_op), (Ipv4Addr::new(198, 18, 3, 11), None));
        // Relayed ARP (sender MAC differs from the frame's source) teaches nothing.
        let mut relayed = arp(2, MAC, [198, 18, 3, 11], [0; 4]);
        relayed[6] = 0x04;
        assert_eq!(parse_sender(&relayed), None);
        // Truncations and other protocols never panic and yield nothing.
        let good = arp(1, MAC, [198, 18, 3, 11], [198, 18, 3, 21]);
        for cut in 0..good.len() {
            assert_eq!(parse_sender(&good[..cut]), None);
        }
        let mut v6 = ipv4(MAC, [1, 2, 3, 4]);
        v6[14] = 0x60;
        assert_eq!(parse_sender(&v6), None);
        let mut lldp = ipv4(MAC, [1, 2, 3, 4]);
        lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
        assert_eq!(parse_sender(&lldp), None);
    }

    #[test]
    fn learn_move_and_holddown() {
        let t0 = Instant::now();
        let mut l = Learned::new(LearnConfig {
            max_hosts: 2,
            move_holddown: Duration::from_secs(1),
        });
        let ip = Ipv4Addr::new(198, 18, 3, 11);
        let a = PortRef::new(0x31, 1);
        let b = PortRef::new(0x34, 4);
        assert!(matches!(l.observe(ip, MAC, a, t0), Learn::New(h) if h.at == a));
        assert_eq!(l.observe(ip, MAC, a, t0), Learn::Nothing);
        // Too soon after the last change: ignored.
        assert_eq!(
            l.observe(ip, MAC, b, t0 + Duration::from_millis(500)),
            Learn::Nothing
        );
        let later = t0 + Duration::from_secs(2);
        assert!(matches!(
            l.observe(ip, MAC, b, later),
            Learn::Moved { from, host } if from == a && host.at == b
        ));
        assert_eq!(l.get(ip).map(|h| h.at), Some(b));
        // Implausible senders and a full table.
        assert_eq!(
            l.observe(Ipv4Addr::UNSPECIFIED, MAC, a, later),
            Learn::Nothing
        );
        assert_eq!(
            l.observe(
                Ipv4Addr::new(198, 18, 3, 12),
                MacAddr([1, 0, 0, 0, 0, 1]),
                a,
                later
            ),
            Learn::Nothing
        );
        assert!(matches!(
            l.observe(Ipv4Addr::new(198, 18, 3, 12), MAC, a, later),
            Learn::New(_)
        ));
        assert_eq!(
            l.observe(Ipv4Addr::new(198, 18, 3, 13), MAC, a, later),
            Learn::Nothing
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l.drop_port(a), 1);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn recovered_hosts_do_not_override_learned_ones() {
        let t0 = Instant::now();
        let mut l = Learned::new(LearnConfig::default());
        let ip = Ipv4Addr::new(198, 18, 3, 11);
        let h = Host {
            ip,
            mac: MAC,
            at: PortRef::new(1, 1),
        };
        assert!(l.recover(h, t0));
        assert!(!l.recover(
            Host {
                at: PortRef::new(2, 2),
                ..h
            },
            t0
        ));
        assert_eq!(l.get(ip), Some(&h));
        // A recovered host may move straight away.
        assert!(matches!(
            l.observe(ip, MAC, PortRef::new(3, 3), t0),
            Learn::Moved { .. }
        ));
    }
}
