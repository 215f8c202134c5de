//! The middlebox's TOML configuration: interfaces, queues and their cores, the addresses
//! and ports the data plane owns, and the redirect rules. Parsing and validation are pure
//! so `ncp-middlebox check` and the unit tests exercise exactly what `run` uses.

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::credentials::ServiceProtocol;
use crate::rules::{Ipv4Prefix, RedirectRule};

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
    /// Replicated services: each implies a redirect rule for its clients.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Global caps over all services.
    #[serde(default)]
    pub limits: Limits,
    /// The XDP data plane's user-space TCP connections.
    #[serde(default)]
    pub tcp: TcpTuning,
}

/// Settings of every user-space TCP connection (XDP mode; sockets mode uses the kernel's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpTuning {
    /// Receive buffer and send buffer per connection, bytes each. They bound a
    /// connection's window, so throughput per connection (≈ buffer / round trip), and are
    /// most of a session's memory: 1,000 sessions with one replica hold 3,000
    /// connections, 2 buffers each.
    pub buffer_bytes: usize,
    /// smoltcp's own congestion control, for `loss_recovery = "smoltcp"` only: `cubic`
    /// (the default there), `reno` or `none` (send the whole window at once; only for a
    /// lossless path). With the recovery layer (`loss_recovery = "ncp"`, the default) the
    /// layer is the congestion control (initial window of ten segments, halved on loss,
    /// paced), and setting this is an error: stacked under the layer, smoltcp's
    /// controllers started every connection at a 2 KiB window, which cost a 70 KB answer
    /// several extra round trips.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub congestion_control: Option<Congestion>,
    /// Who repairs lost segments: `ncp` (default), the data plane's own recovery layer
    /// under smoltcp, or `smoltcp` alone (its timeout has a 1 s floor). With 1 % loss at
    /// the primary's ingress on 200 Mbit/s links one stream carried 0.16 Gbit/s with the
    /// layer and 0.001 Gbit/s without it (the `loss` benchmark).
    pub loss_recovery: LossRecovery,
}

impl Default for TcpTuning {
    fn default() -> Self {
        Self {
            buffer_bytes: 64 * 1024,
            congestion_control: None,
            loss_recovery: LossRecovery::default(),
        }
    }
}

impl TcpTuning {
    /// The congestion control smoltcp runs itself: none under the recovery layer, which
    /// keeps the window; otherwise the configured one (CUBIC unless set).
    pub fn smoltcp_congestion(&self) -> Congestion {
        match self.loss_recovery {
            LossRecovery::Ncp => Congestion::None,
            LossRecovery::Smoltcp => self.congestion_control.unwrap_or_default(),
        }
    }
}

/// Who recovers the user-space TCP connections' lost segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossRecovery {
    /// The recovery layer under smoltcp (the default): fast retransmit, partial-ACK and
    /// SACK recovery, a 200 ms timeout floor, tail-loss probes, a congestion window that
    /// halves on loss, pacing.
    #[default]
    Ncp,
    /// smoltcp alone: a lost segment waits for its 1 s timeout unless three duplicate
    /// ACKs that do not move the window come (`cargo xtask bench loss` shows the cost).
    Smoltcp,
}

/// A congestion control algorithm of smoltcp's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Congestion {
    /// CUBIC (RFC 9438).
    #[default]
    Cubic,
    /// NewReno-style AIMD.
    Reno,
    /// None: the sender fills the peer's window at once.
    None,
}

impl Congestion {
    /// The name a configuration file uses for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cubic => "cubic",
            Self::Reno => "reno",
            Self::None => "none",
        }
    }
}

/// Smallest per-connection buffer accepted: below a few segments TCP crawls.
pub const MIN_TCP_BUFFER: usize = 4 * 1024;
/// Largest per-connection buffer accepted (smoltcp scales windows up to 1 GiB, but a
/// relay needs nowhere near that per connection).
pub const MAX_TCP_BUFFER: usize = 16 << 20;

/// First rule id used for the rules that services imply; operator rules stay below it.
pub const SERVICE_RULE_ID_BASE: u32 = 0x8000_0000;

