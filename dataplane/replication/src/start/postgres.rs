//! PostgreSQL (frontend/backend protocol 3.0): the client's start-up is its start-up
//! message and its password or SASL answers (`p` messages); the primary's start-up
//! answers end with its first ReadyForQuery (`Z`). A replica logs in with the client's
//! start-up parameters (its user replaced by the replica's, if configured) and answers
//! cleartext, MD5 and SCRAM-SHA-256 challenges with the replica's password.
//!
//! Refused, with the reason the replica's detach carries: GSSAPI, SSPI and Kerberos
//! logins, SCRAM with channel binding only (`SCRAM-SHA-256-PLUS`: the replica leg is
//! plain TCP), a replica that asks for a password none is configured for, protocol
//! versions other than 3.0 from the client. A cancel request (its own connection) goes
//! to the primary only: it names the primary's backend, which no replica has.

use md5::{Digest, Md5};

use super::{
    ClientStep, LoginError, NoLogin, PrimaryStep, ReplicaCredentials, ReplicaLogin, Secret,
    StartDialect, StartError, scram::ScramClient,
};

/// Protocol 3.0 in a start-up message.
const PROTOCOL_3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// PostgreSQL's own limit on a start-up packet.
const MAX_STARTUP_BYTES: usize = 10_000;
/// Most bytes one login message may have (SASL and password messages are tiny).
const MAX_MESSAGE_BYTES: usize = 1 << 16;

/// The start-up of one PostgreSQL session.
#[derive(Debug, Default)]
pub struct PostgresStart {
    client: ClientPhase,
    /// Bytes of a start-up packet not complete yet.
    held: Vec<u8>,
    /// The client's start-up parameters, once its start-up message arrived.
    params: Option<Vec<(String, String)>>,
    /// The connection is a cancel request: it goes to the primary only, the replica legs
    /// get nothing.
    cancel: bool,
    primary: Framer,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ClientPhase {
    /// Before the start-up message: TLS/GSS requests may come first.
    #[default]
    Preamble,
    /// After it: password and SASL messages until the first other message.
    Auth(Framer),
    Ended,
}

/// Walks typed messages (a type byte, a 4-byte length that counts itself, a body)
/// without keeping their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Framer {
    /// The current message's type, once its first byte was seen.
    kind: Option<u8>,
    /// Length bytes seen of the current message (0..=4).
    length_bytes: usize,
    length: u32,
    /// Body bytes still to come once the length is known.
    body_left: u32,
}

/// One step of [`Framer::next`].
enum Framed {
    /// A message of this type starts at this index.
    Start(u8, usize),
    /// The current message (of this type) ends just before this index.
    End(u8, usize),
    /// The input is used up.
    More,
}

impl Framer {
    /// Advances over `data[*at..]` to the next message start or end.
    fn next(&mut self, data: &[u8], at: &mut usize) -> Result<Framed, String> {
        while *at < data.len() {
            let Some(kind) = self.kind else {
                let kind = data[*at];
                *at += 1;
                self.kind = Some(kind);
                return Ok(Framed::Start(kind, *at - 1));
            };
            if self.length_bytes < 4 {
                self.length = (self.length << 8) | u32::from(data[*at]);
                self.length_bytes += 1;
                *at += 1;
                if self.length_bytes == 4 {
                    if self.length < 4 || self.length as usize > MAX_MESSAGE_BYTES {
                        return Err(format!("message length {} out of range", self.length));
                    }
                    self.body_left = self.length - 4;
                } else {
                    continue;
                }
            } else {
                let take = (data.len() - *at).min(self.body_left as usize);
                *at += take;
                self.body_left -= take as u32;
            }
            if self.length_bytes == 4 && self.body_left == 0 {
                *self = Self::default();
                return Ok(Framed::End(kind, *at));
            }
        }
        Ok(Framed::More)
    }
}

