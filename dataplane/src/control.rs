//! The control socket: a Unix stream socket on which `ncp-middlebox stats` and
//! `ncp-middlebox rule …` talk to a running middlebox. One JSON request per line, one
//! JSON response per line. Requests are size- and time-bounded so a stuck or hostile
//! client cannot hold the middlebox up.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::ServiceConfig,
    driver::{ConsistencyBook, consistency::ReplicaConsistency},
    rules::RedirectRule,
    xdp::layers::recovery::RecoveryCounters,
    xdp::steering::VerdictCounters,
    xdp::worker::WorkerSnapshot,
};

/// Largest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// How long a client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A request on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Counters of every interface and worker.
    Stats,
    /// The installed redirect rules.
    Rules,
    /// Install a rule (replacing one with the same id).
    RuleAdd {
        /// The rule.
        rule: RedirectRule,
    },
    /// Remove the rule with this id.
    RuleDel {
        /// Rule id.
        id: u32,
    },
    /// The replicated services right now.
    Services,
    /// An operator says this replica is in step with its primary again (after
    /// re-cloning it): its consistency state becomes `in-step`.
    ReplicaReset {
        /// Service name.
        service: String,
        /// The replica's address.
        replica: std::net::SocketAddrV4,
    },
    /// Replace the replicated services with this list (what the controller pushes after
    /// every change; an unchanged list is a no-op).
    ServicesSet {
        /// The complete new list.
        services: Vec<ServiceConfig>,
    },
}

/// A response on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Counters.
    Stats(Stats),
    /// Installed rules.
    Rules {
        /// Rules by id.
        rules: Vec<RedirectRule>,
    },
    /// Replicated services.
    Services {
        /// In configuration order.
        services: Vec<ServiceConfig>,
    },
    /// The change was applied.
    Done,
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Counters of the whole middlebox.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// One entry per attached interface.
    pub interfaces: Vec<InterfaceStats>,
    /// One entry per worker.
    pub workers: Vec<WorkerStatsView>,
    /// Replication counters (sessions, bytes per destination, replica lag, detaches),
    /// in the shape of the running mode's own stats type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<serde_json::Value>,
    /// Per service and replica: in step with the primary, unknown, or diverged and why.
    #[serde(default)]
    pub consistency: Vec<ReplicaConsistency>,
}

/// XDP counters of one interface.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceStats {
    /// Interface name.
    pub name: String,
    /// Attach mode (`driver` or `generic`).
    pub mode: String,
    /// Verdict counters summed over CPUs.
    pub xdp: VerdictCounters,
}

/// Worker counters as sent over the socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerStatsView {
    /// Interface served.
    pub interface: String,
    /// Queue served.
    pub queue: u32,
    /// Core pinned to.
    pub core: Option<usize>,
    /// Frames received from AF_XDP.
    pub rx_frames: u64,
    /// Bytes received from AF_XDP.
    pub rx_bytes: u64,
    /// Frames placed on the AF_XDP TX rings of all the worker's links (absent from older
    /// middleboxes' answers: zero then).
    #[serde(default)]
    pub tx_frames: u64,
    /// `sendto` kicks on those rings: frames per kick is the TX batch size.
    #[serde(default)]
    pub tx_kicks: u64,
    /// Retransmissions by cause and segments tracked by the loss-recovery layer
    /// (absent from older middleboxes' answers: all zero then).
    #[serde(default)]
    pub loss_recovery: RecoveryCounters,
    /// Whether the worker's AF_XDP sockets are bound in zero-copy mode (`false` also
    /// when `zero_copy = true` was asked for and the driver refused it).
    #[serde(default)]
    pub zero_copy: bool,
}

impl From<WorkerSnapshot> for WorkerStatsView {
    fn from(s: WorkerSnapshot) -> Self {
        Self {
            interface: s.interface,
            queue: s.queue,
            core: s.core,
            rx_frames: s.rx_frames,
            rx_bytes: s.rx_bytes,
            tx_frames: s.tx_frames,
            tx_kicks: s.tx_kicks,
            loss_recovery: s.loss_recovery,
            zero_copy: s.zero_copy,
        }
    }
}

/// What the server asks the running middlebox to do.
pub trait Handler: Send + 'static {
    /// Answers one request.
    fn handle(&mut self, request: Request) -> Response;
}

