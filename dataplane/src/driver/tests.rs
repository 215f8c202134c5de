//! The driver over an in-memory transport and a simulated clock: every connection is a
//! pair of byte queues the test fills and inspects, every event is one the test pushes,
//! and time only moves when the test advances it.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use ncp_replication::SessionConfig;

use super::*;
use crate::offline::{reader::EndKind, recorder::RecordHandle, testing};

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 1), 40000);
const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 80);
const REPLICA: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 3), 80);
/// The route of the replicas (a link, say).
const REPLICA_ROUTE: u8 = 7;
const DRAIN: Duration = Duration::from_secs(5);

/// One in-memory connection.
#[derive(Debug, Default)]
struct Pipe {
    /// What the peer sent, not read yet.
    inbound: Vec<u8>,
    /// The peer sent FIN after `inbound`.
    peer_fin: bool,
    /// The FIN was read.
    fin_read: bool,
    /// What the driver wrote.
    outbound: Vec<u8>,
    /// Bytes the peer still takes.
    room: usize,
    connected: bool,
    /// We sent FIN.
    shut: bool,
}

/// How a connection left the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gone {
    Aborted,
    Released,
}

#[derive(Debug, Default)]
struct Fake {
    next: u32,
    pipes: HashMap<u32, Pipe>,
    /// Every connect: the connection, where to, by which route.
    connects: Vec<(u32, SocketAddrV4, Option<u8>)>,
    /// Connects to these fail at once.
    unreachable: Vec<SocketAddrV4>,
    gone: HashMap<u32, Gone>,
}

impl Fake {
    fn open(&mut self, connected: bool) -> u32 {
        self.next += 1;
        self.pipes.insert(
            self.next,
            Pipe {
                connected,
                room: usize::MAX,
                ..Pipe::default()
            },
        );
        self.next
    }

    /// A connection, open or gone (what it was sent stays readable).
    fn pipe(&mut self, conn: u32) -> &mut Pipe {
        self.pipes.get_mut(&conn).expect("a connection of the test")
    }

    /// A connection the transport still has.
    fn live(&mut self, conn: u32) -> Option<&mut Pipe> {
        if self.gone.contains_key(&conn) {
            return None;
        }
        self.pipes.get_mut(&conn)
    }

    /// The connection to `to`, the latest if several.
    fn conn_to(&self, to: SocketAddrV4) -> u32 {
        self.connects
            .iter()
            .rev()
            .find(|(_, addr, _)| *addr == to)
            .map(|(c, _, _)| *c)
            .expect("connected to")
    }

    fn remove(&mut self, conn: u32, how: Gone) {
        let before = self.gone.insert(conn, how);
        assert_eq!(before, None, "connection {conn} released twice");
    }
}

impl Transport for Fake {
    type Conn = u32;
    type Route = u8;
    const ROUNDS_PER_PASS: usize = 8;

    fn connect(&mut self, to: SocketAddrV4, route: Option<&u8>) -> io::Result<u32> {
        if self.unreachable.contains(&to) {
            return Err(io::Error::other("unreachable"));
        }
        let conn = self.open(false);
        self.connects.push((conn, to, route.copied()));
        Ok(conn)
    }

    fn read(&mut self, conn: u32, buf: &mut [u8]) -> Received {
        let Some(p) = self.live(conn) else {
            return Received::Nothing;
        };
        if !p.inbound.is_empty() {
            let n = buf.len().min(p.inbound.len());
            buf[..n].copy_from_slice(&p.inbound[..n]);
            p.inbound.drain(..n);
            return Received::Data(n);
        }
        if p.peer_fin && !p.fin_read {
            p.fin_read = true;
            return Received::Eof;
        }
        Received::Nothing
    }

    fn write(&mut self, conn: u32, data: &[u8]) -> Sent {
        let Some(p) = self.live(conn) else {
            return Sent::Full;
        };
        let n = data.len().min(p.room);
        if !p.connected || p.shut || n == 0 {
            return Sent::Full;
        }
        p.outbound.extend_from_slice(&data[..n]);
        p.room -= n;
        Sent::Wrote(n)
    }

