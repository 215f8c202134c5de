use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use super::*;

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3.to_be_bytes().to_vec();
    for (k, v) in params {
        for f in [k, v] {
            body.extend_from_slice(f.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&body);
    m
}

fn request(code: u32) -> Vec<u8> {
    let mut m = 8u32.to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m
}

fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    message(b'R', &body)
}

fn creds(user: Option<&str>, password: Option<&str>) -> ReplicaCredentials {
    ReplicaCredentials {
        user: user.map(str::to_owned),
        password: password.map(Secret::new),
        database: None,
    }
}

/// What libpq sends with `sslmode=prefer gssencmode=prefer` to a server that offers
/// neither (after the middlebox's `N`s), a SCRAM exchange, then its first query.
fn libpq_client() -> (Vec<u8>, usize, usize) {
    let mut s = request(GSSENC_REQUEST);
    s.extend(request(SSL_REQUEST));
    let startup_from = s.len();
    s.extend(startup(&[
        ("user", "alice"),
        ("database", "bank"),
        ("application_name", "pgbench"),
    ]));
    s.extend(message(b'p', b"SCRAM-SHA-256\0\0\0\0\x05n,,n="));
    s.extend(message(b'p', b"c=biws,r=abc,p=xyz"));
    let query_at = s.len();
    s.extend(message(b'Q', b"SELECT 1\0"));
    (s, startup_from, query_at)
}

#[test]
fn the_client_start_up_ends_at_its_first_query_however_it_is_split() {
    let (stream, startup_from, query_at) = libpq_client();
    for split in 1..stream.len() {
        let mut w = PostgresStart::default();
        let mut reply = Vec::new();
        let mut to_primary = Vec::new();
        let mut end = None;
        let mut offset = 0;
        for chunk in stream.chunks(split) {
            assert!(end.is_none(), "not called after the end");
            let step = w.on_client(chunk);
            assert_eq!(step.refused, None);
            reply.extend(step.reply);
            to_primary.extend(step.startup);
            end = step.ended_at.map(|i| offset + i);
            if end.is_some() {
                to_primary.extend_from_slice(&chunk[step.ended_at.unwrap_or(0)..]);
                break;
            }
            offset += chunk.len();
        }
        assert_eq!(reply, b"NN", "split {split}");
        assert_eq!(end, Some(query_at), "split {split}");
        assert_eq!(
            to_primary[..query_at - startup_from],
            stream[startup_from..query_at]
        );
        let login = w.replica_login(&creds(None, None)).expect("start-up seen");
        let mut login = login.expect("built");
        assert_eq!(
            login.take_output(),
            startup(&[
                ("user", "alice"),
                ("database", "bank"),
                ("application_name", "pgbench")
            ])
        );
    }
}

#[test]
fn a_replica_user_replaces_the_clients_in_its_start_up_message() {
    let mut w = PostgresStart::default();
    w.on_client(&startup(&[("user", "alice"), ("database", "bank")]));
    let mut login = w
        .replica_login(&creds(Some("bob"), None))
        .expect("seen")
        .expect("built");
    assert_eq!(
        login.take_output(),
        startup(&[("user", "bob"), ("database", "bank")])
    );
}

#[test]
fn a_replica_database_replaces_the_clients_too() {
    let mut w = PostgresStart::default();
    w.on_client(&startup(&[("user", "alice"), ("database", "bank")]));
    let mapped = ReplicaCredentials {
        database: Some("bank_copy".into()),
        ..creds(Some("bob"), None)
    };
    let mut login = w.replica_login(&mapped).expect("seen").expect("built");
    assert_eq!(
        login.take_output(),
        startup(&[("user", "bob"), ("database", "bank_copy")])
    );
}

