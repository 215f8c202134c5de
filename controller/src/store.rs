//! Desired state (pinned hosts, registered middleboxes and replications) and its file on
//! disk.
//!
//! These are the operator-facing forms: plain serde types with addresses and MACs as
//! strings, converted into the planner's types in one place ([`DesiredState::hosts`],
//! [`ReplicationSpec::to_replication`]). The file is replaced atomically (write to a
//! temporary file, fsync, rename) so a crash never leaves half a state behind.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::openflow::{Ipv4Prefix, MacAddr};
use crate::planner::{Mode, Replication};
use crate::topology::{Host, PortRef};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// A host pinned to a switch port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    pub ip: Ipv4Addr,
    /// `aa:bb:cc:dd:ee:ff`
    pub mac: String,
    pub dpid: u64,
    pub port: u32,
}

impl HostSpec {
    pub fn to_host(&self) -> Result<Host, StoreError> {
        let mac: MacAddr = self.mac.parse().map_err(|detail| StoreError::Invalid {
            what: "MAC address",
            detail,
        })?;
        Ok(Host {
            ip: self.ip,
            mac,
            at: PortRef::new(self.dpid, self.port),
        })
    }
}

/// How redirected packets reach the middlebox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModeSpec {
    Rewrite,
    Vlan { vid: u16 },
    Mpls { label: u32 },
}

/// A replication as the operator states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationSpec {
    pub id: u32,
    /// Client address or prefix: `198.18.3.11` or `198.18.3.0/24`.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    pub primary: Ipv4Addr,
    pub primary_port: u16,
    pub middlebox: Ipv4Addr,
    /// Replica servers; the middlebox is told about them, the switches are not.
    #[serde(default)]
    pub replicas: Vec<String>,
    #[serde(default = "rewrite")]
    pub mode: ModeSpec,
    /// Whether the middlebox compares the replicas' answers with the primary's (see
    /// [`VerifySpec`]). Left out of the stored and pushed JSON when off, so state files
    /// and middleboxes from before it read what is written now.
    #[serde(default, skip_serializing_if = "VerifySpec::is_off")]
    pub verify: VerifySpec,
    /// How the middlebox logs in to the replicas itself (the paper's R6); empty: the
    /// client's bytes reach them as they are. Flattened, and left out when empty.
    #[serde(flatten)]
    pub login: LoginSpec,
    /// Where the middlebox records the service's sessions (pcapng files for `ncp-replay`),
    /// a directory on the middlebox's host; left out when not recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordTarget>,
}

/// A recording directory on the middlebox's host (`ncpctl add --record DIR`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordTarget {
    /// Absolute path; the middlebox creates it if missing.
    pub dir: String,
}

impl RecordTarget {
    fn check(&self) -> Result<(), StoreError> {
        if !std::path::Path::new(&self.dir).is_absolute() || self.dir.contains('\n') {
            return Err(StoreError::Invalid {
                what: "record",
                detail: format!(
                    "{:?}: the recording directory must be an absolute path (it is on the middlebox's host)",
                    self.dir
                ),
            });
        }
        Ok(())
    }
}

/// The protocol a replication's service speaks and, per replica, the secret file the
/// middlebox logs in to it with. The files are on the middlebox's host (mode 0600, read
/// and checked by the middlebox): the controller stores and pushes only their paths, so
/// no password passes through it or shows in its API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginSpec {
    /// `postgres` or `redis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolSpec>,
    /// Replica `ip:port` → absolute path of its secret file on the middlebox's host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub credentials: BTreeMap<String, String>,
}

/// A protocol whose session start the middlebox runs per replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolSpec {
    Postgres,
    Redis,
}

impl std::str::FromStr for ProtocolSpec {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        one_of(
            "protocol",
            s,
            &[
                ("postgres", ProtocolSpec::Postgres),
                ("redis", ProtocolSpec::Redis),
            ],
        )
    }
}

/// The value named `text` among `choices`, or an error that lists them.
fn one_of<T: Copy>(what: &'static str, text: &str, choices: &[(&str, T)]) -> Result<T, StoreError> {
    choices
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            StoreError::Invalid {
                what,
                detail: format!("{text:?}: must be {}", names.join(" or ")),
            }
        })
}

