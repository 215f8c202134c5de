//! Loads NCP's XDP program, attaches it to an interface and owns its maps: the redirect
//! rules, the endpoints the data plane owns, the per-queue AF_XDP sockets and the verdict
//! counters. Dropping a [`Steering`] detaches the program; because the attachment is a
//! BPF link owned by this process, the kernel also detaches it if the process dies.

use std::{collections::HashMap, net::Ipv4Addr, os::fd::AsRawFd};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, PerCpuArray, XskMap, lpm_trie::Key},
    programs::{Xdp, XdpMode},
};
use ncp_common::{
    BASELINE_PROGRAM_NAME, MAP_OWNED_ENDPOINTS, MAP_REDIRECT_RULES, MAP_RULE_PORTS,
    MAP_VERDICT_COUNTERS, MAP_XSKS, OwnedEndpoints, PROGRAM_NAME, RuleKey, RuleValue, Verdict,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{PortRange, XdpAttachMode},
    rules::RedirectRule,
};

/// The XDP object built by `build.rs` from `xdp-ebpf/`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ncp-xdp"));

/// Failures of the steering layer, each naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// The embedded object could not be loaded into the kernel.
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program-level step failed.
    #[error("{what}: {source}")]
    Program {
        /// The step.
        what: String,
        /// Underlying error.
        source: aya::programs::ProgramError,
    },
    /// A map-level step failed.
    #[error("{what}: {source}")]
    Map {
        /// The step.
        what: String,
        /// Underlying error.
        source: aya::maps::MapError,
    },
    /// The object lacks a map or program this code expects (a build mismatch).
    #[error("the XDP object has no {0}")]
    Missing(String),
}

/// The mode the program ended up attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachedMode {
    /// Native driver mode.
    Driver,
    /// Generic (skb) mode.
    Generic,
}

/// Verdict counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCounters {
    /// Frames steered into an AF_XDP socket.
    pub redirected: u64,
    /// Frames that matched nothing and went to the kernel.
    pub passed: u64,
    /// Frames the program could not parse (truncated, options, fragments).
    pub unparsed: u64,
    /// Matching frames on a queue without a socket.
    pub no_socket: u64,
    /// Matching frames the redirect helper refused.
    pub redirect_failed: u64,
}

/// How many of the installed rules (trie key → destination port) name `port`.
fn rules_naming_port(installed: &HashMap<(u32, RuleKey), u16>, port: u16) -> u32 {
    let n = installed.values().filter(|p| **p == port).count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Loads program `name` from NCP's object and attaches it to `interface` in `mode`
/// (`Auto`: native, falling back to generic with a warning). The program stays attached
/// as long as the returned [`Ebpf`] lives.
fn load_and_attach(
    name: &str,
    interface: &str,
    mode: XdpAttachMode,
) -> Result<(Ebpf, AttachedMode), SteeringError> {
    let mut ebpf = Ebpf::load(PROGRAM_OBJECT)?;
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| SteeringError::Missing(format!("program {name}")))?
        .try_into()
        .map_err(|source| SteeringError::Program {
            what: format!("{name} is not an XDP program"),
            source,
        })?;
    program.load().map_err(|source| SteeringError::Program {
        what: "loading the XDP program into the kernel (verifier)".into(),
        source,
    })?;
    let attach = |program: &mut Xdp, mode: XdpMode| {
        program
            .attach(interface, mode)
            .map_err(|source| SteeringError::Program {
                what: format!("attaching XDP to {interface} in {mode:?} mode"),
                source,
            })
    };
    let mode = match mode {
        XdpAttachMode::Driver => attach(program, XdpMode::Driver).map(|_| AttachedMode::Driver)?,
        XdpAttachMode::Generic => attach(program, XdpMode::Skb).map(|_| AttachedMode::Generic)?,
        XdpAttachMode::Auto => match attach(program, XdpMode::Driver) {
            Ok(_) => AttachedMode::Driver,
            Err(e) => {
                tracing::warn!(interface, error = %e, "native XDP refused, falling back to generic mode");
                attach(program, XdpMode::Skb)?;
                AttachedMode::Generic
            }
        },
    };
    Ok((ebpf, mode))
}

/// The do-nothing program ([`BASELINE_PROGRAM_NAME`]) attached to an interface, for
/// measuring what an interface pays for running XDP at all (on veth, for instance, the
/// peer stops handing over large segments). Detached when dropped.
pub struct Baseline {
    mode: AttachedMode,
    _ebpf: Ebpf,
}

impl Baseline {
    pub fn attach(interface: &str, mode: XdpAttachMode) -> Result<Self, SteeringError> {
        let (ebpf, mode) = load_and_attach(BASELINE_PROGRAM_NAME, interface, mode)?;
        tracing::info!(
            interface,
            ?mode,
            "baseline XDP program (passes everything) attached"
        );
        Ok(Self { mode, _ebpf: ebpf })
    }

    /// How it ended up attached.
    pub fn mode(&self) -> AttachedMode {
        self.mode
    }
}