impl StartDialect for PostgresStart {
    fn on_client(&mut self, data: &[u8]) -> ClientStep {
        let mut step = ClientStep::default();
        if let Err(e) = self.follow_client(data, &mut step) {
            step.refused = Some(e);
            self.client = ClientPhase::Ended;
        }
        step
    }

    fn on_primary(&mut self, data: &[u8]) -> PrimaryStep {
        let mut at = 0;
        loop {
            match self.primary.next(data, &mut at) {
                Ok(Framed::Start(b'E', _)) => return PrimaryStep::NotComparable,
                Ok(Framed::End(b'Z', end)) => return PrimaryStep::Ended(end),
                Ok(Framed::Start(..) | Framed::End(..)) => {}
                Ok(Framed::More) => return PrimaryStep::StartingUp,
                Err(_) => return PrimaryStep::NotComparable,
            }
        }
    }

    fn replica_login(
        &self,
        credentials: &ReplicaCredentials,
    ) -> Option<Result<Box<dyn ReplicaLogin>, LoginError>> {
        if self.cancel {
            return Some(Ok(Box::new(NoLogin)));
        }
        let params = self.params.as_ref()?;
        Some(Ok(Box::new(PostgresLogin::new(params, credentials))))
    }
}

impl PostgresStart {
    /// Follows the client's start-up over `data`, filling `step`. On an error, `step`
    /// holds every byte not handed on yet, for the primary.
    fn follow_client(&mut self, data: &[u8], step: &mut ClientStep) -> Result<(), StartError> {
        let mut at = 0;
        if self.client == ClientPhase::Preamble {
            at = self.preamble(data, step)?;
        }
        let ClientPhase::Auth(mut framer) = self.client else {
            return Ok(());
        };
        let from = at;
        loop {
            let framed = match framer.next(data, &mut at) {
                Ok(framed) => framed,
                Err(e) => {
                    step.startup.extend_from_slice(&data[from..]);
                    return Err(StartError(e));
                }
            };
            match framed {
                Framed::Start(b'p', _) | Framed::End(..) => {}
                Framed::Start(_, start) => {
                    // The first message that is not a password answer: the client is
                    // logged in and talks to the database now.
                    step.startup.extend_from_slice(&data[from..start]);
                    step.ended_at = Some(start);
                    self.client = ClientPhase::Ended;
                    return Ok(());
                }
                Framed::More => break,
            }
        }
        step.startup.extend_from_slice(&data[from..]);
        self.client = ClientPhase::Auth(framer);
        Ok(())
    }

    /// Start-up packets before the start-up message ends; returns where in `data` the
    /// bytes after it begin.
    fn preamble(&mut self, data: &[u8], step: &mut ClientStep) -> Result<usize, StartError> {
        let before = self.held.len();
        self.held.extend_from_slice(data);
        let mut used = 0;
        loop {
            let rest = &self.held[used..];
            if rest.len() < 8 {
                break;
            }
            let length = be32(&rest[..4]) as usize;
            if !(8..=MAX_STARTUP_BYTES).contains(&length) {
                return Err(self.give_up(used, step, format!("start-up packet of {length} bytes")));
            }
            if rest.len() < length {
                break;
            }
            let code = be32(&rest[4..8]);
            let packet = &rest[..length];
            match code {
                SSL_REQUEST | GSSENC_REQUEST if length == 8 => {
                    // Declined by the middlebox: it must read the stream to copy it.
                    step.reply.push(b'N');
                    used += length;
                    continue;
                }
                CANCEL_REQUEST => {
                    self.cancel = true;
                    step.startup.extend_from_slice(packet);
                }
                PROTOCOL_3 => match parse_params(&packet[8..]) {
                    Ok(params) => {
                        self.params = Some(params);
                        step.startup.extend_from_slice(packet);
                    }
                    Err(e) => return Err(self.give_up(used, step, e)),
                },
                other => {
                    let why = format!(
                        "protocol version {}.{} (only 3.0 is supported)",
                        other >> 16,
                        other & 0xffff
                    );
                    return Err(self.give_up(used, step, why));
                }
            }
            used += length;
            let resume = used.saturating_sub(before);
            self.held = Vec::new();
            if self.cancel {
                step.ended_at = Some(resume);
                self.client = ClientPhase::Ended;
            } else {
                self.client = ClientPhase::Auth(Framer::default());
            }
            return Ok(resume);
        }
        self.held.drain(..used);
        Ok(data.len())
    }

