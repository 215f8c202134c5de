//! `ncpctl`: command-line client of the NCP controller's REST API.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use ncp_controller::client::Client;
use ncp_controller::store::{
    HostSpec, LoginSpec, MiddleboxSpec, ModeSpec, ProtocolSpec, RecordTarget, ReplicationSpec,
    VerifySpec,
};

#[derive(Parser, Debug)]
#[command(about = "Manage NCP replications through the controller's API")]
struct Args {
    #[arg(long, env = "NCP_API", default_value = "127.0.0.1:8653")]
    api: SocketAddr,
    /// File holding the bearer token (else NCP_TOKEN, else the token ncpd created in
    /// /var/lib/ncp/api-token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Replications, whether they are installed, and whether each replica is in step
    /// (a table; --json for scripts).
    Status {
        /// The API's JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Add a replication.
    Add {
        #[arg(long)]
        id: u32,
        /// Client address or prefix (198.18.3.11 or 198.18.3.0/24).
        #[arg(long)]
        source: String,
        #[arg(long)]
        source_port: Option<u16>,
        /// Primary server as address:port.
        #[arg(long)]
        primary: std::net::SocketAddrV4,
        #[arg(long)]
        middlebox: Ipv4Addr,
        /// Replica servers (address:port), repeatable.
        #[arg(long)]
        replica: Vec<String>,
        /// rewrite, vlan:VID or mpls:LABEL. The last two add 4 bytes to the redirected
        /// frames; a registered middlebox is told and lowers the MSS it advertises.
        #[arg(long, default_value = "rewrite")]
        mode: String,
        /// replies: the middlebox compares the replicas' answers with the primary's and
        /// flags a replica that answers differently as diverged; off: it does not.
        #[arg(long, default_value = "off")]
        verify: VerifySpec,
        /// postgres or redis: the middlebox logs in to each replica itself, with the
        /// replica's own credentials (--credentials), and hands it the client's stream
        /// from the end of the client's own login on.
        #[arg(long)]
        protocol: Option<ProtocolSpec>,
        /// REPLICA=PATH, repeatable: the secret file the middlebox logs in to that
        /// replica with, on the middlebox's host (mode 0600; TOML with `user = "…"`,
        /// optional, and `password = "…"`). Only the path is sent.
        #[arg(long = "credentials", value_name = "REPLICA=PATH", value_parser = parse_credentials)]
        credentials: Vec<(String, String)>,
        /// Record the sessions on the middlebox into this directory (absolute, on the
        /// middlebox's host; pcapng files that `ncp-replay` plays back later).
        #[arg(long, value_name = "DIR")]
        record: Option<String>,
    },
    /// Remove a replication.
    Rm { id: u32 },
    /// Pinned hosts.
    Hosts,
    /// Pin a host to a switch port.
    Pin {
        #[arg(long)]
        ip: Ipv4Addr,
        #[arg(long)]
        mac: String,
        /// Datapath id, decimal or 0x-hex.
        #[arg(long, value_parser = parse_dpid)]
        dpid: u64,
        #[arg(long)]
        port: u32,
    },
    /// Unpin a host.
    Unpin { ip: Ipv4Addr },
    /// Switches, discovered links, pinned and learned hosts, middleboxes down.
    Topology,
    /// Reconcile all switches now.
    Reconcile,
    /// Recent changes and who made them.
    Audit,
    /// Counters (flow-mods sent, reconcile runs, packet-ins, learned hosts, pushes).
    Metrics,
    /// Middleboxes the controller configures (their services follow the replications).
    #[command(subcommand)]
    Middlebox(MiddleboxCmd),
    /// Replicas' consistency state.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// Certificates for OpenFlow over TLS (local files; no controller needed).
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(Subcommand, Debug)]
enum ReplicaCmd {
    /// Mark a replica in step with its primary again, after re-cloning it (audited).
    Reset {
        #[arg(long)]
        replication: u32,
        /// The replica as address:port.
        #[arg(long)]
        replica: std::net::SocketAddrV4,
    },
}

#[derive(Subcommand, Debug)]
enum PkiCmd {
    /// Create a CA and ncpd's certificate in DIR (ncpd --tls-cert DIR/ctl-cert.pem
    /// --tls-key DIR/ctl-privkey.pem --tls-ca DIR/cacert.pem).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a switch certificate that may claim the given datapath ids; on the switch:
    /// ovs-vsctl set-ssl DIR/NAME-privkey.pem DIR/NAME-cert.pem DIR/cacert.pem and
    /// ovs-vsctl set-controller BRIDGE ssl:IP:PORT.
    Switch {
        #[arg(long)]
        dir: PathBuf,
        /// File name stem and certificate common name (default: sw-<first dpid>).
        #[arg(long)]
        name: Option<String>,
        /// Datapath id the switch may claim (0x-hex, 16 hex digits or decimal);
        /// repeat for every bridge of the switch.
        #[arg(long, required = true, value_parser = parse_dpid)]
        dpid: Vec<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum MiddleboxCmd {
    /// Register a middlebox (or change its settings).
    Add {
        #[arg(long)]
        ip: Ipv4Addr,
        /// Its control socket: unix:/path/to/middlebox.sock
        #[arg(long)]
        control: String,
        /// Its dedicated replication interface, passed on in every service.
        #[arg(long)]
        replica_interface: Option<String>,
    },
    /// Registered middleboxes and the status of the last push to each.
    List,
    /// Unregister a middlebox: its services are no longer pushed (nor cleared).
    Del { ip: Ipv4Addr },
}

/// The token in a token file: the first line that is not a comment, either a bare token
/// or `<name> <token>` (the format `ncpd --token-file` reads).
fn token_of(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().last().unwrap_or(l))
        .unwrap_or("")
}

use ncp_controller::switch::tls::parse_dpid;

fn pki(cmd: PkiCmd) -> anyhow::Result<()> {
    use ncp_controller::pki;
    match cmd {
        PkiCmd::Init { dir } => {
            let ctl = pki::init(&dir)?;
            println!("CA:         {}", dir.join(pki::CA_CERT).display());
            println!(
                "CA key:     {} (keep it off the switches)",
                dir.join(pki::CA_KEY).display()
            );
            println!(
                "ncpd:       --tls-cert {} --tls-key {} --tls-ca {}",
                ctl.cert.display(),
                ctl.key.display(),
                dir.join(pki::CA_CERT).display()
            );
        }
        PkiCmd::Switch { dir, name, dpid } => {
            let name = name.unwrap_or_else(|| format!("sw-{:016x}", dpid[0]));
            let sw = pki::switch(&dir, &name, &dpid)?;
            println!(
                "on the switch: ovs-vsctl set-ssl {} {} {}",
                sw.key.display(),
                sw.cert.display(),
                dir.join(pki::CA_CERT).display()
            );
        }
    }
    Ok(())
}

fn parse_mode(s: &str) -> anyhow::Result<ModeSpec> {
    Ok(match s.split_once(':') {
        None if s == "rewrite" => ModeSpec::Rewrite,
        Some(("vlan", v)) => ModeSpec::Vlan {
            vid: v.parse().context("VLAN id")?,
        },
        Some(("mpls", v)) => ModeSpec::Mpls {
            label: v.parse().context("MPLS label")?,
        },
        _ => bail!("mode must be rewrite, vlan:VID or mpls:LABEL"),
    })
}

fn main() -> std::process::ExitCode {
    // Errors are for people: one line, no backtrace.
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ncpctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A request whose body is `body` as JSON.
fn with_json(
    method: &'static str,
    path: String,
    body: &impl serde::Serialize,
) -> anyhow::Result<(&'static str, String, Option<String>)> {
    Ok((method, path, Some(serde_json::to_string(body)?)))
}

/// `REPLICA=PATH` of `--credentials`.
fn parse_credentials(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((replica, path)) if !replica.is_empty() && !path.is_empty() => {
            Ok((replica.to_owned(), path.to_owned()))
        }
        _ => Err(format!(
            "{text:?}: expected REPLICA=PATH, e.g. 198.18.2.3:5432=/etc/ncp/replica.secret"
        )),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let table = matches!(args.cmd, Cmd::Status { json: false });
    let (method, path, body) = match args.cmd {
        Cmd::Status { .. } => ("GET", "/v1/replications".to_string(), None),
        Cmd::Add {
            id,
            source,
            source_port,
            primary,
            middlebox,
            replica,
            mode,
            verify,
            protocol,
            credentials,
            record,
        } => {
            let spec = ReplicationSpec {
                id,
                source,
                source_port,
                primary: *primary.ip(),
                primary_port: primary.port(),
                middlebox,
                replicas: replica,
                mode: parse_mode(&mode)?,
                verify,
                login: LoginSpec {
                    protocol,
                    credentials: credentials.into_iter().collect(),
                },
                record: record.map(|dir| RecordTarget { dir }),
            };
            with_json("POST", "/v1/replications".to_string(), &spec)?
        }
        Cmd::Rm { id } => ("DELETE", format!("/v1/replications/{id}"), None),
        Cmd::Hosts => ("GET", "/v1/hosts".to_string(), None),
        Cmd::Pin {
            ip,
            mac,
            dpid,
            port,
        } => {
            let h = HostSpec {
                ip,
                mac,
                dpid,
                port,
            };
            with_json("PUT", "/v1/hosts".to_string(), &h)?
        }
        Cmd::Unpin { ip } => ("DELETE", format!("/v1/hosts/{ip}"), None),
        Cmd::Topology => ("GET", "/v1/topology".to_string(), None),
        Cmd::Reconcile => ("POST", "/v1/reconcile".to_string(), None),
        Cmd::Audit => ("GET", "/v1/audit".to_string(), None),
        Cmd::Metrics => ("GET", "/v1/metrics".to_string(), None),
        Cmd::Middlebox(MiddleboxCmd::Add {
            ip,
            control,
            replica_interface,
        }) => {
            let mb = MiddleboxSpec {
                ip,
                control,
                replica_interface,
            };
            with_json("PUT", format!("/v1/middleboxes/{ip}"), &mb)?
        }
        Cmd::Middlebox(MiddleboxCmd::List) => ("GET", "/v1/middleboxes".to_string(), None),
        Cmd::Middlebox(MiddleboxCmd::Del { ip }) => {
            ("DELETE", format!("/v1/middleboxes/{ip}"), None)
        }
        Cmd::Replica(ReplicaCmd::Reset {
            replication,
            replica,
        }) => (
            "POST",
            format!("/v1/replications/{replication}/replicas/{replica}/reset"),
            None,
        ),
        Cmd::Pki(cmd) => return pki(cmd),
    };
    let token = match &args.token_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => match std::env::var("NCP_TOKEN") {
            Ok(token) if !token.trim().is_empty() => token,
            // The token ncpd created at its first start.
            _ => ncp_controller::token::read(std::path::Path::new(
                ncp_controller::token::DEFAULT_TOKEN_FILE,
            ))
            .context(
                "no --token-file, no NCP_TOKEN, and the controller's own token is unreadable",
            )?,
        },
    };
    let client = Client::new(args.api, token_of(&token));
    let resp = client.request(method, &path, body.as_deref())?;
    if table && resp.status == 200 {
        let list: serde_json::Value =
            serde_json::from_str(&resp.body).context("the controller's status is not JSON")?;
        print!("{}", status_table(&list));
        return Ok(());
    }
    let shown = serde_json::from_str::<serde_json::Value>(&resp.body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(resp.body);
    if !shown.trim().is_empty() {
        println!("{}", shown.trim_end());
    }
    if !(200..300).contains(&resp.status) {
        bail!("{method} {path}: HTTP {}", resp.status);
    }
    Ok(())
}

/// `ncpctl status` for people: one row per replica (or per replication without
/// replicas), columns aligned.
fn status_table(list: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let mut rows = vec![[
        "ID".to_string(),
        "INSTALLED".to_string(),
        "MIDDLEBOX".to_string(),
        "REPLICA".to_string(),
        "STATE".to_string(),
    ]];
    for r in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        let installed = match (r["installed"].as_bool(), r["error"].as_str()) {
            (Some(true), _) => "yes".to_string(),
            (_, Some(e)) => format!("no: {e}"),
            _ => "no".to_string(),
        };
        let head = [text(&r["id"]), installed, text(&r["middlebox"])];
        let replicas = r["replica_states"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if replicas.is_empty() {
            let [a, b, c] = head.clone();
            rows.push([a, b, c, "-".into(), "(no replicas)".into()]);
        }
        for x in replicas {
            let [a, b, c] = head.clone();
            rows.push([a, b, c, text(&x["replica"]), text(&x["summary"])]);
        }
    }
    let mut widths = [0usize; 4];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        for (w, cell) in widths.iter().zip(row) {
            out.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(&row[4]);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{status_table, token_of};

    #[test]
    fn status_table_has_a_row_per_replica() {
        let list = serde_json::json!([
            {"id": 1, "installed": true, "error": null, "middlebox": "198.18.1.3", "replica_states": [
                {"replica": "198.18.2.3:6379", "summary": "in-step"},
                {"replica": "198.18.2.4:6379", "summary": "diverged since 2026-12-06T22:00:00Z (fail-open)"}
            ]},
            {"id": 2, "installed": false, "error": "no route", "middlebox": "198.18.1.3", "replica_states": []}
        ]);
        let t = status_table(&list);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[0].starts_with("ID  INSTALLED     MIDDLEBOX   REPLICA          STATE"),
            "{t}"
        );
        assert!(lines[1].ends_with("198.18.2.3:6379  in-step"), "{t}");
        assert!(
            lines[2].contains("diverged since 2026-12-06T22:00:00Z (fail-open)"),
            "{t}"
        );
        assert!(
            lines[3].contains("no: no route") && lines[3].ends_with("(no replicas)"),
            "{t}"
        );
    }

    #[test]
    fn status_table_says_what_a_replication_waits_for() {
        let list = serde_json::json!([
            {"id": 3, "installed": false, "error": "waiting for host 198.18.3.12: not seen yet, 4 ARP requests sent", "middlebox": "198.18.1.3", "replica_states": []}
        ]);
        let t = status_table(&list);
        assert!(
            t.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("3   no: waiting for host 198.18.3.12")),
            "{t}"
        );
    }

    #[test]
    fn token_file_forms() {
        assert_eq!(token_of("abc\n"), "abc");
        assert_eq!(token_of("# who token\nalice s3cret\nbob other\n"), "s3cret");
        assert_eq!(token_of(""), "");
    }
}