#[test]
fn bad_client_start_ups_are_errors_not_panics() {
    for (bytes, why) in [
        (vec![0, 0, 0, 4, 0, 3, 0, 0], "start-up packet of 4"),
        (vec![0, 1, 0, 0, 0, 3, 0, 0], "start-up packet of 65536"),
        (
            {
                let mut m = 9u32.to_be_bytes().to_vec();
                m.extend([0, 2, 0, 0, 0]);
                m
            },
            "protocol version 2.0",
        ),
        (
            {
                let mut m = 10u32.to_be_bytes().to_vec();
                m.extend(PROTOCOL_3.to_be_bytes());
                m.extend(b"u\0");
                m
            },
            "not terminated",
        ),
        (startup(&[("database", "bank")]), "without a user"),
    ] {
        let step = PostgresStart::default().on_client(&bytes);
        let err = step.refused.expect(why);
        assert!(err.to_string().contains(why), "{err}");
        assert_eq!(step.startup, bytes, "everything still goes to the primary");
    }
    let mut w = PostgresStart::default();
    w.on_client(&startup(&[("user", "a")]));
    let huge = [b'p', 0xff, 0xff, 0xff, 0xff, 1, 2];
    let step = w.on_client(&huge);
    assert!(
        step.refused
            .expect("huge")
            .to_string()
            .contains("out of range")
    );
    assert_eq!(step.startup, huge);
}

#[test]
fn a_cancel_request_goes_to_the_primary_only() {
    let mut w = PostgresStart::default();
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend(CANCEL_REQUEST.to_be_bytes());
    cancel.extend([1, 2, 3, 4, 5, 6, 7, 8]);
    let step = w.on_client(&cancel);
    assert_eq!(step.ended_at, Some(16));
    assert_eq!(step.startup, cancel, "for the primary only");
    let login = w
        .replica_login(&creds(None, Some("pw")))
        .expect("seen")
        .expect("built");
    assert!(login.logged_in());
}

#[test]
fn the_primarys_start_up_answers_end_with_ready_for_query() {
    let mut answers = auth(0, b"");
    answers.extend(message(b'S', b"server_version\x0015\0"));
    answers.extend(message(b'K', &[0; 8]));
    let ready_end = answers.len() + 6;
    answers.extend(message(b'Z', b"I"));
    answers.extend(message(b'T', b"rows"));
    for split in 1..answers.len() {
        let mut w = PostgresStart::default();
        let end = crate::start::testing::primary_end(&mut w, &answers, split);
        assert_eq!(end, Some(ready_end), "split {split}");
    }
    let mut w = PostgresStart::default();
    assert_eq!(
        w.on_primary(&message(b'E', b"SFATAL\0")),
        PrimaryStep::NotComparable
    );
}

/// A replica's side of SCRAM-SHA-256, written from RFC 5802's server equations: it
/// checks the proof the login sends against the stored key alone.
struct ScramServer {
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

fn mac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key");
    m.update(data);
    m.finalize().into_bytes().into()
}

impl ScramServer {
    fn new(password: &str) -> Self {
        let salt = b"replica-salt".to_vec();
        let salted = super::super::scram::tests_support::salted(password.as_bytes(), &salt, 4096);
        let client_key = mac(&salted, b"Client Key");
        Self {
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: mac(&salted, b"Server Key"),
        }
    }
}

fn body_of(out: &[u8], kind: u8) -> Vec<u8> {
    assert_eq!(out[0], kind, "{out:?}");
    out[5..].to_vec()
}

