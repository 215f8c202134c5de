//! Tokio glue: accept switch connections, run one [`Session`] per connection in its own
//! task, and offer request/response calls (barrier, flow stats, port list) to the rest of
//! the controller.
//!
//! Isolation is by construction: each connection owns its task, buffers and timers, and
//! every wait on the peer (including writes to a peer that stops reading) is bounded, so a
//! hostile or broken peer can only end its own connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};

use super::registry::{Claim, Holder, Registry, Settlement};
use super::session::{CloseReason, Output, Session, SessionConfig};
use super::tls::{Credentials, SwitchTls};
use crate::openflow::messages::MULTIPART_MORE;
use crate::openflow::{
    FlowStats, FlowStatsRequest, Frame, Message, MultipartReplyBody, MultipartRequest, PortDesc,
    SwitchFeatures,
};
use crate::topology::Dpid;

/// Controller listener settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where switches connect; OpenFlow's registered port is 6653.
    pub listen: SocketAddr,
    pub session: SessionConfig,
    /// How long a request waits for its reply.
    pub request_timeout: Duration,
    /// Capacity of the event channel. Lifecycle events wait for room; switch messages
    /// (packet-ins...) are dropped with a warning when the application falls behind, so a
    /// chatty switch cannot stall its own keepalive.
    pub event_capacity: usize,
    /// How long a switch's established connection has to answer the echo probe sent
    /// when another connection claims its datapath id; silent means dead and replaced,
    /// answering means the newcomer is refused.
    pub duplicate_probe_timeout: Duration,
    /// OpenFlow over TLS with client certificates (see [`super::tls`]); `None` is plain
    /// TCP, which callers allow on loopback only.
    pub tls: Option<SwitchTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6653)),
            session: SessionConfig::default(),
            request_timeout: Duration::from_secs(10),
            event_capacity: 1024,
            duplicate_probe_timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// What happens on the switch side, in order per switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchEvent {
    Connected {
        dpid: Dpid,
        features: SwitchFeatures,
        peer: SocketAddr,
    },
    Disconnected {
        dpid: Dpid,
        reason: String,
    },
    /// An unsolicited message (PACKET_IN, PORT_STATUS, FLOW_REMOVED, ERROR, ...).
    Message {
        dpid: Dpid,
        frame: Frame,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("switch {0:#x} is not connected")]
    NotConnected(Dpid),
    #[error("switch {0:#x} went away before replying")]
    Disconnected(Dpid),
    #[error("switch {0:#x} did not reply in time")]
    Timeout(Dpid),
    #[error("switch {dpid:#x} answered with error type {err_type} code {code}")]
    Refused {
        dpid: Dpid,
        err_type: u16,
        code: u16,
    },
    #[error("switch {0:#x} sent an unexpected reply")]
    BadReply(Dpid),
}

type ReplyTx = oneshot::Sender<Result<Vec<Message>, (u16, u16)>>;

/// A message of a batch the switch refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Position of the message in the batch.
    pub index: usize,
    pub err_type: u16,
    pub code: u16,
}

type BatchTx = oneshot::Sender<Vec<Rejected>>;

enum Command {
    /// Send; when `reply` is set, collect the reply (all parts of a multipart reply).
    Send {
        msg: Message,
        reply: Option<ReplyTx>,
    },
    /// Send all, then a barrier; answer with the refused messages once the barrier reply
    /// arrives (a switch reports every error of earlier messages before that reply).
    Batch { msgs: Vec<Message>, reply: BatchTx },
    /// Echo-probe the switch; answer whether it replied within the probe timeout.
    Probe { reply: oneshot::Sender<bool> },
}

/// How the rest of the controller reaches one connection's task.
#[derive(Clone)]
struct Entry {
    commands: mpsc::Sender<Command>,
    kill: Arc<Notify>,
}