/// An attached XDP program and its maps.
pub struct Steering {
    interface: String,
    mode: AttachedMode,
    rules: LpmTrie<MapData, RuleKey, RuleValue>,
    owned: Array<MapData, OwnedEndpoints>,
    counters: PerCpuArray<MapData, u64>,
    sockets: XskMap<MapData>,
    /// Per destination port, how many installed rules name it (the program's prefilter).
    rule_ports: Array<MapData, u32>,
    /// The installed rules' trie keys, by which the per-port counts are kept exact when a
    /// rule is replaced or removed.
    installed: HashMap<(u32, RuleKey), u16>,
    // Declared last so the maps above are released before the program is detached.
    _ebpf: Ebpf,
}

impl Steering {
    /// Loads the program and attaches it to `interface`.
    pub fn attach(interface: &str, mode: XdpAttachMode) -> Result<Self, SteeringError> {
        let (mut ebpf, mode) = load_and_attach(PROGRAM_NAME, interface, mode)?;
        tracing::info!(interface, ?mode, "XDP program attached");

        let rules = take_map(&mut ebpf, MAP_REDIRECT_RULES)?;
        let owned = take_map(&mut ebpf, MAP_OWNED_ENDPOINTS)?;
        let counters = take_map(&mut ebpf, MAP_VERDICT_COUNTERS)?;
        let sockets = take_map(&mut ebpf, MAP_XSKS)?;
        let rule_ports = take_map(&mut ebpf, MAP_RULE_PORTS)?;
        Ok(Self {
            interface: interface.to_owned(),
            mode,
            rules,
            owned,
            counters,
            sockets,
            rule_ports,
            installed: HashMap::new(),
            _ebpf: ebpf,
        })
    }

    /// Interface the program is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Mode the program is attached in.
    pub fn mode(&self) -> AttachedMode {
        self.mode
    }

    /// Declares the address and ports whose traffic belongs to the workers.
    pub fn set_owned_endpoints(
        &mut self,
        addr: Ipv4Addr,
        ports: PortRange,
    ) -> Result<(), SteeringError> {
        let value = OwnedEndpoints {
            addr: addr.octets(),
            port_lo: ports.first,
            port_hi: ports.last,
        };
        self.owned
            .set(0, value, 0)
            .map_err(|source| SteeringError::Map {
                what: "writing the owned endpoints".into(),
                source,
            })
    }

    /// Installs (or replaces) a redirect rule; takes effect for the next frame. The
    /// trie entry goes in before the port's count, so the prefilter never hides it.
    pub fn insert_rule(&mut self, rule: &RedirectRule) -> Result<(), SteeringError> {
        let (len, data) = rule.map_key();
        self.rules
            .insert(&Key::new(len, data), rule.map_value(), 0)
            .map_err(|source| SteeringError::Map {
                what: format!("inserting rule {rule}"),
                source,
            })?;
        self.installed.insert((len, data), rule.destination_port);
        self.write_port_count(rule.destination_port)
    }

    /// Removes a redirect rule.
    pub fn remove_rule(&mut self, rule: &RedirectRule) -> Result<(), SteeringError> {
        let (len, data) = rule.map_key();
        self.rules
            .remove(&Key::new(len, data))
            .map_err(|source| SteeringError::Map {
                what: format!("removing rule {rule}"),
                source,
            })?;
        self.installed.remove(&(len, data));
        self.write_port_count(rule.destination_port)
    }

    /// Writes how many installed rules name destination `port` into the prefilter.
    fn write_port_count(&mut self, port: u16) -> Result<(), SteeringError> {
        let count = rules_naming_port(&self.installed, port);
        self.rule_ports
            .set(u32::from(port), count, 0)
            .map_err(|source| SteeringError::Map {
                what: format!("writing the rule count of port {port}"),
                source,
            })
    }

    /// Binds the AF_XDP socket `fd` to receive queue `queue`'s slot.
    pub fn register_socket(&mut self, queue: u32, fd: impl AsRawFd) -> Result<(), SteeringError> {
        self.sockets
            .set(queue, fd, 0)
            .map_err(|source| SteeringError::Map {
                what: format!("registering the AF_XDP socket of queue {queue}"),
                source,
            })
    }

    /// Removes queue `queue`'s socket so its frames go to the kernel again.
    pub fn unregister_socket(&mut self, queue: u32) -> Result<(), SteeringError> {
        self.sockets
            .unset(queue)
            .map_err(|source| SteeringError::Map {
                what: format!("unregistering the AF_XDP socket of queue {queue}"),
                source,
            })
    }

    /// Reads the verdict counters, summed over CPUs.
    pub fn counters(&self) -> Result<VerdictCounters, SteeringError> {
        let read = |verdict: Verdict| -> Result<u64, SteeringError> {
            let per_cpu =
                self.counters
                    .get(&(verdict as u32), 0)
                    .map_err(|source| SteeringError::Map {
                        what: format!("reading the {} counter", verdict.name()),
                        source,
                    })?;
            Ok(per_cpu.iter().sum())
        };
        Ok(VerdictCounters {
            redirected: read(Verdict::Redirected)?,
            passed: read(Verdict::Passed)?,
            unparsed: read(Verdict::Unparsed)?,
            no_socket: read(Verdict::NoSocket)?,
            redirect_failed: read(Verdict::RedirectFailed)?,
        })
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, SteeringError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| SteeringError::Missing(format!("map {name}")))?;
    T::try_from(map).map_err(|source| SteeringError::Map {
        what: format!("map {name} has an unexpected type"),
        source,
    })
}
