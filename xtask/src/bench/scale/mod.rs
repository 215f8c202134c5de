//! Scale: 1,000 and 10,000 concurrent sessions through one middlebox worker, per data plane.
//! For each count the source opens that many connections to the primary through the
//! middlebox (one replica, on the dedicated replication NIC), and the experiment reports
//! the middlebox's resident memory before and with every session open (memory per
//! session), how long opening took, the aggregate throughput with every connection
//! sending a fixed amount, and whether the replica received exactly what the primary did.
//! Closing every connection must bring the middlebox back to zero sessions.

mod load;

pub use load::sink_main;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ncp_testbed::Testbed;

use super::{
    Options,
    routes::{self, Replication, Route, Tuning},
    save_json,
};
use crate::{cmd::step, middlebox::Middlebox};
use load::{Clients, Sink};
use ncp_testbed::Netns;

const PORT: u16 = 7000;
/// Connections sending at the same time in the throughput phase (see [`Clients::send`]).
/// Measured on the test bed (64 KiB each, 10,000 sessions, XDP): 4 and 8 lose almost no
/// segments and give the same throughput; 16 lose one in 500, 32 one in 100, and each
/// loss costs its connection a retransmission timeout, so throughput drops.
const SENDERS_AT_ONCE: usize = 8;
const SESSIONS: [usize; 2] = [1_000, 10_000];
/// `[tcp] buffer_bytes` of the XDP data plane here: 16 KiB receive and 16 KiB send buffer
/// per connection, three connections per session (client, primary, replica), so 10,000
/// sessions hold about 1 GB of them instead of the 4 GB the 64 KiB default would take.
const TCP_BUFFER: usize = 16 * 1024;
/// Ports the middlebox owns on each interface for its upstream connections (XDP mode): one
/// per session on each NIC, with room for the previous run's ports still lingering.
const PORTS: (u16, u16) = (20_000, 39_999);

/// What one (data plane, sessions) run measured.
struct Measured {
    workers: u64,
    rss_before: u64,
    rss_open: u64,
    rss_after_traffic: u64,
    open_secs: f64,
    send_secs: f64,
    primary_bytes: u64,
    replica_bytes: u64,
    /// CPU seconds the middlebox used while the bytes were sent.
    cpu_secs: Option<f64>,
    /// TCP segments the source's kernel retransmitted meanwhile (losses on the way in).
    client_retransmits: Option<u64>,
    close_secs: f64,
}

pub fn scale(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    let bytes_each: usize = if options.quick { 16 * 1024 } else { 64 * 1024 };
    let most = SESSIONS.iter().copied().max().unwrap_or(0);
    // This process holds one descriptor per client connection, each sink one per
    // session, and the sockets-mode middlebox (which inherits the limit) three.
    let nofile = load::raise_nofile()?;
    // One source port per client connection, and the previous run's linger in TIME-WAIT
    // for a minute: more than the default range holds.
    bed.exec(
        "source",
        &["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"],
    )?;
    let hosts = Hosts {
        source: Netns::open(&bed.netns("source")?)?,
        primary_at: SocketAddr::from((bed.address("primary", "eth0")?, PORT)),
        replica_at: SocketAddr::from((bed.address("replica", "eth1")?, PORT)),
    };
    let tuning = tuning(most);

    let mut cells: Vec<(String, usize, Result<Measured, String>)> = Vec::new();
    for dataplane in &options.dataplanes {
        let route = Route::Middlebox {
            dataplane: dataplane.clone(),
            replication: Replication::DedicatedNic,
        };
        let mut largest = 0;
        for wanted in SESSIONS {
            let need = descriptors_needed(dataplane, wanted);
            let n = if need <= nofile {
                wanted
            } else {
                let skipped = format!(
                    "not run: needs about {need} open files in one process and RLIMIT_NOFILE \
                     is {nofile} here (raising it needs CAP_SYS_RESOURCE)"
                );
                eprintln!("==> scale: {dataplane}, {wanted} sessions {skipped}");
                cells.push((dataplane.clone(), wanted, Err(skipped)));
                // Instead, the most sessions the limit allows, in whole thousands.
                let fits =
                    (nofile.saturating_sub(SLACK_FILES) / per_session_files(dataplane) / 1000
                        * 1000) as usize;
                if fits <= largest {
                    continue;
                }
                fits
            };
            largest = n;
            step(&format!(
                "scale: {dataplane}, {n} sessions, {} KiB each",
                bytes_each / 1024
            ));
            // One failed run is reported in its row, not fatal: the others still tell.
            let result = measure(bed, bins, &route, &tuning, &hosts, n, bytes_each)
                .map_err(|e| format!("failed: {e:#}"));
            if let Err(e) = &result {
                eprintln!("      {e}");
            }
            cells.push((dataplane.clone(), n, result));
        }
    }
    routes::leave(bed)?;

    let md = report(&cells, bytes_each);
    let json: Vec<serde_json::Value> = cells
        .iter()
        .map(|(dataplane, n, result)| {
            let mut cell = serde_json::json!({ "dataplane": dataplane, "sessions": n });
            match result {
                Ok(m) => {
                    cell["measured"] = serde_json::json!({
                        "workers": m.workers,
                        "rss_before_bytes": m.rss_before,
                        "rss_open_bytes": m.rss_open,
                        "rss_after_traffic_bytes": m.rss_after_traffic,
                        "bytes_per_session_open": per_session(m.rss_open, m.rss_before, *n),
                        "bytes_per_session_after_traffic": per_session(m.rss_after_traffic, m.rss_before, *n),
                        "open_seconds": m.open_secs,
                        "send_seconds": m.send_secs,
                        "throughput_bps": throughput_bps(m),
                        "primary_bytes": m.primary_bytes,
                        "replica_bytes": m.replica_bytes,
                        "middlebox_cpu_seconds_sending": m.cpu_secs,
                        "client_retransmitted_segments": m.client_retransmits,
                        "close_seconds": m.close_secs,
                    });
                }
                Err(e) => cell["error"] = e.clone().into(),
            }
            cell
        })
        .collect();
    save_json(
        options,
        "scale",
        &serde_json::json!({
            "bytes_per_connection": bytes_each,
            "tcp_buffer_bytes": TCP_BUFFER,
            "owned_ports": [PORTS.0, PORTS.1],
            "cells": json,
        }),
    )?;
    eprint!("{md}");
    Ok(md)
}

