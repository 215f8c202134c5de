//! Building (`up`) and removing (`down`) a test bed, and the handle tests use.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::cmd;
use crate::error::{Error, Result};
use crate::ovs;
use crate::plan::{self, DEFAULT_PREFIX, Plan};
use crate::privileges;
use crate::state::{self, OvsSsl, TestbedState};
use crate::topology::Topology;

/// How to bring a test bed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpOptions {
    /// Prefix of every created name; see [`crate::plan`] for the rules. Default `ncp`.
    pub prefix: String,
    /// If set, every bridge gets controller `tcp:127.0.0.1:<port>` and `fail_mode=secure`
    /// (no forwarding without the controller's rules). If unset, bridges run
    /// `fail_mode=standalone` and forward like learning switches (OpenFlow NORMAL).
    pub controller_port: Option<u16>,
    /// With a controller: speak OpenFlow over TLS (`ssl:127.0.0.1:<port>`) with these
    /// switch credentials, given to OVS with `ovs-vsctl set-ssl`. OVS has one SSL
    /// setting per ovs-vswitchd, so the last TLS test bed brought up sets it for all.
    /// Keep the files in [`Testbed::pki_dir`] so that `down` removes them.
    pub controller_tls: Option<OvsSsl>,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            prefix: DEFAULT_PREFIX.to_string(),
            controller_port: None,
            controller_tls: None,
        }
    }
}

impl UpOptions {
    /// Options with `prefix` and no controller.
    pub fn with_prefix(prefix: &str) -> Self {
        UpOptions {
            prefix: prefix.to_string(),
            controller_port: None,
            controller_tls: None,
        }
    }
}

/// What `down` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    /// Pids of processes that were still running inside the namespaces and were ended.
    pub killed: Vec<i32>,
    pub namespaces: Vec<String>,
    pub bridges: Vec<String>,
    /// Root-namespace interfaces deleted directly (most veth ends go away with their
    /// namespace or peer and are not listed).
    pub links: Vec<String>,
    /// True if OVS daemons started by `up` were stopped (last test bed gone).
    pub ovs_stopped: bool,
}

impl DownReport {
    /// True when there was nothing to remove.
    pub fn is_empty(&self) -> bool {
        self.killed.is_empty()
            && self.namespaces.is_empty()
            && self.bridges.is_empty()
            && self.links.is_empty()
            && !self.ovs_stopped
    }
}

/// A test bed that is up: the topology, the computed plan and accessors for tests.
#[derive(Debug, Clone)]
pub struct Testbed {
    topology: Topology,
    plan: Plan,
    controller_port: Option<u16>,
    controller_tls: Option<OvsSsl>,
}

impl Testbed {
    /// Where a test bed's OpenFlow TLS keys and certificates belong (in the state
    /// directory, named after the prefix, so that `down` removes them with the rest).
    pub fn pki_dir(prefix: &str) -> PathBuf {
        Path::new(state::STATE_DIR).join(format!("{prefix}-pki"))
    }

