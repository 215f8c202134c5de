//! Host learning from PACKET_INs (ARP and IPv4) at edge ports. Pure: the service feeds it
//! frames with the port they arrived on and asks where hosts are.
//!
//! A port is an *edge* port when LLDP discovery knows no link on it; only frames arriving
//! on edge ports teach anything, because a frame on a link port is just passing through.
//! Right after a switch connects, LLDP has not had the time to find its links, so the
//! service says which ports it trusts yet ([`crate::settle`]); what arrives at other ports
//! waits as a candidate and becomes a host only once its port is trusted. Hosts and
//! candidates at a port that turns out to carry a link are dropped
//! ([`Learned::drop_port`]).
//!
//! A host seen at a different edge port than before has *moved*; the caller re-plans. To
//! keep a spoofing or mis-wired host from making a real one flap, a host moves at most
//! once per [`LearnConfig::move_holddown`]. A host that stays silent for
//! [`LearnConfig::expiry`] (no frame copied to the controller, no packet counted by its
//! known-host rule) is forgotten ([`Learned::expire`]). Hosts pinned by the operator
//! always win over learned ones (the service merges them, pins first). The table is
//! bounded.

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
    /// A learned host not heard from for this long is asked whether it is still there
    /// (an ARP request out of its port) and forgotten unless it answers within
    /// `answer_within`; `None` keeps hosts until they move or their port turns out to
    /// carry a link.
    pub expiry: Option<Duration>,
    /// How long a silent host has to answer before it is forgotten.
    pub answer_within: Duration,
}

impl Default for LearnConfig {
    fn default() -> Self {
        Self {
            max_hosts: 4096,
            move_holddown: Duration::from_secs(1),
            expiry: Some(Duration::from_secs(300)),
            answer_within: Duration::from_secs(1),
        }
    }
}

/// What an observation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Nothing new (known host, same place), ignored, or held back until its port is
    /// trusted (see [`Learned::promote`]).
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
    /// Last sign of life: an observation, or traffic counted by its known-host rule.
    seen_at: Instant,
    /// Packets its known-host rule had counted at the last look.
    packets: Option<u64>,
    /// When it was asked whether it is still there, since it was last heard.
    asked_at: Option<Instant>,
}

impl Entry {
    fn new(host: Host, moved_at: Instant, now: Instant) -> Self {
        Self {
            host,
            moved_at,
            seen_at: now,
            packets: None,
            asked_at: None,
        }
    }

    /// Not heard from for `expiry` (never, without one).
    fn silent(&self, expiry: Option<Duration>, now: Instant) -> bool {
        expiry.is_some_and(|x| now.saturating_duration_since(self.seen_at) >= x)
    }

    fn alive(&mut self, now: Instant) {
        self.seen_at = now;
        self.asked_at = None;
    }
}

/// What [`Learned::expire`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Silent hosts to ask whether they are still there (an ARP request out of their
    /// port); an answer keeps them.
    pub ask: Vec<Host>,
    /// Hosts forgotten: silent, and no answer in time.
    pub gone: Vec<Host>,
}

/// How a host made itself heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Its own traffic (ARP or IPv4).
    Traffic,
    /// Its answer to the controller's ARP request (see [`crate::search`]).
    Answer,
}

impl Heard {
    pub fn describe(self) -> &'static str {
        match self {
            Heard::Traffic => "from its traffic",
            Heard::Answer => "from its answer to an ARP request",
        }
    }
}

/// An observation at a port not yet trusted to be an edge port.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    mac: MacAddr,
    at: PortRef,
    seen_at: Instant,
    heard: Heard,
}

/// Learned hosts by IPv4 address.
///
/// Observations at a port the caller does not trust yet (its switch or the topology has
/// not settled, see [`crate::settle`]) are held as candidates, never as hosts: a frame on
/// a port that LLDP has not yet found to carry a link may be transit traffic. A candidate
/// becomes a host when its port is trusted ([`Learned::promote`]) and is dropped when
/// the port turns out to carry a link ([`Learned::drop_port`]).
#[derive(Debug, Clone, Default)]
pub struct Learned {
    cfg: LearnConfig,
    hosts: BTreeMap<Ipv4Addr, Entry>,
    candidates: BTreeMap<Ipv4Addr, Candidate>,
}