/// The client's namespace and the servers' addresses.
struct Hosts {
    source: Netns,
    primary_at: SocketAddr,
    replica_at: SocketAddr,
}

/// Open files the most demanding process of a run holds per session: the sockets-mode
/// middlebox three (client, primary and replica socket), else the clients or a sink one.
fn per_session_files(dataplane: &str) -> u64 {
    if dataplane == "sockets" { 3 } else { 1 }
}

/// Open files a process needs besides its sessions' (listeners, pipes, epoll, maps).
const SLACK_FILES: u64 = 256;

fn descriptors_needed(dataplane: &str, sessions: usize) -> u64 {
    per_session_files(dataplane) * sessions as u64 + SLACK_FILES
}

/// The middlebox settings that let `most` sessions in.
fn tuning(most: usize) -> Tuning {
    // Admission reserves each session's worst case (its primary or replica budget plus its
    // response budget: about 5 MiB with the defaults), not what it uses; the cap only has
    // to admit every session, it bounds nothing this experiment measures.
    let max_sessions = most + most / 10;
    let max_buffer_bytes = max_sessions as u64 * (8 << 20);
    Tuning {
        ports: Some(PORTS),
        top: String::new(),
        service: String::new(),
        tables: format!(
            "[limits]\nmax_sessions = {max_sessions}\nmax_buffer_bytes = {max_buffer_bytes}\n\
             [tcp]\nbuffer_bytes = {TCP_BUFFER}\n"
        ),
    }
}