    fn shutdown_write(&mut self, conn: u32) -> io::Result<()> {
        let p = self.live(conn).ok_or(io::ErrorKind::NotConnected)?;
        p.shut = true;
        Ok(())
    }

    fn abort(&mut self, conn: u32) {
        self.remove(conn, Gone::Aborted);
    }

    fn release(&mut self, conn: u32) {
        self.remove(conn, Gone::Released);
    }

    fn may_linger(&self, conn: u32, side: Side) -> bool {
        side != Side::Client
            && !self.gone.contains_key(&conn)
            && self.pipes.get(&conn).is_some_and(|p| !p.fin_read)
    }
}

/// A driver over the fake with one service (one replica), and the simulated clock.
struct Bed {
    driver: Driver<Fake>,
    events: Vec<Event<u32>>,
    now: Instant,
}

impl Bed {
    fn new(replica_budget: u64, record: Option<RecordHandle>) -> Self {
        Self::with(replica_budget, record, 0)
    }

    /// A bed whose service verifies replies within `verify_window` bytes (0: off).
    fn with(replica_budget: u64, record: Option<RecordHandle>, verify_window: u64) -> Self {
        Self::planned(replica_budget, record, verify_window, None)
    }

    /// A bed whose service spills to `spill` (directory, budget).
    fn spilling(replica_budget: u64, dir: &std::path::Path, budget: u64) -> Self {
        Self::planned(replica_budget, None, 0, Some((dir.to_path_buf(), budget)))
    }

    fn planned(
        replica_budget: u64,
        record: Option<RecordHandle>,
        verify_window: u64,
        spill: Option<(std::path::PathBuf, u64)>,
    ) -> Self {
        let session = SessionConfig {
            replica_count: 1,
            replica_budget_bytes: replica_budget,
            primary_budget_bytes: 64 << 10,
            drain_timeout: DRAIN,
            verify_window_bytes: verify_window,
            spill_budget_bytes: spill.as_ref().map_or(0, |s| s.1),
            ..SessionConfig::default()
        };
        let plan = ServicePlan {
            name: "svc".into(),
            primary: PRIMARY,
            clients: "198.18.1.0/24".parse().expect("prefix"),
            replicas: vec![REPLICA],
            session,
            replica_route: REPLICA_ROUTE,
            listen_port: PRIMARY.port(),
            record,
            consistency: Default::default(),
            spill_dir: spill.map(|s| s.0),
        };
        Self {
            driver: Driver::new(Fake::default(), vec![plan], ManagerConfig::default(), 16),
            events: Vec::new(),
            now: Instant::now(),
        }
    }

    fn fake(&mut self) -> &mut Fake {
        self.driver.transport_mut()
    }

    fn push(&mut self, event: Event<u32>) {
        self.events.push(event);
    }

    /// Turns until the driver has nothing left to do (bounded). A replica fed from its
    /// spool may wait for the spool's writer thread: after the first thousand turns
    /// each one yields to it.
    fn settle(&mut self) {
        for turn in 0..100_000 {
            if !self.driver.turn(self.now, &mut self.events) {
                return;
            }
            if turn >= 1000 {
                std::thread::yield_now();
            }
        }
        panic!("the driver never settled");
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.settle();
    }

    /// A client of the service connects, sending `data`; returns its connection.
    fn client(&mut self, data: &[u8]) -> u32 {
        let conn = self.fake().open(true);
        self.fake().pipe(conn).inbound = data.to_vec();
        self.push(Event::Accepted {
            conn,
            to: Addressed::Service(0),
            remote: SocketAddr::V4(CLIENT),
        });
        self.settle();
        conn
    }

    /// The upstream connection to `to` completes its handshake.
    fn connected(&mut self, to: SocketAddrV4) -> u32 {
        let conn = self.fake().conn_to(to);
        self.fake().pipe(conn).connected = true;
        self.push(Event::Connected(conn));
        self.settle();
        conn
    }

    /// The peer of `conn` sends `data` (and FIN, if `fin`).
    fn peer_sends(&mut self, conn: u32, data: &[u8], fin: bool) {
        let p = self.fake().pipe(conn);
        p.inbound.extend_from_slice(data);
        p.peer_fin |= fin;
        self.push(Event::Active(conn));
        self.settle();
    }

