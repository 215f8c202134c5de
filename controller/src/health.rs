//! Middlebox health checks for fail-open. Pure: the service sends the probes this module
//! builds and reports the answers.
//!
//! **How a middlebox is probed, and why.** The controller runs in its own network
//! namespace (or on a management host) and usually cannot reach the data-plane addresses
//! of middleboxes at all: the switches can. So the probe travels through OpenFlow itself:
//! every interval the controller sends a PACKET_OUT with an ARP request for the
//! middlebox's address straight out of the middlebox's switch port (no flooding, no
//! dependence on any forwarding rule), from the reserved MAC [`PROBE_MAC`] and with sender
//! address 0.0.0.0 (an RFC 5227 probe, so the middlebox does not add us to its ARP cache).
//! The middlebox's kernel answers to [`PROBE_MAC`]; a rule on every switch
//! ([`crate::discovery::base_rules`]) lifts exactly those replies to the controller. A
//! middlebox that misses [`HealthConfig::failures`] probes in a row is *down*: the
//! service plans its replications out, which withdraws their redirect rules, and traffic
//! flows straight to the primary (fail-open). The first answer brings it back up and the
//! rules return.
//!
//! Alternatives we did not take: heartbeats from the middlebox to the REST API (the API
//! listens on the controller's loopback, which a middlebox in its own host or namespace
//! cannot reach, and a heartbeat needs an agent on the middlebox), and probing from
//! inside the middlebox's network namespace (possible only on a test bed). The OpenFlow
//! path needs nothing on the middlebox and tests the very port the redirect sends to.
//!
//! This checks that the middlebox host is on the network and its kernel answers, which is
//! what steering traffic to it needs. For a middlebox registered with a control address
//! the service also pings the NCP process there every interval
//! ([`crate::middlebox::ping`]); while that goes unanswered its ARP answers do not count,
//! so a crashed data plane on a live host fails open the same way.
//! With the defaults (300 ms, 3 failures) a silent middlebox is declared down after at
//! most about 1.2 s, and its redirects are gone a reconcile run later: inside the 3 s
//! the issue allows for withdrawal, with room for a loaded machine. The probes cost one
//! 60-byte frame per middlebox per interval.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::hosts::ETH_TYPE_ARP;
use crate::openflow::messages::NO_BUFFER;
use crate::openflow::{Action, MacAddr, Message, PacketOut, port};

/// Source MAC of health probes (locally administered, "NC" in the middle). Replies are
/// addressed to it.
pub const PROBE_MAC: MacAddr = MacAddr([0x02, 0x4e, 0x43, 0x00, 0x00, 0x01]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    /// Consecutive unanswered probes after which a middlebox is down.
    pub failures: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(300),
            failures: 3,
        }
    }
}

/// The ARP request probing `ip` (whose MAC is `mac`), padded to the Ethernet minimum.
pub fn probe_frame(ip: Ipv4Addr, mac: MacAddr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&PROBE_MAC.0);
    f.extend_from_slice(&ETH_TYPE_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&PROBE_MAC.0);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

/// The PACKET_OUT sending [`probe_frame`] for `ip` (MAC `mac`) out of `ports` of a
/// switch, straight from the controller (no forwarding rule involved).
pub fn probe_out(ip: Ipv4Addr, mac: MacAddr, ports: &[u32]) -> Message {
    Message::PacketOut(PacketOut {
        buffer_id: NO_BUFFER,
        in_port: port::CONTROLLER,
        actions: ports.iter().map(|p| Action::output(*p)).collect(),
        data: probe_frame(ip, mac),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BoxState {
    up: bool,
    outstanding: bool,
    misses: u32,
}

/// Health of every middlebox in use.
#[derive(Debug, Clone, Default)]
pub struct Health {
    failures: u32,
    boxes: BTreeMap<Ipv4Addr, BoxState>,
}

/// A middlebox whose state flipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub ip: Ipv4Addr,
    pub up: bool,
}

impl Health {
    pub fn new(cfg: HealthConfig) -> Self {
        Self {
            failures: cfg.failures.max(1),
            boxes: BTreeMap::new(),
        }
    }

    /// One probe round over the middleboxes in use (`wanted`): counts the probes of the
    /// last round that got no answer, forgets middleboxes no longer in use, and returns
    /// the state changes. The caller then probes every address in `wanted`. A middlebox
    /// new to the list starts up, so a restarted controller withdraws nothing until the
    /// middlebox has really missed its probes.
    pub fn round(&mut self, wanted: &[Ipv4Addr]) -> Vec<Change> {
        self.boxes.retain(|ip, _| wanted.contains(ip));
        let mut changes = Vec::new();
        for ip in wanted {
            let b = self.boxes.entry(*ip).or_insert(BoxState {
                up: true,
                outstanding: false,
                misses: 0,
            });
            if b.outstanding {
                b.misses = b.misses.saturating_add(1);
                if b.up && b.misses >= self.failures {
                    b.up = false;
                    changes.push(Change { ip: *ip, up: false });
                }
            }
            b.outstanding = true;
        }
        changes
    }

    /// An answer from `ip`.
    pub fn answered(&mut self, ip: Ipv4Addr) -> Option<Change> {
        let b = self.boxes.get_mut(&ip)?;
        b.outstanding = false;
        b.misses = 0;
        if b.up {
            None
        } else {
            b.up = true;
            Some(Change { ip, up: true })
        }
    }

    /// Unknown middleboxes count as up.
    pub fn is_up(&self, ip: Ipv4Addr) -> bool {
        self.boxes.get(&ip).is_none_or(|b| b.up)
    }

    pub fn down(&self) -> Vec<Ipv4Addr> {
        self.boxes
            .iter()
            .filter(|(_, b)| !b.up)
            .map(|(ip, _)| *ip)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::parse_sender;

    const MB: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 31);

    #[test]
    fn probe_is_an_rfc5227_arp_request_to_the_middlebox() {
        let mac = MacAddr([2, 0, 0xc6, 0x12, 3, 0x1f]);
        let f = probe_frame(MB, mac);
        assert_eq!(f.len(), 60);
        let s = parse_sender(&f).expect("arp");
        assert_eq!(s.mac, PROBE_MAC);
        assert_eq!(s.ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(s.arp_op, Some(1));
        assert_eq!(s.eth_dst, mac);
        assert_eq!(&f[38..42], &MB.octets());
    }

    #[test]
    fn down_after_threshold_and_up_on_first_answer() {
        let mut h = Health::new(HealthConfig {
            interval: Duration::from_millis(100),
            failures: 3,
        });
        let wanted = [MB];
        assert!(h.round(&wanted).is_empty());
        assert_eq!(h.answered(MB), None, "answered while up: no change");
        assert!(h.round(&wanted).is_empty()); // probe 2 out
        assert!(h.round(&wanted).is_empty()); // miss 1
        assert!(h.round(&wanted).is_empty()); // miss 2
        assert!(h.is_up(MB));
        assert_eq!(h.round(&wanted), vec![Change { ip: MB, up: false }]);
        assert!(!h.is_up(MB));
        assert_eq!(h.down(), vec![MB]);
        assert!(h.round(&wanted).is_empty(), "reported once");
        assert_eq!(h.answered(MB), Some(Change { ip: MB, up: true }));
        assert!(h.is_up(MB));
        // Forgotten when no longer in use; unknown counts as up.
        h.round(&[]);
        assert!(h.is_up(MB));
        assert_eq!(h.answered(MB), None);
    }
}
