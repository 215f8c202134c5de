//! Active discovery of hosts that a replication names but the controller has not seen.
//! Pure: the service says which addresses are missing and sends what this schedules.
//!
//! A replication added before its hosts sent any traffic cannot be planned: the
//! controller does not know where they are. Rather than wait for the client's first
//! session (which would then reach the primary unreplicated), the controller asks: an
//! ARP request for the address, sent by PACKET_OUT out of every edge port of every
//! switch (ports with no discovered link), from [`PROBE_MAC`] with sender address
//! 0.0.0.0 like the health probes (RFC 5227, so no host caches us). The host's kernel
//! answers to [`PROBE_MAC`], the rule that lifts health-probe replies brings the answer to
//! the controller, and host learning places the host at the port it came in on. The
//! replication is planned on the next reconcile run.
//!
//! Requests are bounded: at most [`SearchConfig::max_per_round`] addresses per round, one
//! PACKET_OUT per switch and address, and each address is asked again only after a
//! back-off that doubles from [`SearchConfig::first_retry`] up to
//! [`SearchConfig::max_retry`], for as long as a replication names it and it is unknown.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::health::{self, PROBE_MAC};
use crate::openflow::{MacAddr, Message, PortDesc, port};

/// Ethernet broadcast: a request for an address whose MAC we do not know.
const BROADCAST: MacAddr = MacAddr([0xff; 6]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchConfig {
    /// Wait before the second request for an address.
    pub first_retry: Duration,
    /// Longest wait between requests for an address.
    pub max_retry: Duration,
    /// Most addresses asked for in one round.
    pub max_per_round: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_millis(250),
            max_retry: Duration::from_secs(5),
            max_per_round: 16,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sought {
    next_at: Instant,
    /// Wait after the next request.
    backoff: Duration,
    requests: u32,
}

/// The addresses being searched for.
#[derive(Debug, Clone)]
pub struct Search {
    cfg: SearchConfig,
    sought: BTreeMap<Ipv4Addr, Sought>,
}

impl Search {
    pub fn new(cfg: SearchConfig) -> Self {
        Self {
            cfg,
            sought: BTreeMap::new(),
        }
    }

    /// Sets the addresses to search for: new ones are due at once, known ones keep their
    /// schedule, the rest (found, or no longer named) are forgotten.
    pub fn want(&mut self, missing: impl IntoIterator<Item = Ipv4Addr>, now: Instant) {
        let mut next = BTreeMap::new();
        for ip in missing {
            let s = self.sought.get(&ip).copied().unwrap_or(Sought {
                next_at: now,
                backoff: self.cfg.first_retry,
                requests: 0,
            });
            next.insert(ip, s);
        }
        self.sought = next;
    }

    /// The addresses to ask for now (at most [`SearchConfig::max_per_round`], the longest
    /// overdue first); each is scheduled again after its back-off, which then doubles.
    pub fn due(&mut self, now: Instant) -> Vec<Ipv4Addr> {
        let mut due: Vec<(Instant, Ipv4Addr)> = self
            .sought
            .iter()
            .filter(|(_, s)| s.next_at <= now)
            .map(|(ip, s)| (s.next_at, *ip))
            .collect();
        due.sort();
        due.truncate(self.cfg.max_per_round);
        let max = self.cfg.max_retry;
        due.into_iter()
            .filter_map(|(_, ip)| {
                let s = self.sought.get_mut(&ip)?;
                s.next_at = now + s.backoff;
                s.backoff = (s.backoff * 2).min(max);
                s.requests = s.requests.saturating_add(1);
                Some(ip)
            })
            .collect()
    }

    /// Requests sent for `ip` while it is sought; `None` when it is not.
    pub fn requests(&self, ip: Ipv4Addr) -> Option<u32> {
        self.sought.get(&ip).map(|s| s.requests)
    }

    /// When the next request is due, if any address is sought.
    pub fn next_due(&self) -> Option<Instant> {
        self.sought.values().map(|s| s.next_at).min()
    }
}

/// The PACKET_OUT asking for `ip` out of `edge_ports` of one switch; `None` when the
/// switch has no edge port.
pub fn request(ip: Ipv4Addr, edge_ports: &[u32]) -> Option<Message> {
    if edge_ports.is_empty() {
        return None;
    }
    Some(health::probe_out(ip, BROADCAST, edge_ports))
}

/// A switch's live physical ports that carry no discovered link (`link_ports`).
pub fn edge_ports(ports: &[PortDesc], link_ports: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = ports
        .iter()
        .filter(|p| p.port_no <= port::MAX && p.is_live() && !link_ports.contains(&p.port_no))
        .map(|p| p.port_no)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Whether an ARP sender is answering one of our requests (or health probes).
pub fn answers_us(eth_dst: MacAddr, arp_op: Option<u16>) -> bool {
    eth_dst == PROBE_MAC && arp_op == Some(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::parse_sender;
    use crate::openflow::Action;

    const H: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 11);
    const G: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 21);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg() -> SearchConfig {
        SearchConfig {
            first_retry: ms(250),
            max_retry: ms(1000),
            max_per_round: 16,
        }
    }

    #[test]
    fn requests_back_off_up_to_the_cap() {
        let t0 = Instant::now();
        let mut s = Search::new(cfg());
        s.want([H], t0);
        assert_eq!(s.requests(H), Some(0));
        assert_eq!(s.next_due(), Some(t0));
        // Due at once, then after 250, 500, 1000, 1000 ms.
        let mut sent_at = Vec::new();
        let mut t = t0;
        while t <= t0 + ms(4000) {
            if !s.due(t).is_empty() {
                sent_at.push(t.duration_since(t0));
            }
            t += ms(50);
        }
        assert_eq!(
            sent_at,
            vec![ms(0), ms(250), ms(750), ms(1750), ms(2750), ms(3750)]
        );
        assert_eq!(s.requests(H), Some(6));
        // Asking again for the same address keeps its schedule.
        s.want([H], t);
        assert!(s.due(t).is_empty());
        // Found (no longer missing): forgotten, nothing due.
        s.want([], t);
        assert_eq!(s.requests(H), None);
        assert_eq!(s.next_due(), None);
        assert!(s.due(t + ms(10_000)).is_empty());
    }

    #[test]
    fn rounds_are_bounded_longest_overdue_first() {
        let t0 = Instant::now();
        let mut s = Search::new(SearchConfig {
            max_per_round: 1,
            ..cfg()
        });
        s.want([G], t0);
        s.want([G, H], t0 + ms(10));
        assert_eq!(s.due(t0 + ms(20)), vec![G]);
        assert_eq!(s.due(t0 + ms(20)), vec![H]);
        assert!(s.due(t0 + ms(20)).is_empty());
    }

    #[test]
    fn the_request_is_a_broadcast_arp_probe_out_of_every_edge_port() {
        assert!(request(H, &[]).is_none());
        let Some(Message::PacketOut(po)) = request(H, &[1, 2]) else {
            panic!("packet out expected");
        };
        assert_eq!(po.actions, vec![Action::output(1), Action::output(2)]);
        let sender = parse_sender(&po.data).expect("arp");
        assert_eq!(sender.eth_dst, BROADCAST);
        assert_eq!((sender.mac, sender.ip), (PROBE_MAC, Ipv4Addr::UNSPECIFIED));
        assert_eq!(sender.arp_op, Some(1));
        assert_eq!(&po.data[38..42], &H.octets());
        assert!(answers_us(PROBE_MAC, Some(2)));
        assert!(!answers_us(PROBE_MAC, Some(1)));
        assert!(!answers_us(BROADCAST, Some(2)));
    }

    #[test]
    fn edge_ports_leave_out_links_reserved_and_down_ports() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let down = PortDesc {
            config: 1,
            ..PortDesc::new(4, mac, String::new())
        };
        let ports = [
            PortDesc::new(1, mac, String::new()),
            PortDesc::new(2, mac, String::new()),
            PortDesc::new(3, mac, String::new()),
            down,
            PortDesc::new(port::LOCAL, mac, String::new()),
        ];
        assert_eq!(edge_ports(&ports, &[3]), vec![1, 2]);
    }
}