    /// The start-up cannot be followed: the bytes held from `used` on go to the primary
    /// as they are.
    fn give_up(&mut self, used: usize, step: &mut ClientStep, why: String) -> StartError {
        step.startup.extend_from_slice(&self.held[used..]);
        self.held = Vec::new();
        StartError(why)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The name/value pairs of a start-up message's body.
fn parse_params(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut fields = body.split(|b| *b == 0);
    let mut params = Vec::new();
    loop {
        let Some(name) = fields.next() else {
            return Err("start-up message not terminated".into());
        };
        if name.is_empty() {
            break;
        }
        let Some(value) = fields.next() else {
            return Err("start-up parameter without value".into());
        };
        let text = |b: &[u8]| {
            String::from_utf8(b.to_vec()).map_err(|_| "start-up parameter is not UTF-8".to_owned())
        };
        params.push((text(name)?, text(value)?));
    }
    if !params.iter().any(|(name, _)| name == "user") {
        return Err("start-up message without a user".into());
    }
    Ok(params)
}

/// The middlebox logging in to one replica.
#[derive(Debug)]
pub struct PostgresLogin {
    out: Vec<u8>,
    /// Answer bytes of a message not complete yet.
    input: Vec<u8>,
    user: String,
    password: Option<Secret>,
    scram: Option<ScramClient>,
    ready: bool,
}

impl PostgresLogin {
    /// A login with the client's start-up `params`, the user and database replaced by
    /// the replica's when it has its own.
    pub fn new(params: &[(String, String)], credentials: &ReplicaCredentials) -> Self {
        let mut body = PROTOCOL_3.to_be_bytes().to_vec();
        let mut user = String::new();
        for (name, value) in params {
            let mapped = match name.as_str() {
                "user" => credentials.user.as_ref(),
                "database" => credentials.database.as_ref(),
                _ => None,
            };
            let value = mapped.unwrap_or(value);
            if name == "user" {
                user = value.clone();
            }
            for field in [name, value] {
                body.extend_from_slice(field.as_bytes());
                body.push(0);
            }
        }
        body.push(0);
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        Self {
            out,
            input: Vec::new(),
            user,
            password: credentials.password.clone(),
            scram: None,
            ready: false,
        }
    }

    fn password(&self, method: &str) -> Result<&str, LoginError> {
        self.password.as_ref().map(Secret::expose).ok_or_else(|| {
            LoginError::Failed(format!(
                "the replica asks for a {method} password for user {:?} and none is configured",
                self.user
            ))
        })
    }

    fn send(&mut self, kind: u8, body: &[u8]) {
        self.out.push(kind);
        self.out
            .extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        self.out.extend_from_slice(body);
    }

    fn on_message(&mut self, kind: u8, body: &[u8]) -> Result<(), LoginError> {
        match kind {
            b'R' if body.len() >= 4 => self.on_authentication(be32(body), &body[4..]),
            b'E' => Err(LoginError::Refused(error_text(body))),
            b'Z' => {
                self.ready = true;
                Ok(())
            }
            // Parameter status, backend key, notices, protocol version negotiation.
            b'S' | b'K' | b'N' | b'v' => Ok(()),
            other => Err(LoginError::Failed(format!(
                "unexpected message {:?} from the replica during login",
                char::from(other)
            ))),
        }
    }

    fn on_authentication(&mut self, code: u32, data: &[u8]) -> Result<(), LoginError> {
        match code {
            0 => Ok(()),
            3 => {
                let mut body = self.password("cleartext")?.as_bytes().to_vec();
                body.push(0);
                self.send(b'p', &body);
                Ok(())
            }
            5 => {
                let salt = data
                    .get(..4)
                    .ok_or_else(|| LoginError::Failed("MD5 request without salt".into()))?;
                let password = self.password("MD5")?;
                let inner = hex(&Md5::digest(format!("{password}{}", self.user)));
                let mut salted = inner.into_bytes();
                salted.extend_from_slice(salt);
                let mut body = format!("md5{}", hex(&Md5::digest(&salted))).into_bytes();
                body.push(0);
                self.send(b'p', &body);
                Ok(())
            }
            10 => {
                let offered: Vec<String> = data
                    .split(|b| *b == 0)
                    .filter(|m| !m.is_empty())
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .collect();
                if !offered.iter().any(|m| m == "SCRAM-SHA-256") {
                    return Err(LoginError::Failed(format!(
                        "the replica offers SASL mechanisms {offered:?}; only SCRAM-SHA-256 \
                         without channel binding is supported"
                    )));
                }
                self.password("SCRAM-SHA-256")?;
                let scram = ScramClient::with_random_nonce("")?;
                let first = scram.client_first();
                let mut body = b"SCRAM-SHA-256\0".to_vec();
                body.extend_from_slice(&(first.len() as u32).to_be_bytes());
                body.extend_from_slice(first.as_bytes());
                self.send(b'p', &body);
                self.scram = Some(scram);
                Ok(())
            }
            11 | 12 => {
                let text = std::str::from_utf8(data)
                    .map_err(|_| LoginError::Failed("SCRAM message is not UTF-8".into()))?;
                let password = self.password("SCRAM-SHA-256")?.as_bytes().to_vec();
                let scram = self.scram.as_mut().ok_or_else(|| {
                    LoginError::Failed("SASL message before the SASL exchange began".into())
                })?;
                if code == 11 {
                    let fin = scram.client_final(text, &password)?;
                    self.send(b'p', fin.as_bytes());
                } else {
                    scram.verify_server_final(text)?;
                }
                Ok(())
            }
            2 | 6 | 7 | 8 | 9 => Err(LoginError::Failed(format!(
                "the replica asks for {} authentication, which the middlebox cannot answer",
                if code == 9 { "SSPI" } else { "GSSAPI/Kerberos" }
            ))),
            other => Err(LoginError::Failed(format!(
                "unknown authentication request {other} from the replica"
            ))),
        }
    }
}

impl ReplicaLogin for PostgresLogin {
    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn on_reply(&mut self, data: &[u8]) -> Result<(), LoginError> {
        if self.ready {
            return Err(LoginError::Failed(
                "the replica sent more after ReadyForQuery".into(),
            ));
        }
        self.input.extend_from_slice(data);
        let mut used = 0;
        while let Some(header) = self.input.get(used..used + 5) {
            let kind = header[0];
            let length = be32(&header[1..5]) as usize;
            if !(4..=MAX_MESSAGE_BYTES).contains(&length) {
                return Err(LoginError::Failed(format!(
                    "a {length}-byte message from the replica during login"
                )));
            }
            let Some(body) = self.input.get(used + 5..used + 1 + length) else {
                break;
            };
            let body = body.to_vec();
            used += 1 + length;
            self.on_message(kind, &body)?;
            if self.ready && used < self.input.len() {
                return Err(LoginError::Failed(
                    "the replica sent more after ReadyForQuery".into(),
                ));
            }
        }
        self.input.drain(..used);
        Ok(())
    }

    fn logged_in(&self) -> bool {
        self.ready
    }
}

/// The severity, code and message of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let mut severity = "";
    let mut code = "";
    let mut message = "";
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = std::str::from_utf8(value).unwrap_or("");
        match kind {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    format!("{severity} {code}: {message}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[path = "postgres_tests.rs"]
mod tests;
