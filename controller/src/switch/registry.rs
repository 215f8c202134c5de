//! Which connection speaks for which datapath id, and the rule for a second connection
//! that claims an id already held (sans-IO: the glue in [`super::server`] runs the probe).
//!
//! OpenFlow gives the controller nothing but the peer's own word for its datapath id, so
//! "the newest connection wins" lets anyone who reaches the port push a live switch off
//! the controller. Here a newcomer claiming a held id is only let in when the holder has
//! shown itself dead: the holder is probed (an ECHO_REQUEST with a short deadline); if it
//! answers, the newcomer is refused and counted; if it stays silent, it is replaced (a
//! switch that really restarted leaves exactly such a silent half-open connection).

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::topology::Dpid;

/// The connection that holds a datapath id, with whatever the glue needs to reach it.
#[derive(Debug, Clone)]
pub struct Holder<H> {
    pub conn_id: u64,
    pub peer: SocketAddr,
    pub handle: H,
}

/// Answer to a claim.
#[derive(Debug, Clone)]
pub enum Claim<H> {
    /// The id was free; the claimant holds it now.
    Granted,
    /// Another connection holds the id: probe it, then call [`Registry::settle`].
    Contested(Holder<H>),
}

/// The end of a contested claim.
#[derive(Debug, Clone)]
pub enum Settlement<H> {
    /// The claimant holds the id (the holder left while it was probed).
    Granted,
    /// The holder was silent: the claimant holds the id; close the returned old holder.
    Replaced(Holder<H>),
    /// The holder answered (or a third connection took the id meanwhile): close the
    /// claimant.
    Refused,
}

/// Datapath id → the connection speaking for it.
#[derive(Debug)]
pub struct Registry<H> {
    slots: HashMap<Dpid, Holder<H>>,
    refused: u64,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Self {
            slots: HashMap::new(),
            refused: 0,
        }
    }
}

impl<H: Clone> Registry<H> {
    /// `claimant` says it is `dpid`.
    pub fn claim(&mut self, dpid: Dpid, claimant: Holder<H>) -> Claim<H> {
        match self.slots.get(&dpid) {
            Some(holder) if holder.conn_id != claimant.conn_id => Claim::Contested(holder.clone()),
            _ => {
                self.slots.insert(dpid, claimant);
                Claim::Granted
            }
        }
    }

    /// Decides a contested claim once the holder `probed` answered (`alive`) or not.
    pub fn settle(
        &mut self,
        dpid: Dpid,
        claimant: Holder<H>,
        probed: u64,
        alive: bool,
    ) -> Settlement<H> {
        match self.slots.get(&dpid).map(|h| h.conn_id) {
            None => {
                self.slots.insert(dpid, claimant);
                Settlement::Granted
            }
            Some(current) if current == probed && !alive => {
                match self.slots.insert(dpid, claimant) {
                    Some(old) => Settlement::Replaced(old),
                    None => Settlement::Granted,
                }
            }
            Some(_) => {
                self.refused += 1;
                Settlement::Refused
            }
        }
    }
}

impl<H> Registry<H> {
    /// Frees `dpid` if `conn_id` still holds it; returns whether it did.
    pub fn release(&mut self, dpid: Dpid, conn_id: u64) -> bool {
        if self.slots.get(&dpid).is_some_and(|h| h.conn_id == conn_id) {
            self.slots.remove(&dpid);
            true
        } else {
            false
        }
    }

    /// The holder of `dpid`.
    pub fn get(&self, dpid: Dpid) -> Option<&Holder<H>> {
        self.slots.get(&dpid)
    }

    /// Held datapath ids, ascending.
    pub fn dpids(&self) -> Vec<Dpid> {
        let mut v: Vec<Dpid> = self.slots.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Claims refused because the holder was alive, since start.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(conn_id: u64) -> Holder<&'static str> {
        Holder {
            conn_id,
            peer: SocketAddr::from(([127, 0, 0, 1], 40000 + conn_id as u16)),
            handle: "h",
        }
    }

    fn holder_of(r: &Registry<&str>, dpid: Dpid) -> Option<u64> {
        r.get(dpid).map(|h| h.conn_id)
    }

    /// A registry in which connection 1 holds 0x51 and connection 2 has just claimed it.
    fn contested() -> Registry<&'static str> {
        let mut r = Registry::default();
        assert!(matches!(r.claim(0x51, conn(1)), Claim::Granted));
        assert!(matches!(r.claim(0x51, conn(2)), Claim::Contested(_)));
        r
    }

    #[test]
    fn free_id_is_granted_and_released_only_by_its_holder() {
        let mut r = Registry::default();
        assert!(matches!(r.claim(0x51, conn(1)), Claim::Granted));
        assert_eq!(r.dpids(), vec![0x51]);
        assert!(!r.release(0x51, 2));
        assert!(r.release(0x51, 1));
        assert!(r.dpids().is_empty());
    }

    #[test]
    fn live_holder_keeps_its_id_and_the_refusal_is_counted() {
        let mut r = Registry::default();
        r.claim(0x51, conn(1));
        let Claim::Contested(h) = r.claim(0x51, conn(2)) else {
            panic!("a held id must be contested");
        };
        assert_eq!(h.conn_id, 1);
        // Nothing changes before the probe's outcome.
        assert_eq!(holder_of(&r, 0x51), Some(1));
        assert!(matches!(
            r.settle(0x51, conn(2), 1, true),
            Settlement::Refused
        ));
        assert_eq!(holder_of(&r, 0x51), Some(1));
        assert_eq!(r.refused(), 1);
    }

    #[test]
    fn silent_holder_is_replaced() {
        let mut r = contested();
        let Settlement::Replaced(old) = r.settle(0x51, conn(2), 1, false) else {
            panic!("a silent holder must be replaced");
        };
        assert_eq!(old.conn_id, 1);
        assert_eq!(holder_of(&r, 0x51), Some(2));
        assert_eq!(r.refused(), 0);
        // The old connection's clean-up must not free the newcomer's slot.
        assert!(!r.release(0x51, 1));
        assert_eq!(holder_of(&r, 0x51), Some(2));
    }

    #[test]
    fn holder_gone_during_the_probe_grants() {
        let mut r = contested();
        r.release(0x51, 1);
        assert!(matches!(
            r.settle(0x51, conn(2), 1, false),
            Settlement::Granted
        ));
        assert_eq!(holder_of(&r, 0x51), Some(2));
    }

    #[test]
    fn third_connection_that_won_meanwhile_is_not_displaced() {
        // Two claimants probe the same holder; the first replaces it.
        let mut r = contested();
        assert!(matches!(r.claim(0x51, conn(3)), Claim::Contested(_)));
        assert!(matches!(
            r.settle(0x51, conn(2), 1, false),
            Settlement::Replaced(_)
        ));
        // The second's probe of the old holder says nothing about the new one.
        assert!(matches!(
            r.settle(0x51, conn(3), 1, false),
            Settlement::Refused
        ));
        assert_eq!(holder_of(&r, 0x51), Some(2));
    }
}
