//! `ncp-replay`: replays recorded NCP sessions (pcapng files from the offline recorder, or
//! any pcapng capture of TCP/IPv4) into a target server.
//!
//! ```text
//! # everything the recorder wrote, as recorded, into a replica
//! ncp-replay /var/lib/ncp/rec-*.pcapng --to 198.18.0.20:6379
//! # one service's sessions of one client subnet, ten times faster, machine-readable
//! ncp-replay rec-*.pcapng --to 198.18.0.20:6379 --service kv --client 198.18.1.0/24 \
//!     --pace factor:10 --json
//! # the first five minutes, as fast as the target takes it
//! ncp-replay rec-*.pcapng --to 127.0.0.1:6379 --until +300 --pace fast
//! ```
//!
//! Exit status: 0 when everything was intact and every session replayed cleanly, 1 when a
//! recording was damaged (its intact part was still replayed) or a session failed, 2 on
//! bad arguments.

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use ncp_dataplane::offline::replay::{
    self, Filter, Outcome, Progress, ReplayConfig, Summary, parse_pace, parse_prefix, parse_time,
};

/// Replay recorded sessions into a target server over TCP.
#[derive(Parser, Debug)]
#[command(name = "ncp-replay", version)]
struct Args {
    /// Recordings, replayed in the order given (rotated files: pass them sorted).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Target HOST:PORT every session is sent to.
    #[arg(long)]
    to: String,
    /// original | fast | factor:N (N times faster than recorded).
    #[arg(long, default_value = "original", value_parser = parse_pace)]
    pace: replay::Pace,
    /// Only sessions that started at or after T (+SECS after the first session, Unix
    /// seconds, or YYYY-MM-DDTHH:MM:SSZ).
    #[arg(long, value_parser = parse_time)]
    from: Option<replay::TimeBound>,
    /// Only sessions that started before T (same forms as --from).
    #[arg(long, value_parser = parse_time)]
    until: Option<replay::TimeBound>,
    /// Only clients in this IPv4 prefix (a.b.c.d/len or a.b.c.d).
    #[arg(long, value_parser = parse_prefix)]
    client: Option<(std::net::Ipv4Addr, u8)>,
    /// Only sessions of this service.
    #[arg(long)]
    service: Option<String>,
    /// Sessions replayed at the same time at most.
    #[arg(long, default_value_t = 256)]
    max_sessions: usize,
    /// Seconds to wait for the target's last answers after a session's bytes are sent.
    #[arg(long, default_value_t = 5.0)]
    drain_timeout: f64,
    /// Print the summary (with per-session results) as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn resolve(to: &str) -> Result<SocketAddr, String> {
    to.to_socket_addrs()
        .map_err(|e| format!("--to {to}: {e}"))?
        .next()
        .ok_or_else(|| format!("--to {to}: no address"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let target = match resolve(&args.to) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ncp-replay: {e}");
            return ExitCode::from(2);
        }
    };
    if !(args.drain_timeout >= 0.0 && args.drain_timeout.is_finite()) {
        eprintln!("ncp-replay: --drain-timeout must be a non-negative number of seconds");
        return ExitCode::from(2);
    }
    let mut cfg = ReplayConfig::new(target);
    cfg.pace = args.pace;
    cfg.max_sessions = args.max_sessions.max(1);
    cfg.drain_timeout = Duration::from_secs_f64(args.drain_timeout);
    cfg.filter = Filter {
        from: args.from,
        until: args.until,
        client: args.client,
        service: args.service.clone(),
    };

    let progress = Arc::new(Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = {
        let progress = Arc::clone(&progress);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || report_progress(&progress, &stop))
    };
    let summary = replay::replay(&args.files, &cfg, progress);
    stop.store(true, Ordering::Release);
    let _ = reporter.join();

    print_summary(&summary, args.json);
    if summary.read_errors.is_empty() && summary.sessions_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A one-line progress bar on a terminal; a plain line every 5 s otherwise (logs, CI).
fn report_progress(p: &Progress, stop: &AtomicBool) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let period = if tty {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    };
    let mut last = Instant::now();
    let spinner = ['|', '/', '-', '\\'];
    let mut tick = 0usize;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() < period {
            continue;
        }
        last = Instant::now();
        let started = p.started.load(Ordering::Relaxed);
        let finished = p.finished.load(Ordering::Relaxed);
        let failed = p.failed.load(Ordering::Relaxed);
        let bytes = p.bytes_sent.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let rate = bytes as f64 / secs / 1e6;
        let line = format!(
            "sessions {finished}/{started} done ({failed} failed), {:.1} MB sent, {rate:.1} MB/s",
            bytes as f64 / 1e6
        );
        let mut err = std::io::stderr().lock();
        if tty {
            tick += 1;
            let _ = write!(err, "\r\x1b[2K{} {line}", spinner[tick % spinner.len()]);
        } else {
            let _ = writeln!(err, "ncp-replay: {line}");
        }
        let _ = err.flush();
    }
    if tty {
        let _ = write!(std::io::stderr(), "\r\x1b[2K");
    }
}

fn print_summary(s: &Summary, json: bool) {
    for e in &s.read_errors {
        eprintln!("ncp-replay: damaged recording: {e} (sessions before it were replayed)");
    }
    for r in &s.sessions {
        if r.outcome != Outcome::Ok {
            let service = if r.meta.service.is_empty() {
                "-"
            } else {
                &r.meta.service
            };
            eprintln!(
                "ncp-replay: session {} (service {service}, client {}, primary {}): {}; {} of {} bytes sent",
                r.index, r.meta.client, r.meta.primary, r.outcome, r.bytes_sent, r.bytes_recorded
            );
        }
    }
    if json {
        match serde_json::to_string_pretty(s) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("ncp-replay: cannot encode summary: {e}"),
        }
        return;
    }
    let mb = s.bytes_sent as f64 / 1e6;
    println!(
        "replayed {} sessions ({} failed, {} filtered out of {}), {} bytes in {:.2} s ({:.1} MB/s); {} answer bytes read",
        s.sessions_replayed,
        s.sessions_failed,
        s.sessions_filtered,
        s.sessions_seen,
        s.bytes_sent,
        s.seconds,
        mb / s.seconds.max(1e-9),
        s.answer_bytes
    );
    if s.sessions_incomplete > 0 {
        println!(
            "{} sessions were recorded incompletely (cut loose, unterminated, or begun in an earlier file)",
            s.sessions_incomplete
        );
    }
    if s.sessions_unlisted > 0 {
        println!("{} sessions not listed individually", s.sessions_unlisted);
    }
    if s.read_stats.gap_bytes > 0 || s.read_stats.orphan_segments > 0 {
        println!(
            "reader: {} bytes lost to sequence holes, {} segments outside any session",
            s.read_stats.gap_bytes, s.read_stats.orphan_segments
        );
    }
}