    fn service(&self) -> ServiceStats {
        self.driver.snapshot().services[0].clone()
    }

    /// A client connects, with its primary; the replica takes `room` bytes and then
    /// nothing. Returns the client, primary and replica connections.
    fn stalled_replica(&mut self, room: usize) -> (u32, u32, u32) {
        let client = self.client(b"");
        let primary = self.connected(PRIMARY);
        let replica = self.fake().conn_to(REPLICA);
        self.fake().pipe(replica).room = room;
        self.connected(REPLICA);
        (client, primary, replica)
    }

    /// The primary got all the client `sent`, not held up by the replica, which was
    /// detached and aborted. Returns the service's stats, to say why.
    fn assert_replica_detached(&mut self, primary: u32, replica: u32, sent: &[u8]) -> ServiceStats {
        assert_eq!(
            self.fake().pipe(primary).outbound,
            sent,
            "the primary is not held up"
        );
        assert_eq!(self.fake().gone.get(&replica), Some(&Gone::Aborted));
        self.service()
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn upstreams_are_connected_and_a_refused_replica_is_detached() {
    let mut bed = Bed::new(1 << 20, None);
    let client = bed.client(b"hello");
    let connects: Vec<_> = bed.fake().connects.iter().map(|c| (c.1, c.2)).collect();
    assert_eq!(
        connects,
        vec![(PRIMARY, None), (REPLICA, Some(REPLICA_ROUTE))],
        "the primary on the default path, the replica on the service's route"
    );
    let primary = bed.connected(PRIMARY);
    let replica = bed.fake().conn_to(REPLICA);
    // The transport releases a refused attempt itself.
    bed.fake().remove(replica, Gone::Released);
    bed.push(Event::Refused(replica));
    bed.settle();
    assert_eq!(bed.fake().pipe(primary).outbound, b"hello");
    bed.peer_sends(primary, b"answer", false);
    assert_eq!(bed.fake().pipe(client).outbound, b"answer");
    let svc = bed.service();
    assert_eq!(svc.replicas[0].detached.refused, 1);
    assert_eq!(svc.sessions_active, 1, "the client is still served");
    assert_eq!(bed.driver.snapshot().counters.drops, DropStats::default());
}

#[test]
fn a_connect_that_fails_at_once_is_a_refusal() {
    let mut bed = Bed::new(1 << 20, None);
    bed.fake().unreachable.push(PRIMARY);
    let client = bed.client(b"hello");
    assert_eq!(bed.fake().gone.get(&client), Some(&Gone::Aborted));
    let s = bed.driver.snapshot();
    assert_eq!(s.counters.drops.connect_failed, 1);
    assert_eq!(s.services[0].primary_failures, 1);
    // Without a primary the client is reset; the replica is still closed in order.
    let replica = bed.connected(REPLICA);
    assert!(bed.fake().pipe(replica).shut, "the replica got our FIN");
    assert_eq!(bed.driver.sessions(), 0);
}

#[test]
fn clients_outside_the_prefix_and_unknown_services_are_reset() {
    let mut bed = Bed::new(1 << 20, None);
    let outsider = bed.fake().open(true);
    let nowhere = bed.fake().open(true);
    bed.push(Event::Accepted {
        conn: outsider,
        to: Addressed::Endpoint(PRIMARY),
        remote: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 9), 1)),
    });
    bed.push(Event::Accepted {
        conn: nowhere,
        to: Addressed::Endpoint(REPLICA),
        remote: SocketAddr::V4(CLIENT),
    });
    bed.settle();
    assert_eq!(bed.fake().gone.get(&outsider), Some(&Gone::Aborted));
    assert_eq!(bed.fake().gone.get(&nowhere), Some(&Gone::Aborted));
    let s = bed.driver.snapshot();
    assert_eq!(s.services[0].refused.not_a_client, 1);
    assert_eq!(s.counters.drops.not_a_service, 1);
    assert_eq!(
        (s.counters.sessions_refused, s.counters.sessions_total),
        (2, 0)
    );
}

