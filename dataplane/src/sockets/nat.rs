//! The nftables rule that turns a client's connection to the primary into a connection
//! to the relay's listening port (paper III-B: "user level sockets can be used only if
//! the destination address ... has been modified ... by the middlebox appliance kernel").
//!
//! One table of our own, `ip <name>`, with one `nat` chain on the prerouting hook and one
//! rule per service:
//!
//! ```text
//! table ip ncp_sockets {
//!     chain prerouting {
//!         type nat hook prerouting priority dstnat; policy accept;
//!         ip saddr 198.18.1.0/24 ip daddr 198.18.1.2 tcp dport 6379 redirect to :40123
//!     }
//! }
//! ```
//!
//! `redirect` rewrites the destination to the address of the receiving interface before
//! the routing decision, so the frames the network steers here (addressed to the primary's
//! IP, at the middlebox's MAC) are delivered locally without `ip_forward` and without the
//! middlebox owning the primary's address. Only prerouting is hooked: the relay's own
//! connections to the primary leave through the output hook and are not caught.
//!
//! We chose `redirect` over TPROXY because it needs neither policy routing nor
//! `IP_TRANSPARENT` listeners; what it gives up (the original destination in
//! `local_addr`) we do not need, since each service has its own listening port.
//!
//! The table is replaced atomically at start (a stale table from a crashed run is removed
//! in the same transaction) and deleted when the guard is dropped.

use std::{
    io::Write as _,
    net::SocketAddrV4,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::rules::Ipv4Prefix;

/// Name of the nftables table the relay owns by default.
pub const DEFAULT_TABLE: &str = "ncp_sockets";

/// One redirect: clients in `clients` connecting to `primary` land on local `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Sources whose connections are caught.
    pub clients: Ipv4Prefix,
    /// The address they connect to.
    pub primary: SocketAddrV4,
    /// Local port of the relay's listener.
    pub port: u16,
}

/// The installed table; deleting it on drop ends the redirection.
#[derive(Debug)]
pub struct NatTable {
    name: String,
}

/// The nft script that (re)creates the table with these redirects.
pub fn script(table: &str, redirects: &[Redirect]) -> String {
    // `add` then `delete` makes the delete succeed whether or not a stale table exists;
    // nft applies the whole file as one transaction, so there is no moment without rules.
    let mut s = format!(
        "add table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n"
    );
    for r in redirects {
        let source = if r.clients.len == 0 {
            String::new()
        } else {
            format!("ip saddr {} ", r.clients)
        };
        s.push_str(&format!(
            "\t\t{source}ip daddr {} tcp dport {} redirect to :{}\n",
            r.primary.ip(),
            r.primary.port(),
            r.port
        ));
    }
    s.push_str("\t}\n}\n");
    s
}

impl NatTable {
    /// Installs (or replaces) table `name` with `redirects`.
    pub fn install(name: &str, redirects: &[Redirect]) -> anyhow::Result<Self> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("nftables table name `{name}` must be letters, digits and '_'");
        }
        let text = script(name, redirects);
        nft_stdin(&text).with_context(|| format!("installing nftables table {name}:\n{text}"))?;
        for r in redirects {
            tracing::info!(
                table = name,
                clients = %r.clients,
                primary = %r.primary,
                port = r.port,
                "redirect installed"
            );
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NatTable {
    fn drop(&mut self) {
        let out = Command::new("nft")
            .args(["delete", "table", "ip", &self.name])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                tracing::info!(table = %self.name, "nftables table removed");
            }
            Ok(o) => tracing::warn!(
                table = %self.name,
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "could not remove nftables table"
            ),
            Err(e) => tracing::warn!(table = %self.name, error = %e, "could not run nft"),
        }
    }
}

/// Runs `nft -f -` with `text` on stdin.
fn nft_stdin(text: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).context("writing to nft")?;
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_replaces_the_table_and_matches_clients_only_when_narrowed() {
        let s = script(
            "ncp_sockets",
            &[
                Redirect {
                    clients: "198.18.1.0/24".parse().unwrap(),
                    primary: "198.18.1.2:6379".parse().unwrap(),
                    port: 40123,
                },
                Redirect {
                    clients: "0.0.0.0/0".parse().unwrap(),
                    primary: "198.18.1.2:80".parse().unwrap(),
                    port: 40124,
                },
            ],
        );
        assert!(s.starts_with("add table ip ncp_sockets\ndelete table ip ncp_sockets\n"));
        assert!(s.contains(
            "ip saddr 198.18.1.0/24 ip daddr 198.18.1.2 tcp dport 6379 redirect to :40123\n"
        ));
        assert!(s.contains("\t\tip daddr 198.18.1.2 tcp dport 80 redirect to :40124\n"));
    }

    #[test]
    fn odd_table_names_are_refused_before_nft_runs() {
        let err = NatTable::install("bad name; flush ruleset", &[]).unwrap_err();
        assert!(err.to_string().contains("table name"));
    }
}