    /// Builds the test bed. If one with the same prefix exists already it is removed first
    /// (so a second `up` is not an error and always yields a fresh, predictable state; note
    /// this ends processes running in the old namespaces). On failure everything created so
    /// far is removed again before the error is returned.
    pub fn up(topology: &Topology, options: &UpOptions) -> Result<Testbed> {
        let plan = Plan::new(topology, &options.prefix)?;
        privileges::require_privileges()?;
        if topology.has_switch_loop() && options.controller_port.is_none() {
            tracing::warn!(
                "the switch links form a loop and no controller is set: standalone bridges run no spanning tree, expect broadcast storms"
            );
        }
        let prefix = plan.prefix.clone();
        let prefix = prefix.as_str();
        {
            let _lock = state::lock()?;
            ovs::ensure_running()?;
            let old = remove_by_prefix(prefix)?;
            if !old.is_empty() {
                tracing::info!(
                    prefix,
                    ?old,
                    "removed the previous test bed with this prefix"
                );
            }
            // Registered before building, under the lock: from now on no other test bed's
            // `down` will stop the OVS daemons underneath us, and a crash mid-way leaves a
            // state file that says this prefix exists.
            state::write_testbed(&TestbedState {
                prefix: prefix.to_string(),
                controller_port: options.controller_port,
                topology: topology.source.clone(),
                controller_tls: options.controller_tls.clone(),
            })?;
            if let Some(ssl) = &options.controller_tls {
                ovs::set_ssl(ssl)?;
            }
        }
        let testbed = Testbed {
            topology: topology.clone(),
            plan,
            controller_port: options.controller_port,
            controller_tls: options.controller_tls.clone(),
        };
        if let Err(e) = testbed.build() {
            tracing::warn!(prefix, error = %e, "up failed; removing what was created");
            if let Err(cleanup) = Testbed::down(prefix) {
                tracing::warn!(prefix, error = %cleanup, "cleanup after failed up also failed");
            }
            return Err(e);
        }
        tracing::info!(prefix, "test bed is up");
        Ok(testbed)
    }

    /// Re-opens a test bed that `up` built (possibly in another process) from its state file.
    pub fn open(prefix: &str) -> Result<Testbed> {
        plan::validate_prefix(prefix)?;
        let st = state::read_testbed(prefix)?.ok_or_else(|| {
            Error::Unknown(format!(
                "no test bed with prefix `{prefix}` ({} does not exist)",
                state::testbed_path(prefix).display()
            ))
        })?;
        let topology = Topology::parse(&st.topology)?;
        let plan = Plan::new(&topology, prefix)?;
        Ok(Testbed {
            topology,
            plan,
            controller_port: st.controller_port,
            controller_tls: st.controller_tls,
        })
    }

    /// Removes everything named `<prefix>-*`: ends processes inside those namespaces (by
    /// pid), deletes the bridges, namespaces and root-side veths, and removes the state file.
    /// Works without a state file (after a crash). If `up` started the OVS daemons and this
    /// was the last test bed, with no bridge left at all, the daemons are stopped too.
    pub fn down(prefix: &str) -> Result<DownReport> {
        plan::validate_prefix(prefix)?;
        let _lock = state::lock()?;
        let mut report = remove_by_prefix(prefix)?;
        let pki = Testbed::pki_dir(prefix);
        if pki.exists() {
            ovs::forget_ssl_under(&pki);
            if let Err(e) = std::fs::remove_dir_all(&pki) {
                tracing::warn!(dir = %pki.display(), error = %e, "cannot remove the test bed's PKI");
            }
        }
        state::remove_testbed(prefix)?;
        let others = state::testbed_prefixes()?;
        if others.is_empty() {
            if ovs::list_bridges().is_some_and(|b| b.is_empty()) {
                report.ovs_stopped = ovs::stop_started()?;
            } else if state::read_ovs()? != state::OvsDaemons::default() {
                tracing::info!("OVS still has bridges; leaving the daemons running");
            }
        }
        tracing::info!(prefix, ?report, "test bed is down");
        Ok(report)
    }

    /// Brings this test bed down (same as [`Testbed::down`] with its prefix).
    pub fn teardown(self) -> Result<DownReport> {
        Testbed::down(&self.plan.prefix)
    }

    /// The prefix of every name this test bed created.
    pub fn prefix(&self) -> &str {
        &self.plan.prefix
    }

    /// The topology the test bed was built from.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Every object the test bed consists of, with names and port numbers.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The controller port given to `up`, if any.
    pub fn controller_port(&self) -> Option<u16> {
        self.controller_port
    }

    /// Network namespace name of `host`.
    pub fn netns(&self, host: &str) -> Result<String> {
        self.plan
            .namespaces
            .iter()
            .find(|n| n.host == host)
            .map(|n| n.netns.clone())
            .ok_or_else(|| Error::Unknown(format!("host `{host}` is not in the topology")))
    }

