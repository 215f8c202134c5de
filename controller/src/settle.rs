//! When the topology may be believed: a settle period after every change. Pure; the
//! service reports changes with the controller's clock and asks.
//!
//! LLDP finds a link only once the switches at both ends carry the rule that lifts
//! probes to the controller and a probe has crossed it, so for a moment after a switch
//! connects (or a port comes up) a port toward another switch looks like an edge port.
//! Two things wait for that moment to pass:
//! - host learning trusts a port ([`Settling::trusted`]) only once its switch has had
//!   its discovery rules for the settle period, the port has been up that long, and no
//!   switch or link has come or gone in that time;
//! - the reconcile plans only once the topology has been quiet for the settle period
//!   ([`Settling::wait`]), so a network that is still connecting is planned once,
//!   complete.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::topology::{Dpid, PortRef};

#[derive(Debug, Clone)]
pub struct Settling {
    settle: Duration,
    /// Since when each switch carries its discovery rules (and was probed after that).
    ready: BTreeMap<Dpid, Instant>,
    /// Ports that came up while their switch was connected, and when.
    ports_up: BTreeMap<PortRef, Instant>,
    /// The last switch or link that came or went.
    last_change: Option<Instant>,
}

impl Settling {
    pub fn new(settle: Duration) -> Self {
        Self {
            settle,
            ready: BTreeMap::new(),
            ports_up: BTreeMap::new(),
            last_change: None,
        }
    }

    /// A switch or link came or went.
    pub fn changed(&mut self, now: Instant) {
        self.last_change = Some(now);
    }

    /// `dpid` carries its discovery rules from `now` on; true the first time (the caller
    /// then probes, so links toward it are found at once).
    pub fn switch_ready(&mut self, dpid: Dpid, now: Instant) -> bool {
        if self.ready.contains_key(&dpid) {
            return false;
        }
        self.ready.insert(dpid, now);
        true
    }

    /// `dpid` left: it is not ready when it comes back.
    pub fn switch_gone(&mut self, dpid: Dpid, now: Instant) {
        self.ready.remove(&dpid);
        self.ports_up.retain(|p, _| p.dpid != dpid);
        self.changed(now);
    }

    /// A port came up: it may face a switch that LLDP has not seen yet.
    pub fn port_up(&mut self, at: PortRef, now: Instant) {
        self.ports_up.insert(at, now);
    }

    fn settled(&self, since: Option<Instant>, now: Instant) -> bool {
        since.is_none_or(|t| now.saturating_duration_since(t) >= self.settle)
    }

    /// Whether what arrives at `at` may place a host there: its switch has been ready,
    /// the port up, and the topology quiet, for the settle period.
    pub fn trusted(&self, at: PortRef, now: Instant) -> bool {
        let Some(ready) = self.ready.get(&at.dpid) else {
            return false;
        };
        self.settled(Some(*ready), now)
            && self.settled(self.ports_up.get(&at).copied(), now)
            && self.settled(self.last_change, now)
    }

    /// How much longer a reconcile should wait for a quiet topology; zero when it has
    /// been quiet for the settle period.
    pub fn wait(&self, now: Instant) -> Duration {
        match self.last_change {
            Some(t) => self.settle.saturating_sub(now.saturating_duration_since(t)),
            None => Duration::ZERO,
        }
    }

    pub fn settle(&self) -> Duration {
        self.settle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_millis(500);
    const SPINE: Dpid = 0x51;
    const LEAF: Dpid = 0xa1;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ports_are_trusted_once_their_switch_and_the_topology_settled() {
        let t0 = Instant::now();
        let mut s = Settling::new(SETTLE);
        let port = PortRef::new(SPINE, 1);
        // Not ready: never trusted.
        assert!(!s.trusted(port, t0 + ms(10_000)));
        s.changed(t0);
        assert!(s.switch_ready(SPINE, t0 + ms(100)));
        assert!(!s.switch_ready(SPINE, t0 + ms(200)), "ready once");
        assert!(!s.trusted(port, t0 + ms(599)));
        assert!(s.trusted(port, t0 + ms(600)));
        // A leaf connecting makes every port wait again: the spine's port toward it
        // may carry a link that LLDP has not reported yet.
        s.changed(t0 + ms(1000));
        assert!(!s.trusted(port, t0 + ms(1200)));
        assert!(s.trusted(port, t0 + ms(1500)));
        // A port that comes up waits on its own.
        s.port_up(PortRef::new(SPINE, 2), t0 + ms(2000));
        assert!(s.trusted(port, t0 + ms(2100)));
        assert!(!s.trusted(PortRef::new(SPINE, 2), t0 + ms(2100)));
        assert!(s.trusted(PortRef::new(SPINE, 2), t0 + ms(2500)));
        // A switch that leaves and comes back starts over.
        s.switch_gone(SPINE, t0 + ms(3000));
        assert!(!s.trusted(port, t0 + ms(9000)));
        assert!(s.switch_ready(SPINE, t0 + ms(9000)));
        assert!(!s.trusted(port, t0 + ms(9400)));
        assert!(s.trusted(port, t0 + ms(9500)));
        // Other switches are not ready merely because one is.
        assert!(!s.trusted(PortRef::new(LEAF, 1), t0 + ms(9500)));
    }

    #[test]
    fn reconcile_waits_for_a_quiet_topology() {
        let t0 = Instant::now();
        let mut s = Settling::new(SETTLE);
        assert_eq!(s.wait(t0), Duration::ZERO, "nothing happened yet");
        s.changed(t0);
        assert_eq!(s.wait(t0 + ms(100)), ms(400));
        s.changed(t0 + ms(300));
        assert_eq!(s.wait(t0 + ms(400)), ms(400));
        assert_eq!(s.wait(t0 + ms(800)), Duration::ZERO);
        assert_eq!(s.settle(), SETTLE);
    }
}
