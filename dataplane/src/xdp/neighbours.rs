//! Next hops of a worker's upstreams, resolved through the kernel's neighbour table.
//!
//! The AF_XDP devices do L2 themselves and never speak ARP. A client's MAC is learned
//! from its SYN. For the primaries and replicas the worker asks the kernel (an empty UDP
//! datagram to the discard port makes it ARP; the reply reaches the kernel because the
//! XDP program passes ARP) and copies the entry from `/proc/net/arp` (this namespace's
//! table) into the device, so the first SYN upstream has a MAC to go to. An upstream still
//! unknown when a session connects to it is resolved the same way in the background;
//! smoltcp's SYN retransmission covers the wait.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use crate::{
    engine::EngineDevice,
    xdp::device::{MacAddr, XskDevice},
    xdp::transport::Link,
};

/// How often an unresolved next hop is looked up in the kernel's neighbour table, how
/// often the kernel is asked again to resolve it, and when we stop trying.
pub const NEIGHBOUR_CHECK: Duration = Duration::from_millis(20);
const NEIGHBOUR_RETRIGGER: Duration = Duration::from_secs(1);
const NEIGHBOUR_GIVE_UP: Duration = Duration::from_secs(30);

/// A device's neighbour table, so upstream next hops can be seeded before the first SYN.
pub trait Neighbours {
    /// The MAC known for `ip`.
    fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr>;
    /// Records how to reach `ip`.
    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr);
}

impl Neighbours for XskDevice {
    fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        XskDevice::neighbour(self, ip)
    }
    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        XskDevice::learn(self, ip, mac);
    }
}

/// An upstream next hop whose MAC a device does not know yet.
#[derive(Debug)]
struct Unresolved {
    /// Index of the device (the worker's link).
    device: usize,
    ip: Ipv4Addr,
    since: Instant,
    triggered: Instant,
    next_check: Instant,
}

/// The next hops being resolved for a worker's devices, identified by index (its links).
#[derive(Debug, Default)]
pub struct Resolver {
    unresolved: Vec<Unresolved>,
}

impl Resolver {
    /// Whether every wanted next hop is known (or given up on).
    pub fn is_done(&self) -> bool {
        self.unresolved.is_empty()
    }

    /// When the next check is due, if one is.
    pub fn next_check(&self) -> Option<Instant> {
        self.unresolved.iter().map(|u| u.next_check).min()
    }

    /// Makes sure `device` (number `index`) will know `ip`'s MAC: if it does not yet, the
    /// kernel is asked to resolve it and its neighbour table is watched.
    pub fn want(&mut self, index: usize, device: &impl Neighbours, ip: Ipv4Addr, now: Instant) {
        if device.neighbour(ip).is_some()
            || self
                .unresolved
                .iter()
                .any(|u| u.device == index && u.ip == ip)
        {
            return;
        }
        trigger_kernel_resolution(ip);
        self.unresolved.push(Unresolved {
            device: index,
            ip,
            since: now,
            triggered: now,
            next_check: now,
        });
    }

    /// Copies what the kernel has resolved meanwhile into the links' devices.
    pub fn check<D: EngineDevice + Neighbours>(&mut self, now: Instant, links: &mut [Link<D>]) {
        let mut table: Option<Vec<(Ipv4Addr, MacAddr, String)>> = None;
        self.unresolved.retain_mut(|u| {
            if u.next_check > now {
                return true;
            }
            let Some(link) = links.get_mut(u.device) else {
                return false;
            };
            let interface = link.interface.as_str();
            let dev = link.engine.device_mut();
            if dev.neighbour(u.ip).is_some() {
                return false; // learned from a frame meanwhile
            }
            let entries = table.get_or_insert_with(kernel_neighbours);
            let found = entries
                .iter()
                .find(|(ip, _, name)| *ip == u.ip && *name == interface);
            if let Some((ip, mac, _)) = found {
                dev.learn(*ip, *mac);
                tracing::debug!(%ip, %interface, "next hop seeded from the kernel's neighbour table");
                return false;
            }
            if now.duration_since(u.since) >= NEIGHBOUR_GIVE_UP {
                tracing::warn!(ip = %u.ip, %interface, "giving up resolving a next hop");
                return false;
            }
            if now.duration_since(u.triggered) >= NEIGHBOUR_RETRIGGER {
                trigger_kernel_resolution(u.ip);
                u.triggered = now;
            }
            u.next_check = now + NEIGHBOUR_CHECK;
            true
        });
    }

    /// The next hops still unresolved: (device index, address).
    pub fn pending(&self) -> impl Iterator<Item = (usize, Ipv4Addr)> + '_ {
        self.unresolved.iter().map(|u| (u.device, u.ip))
    }
}

/// Asks the kernel to resolve `ip`'s link-layer address: an empty UDP datagram to the
/// discard port makes it ARP for the next hop (the reply reaches the kernel, as the XDP
/// program passes ARP). Chosen over running ARP in the data plane: the kernel already
/// owns the interface's address and its neighbour table, and this needs no raw socket.
/// The datagram itself is harmless (discard port; at worst an ICMP port unreachable).
fn trigger_kernel_resolution(ip: Ipv4Addr) {
    let sent = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| s.send_to(&[], (ip, 9)));
    if let Err(e) = sent {
        tracing::debug!(%ip, error = %e, "could not trigger neighbour resolution");
    }
}

/// The kernel's complete IPv4 neighbour entries of this network namespace, from
/// `/proc/net/arp`: (address, MAC, device).
fn kernel_neighbours() -> Vec<(Ipv4Addr, MacAddr, String)> {
    match std::fs::read_to_string("/proc/net/arp") {
        Ok(text) => parse_proc_arp(&text),
        Err(e) => {
            tracing::debug!(error = %e, "reading /proc/net/arp");
            Vec::new()
        }
    }
}

/// ATF_COM: the entry is complete (has a MAC).
const ATF_COM: u32 = 0x2;

fn parse_proc_arp(text: &str) -> Vec<(Ipv4Addr, MacAddr, String)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let ip: Ipv4Addr = f.next()?.parse().ok()?;
            let _hw_type = f.next()?;
            let flags = u32::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
            let mac = parse_mac(f.next()?)?;
            let _mask = f.next()?;
            let dev = f.next()?.to_owned();
            (flags & ATF_COM != 0 && mac != [0; 6]).then_some((ip, mac, dev))
        })
        .collect()
}

fn parse_mac(text: &str) -> Option<MacAddr> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_arp_keeps_complete_entries_only() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    198.18.1.2       0x1         0x2         02:00:c6:12:01:02     *        eth0\n\
                    198.18.2.3       0x1         0x0         00:00:00:00:00:00     *        eth1\n\
                    198.18.2.9       0x1         0x6         02:00:c6:12:02:09     *        eth1\n\
                    garbage line\n";
        let entries = parse_proc_arp(text);
        assert_eq!(
            entries,
            vec![
                (
                    Ipv4Addr::new(198, 18, 1, 2),
                    [2, 0, 0xc6, 0x12, 1, 2],
                    "eth0".to_owned()
                ),
                (
                    Ipv4Addr::new(198, 18, 2, 9),
                    [2, 0, 0xc6, 0x12, 2, 9],
                    "eth1".to_owned()
                ),
            ]
        );
        assert_eq!(parse_mac("02:00:c6:12:01"), None);
        assert_eq!(parse_mac("02:00:c6:12:01:02:03"), None);
    }
}