    /// A `Command` running `argv` inside `host`'s namespace (`ip netns exec`), for callers
    /// that want to set stdin/stdout/env themselves.
    pub fn command(&self, host: &str, argv: &[&str]) -> Result<Command> {
        let ns = self.netns(host)?;
        if argv.is_empty() {
            return Err(Error::Unknown("empty command line".to_string()));
        }
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns]).args(argv);
        Ok(command)
    }

    /// Pins `host`'s neighbour entry for `ip` on `iface` to `mac` (permanent, so ARP does
    /// not undo it): how a test or benchmark steers a host's traffic to another machine.
    pub fn set_neighbor(&self, host: &str, iface: &str, ip: Ipv4Addr, mac: &str) -> Result<()> {
        let ip = ip.to_string();
        let mut argv = vec!["ip", "neigh", "replace", &ip, "lladdr", mac];
        argv.extend(["dev", iface, "nud", "permanent"]);
        self.exec(host, &argv).map(drop)
    }

    /// Runs `argv` inside `host` and waits. Fails with the command's stderr if it exits
    /// non-zero.
    pub fn exec(&self, host: &str, argv: &[&str]) -> Result<Output> {
        let mut command = self.command(host, argv)?;
        let line = format!("[{host}] {}", cmd::cmdline(argv));
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                command: line.clone(),
                source,
            })?;
        cmd::check(&[line.as_str()], output)
    }

    /// Starts `argv` inside `host` without waiting (stdin from /dev/null; stdout and stderr
    /// inherited). `ip netns exec` execs the program, so the child's pid is the program's.
    /// `down` ends it if the caller has not.
    pub fn spawn(&self, host: &str, argv: &[&str]) -> Result<Child> {
        let mut command = self.command(host, argv)?;
        command
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                command: format!("[{host}] {}", cmd::cmdline(argv)),
                source,
            })
    }

    /// Waits (at most `timeout`) until a TCP socket listens on `port` inside `host`: a
    /// server just spawned is not yet accepting, and a client that connects early is
    /// refused.
    pub fn wait_listening(&self, host: &str, port: u16, timeout: Duration) -> Result<()> {
        let filter = format!("sport = :{port}");
        cmd::wait_until(timeout, &format!("a listener on {host}:{port}"), || {
            self.exec(host, &["ss", "-Hltn", &filter])
                .is_ok_and(|out| !out.stdout.is_empty())
        })
    }

    /// Pids of the processes running inside `host`'s namespace now.
    pub fn pids(&self, host: &str) -> Result<Vec<i32>> {
        Ok(namespace_pids(&self.netns(host)?))
    }

    /// IPv4 address of `host`'s interface `iface`.
    pub fn address(&self, host: &str, iface: &str) -> Result<Ipv4Addr> {
        Ok(self.plan.host_link(host, iface)?.address)
    }

    /// MAC address of `host`'s interface `iface`.
    pub fn mac(&self, host: &str, iface: &str) -> Result<[u8; 6]> {
        Ok(self.plan.host_link(host, iface)?.mac.0)
    }

    /// OVS bridge name of `switch`.
    pub fn bridge(&self, switch: &str) -> Result<String> {
        Ok(self.plan.bridge(switch)?.bridge.clone())
    }

    /// Deletes the bridge of `switch` and creates it again from the plan: same datapath id,
    /// ports, port numbers and controller. To the controller this looks like a switch that
    /// restarted and lost its flow table.
    pub fn recreate_bridge(&self, switch: &str) -> Result<()> {
        let b = self.plan.bridge(switch)?;
        tracing::info!(bridge = %b.bridge, "re-creating OVS bridge");
        cmd::run(&["ovs-vsctl", "--timeout=30", "del-br", &b.bridge])?;
        self.create_bridge(b)
    }

    /// Crashes ovs-vswitchd (SIGKILL) and starts it again; every switch loses its flow
    /// table and reconnects to the controller. Refuses unless the test bed started the
    /// daemon. Returns the time until the new daemon answers.
    pub fn crash_vswitchd(&self) -> Result<std::time::Duration> {
        let _lock = state::lock()?;
        ovs::crash_and_restart_vswitchd()
    }

    /// Datapath id of `switch`.
    pub fn dpid(&self, switch: &str) -> Result<u64> {
        Ok(self.plan.bridge(switch)?.dpid)
    }

    /// OpenFlow port on `switch` leading to `peer` (`host:iface`, a host with one interface
    /// on that switch, or a neighbouring switch); see [`Plan::ofport`].
    pub fn ofport(&self, switch: &str, peer: &str) -> Result<u16> {
        self.plan.ofport(switch, peer)
    }

    fn build(&self) -> Result<()> {
        for ns in &self.plan.namespaces {
            tracing::info!(netns = %ns.netns, host = %ns.host, "creating namespace");
            create_namespace(&ns.netns)?;
        }

        for l in &self.plan.host_links {
            tracing::info!(
                host = %l.host, iface = %l.iface, address = %l.address, bridge = %l.bridge,
                ofport = l.ofport, "creating veth {} <-> {}:{}", l.root_ifname, l.host, l.iface
            );
            // The host end is created directly inside the namespace, so its name never
            // clashes with an interface of the root namespace.
            let queues = l.queues.to_string();
            cmd::run(&[
                "ip",
                "link",
                "add",
                &l.root_ifname,
                "numtxqueues",
                &queues,
                "numrxqueues",
                &queues,
                "type",
                "veth",
                "peer",
                "name",
                &l.iface,
                "numtxqueues",
                &queues,
                "numrxqueues",
                &queues,
                "netns",
                &l.netns,
            ])?;
            let mac = l.mac.to_string();
            let cidr = format!("{}/{}", l.address, l.prefix_len);
            cmd::run(&[
                "ip", "-n", &l.netns, "link", "set", &l.iface, "address", &mac,
            ])?;
            cmd::run(&["ip", "-n", &l.netns, "addr", "add", &cidr, "dev", &l.iface])?;
            prepare_root_end(&l.root_ifname)?;
            // Partial checksums from tx offload survive veth and are rejected by user-space
            // stacks and by OVS's userspace datapath, so both ends compute full checksums.
            cmd::run(&[
                "ip", "netns", "exec", &l.netns, "ethtool", "-K", &l.iface, "tx", "off",
            ])?;
            cmd::run(&["ip", "-n", &l.netns, "link", "set", &l.iface, "up"])?;
        }

        for l in &self.plan.switch_links {
            tracing::info!(
                "creating switch link {}:{} ({}) <-> {}:{} ({})",
                l.a,
                l.a_ofport,
                l.a_ifname,
                l.b,
                l.b_ofport,
                l.b_ifname
            );
            cmd::run(&[
                "ip",
                "link",
                "add",
                &l.a_ifname,
                "type",
                "veth",
                "peer",
                "name",
                &l.b_ifname,
            ])?;
            prepare_root_end(&l.a_ifname)?;
            prepare_root_end(&l.b_ifname)?;
        }

        for b in &self.plan.bridges {
            self.create_bridge(b)?;
        }
        Ok(())
    }

    fn create_bridge(&self, b: &plan::BridgePlan) -> Result<()> {
        let fail_mode = if self.controller_port.is_some() {
            "secure"
        } else {
            "standalone"
        };
        tracing::info!(
            bridge = %b.bridge, dpid = %b.dpid_hex(), fail_mode,
            ports = b.ports.len(), "creating OVS bridge"
        );
        let dpid = format!("other-config:datapath-id={}", b.dpid_hex());
        let fail = format!("fail_mode={fail_mode}");
        let scheme = if self.controller_tls.is_some() {
            "ssl"
        } else {
            "tcp"
        };
        let controller = self
            .controller_port
            .map(|p| format!("{scheme}:127.0.0.1:{p}"));
        let requests: Vec<String> = b
            .ports
            .iter()
            .map(|p| format!("ofport_request={}", p.ofport))
            .collect();

        // One transaction per bridge: OVS sees the bridge with all its settings at once
        // (never a moment with the wrong datapath type or fail mode) and reconfigures once.
        let mut argv: Vec<&str> = vec![
            "ovs-vsctl",
            "--timeout=60",
            "--",
            "add-br",
            &b.bridge,
            "--",
            "set",
            "bridge",
            &b.bridge,
            "datapath_type=netdev",
            "protocols=OpenFlow13",
            &dpid,
            // In-band control would add hidden flows for the controller address; the
            // controller is reached through the root namespace's loopback, not the bridge.
            "other-config:disable-in-band=true",
            &fail,
        ];
        if let Some(target) = &controller {
            argv.extend(["--", "set-controller", &b.bridge, target]);
        }
        for (p, request) in b.ports.iter().zip(&requests) {
            argv.extend([
                "--",
                "add-port",
                &b.bridge,
                &p.ifname,
                "--",
                "set",
                "interface",
                &p.ifname,
                request,
            ]);
        }
        cmd::run(&argv)?;

        for p in &b.ports {
            let mut got = -1;
            let probe = || {
                got = ovs::ofport(&p.ifname).unwrap_or(-1);
                got == i64::from(p.ofport)
            };
            if cmd::wait_until(Duration::from_secs(10), "ofport assignment", probe).is_err() {
                return Err(Error::Timeout(format!(
                    "port {} on bridge {} has ofport {got}, wanted {} (OVS says: {})",
                    p.ifname,
                    b.bridge,
                    p.ofport,
                    ovs::interface_error(&p.ifname)
                )));
            }
        }
        Ok(())
    }
}

