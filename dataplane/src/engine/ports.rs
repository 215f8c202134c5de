//! Local ports for outgoing connections, taken from the range the data plane owns (the
//! XDP program steers answers to those ports back to the workers, and the kernel is kept
//! off them).

use std::collections::HashSet;

use crate::config::PortRange;

/// Hands out each port of a range at most once until it is released.
#[derive(Debug)]
pub(crate) struct PortAllocator {
    first: u16,
    last: u16,
    /// Where the next search starts: round robin, so a port just released is not reused
    /// at once (a peer may still hold the old connection's state).
    next: u16,
    used: HashSet<u16>,
}

impl PortAllocator {
    pub(crate) fn new(range: PortRange) -> Self {
        let (first, last) = if range.first <= range.last {
            (range.first, range.last)
        } else {
            (range.last, range.first)
        };
        // Port 0 cannot be bound: start at 1 when the range includes it.
        let first = first.max(1);
        Self {
            first,
            last: last.max(first),
            next: first,
            used: HashSet::new(),
        }
    }

    /// A free port, or `None` when every port of the range is in use.
    pub(crate) fn alloc(&mut self) -> Option<u16> {
        let span = u32::from(self.last - self.first) + 1;
        for _ in 0..span {
            let port = self.next;
            self.next = if port >= self.last {
                self.first
            } else {
                port + 1
            };
            if self.used.insert(port) {
                return Some(port);
            }
        }
        None
    }

    /// Gives a port back.
    pub(crate) fn release(&mut self, port: u16) {
        self.used.remove(&port);
    }

    /// Ports in use.
    pub(crate) fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_each_port_once_round_robin() {
        let mut ports = PortAllocator::new(PortRange {
            first: 100,
            last: 102,
        });
        assert_eq!(ports.alloc(), Some(100));
        assert_eq!(ports.alloc(), Some(101));
        assert_eq!(ports.alloc(), Some(102));
        assert_eq!(ports.alloc(), None);
        ports.release(101);
        assert_eq!(ports.alloc(), Some(101));
        ports.release(100);
        ports.release(102);
        assert_eq!(
            ports.alloc(),
            Some(102),
            "continues after the last port handed out"
        );
        assert_eq!(ports.in_use(), 2);
    }

    #[test]
    fn whole_range_and_port_zero() {
        let mut ports = PortAllocator::new(PortRange {
            first: 0,
            last: u16::MAX,
        });
        assert_eq!(ports.alloc(), Some(1));
        let mut one = PortAllocator::new(PortRange {
            first: u16::MAX,
            last: u16::MAX,
        });
        assert_eq!(one.alloc(), Some(u16::MAX));
        assert_eq!(one.alloc(), None);
    }
}
