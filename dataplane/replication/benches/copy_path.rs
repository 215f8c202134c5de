//! Throughput of the session copy path: client bytes in, out to the primary and to one
//! replica, as the I/O layer would drive it (offer a read, then hand each destination
//! its pending slices). Reported in (decimal) MB/s or GB/s of client stream.

// Benchmark code: a failed unwrap is a broken benchmark.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ncp_replication::{Session, SessionConfig, Side};

const STREAM_BYTES: usize = 8 << 20;

/// Pushes `STREAM_BYTES` through a session in `read`-sized client reads; each destination
/// takes up to `write` bytes per socket call.
fn copy_stream(replicas: u16, read: usize, write: usize) -> u64 {
    let now = Instant::now();
    let config = SessionConfig {
        replica_count: replicas,
        idle_timeout: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    let mut s = Session::new(config, now).unwrap();
    s.on_connected(Side::Primary, now).unwrap();
    for i in 0..replicas {
        s.on_connected(Side::Replica(i), now).unwrap();
    }
    while s.poll_action().is_some() {}
    let input = vec![0xa5u8; read];
    let mut sides = vec![Side::Primary];
    sides.extend((0..replicas).map(Side::Replica));
    let mut sink = 0u64;
    let mut offered = 0;
    while offered < STREAM_BYTES {
        offered += s.on_data(Side::Client, &input, now).unwrap();
        for &side in &sides {
            loop {
                let p = s.pending(side);
                if p.is_empty() {
                    break;
                }
                let n = p.len().min(write);
                // Stand-in for the socket copy.
                sink = sink.wrapping_add(u64::from(black_box(&p[..n])[n - 1]));
                s.on_sent(side, n, now).unwrap();
            }
        }
    }
    // The work really happened: every destination got the whole stream.
    assert_eq!(s.stats().primary_bytes_out, offered as u64);
    assert!(
        s.stats()
            .replica_bytes_out
            .iter()
            .all(|&b| b == offered as u64)
    );
    sink
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_path");
    g.throughput(Throughput::BytesDecimal(STREAM_BYTES as u64));
    g.sample_size(20);
    g.bench_function("primary_only_64k_reads", |b| {
        b.iter(|| copy_stream(0, 64 * 1024, 64 * 1024))
    });
    g.bench_function("primary_and_1_replica_64k_reads", |b| {
        b.iter(|| copy_stream(1, 64 * 1024, 64 * 1024))
    });
    g.bench_function("primary_and_1_replica_1460b_reads_segments", |b| {
        b.iter(|| copy_stream(1, 1460, 1460))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
