//! Criterion micro-benchmarks of the OpenFlow hot paths: encoding the redirect FLOW_MOD
//! the installer sends per replication, and decoding a stream of them (what a reconcile
//! reads back in flow stats).

use std::{hint::black_box, net::Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ncp_controller::openflow::{
    Action, Decoder, FlowMod, Instruction, MacAddr, Message, encode,
    oxm::{Ipv4Prefix, Match, OxmField},
};

fn redirect_rule() -> Message {
    let matched = Match {
        eth_type: Some(0x0800),
        ip_proto: Some(6),
        ipv4_src: Some(Ipv4Prefix::new(Ipv4Addr::new(198, 18, 3, 0), 24)),
        ipv4_dst: Some(Ipv4Prefix::host(Ipv4Addr::new(198, 18, 3, 41))),
        tcp_dst: Some(6379),
        ..Match::default()
    };
    let actions = vec![
        Action::SetField(OxmField::EthDst(MacAddr([2, 0, 0xc6, 0x12, 3, 0x15]))),
        Action::output(3),
    ];
    Message::FlowMod(FlowMod::add(
        0x4e43_0001_0000_0007,
        40_000,
        matched,
        vec![Instruction::ApplyActions(actions)],
    ))
}

fn openflow(c: &mut Criterion) {
    let mut group = c.benchmark_group("openflow");
    let rule = redirect_rule();
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode/redirect_flow_mod", |b| {
        b.iter(|| encode(black_box(&rule), black_box(7)))
    });
    let stream: Vec<u8> = (0..1000).flat_map(|xid| encode(&rule, xid)).collect();
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decode/1000_flow_mods", |b| {
        b.iter(|| {
            let mut decoder = Decoder::new(65_535);
            decoder.feed(black_box(&stream));
            decoder.count()
        })
    });
    group.finish();
}

criterion_group!(benches, openflow);
criterion_main!(benches);