/// One replicated TCP service: clients' connections to `primary` are terminated by the
/// middlebox, which opens its own connections to the primary and every replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// The primary server; clients address it, the middlebox answers in its name.
    pub primary: SocketAddrV4,
    /// Clients whose connections are replicated (default: all).
    #[serde(default = "any_client")]
    pub clients: Ipv4Prefix,
    /// Replica servers that receive a copy of every client byte stream.
    #[serde(default)]
    pub replicas: Vec<SocketAddrV4>,
    /// Interface the replicas are reached through (the paper's separate replication NIC);
    /// by default the one the client arrived on.
    #[serde(default)]
    pub replica_interface: Option<String>,
    /// How far (bytes) a replica may fall behind before it is cut loose.
    #[serde(default = "default_replica_budget")]
    pub replica_budget_bytes: u64,
    /// Client bytes buffered for the primary before the client is slowed down.
    #[serde(default = "default_primary_budget")]
    pub primary_budget_bytes: u64,
    /// Seconds without traffic before a session is reset.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds an upstream may take to accept the connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Record the clients' byte streams to files (offline asynchronous mode), besides or
    /// instead of the live `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordSpec>,
    /// Compare each replica's answers with the primary's to detect a replica that has
    /// diverged (`"replies"`), or not (`"off"`, the default: only a service that answers
    /// the same bytes to the same requests can be verified; see the README). A verified
    /// session ends only once each replica has answered as much as the primary (or
    /// closed, or the 10 s drain time ran out).
    #[serde(default)]
    pub verify: Verify,
    /// With `verify = "replies"`: most answer bytes held, per replica and session, while
    /// one side's answer is ahead of the other's; beyond it that replica is not verified
    /// for the rest of the session (counted, not a divergence).
    #[serde(default = "default_verify_window")]
    pub verify_window_bytes: u64,
    /// Directory for the on-disk spools of replicas that fall more than
    /// `replica_budget_bytes` behind: with it (and `spill_budget_bytes`) such a replica
    /// is fed from its spool as it catches up instead of being detached. Created when
    /// first needed; spool files are removed when their session or replica ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_dir: Option<PathBuf>,
    /// With `spill_dir`: most bytes one replica's spool may hold in one session before
    /// the replica is detached after all (and marked diverged). At least
    /// `replica_budget_bytes`. 0 (the default): no spilling.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spill_budget_bytes: u64,
    /// The protocol the service speaks, for a protocol-aware session start
    /// (`"postgres"` or `"redis"`): the client's start-up then goes to the primary only, and each
    /// replica logs in with its own `credentials`. Left out: every client byte goes to
    /// every replica as it is (the replicas must accept the primary's login).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ServiceProtocol>,
    /// With `protocol`: per replica, the secret file (mode 0600, on the middlebox's host)
    /// with its `user` and `password`, e.g. `credentials = { "198.18.2.3:5432" =
    /// "/etc/ncp/replica.secret" }`. A replica without one logs in as the client's user
    /// without a password.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub credentials: BTreeMap<SocketAddrV4, PathBuf>,
    /// Bytes a tunnel adds to this service's client frames on their way here (4 for the
    /// controller's VLAN and MPLS modes; the controller sets it in the services it
    /// pushes). The clients' full-size segments must still fit the links once tagged, so
    /// the IP MTU of XDP mode's connections on client-facing interfaces, and with it the
    /// MSS advertised to clients, is the interface's `mtu` less the largest such overhead
    /// of all services (see [`Config::client_mtu`]); sockets mode's listeners for this
    /// service advertise [`Config::tunnel_mss`]. At most [`MAX_TUNNEL_OVERHEAD`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tunnel_overhead_bytes: u16,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The largest tunnel overhead a service may name: a few MPLS label stack entries or
/// VLAN tags, far more than the controller's modes add.
pub const MAX_TUNNEL_OVERHEAD: u16 = 64;

/// Whether a service's replicas' answers are verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Answers are read and dropped (the default: costs nothing, and a protocol whose
    /// answers carry per-server data would otherwise look diverged on every session).
    #[default]
    Off,
    /// Answers are compared byte for byte with the primary's.
    Replies,
}

/// Where and how a service's sessions are recorded (pcapng files, replayable with
/// `ncp-replay`). In TOML: `record = { dir = "/var/lib/ncp/rec" }` under a service, or a
/// `[services.record]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    /// Directory for the files (created at start if missing); they are named after the
    /// service, so services may share a directory.
    pub dir: PathBuf,
    /// Start a new file once the current one has this many bytes.
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    /// Start a new file after this many seconds.
    #[serde(default = "default_rotate_secs")]
    pub rotate_secs: u64,
    /// Messages (one per read accepted from a client, plus opens and closes) queued
    /// between the workers and the file writer; when full, the session being fed stops
    /// being recorded rather than slowing the worker down. Each message holds one read's
    /// bytes (at most 64 KiB in either mode), so this also bounds the memory a recorder
    /// that falls behind can hold: 8192 × 64 KiB = 512 MiB worst case with the default.
    #[serde(default = "default_record_queue")]
    pub queue_capacity: usize,
    /// Record the primary's answers as well (replay does not need them; inspection may).
    #[serde(default)]
    pub responses: bool,
}