#[test]
fn a_replica_over_its_budget_is_detached_and_aborted() {
    let mut bed = Bed::new(4096, None);
    // The replica takes 1000 bytes and then nothing.
    let (client, primary, replica) = bed.stalled_replica(1000);
    let data = pattern(20_000);
    bed.peer_sends(client, &data[..3000], false);
    assert!(bed.fake().pipe(replica).outbound == data[..1000]);
    assert_eq!(bed.fake().gone.get(&replica), None, "within its budget");
    bed.peer_sends(client, &data[3000..], false);
    let svc = bed.assert_replica_detached(primary, replica, &data);
    assert_eq!(svc.replicas[0].detached.lagged, 1, "{svc:#?}");
    assert_eq!(svc.replicas[0].live_sessions, 0);
    assert_eq!(svc.sessions_active, 1);
}

/// A session whose client sent `data` and FIN, answered by the primary with FIN; the
/// replica took everything and said nothing. Returns the replica's connection.
fn finished_session(bed: &mut Bed, data: &[u8]) -> u32 {
    let client = bed.client(data);
    bed.fake().pipe(client).peer_fin = true;
    let primary = bed.connected(PRIMARY);
    let replica = bed.connected(REPLICA);
    bed.peer_sends(primary, b"bye", true);
    assert_eq!(bed.fake().pipe(client).outbound, b"bye");
    assert!(bed.fake().pipe(replica).shut, "the replica got our FIN");
    assert_eq!(bed.driver.sessions(), 0, "the session finished");
    assert_eq!(bed.fake().gone.get(&client), Some(&Gone::Released));
    assert_eq!(bed.fake().gone.get(&primary), Some(&Gone::Released));
    replica
}

#[test]
fn a_lingering_replica_is_drained_until_it_closes() {
    let mut bed = Bed::new(1 << 20, None);
    let replica = finished_session(&mut bed, b"request");
    assert_eq!(bed.fake().pipe(replica).outbound, b"request");
    assert_eq!(bed.driver.snapshot().lingering_connections, 1);
    bed.peer_sends(replica, b"late answer", false);
    let s = bed.driver.snapshot();
    assert_eq!(s.lingering_bytes_discarded, 11);
    assert_eq!(s.lingering_connections, 1, "no FIN yet");
    bed.peer_sends(replica, b"", true);
    assert_eq!(bed.fake().gone.get(&replica), Some(&Gone::Released));
    assert_eq!(bed.driver.snapshot().lingering_connections, 0);
}

#[test]
fn a_lingering_replica_is_released_at_the_drain_deadline() {
    let mut bed = Bed::new(1 << 20, None);
    let replica = finished_session(&mut bed, b"request");
    let deadline = bed.driver.next_timer().expect("a lingering deadline");
    assert_eq!(deadline, bed.now + DRAIN);
    bed.advance(DRAIN - Duration::from_millis(1));
    assert_eq!(bed.fake().gone.get(&replica), None, "released early");
    bed.advance(Duration::from_millis(1));
    assert_eq!(bed.fake().gone.get(&replica), Some(&Gone::Released));
    let s = bed.driver.snapshot();
    assert_eq!(s.lingering_connections, 0);
    assert_eq!(s.counters.drops.lingering_overflow, 0);
}

#[test]
fn a_recording_holds_exactly_what_the_core_accepted() {
    let (rec, dir) = testing::recorder("driver", true);
    let mut bed = Bed::new(1 << 20, Some(rec.handle()));
    // More than the primary's budget, and the primary takes nothing: the core accepts
    // its budget and no more, and only that is recorded.
    let data = pattern(200_000);
    bed.client(&data);
    let primary = bed.fake().conn_to(PRIMARY);
    bed.fake().pipe(primary).room = 0;
    bed.connected(PRIMARY);
    bed.connected(REPLICA);
    let svc = bed.service();
    let accepted = svc.client_bytes_in;
    assert!(accepted > 0 && accepted < data.len() as u64, "{svc:#?}");
    assert_eq!(svc.recording.map(|r| r.client_bytes), Some(accepted));
    bed.driver.shutdown();
    rec.finish();

    let r = testing::recorded(&dir);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.sessions.len(), 1);
    let session = &r.sessions[0];
    assert_eq!(session.meta.primary, PRIMARY);
    assert_eq!(*session.meta.client.ip(), *CLIENT.ip());
    let accepted = usize::try_from(accepted).expect("fits");
    assert!(
        session.client == data[..accepted],
        "recorded stream differs"
    );
    assert_eq!(session.end, EndKind::Reset, "reset at stop");
}

