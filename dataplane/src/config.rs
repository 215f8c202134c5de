//! The middlebox's TOML configuration: interfaces, queues and their cores, the addresses
//! and ports the data plane owns, and the redirect rules. Parsing and validation are pure
//! so `ncp-middlebox check` and the unit tests exercise exactly what `run` uses.

use std::{collections::HashSet, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::rules::RedirectRule;

/// Default location of the control socket that `stats` and `rule` talk to.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ncp/middlebox.sock";

/// Whole configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How idle workers wait for frames.
    #[serde(default)]
    pub poll: PollMode,
    /// Unix socket for `ncp-middlebox stats` and `ncp-middlebox rule`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Interfaces the data plane attaches to (one, or two for the paper's separate
    /// replication NIC).
    pub interfaces: Vec<InterfaceConfig>,
    /// Redirect rules installed at start; more can be added at run time.
    #[serde(default)]
    pub rules: Vec<RedirectRule>,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

/// How a worker waits when its rings are empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PollMode {
    /// Sleep in `poll(2)` with the need-wakeup protocol: right for shared hosts.
    #[default]
    Sleep,
    /// Spin on the rings: lowest latency on dedicated cores, burns a core per worker.
    Busy,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Driver,
    /// Generic (skb) mode only.
    Generic,
}

/// One network interface and the queues the data plane serves on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Kernel interface name.
    pub name: String,
    /// The data plane's own address on this interface (it connects upstream from here).
    pub address: Ipv4Addr,
    /// Local ports the workers use for upstream connections; answers to them are steered
    /// to the workers. Keep the kernel off them (`net.ipv4.ip_local_reserved_ports`).
    #[serde(default)]
    pub ports: PortRange,
    /// XDP attach mode.
    #[serde(default)]
    pub xdp_mode: XdpAttachMode,
    /// Ask for zero-copy AF_XDP (needs driver support; veth only does copy mode).
    #[serde(default)]
    pub zero_copy: bool,
    /// Frames in each queue's UMEM (a power of two).
    #[serde(default = "default_umem_frames")]
    pub umem_frames: u32,
    /// Queues served, each by one worker pinned to a core.
    pub queues: Vec<QueueConfig>,
}

fn default_umem_frames() -> u32 {
    4096
}

/// Inclusive range of local ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            first: 40000,
            last: 49999,
        }
    }
}

/// One NIC queue and the core its worker is pinned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// NIC receive queue index.
    pub queue: u32,
    /// CPU core for the worker; `None` leaves it unpinned.
    #[serde(default)]
    pub core: Option<usize>,
}

