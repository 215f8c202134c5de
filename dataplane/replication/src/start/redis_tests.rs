use super::*;
use crate::start::Secret;

fn cmd(args: &[&str]) -> Vec<u8> {
    encode(
        &args
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    )
}

fn creds(user: Option<&str>, password: Option<&str>) -> ReplicaCredentials {
    ReplicaCredentials {
        user: user.map(str::to_owned),
        password: password.map(Secret::new),
        database: None,
    }
}

/// Feeds `stream` in chunks of `split`; returns (start-up bytes, stream offset where
/// everyone's part begins, everyone's bytes).
fn follow(w: &mut RedisStart, stream: &[u8], split: usize) -> (Vec<u8>, Option<usize>, Vec<u8>) {
    let mut startup = Vec::new();
    let mut everyone = Vec::new();
    let mut end = None;
    let mut offset = 0;
    for chunk in stream.chunks(split) {
        if end.is_some() {
            everyone.extend_from_slice(chunk);
            continue;
        }
        let step = w.on_client(chunk);
        assert_eq!(step.refused, None);
        assert!(step.reply.is_empty());
        startup.extend(step.startup);
        if let Some(at) = step.ended_at {
            end = Some(offset + at - step.held_after.len());
            everyone.extend(step.held_after);
            everyone.extend_from_slice(&chunk[at..]);
        }
        offset += chunk.len();
    }
    (startup, end, everyone)
}

#[test]
fn leading_auth_and_hello_are_the_start_up_however_the_stream_is_split() {
    let login = [
        cmd(&["AUTH", "primary-pw"]),
        cmd(&[
            "HELLO",
            "3",
            "AUTH",
            "default",
            "primary-pw",
            "SETNAME",
            "app",
        ]),
    ]
    .concat();
    let rest = [cmd(&["SET", "k", "v"]), b"GET k\r\n".to_vec()].concat();
    let stream = [login.clone(), rest.clone()].concat();
    for split in 1..stream.len() {
        let mut w = RedisStart::default();
        let (startup, end, everyone) = follow(&mut w, &stream, split);
        assert_eq!(startup, login, "split {split}");
        assert_eq!(end, Some(login.len()), "split {split}");
        assert_eq!(everyone, rest, "split {split}");
        let mut l = w
            .replica_login(&creds(Some("ncp"), Some("replica-pw")))
            .expect("ended")
            .expect("built");
        assert_eq!(
            l.take_output(),
            [
                cmd(&["AUTH", "ncp", "replica-pw"]),
                cmd(&["HELLO", "3", "SETNAME", "app"])
            ]
            .concat()
        );
    }
}

#[test]
fn a_client_without_login_goes_to_everyone_from_its_first_byte() {
    let mut w = RedisStart::default();
    let (startup, end, _) = follow(&mut w, &cmd(&["SET", "a", "1"]), 3);
    assert!(startup.is_empty());
    assert_eq!(end, Some(0));
    let l = w
        .replica_login(&creds(None, None))
        .expect("ended")
        .expect("built");
    assert!(l.logged_in(), "nothing to say without a password");
    assert_eq!(w.on_primary(b"+OK\r\n"), PrimaryStep::Ended(0));
}

#[test]
fn the_primarys_replies_to_the_login_are_not_compared() {
    let client = [
        cmd(&["HELLO", "3"]),
        cmd(&["AUTH", "pw"]),
        cmd(&["GET", "k"]),
    ]
    .concat();
    let hello = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$2\r\nid\r\n:42\r\n".to_vec();
    let replies = [hello.clone(), b"+OK\r\n".to_vec(), b"$1\r\nv\r\n".to_vec()].concat();
    for split in 1..replies.len() {
        let mut w = RedisStart::default();
        let _ = follow(&mut w, &client, 1000);
        let end = crate::start::testing::primary_end(&mut w, &replies, split);
        assert_eq!(end, Some(hello.len() + 5), "split {split}");
    }
    let mut w = RedisStart::default();
    let _ = follow(&mut w, &client, 1000);
    assert_eq!(
        w.on_primary(b"-WRONGPASS invalid username-password pair\r\n"),
        PrimaryStep::Refused
    );
}

#[test]
fn a_replica_that_refuses_its_auth_fails_in_its_own_words() {
    let mut w = RedisStart::default();
    let _ = follow(&mut w, &cmd(&["GET", "k"]), 100);
    let mut l = w
        .replica_login(&creds(None, Some("wrong")))
        .expect("ended")
        .expect("built");
    assert_eq!(l.take_output(), cmd(&["AUTH", "wrong"]));
    let err = l
        .on_reply(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "authentication failed: WRONGPASS invalid username-password pair or user is disabled."
    );
    let mut l = w
        .replica_login(&creds(None, Some("right")))
        .expect("ended")
        .expect("built");
    l.on_reply(b"+O").expect("partial");
    assert!(!l.logged_in());
    l.on_reply(b"K\r\n").expect("ok");
    assert!(l.logged_in());
}

#[test]
fn hostile_client_start_ups_are_refused_with_every_byte_handed_on() {
    for bad in [
        b"*0\r\n".to_vec(),
        b"*1\r\n:5\r\n".to_vec(),
        b"*2\r\n$4\r\nAUTH\r\n$99999999\r\n".to_vec(),
        [b"*1\r\n$4\r\nAUTH\r\n".repeat(17), b"*1\r\n".to_vec()].concat(),
        b"*x\r\n".to_vec(),
    ] {
        let mut w = RedisStart::default();
        let step = w.on_client(&bad);
        let err = step.refused.expect("refused");
        let mut handed = step.startup.clone();
        if handed.len() < bad.len() {
            handed.extend_from_slice(&bad[handed.len()..]);
        }
        assert_eq!(handed.len(), bad.len(), "{err}");
    }
}

#[test]
fn hostile_replies_are_errors_not_panics() {
    let nested = [b"*1\r\n".repeat(17), b":1\r\n".to_vec()].concat();
    let hostile: [&[u8]; 7] = [
        // Found by the session_start fuzz target: a reply that is a bare line feed.
        b"\n",
        b"?\r\n",
        b"*99999999999999999999\r\n",
        // Found by the fuzz target in CI: a map or attribute count that overflows when
        // doubled into items.
        b"%9223372036854775807\r\n",
        b"|4611686018427387904\r\n",
        b"$-5\r\n",
        &nested,
    ];
    for bad in hostile {
        let mut w = RedisStart::default();
        let _ = follow(
            &mut w,
            &[cmd(&["AUTH", "pw"]), cmd(&["GET", "k"])].concat(),
            100,
        );
        assert_ne!(w.on_primary(bad), PrimaryStep::StartingUp, "{bad:?}");
        let mut l = w
            .replica_login(&creds(None, Some("pw")))
            .expect("ended")
            .expect("built");
        assert!(l.on_reply(bad).is_err(), "{bad:?}");
    }
}