fn default_rotate_bytes() -> u64 {
    1 << 30
}
fn default_rotate_secs() -> u64 {
    3600
}
fn default_record_queue() -> usize {
    8192
}

fn any_client() -> Ipv4Prefix {
    Ipv4Prefix {
        addr: Ipv4Addr::UNSPECIFIED,
        len: 0,
    }
}
fn default_replica_budget() -> u64 {
    4 << 20
}
fn default_primary_budget() -> u64 {
    1 << 20
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_verify_window() -> u64 {
    256 << 10
}

impl ServiceConfig {
    /// The redirect rule steering this service's clients to the data plane.
    pub fn rule(&self, index: usize) -> RedirectRule {
        RedirectRule {
            id: SERVICE_RULE_ID_BASE + index as u32,
            source: self.clients,
            source_port: None,
            destination: *self.primary.ip(),
            destination_port: self.primary.port(),
        }
    }

    /// Idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// Connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

/// Global caps; beyond them new client connections are refused with a reset and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most concurrent sessions per worker.
    pub max_sessions: usize,
    /// Most buffer memory per worker, bytes.
    pub max_buffer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            max_buffer_bytes: 1 << 30,
        }
    }
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
    /// IP MTU of XDP mode's connections on this interface (the link's own MTU); the MSS
    /// the middlebox advertises to clients is this minus 40, less the services' tunnel
    /// overhead (see [`ServiceConfig::tunnel_overhead_bytes`]), so that clients behind a
    /// VLAN or MPLS tunnel send segments that still fit once tagged.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Queues served, each by one worker pinned to a core.
    pub queues: Vec<QueueConfig>,
}

fn default_umem_frames() -> u32 {
    4096
}

fn default_mtu() -> u16 {
    1500
}

/// The MTUs an interface may have: IPv4's minimum to what one UMEM frame holds.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=4000;