fn scram_login(
    replica_password: &str,
    login_password: &str,
) -> Result<Box<dyn ReplicaLogin>, LoginError> {
    let server = ScramServer::new(replica_password);
    let mut w = PostgresStart::default();
    w.on_client(&startup(&[("user", "alice"), ("database", "bank")]));
    let mut login = w
        .replica_login(&creds(Some("bob"), Some(login_password)))
        .expect("seen")?;
    login.take_output();
    login.on_reply(&auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))?;
    let initial = body_of(&login.take_output(), b'p');
    let first = std::str::from_utf8(&initial[b"SCRAM-SHA-256\0".len() + 4..])
        .expect("text")
        .to_owned();
    let first_bare = first.strip_prefix("n,,").expect("no binding").to_owned();
    let client_nonce = first_bare.strip_prefix("n=,r=").expect("nonce");
    let server_first = format!(
        "r={client_nonce}srv,s={},i=4096",
        BASE64.encode(&server.salt)
    );
    login.on_reply(&auth(11, server_first.as_bytes()))?;
    let fin = String::from_utf8(body_of(&login.take_output(), b'p')).expect("text");
    let (without_proof, proof) = fin.rsplit_once(",p=").expect("proof");
    let auth_message = format!("{first_bare},{server_first},{without_proof}");
    let mut client_key = BASE64.decode(proof).expect("base64");
    for (k, s) in client_key
        .iter_mut()
        .zip(mac(&server.stored_key, auth_message.as_bytes()))
    {
        *k ^= s;
    }
    if Sha256::digest(&client_key)[..] != server.stored_key {
        login.on_reply(&message(
            b'E',
            b"SFATAL\0C28P01\0Mpassword authentication failed for user \"bob\"\0\0",
        ))?;
        return Ok(login);
    }
    let signature = BASE64.encode(mac(&server.server_key, auth_message.as_bytes()));
    login.on_reply(&auth(12, format!("v={signature}").as_bytes()))?;
    let mut rest = auth(0, b"");
    rest.extend(message(b'S', b"a\0b\0"));
    rest.extend(message(b'K', &[9; 8]));
    rest.extend(message(b'Z', b"I"));
    // Byte by byte: the login keeps partial messages.
    for b in rest {
        assert!(!login.logged_in());
        login.on_reply(&[b])?;
    }
    Ok(login)
}

#[test]
fn scram_with_the_replicas_own_password_logs_in() {
    let login = scram_login("replica-pw", "replica-pw").expect("logged in");
    assert!(login.logged_in());
}

#[test]
fn scram_with_a_wrong_password_is_refused_in_the_replicas_words() {
    let err = scram_login("replica-pw", "primary-pw").expect_err("refused");
    assert_eq!(
        err.to_string(),
        "authentication failed: FATAL 28P01: password authentication failed for user \"bob\""
    );
}

#[test]
fn md5_and_cleartext_answer_with_the_replicas_password() {
    let mut w = PostgresStart::default();
    w.on_client(&startup(&[("user", "alice")]));
    let mut login = w
        .replica_login(&creds(None, Some("secret")))
        .expect("seen")
        .expect("built");
    login.take_output();
    login.on_reply(&auth(5, &[1, 2, 3, 4])).expect("md5");
    assert_eq!(
        body_of(&login.take_output(), b'p'),
        b"md598a0412b9c31436fc53776e863350083\0"
    );
    login.on_reply(&auth(3, b"")).expect("cleartext");
    assert_eq!(body_of(&login.take_output(), b'p'), b"secret\0");
}

#[test]
fn logins_the_middlebox_cannot_answer_fail_with_a_reason() {
    let mut w = PostgresStart::default();
    w.on_client(&startup(&[("user", "alice")]));
    for (password, answer, why) in [
        (None, auth(3, b""), "none is configured"),
        (Some("pw"), auth(7, b""), "GSSAPI"),
        (
            Some("pw"),
            auth(10, b"SCRAM-SHA-256-PLUS\0\0"),
            "only SCRAM-SHA-256",
        ),
        (Some("pw"), auth(12, b"v=abc"), "before the SASL exchange"),
        (Some("pw"), message(b'D', b""), "unexpected message"),
        (Some("pw"), vec![b'S', 0, 0, 0, 1], "1-byte message"),
    ] {
        let mut login = w
            .replica_login(&creds(None, password))
            .expect("seen")
            .expect("built");
        let err = login.on_reply(&answer).expect_err(why);
        assert!(err.to_string().contains(why), "{err}");
    }
}