impl Learned {
    pub fn new(cfg: LearnConfig) -> Self {
        Self {
            cfg,
            hosts: BTreeMap::new(),
            candidates: BTreeMap::new(),
        }
    }

    /// Records that `mac`/`ip` sent a frame into edge port `at`, heard as `heard` (kept
    /// with a candidate until it is promoted); `trusted` says whether that port may be
    /// believed to be an edge port yet.
    pub fn observe(
        &mut self,
        ip: Ipv4Addr,
        mac: MacAddr,
        at: PortRef,
        now: Instant,
        trusted: bool,
        heard: Heard,
    ) -> Learn {
        if !plausible(mac, ip) {
            return Learn::Nothing;
        }
        let host = Host { ip, mac, at };
        if let Some(e) = self.hosts.get_mut(&ip)
            && e.host == host
        {
            e.alive(now);
            self.candidates.remove(&ip);
            return Learn::Nothing;
        }
        if !trusted {
            // Bounded like the table: a known address, or room for one more.
            if self.candidates.contains_key(&ip) || self.candidates.len() < self.cfg.max_hosts {
                self.candidates.insert(
                    ip,
                    Candidate {
                        mac,
                        at,
                        seen_at: now,
                        heard,
                    },
                );
            }
            return Learn::Nothing;
        }
        self.candidates.remove(&ip);
        let full = self.hosts.len() >= self.cfg.max_hosts;
        match self.hosts.get_mut(&ip) {
            Some(e) => {
                if now.saturating_duration_since(e.moved_at) < self.cfg.move_holddown {
                    return Learn::Nothing;
                }
                let from = e.host.at;
                *e = Entry::new(host, now, now);
                Learn::Moved { from, host }
            }
            None if full => Learn::Nothing,
            None => {
                self.hosts.insert(ip, Entry::new(host, now, now));
                Learn::New(host)
            }
        }
    }

    /// Turns the candidates whose port is now trusted into hosts (new or moved, as
    /// [`Learned::observe`] would) and returns what changed, with how each was heard.
    /// Candidates older than `max_age` are dropped: what they saw is too old to place a
    /// host on.
    pub fn promote(
        &mut self,
        now: Instant,
        max_age: Duration,
        trusted: impl Fn(PortRef) -> bool,
    ) -> Vec<(Learn, Heard)> {
        self.candidates
            .retain(|_, c| now.saturating_duration_since(c.seen_at) <= max_age);
        let ready: Vec<(Ipv4Addr, Candidate)> = self
            .candidates
            .iter()
            .filter(|(_, c)| trusted(c.at))
            .map(|(ip, c)| (*ip, *c))
            .collect();
        ready
            .into_iter()
            .map(|(ip, c)| (self.observe(ip, c.mac, c.at, now, true, c.heard), c.heard))
            .filter(|(l, _)| *l != Learn::Nothing)
            .collect()
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
        // Recovered hosts may move at once.
        let moved_at = now.checked_sub(self.cfg.move_holddown).unwrap_or(now);
        self.hosts.insert(host.ip, Entry::new(host, moved_at, now));
        true
    }

    /// Forgets hosts and candidates seen at `at`: the port carries a link, so what came
    /// in there was passing through. Returns the forgotten hosts.
    pub fn drop_port(&mut self, at: PortRef) -> Vec<Host> {
        self.candidates.retain(|_, c| c.at != at);
        let gone: Vec<Host> = self
            .hosts
            .values()
            .filter(|e| e.host.at == at)
            .map(|e| e.host)
            .collect();
        for h in &gone {
            self.hosts.remove(&h.ip);
        }
        gone
    }