/// A configuration problem, with enough context to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// TOML syntax or schema error (the message names the line and field).
    #[error("{0}")]
    Syntax(#[from] toml::de::Error),
    /// A semantic check failed.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate(available_cores())?;
        Ok(config)
    }

    /// Semantic checks; `cores` is the number of CPUs workers may be pinned to.
    pub fn validate(&self, cores: usize) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.interfaces.is_empty() {
            return invalid("`interfaces` is empty: name at least one interface".into());
        }
        let mut names = HashSet::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            let at = format!("interfaces[{i}] ({})", iface.name);
            if iface.name.is_empty()
                || iface.name.len() > 15
                || iface.name.contains(['/', '\0', ' '])
            {
                return invalid(format!(
                    "interfaces[{i}].name `{}` is not a valid interface name (1-15 characters, no '/', space or NUL)",
                    iface.name
                ));
            }
            if !names.insert(iface.name.as_str()) {
                return invalid(format!("{at}: interface listed twice"));
            }
            if iface.address.is_unspecified()
                || iface.address.is_broadcast()
                || iface.address.is_multicast()
            {
                return invalid(format!(
                    "{at}.address {} is not a unicast address",
                    iface.address
                ));
            }
            if iface.ports.first == 0 || iface.ports.first > iface.ports.last {
                return invalid(format!(
                    "{at}.ports: first ({}) must be 1..=last ({})",
                    iface.ports.first, iface.ports.last
                ));
            }
            if !iface.umem_frames.is_power_of_two() || !(64..=1 << 20).contains(&iface.umem_frames)
            {
                return invalid(format!(
                    "{at}.umem_frames {} must be a power of two between 64 and 1048576",
                    iface.umem_frames
                ));
            }
            if iface.queues.is_empty() {
                return invalid(format!("{at}.queues is empty: serve at least queue 0"));
            }
            let mut queues = HashSet::new();
            for q in &iface.queues {
                if q.queue >= ncp_common::MAX_QUEUES {
                    return invalid(format!(
                        "{at}: queue {} is beyond the supported {} queues",
                        q.queue,
                        ncp_common::MAX_QUEUES
                    ));
                }
                if !queues.insert(q.queue) {
                    return invalid(format!("{at}: queue {} listed twice", q.queue));
                }
                if let Some(core) = q.core
                    && core >= cores
                {
                    return invalid(format!(
                        "{at}: queue {} pinned to core {core}, but this machine has cores 0..={}",
                        q.queue,
                        cores.saturating_sub(1)
                    ));
                }
            }
        }
        let mut ids = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate()
                .map_err(|e| ConfigError::Invalid(format!("rules[{i}] ({rule}): {e}")))?;
            if !ids.insert(rule.id) {
                return invalid(format!("rules[{i}]: rule id {} used twice", rule.id));
            }
        }
        if self.rules.len() > ncp_common::MAX_REDIRECT_RULES as usize {
            return invalid(format!(
                "{} rules configured, at most {} fit",
                self.rules.len(),
                ncp_common::MAX_REDIRECT_RULES
            ));
        }
        Ok(())
    }
}

/// Number of CPUs workers may be pinned to.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        poll = "sleep"
        [[interfaces]]
        name = "eth0"
        address = "198.18.1.4"
        ports = { first = 40000, last = 40999 }
        queues = [{ queue = 0, core = 0 }]

        [[rules]]
        id = 1
        source = "198.18.1.0/24"
        destination = "198.18.1.2"
        destination_port = 5201
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate(2)?;
        Ok(config)
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.interfaces[0].xdp_mode, XdpAttachMode::Auto);
        assert_eq!(c.interfaces[0].umem_frames, 4096);
        assert_eq!(c.rules[0].destination_port, 5201);
    }

    #[test]
    fn errors_name_the_bad_field() {
        assert!(error(&GOOD.replace("core = 0", "core = 9")).contains("core 9"));
        assert!(
            error(&GOOD.replace("\"eth0\"", "\"a-very-long-interface-name\""))
                .contains("interfaces[0].name")
        );
        assert!(error(&GOOD.replace("first = 40000", "first = 50000")).contains("ports"));
        assert!(error(&GOOD.replace("poll = \"sleep\"", "poll = \"nap\"")).contains("nap"));
        assert!(
            error(&GOOD.replace("destination_port = 5201", "destination_port = 0"))
                .contains("rules[0]")
        );
        assert!(
            error(&GOOD.replace("source = \"198.18.1.0/24\"", "source = \"198.18.1.0/40\""))
                .contains("40")
        );
        assert!(
            error(&GOOD.replace("address = \"198.18.1.4\"", "address = \"0.0.0.0\""))
                .contains("unicast")
        );
        assert!(
            error(&GOOD.replace("queues = [{ queue = 0, core = 0 }]", "queues = []"))
                .contains("queues is empty")
        );
        assert!(error(&format!("{GOOD}\nbogus = 1")).contains("bogus"));
        assert!(error("interfaces = []").contains("empty"));
        let twice = format!(
            "{GOOD}\n[[rules]]\nid = 1\nsource = \"0.0.0.0/0\"\ndestination = \"198.18.1.3\"\ndestination_port = 80\n"
        );
        assert!(error(&twice).contains("used twice"));
    }
}
