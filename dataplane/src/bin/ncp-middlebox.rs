//! `ncp-middlebox`: the NCP middlebox data plane.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use ncp_dataplane::{
    config::{Config, DEFAULT_CONTROL_SOCKET, XdpAttachMode},
    control::{self, Request, Response, Stats},
    driver::consistency::ReplicaConsistency,
    rules::{Ipv4Prefix, RedirectRule},
    runtime,
    xdp::steering::Baseline,
};

/// The NCP middlebox: steers chosen TCP flows with XDP into AF_XDP sockets served by
/// per-core workers.
///
/// Typical use:
///   ncp-middlebox check --config mb.toml      # validate a configuration
///   ncp-middlebox run --config mb.toml        # run until SIGINT/SIGTERM
///   ncp-middlebox stats                        # XDP verdicts and worker counters
///   ncp-middlebox rule add --id 2 --source 198.18.1.0/24 --destination 198.18.1.2:5201
///   ncp-middlebox replica reset --service redis --replica 198.18.2.3:6379
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Attach to the configured interfaces and serve until SIGINT or SIGTERM.
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// `xdp`: XDP steering + AF_XDP workers. `sockets`: kernel TCP sockets behind an
        /// nftables redirect (fallback without AF_XDP; benchmark baseline).
        #[arg(long, value_enum, default_value_t = runtime::Mode::Xdp)]
        mode: runtime::Mode,
    },
    /// Attach a do-nothing XDP program (it passes every frame) to an interface until
    /// SIGINT or SIGTERM: measure your traffic with it, with `run` and with nothing, to
    /// tell what the interface pays for running XDP at all from what NCP's steering adds.
    XdpBaseline {
        /// Interface to attach to.
        #[arg(long)]
        interface: String,
        /// auto (native, falling back to generic), driver or generic.
        #[arg(long, default_value = "auto", value_parser = parse_xdp_mode)]
        xdp_mode: XdpAttachMode,
    },
    /// Validate a configuration file and print what it would do.
    Check {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The data plane the file is meant for (what `run --mode` will be given).
        #[arg(long, value_enum, default_value_t = runtime::Mode::Xdp)]
        mode: runtime::Mode,
    },
    /// Show the counters of a running middlebox.
    Stats {
        /// Control socket of the running middlebox.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Repeat every N seconds until interrupted.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
    },
    /// The services a running middlebox replicates (the controller pushes them).
    Services {
        /// Control socket of the running middlebox.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Replicas' consistency with their primary.
    Replica {
        #[command(subcommand)]
        action: ReplicaAction,
        /// Control socket of the running middlebox.
        #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// List, add or remove redirect rules on a running middlebox (no reload needed).
    Rule {
        #[command(subcommand)]
        action: RuleAction,
        /// Control socket of the running middlebox.
        #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ReplicaAction {
    /// Mark a replica in step with its primary again, e.g. after re-cloning it from the
    /// primary: its consistency state becomes `in-step` (logged by the middlebox).
    Reset {
        /// The service's name.
        #[arg(long)]
        service: String,
        /// The replica's address and port.
        #[arg(long)]
        replica: SocketAddrV4,
    },
}

#[derive(Subcommand, Debug)]
enum RuleAction {
    /// List installed rules.
    List,
    /// Install a rule (replaces a rule with the same id).
    Add {
        /// Rule identifier.
        #[arg(long)]
        id: u32,
        /// Client prefix, e.g. 198.18.1.0/24 (a bare address means /32).
        #[arg(long)]
        source: Ipv4Prefix,
        /// Only this client port.
        #[arg(long)]
        source_port: Option<u16>,
        /// The primary's address and port, e.g. 198.18.1.2:5201.
        #[arg(long)]
        destination: SocketAddrV4,
    },
    /// Remove a rule by id.
    Del {
        /// Rule identifier.
        #[arg(long)]
        id: u32,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, mode } => {
            let config = Config::load(&config)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop))
                    .context("installing signal handlers")?;
            }
            runtime::run_mode(&config, mode, stop)
        }
        Command::XdpBaseline {
            interface,
            xdp_mode,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop))
                    .context("installing signal handlers")?;
            }
            let baseline = Baseline::attach(&interface, xdp_mode)
                .with_context(|| format!("attaching the baseline program to {interface}"))?;
            println!(
                "baseline XDP program attached to {interface} ({:?} mode); stop with SIGINT or SIGTERM",
                baseline.mode()
            );
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            drop(baseline);
            Ok(())
        }
        Command::Check { config, mode } => {
            let path = config;
            let config = Config::load(&path)
                .with_context(|| format!("invalid configuration {}", path.display()))?;
            println!("{}: OK", path.display());
            for iface in &config.interfaces {
                println!(
                    "interface {}: address {}, ports {}-{}, xdp {:?}, {}",
                    iface.name,
                    iface.address,
                    iface.ports.first,
                    iface.ports.last,
                    iface.xdp_mode,
                    if iface.zero_copy {
                        "zero-copy"
                    } else {
                        "copy mode"
                    }
                );
                for q in &iface.queues {
                    match q.core {
                        Some(core) => {
                            println!("  queue {} -> worker pinned to core {core}", q.queue)
                        }
                        None => println!("  queue {} -> worker, unpinned", q.queue),
                    }
                }
            }
            for service in &config.services {
                let replicas: Vec<String> =
                    service.replicas.iter().map(|r| r.to_string()).collect();
                println!(
                    "service {}: clients {} -> primary {}, replicas [{}], replica budget {} bytes",
                    service.name,
                    service.clients,
                    service.primary,
                    replicas.join(", "),
                    service.replica_budget_bytes
                );
                if let Some(r) = &service.record {
                    println!(
                        "  records its sessions to {} (new file every {} bytes or {} s{})",
                        r.dir.display(),
                        r.rotate_bytes,
                        r.rotate_secs,
                        if r.responses {
                            ", with the primary's answers"
                        } else {
                            ""
                        }
                    );
                }
            }
            for rule in &config.all_rules() {
                println!("rule {rule}");
            }
            // XDP mode's worker layout (a replication NIC rides along with each worker of
            // the client-facing interface); sockets mode does not need it.
            if mode == runtime::Mode::Sockets {
                println!("sockets mode: kernel TCP relay, one worker per configured queue");
                return Ok(());
            }
            match runtime::plan_workers(&config) {
                Ok(workers) => {
                    for w in workers {
                        let nics: Vec<&str> = w
                            .replica_links
                            .iter()
                            .map(|l| l.socket.interface.as_str())
                            .collect();
                        println!(
                            "xdp worker {} queue {}: replicas through [{}]",
                            w.link.socket.interface,
                            w.link.socket.queue,
                            if nics.is_empty() {
                                w.link.socket.interface.clone()
                            } else {
                                nics.join(", ")
                            }
                        );
                    }
                }
                Err(e) => anyhow::bail!("{}: not runnable in xdp mode: {e:#}", path.display()),
            }
            Ok(())
        }
        Command::Stats {
            socket,
            json,
            watch,
        } => loop {
            let stats = match control::call(&socket, &Request::Stats)? {
                Response::Stats(stats) => stats,
                other => bail!("unexpected answer: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                print_stats(&stats);
            }
            match watch {
                Some(secs) => std::thread::sleep(Duration::from_secs(secs.max(1))),
                None => return Ok(()),
            }
        },
        Command::Services { socket } => match control::call(&socket, &Request::Services)? {
            Response::Services { services } => {
                if services.is_empty() {
                    println!("no services");
                }
                for s in services {
                    let replicas: Vec<String> = s.replicas.iter().map(|r| r.to_string()).collect();
                    println!(
                        "{}: clients {} -> primary {}, replicas [{}]{}",
                        s.name,
                        s.clients,
                        s.primary,
                        replicas.join(", "),
                        s.replica_interface
                            .map(|i| format!(" via {i}"))
                            .unwrap_or_default()
                    );
                }
                Ok(())
            }
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer: {other:?}"),
        },
        Command::Replica {
            action: ReplicaAction::Reset { service, replica },
            socket,
        } => match control::call(&socket, &Request::ReplicaReset { service, replica })? {
            Response::Done => {
                println!("replica {replica} marked in step");
                Ok(())
            }
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer: {other:?}"),
        },
        Command::Rule { action, socket } => {
            let request = match action {
                RuleAction::List => Request::Rules,
                RuleAction::Add {
                    id,
                    source,
                    source_port,
                    destination,
                } => Request::RuleAdd {
                    rule: RedirectRule {
                        id,
                        source,
                        source_port,
                        destination: *destination.ip(),
                        destination_port: destination.port(),
                    },
                },
                RuleAction::Del { id } => Request::RuleDel { id },
            };
            match control::call(&socket, &request)? {
                Response::Rules { rules } => {
                    if rules.is_empty() {
                        println!("no rules");
                    }
                    for rule in rules {
                        println!("{rule}");
                    }
                    Ok(())
                }
                Response::Done => {
                    println!("done");
                    Ok(())
                }
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
    }
}

fn print_stats(stats: &Stats) {
    if let Some(replication) = &stats.replication {
        println!("replication: {replication:#}");
    }
    print_consistency(&stats.consistency);
    println!(
        "{:<12} {:<8} {:>12} {:>12} {:>10} {:>10} {:>8}",
        "interface", "mode", "redirected", "passed", "unparsed", "no_socket", "failed"
    );
    for i in &stats.interfaces {
        println!(
            "{:<12} {:<8} {:>12} {:>12} {:>10} {:>10} {:>8}",
            i.name,
            i.mode,
            i.xdp.redirected,
            i.xdp.passed,
            i.xdp.unparsed,
            i.xdp.no_socket,
            i.xdp.redirect_failed
        );
    }
    println!(
        "{:<12} {:>6} {:>6} {:>12} {:>14}",
        "worker", "queue", "core", "rx_frames", "rx_bytes"
    );
    for w in &stats.workers {
        let core = w.core.map_or_else(|| "-".to_owned(), |c| c.to_string());
        println!(
            "{:<12} {:>6} {:>6} {:>12} {:>14}",
            w.interface, w.queue, core, w.rx_frames, w.rx_bytes
        );
    }
}

/// One line per replica: where it stands, since when, why, and what verification saw.
fn print_consistency(replicas: &[ReplicaConsistency]) {
    if replicas.is_empty() {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "{:<12} {:<21} {:<9} {:>10} {:>8} {:>10} {:>12} {:>8}  reason",
        "service", "replica", "state", "since", "detaches", "mismatches", "verified", "window"
    );
    for r in replicas {
        let age = now.saturating_sub(r.since_unix_ms / 1000);
        let detached = r.reasons.detached;
        let mut reason = r.last_reason.clone().unwrap_or_else(|| "-".into());
        if let Some(m) = &r.first_mismatch {
            reason = format!(
                "{reason}; first at offset {}: primary \"{}\" replica \"{}\"",
                m.offset, m.primary, m.replica
            );
        }
        if detached.total() > 0 {
            reason = format!(
                "{reason}; detaches: refused {} died {} lagged {} connect-timeout {} drain-timeout {} spill-budget {} login-failed {}",
                detached.refused,
                detached.died,
                detached.lagged,
                detached.connect_timeout,
                detached.drain_timeout,
                detached.spill_budget,
                detached.login_failed
            );
        }
        println!(
            "{:<12} {:<21} {:<9} {:>10} {:>8} {:>10} {:>12} {:>8}  {reason}",
            r.service,
            r.replica.to_string(),
            r.state.as_str(),
            format!("{age} s ago"),
            detached.total(),
            r.reasons.reply_mismatch,
            r.verification.bytes_compared,
            r.verification.window_exceeded,
        );
    }
}

/// `--xdp-mode`: the configuration file's words for an attach mode.
fn parse_xdp_mode(text: &str) -> Result<XdpAttachMode, String> {
    match text {
        "auto" => Ok(XdpAttachMode::Auto),
        "driver" => Ok(XdpAttachMode::Driver),
        "generic" => Ok(XdpAttachMode::Generic),
        other => Err(format!("{other:?}: must be auto, driver or generic")),
    }
}
