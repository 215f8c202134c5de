//! The protocol-aware start inside a session: a PostgreSQL client's start-up reaches the
//! primary only, each replica logs in with its own credentials and then takes the rest
//! of the stream, verification skips the per-server start-up answers, and a replica that
//! refuses its login is detached without the client noticing. Redis: a client the
//! primary refuses takes the replicas out of the session.

mod common;

use std::sync::Arc;

use common::{Clock, actions, config, connected, drain};
use ncp_replication::start::{Protocol, ReplicaCredentials, Secret, StartConfig};
use ncp_replication::{Action, DetachReason, ReplyCheckOutcome, Side};

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn startup(user: &str) -> Vec<u8> {
    let body = [
        &196_608u32.to_be_bytes()[..],
        b"user\0",
        user.as_bytes(),
        b"\0database\0bank\0\0",
    ]
    .concat();
    [&((body.len() + 4) as u32).to_be_bytes()[..], &body].concat()
}

fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    message(b'R', &[&code.to_be_bytes()[..], data].concat())
}

/// The primary's start-up answers: per-server values the replicas' never equal.
fn logged_in(backend_key: u8) -> Vec<u8> {
    [
        auth(0, b""),
        message(b'K', &[backend_key; 8]),
        message(b'Z', b"I"),
    ]
    .concat()
}

fn session(
    replicas: Vec<ReplicaCredentials>,
    verify: bool,
    clock: &Clock,
) -> ncp_replication::Session {
    let mut cfg = config(replicas.len() as u16);
    cfg.verify_window_bytes = if verify { 4096 } else { 0 };
    cfg.start = Some(Arc::new(StartConfig {
        protocol: Protocol::Postgres,
        replicas,
    }));
    connected(cfg, clock)
}

fn md5_replica(user: Option<&str>) -> ReplicaCredentials {
    ReplicaCredentials {
        user: user.map(str::to_owned),
        password: Some(Secret::new("replica-pw")),
        database: None,
    }
}

/// The only action is replica `i`'s detach for a failed login, whose reason says `why`.
fn assert_login_failed(s: &mut ncp_replication::Session, i: u16, why: &str) {
    assert_eq!(
        actions(s),
        vec![Action::Detached {
            replica: i,
            reason: DetachReason::LoginFailed
        }]
    );
    let reason = s.login_error(i).expect("reason kept");
    assert!(reason.contains(why), "{reason}");
}

#[test]
fn replicas_log_in_themselves_and_take_the_stream_after_the_clients_start_up() {
    let clock = Clock::new();
    let now = clock.now();
    let mut s = session(vec![md5_replica(Some("bob"))], true, &clock);
    let ssl_request = [0, 0, 0, 8, 4, 210, 22, 47];
    s.on_data(Side::Client, &ssl_request, now)
        .expect("accepted");
    assert_eq!(
        drain(&mut s, Side::Client, now),
        b"N",
        "declined by the middlebox"
    );
    assert!(
        drain(&mut s, Side::Primary, now).is_empty(),
        "the primary never sees it"
    );

    let client_auth = [startup("alice"), message(b'p', b"md5primaryanswer\0")].concat();
    s.on_data(Side::Client, &client_auth, now)
        .expect("accepted");
    assert_eq!(drain(&mut s, Side::Primary, now), client_auth);
    // The replica's leg speaks for itself: the same start-up with its own user.
    assert_eq!(drain(&mut s, Side::Replica(0), now), startup("bob"));
    s.on_data(Side::Primary, &logged_in(1), now)
        .expect("primary");
    let query = message(b'Q', b"INSERT INTO t VALUES (1)\0");
    s.on_data(Side::Client, &query, now).expect("accepted");
    assert_eq!(drain(&mut s, Side::Primary, now), query);
    assert!(
        drain(&mut s, Side::Replica(0), now).is_empty(),
        "not logged in yet"
    );

    s.on_data(Side::Replica(0), &auth(5, &[1, 2, 3, 4]), now)
        .expect("replica");
    let answer = drain(&mut s, Side::Replica(0), now);
    assert_eq!(answer[0], b'p', "the middlebox answers the MD5 challenge");
    assert_ne!(answer, message(b'p', b"md5primaryanswer\0"));
    s.on_data(Side::Replica(0), &logged_in(2), now)
        .expect("replica");
    assert_eq!(
        drain(&mut s, Side::Replica(0), now),
        query,
        "the client's stream, from its query on"
    );

    // Same answers after the start-up: no mismatch, although the start-ups differed.
    let result = message(b'C', b"INSERT 0 1\0");
    s.on_data(Side::Primary, &result, now).expect("primary");
    s.on_data(Side::Replica(0), &result, now).expect("replica");
    assert_eq!(s.reply_bytes_compared(0), result.len() as u64);
    assert_eq!(s.reply_mismatch(0), None);
    assert!(
        !actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::Detached { .. } | Action::ReplyCheck { .. }))
    );
    assert_eq!(
        drain(&mut s, Side::Client, now),
        [logged_in(1), result].concat()
    );
}

#[test]
fn a_refused_login_detaches_only_that_replica_with_its_reason() {
    let clock = Clock::new();
    let now = clock.now();
    let mut s = session(
        vec![md5_replica(None), ReplicaCredentials::default()],
        true,
        &clock,
    );
    s.on_data(Side::Client, &startup("alice"), now)
        .expect("accepted");
    for i in 0..2 {
        assert_eq!(drain(&mut s, Side::Replica(i), now), startup("alice"));
    }
    s.on_data(Side::Replica(0), &logged_in(3), now)
        .expect("replica 0");
    s.on_data(Side::Replica(1), &auth(3, b""), now)
        .expect("replica 1");
    assert_login_failed(&mut s, 1, "none is configured");
    let why = s.login_error(1).expect("reason kept");
    assert!(!why.contains("replica-pw"), "no secret in the reason");
    assert_eq!(s.stats().detached.login_failed, 1);
    // The client and the other replica go on.
    s.on_data(Side::Primary, &logged_in(1), now)
        .expect("primary");
    let query = message(b'Q', b"SELECT 1\0");
    s.on_data(Side::Client, &query, now).expect("accepted");
    assert_eq!(drain(&mut s, Side::Replica(0), now), query);
    assert_eq!(
        drain(&mut s, Side::Primary, now),
        [startup("alice"), query.clone()].concat()
    );
}