    /// Hosts silent for the expiry time and not asked yet: the caller looks at their
    /// known-host rules' counters ([`Learned::counted`]) before [`Learned::expire`].
    pub fn silent(&self, now: Instant) -> Vec<Host> {
        self.hosts
            .values()
            .filter(|e| e.asked_at.is_none() && e.silent(self.cfg.expiry, now))
            .map(|e| e.host)
            .collect()
    }

    /// The packet count of `ip`'s known-host rule (its IPv4 traffic, which the switch
    /// no longer copies to the controller). Growth since the last look is a sign of
    /// life; so is the first look at a rule that counted anything (it was installed
    /// after the host was learned). A smaller count is a re-created rule: the new
    /// baseline.
    pub fn counted(&mut self, ip: Ipv4Addr, packets: u64, now: Instant) {
        let Some(e) = self.hosts.get_mut(&ip) else {
            return;
        };
        let grew = match e.packets {
            Some(before) => packets > before,
            None => packets > 0,
        };
        if grew {
            e.alive(now);
        }
        e.packets = Some(packets);
    }

    /// Silent hosts not asked yet are to be asked now; those asked at least
    /// [`LearnConfig::answer_within`] ago without an answer are forgotten.
    pub fn expire(&mut self, now: Instant) -> Expiry {
        let wait = self.cfg.answer_within;
        let mut out = Expiry::default();
        for e in self.hosts.values_mut() {
            if !e.silent(self.cfg.expiry, now) {
                continue;
            }
            match e.asked_at {
                None => {
                    e.asked_at = Some(now);
                    out.ask.push(e.host);
                }
                Some(t) if now.saturating_duration_since(t) >= wait => out.gone.push(e.host),
                Some(_) => {}
            }
        }
        for h in &out.gone {
            self.hosts.remove(&h.ip);
        }
        out
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<&Host> {
        self.hosts.get(&ip).map(|e| &e.host)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values().map(|e| &e.host)
    }

    /// Observations held until their port is trusted.
    pub fn candidates(&self) -> usize {
        self.candidates.len()
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
            expiry: None,
            answer_within: Duration::from_secs(1),
        });
        let ip = Ipv4Addr::new(198, 18, 3, 11);
        let a = PortRef::new(0x31, 1);
        let b = PortRef::new(0x34, 4);
        assert!(
            matches!(l.observe(ip, MAC, a, t0, true, Heard::Traffic), Learn::New(h) if h.at == a)
        );
        assert_eq!(
            l.observe(ip, MAC, a, t0, true, Heard::Traffic),
            Learn::Nothing
        );
        // Too soon after the last change: ignored.
        assert_eq!(
            l.observe(
                ip,
                MAC,
                b,
                t0 + Duration::from_millis(500),
                true,
                Heard::Traffic
            ),
            Learn::Nothing
        );
        let later = t0 + Duration::from_secs(2);
        assert!(matches!(
            l.observe(ip, MAC, b, later, true, Heard::Traffic),
            Learn::Moved { from, host } if from == a && host.at == b
        ));
        assert_eq!(l.get(ip).map(|h| h.at), Some(b));
        // Implausible senders and a full table.
        assert_eq!(
            l.observe(Ipv4Addr::UNSPECIFIED, MAC, a, later, true, Heard::Traffic),
            Learn::Nothing
        );
        assert_eq!(
            l.observe(
                Ipv4Addr::new(198, 18, 3, 12),
                MacAddr([1, 0, 0, 0, 0, 1]),
                a,
                later,
                true,
                Heard::Traffic
            ),
            Learn::Nothing
        );
        assert!(matches!(
            l.observe(
                Ipv4Addr::new(198, 18, 3, 12),
                MAC,
                a,
                later,
                true,
                Heard::Traffic
            ),
            Learn::New(_)
        ));
        assert_eq!(
            l.observe(
                Ipv4Addr::new(198, 18, 3, 13),
                MAC,
                a,
                later,
                true,
                Heard::Traffic
            ),
            Learn::Nothing
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l.drop_port(a).len(), 1);
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
            l.observe(ip, MAC, PortRef::new(3, 3), t0, true, Heard::Traffic),
            Learn::Moved { .. }
        ));
    }

    const H11: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 11);

    /// A clock start and an empty table with the default settings.
    fn learner() -> (Instant, Learned) {
        (Instant::now(), Learned::new(LearnConfig::default()))
    }

    /// A spine port toward a leaf, before LLDP has found the link there, and the host's
    /// own port on the leaf.
    const SPINE_TO_LEAF: PortRef = PortRef::new(0x51, 1);
    const LEAF_EDGE: PortRef = PortRef::new(0xa1, 3);

    #[test]
    fn untrusted_ports_place_no_host_until_trusted() {
        let (t0, mut l) = learner();
        let ip = H11;
        // The host's first frame arrives on the spine's port toward the leaf while the
        // topology is still settling: no host, only a candidate.
        assert_eq!(
            l.observe(ip, MAC, SPINE_TO_LEAF, t0, false, Heard::Traffic),
            Learn::Nothing
        );
        assert_eq!((l.len(), l.candidates()), (0, 1));
        // Still untrusted later: nothing promoted.
        let t1 = t0 + Duration::from_millis(300);
        assert!(l.promote(t1, Duration::from_secs(5), |_| false).is_empty());
        // LLDP finds the link there: the candidate is gone, no host was ever placed.
        assert!(l.drop_port(SPINE_TO_LEAF).is_empty());
        assert_eq!(l.candidates(), 0);
        assert!(l.promote(t1, Duration::from_secs(5), |_| true).is_empty());
        // The host heard at its real port once that is trusted.
        assert_eq!(
            l.observe(ip, MAC, LEAF_EDGE, t1, false, Heard::Traffic),
            Learn::Nothing
        );
        let t2 = t0 + Duration::from_secs(1);
        let got = l.promote(t2, Duration::from_secs(5), |p| p == LEAF_EDGE);
        assert!(matches!(got.as_slice(), [(Learn::New(h), Heard::Traffic)] if h.at == LEAF_EDGE));
        // How a candidate was heard survives its promotion.
        let other = Ipv4Addr::new(198, 18, 3, 12);
        l.observe(other, MAC, LEAF_EDGE, t2, false, Heard::Answer);
        let got = l.promote(t2, Duration::from_secs(5), |_| true);
        assert!(matches!(got.as_slice(), [(Learn::New(_), Heard::Answer)]));
        assert_eq!(l.get(ip).map(|h| h.at), Some(LEAF_EDGE));
    }

    #[test]
    fn a_known_host_does_not_move_onto_an_untrusted_port() {
        let (t0, mut l) = learner();
        let ip = H11;
        assert!(matches!(
            l.observe(ip, MAC, LEAF_EDGE, t0, true, Heard::Traffic),
            Learn::New(_)
        ));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            l.observe(ip, MAC, SPINE_TO_LEAF, t1, false, Heard::Traffic),
            Learn::Nothing
        );
        assert_eq!(l.get(ip).map(|h| h.at), Some(LEAF_EDGE));
        // Seen again at home: the candidate elsewhere is void.
        assert_eq!(
            l.observe(ip, MAC, LEAF_EDGE, t1, false, Heard::Traffic),
            Learn::Nothing
        );
        assert!(l.promote(t1, Duration::from_secs(5), |_| true).is_empty());
        // Old candidates are dropped rather than promoted.
        l.observe(ip, MAC, SPINE_TO_LEAF, t1, false, Heard::Traffic);
        let late = t1 + Duration::from_secs(6);
        assert!(l.promote(late, Duration::from_secs(5), |_| true).is_empty());
        assert_eq!(l.candidates(), 0);
    }

    #[test]
    fn a_host_learned_on_a_port_later_found_to_be_a_link_is_forgotten() {
        let (t0, mut l) = learner();
        let ip = H11;
        let other = Ipv4Addr::new(198, 18, 3, 12);
        l.observe(ip, MAC, SPINE_TO_LEAF, t0, true, Heard::Traffic);
        l.observe(other, MAC, LEAF_EDGE, t0, true, Heard::Traffic);
        let gone = l.drop_port(SPINE_TO_LEAF);
        assert_eq!(gone.iter().map(|h| h.ip).collect::<Vec<_>>(), vec![ip]);
        assert_eq!(l.get(ip), None);
        assert!(l.get(other).is_some());
        // Learned afresh at its real port, as a new host (no hold-down applies).
        assert!(matches!(
            l.observe(ip, MAC, LEAF_EDGE, t0, true, Heard::Traffic),
            Learn::New(_)
        ));
    }

    #[test]
    fn silent_hosts_are_asked_then_expire_unless_they_answer_or_their_rule_counts() {
        let t0 = Instant::now();
        let mut l = Learned::new(LearnConfig {
            expiry: Some(Duration::from_secs(60)),
            answer_within: Duration::from_secs(1),
            ..LearnConfig::default()
        });
        let a = Ipv4Addr::new(198, 18, 3, 11);
        let b = Ipv4Addr::new(198, 18, 3, 12);
        let c = Ipv4Addr::new(198, 18, 3, 13);
        let ips = |v: &[Host]| v.iter().map(|h| h.ip).collect::<Vec<_>>();
        l.observe(a, MAC, LEAF_EDGE, t0, true, Heard::Traffic);
        l.observe(b, MAC, PortRef::new(0xa1, 4), t0, true, Heard::Traffic);
        l.observe(c, MAC, PortRef::new(0xa1, 5), t0, true, Heard::Traffic);
        let t1 = t0 + Duration::from_secs(59);
        assert!(l.silent(t1).is_empty());
        assert_eq!(l.expire(t1), Expiry::default());
        // An observation (an ARP copied to the controller) is a sign of life.
        l.observe(a, MAC, LEAF_EDGE, t1, true, Heard::Traffic);
        let t2 = t0 + Duration::from_secs(61);
        assert_eq!(ips(&l.silent(t2)), vec![b, c]);
        // So is traffic counted by b's known-host rule (the first look at a rule that
        // counted packets); c's rule counted nothing: c is asked.
        l.counted(b, 7, t2);
        l.counted(c, 0, t2);
        let e = l.expire(t2);
        assert_eq!((ips(&e.ask), ips(&e.gone)), (vec![c], vec![]));
        assert!(l.silent(t2).is_empty(), "asked once");
        // Within the answer time nothing goes; after it, c goes.
        assert_eq!(l.expire(t2 + Duration::from_millis(900)), Expiry::default());
        let e = l.expire(t2 + Duration::from_secs(1));
        assert_eq!((ips(&e.ask), ips(&e.gone)), (vec![], vec![c]));
        assert_eq!(l.get(c), None);
        // b's counter does not grow: b is asked, answers (an observation at its port),
        // and stays; a is asked later and does not answer.
        let t3 = t2 + Duration::from_secs(60);
        l.counted(b, 7, t3);
        let e = l.expire(t3);
        assert_eq!(ips(&e.ask), vec![a, b]);
        l.observe(
            b,
            MAC,
            PortRef::new(0xa1, 4),
            t3 + Duration::from_millis(5),
            true,
            Heard::Traffic,
        );
        let e = l.expire(t3 + Duration::from_secs(1));
        assert_eq!((ips(&e.ask), ips(&e.gone)), (vec![], vec![a]));
        assert!(l.get(b).is_some());
        // Without an expiry nothing is ever silent.
        let mut keep = Learned::new(LearnConfig {
            expiry: None,
            ..LearnConfig::default()
        });
        keep.observe(a, MAC, LEAF_EDGE, t0, true, Heard::Traffic);
        assert_eq!(
            keep.expire(t0 + Duration::from_secs(86_400)),
            Expiry::default()
        );
    }
}
