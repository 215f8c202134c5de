//! The protocol-aware session start (`ncp_replication::start`): PostgreSQL's and Redis's
//! readers of the client's start-up and of the primary's answers, and the middlebox's
//! logins to a replica, all fed bytes from the network.
//!
//! Input: a selector byte (bit 0: PostgreSQL or Redis; the rest: the chunk size the
//! streams are cut into), then three streams, each prefixed by a 2-byte big-endian
//! length: the client's, the primary's, the replica's. Properties: no panic; no client
//! byte is lost or handed on twice (what goes to the primary only, what goes to everyone
//! after the start-up, and the PostgreSQL TLS requests the middlebox answers itself add
//! up to the input); the primary's start-up ends inside the bytes given; a login's output
//! stays bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ncp_replication::start::{PrimaryStep, Protocol, ReplicaCredentials, Secret};

/// Bytes a PostgreSQL TLS or GSS request takes; the middlebox answers each with one `N`.
const TLS_REQUEST_BYTES: usize = 8;

fn take_stream(data: &mut &[u8]) -> Vec<u8> {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return Vec::new();
    };
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (stream, rest) = rest.split_at(len);
    *data = rest;
    stream.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, mut data)) = data.split_first() else {
        return;
    };
    let protocol = if selector & 1 == 0 {
        Protocol::Postgres
    } else {
        Protocol::Redis
    };
    let chunk = usize::from(selector >> 1).max(1);
    let client = take_stream(&mut data);
    let primary = take_stream(&mut data);
    let replica = take_stream(&mut data);

    let mut dialect = protocol.dialect();
    let (mut handed_on, mut answered) = (0usize, 0usize);
    let mut ended = false;
    let mut fed = 0usize;
    for piece in client.chunks(chunk) {
        fed += piece.len();
        let step = dialect.on_client(piece);
        answered += step.reply.len();
        handed_on += step.startup.len() + step.held_after.len();
        if let Some(at) = step.ended_at {
            assert!(at <= piece.len(), "the start-up ends inside the input");
            handed_on += piece.len() - at;
        }
        if step.ended_at.is_some() || step.refused.is_some() {
            ended = true;
            break;
        }
    }
    if protocol == Protocol::Redis {
        assert_eq!(answered, 0, "Redis's start is never answered by the middlebox");
    }
    let swallowed = answered * TLS_REQUEST_BYTES;
    if ended {
        assert_eq!(handed_on + swallowed, fed, "client bytes lost or doubled");
    } else {
        assert!(handed_on + swallowed <= fed, "more handed on than came");
    }

    for piece in primary.chunks(chunk) {
        match dialect.on_primary(piece) {
            PrimaryStep::StartingUp => {}
            PrimaryStep::Ended(at) => {
                assert!(at <= piece.len());
                break;
            }
            PrimaryStep::NotComparable | PrimaryStep::Refused => break,
        }
    }

    let credentials = ReplicaCredentials {
        user: Some("ncp".into()),
        password: Some(Secret::new("pw")),
        database: None,
    };
    if let Some(Ok(mut login)) = dialect.replica_login(&credentials) {
        let mut out = login.take_output().len();
        for piece in replica.chunks(chunk) {
            if login.logged_in() || login.on_reply(piece).is_err() {
                break;
            }
            out += login.take_output().len();
        }
        assert!(out <= 64 << 10, "a login said {out} bytes");
    }
});