#[test]
fn a_replica_that_never_finishes_its_login_is_detached_at_the_connect_timeout() {
    let mut clock = Clock::new();
    let mut s = session(vec![md5_replica(None)], false, &clock);
    s.on_data(Side::Client, &startup("alice"), clock.now())
        .expect("accepted");
    drain(&mut s, Side::Replica(0), clock.now());
    let due = s.poll_timeout().expect("a login deadline");
    assert_eq!(due, clock.now() + config(1).connect_timeout);
    let now = clock.advance(config(1).connect_timeout);
    s.handle_timeout(now);
    assert_eq!(
        actions(&mut s),
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::LoginFailed
        }]
    );
    assert!(s.login_error(0).is_some_and(|w| w.contains("in time")));
}

#[test]
fn a_start_up_the_middlebox_cannot_follow_reaches_the_primary_and_detaches_replicas() {
    let clock = Clock::new();
    let now = clock.now();
    let mut s = session(vec![md5_replica(None)], true, &clock);
    let version_2 = [0, 0, 0, 9, 0, 2, 0, 0, 0];
    s.on_data(Side::Client, &version_2, now).expect("accepted");
    assert_eq!(drain(&mut s, Side::Primary, now), version_2);
    assert_login_failed(&mut s, 0, "protocol version 2.0");
}

#[test]
fn a_primary_that_refuses_the_client_leaves_nothing_to_compare() {
    let clock = Clock::new();
    let now = clock.now();
    let mut s = session(vec![ReplicaCredentials::default()], true, &clock);
    s.on_data(Side::Client, &startup("alice"), now)
        .expect("accepted");
    drain(&mut s, Side::Replica(0), now);
    s.on_data(Side::Replica(0), &logged_in(2), now)
        .expect("replica");
    s.on_data(
        Side::Primary,
        &message(b'E', b"SFATAL\0Mpassword authentication failed\0\0"),
        now,
    )
    .expect("primary");
    let acts = actions(&mut s);
    assert!(
        !acts.iter().any(|a| matches!(
            a,
            Action::ReplyCheck {
                outcome: ReplyCheckOutcome::Mismatch,
                ..
            }
        )),
        "{acts:?}"
    );
    assert_eq!(s.reply_mismatch(0), None);
}

#[test]
fn a_redis_client_the_primary_refuses_takes_the_replicas_out_of_the_session() {
    let clock = Clock::new();
    let now = clock.now();
    let mut cfg = config(1);
    cfg.start = Some(Arc::new(StartConfig {
        protocol: Protocol::Redis,
        replicas: vec![md5_replica(None)],
    }));
    let mut s = connected(cfg, &clock);
    let auth = b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n".to_vec();
    let set = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n".to_vec();
    s.on_data(Side::Client, &[auth.clone(), set.clone()].concat(), now)
        .expect("accepted");
    assert_eq!(drain(&mut s, Side::Primary, now), [auth, set].concat());
    assert_eq!(
        drain(&mut s, Side::Replica(0), now),
        b"*2\r\n$4\r\nAUTH\r\n$10\r\nreplica-pw\r\n",
        "its own AUTH first"
    );
    s.on_data(
        Side::Primary,
        b"-WRONGPASS invalid username-password pair\r\n",
        now,
    )
    .expect("primary");
    assert_login_failed(&mut s, 0, "primary refused");
}

/// The session_start fuzz target's seeds: real start-ups of both protocols, in its input
/// format (selector, then the client's, the primary's and the replica's streams).
#[test]
fn fuzz_seeds_are_current() {
    let stream = |bytes: &[u8]| [&(bytes.len() as u16).to_be_bytes()[..], bytes].concat();
    let seed = |selector: u8, client: &[u8], primary: &[u8], replica: &[u8]| {
        [
            vec![selector],
            stream(client),
            stream(primary),
            stream(replica),
        ]
        .concat()
    };
    let ssl_request = [0, 0, 0, 8, 4, 210, 22, 47];
    let pg_client = [
        &ssl_request[..],
        &startup("alice"),
        &message(b'p', b"md5primaryanswer\0"),
        &message(b'Q', b"SELECT 1\0"),
    ]
    .concat();
    let pg_scram = [
        auth(10, b"SCRAM-SHA-256\0\0"),
        auth(11, b"r=abc,s=c2FsdA==,i=4096"),
    ]
    .concat();
    let redis_client = b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    let redis_primary = b"+OK\r\n%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n$-1\r\n";
    let seeds = vec![
        (
            "postgres-md5".to_string(),
            seed(
                2 * 7,
                &pg_client,
                &logged_in(1),
                &[auth(5, &[1, 2, 3, 4]), logged_in(2)].concat(),
            ),
        ),
        (
            "postgres-scram".to_string(),
            seed(2 * 64, &pg_client, &logged_in(1), &pg_scram),
        ),
        (
            "redis-auth-hello".to_string(),
            seed(
                2 * 5 + 1,
                redis_client,
                redis_primary,
                b"+OK\r\n%1\r\n$2\r\nid\r\n:7\r\n",
            ),
        ),
    ];
    ncp_testbed::fuzz_seeds::sync("session_start", &seeds);
}
