//! Criterion micro-benchmarks of the data plane's per-frame paths: the worker-side frame
//! classification (Ethernet/VLAN/IPv4 parse that feeds the TCP stack and the neighbour
//! table) and the software model of the redirect-rule match.

use std::{
    hint::black_box,
    net::{Ipv4Addr, SocketAddrV4},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ncp_dataplane::{
    frame::{TcpFrameSpec, tcp_frame},
    rules::RedirectRule,
    xdp::device::parse_rx,
};

/// An ACK from a client to an iperf3 server.
fn spec() -> TcpFrameSpec {
    TcpFrameSpec::local(
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 1), 40000),
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 5201),
        0x10,
    )
}

fn classification(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    group.throughput(Throughput::Elements(1));
    let small = tcp_frame(&spec(), &[]);
    let full = tcp_frame(&spec(), &[0x5a; 1460]);
    group.bench_function("parse_rx/ack", |b| b.iter(|| parse_rx(black_box(&small))));
    group.bench_function("parse_rx/1460B", |b| b.iter(|| parse_rx(black_box(&full))));
    let rules: Vec<RedirectRule> = (0..1024u16)
        .map(|i| RedirectRule {
            id: u32::from(i),
            source: "198.18.1.0/24".parse().expect("prefix"),
            source_port: None,
            destination: Ipv4Addr::new(198, 18, 1, 2),
            destination_port: 10_000 + i,
        })
        .collect();
    let src = Ipv4Addr::new(198, 18, 1, 1);
    let dst = Ipv4Addr::new(198, 18, 1, 2);
    group.bench_function("rule_match/linear_1024", |b| {
        b.iter(|| {
            rules
                .iter()
                .any(|r| r.matches(black_box(src), 40000, black_box(dst), 11_023))
        })
    });
    group.finish();
}

fn frame_building(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.throughput(Throughput::Bytes(1514));
    group.bench_function("tcp_frame/1460B", |b| {
        b.iter(|| tcp_frame(black_box(&spec()), black_box(&[0x5a; 1460])))
    });
    group.finish();
}

criterion_group!(benches, classification, frame_building);
criterion_main!(benches);