impl LoginSpec {
    /// Credentials name listed replicas only, by absolute paths, and need a protocol.
    fn check(&self, replicas: &[String]) -> Result<(), StoreError> {
        let bad = |detail: String| StoreError::Invalid {
            what: "credentials",
            detail,
        };
        if self.protocol.is_none() && !self.credentials.is_empty() {
            return Err(bad("credentials need a protocol (postgres or redis)".into()));
        }
        for (replica, path) in &self.credentials {
            let known = replicas
                .iter()
                .any(|r| r.trim().parse::<std::net::SocketAddrV4>().ok() == replica.parse().ok());
            if !known {
                return Err(bad(format!("{replica} is not one of the replicas")));
            }
            if !std::path::Path::new(path).is_absolute() {
                return Err(bad(format!(
                    "{path:?} for {replica}: the secret file's path must be absolute (it is read on the middlebox's host)"
                )));
            }
        }
        Ok(())
    }
}

/// Reply verification of a replication's service on its middlebox: `replies` makes the
/// middlebox compare each replica's answers with the primary's byte for byte and mark a
/// replica that answers differently `diverged`; `off` (the default) reads and drops them.
/// Only a service that answers the same request with the same bytes can be verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifySpec {
    #[default]
    Off,
    Replies,
}

impl VerifySpec {
    pub fn is_off(&self) -> bool {
        *self == VerifySpec::Off
    }
}

impl std::str::FromStr for VerifySpec {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        one_of(
            "verify",
            s,
            &[("replies", VerifySpec::Replies), ("off", VerifySpec::Off)],
        )
    }
}

/// Where a middlebox's control socket is. Only Unix stream sockets exist today; the enum
/// (and the `scheme:` text form) leaves room for `tcp:host:port` without changing the
/// stored format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAddr {
    Unix(PathBuf),
}

impl ControlAddr {
    /// Parses `unix:/absolute/path`. The path must be absolute: a relative one would
    /// depend on the directory `ncpd` happens to be started from.
    pub fn parse(text: &str) -> Result<ControlAddr, StoreError> {
        let bad = |detail: String| StoreError::Invalid {
            what: "middlebox control",
            detail,
        };
        match text.split_once(':') {
            Some(("unix", path)) if path.starts_with('/') && path.len() > 1 => {
                Ok(ControlAddr::Unix(PathBuf::from(path)))
            }
            Some(("unix", _)) => Err(bad(format!(
                "{text:?}: the socket path must be absolute (unix:/run/ncp/middlebox.sock)"
            ))),
            Some(("tcp", _)) => Err(bad(format!(
                "{text:?}: tcp control sockets are not supported yet; use unix:/path"
            ))),
            _ => Err(bad(format!(
                "{text:?}: scheme must be unix (unix:/run/ncp/middlebox.sock)"
            ))),
        }
    }
}

impl std::fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A middlebox the controller configures: every replication naming its address is pushed
/// to it as a service (see [`crate::middlebox`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MiddleboxSpec {
    pub ip: Ipv4Addr,
    /// Control socket: `unix:/path/to/middlebox.sock`.
    pub control: String,
    /// The middlebox's dedicated replication NIC (the paper's second interface), passed
    /// through to every service pushed to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_interface: Option<String>,
}

impl MiddleboxSpec {
    pub fn control_addr(&self) -> Result<ControlAddr, StoreError> {
        ControlAddr::parse(&self.control)
    }

    fn check(&self) -> Result<(), StoreError> {
        self.control_addr()?;
        if let Some(name) = &self.replica_interface {
            // Linux interface names: 1..=15 bytes, no '/', no whitespace. Checking here
            // turns a typo into a 400 instead of a push the middlebox keeps refusing.
            let ok = !name.is_empty()
                && name.len() <= 15
                && !name.contains('/')
                && !name.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(StoreError::Invalid {
                    what: "middlebox replica_interface",
                    detail: format!("{name:?} is not an interface name"),
                });
            }
        }
        Ok(())
    }
}