/// A running control server; removes its socket file when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket file) and serves requests on a thread.
    pub fn start(path: &Path, mut handler: impl Handler) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "control socket {} is in use: another middlebox is running with it; \
                     set `control_socket` in the config to a different path",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .map_err(|e| anyhow::anyhow!("removing stale {}: {e}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("ncp-control".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Err(e) = serve_one(stream, &mut handler) {
                                tracing::debug!(error = %e, "control client dropped");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket accept failed");
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(stream: UnixStream, handler: &mut impl Handler) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let response = if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST_BYTES {
        Response::Error {
            message: format!("request longer than {MAX_REQUEST_BYTES} bytes"),
        }
    } else {
        match serde_json::from_str::<Request>(line.trim()) {
            Ok(request) => handler.handle(request),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

/// Answers a [`Request::ReplicaReset`] from `book` (both data planes).
pub fn reset_replica(
    book: &ConsistencyBook,
    service: &str,
    replica: std::net::SocketAddrV4,
) -> Response {
    match book.reset(service, replica) {
        Ok(_) => Response::Done,
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

/// Sends one request to a running middlebox and returns its answer.
pub fn call(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the middlebox at {}: {e} (is `ncp-middlebox run` running with this control_socket?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    serde_json::from_str(answer.trim())
        .map_err(|e| anyhow::anyhow!("unreadable answer from the middlebox: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Verify;

    struct Echo;
    impl Handler for Echo {
        fn handle(&mut self, request: Request) -> Response {
            match request {
                Request::Rules => Response::Rules { rules: vec![] },
                _ => Response::Done,
            }
        }
    }

    #[test]
    fn consistency_fields_are_backward_compatible_and_reset_is_answered() {
        // A middlebox from before the consistency state answers without the field.
        let old: Stats = serde_json::from_str(r#"{"interfaces":[],"workers":[]}"#).unwrap();
        assert!(old.consistency.is_empty());
        let request: Request = serde_json::from_str(
            r#"{"cmd":"replica-reset","service":"redis","replica":"198.18.2.3:6379"}"#,
        )
        .unwrap();
        let Request::ReplicaReset { service, replica } = request else {
            panic!("parsed as {request:?}");
        };
        let book = ConsistencyBook::new();
        assert!(matches!(
            reset_replica(&book, &service, replica),
            Response::Error { message } if message.contains("no replica")
        ));
        book.register(&service, &[replica]);
        assert_eq!(reset_replica(&book, &service, replica), Response::Done);
        assert_eq!(book.report()[0].state.as_str(), "in-step");
    }

    #[test]
    fn services_set_takes_the_controllers_verify_key() {
        // The controller's push line (see ncp-controller's golden test): `verify` present
        // only when reply verification is on.
        let parse = |verify: &str| {
            let line = format!(
                r#"{{"cmd":"services-set","services":[{{"name":"r0","primary":"198.18.1.2:6379","clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"]{verify}}}]}}"#
            );
            match serde_json::from_str::<Request>(&line) {
                Ok(Request::ServicesSet { services }) => Ok(services[0].verify),
                Ok(other) => panic!("parsed as {other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(parse(r#","verify":"replies""#), Ok(Verify::Replies));
        assert_eq!(parse(r#","verify":"off""#), Ok(Verify::Off));
        assert_eq!(parse(""), Ok(Verify::Off));
        assert!(parse(r#","verify":"maybe""#).is_err());
    }

    #[test]
    fn services_set_takes_the_controllers_tunnel_overhead() {
        // The controller's push line in MPLS mode (see ncp-controller's golden test);
        // rewrite mode leaves the key out.
        let line = r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"tunnel_overhead_bytes":4}]}"#;
        let Ok(Request::ServicesSet { services }) = serde_json::from_str::<Request>(line) else {
            panic!("not a services-set: {line}");
        };
        assert_eq!(services[0].tunnel_overhead_bytes, 4);
        let rewrite = line.replace(r#","tunnel_overhead_bytes":4"#, "");
        let Ok(Request::ServicesSet { services }) = serde_json::from_str::<Request>(&rewrite)
        else {
            panic!("not a services-set: {rewrite}");
        };
        assert_eq!(services[0].tunnel_overhead_bytes, 0);
    }

    #[test]
    fn services_set_takes_the_controllers_protocol_and_credentials() {
        // The controller's push line with a login (see ncp-controller's golden test).
        let line = r#"{"cmd":"services-set","services":[{"name":"r0","primary":"198.18.1.2:6379","clients":"198.18.1.1/32","replicas":["198.18.2.3:6379"],"protocol":"redis","credentials":{"198.18.2.3:6379":"/etc/ncp/r.secret"}}]}"#;
        let Ok(Request::ServicesSet { services }) = serde_json::from_str::<Request>(line) else {
            panic!("not a services-set: {line}");
        };
        assert_eq!(
            services[0].protocol,
            Some(crate::credentials::ServiceProtocol::Redis)
        );
        let replica: std::net::SocketAddrV4 = "198.18.2.3:6379".parse().unwrap();
        assert_eq!(
            services[0].credentials.get(&replica),
            Some(&std::path::PathBuf::from("/etc/ncp/r.secret"))
        );
        let bad = line.replace("redis", "mysql");
        assert!(serde_json::from_str::<Request>(&bad).is_err());
    }

    #[test]
    fn requests_round_trip_and_garbage_gets_an_error() {
        let dir = std::env::temp_dir().join(format!("ncp-control-test-{}", std::process::id()));
        let path = dir.join("c.sock");
        let server = ControlServer::start(&path, Echo).unwrap();
        assert_eq!(
            call(&path, &Request::Rules).unwrap(),
            Response::Rules { rules: vec![] }
        );
        assert_eq!(
            call(&path, &Request::RuleDel { id: 3 }).unwrap(),
            Response::Done
        );

        let stream = UnixStream::connect(&path).unwrap();
        (&stream)
            .write_all(b"{\"cmd\":\"launch-missiles\"}\n")
            .unwrap();
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).unwrap();
        assert!(answer.contains("bad request"), "{answer}");

        // A second server on the same live socket is refused with a clear message.
        let err = ControlServer::start(&path, Echo).err().unwrap().to_string();
        assert!(err.contains("in use"), "{err}");
        drop(server);
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&dir);
    }
}
