//! `ncpd`: the NCP controller daemon (OpenFlow listener, reconcile loops, REST API).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use ncp_controller::health::HealthConfig;
use ncp_controller::hosts::LearnConfig;
use ncp_controller::search::SearchConfig;
use ncp_controller::service::{Service, ServiceConfig};
use ncp_controller::switch::{ServerConfig, SwitchTls, TlsFiles};

#[derive(Parser, Debug)]
#[command(about = "NCP OpenFlow 1.3 controller")]
struct Args {
    /// Where switches connect. Without the --tls-* files only a loopback address is
    /// allowed: plain OpenFlow lets anyone who reaches the port pose as a switch.
    #[arg(long, default_value = "127.0.0.1:6653")]
    listen: SocketAddr,
    /// ncpd's certificate (PEM) for OpenFlow over TLS; `ncpctl pki init` makes one.
    /// With it, every switch must present a certificate signed by --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// ncpd's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs switch certificates.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Allow-list granting datapath ids to switch certificates by subject common name
    /// (`<common name> = <dpid>, ...` per line), for certificates made by `ovs-pki`.
    #[arg(long, requires = "tls_cert")]
    tls_switch_map: Option<PathBuf>,
    /// Where the REST API listens.
    #[arg(long, default_value = "127.0.0.1:8653")]
    api: SocketAddr,
    /// File of API bearer tokens: one per line, `<name> <token>`, or a bare token for a
    /// caller named `operator`. The name is what the audit log records as who made a
    /// change. Lines starting with `#` are ignored. Without it, NCP_TOKEN is used; without
    /// that, the token in /var/lib/ncp/api-token, created (mode 0600) on first start and
    /// read by `ncpctl` automatically.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Desired-state file (created on first change).
    #[arg(long, default_value = "/var/lib/ncp/controller.json")]
    state: PathBuf,
    #[arg(long, default_value_t = 5)]
    probe_secs: u64,
    #[arg(long, default_value_t = 30)]
    reconcile_secs: u64,
    /// Do not install the lowest-priority NORMAL forwarding rule.
    #[arg(long)]
    no_normal_fallback: bool,
    /// Do not learn hosts from traffic (only pinned hosts are known).
    #[arg(long)]
    no_learn_hosts: bool,
    /// Seconds after which a learned host that has sent nothing is forgotten (and what
    /// used it re-planned); 0 keeps learned hosts until they move.
    #[arg(long, default_value_t = 300)]
    host_expiry_secs: u64,
    /// Do not send ARP requests for hosts that replications name but nobody has seen
    /// (they are then found only once they send traffic).
    #[arg(long)]
    no_host_search: bool,
    /// Do not health-check middleboxes (no fail-open).
    #[arg(long)]
    no_health: bool,
    /// Milliseconds between health probes to each middlebox.
    #[arg(long, default_value_t = 300)]
    health_interval_ms: u64,
    /// Unanswered probes in a row after which a middlebox is down.
    #[arg(long, default_value_t = 3)]
    health_failures: u32,
    /// Milliseconds the topology must be quiet before a reconcile after a change.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Milliseconds between polls of each registered middlebox's consistency state and
    /// counters (shown in `ncpctl status` and on /metrics).
    #[arg(long, default_value_t = 2000)]
    poll_ms: u64,
}

/// The OpenFlow listener's TLS, or plain TCP where that is allowed (loopback only).
fn switch_tls(args: &Args) -> anyhow::Result<Option<SwitchTls>> {
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) else {
        if !args.listen.ip().is_loopback() {
            bail!(
                "plain OpenFlow on {} would let anyone who reaches it pose as a switch: \
                 give --tls-cert, --tls-key and --tls-ca (ncpctl pki init makes them), \
                 or listen on loopback",
                args.listen
            );
        }
        tracing::warn!(listen = %args.listen, "OpenFlow without TLS: any local process can pose as a switch; give --tls-cert/--tls-key/--tls-ca to require switch certificates");
        return Ok(None);
    };
    let files = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        ca: ca.clone(),
        switch_map: args.tls_switch_map.clone(),
    };
    let tls = SwitchTls::load(&files).context("loading the OpenFlow TLS files")?;
    tracing::info!(listen = %args.listen, "OpenFlow over TLS; switches must present a certificate from the CA");
    Ok(Some(tls))
}

/// (caller name, token) pairs from the token file or NCP_TOKEN.
fn tokens(args: &Args) -> anyhow::Result<Vec<(String, String)>> {
    let text = match &args.token_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => match std::env::var("NCP_TOKEN") {
            Ok(token) if !token.trim().is_empty() => token,
            _ => {
                let path = std::path::Path::new(ncp_controller::token::DEFAULT_TOKEN_FILE);
                let (token, created) = ncp_controller::token::load_or_create(path)?;
                if created {
                    tracing::info!(file = %path.display(), "created the API token (owner-only); ncpctl reads it from there");
                }
                token
            }
        },
    };
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, token) = match line.split_once(char::is_whitespace) {
            Some((n, t)) => (n.to_string(), t.trim().to_string()),
            None => ("operator".to_string(), line.to_string()),
        };
        out.push((name, token));
    }
    if out.is_empty() {
        bail!("an API token is required: --token-file or NCP_TOKEN");
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let tokens = tokens(&args)?;
    let tls = switch_tls(&args)?;
    let cfg = ServiceConfig {
        server: ServerConfig {
            listen: args.listen,
            tls,
            ..ServerConfig::default()
        },
        state_file: args.state.clone(),
        probe_interval: Duration::from_secs(args.probe_secs.max(1)),
        link_ttl: Duration::from_secs(args.probe_secs.max(1) * 3 + 1),
        reconcile_interval: Duration::from_secs(args.reconcile_secs.max(1)),
        normal_fallback: !args.no_normal_fallback,
        learn_hosts: !args.no_learn_hosts,
        learn: LearnConfig {
            expiry: (args.host_expiry_secs > 0).then(|| Duration::from_secs(args.host_expiry_secs)),
            ..LearnConfig::default()
        },
        search: (!args.no_host_search).then(SearchConfig::default),
        health: (!args.no_health).then(|| HealthConfig {
            interval: Duration::from_millis(args.health_interval_ms.max(10)),
            failures: args.health_failures.max(1),
        }),
        settle: Duration::from_millis(args.settle_ms),
        push: ncp_controller::middlebox::PushConfig::default(),
        poll: ncp_controller::consistency::PollConfig {
            interval: Duration::from_millis(args.poll_ms.max(100)),
            ..ncp_controller::consistency::PollConfig::default()
        },
    };
    let svc = Service::start(cfg).await?;
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("binding API on {}", args.api))?;
    tracing::info!(api = %args.api, "REST API up");
    axum::serve(
        listener,
        ncp_controller::api::router_with_tokens(svc, tokens),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(["ncpd"].iter().chain(extra))
    }

    #[test]
    fn plain_openflow_only_on_loopback() {
        let local = args(&["--listen", "127.0.0.1:6653"]).expect("args");
        assert!(switch_tls(&local).expect("loopback allowed").is_none());
        let open = args(&["--listen", "0.0.0.0:6653"]).expect("args");
        let err = switch_tls(&open).expect_err("non-loopback without TLS");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }

    #[test]
    fn tls_files_come_as_a_set() {
        assert!(args(&["--tls-cert", "c.pem"]).is_err());
        assert!(args(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).is_err());
        assert!(args(&["--tls-switch-map", "m"]).is_err());
        let all = [
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-ca",
            "ca.pem",
        ];
        assert!(args(&all).is_ok());
    }
}