#[test]
fn shutdown_resets_open_sessions() {
    let mut bed = Bed::new(1 << 20, None);
    let client = bed.client(b"in flight");
    let primary = bed.connected(PRIMARY);
    let replica = bed.connected(REPLICA);
    assert_eq!(bed.driver.shutdown(), 1);
    for conn in [client, primary, replica] {
        assert_eq!(bed.fake().gone.get(&conn), Some(&Gone::Aborted), "{conn}");
    }
    let s = bed.driver.snapshot();
    assert_eq!(
        (s.counters.sessions_active, s.counters.sessions_total),
        (0, 1)
    );
    assert_eq!(s.services[0].primary_bytes_out, 9);
    assert_eq!(bed.driver.next_timer(), None);
    // Events for released connections are ignored.
    bed.push(Event::Active(client));
    bed.settle();
}

mod consistency {
    use super::*;
    use crate::driver::consistency::{ConsistencyState, ReplicaConsistency};

    fn replica_state(bed: &Bed) -> ReplicaConsistency {
        let book = &bed.driver.services()[0].consistency;
        let all = book.report();
        assert_eq!(all.len(), 1, "one service, one replica: {all:?}");
        all[0].clone()
    }

    /// A verifying bed whose replica an operator has marked in step.
    fn in_step_bed(verify_window: u64) -> Bed {
        let bed = Bed::with(1 << 20, None, verify_window);
        let start = replica_state(&bed);
        assert_eq!(
            start.state,
            ConsistencyState::Unknown,
            "unknown until an operator says so"
        );
        assert!(start.reasons.unknown_since_start);
        mark_in_step(&bed);
        bed
    }

    /// What `ncp-middlebox replica reset` does.
    fn mark_in_step(bed: &Bed) {
        bed.driver.services()[0]
            .consistency
            .reset("svc", REPLICA)
            .expect("registered by the driver");
    }

    /// One request answered by the primary with `primary` and by the replica with
    /// `replica`; returns what the client got.
    fn exchange(bed: &mut Bed, primary_answer: &[u8], replica_answer: &[u8]) -> Vec<u8> {
        let client = bed.client(b"GET k\r\n");
        let primary = bed.connected(PRIMARY);
        let replica = bed.connected(REPLICA);
        // The replica answers in two pieces, before and after the primary.
        let (early, late) = replica_answer.split_at(replica_answer.len() / 2);
        bed.peer_sends(replica, early, false);
        bed.peer_sends(primary, primary_answer, false);
        bed.peer_sends(replica, late, false);
        bed.fake().pipe(client).peer_fin = true;
        bed.push(Event::Active(client));
        bed.peer_sends(primary, b"", true);
        assert_eq!(bed.driver.sessions(), 0, "the session finished");
        bed.fake().pipe(client).outbound.clone()
    }

    #[test]
    fn identical_answers_keep_the_replica_in_step_and_are_counted() {
        let mut bed = in_step_bed(4096);
        for _ in 0..3 {
            let got = exchange(&mut bed, b"$3\r\nbar\r\n", b"$3\r\nbar\r\n");
            assert_eq!(got, b"$3\r\nbar\r\n");
        }
        let r = replica_state(&bed);
        assert_eq!(r.state, ConsistencyState::InStep);
        assert_eq!(r.verification.bytes_compared, 27);
        assert_eq!(r.verification.mismatches, 0);
    }