/// Creates network namespace `name` the way the test bed's hosts are: IPv6 off (its
/// router solicitations and MLD reports would only add noise), loopback up. Name it
/// `<prefix>-...` so that [`Testbed::down`] removes it with the rest.
pub fn create_namespace(name: &str) -> Result<()> {
    cmd::run(&["ip", "netns", "add", name])?;
    // Set before any interface arrives: new interfaces copy `default`. A host with two
    // NICs (the middlebox, the replica) must answer ARP only on the NIC that owns the
    // address asked for (arp_ignore=1, arp_announce=2), as a multi-homed server should:
    // with Linux's default it answers on both, and a controller that asks for the
    // middlebox's production address may learn it on the replication switch (ARP flux;
    // the fault matrix's ncpd restart hit exactly that).
    // The XDP data plane's default upstream ports (`PortRange::default` of
    // `ncp-dataplane`, which this crate does not depend on) are reserved, as its
    // configuration asks: a kernel connection from the middlebox's address (the sockets
    // data plane of the cell before, in a benchmark) would otherwise leave the same
    // four-tuple in a server's TIME-WAIT, and the XDP data plane's SYN on it waited a
    // second.
    cmd::run(&[
        "ip",
        "netns",
        "exec",
        name,
        "sysctl",
        "-q",
        "-w",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv4.conf.all.arp_ignore=1",
        "net.ipv4.conf.all.arp_announce=2",
        "net.ipv4.ip_local_reserved_ports=40000-49999",
    ])?;
    cmd::run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Settings for a veth end in the root namespace: no IPv6 (its router solicitations and MLD
/// reports would be flooded into the switches), no tx checksum offload, link up.
fn prepare_root_end(ifname: &str) -> Result<()> {
    let key = format!("net.ipv6.conf.{ifname}.disable_ipv6=1");
    cmd::run(&["sysctl", "-q", "-w", &key])?;
    cmd::run(&["ethtool", "-K", ifname, "tx", "off"])?;
    cmd::run(&["ip", "link", "set", ifname, "up"])?;
    Ok(())
}

fn owned(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('-'))
}

/// Namespace names from `ip netns list` (lines look like `name (id: 3)` or `name`).
fn list_namespaces() -> Result<Vec<String>> {
    let out = cmd::stdout(&["ip", "netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Root-namespace interface names from `ip -o link show` (lines look like
/// `7: ncp-prod-p1@if6: <BROADCAST,...`).
pub(crate) fn list_links() -> Result<Vec<String>> {
    let out = cmd::stdout(&["ip", "-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect())
}

/// Pids of processes inside namespace `ns`.
fn namespace_pids(ns: &str) -> Vec<i32> {
    cmd::stdout(&["ip", "netns", "pids", ns])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Deletes everything named `<prefix>-*` (see [`Testbed::down`]); leaves OVS daemons and the
/// state file alone. Best effort: tries every object, then reports the first failure.
fn remove_by_prefix(prefix: &str) -> Result<DownReport> {
    let mut report = DownReport::default();
    let mut failures: Vec<String> = Vec::new();

    let namespaces: Vec<String> = list_namespaces()?
        .into_iter()
        .filter(|n| owned(prefix, n))
        .collect();

    // Processes first, so nothing holds on to interfaces while they go. TERM them all, then
    // give them a moment together rather than one grace period each.
    let pids: Vec<i32> = namespaces
        .iter()
        .flat_map(|ns| namespace_pids(ns))
        .collect();
    for &pid in &pids {
        tracing::info!(pid, "ending process left in a test bed namespace");
        cmd::kill(pid, libc::SIGTERM);
    }
    let _ = cmd::wait_until(Duration::from_secs(2), "processes to exit", || {
        pids.iter().all(|&p| !cmd::alive(p))
    });
    for &pid in &pids {
        if cmd::alive(pid) {
            cmd::kill(pid, libc::SIGKILL);
        }
    }
    report.killed = pids;

    // Bridges. If ovsdb-server is not running there is nothing live to delete; stale rows
    // in its database are removed by the next `up`, which starts the daemons first.
    if let Some(bridges) = ovs::list_bridges() {
        for br in bridges.into_iter().filter(|b| owned(prefix, b)) {
            tracing::info!(bridge = %br, "deleting OVS bridge");
            match cmd::run(&["ovs-vsctl", "--timeout=30", "--if-exists", "del-br", &br]) {
                Ok(_) => report.bridges.push(br),
                Err(e) => failures.push(e.to_string()),
            }
        }
    }

    for ns in namespaces {
        tracing::info!(netns = %ns, "deleting namespace");
        match cmd::run(&["ip", "netns", "del", &ns]) {
            Ok(_) => report.namespaces.push(ns),
            Err(e) => failures.push(e.to_string()),
        }
    }

    // Whatever is left: switch-to-switch veths, root ends of host links (the kernel removes
    // those asynchronously after `ip netns del`, so some may still be listed), stale bridge
    // tap devices. Deleting one veth end deletes its peer, which may still be in our list:
    // an interface that is gone by the time we delete it is not a failure.
    for link in list_links()?.into_iter().filter(|l| owned(prefix, l)) {
        match cmd::run(&["ip", "link", "del", &link]) {
            Ok(_) => {
                tracing::info!(link = %link, "deleted interface");
                report.links.push(link);
            }
            Err(e) => {
                if list_links()?.contains(&link) {
                    failures.push(e.to_string());
                }
            }
        }
    }

    match failures.first() {
        None => Ok(report),
        Some(_) => Err(Error::Command {
            command: format!("down {prefix}"),
            status: format!("{} removal(s) failed", failures.len()),
            stderr: failures.join("; "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_needs_the_separator() {
        assert!(owned("ncp", "ncp-prod"));
        assert!(owned("ncp", "ncp-prod-p1"));
        assert!(!owned("ncp", "ncp2-prod"));
        assert!(!owned("ncp", "ncp"));
        assert!(!owned("nt1", "nt10-prod"));
        assert!(!owned("ncp", "eth0"));
    }
}