/// One run: a fresh middlebox and fresh sinks, `n` sessions opened, `bytes_each` sent on
/// each, all closed again.
fn measure(
    bed: &Testbed,
    bins: &Path,
    route: &Route,
    tuning: &Tuning,
    hosts: &Hosts,
    n: usize,
    bytes_each: usize,
) -> anyhow::Result<Measured> {
    let primary = Sink::start(bed, "primary", hosts.primary_at)?;
    let replica = Sink::start(bed, "replica", hosts.replica_at)?;
    let mut mb = route
        .enter(bed, bins, PORT, tuning)?
        .context("the route has no middlebox")?;
    // Let start-up finish its allocations before the baseline is taken.
    std::thread::sleep(Duration::from_secs(1));
    let rss = |mb: &Middlebox| mb.rss_bytes().context("reading the middlebox's VmRSS");
    let rss_before = rss(&mb)?;

    let started = Instant::now();
    let mut clients = Clients::open(
        &hosts.source,
        hosts.primary_at,
        n,
        started + Duration::from_secs(30) + Duration::from_millis(20) * n as u32,
        |k| eprintln!("      {k} of {n} client connections established"),
    )
    .with_context(|| match sessions(&mb) {
        Ok((active, refused)) => format!("middlebox: {active} sessions active, {refused} refused"),
        Err(e) => format!("middlebox stats unavailable: {e:#}"),
    })?;
    let target = n as u64;
    wait_for(
        &format!("{n} sessions open"),
        Instant::now() + Duration::from_secs(30),
        STATS_INTERVAL,
        || {
            let (active, refused) = sessions(&mb)?;
            let status = format!(
                "middlebox: {active} sessions active, {refused} refused; connections at the \
                 primary: {}, at the replica: {}",
                primary.open(),
                replica.open()
            );
            Ok((
                active >= target && primary.open() >= target && replica.open() >= target,
                status,
            ))
        },
    )?;
    let open_secs = started.elapsed().as_secs_f64();
    let rss_open = rss(&mb)?;
    let workers = mb
        .stats()
        .ok()
        .and_then(|s| s["replication"]["workers"].as_u64())
        .unwrap_or(0);
    eprintln!(
        "      {n} sessions open in {open_secs:.1} s; RSS {} → {} MiB",
        mib(rss_before),
        mib(rss_open)
    );

    let expected = n as u64 * bytes_each as u64;
    let cpu_before = mb.cpu_seconds();
    let retrans_before = retransmitted(bed, "source");
    let sending = Instant::now();
    let send_budget = Duration::from_secs(30) + Duration::from_micros(expected / 10);
    clients.send(bytes_each, SENDERS_AT_ONCE, sending + send_budget)?;
    // Checked often: the moment the last byte arrives ends the throughput measurement.
    wait_for(
        "every byte at the primary",
        sending + send_budget,
        BYTES_INTERVAL,
        || {
            let got = primary.bytes();
            Ok((
                got >= expected,
                format!("primary has {got} of {expected} bytes"),
            ))
        },
    )?;
    let send_secs = sending.elapsed().as_secs_f64();
    let cpu_secs = cpu_before.zip(mb.cpu_seconds()).map(|(a, b)| b - a);
    let client_retransmits = retrans_before
        .zip(retransmitted(bed, "source"))
        .map(|(a, b)| b.saturating_sub(a));
    // The replica is never waited for by the middlebox, so it may finish later; a
    // shortfall is a result (reported), not a failure of the run.
    let _ = wait_for(
        "every byte at the replica",
        Instant::now() + Duration::from_secs(30),
        BYTES_INTERVAL,
        || {
            let got = replica.bytes();
            Ok((
                got >= expected,
                format!("replica has {got} of {expected} bytes"),
            ))
        },
    );
    let (primary_bytes, replica_bytes) = (primary.bytes(), replica.bytes());
    let rss_after_traffic = rss(&mb)?;
    eprintln!(
        "      {} MB in {send_secs:.2} s at the primary ({} segments retransmitted by the \
         clients); replica {}; RSS {} MiB",
        expected / 1_000_000,
        client_retransmits.map_or("?".to_owned(), |r| r.to_string()),
        if replica_bytes == primary_bytes {
            "the same".to_owned()
        } else {
            format!("{replica_bytes} of {primary_bytes} bytes")
        },
        mib(rss_after_traffic)
    );

    let closing = Instant::now();
    let held = clients.len();
    drop(clients);
    wait_for(
        &format!("the {held} sessions to close"),
        closing + Duration::from_secs(30) + Duration::from_millis(10) * n as u32,
        STATS_INTERVAL,
        || {
            let (active, _) = sessions(&mb)?;
            let status = format!(
                "middlebox: {active} sessions active; connections at the primary: {}, at the \
                 replica: {}",
                primary.open(),
                replica.open()
            );
            Ok((
                active == 0 && primary.open() == 0 && replica.open() == 0,
                status,
            ))
        },
    )?;
    let close_secs = closing.elapsed().as_secs_f64();
    mb.stop();
    primary.stop()?;
    replica.stop()?;
    Ok(Measured {
        workers,
        rss_before,
        rss_open,
        rss_after_traffic,
        open_secs,
        send_secs,
        primary_bytes,
        replica_bytes,
        cpu_secs,
        client_retransmits,
        close_secs,
    })
}