    #[test]
    fn a_differing_answer_diverges_the_replica_at_its_offset_until_reset() {
        let mut bed = in_step_bed(4096);
        let got = exchange(&mut bed, b"$3\r\nbar\r\n", b"$3\r\nbaz\r\n");
        assert_eq!(
            got, b"$3\r\nbar\r\n",
            "the client only ever sees the primary"
        );
        let r = replica_state(&bed);
        assert_eq!(r.state, ConsistencyState::Diverged);
        assert_eq!(r.reasons.reply_mismatch, 1);
        assert_eq!(r.last_reason.as_deref(), Some("reply mismatch at offset 6"));
        let m = r.first_mismatch.expect("excerpt kept");
        assert_eq!(
            (m.offset, m.primary.as_str(), m.replica.as_str()),
            (6, "r\\r\\n", "z\\r\\n")
        );
        assert_eq!(r.verification.bytes_compared, 6);

        // Later sessions that agree do not put it back in step: only the operator does.
        exchange(&mut bed, b"+OK\r\n", b"+OK\r\n");
        assert_eq!(replica_state(&bed).state, ConsistencyState::Diverged);
        mark_in_step(&bed);
        let r = replica_state(&bed);
        assert_eq!(r.state, ConsistencyState::InStep);
        assert_eq!(r.verification.mismatches, 1);
    }

    #[test]
    fn without_verification_answers_are_not_judged() {
        let mut bed = in_step_bed(0);
        exchange(&mut bed, b"$3\r\nbar\r\n", b"-ERR other server\r\n");
        let r = replica_state(&bed);
        assert_eq!(r.state, ConsistencyState::InStep);
        assert_eq!(r.verification.bytes_compared, 0);
    }

    #[test]
    fn a_detached_replica_diverges_with_the_reason() {
        let mut bed = in_step_bed(0);
        bed.client(b"SET k v\r\n");
        bed.connected(PRIMARY);
        let replica = bed.fake().conn_to(REPLICA);
        bed.fake().remove(replica, Gone::Released);
        bed.push(Event::Refused(replica));
        bed.settle();
        let r = replica_state(&bed);
        assert_eq!(r.state, ConsistencyState::Diverged);
        assert_eq!(r.reasons.detached.refused, 1);
        assert!(
            r.last_reason
                .as_deref()
                .is_some_and(|s| s.contains("refused")),
            "{r:?}"
        );
    }

    #[test]
    fn an_overrun_window_is_counted_and_is_no_divergence() {
        let mut bed = in_step_bed(4);
        exchange(&mut bed, b"$3\r\nbar\r\n", b"$3\r\nbar\r\n");
        let r = replica_state(&bed);
        assert_eq!(r.state, ConsistencyState::InStep);
        assert_eq!(r.verification.window_exceeded, 1);
    }
}

/// A bed whose service spills, with a client, its primary and a replica that takes
/// `replica_room` bytes, then stalls. Its scratch directory goes when it is dropped.
struct SpillBed {
    bed: Bed,
    scratch: std::path::PathBuf,
    client: u32,
    primary: u32,
    replica: u32,
}

impl SpillBed {
    /// Spilling into a fresh directory named after the test.
    fn new(name: &str, spill_budget: u64, replica_room: usize) -> Self {
        let scratch = Self::scratch(name);
        Self::spooling_to(scratch.clone(), scratch, spill_budget, replica_room)
    }