/// Inclusive range of local ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
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
            if !MTU_RANGE.contains(&iface.mtu) {
                return invalid(format!(
                    "{at}.mtu {} is outside {}..={} (IPv4's minimum to what one UMEM frame holds)",
                    iface.mtu,
                    MTU_RANGE.start(),
                    MTU_RANGE.end()
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
        self.validate_services()?;
        let mut ids = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.id >= SERVICE_RULE_ID_BASE {
                return invalid(format!(
                    "rules[{i}]: ids from {SERVICE_RULE_ID_BASE} up are reserved for services"
                ));
            }
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

impl Config {
    /// Every rule to install: the operator's and the ones services imply.
    pub fn all_rules(&self) -> Vec<RedirectRule> {
        let implied = self.services.iter().enumerate().map(|(i, s)| s.rule(i));
        self.rules.iter().copied().chain(implied).collect()
    }

    /// Service checks, including the paper's R4: primary and replicas share no host, and
    /// the middlebox is neither.
    fn validate_services(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let own: Vec<Ipv4Addr> = self.interfaces.iter().map(|i| i.address).collect();
        let mut names = HashSet::new();
        let mut endpoints = HashSet::new();
        if self.limits.max_sessions == 0 || self.limits.max_buffer_bytes == 0 {
            return invalid("limits: max_sessions and max_buffer_bytes must be above 0".into());
        }
        if !(MIN_TCP_BUFFER..=MAX_TCP_BUFFER).contains(&self.tcp.buffer_bytes) {
            return invalid(format!(
                "tcp.buffer_bytes = {} is outside {MIN_TCP_BUFFER}..={MAX_TCP_BUFFER}",
                self.tcp.buffer_bytes
            ));
        }
        if let (LossRecovery::Ncp, Some(set)) =
            (self.tcp.loss_recovery, self.tcp.congestion_control)
        {
            return invalid(format!(
                "tcp.congestion_control = \"{}\" applies only with loss_recovery = \"smoltcp\": \
                 with loss_recovery = \"ncp\" (the default) the recovery layer is the \
                 congestion control (initial window of ten segments, halved on loss, paced); \
                 remove the setting, or set loss_recovery = \"smoltcp\" to use it",
                set.name()
            ));
        }
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({})", s.name);
            if s.name.is_empty() || !names.insert(s.name.as_str()) {
                return invalid(format!(
                    "{at}: every service needs a unique, non-empty name"
                ));
            }
            if !endpoints.insert(s.primary) {
                return invalid(format!(
                    "{at}: primary {} is already another service's",
                    s.primary
                ));
            }
            if s.primary.port() == 0 || s.primary.ip().is_unspecified() {
                return invalid(format!(
                    "{at}.primary {} needs an address and a port",
                    s.primary
                ));
            }
            if own.contains(s.primary.ip()) {
                return invalid(format!(
                    "{at}.primary {} is the middlebox's own address",
                    s.primary
                ));
            }
            if s.replicas.len() > usize::from(ncp_replication::MAX_REPLICAS) {
                return invalid(format!(
                    "{at}: {} replicas, at most {} are supported",
                    s.replicas.len(),
                    ncp_replication::MAX_REPLICAS
                ));
            }
            let mut seen = HashSet::new();
            for (j, r) in s.replicas.iter().enumerate() {
                let rat = format!("{at}.replicas[{j}] ({r})");
                if r.ip() == s.primary.ip() {
                    return invalid(format!(
                        "{rat}: a replica on the primary's host ({}) would share its fate (R4)",
                        s.primary.ip()
                    ));
                }
                if own.contains(r.ip()) {
                    return invalid(format!(
                        "{rat}: a replica cannot be the middlebox itself (R4)"
                    ));
                }
                if s.clients.len == 32 && s.clients.addr == *r.ip() {
                    return invalid(format!("{rat}: a replica cannot be the client host (R4)"));
                }
                if r.port() == 0 || r.ip().is_unspecified() {
                    return invalid(format!("{rat}: needs an address and a port"));
                }
                if !seen.insert(*r) {
                    return invalid(format!("{rat}: listed twice"));
                }
            }
            if let Some(name) = &s.replica_interface
                && !self.interfaces.iter().any(|i| &i.name == name)
            {
                return invalid(format!(
                    "{at}.replica_interface `{name}` is not one of the configured interfaces"
                ));
            }
            let session = s.session_config();
            session
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("{at}: {e}")))?;
            if s.verify == Verify::Replies && s.verify_window_bytes == 0 {
                return invalid(format!(
                    "{at}: verify = \"replies\" needs verify_window_bytes above 0"
                ));
            }
            match (&s.spill_dir, s.spill_budget_bytes) {
                (None, 0) => {}
                (Some(dir), 0) => {
                    return invalid(format!(
                        "{at}: spill_dir = {dir:?} needs spill_budget_bytes above 0 (the most one replica's spool may hold)"
                    ));
                }
                (None, _) => {
                    return invalid(format!(
                        "{at}: spill_budget_bytes needs spill_dir (the directory the spools go to)"
                    ));
                }
                (Some(dir), _) if dir.as_os_str().is_empty() => {
                    return invalid(format!(
                        "{at}: spill_dir is empty: name the directory the spools go to"
                    ));
                }
                (Some(_), _) => {}
            }
            s.start_spec()
                .map_err(|e| ConfigError::Invalid(format!("{at}: {e}")))?;
            if s.idle_timeout_secs == 0 || s.connect_timeout_secs == 0 {
                return invalid(format!("{at}: timeouts must be at least 1 second"));
            }
            if let Some(r) = &s.record {
                r.validate()
                    .map_err(|e| ConfigError::Invalid(format!("services[{i}].record.{e}")))?;
            }
            if s.tunnel_overhead_bytes > MAX_TUNNEL_OVERHEAD {
                return invalid(format!(
                    "{at}.tunnel_overhead_bytes {} is above {MAX_TUNNEL_OVERHEAD}",
                    s.tunnel_overhead_bytes
                ));
            }
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            if self.client_mtu(iface) < *MTU_RANGE.start() {
                return invalid(format!(
                    "interfaces[{i}] ({}).mtu {} less the services' tunnel overhead of {} \
                     leaves less than IPv4's minimum MTU {}",
                    iface.name,
                    iface.mtu,
                    self.tunnel_headroom(),
                    MTU_RANGE.start()
                ));
            }
        }
        Ok(())
    }

    /// The largest tunnel overhead of the services (0 without tunnels).
    pub fn tunnel_headroom(&self) -> u16 {
        self.services
            .iter()
            .map(|s| s.tunnel_overhead_bytes)
            .max()
            .unwrap_or(0)
    }

    /// The IP MTU of XDP mode's connections on `iface` when it faces clients: its `mtu`
    /// less [`Config::tunnel_headroom`], so that the MSS advertised to clients (this
    /// minus 40) leaves room for the tag their frames carry across the tunnel. Every
    /// service is reachable on every client-facing interface, hence the largest overhead.
    pub fn client_mtu(&self, iface: &InterfaceConfig) -> u16 {
        iface.mtu.saturating_sub(self.tunnel_headroom())
    }

    /// Sockets mode's MSS for the clients of `service` when they reach it through a
    /// tunnel: the smallest interface `mtu` less the service's overhead and 40 bytes of
    /// headers. `None` without a tunnel (the kernel chooses, from the route's MTU).
    pub fn tunnel_mss(&self, service: &ServiceConfig) -> Option<u16> {
        if service.tunnel_overhead_bytes == 0 {
            return None;
        }
        let mtu = self.interfaces.iter().map(|i| i.mtu).min()?;
        Some(mtu.saturating_sub(service.tunnel_overhead_bytes.saturating_add(40)))
    }
}