struct Shared {
    cfg: ServerConfig,
    switches: Mutex<Registry<Entry>>,
    next_conn: AtomicU64,
    /// FLOW_MODs handed to switch connections since start.
    flow_mods: AtomicU64,
    /// Peers that failed the TLS handshake (no or a bad certificate, no TLS at all).
    tls_refused: AtomicU64,
    /// Connections whose certificate does not grant the datapath id they claimed.
    unauthorized_claims: AtomicU64,
    events: mpsc::Sender<SwitchEvent>,
}

impl Shared {
    fn switches(&self) -> MutexGuard<'_, Registry<Entry>> {
        // A panic while holding this lock cannot leave the registry half-updated (every
        // critical section is a single insert/remove), so poisoning is safe to ignore.
        self.switches.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle on the running controller listener. Cheap to clone.
#[derive(Clone)]
pub struct Controller {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl Controller {
    /// Binds the listener and starts accepting. Returns the handle and the event stream.
    pub async fn start(
        cfg: ServerConfig,
    ) -> std::io::Result<(Controller, mpsc::Receiver<SwitchEvent>)> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let local_addr = listener.local_addr()?;
        let (events, events_rx) = mpsc::channel(cfg.event_capacity.max(1));
        let shared = Arc::new(Shared {
            cfg,
            switches: Mutex::new(Registry::default()),
            next_conn: AtomicU64::new(1),
            flow_mods: AtomicU64::new(0),
            tls_refused: AtomicU64::new(0),
            unauthorized_claims: AtomicU64::new(0),
            events,
        });
        tracing::info!(%local_addr, "OpenFlow listener up");
        tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok((Controller { shared, local_addr }, events_rx))
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Dpids of switches that finished the handshake.
    pub fn connected(&self) -> Vec<Dpid> {
        self.shared.switches().dpids()
    }

    /// Connections refused since start because they claimed the datapath id of a switch
    /// whose established connection still answered.
    pub fn duplicate_claims_refused(&self) -> u64 {
        self.shared.switches().refused()
    }

    /// Peers refused in the TLS handshake since start.
    pub fn tls_refused(&self) -> u64 {
        self.shared.tls_refused.load(Ordering::Relaxed)
    }

    /// Connections refused since start for claiming a datapath id their certificate does
    /// not grant.
    pub fn unauthorized_claims(&self) -> u64 {
        self.shared.unauthorized_claims.load(Ordering::Relaxed)
    }

    /// FLOW_MODs sent to switches since start (a restart on unchanged state must not
    /// send any).
    pub fn flow_mods_sent(&self) -> u64 {
        self.shared.flow_mods.load(Ordering::Relaxed)
    }

