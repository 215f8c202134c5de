//! Rules per switch for 1,000 replicated flows over the test bed's tree, rewrite mode
//! versus tunnel (VLAN) mode, straight from the planner (pure: no switch needed).
//!
//! `cargo run --release -p ncp-controller --example rules_per_switch`

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ncp_controller::openflow::{Ipv4Prefix, MacAddr};
use ncp_controller::planner::{Mode, Replication, plan};
use ncp_controller::topology::{Dpid, Host, PortRef, Topology};

/// The tree of testbed/tree.toml with its port numbers: hosts on leaf ports 1-2, leaf
/// uplinks on port 3, aggregation uplinks on port 1 and leaves on 2-3, core 1-2.
fn tree() -> Topology {
    let mut t = Topology::new();
    for d in [0x10, 0x21, 0x22, 0x31, 0x32, 0x33, 0x34] {
        t.add_switch(d);
    }
    let links: [(Dpid, u32, Dpid, u32); 6] = [
        (0x10, 1, 0x21, 1),
        (0x10, 2, 0x22, 1),
        (0x21, 2, 0x31, 3),
        (0x21, 3, 0x32, 3),
        (0x22, 2, 0x33, 3),
        (0x22, 3, 0x34, 3),
    ];
    for (a, pa, b, pb) in links {
        t.add_link(PortRef::new(a, pa), PortRef::new(b, pb))
            .expect("link");
    }
    for leaf in 1..=4u8 {
        for n in 1..=2u8 {
            let last = 10 * leaf + n;
            t.add_host(Host {
                ip: Ipv4Addr::new(198, 18, 3, last),
                mac: MacAddr([2, 0, 0xc6, 0x12, 3, last]),
                at: PortRef::new(0x30 + Dpid::from(leaf), u32::from(n)),
            })
            .expect("host");
        }
    }
    t
}

fn name(d: Dpid) -> &'static str {
    match d {
        0x10 => "core",
        0x21 => "agg1",
        0x22 => "agg2",
        0x31 => "leaf1",
        0x32 => "leaf2",
        0x33 => "leaf3",
        0x34 => "leaf4",
        _ => "?",
    }
}

fn main() {
    let topo = tree();
    let flows = |mode: Mode| -> Vec<Replication> {
        (0..1000u32)
            .map(|i| Replication {
                id: i + 1,
                // Two sources on leaf1, two primaries on leaf2, one middlebox on leaf3.
                source: Ipv4Prefix::host(Ipv4Addr::new(198, 18, 3, 11 + (i % 2) as u8)),
                source_port: None,
                primary: Ipv4Addr::new(198, 18, 3, 21 + ((i / 2) % 2) as u8),
                primary_port: 1000 + (i / 4) as u16,
                middlebox: Ipv4Addr::new(198, 18, 3, 31),
                mode,
            })
            .collect()
    };
    let mut table: BTreeMap<Dpid, [usize; 2]> = BTreeMap::new();
    for (col, mode) in [Mode::Rewrite, Mode::Vlan { vid: 31 }]
        .into_iter()
        .enumerate()
    {
        let t0 = std::time::Instant::now();
        let p = plan(&topo, &flows(mode));
        let took = t0.elapsed();
        assert!(p.failures.is_empty(), "{:?}", p.failures.first());
        for d in topo.switches() {
            table.entry(d).or_default()[col] = p.rules_for(d).len();
        }
        println!(
            "planned 1000 flows in {mode:?} mode in {took:?}: {} rules",
            p.rules.len()
        );
    }
    println!("\n{:<8} {:>8} {:>12}", "switch", "rewrite", "tunnel/vlan");
    for (d, [rw, tun]) in &table {
        println!("{:<8} {rw:>8} {tun:>12}", name(*d));
    }
    let (rw, tun): (usize, usize) = table.values().fold((0, 0), |(a, b), [x, y]| (a + x, b + y));
    println!("{:<8} {rw:>8} {tun:>12}", "total");
}
