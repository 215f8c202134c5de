//! Whether the kernel of the middlebox's own host may pick the ports the workers use for
//! their upstream connections.
//!
//! The workers connect upstream from the interface's address and its configured port
//! range, and the XDP program steers every answer to those ports away from the kernel.
//! A kernel connection from the same address (an operator's `curl`, a monitoring agent,
//! the sockets data plane of an earlier run) that draws one of those ports as its
//! ephemeral port then loses its answers to the workers. And the servers keep the
//! kernel's closed connections in TIME-WAIT with the kernel's timestamp clock: a worker's
//! SYN on the same four-tuple, stamped from a different clock, is answered with an ACK
//! instead of a SYN-ACK and the connection waits a whole SYN retransmission (1 s). Both
//! are avoided by reserving the range (`net.ipv4.ip_local_reserved_ports`), which the
//! middlebox checks at start. The arithmetic is here, without I/O; the runtime reads
//! `/proc` and logs.

use crate::config::PortRange;

/// The ports of `ours` that the kernel may hand out as ephemeral ports: inside its
/// ephemeral range and not reserved. Returns how many there are and the first of them.
pub fn unreserved_ephemeral(
    ours: PortRange,
    ephemeral: PortRange,
    reserved: &[PortRange],
) -> Option<(u32, u16)> {
    let mut open = (ours.first.max(ephemeral.first)..=ours.last.min(ephemeral.last))
        .filter(|&port| !reserved.iter().any(|r| r.contains(port)));
    let first = open.next()?;
    Some((u32::try_from(open.count() + 1).unwrap_or(u32::MAX), first))
}

/// Parses `net.ipv4.ip_local_port_range` ("32768\t60999").
pub fn parse_port_range(text: &str) -> Option<PortRange> {
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(first)), Some(Ok(last)), None) => range(first, last),
        _ => None,
    }
}

/// Parses `net.ipv4.ip_local_reserved_ports` ("", "40000-49999,50100"). A malformed
/// list is `None`, so the caller can say it could not tell instead of guessing.
pub fn parse_reserved(text: &str) -> Option<Vec<PortRange>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|item| {
            let item = item.trim();
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            range(first.parse().ok()?, last.parse().ok()?)
        })
        .collect()
}

/// A range, if it is one (first not after last).
fn range(first: u16, last: u16) -> Option<PortRange> {
    (first <= last).then_some(PortRange { first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: PortRange = PortRange {
        first: 40000,
        last: 49999,
    };
    /// Linux's default ephemeral range.
    const LINUX: PortRange = PortRange {
        first: 32768,
        last: 60999,
    };

    #[test]
    fn the_default_range_inside_linuxs_ephemeral_range_clashes_until_reserved() {
        let linux = parse_port_range("32768\t60999\n");
        assert_eq!(linux, range(32768, 60999));
        let linux = linux.expect("parsed");
        assert_eq!(unreserved_ephemeral(OURS, linux, &[]), Some((10000, 40000)));
        let reserved = parse_reserved("40000-49999\n").expect("parsed");
        assert_eq!(unreserved_ephemeral(OURS, linux, &reserved), None);
    }

    #[test]
    fn a_partly_reserved_or_partly_ephemeral_range_counts_only_the_open_ports() {
        let reserved = parse_reserved("40000-40099,40100,45000-49999").expect("parsed");
        assert_eq!(
            unreserved_ephemeral(OURS, LINUX, &reserved),
            Some((4899, 40101))
        );
        // The kernel hands out only up to 44999 here.
        assert_eq!(
            unreserved_ephemeral(OURS, range(32768, 44999).expect("range"), &[]),
            Some((5000, 40000))
        );
    }

    #[test]
    fn a_range_outside_the_ephemeral_ports_is_safe() {
        let high = PortRange {
            first: 61000,
            last: 65535,
        };
        assert_eq!(unreserved_ephemeral(high, LINUX, &[]), None);
    }

    #[test]
    fn malformed_sysctl_text_is_none_not_a_guess() {
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_reserved("40000-"), None);
        assert_eq!(parse_reserved("50-40"), None);
        assert_eq!(parse_reserved("x"), None);
        assert_eq!(parse_reserved(" \n"), Some(Vec::new()));
        assert_eq!(
            parse_reserved("7"),
            Some(vec![PortRange { first: 7, last: 7 }])
        );
    }
}