/// `RetransSegs` of `host`'s TCP statistics (`/proc/net/snmp` is per namespace).
fn retransmitted(bed: &Testbed, host: &str) -> Option<u64> {
    let out = bed.exec(host, &["cat", "/proc/net/snmp"]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Two "Tcp:" lines: the field names, then the values.
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let at = names.split_whitespace().position(|f| f == "RetransSegs")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Sessions active and refused, summed over the middlebox's workers.
fn sessions(mb: &Middlebox) -> anyhow::Result<(u64, u64)> {
    let stats = mb.stats()?;
    let replication = &stats["replication"];
    Ok((
        replication["sessions_active"]
            .as_u64()
            .context("stats without replication.sessions_active")?,
        replication["sessions_refused"].as_u64().unwrap_or(0),
    ))
}

/// How often a wait asks the middlebox for its counters (each time a process).
const STATS_INTERVAL: Duration = Duration::from_millis(100);
/// How often a wait looks at the sinks' byte counts (in memory, refreshed every 10 ms).
const BYTES_INTERVAL: Duration = Duration::from_millis(5);

/// Polls `check` (done?, status) every `every` until it says done; at `deadline` fails
/// with `what` and the last status. Shows the status every two seconds while it waits.
fn wait_for(
    what: &str,
    deadline: Instant,
    every: Duration,
    mut check: impl FnMut() -> anyhow::Result<(bool, String)>,
) -> anyhow::Result<()> {
    let mut shown = Instant::now();
    loop {
        let (done, status) = check()?;
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}: {status}");
        }
        if shown.elapsed() >= Duration::from_secs(2) {
            eprintln!("      {status}");
            shown = Instant::now();
        }
        std::thread::sleep(every);
    }
}

fn per_session(rss: u64, before: u64, n: usize) -> f64 {
    rss.saturating_sub(before) as f64 / n.max(1) as f64
}

fn throughput_bps(m: &Measured) -> f64 {
    m.primary_bytes as f64 * 8.0 / m.send_secs.max(1e-9)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

fn report(cells: &[(String, usize, Result<Measured, String>)], bytes_each: usize) -> String {
    let mut md = String::from("## Scale: concurrent sessions on one worker\n\n");
    let _ = writeln!(
        md,
        "One service with one replica on the dedicated replication NIC. The middlebox's \
         workers are pinned to one core: XDP mode has one worker serving both NICs; sockets \
         mode one relay thread (the replication NIC carries only the relay's own \
         connections to the replica, which the kernel routes).\n\n\
         - *Time to open*: from the first connect until the middlebox counts every session \
         and the primary and the replica each hold as many connections ({} client \
         handshakes at a time).\n\
         - *Memory*: the middlebox process's VmRSS before opening, with every session open, \
         and after the traffic (buffers touched); per session = growth / sessions. XDP mode \
         runs with `[tcp] buffer_bytes = {TCP_BUFFER}` (receive and send buffer per \
         connection; three connections per session). Sockets mode's socket buffers are \
         kernel memory, not in its RSS.\n\
         - *Throughput*: every connection sends {} KiB, {} connections at a time (the next \
         starts when the middlebox has acknowledged one's bytes: thousands of simultaneous \
         initial windows overflow the test bed's software switch, and the retransmission \
         backoff would be measured instead); bytes the primary received over the time from \
         the first write to the last byte. These are short transfers, mostly in slow start, \
         so compare them with each other rather than with the iperf table.\n\
         - Default service budgets; `[limits] max_sessions` and `max_buffer_bytes` high \
         enough to admit every session; a fresh middlebox per row. A run that cannot hold \
         its sessions within this machine's open-file limit says so and is replaced by the \
         most sessions that fit.\n",
        load::CONNECTS_IN_FLIGHT,
        bytes_each / 1024,
        SENDERS_AT_ONCE
    );
    let _ = writeln!(
        md,
        "| data plane | sessions | workers | time to open (s) | RSS before (MiB) | RSS growth, open (MiB) | per session, open (KiB) | per session, after traffic (KiB) | throughput (Gbit/s) | segments the clients retransmitted | middlebox CPU while sending (cores) | replica bytes equal |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (dataplane, n, result) in cells {
        match result {
            Ok(m) => {
                let cores = m.cpu_secs.map_or("—".to_owned(), |c| {
                    format!("{:.2}", c / m.send_secs.max(1e-9))
                });
                let equal = if m.replica_bytes == m.primary_bytes {
                    "yes".to_owned()
                } else {
                    format!("no ({} of {} bytes)", m.replica_bytes, m.primary_bytes)
                };
                let _ = writeln!(
                    md,
                    "| {dataplane} | {n} | {} | {:.1} | {} | {} | {:.1} | {:.1} | {:.3} | {} | {cores} | {equal} |",
                    m.workers,
                    m.open_secs,
                    mib(m.rss_before),
                    mib(m.rss_open.saturating_sub(m.rss_before)),
                    per_session(m.rss_open, m.rss_before, *n) / 1024.0,
                    per_session(m.rss_after_traffic, m.rss_before, *n) / 1024.0,
                    throughput_bps(m) / 1e9,
                    m.client_retransmits
                        .map_or("—".to_owned(), |r| r.to_string()),
                );
            }
            Err(e) => {
                let _ = writeln!(
                    md,
                    "| {dataplane} | {n} | {} ||||||||||",
                    e.replace('|', "/")
                );
            }
        }
    }
    md.push('\n');
    md
}