fn rewrite() -> ModeSpec {
    ModeSpec::Rewrite
}

/// Parses `a.b.c.d` or `a.b.c.d/len`.
pub fn parse_prefix(s: &str) -> Result<Ipv4Prefix, StoreError> {
    let bad = |detail: String| StoreError::Invalid {
        what: "source prefix",
        detail,
    };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().map_err(|e| bad(format!("{s:?}: {e}")))?),
        None => (s, 32),
    };
    if len > 32 {
        return Err(bad(format!("{s:?}: length above 32")));
    }
    let addr: Ipv4Addr = addr.parse().map_err(|e| bad(format!("{s:?}: {e}")))?;
    Ok(Ipv4Prefix::new(addr, len))
}

impl ReplicationSpec {
    /// Replicas are `address:port`, and (requirement R4) the replica environment shares
    /// no host with the production side: no replica on the primary, the middlebox or a
    /// source address.
    fn check_replicas(&self, rep: &Replication) -> Result<(), StoreError> {
        for text in &self.replicas {
            let bad = |detail: String| StoreError::Invalid {
                what: "replica",
                detail,
            };
            let addr: std::net::SocketAddrV4 =
                text.parse().map_err(|e| bad(format!("{text:?}: {e}")))?;
            let ip = *addr.ip();
            if ip == rep.primary || ip == rep.middlebox || rep.source.contains(ip) {
                return Err(bad(format!(
                    "{text} shares a host with the production side"
                )));
            }
        }
        Ok(())
    }

    pub fn to_replication(&self) -> Result<Replication, StoreError> {
        Ok(Replication {
            id: self.id,
            source: parse_prefix(&self.source)?,
            source_port: self.source_port,
            primary: self.primary,
            primary_port: self.primary_port,
            middlebox: self.middlebox,
            mode: match self.mode {
                ModeSpec::Rewrite => Mode::Rewrite,
                ModeSpec::Vlan { vid } => Mode::Vlan { vid },
                ModeSpec::Mpls { label } => Mode::Mpls { label },
            },
        })
    }

    /// The bytes this replication's mode adds to every redirected frame on its way to
    /// the middlebox ([`Mode::header_overhead`]): the MTU headroom those links need, which
    /// the middlebox takes off the MSS it advertises to the clients.
    pub fn tunnel_overhead_bytes(&self) -> usize {
        self.to_replication()
            .map_or(0, |r| r.mode.header_overhead())
    }
}

/// Everything the controller must converge the network to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    #[serde(default)]
    pub hosts: Vec<HostSpec>,
    #[serde(default)]
    pub replications: Vec<ReplicationSpec>,
    /// Middleboxes whose services the controller pushes.
    #[serde(default)]
    pub middleboxes: Vec<MiddleboxSpec>,
}

impl DesiredState {
    /// Validates everything once, so that what is stored always converts.
    pub fn validate(&self) -> Result<(), StoreError> {
        for h in &self.hosts {
            h.to_host()?;
        }
        let mut mbs = std::collections::BTreeSet::new();
        for m in &self.middleboxes {
            m.check()?;
            if !mbs.insert(m.ip) {
                return Err(StoreError::Invalid {
                    what: "middlebox",
                    detail: format!("{} registered twice", m.ip),
                });
            }
        }
        self.check_pushable()?;
        let mut ids = std::collections::BTreeSet::new();
        for r in &self.replications {
            let rep = r.to_replication()?;
            r.check_replicas(&rep)?;
            r.login.check(&r.replicas)?;
            if let Some(record) = &r.record {
                record.check()?;
            }
            if !ids.insert(r.id) {
                return Err(StoreError::Invalid {
                    what: "replication id",
                    detail: format!("{} used twice", r.id),
                });
            }
        }
        Ok(())
    }

    /// The registered middlebox at `ip`.
    pub fn middlebox(&self, ip: Ipv4Addr) -> Option<&MiddleboxSpec> {
        self.middleboxes.iter().find(|m| m.ip == ip)
    }