impl RecordSpec {
    /// Checks the fields; the error starts with the field's name so the caller can prefix
    /// the service's path.
    fn validate(&self) -> Result<(), String> {
        if self.dir.as_os_str().is_empty() {
            return Err("dir is empty: name the directory the recordings go to".into());
        }
        // Zero would mean "never rotate" to the recorder; a bounded file size and age is
        // what keeps a recording disk manageable, so it is asked for explicitly.
        if self.rotate_bytes == 0 {
            return Err("rotate_bytes must be above 0".into());
        }
        if self.rotate_secs == 0 {
            return Err("rotate_secs must be above 0".into());
        }
        if self.queue_capacity == 0 {
            return Err("queue_capacity must be above 0".into());
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// The protocol-aware session start, with the replicas' secret files read.
    pub fn start_spec(&self) -> Result<Option<ncp_replication::start::StartSpec>, String> {
        crate::credentials::start_spec(self.protocol, &self.replicas, &self.credentials)
    }

    /// The replication core's per-session configuration for this service, without the
    /// protocol-aware start (see [`ServiceConfig::start_spec`]).
    pub fn session_config(&self) -> ncp_replication::SessionConfig {
        ncp_replication::SessionConfig {
            replica_count: self.replicas.len().min(usize::from(u16::MAX)) as u16,
            replica_budget_bytes: self.replica_budget_bytes,
            primary_budget_bytes: self.primary_budget_bytes,
            idle_timeout: self.idle_timeout(),
            connect_timeout: self.connect_timeout(),
            verify_window_bytes: match self.verify {
                Verify::Replies => self.verify_window_bytes,
                Verify::Off => 0,
            },
            spill_budget_bytes: if self.spill_dir.is_some() {
                self.spill_budget_bytes
            } else {
                0
            },
            ..ncp_replication::SessionConfig::default()
        }
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
        assert_eq!(c.interfaces[0].mtu, 1500);
        assert_eq!(c.rules[0].destination_port, 5201);
    }

    #[test]
    fn the_mtu_leaves_room_for_a_tunnel_within_bounds() {
        let with =
            |mtu: u16| GOOD.replace("queues = [", &format!("mtu = {mtu}\n        queues = ["));
        assert_eq!(parse(&with(1496)).unwrap().interfaces[0].mtu, 1496);
        for bad in [500, 9000] {
            assert!(error(&with(bad)).contains(&format!("eth0).mtu {bad} is outside 576..=4000")));
        }
    }

    #[test]
    fn the_services_tunnel_overhead_lowers_the_client_facing_mtu() {
        let service = |name: &str, port: u16, overhead: u16| {
            format!(
                "[[services]]\nname = \"{name}\"\nprimary = \"198.18.1.2:{port}\"\n\
                 tunnel_overhead_bytes = {overhead}\n"
            )
        };
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tunnel_headroom(), 0);
        assert_eq!(c.client_mtu(&c.interfaces[0]), 1500);
        let one = format!("{GOOD}{}", service("a", 80, 0));
        let c = parse(&one).unwrap();
        assert_eq!(
            c.tunnel_mss(&c.services[0]),
            None,
            "sockets mode: the kernel's MSS"
        );
        // The largest overhead of all services counts: every service is reachable on
        // every client-facing interface.
        let two = format!("{GOOD}{}{}", service("a", 80, 0), service("b", 81, 4));
        let c = parse(&two).unwrap();
        assert_eq!(c.tunnel_headroom(), 4);
        assert_eq!(c.client_mtu(&c.interfaces[0]), 1496);
        // Sockets mode sets each service's listeners apart.
        assert_eq!(c.tunnel_mss(&c.services[0]), None);
        assert_eq!(c.tunnel_mss(&c.services[1]), Some(1456));
        let too_big = format!("{GOOD}{}", service("a", 80, 65));
        assert!(
            error(&too_big).contains("tunnel_overhead_bytes 65 is above 64"),
            "{too_big}"
        );
        let small = GOOD.replace("queues = [", "mtu = 600\n        queues = [");
        let squeezed = format!("{small}{}", service("a", 80, 40));
        assert!(
            error(&squeezed).contains("mtu 600 less the services' tunnel overhead of 40"),
            "{squeezed}"
        );
    }

    #[test]
    fn tcp_tuning_has_defaults_and_bounds() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tcp, TcpTuning::default());
        // Under the recovery layer (the default) smoltcp runs no controller of its own.
        assert_eq!(c.tcp.smoltcp_congestion(), Congestion::None);
        let tuned = format!(
            "{GOOD}\n[tcp]\nbuffer_bytes = 8192\ncongestion_control = \"reno\"\nloss_recovery = \"smoltcp\"\n"
        );
        let c = parse(&tuned).unwrap();
        assert_eq!(c.tcp.buffer_bytes, 8192);
        assert_eq!(c.tcp.smoltcp_congestion(), Congestion::Reno);
        let tiny = format!("{GOOD}\n[tcp]\nbuffer_bytes = 100\n");
        assert!(error(&tiny).contains("tcp.buffer_bytes = 100"));
        let unknown = format!(
            "{GOOD}\n[tcp]\nbuffer_bytes = 8192\ncongestion_control = \"bbr\"\nloss_recovery = \"smoltcp\"\n"
        );
        assert!(error(&unknown).contains("bbr"));
        // Two controllers stacked started every connection at smoltcp's 2 KiB window.
        let stacked = format!("{GOOD}\n[tcp]\ncongestion_control = \"cubic\"\n");
        let msg = error(&stacked);
        assert!(
            msg.contains(
                "tcp.congestion_control = \"cubic\" applies only with loss_recovery = \"smoltcp\""
            ),
            "{msg}"
        );
        let sized = parse(&format!("{GOOD}\n[tcp]\nbuffer_bytes = 8192\n")).unwrap();
        assert_eq!(
            sized.tcp.loss_recovery,
            LossRecovery::Ncp,
            "the layer is on unless switched off"
        );
        // A partial [tcp] table keeps the defaults of what it leaves out.
        let partial = format!("{GOOD}\n[tcp]\nloss_recovery = \"smoltcp\"\n");
        let p = parse(&partial).unwrap();
        assert_eq!(p.tcp.loss_recovery, LossRecovery::Smoltcp);
        assert_eq!(p.tcp.buffer_bytes, TcpTuning::default().buffer_bytes);
        let alone = format!(
            "{GOOD}\n[tcp]\nbuffer_bytes = 8192\ncongestion_control = \"cubic\"\nloss_recovery = \"smoltcp\"\n"
        );
        let alone = parse(&alone).unwrap().tcp;
        assert_eq!(alone.loss_recovery, LossRecovery::Smoltcp);
        assert_eq!(alone.smoltcp_congestion(), Congestion::Cubic);
        let unset = format!("{GOOD}\n[tcp]\nloss_recovery = \"smoltcp\"\n");
        assert_eq!(
            parse(&unset).unwrap().tcp.smoltcp_congestion(),
            Congestion::Cubic,
            "smoltcp alone keeps CUBIC unless told otherwise"
        );
        let wrong = format!(
            "{GOOD}\n[tcp]\nbuffer_bytes = 8192\ncongestion_control = \"cubic\"\nloss_recovery = \"linux\"\n"
        );
        assert!(error(&wrong).contains("linux"));
    }

    const SERVICE: &str = r#"
        [[services]]
        name = "redis"
        primary = "198.18.1.2:6379"
        clients = "198.18.1.0/24"
        replicas = ["198.18.2.3:6379"]
    "#;

    /// The middlebox_config fuzz target's seeds: the configurations these tests accept.
    #[test]
    fn fuzz_seeds_are_valid_configs() {
        let seeds = [
            ("rules", GOOD.to_string()),
            ("service", format!("{GOOD}{SERVICE}")),
            (
                "service-recorded-verified",
                format!(
                    "{GOOD}{SERVICE}verify = \"replies\"\n[services.record]\ndir = \"rec\"\n\
                     rotate_bytes = 4096\nrotate_secs = 5\n\n[limits]\nmax_sessions = 64\n\
                     max_buffer_bytes = 1048576\n\n[tcp]\nbuffer_bytes = 65536\n\
                     loss_recovery = \"ncp\"\n"
                ),
            ),
        ];
        for (name, text) in &seeds {
            parse(text).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        }
        let seeds: Vec<(String, Vec<u8>)> = seeds
            .into_iter()
            .map(|(name, text)| (format!("{name}.toml"), text.into_bytes()))
            .collect();
        ncp_testbed::fuzz_seeds::sync("middlebox_config", &seeds);
    }

    #[test]
    fn services_imply_rules_and_session_configs() {
        let c = parse(&format!("{GOOD}{SERVICE}")).unwrap();
        let rules = c.all_rules();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[1].id, SERVICE_RULE_ID_BASE);
        assert_eq!(rules[1].destination_port, 6379);
        assert_eq!(c.services[0].session_config().replica_count, 1);
        assert_eq!(c.services[0].replica_budget_bytes, 4 << 20);
        assert_eq!(c.services[0].verify, Verify::Off);
        assert_eq!(c.services[0].session_config().verify_window_bytes, 0);
    }

    #[test]
    fn reply_verification_is_chosen_per_service() {
        let c = parse(&format!("{GOOD}{SERVICE}verify = \"replies\"\n")).unwrap();
        assert_eq!(c.services[0].verify, Verify::Replies);
        assert_eq!(
            c.services[0].session_config().verify_window_bytes,
            256 << 10
        );
        let no_window = format!("{GOOD}{SERVICE}verify = \"replies\"\nverify_window_bytes = 0\n");
        assert!(error(&no_window).contains("verify_window_bytes"));
        let huge =
            format!("{GOOD}{SERVICE}verify = \"replies\"\nverify_window_bytes = 4294967296\n");
        assert!(error(&huge).contains("verify_window_bytes"));
        assert!(error(&format!("{GOOD}{SERVICE}verify = \"maybe\"\n")).contains("verify"));
    }

    #[test]
    fn spilling_is_off_by_default_and_needs_a_directory_and_a_budget() {
        let c = parse(&format!("{GOOD}{SERVICE}")).unwrap();
        assert_eq!(c.services[0].spill_dir, None);
        assert_eq!(c.services[0].session_config().spill_budget_bytes, 0);
        assert!(!toml::to_string(&c).unwrap().contains("spill"));

        let on = format!(
            "{GOOD}{SERVICE}spill_dir = \"/var/lib/ncp/spill\"\nspill_budget_bytes = 67108864\n"
        );
        let c = parse(&on).unwrap();
        assert_eq!(c.services[0].session_config().spill_budget_bytes, 64 << 20);
        assert_eq!(
            c.services[0].spill_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/ncp/spill"))
        );

        // A misconfigured spill, and what the error names.
        for (spill, expected) in [
            (
                "spill_dir = \"/tmp/s\"\n",
                &["needs spill_budget_bytes"][..],
            ),
            ("spill_budget_bytes = 67108864\n", &["needs spill_dir"]),
            (
                "spill_dir = \"\"\nspill_budget_bytes = 67108864\n",
                &["spill_dir is empty"],
            ),
            (
                "spill_dir = \"/tmp/s\"\nspill_budget_bytes = 1024\n",
                &["services[0]", "below replica_budget_bytes"],
            ),
        ] {
            let e = error(&format!("{GOOD}{SERVICE}{spill}"));
            assert!(expected.iter().all(|x| e.contains(x)), "{spill:?}: {e}");
        }
    }

    #[test]
    fn r4_replicas_share_no_host_with_primary_client_or_middlebox() {
        let with = |replica: &str| format!("{GOOD}{}", SERVICE.replace("198.18.2.3:6379", replica));
        assert!(error(&with("198.18.1.2:7000")).contains("R4"));
        assert!(error(&with("198.18.1.4:6379")).contains("middlebox"));
        let client = format!(
            "{GOOD}{}",
            SERVICE.replace("198.18.1.0/24", "198.18.2.3/32")
        );
        assert!(error(&client).contains("client host"));
        let twice = format!(
            "{GOOD}{}",
            SERVICE.replace(
                "[\"198.18.2.3:6379\"]",
                "[\"198.18.2.3:6379\", \"198.18.2.3:6379\"]"
            )
        );
        assert!(error(&twice).contains("twice"));
        let own_primary = format!(
            "{GOOD}{}",
            SERVICE.replace("198.18.1.2:6379", "198.18.1.4:6379")
        );
        assert!(error(&own_primary).contains("own address"));
        let bad_iface = format!("{GOOD}{SERVICE}replica_interface = \"eth9\"\n");
        assert!(error(&bad_iface).contains("eth9"));
        let budget = format!("{GOOD}{SERVICE}replica_budget_bytes = 0\n");
        assert!(error(&budget).contains("services[0]"));
    }

    #[test]
    fn a_recording_takes_defaults_and_needs_no_replicas() {
        let c = parse(&format!(
            "{GOOD}{SERVICE}record = {{ dir = \"/var/lib/ncp/rec\" }}\n"
        ))
        .unwrap();
        let r = c.services[0].record.as_ref().unwrap();
        assert_eq!(r.dir, PathBuf::from("/var/lib/ncp/rec"));
        assert_eq!(r.rotate_bytes, 1 << 30);
        assert_eq!(r.rotate_secs, 3600);
        assert_eq!(r.queue_capacity, 8192);
        assert!(!r.responses);

        // Recording instead of replicas, every field given, as a table of its own.
        let only = format!(
            "{GOOD}{}[services.record]\ndir = \"rec\"\nrotate_bytes = 4096\nrotate_secs = 5\nqueue_capacity = 16\nresponses = true\n",
            SERVICE.replace("replicas = [\"198.18.2.3:6379\"]", "")
        );
        let c = parse(&only).unwrap();
        assert!(c.services[0].replicas.is_empty());
        assert_eq!(
            c.services[0].record,
            Some(RecordSpec {
                dir: "rec".into(),
                rotate_bytes: 4096,
                rotate_secs: 5,
                queue_capacity: 16,
                responses: true,
            })
        );
        assert_eq!(c.services[0].session_config().replica_count, 0);

        // A service without `record` serialises without it (older readers keep working),
        // and one with it survives a round trip.
        let plain = parse(&format!("{GOOD}{SERVICE}")).unwrap();
        assert!(plain.services[0].record.is_none());
        assert!(!toml::to_string(&plain).unwrap().contains("record"));
        let back: Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn recording_errors_name_the_field() {
        let with = |fields: &str| format!("{GOOD}{SERVICE}record = {{ {fields} }}\n");
        let e = error(&with("dir = \"\""));
        assert!(e.contains("services[0].record.dir"), "{e}");
        for field in ["rotate_bytes", "rotate_secs", "queue_capacity"] {
            let e = error(&with(&format!("dir = \"rec\", {field} = 0")));
            assert!(e.contains(&format!("services[0].record.{field}")), "{e}");
        }
        // Unknown fields and a missing directory are caught by the parser, by name.
        assert!(error(&with("dir = \"rec\", rotate = 1")).contains("rotate"));
        assert!(error(&with("responses = true")).contains("dir"));
    }

    #[test]
    fn errors_name_the_bad_field() {
        // (what GOOD says, what the broken file says instead, what the error must name)
        let edits = [
            ("core = 0", "core = 9", "core 9"),
            (
                "\"eth0\"",
                "\"a-very-long-interface-name\"",
                "interfaces[0].name",
            ),
            ("first = 40000", "first = 50000", "ports"),
            ("poll = \"sleep\"", "poll = \"nap\"", "nap"),
            (
                "destination_port = 5201",
                "destination_port = 0",
                "rules[0]",
            ),
            (
                "source = \"198.18.1.0/24\"",
                "source = \"198.18.1.0/40\"",
                "40",
            ),
            (
                "address = \"198.18.1.4\"",
                "address = \"0.0.0.0\"",
                "unicast",
            ),
            (
                "queues = [{ queue = 0, core = 0 }]",
                "queues = []",
                "queues is empty",
            ),
        ];
        for (good, bad, named) in edits {
            assert!(GOOD.contains(good), "GOOD has no {good:?}");
            let e = error(&GOOD.replace(good, bad));
            assert!(e.contains(named), "{bad:?}: {e}");
        }
        assert!(error(&format!("{GOOD}\nbogus = 1")).contains("bogus"));
        assert!(error("interfaces = []").contains("empty"));
        let twice = format!(
            "{GOOD}\n[[rules]]\nid = 1\nsource = \"0.0.0.0/0\"\ndestination = \"198.18.1.3\"\ndestination_port = 80\n"
        );
        assert!(error(&twice).contains("used twice"));
    }
}