    fn count_flow_mods<'a>(&self, msgs: impl IntoIterator<Item = &'a Message>) {
        let n = msgs
            .into_iter()
            .filter(|m| matches!(m, Message::FlowMod(_)))
            .count();
        self.shared
            .flow_mods
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn commands(&self, dpid: Dpid) -> Result<mpsc::Sender<Command>, SwitchError> {
        self.shared
            .switches()
            .get(dpid)
            .map(|h| h.handle.commands.clone())
            .ok_or(SwitchError::NotConnected(dpid))
    }

    /// Sends a message without waiting for anything.
    pub async fn send(&self, dpid: Dpid, msg: Message) -> Result<(), SwitchError> {
        let commands = self.commands(dpid)?;
        self.count_flow_mods([&msg]);
        commands
            .send(Command::Send { msg, reply: None })
            .await
            .map_err(|_| SwitchError::Disconnected(dpid))
    }

    /// Sends a request and waits for the reply with the same xid; multipart replies are
    /// gathered until the last part.
    pub async fn request(&self, dpid: Dpid, msg: Message) -> Result<Vec<Message>, SwitchError> {
        let (tx, rx) = oneshot::channel();
        let commands = self.commands(dpid)?;
        self.count_flow_mods([&msg]);
        commands
            .send(Command::Send {
                msg,
                reply: Some(tx),
            })
            .await
            .map_err(|_| SwitchError::Disconnected(dpid))?;
        match tokio::time::timeout(self.shared.cfg.request_timeout, rx).await {
            Err(_) => Err(SwitchError::Timeout(dpid)),
            Ok(Err(_)) => Err(SwitchError::Disconnected(dpid)),
            Ok(Ok(Err((err_type, code)))) => Err(SwitchError::Refused {
                dpid,
                err_type,
                code,
            }),
            Ok(Ok(Ok(parts))) => Ok(parts),
        }
    }

    /// Sends `msgs` followed by a barrier and waits for the barrier reply. `Ok` with an
    /// empty list means the switch has applied every message; otherwise the list names
    /// the refused ones. Only after this returns may the changes be reported installed.
    pub async fn apply(
        &self,
        dpid: Dpid,
        msgs: Vec<Message>,
    ) -> Result<Vec<Rejected>, SwitchError> {
        let (tx, rx) = oneshot::channel();
        let commands = self.commands(dpid)?;
        self.count_flow_mods(&msgs);
        commands
            .send(Command::Batch { msgs, reply: tx })
            .await
            .map_err(|_| SwitchError::Disconnected(dpid))?;
        match tokio::time::timeout(self.shared.cfg.request_timeout, rx).await {
            Err(_) => Err(SwitchError::Timeout(dpid)),
            Ok(Err(_)) => Err(SwitchError::Disconnected(dpid)),
            Ok(Ok(rejected)) => Ok(rejected),
        }
    }

    /// Waits until the switch has processed everything sent before.
    pub async fn barrier(&self, dpid: Dpid) -> Result<(), SwitchError> {
        match self
            .request(dpid, Message::BarrierRequest)
            .await?
            .as_slice()
        {
            [Message::BarrierReply] => Ok(()),
            _ => Err(SwitchError::BadReply(dpid)),
        }
    }

    /// Flow statistics (all parts).
    pub async fn flow_stats(
        &self,
        dpid: Dpid,
        req: FlowStatsRequest,
    ) -> Result<Vec<FlowStats>, SwitchError> {
        self.multipart(dpid, MultipartRequest::Flow(req), |body| match body {
            MultipartReplyBody::Flow(f) => Some(f),
            _ => None,
        })
        .await
    }

    /// The switch's ports.
    pub async fn port_desc(&self, dpid: Dpid) -> Result<Vec<PortDesc>, SwitchError> {
        self.multipart(dpid, MultipartRequest::PortDesc, |body| match body {
            MultipartReplyBody::PortDesc(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// Sends a multipart request and concatenates the entries of every reply part;
    /// `pick` takes the entries out of a part of the expected kind.
    async fn multipart<T>(
        &self,
        dpid: Dpid,
        req: MultipartRequest,
        pick: impl Fn(MultipartReplyBody) -> Option<Vec<T>>,
    ) -> Result<Vec<T>, SwitchError> {
        let mut out = Vec::new();
        for part in self.request(dpid, Message::MultipartRequest(req)).await? {
            let Message::MultipartReply(r) = part else {
                return Err(SwitchError::BadReply(dpid));
            };
            out.extend(pick(r.body).ok_or(SwitchError::BadReply(dpid))?);
        }
        Ok(out)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, conn_id, "switch connection accepted");
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                match shared.cfg.tls.clone() {
                    None => {
                        tokio::spawn(run_connection(stream, peer, conn_id, shared, None));
                    }
                    Some(tls) => {
                        tokio::spawn(async move {
                            if let Some((stream, creds)) =
                                tls_accept(&tls, stream, peer, &shared).await
                            {
                                run_connection(stream, peer, conn_id, shared, Some(creds)).await;
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if shared.events.is_closed() {
            tracing::info!("event receiver dropped; listener stops");
            return;
        }
    }
}

/// A request waiting for its reply.
struct Pending {
    parts: Vec<Message>,
    tx: ReplyTx,
}

/// A batch waiting for its closing barrier reply.
struct PendingBatch {
    rejected: Vec<Rejected>,
    tx: BatchTx,
}

/// Everything waiting on replies from one switch, keyed by xid.
#[derive(Default)]
struct Waiters {
    requests: HashMap<u32, Pending>,
    /// Keyed by the xid of the batch's barrier.
    batches: HashMap<u32, PendingBatch>,
    /// xid of a batch member -> (barrier xid, index in the batch).
    members: HashMap<u32, (u32, usize)>,
}

impl Waiters {
    /// Forgets waiters whose caller gave up (timed out), so they cannot pile up.
    fn prune(&mut self) {
        self.requests.retain(|_, p| !p.tx.is_closed());
        self.batches.retain(|_, b| !b.tx.is_closed());
        let batches = &self.batches;
        self.members
            .retain(|_, (barrier, _)| batches.contains_key(barrier));
    }

    /// Takes the message if someone waits for it; gives it back otherwise.
    fn take(&mut self, frame: Frame) -> Option<Frame> {
        if let Some((barrier, index)) = self.members.remove(&frame.xid) {
            if let (Message::Error(e), Some(b)) = (&frame.message, self.batches.get_mut(&barrier)) {
                b.rejected.push(Rejected {
                    index,
                    err_type: e.err_type,
                    code: e.code,
                });
            }
            return None;
        }
        if let Some(b) = self.batches.remove(&frame.xid) {
            let _ = b.tx.send(b.rejected);
            return None;
        }
        let Some(mut p) = self.requests.remove(&frame.xid) else {
            return Some(frame);
        };
        match frame.message {
            Message::Error(e) => {
                let _ = p.tx.send(Err((e.err_type, e.code)));
            }
            Message::MultipartReply(r) if r.flags & MULTIPART_MORE != 0 => {
                p.parts.push(Message::MultipartReply(r));
                self.requests.insert(frame.xid, p);
            }
            m => {
                p.parts.push(m);
                let _ = p.tx.send(Ok(p.parts));
            }
        }
        None
    }
}

/// Why the connection loop ended (for the log and the Disconnected event).
enum End {
    Session(CloseReason),
    PeerClosed,
    Io(std::io::Error),
    WriteStalled,
    Replaced,
    /// Claimed the datapath id of a switch whose connection is alive.
    DuplicateRefused(Dpid),
    /// Claimed a datapath id its certificate does not grant.
    Unauthorized(Dpid),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Session(r) => write!(f, "{r}"),
            End::PeerClosed => write!(f, "peer closed the connection"),
            End::Io(e) => write!(f, "I/O error: {e}"),
            End::WriteStalled => write!(f, "peer stopped reading"),
            End::Replaced => write!(f, "replaced by a newer connection of the same switch"),
            End::Unauthorized(d) => write!(
                f,
                "claimed datapath id {d:#x}, which its certificate does not grant"
            ),
            End::DuplicateRefused(d) => write!(
                f,
                "claimed datapath id {d:#x}, whose switch is connected and answering"
            ),
        }
    }
}

/// Runs the TLS handshake (bounded by the OpenFlow handshake timeout) and reads what
/// the switch's verified certificate grants; `None` (logged and counted) refuses the peer.
async fn tls_accept<S>(
    tls: &SwitchTls,
    stream: S,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(tokio_rustls::server::TlsStream<S>, Credentials)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = shared.cfg.session.handshake_timeout;
    let why = match tokio::time::timeout(limit, tls.acceptor.accept(stream)).await {
        Err(_) => "TLS handshake not finished in time".to_string(),
        Ok(Err(e)) => format!("TLS handshake failed: {e}"),
        Ok(Ok(stream)) => {
            // Verification passed, so there is an end-entity certificate.
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first());
            match leaf.map(|c| Credentials::of(c, &tls.map)) {
                Some(Ok(creds)) => {
                    tracing::debug!(%peer, name = %creds.name, dpids = ?creds.dpids, "switch certificate accepted");
                    return Some((stream, creds));
                }
                Some(Err(e)) => e.to_string(),
                None => "no client certificate".to_string(),
            }
        }
    };
    shared.tls_refused.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%peer, reason = %why, "refused an OpenFlow peer at the TLS layer");
    None
}

/// Drives one switch connection over any byte stream (plain TCP, or TLS with the peer's
/// `creds`, which then bound the datapath ids it may claim).
async fn run_connection<S>(
    stream: S,
    peer: SocketAddr,
    conn_id: u64,
    shared: Arc<Shared>,
    creds: Option<Credentials>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let cfg = shared.cfg.session;
    let mut session = Session::new(cfg, Instant::now());
    let (commands_tx, mut commands) = mpsc::channel::<Command>(64);
    let kill = Arc::new(Notify::new());
    let mut dpid: Option<Dpid> = None;
    let mut waiters = Waiters::default();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = vec![0u8; 16 * 1024];
    let mut commands_tx = Some(commands_tx);
    let mut probe_waiters: Vec<oneshot::Sender<bool>> = Vec::new();

    let end = 'conn: loop {
        while let Some(out) = session.poll_output() {
            match out {
                Output::Send(bytes) => {
                    match tokio::time::timeout(cfg.dead_after, wr.write_all(&bytes)).await {
                        Err(_) => break 'conn End::WriteStalled,
                        Ok(Err(e)) => break 'conn End::Io(e),
                        Ok(Ok(())) => {}
                    }
                }
                Output::Up(features) => {
                    let id = features.datapath_id;
                    if let Some(c) = creds.as_ref().filter(|c| !c.may_claim(id)) {
                        shared.unauthorized_claims.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            dpid = format_args!("{id:#x}"),
                            %peer,
                            certificate = %c.name,
                            granted = ?c.dpids.iter().map(|d| format!("{d:#x}")).collect::<Vec<_>>(),
                            "refused a switch claiming a datapath id its certificate does not grant"
                        );
                        break 'conn End::Unauthorized(id);
                    }
                    let Some(tx) = commands_tx.take() else {
                        continue;
                    };
                    let me = Holder {
                        conn_id,
                        peer,
                        handle: Entry {
                            commands: tx,
                            kill: Arc::clone(&kill),
                        },
                    };
                    if !admit(&shared, id, me).await {
                        break 'conn End::DuplicateRefused(id);
                    }
                    dpid = Some(id);
                    tracing::info!(dpid = format_args!("{id:#x}"), %peer, "switch connected");
                    let _ = shared
                        .events
                        .send(SwitchEvent::Connected {
                            dpid: id,
                            features,
                            peer,
                        })
                        .await;
                }
                Output::Probed(alive) => {
                    for w in probe_waiters.drain(..) {
                        let _ = w.send(alive);
                    }
                }
                Output::Deliver(frame) => deliver(frame, dpid, &mut waiters, &shared),
                Output::Close(reason) => break 'conn End::Session(reason),
            }
        }
        waiters.prune();
        let deadline = tokio::time::Instant::from_std(session.next_deadline());
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => break End::PeerClosed,
                Ok(n) => session.receive(&buf[..n], Instant::now()),
                Err(e) => break End::Io(e),
            },
            Some(cmd) = commands.recv() => match cmd {
                Command::Send { msg, reply } => {
                    let xid = session.send(msg);
                    if let Some(tx) = reply {
                        waiters.requests.insert(xid, Pending { parts: Vec::new(), tx });
                    }
                }
                Command::Batch { msgs, reply } => {
                    let xids: Vec<u32> = msgs.into_iter().map(|m| session.send(m)).collect();
                    let barrier = session.send(Message::BarrierRequest);
                    for (index, xid) in xids.into_iter().enumerate() {
                        waiters.members.insert(xid, (barrier, index));
                    }
                    waiters.batches.insert(barrier, PendingBatch { rejected: Vec::new(), tx: reply });
                }
                Command::Probe { reply } => {
                    session.probe(Instant::now(), shared.cfg.duplicate_probe_timeout);
                    probe_waiters.push(reply);
                }
            },
            () = tokio::time::sleep_until(deadline) => session.on_tick(Instant::now()),
            () = kill.notified() => break End::Replaced,
        }
    };

    // The slot and the event first, the socket after: a peer that sees the connection
    // close can count on the controller's state and events saying so already.
    if let Some(id) = dpid {
        // Only remove our own entry: a replacement may already have taken the slot.
        let mine = shared.switches().release(id, conn_id);
        if mine {
            let _ = shared
                .events
                .send(SwitchEvent::Disconnected {
                    dpid: id,
                    reason: end.to_string(),
                })
                .await;
        }
    }
    // Bounded like every other wait on the peer.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    let who = dpid
        .map(|d| format!("{d:#x}"))
        .unwrap_or_else(|| "(no handshake)".into());
    match &end {
        End::Session(CloseReason::Protocol(_)) | End::Session(CloseReason::Unexpected(_)) => {
            tracing::warn!(%peer, dpid = %who, reason = %end, "dropping misbehaving peer")
        }
        // Already logged as a warning with the details where it was decided.
        End::DuplicateRefused(_) | End::Unauthorized(_) => {}
        _ => tracing::info!(%peer, dpid = %who, reason = %end, "switch connection closed"),
    }
    // Dropping `waiters` wakes every waiter with a disconnect error.
    drop(waiters);
}

/// Lets connection `me` speak for datapath `id` unless a live connection already does
/// (see [`super::registry`]); returns whether it may. The refusal is logged and counted.
async fn admit(shared: &Shared, id: Dpid, me: Holder<Entry>) -> bool {
    let claim = shared.switches().claim(id, me.clone());
    let holder = match claim {
        Claim::Granted => return true,
        Claim::Contested(holder) => holder,
    };
    let probe_timeout = shared.cfg.duplicate_probe_timeout;
    let (tx, rx) = oneshot::channel();
    let probe = async {
        holder
            .handle
            .commands
            .send(Command::Probe { reply: tx })
            .await
            .ok()?;
        rx.await.ok()
    };
    // A holder whose task is gone or wedged counts as silent. The margin covers the
    // holder's task noticing its own deadline.
    let alive = tokio::time::timeout(probe_timeout + Duration::from_millis(500), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false);
    let peer = me.peer;
    let settlement = shared.switches().settle(id, me, holder.conn_id, alive);
    match settlement {
        Settlement::Granted => true,
        Settlement::Replaced(old) => {
            tracing::info!(
                dpid = format_args!("{id:#x}"),
                %peer,
                old_peer = %old.peer,
                "switch reconnected and its old connection did not answer an echo; replacing it"
            );
            old.handle.kill.notify_one();
            true
        }
        Settlement::Refused => {
            tracing::warn!(
                dpid = format_args!("{id:#x}"),
                %peer,
                holder_peer = %holder.peer,
                "refused a connection claiming the datapath id of a connected switch that still answers"
            );
            false
        }
    }
}

/// Routes a message either to whoever waits for it or to the event stream.
fn deliver(frame: Frame, dpid: Option<Dpid>, waiters: &mut Waiters, shared: &Shared) {
    let Some(dpid) = dpid else { return };
    let Some(frame) = waiters.take(frame) else {
        return;
    };
    if let Message::Error(e) = &frame.message {
        tracing::warn!(
            dpid = format_args!("{dpid:#x}"),
            xid = frame.xid,
            err_type = e.err_type,
            code = e.code,
            "switch reported an error"
        );
    }
    if let Err(e) = shared.events.try_send(SwitchEvent::Message { dpid, frame }) {
        tracing::warn!(
            dpid = format_args!("{dpid:#x}"),
            "event queue full or closed, dropping message: {e}"
        );
    }
}