    /// Spilling to a path that is a regular file, so no spool can be made there.
    fn unwritable(name: &str, spill_budget: u64, replica_room: usize) -> Self {
        let scratch = Self::scratch(name);
        std::fs::create_dir_all(&scratch).expect("scratch directory");
        let file = scratch.join("a-file");
        std::fs::write(&file, b"not a directory").expect("scratch file");
        Self::spooling_to(scratch, file, spill_budget, replica_room)
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ncp-driver-spill-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn spooling_to(
        scratch: std::path::PathBuf,
        spool_dir: std::path::PathBuf,
        spill_budget: u64,
        replica_room: usize,
    ) -> Self {
        let mut bed = Bed::spilling(4096, &spool_dir, spill_budget);
        let (client, primary, replica) = bed.stalled_replica(replica_room);
        Self {
            bed,
            scratch,
            client,
            primary,
            replica,
        }
    }

    /// The stalled replica has room again and says so.
    fn wake_replica(&mut self) {
        self.bed.fake().pipe(self.replica).room = usize::MAX;
        self.bed.push(Event::Active(self.replica));
        self.bed.settle();
    }

    /// Spool files are removed by the writer thread, in order after its writes: wait
    /// for it (bounded), then say that none is left.
    fn assert_spool_removed(&self) {
        for _ in 0..10_000 {
            if spool::spool_files(&self.scratch).is_empty() {
                return;
            }
            std::thread::yield_now();
        }
        panic!(
            "spool files left behind: {:?}",
            spool::spool_files(&self.scratch)
        );
    }
}

impl Drop for SpillBed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

#[test]
fn a_stalled_replica_spills_and_catches_up_from_its_spool_in_order() {
    let mut s = SpillBed::new("catch-up", 1 << 20, 1000);
    let (client, primary, replica) = (s.client, s.primary, s.replica);
    let bed = &mut s.bed;
    // The replica took 1000 bytes, then stalls far beyond its memory budget.
    let data = pattern(60_000);
    bed.peer_sends(client, &data[..40_000], false);
    assert_eq!(
        bed.fake().pipe(primary).outbound,
        data[..40_000],
        "the primary is not held up"
    );
    let snapshot = bed.driver.snapshot();
    assert_eq!(
        bed.fake().gone.get(&replica),
        None,
        "spilled, not detached: {snapshot:#?}"
    );
    let svc = bed.service();
    assert!(svc.replicas[0].spilled_bytes > 0, "{svc:#?}");
    assert_eq!(svc.replicas[0].detached.total(), 0, "{svc:#?}");
    assert!(!spool::spool_files(&s.scratch).is_empty() || svc.replicas[0].spilled_bytes > 0);

    // It wakes up while the client still writes: spool first, then memory, in order.
    s.wake_replica();
    let bed = &mut s.bed;
    bed.peer_sends(client, &data[40_000..], true);
    assert_eq!(bed.fake().pipe(replica).outbound, data);
    assert!(
        bed.fake().pipe(replica).shut,
        "the replica got our FIN after everything"
    );
    let svc = bed.service();
    assert_eq!(svc.replicas[0].bytes_out, data.len() as u64);
    assert_eq!(
        svc.replicas[0].replayed_bytes,
        svc.replicas[0].spilled_bytes
    );
    assert_eq!(svc.replicas[0].detached.total(), 0);
    assert_eq!(bed.driver.snapshot().counters.drops, DropStats::default());
    s.assert_spool_removed();
}

#[test]
fn beyond_the_spill_budget_the_replica_is_detached_diverged_and_its_spool_removed() {
    let mut s = SpillBed::new("budget", 8192, 0);
    let (client, primary, replica) = (s.client, s.primary, s.replica);
    let bed = &mut s.bed;
    let data = pattern(50_000);
    // In reads smaller than the memory budget: the first spills fit, a later one not.
    for piece in data.chunks(3000) {
        bed.peer_sends(client, piece, false);
    }
    let svc = bed.assert_replica_detached(primary, replica, &data);
    assert_eq!(svc.replicas[0].detached.spill_budget, 1, "{svc:#?}");
    assert!(svc.replicas[0].spilled_bytes > 0);
    let book = bed.driver.services()[0].consistency.report();
    assert_eq!(
        book[0].state,
        crate::driver::consistency::ConsistencyState::Diverged,
        "{book:#?}"
    );
    assert_eq!(book[0].reasons.detached.spill_budget, 1);
    s.assert_spool_removed();
}

#[test]
fn an_unwritable_spill_dir_detaches_the_replica_counted() {
    let mut s = SpillBed::unwritable("unwritable", 1 << 20, 0);
    s.bed.peer_sends(s.client, &pattern(20_000), false);
    // Fed from the spool once it has room: the spool is found broken.
    s.wake_replica();
    assert_eq!(s.bed.fake().gone.get(&s.replica), Some(&Gone::Aborted));
    let snap = s.bed.driver.snapshot();
    assert_eq!(
        snap.services[0].replicas[0].detached.spill_budget, 1,
        "{snap:#?}"
    );
    assert_eq!(snap.counters.drops.spill_failed, 1);
}
