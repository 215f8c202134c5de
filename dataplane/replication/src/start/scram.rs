//! The client side of SCRAM-SHA-256 (RFC 5802 with RFC 7677's hash), as PostgreSQL runs
//! it: the middlebox proves the replica's password to the replica without sending it.
//!
//! No channel binding (`n,,`): the replica leg is plain TCP, the middlebox never asks a
//! replica for TLS. The password is used as its UTF-8 bytes; SASLprep is not applied,
//! which matters only for passwords with characters it would change (PostgreSQL itself
//! falls back to the raw bytes for passwords SASLprep rejects).

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::LoginError;

type HmacSha256 = Hmac<Sha256>;

/// Most PBKDF2 iterations a replica may ask for. PostgreSQL's default is 4096; the
/// derivation runs on a data-plane worker, so a replica asking for millions (by mistake or
/// to stall the middlebox) is refused instead of obeyed.
pub const MAX_ITERATIONS: u32 = 100_000;

/// One SCRAM exchange, from the client-first message to the server's signature.
#[derive(Debug)]
pub struct ScramClient {
    client_first_bare: String,
    nonce: String,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Client-first sent; waiting for server-first.
    First,
    /// Client-final sent; the server must prove it knows the password as well.
    Final {
        server_signature: [u8; 32],
    },
    Done,
}

impl ScramClient {
    /// Starts an exchange with the client's `nonce` (printable, no comma) for `user` (empty
    /// for PostgreSQL, which takes the user from the start-up message).
    pub fn new(user: &str, nonce: &str) -> Self {
        Self {
            client_first_bare: format!("n={},r={nonce}", escape_name(user)),
            nonce: nonce.to_owned(),
            state: State::First,
        }
    }

    /// A fresh exchange with a random nonce.
    pub fn with_random_nonce(user: &str) -> Result<Self, LoginError> {
        let mut raw = [0u8; 18];
        getrandom::getrandom(&mut raw)
            .map_err(|e| LoginError::Failed(format!("no randomness for the SCRAM nonce: {e}")))?;
        Ok(Self::new(user, &BASE64.encode(raw)))
    }

    /// The client-first message (GS2 header: no channel binding).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers the server-first message with the client-final message (with the proof).
    pub fn client_final(
        &mut self,
        server_first: &str,
        password: &[u8],
    ) -> Result<String, LoginError> {
        if !matches!(self.state, State::First) {
            return Err(refused("a second server-first message"));
        }
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("m", _)) => return Err(refused("a mandatory SCRAM extension")),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(refused(
                "a server-first message without nonce, salt or iterations",
            ));
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(refused("a nonce that does not extend ours"));
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| refused("a salt that is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| refused("an iteration count that is not a number"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(refused(&format!(
                "{iterations} iterations (at most {MAX_ITERATIONS} are accepted)"
            )));
        }
        let salted = salted_password(password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = client_key;
        proof.iter_mut().zip(signature).for_each(|(p, s)| *p ^= s);
        let server_key = hmac(&salted, b"Server Key");
        self.state = State::Final {
            server_signature: hmac(&server_key, auth_message.as_bytes()),
        };
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final message: the server must know the password too, or the
    /// middlebox would be feeding an impostor.
    pub fn verify_server_final(&mut self, server_final: &str) -> Result<(), LoginError> {
        let State::Final { server_signature } = self.state else {
            return Err(refused("a server-final message out of turn"));
        };
        if let Some(error) = server_final.strip_prefix("e=") {
            return Err(LoginError::Refused(format!("SCRAM: {error}")));
        }
        let Some(signature) = server_final.strip_prefix("v=") else {
            return Err(refused("a server-final message without signature"));
        };
        if BASE64.decode(signature).ok().as_deref() != Some(&server_signature[..]) {
            return Err(LoginError::Failed(
                "SCRAM: the replica's signature is wrong (it does not know the password)".into(),
            ));
        }
        self.state = State::Done;
        Ok(())
    }
}

fn refused(what: &str) -> LoginError {
    LoginError::Failed(format!("SCRAM: the replica sent {what}"))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// RFC 5802's Hi(): PBKDF2 with HMAC-SHA-256, one output block.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(u).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// `,` and `=` may not appear raw in a SCRAM name.
fn escape_name(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// Hi() for the tests of other modules, which play the server's part.
#[cfg(test)]
pub(crate) mod tests_support {
    /// RFC 5802's Hi().
    pub fn salted(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        super::salted_password(password, salt, iterations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677, section 3: user "user", password "pencil".
    #[test]
    fn reproduces_the_rfc_7677_exchange() {
        let mut c = ScramClient::new("user", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(c.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let fin = c.client_final(server_first, b"pencil").expect("valid");
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.verify_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect("server proves the password");
    }

    #[test]
    fn a_server_that_does_not_know_the_password_is_refused() {
        let mut c = ScramClient::new("user", "rOprNGfwEbeRWgbNEkqO");
        c.client_final(
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            b"pencil",
        )
        .expect("valid");
        let err = c
            .verify_server_final("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect_err("wrong signature");
        assert!(err.to_string().contains("signature"), "{err}");
    }

    #[test]
    fn hostile_server_first_messages_are_refused() {
        for (server_first, why) in [
            ("r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
            ("r=abc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
            ("r=abcdef,s=***,i=4096", "base64"),
            (
                "r=abcdef,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4000000000",
                "iterations",
            ),
            ("r=abcdef,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "iterations"),
            ("r=abcdef,s=W22ZaJ0SNY7soEsUEjb6gQ==", "iterations"),
            ("m=ext,r=abcdef,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1", "extension"),
        ] {
            let mut c = ScramClient::new("", "abc");
            let err = c.client_final(server_first, b"pw").expect_err(server_first);
            assert!(err.to_string().contains(why), "{server_first}: {err}");
        }
    }
}