    /// Replications through a registered middlebox become services on it, and the
    /// middlebox takes a service list whole or not at all. What it would refuse is refused
    /// here, with a 400, instead of breaking the push of every other service there:
    /// - a `source_port`: a service matches its clients by address prefix only, so the
    ///   middlebox would replicate every connection of the source, not the one port asked
    ///   for (silently widening a replication is worse than refusing it);
    /// - two replications with the same primary endpoint on one middlebox;
    /// - a replica listed twice.
    fn check_pushable(&self) -> Result<(), StoreError> {
        let mut endpoints = std::collections::BTreeSet::new();
        for r in &self.replications {
            if self.middlebox(r.middlebox).is_none() {
                continue;
            }
            let bad = |detail: String| StoreError::Invalid {
                what: "replication",
                detail,
            };
            if let Some(port) = r.source_port {
                return Err(bad(format!(
                    "{}: source_port {port} cannot be configured on middlebox {}, whose \
                     services match clients by address only; drop source_port or \
                     unregister the middlebox",
                    r.id, r.middlebox
                )));
            }
            if !endpoints.insert((r.middlebox, r.primary, r.primary_port)) {
                return Err(bad(format!(
                    "{}: middlebox {} already replicates {}:{} for another replication",
                    r.id, r.middlebox, r.primary, r.primary_port
                )));
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(dup) = r.replicas.iter().find(|x| {
                x.parse::<std::net::SocketAddrV4>()
                    .is_ok_and(|a| !seen.insert(a))
            }) {
                return Err(bad(format!("{}: replica {dup} listed twice", r.id)));
            }
        }
        Ok(())
    }

    /// Hosts in planner form; invalid entries (impossible after `validate`) are skipped.
    pub fn hosts(&self) -> Vec<Host> {
        self.hosts.iter().filter_map(|h| h.to_host().ok()).collect()
    }

    pub fn replications(&self) -> Vec<Replication> {
        self.replications
            .iter()
            .filter_map(|r| r.to_replication().ok())
            .collect()
    }
}

/// The state file.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; a missing file is an empty state (first start).
    pub fn load(&self) -> Result<DesiredState, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DesiredState::default());
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let state: DesiredState =
            serde_json::from_str(&text).map_err(|source| StoreError::Format {
                path: self.path.clone(),
                source,
            })?;
        state.validate()?;
        Ok(state)
    }

    /// Replaces the state atomically.
    pub fn save(&self, state: &DesiredState) -> Result<(), StoreError> {
        state.validate()?;
        write_json(&self.path, state)
    }

    /// The file next to the state file that holds the controller's own records of kind
    /// `what` (`controller.json` → `controller.consistency.json`).
    pub fn sidecar(&self, what: &str) -> PathBuf {
        let stem = self
            .path
            .file_stem()
            .map_or_else(|| "ncpd".into(), |s| s.to_string_lossy().into_owned());
        self.path.with_file_name(format!("{stem}.{what}.json"))
    }

    /// Reads sidecar `what`; a missing file is `T::default()` (first start, or a state
    /// from before the sidecar existed).
    pub fn load_sidecar<T: serde::de::DeserializeOwned + Default>(
        &self,
        what: &str,
    ) -> Result<T, StoreError> {
        let path = self.sidecar(what);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|source| StoreError::Format { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Replaces sidecar `what` atomically.
    pub fn save_sidecar<T: Serialize>(&self, what: &str, value: &T) -> Result<(), StoreError> {
        write_json(&self.sidecar(what), value)
    }
}

/// Writes `value` as JSON to `path` atomically (temporary file, fsync, rename), so that a
/// crash leaves the old file or the new one, never half of one.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_string_pretty(value).map_err(|source| StoreError::Format {
        path: path.to_owned(),
        source,
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.to_owned().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ReplicationSpec {
        ReplicationSpec {
            id: 1,
            source: "198.18.3.0/24".into(),
            source_port: None,
            primary: Ipv4Addr::new(198, 18, 3, 21),
            primary_port: 80,
            middlebox: Ipv4Addr::new(198, 18, 3, 31),
            replicas: vec!["198.18.4.32:80".into()],
            mode: ModeSpec::Vlan { vid: 31 },
            verify: VerifySpec::Off,
            login: Default::default(),
            record: None,
        }
    }

    #[test]
    fn logins_are_stored_flat_and_checked() {
        let mut spec = ReplicationSpec {
            id: 1,
            source: "198.18.3.11".into(),
            source_port: None,
            primary: "198.18.4.31".parse().unwrap(),
            primary_port: 5432,
            middlebox: "198.18.4.99".parse().unwrap(),
            replicas: vec!["198.18.4.32:5432".into()],
            mode: ModeSpec::Rewrite,
            verify: VerifySpec::Off,
            login: LoginSpec {
                protocol: Some(ProtocolSpec::Postgres),
                credentials: [("198.18.4.32:5432".into(), "/etc/ncp/a.secret".into())].into(),
            },
            record: None,
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert!(
            text.ends_with(
                r#""protocol":"postgres","credentials":{"198.18.4.32:5432":"/etc/ncp/a.secret"}}"#
            ),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<ReplicationSpec>(&text).unwrap(),
            spec
        );
        let replicas = spec.replicas.clone();
        assert!(spec.login.check(&replicas).is_ok());
        for (change, why) in [
            (
                (None, "198.18.4.32:5432", "/etc/ncp/a.secret"),
                "need a protocol",
            ),
            (
                (
                    Some(ProtocolSpec::Redis),
                    "198.18.4.33:5432",
                    "/etc/ncp/a.secret",
                ),
                "not one of the replicas",
            ),
            (
                (Some(ProtocolSpec::Redis), "198.18.4.32:5432", "a.secret"),
                "must be absolute",
            ),
        ] {
            let (protocol, replica, path) = change;
            spec.login = LoginSpec {
                protocol,
                credentials: [(replica.to_owned(), path.to_owned())].into(),
            };
            let err = spec.login.check(&replicas).expect_err(why).to_string();
            assert!(err.contains(why), "{err}");
        }
        spec.login = LoginSpec::default();
        let text = serde_json::to_string(&spec).unwrap();
        assert!(
            !text.contains("protocol") && !text.contains("credentials"),
            "{text}"
        );
        assert!("mysql".parse::<ProtocolSpec>().is_err());
    }

    #[test]
    fn json_shape_and_conversion() {
        let json = serde_json::to_value(spec()).expect("serialize");
        assert_eq!(json["mode"]["kind"], "vlan");
        assert_eq!(json["mode"]["vid"], 31);
        let minimal: ReplicationSpec = serde_json::from_str(
            r#"{"id":2,"source":"198.18.3.11","primary":"198.18.3.21","primary_port":80,"middlebox":"198.18.3.31"}"#,
        )
        .expect("defaults apply");
        assert_eq!(minimal.mode, ModeSpec::Rewrite);
        // Verification is off unless asked for, and then written out: a state file
        // without the key (older controllers) and one with it both load.
        assert_eq!(minimal.verify, VerifySpec::Off);
        assert!(json.get("verify").is_none(), "off is not written: {json}");
        let verified = ReplicationSpec {
            verify: VerifySpec::Replies,
            login: Default::default(),
            ..spec()
        };
        let text = serde_json::to_string(&verified).expect("serialize");
        assert!(text.contains(r#""verify":"replies""#), "{text}");
        let back: ReplicationSpec = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, verified);
        assert_eq!(
            "replies".parse::<VerifySpec>().ok(),
            Some(VerifySpec::Replies)
        );
        assert_eq!("off".parse::<VerifySpec>().ok(), Some(VerifySpec::Off));
        assert!("on".parse::<VerifySpec>().is_err());
        let r = minimal.to_replication().expect("valid");
        assert_eq!(r.source.prefix_len(), 32);
        assert_eq!(
            spec().to_replication().expect("valid").mode,
            Mode::Vlan { vid: 31 }
        );
    }

    #[test]
    fn invalid_input_is_rejected() {
        assert!(parse_prefix("198.18.3.0/33").is_err());
        assert!(parse_prefix("nonsense").is_err());
        let mut s = DesiredState {
            hosts: vec![],
            replications: vec![spec(), spec()],
            ..Default::default()
        };
        assert!(s.validate().is_err(), "duplicate ids");
        s.replications.pop();
        s.hosts.push(HostSpec {
            ip: Ipv4Addr::new(198, 18, 3, 1),
            mac: "zz".into(),
            dpid: 1,
            port: 1,
        });
        assert!(s.validate().is_err(), "bad MAC");
        s.hosts.clear();
        assert!(s.validate().is_ok());
        for bad in [
            "198.18.3.21:8080",
            "198.18.3.31:80",
            "198.18.3.5:80",
            "198.18.4.1",
        ] {
            s.replications[0].replicas = vec![bad.to_string()];
            assert!(s.validate().is_err(), "replica {bad} must be refused");
        }
    }

    #[test]
    fn middlebox_control_and_interface() {
        let ok = ControlAddr::parse("unix:/run/ncp/mb.sock").expect("unix");
        assert_eq!(ok, ControlAddr::Unix(PathBuf::from("/run/ncp/mb.sock")));
        assert_eq!(ok.to_string(), "unix:/run/ncp/mb.sock");
        for bad in [
            "unix:",
            "unix:relative.sock",
            "tcp:198.18.3.31:7000",
            "http://198.18.3.31/",
            "/run/ncp/mb.sock",
            "",
        ] {
            let e = ControlAddr::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("control"), "{bad}: {e}");
        }
        let mut m = MiddleboxSpec {
            ip: Ipv4Addr::new(198, 18, 3, 31),
            control: "unix:/run/ncp/mb.sock".into(),
            replica_interface: Some("eth1".into()),
        };
        assert!(m.check().is_ok());
        for bad in ["", "eth 1", "a/b", "sixteen-chars-xx"] {
            m.replica_interface = Some(bad.into());
            assert!(m.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn registered_middleboxes_get_only_what_they_can_run() {
        let mb = MiddleboxSpec {
            ip: Ipv4Addr::new(198, 18, 3, 31),
            control: "unix:/run/ncp/mb.sock".into(),
            replica_interface: None,
        };
        let mut s = DesiredState {
            replications: vec![spec()],
            middleboxes: vec![mb.clone()],
            ..Default::default()
        };
        assert!(s.validate().is_ok());
        s.middleboxes.push(mb.clone());
        assert!(s.validate().is_err(), "registered twice");
        s.middleboxes.pop();

        // A source port is fine for rules only, refused where a service is pushed.
        s.replications[0].source_port = Some(5555);
        let e = s.validate().expect_err("source_port").to_string();
        assert!(e.contains("source_port"), "{e}");
        s.middleboxes.clear();
        assert!(s.validate().is_ok(), "unregistered: rules only");
        s.middleboxes.push(mb);
        s.replications[0].source_port = None;

        // One primary endpoint per middlebox; no replica twice.
        let mut other = spec();
        other.id = 2;
        other.source = "198.18.5.0/24".into();
        s.replications.push(other);
        assert!(s.validate().is_err(), "same primary twice on one middlebox");
        s.replications[1].primary_port = 81;
        assert!(s.validate().is_ok());
        s.replications[1].replicas = vec!["198.18.4.32:80".into(), "198.18.4.32:80".into()];
        assert!(s.validate().is_err(), "replica twice");
    }

    #[test]
    fn save_and_load_roundtrip() {
        let dir = std::env::temp_dir().join(format!("ncpc-store-{}", std::process::id()));
        let store = Store::new(dir.join("state.json"));
        assert_eq!(
            store.load().expect("missing file is empty"),
            DesiredState::default()
        );
        let state = DesiredState {
            hosts: vec![HostSpec {
                ip: Ipv4Addr::new(198, 18, 3, 11),
                mac: "02:00:c6:12:03:0b".into(),
                dpid: 0x31,
                port: 1,
            }],
            replications: vec![spec()],
            middleboxes: vec![MiddleboxSpec {
                ip: Ipv4Addr::new(198, 18, 3, 31),
                control: "unix:/run/ncp/mb31.sock".into(),
                replica_interface: Some("eth1".into()),
            }],
        };
        store.save(&state).expect("save");
        assert_eq!(store.load().expect("load"), state);
        std::fs::write(store.path(), "{not json").expect("write");
        assert!(matches!(store.load(), Err(StoreError::Format { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The rest_bodies fuzz target's seeds: one valid body of each kind the API takes
    /// (first byte: 0 replication, 1 host, 2 middlebox, 3 the whole state file).
    #[test]
    fn fuzz_seeds_are_valid_bodies() {
        let host = HostSpec {
            ip: Ipv4Addr::new(198, 18, 3, 11),
            mac: "02:00:00:00:03:0b".into(),
            dpid: 0xa1,
            port: 3,
        };
        let middlebox = MiddleboxSpec {
            ip: Ipv4Addr::new(198, 18, 3, 31),
            control: "unix:/run/ncp/middlebox.sock".into(),
            replica_interface: Some("eth1".into()),
        };
        let mpls = ReplicationSpec {
            id: 2,
            source: "198.18.3.11".into(),
            source_port: Some(40000),
            replicas: vec![],
            mode: ModeSpec::Mpls { label: 16 },
            ..spec()
        };
        let state = DesiredState {
            hosts: vec![host.clone()],
            replications: vec![spec()],
            middleboxes: vec![middlebox.clone()],
        };
        assert!(state.validate().is_ok());
        let seeds = vec![
            ("replication-vlan".to_string(), seed_body(0, &spec())),
            ("replication-mpls".to_string(), seed_body(0, &mpls)),
            ("host".to_string(), seed_body(1, &host)),
            ("middlebox".to_string(), seed_body(2, &middlebox)),
            ("state".to_string(), seed_body(3, &state)),
        ];
        ncp_testbed::fuzz_seeds::sync("rest_bodies", &seeds);
    }

    /// A rest_bodies seed: the kind byte, then the body as a client would send it.
    fn seed_body<T: Serialize>(kind: u8, body: &T) -> Vec<u8> {
        let json = serde_json::to_vec_pretty(body).expect("specs serialize");
        [vec![kind], json].concat()
    }

    #[test]
    fn a_recording_directory_is_absolute_and_absent_when_not_recording() {
        let ok = RecordTarget {
            dir: "/var/lib/ncp/rec".into(),
        };
        assert!(ok.check().is_ok());
        for bad in ["rec", "./rec", "/var/lib/ncp\nrec"] {
            let err = RecordTarget { dir: bad.into() }.check().unwrap_err();
            assert!(err.to_string().contains("absolute path"), "{bad:?}: {err}");
        }
        let text = r#"{"id":1,"source":"198.18.1.1","primary":"198.18.1.2","primary_port":6379,"middlebox":"198.18.1.4","record":{"dir":"/r"}}"#;
        let spec: ReplicationSpec = serde_json::from_str(text).unwrap();
        assert_eq!(spec.record, Some(RecordTarget { dir: "/r".into() }));
        let without = ReplicationSpec {
            record: None,
            ..spec
        };
        assert!(!serde_json::to_string(&without).unwrap().contains("record"));
    }

    #[test]
    fn a_sidecar_sits_next_to_the_state_file_and_starts_empty() {
        let dir = std::env::temp_dir().join(format!("ncp-sidecar-{}", std::process::id()));
        let store = Store::new(dir.join("controller.json"));
        assert_eq!(
            store.sidecar("consistency"),
            dir.join("controller.consistency.json")
        );
        let empty: BTreeMap<u32, u64> = store.load_sidecar("consistency").unwrap();
        assert!(empty.is_empty(), "missing file: empty");
        let value: BTreeMap<u32, u64> = [(1, 42)].into();
        store.save_sidecar("consistency", &value).unwrap();
        assert_eq!(
            store
                .load_sidecar::<BTreeMap<u32, u64>>("consistency")
                .unwrap(),
            value
        );
        std::fs::write(store.sidecar("consistency"), "{broken").unwrap();
        let err = store
            .load_sidecar::<BTreeMap<u32, u64>>("consistency")
            .unwrap_err();
        assert!(
            err.to_string().contains("controller.consistency.json"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
