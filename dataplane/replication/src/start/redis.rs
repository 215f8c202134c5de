//! Redis (RESP2 and RESP3): the client's start-up is its leading `AUTH` and `HELLO`
//! commands, the primary's start-up answers are its replies to them. A replica's login
//! is the middlebox's own `AUTH` with the replica's user and password (when it has one),
//! then the client's `HELLO`s with their `AUTH` clause taken out, so the replica speaks
//! the protocol version the client asked for.
//!
//! Not covered, and what happens instead:
//! - `AUTH` or `HELLO` after the client's first other command reaches the replicas as it
//!   is (the replica answers with its own error; with `verify = "replies"` that shows as
//!   a mismatch).
//! - A client the primary refuses (an error reply to its `AUTH`) gets `NOAUTH` for what
//!   follows, while the logged-in replicas would carry it out: the replicas are detached
//!   from that session instead (reason `login_failed`).
//! - Inline commands (`AUTH pw` typed into telnet) count as commands; a leading `AUTH`
//!   or `HELLO` longer than 64 KiB is refused.

use super::{
    ClientStep, LoginError, NoLogin, PrimaryStep, ReplicaCredentials, ReplicaLogin, StartDialect,
    StartError,
};

/// Most bytes the client's leading commands, or one of the primary's replies to them, may
/// take while held.
const MAX_HELD: usize = 64 << 10;
/// Deepest nesting of a reply the parser follows.
const MAX_DEPTH: usize = 16;

/// The start-up of one Redis session.
#[derive(Debug, Default)]
pub struct RedisStart {
    /// Client bytes of a command not yet classified or complete.
    held: Vec<u8>,
    /// The leading `AUTH`/`HELLO` commands, parsed.
    leading: Vec<Args>,
    client_ended: bool,
    /// Primary bytes of a reply not complete yet.
    primary_held: Vec<u8>,
    /// Replies of the primary to the leading commands seen so far.
    primary_replies: usize,
    refused: bool,
}

/// The first argument of the command at the start of `buf`, if it has arrived.
fn command_name(buf: &[u8]) -> Result<Option<Vec<u8>>, String> {
    if buf.first() == Some(&b'*') {
        let Some((count, header)) = line(buf, 0)? else {
            return Ok(None);
        };
        if number(&count[1..])? < 1 {
            return Err("a command without arguments".into());
        }
        match bulk(buf, header)? {
            Some((name, _)) => Ok(Some(name.to_vec())),
            None => Ok(None),
        }
    } else {
        Ok(line(buf, 0)?.map(|(text, _)| {
            text.split(|b| *b == b' ')
                .find(|w| !w.is_empty())
                .unwrap_or_default()
                .to_vec()
        }))
    }
}

/// A command's arguments.
type Args = Vec<Vec<u8>>;

/// A whole command at the start of `buf` (arguments, bytes it takes), if it has arrived.
fn command(buf: &[u8]) -> Result<Option<(Args, usize)>, String> {
    if buf.first() != Some(&b'*') {
        return Ok(line(buf, 0)?.map(|(text, end)| {
            let args = text
                .split(|b| *b == b' ')
                .filter(|w| !w.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            (args, end)
        }));
    }
    let Some((count, mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let count = number(&count[1..])?;
    if !(1..=64).contains(&count) {
        return Err(format!("a leading command with {count} arguments"));
    }
    let mut args = Vec::new();
    for _ in 0..count {
        let Some((arg, next)) = bulk(buf, at)? else {
            return Ok(None);
        };
        args.push(arg.to_vec());
        at = next;
    }
    Ok(Some((args, at)))
}

/// The line starting at `at` (without its CRLF or LF) and where the next begins.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = buf.get(at..).unwrap_or_default();
    match rest.iter().position(|b| *b == b'\n') {
        Some(nl) => {
            let text = &rest[..nl];
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            Ok(Some((text, at + nl + 1)))
        }
        None if rest.len() > MAX_HELD => Err("a line longer than 64 KiB".into()),
        None => Ok(None),
    }
}

/// A `$len` bulk string at `at` and where the next item begins.
fn bulk(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let Some((header, body)) = line(buf, at)? else {
        return Ok(None);
    };
    if header.first() != Some(&b'$') {
        return Err("a command argument that is not a bulk string".into());
    }
    let len = usize::try_from(number(&header[1..])?)
        .map_err(|_| "a negative argument length".to_owned())?;
    if len > MAX_HELD {
        return Err(format!("a {len}-byte argument in a leading command"));
    }
    let end = body + len + 2;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((&buf[body..body + len], end)))
}

fn number(text: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("{:?} is not a number", String::from_utf8_lossy(text)))
}

/// How many bytes the reply at the start of `buf` takes, and whether it is an error.
fn reply(buf: &[u8], at: usize, depth: usize) -> Result<Option<(usize, bool)>, String> {
    if depth > MAX_DEPTH {
        return Err("a reply nested too deep".into());
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((header, next)) = line(buf, at)? else {
        return Ok(None);
    };
    // An empty line (a bare LF) has no type byte left after the line is cut.
    let value = header.get(1..).unwrap_or_default();
    match kind {
        b'+' | b':' | b'_' | b',' | b'#' | b'(' => Ok(Some((next, false))),
        b'-' => Ok(Some((next, true))),
        b'$' | b'!' | b'=' => {
            let len = number(value)?;
            if len == -1 {
                return Ok(Some((next, false)));
            }
            let len = usize::try_from(len).map_err(|_| format!("a reply of length {len}"))?;
            let end = next.saturating_add(len).saturating_add(2);
            Ok((buf.len() >= end).then_some((end, kind == b'!')))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let count = number(value)?;
            // Every item takes at least two bytes, so a count past what the middlebox
            // holds can never complete (and doubling a huge one would overflow).
            if count > MAX_HELD as i64 {
                return Err(format!("an aggregate reply of {count} items"));
            }
            let items = if matches!(kind, b'%' | b'|') {
                count * 2
            } else {
                count
            };
            let mut at = next;
            for _ in 0..items.max(0) {
                match reply(buf, at, depth + 1)? {
                    Some((end, _)) => at = end,
                    None => return Ok(None),
                }
            }
            if kind == b'|' {
                // Attributes come before the reply they describe.
                return reply(buf, at, depth + 1);
            }
            Ok(Some((at, false)))
        }
        other => Err(format!("a reply of unknown type {:?}", char::from(other))),
    }
}

fn is_login_command(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"AUTH") || name.eq_ignore_ascii_case(b"HELLO")
}

impl RedisStart {
    fn follow_client(&mut self, data: &[u8], step: &mut ClientStep) -> Result<(), String> {
        let before = self.held.len();
        self.held.extend_from_slice(data);
        // Bytes of `held` handed on in this call (leading commands).
        let mut consumed = 0;
        while let Some(name) = command_name(&self.held)? {
            if !is_login_command(&name) {
                // The client's first real command: it and everything after it, held or
                // not, goes to everyone.
                if consumed >= before {
                    step.ended_at = Some(consumed - before);
                } else {
                    step.held_after = self.held[..before - consumed].to_vec();
                    step.ended_at = Some(0);
                }
                self.held = Vec::new();
                self.client_ended = true;
                return Ok(());
            }
            let Some((args, end)) = command(&self.held)? else {
                break;
            };
            step.startup.extend(self.held.drain(..end));
            consumed += end;
            self.leading.push(args);
            if self.leading.len() > 16 {
                return Err("more than 16 leading AUTH/HELLO commands".into());
            }
        }
        if self.held.len() > MAX_HELD {
            return Err("a leading command longer than 64 KiB".into());
        }
        Ok(())
    }
}

impl StartDialect for RedisStart {
    fn on_client(&mut self, data: &[u8]) -> ClientStep {
        let mut step = ClientStep::default();
        if let Err(e) = self.follow_client(data, &mut step) {
            step.startup.append(&mut self.held);
            step.refused = Some(StartError(e));
            self.client_ended = true;
        }
        step
    }

    fn on_primary(&mut self, data: &[u8]) -> PrimaryStep {
        if self.refused {
            return PrimaryStep::NotComparable;
        }
        let before = self.primary_held.len();
        self.primary_held.extend_from_slice(data);
        let mut used: usize = 0;
        loop {
            if self.client_ended && self.primary_replies >= self.leading.len() {
                self.primary_held = Vec::new();
                return PrimaryStep::Ended(used.saturating_sub(before));
            }
            match reply(&self.primary_held, used, 0) {
                Ok(Some((end, error))) => {
                    if error {
                        self.refused = true;
                        return PrimaryStep::Refused;
                    }
                    used = end;
                    self.primary_replies += 1;
                }
                Ok(None) if self.primary_held.len() - used <= MAX_HELD => {
                    self.primary_held.drain(..used);
                    return PrimaryStep::StartingUp;
                }
                _ => {
                    self.refused = true;
                    return PrimaryStep::NotComparable;
                }
            }
        }
    }

    fn replica_login(
        &self,
        credentials: &ReplicaCredentials,
    ) -> Option<Result<Box<dyn ReplicaLogin>, LoginError>> {
        if !self.client_ended {
            return None;
        }
        let mut commands = Vec::new();
        if let Some(password) = &credentials.password {
            let mut auth = vec![b"AUTH".to_vec()];
            if let Some(user) = &credentials.user {
                auth.push(user.as_bytes().to_vec());
            }
            auth.push(password.expose().as_bytes().to_vec());
            commands.push(auth);
        }
        for args in &self.leading {
            if args[0].eq_ignore_ascii_case(b"HELLO") {
                commands.push(without_auth(args));
            }
        }
        if commands.is_empty() {
            return Some(Ok(Box::new(NoLogin)));
        }
        let mut out = Vec::new();
        for c in &commands {
            out.extend(encode(c));
        }
        Some(Ok(Box::new(RedisLogin {
            out,
            input: Vec::new(),
            waiting: commands.len(),
            first_is_auth: credentials.password.is_some(),
            answered: 0,
        })))
    }
}

/// A `HELLO` with its `AUTH user password` clause removed (the middlebox has logged the
/// replica in already).
fn without_auth(args: &[Vec<u8>]) -> Args {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if i > 0 && args[i].eq_ignore_ascii_case(b"AUTH") {
            i += 3;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).into_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The middlebox logging in to one Redis replica.
#[derive(Debug)]
struct RedisLogin {
    out: Vec<u8>,
    input: Vec<u8>,
    /// Replies still expected.
    waiting: usize,
    first_is_auth: bool,
    answered: usize,
}

impl ReplicaLogin for RedisLogin {
    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn on_reply(&mut self, data: &[u8]) -> Result<(), LoginError> {
        self.input.extend_from_slice(data);
        let mut used = 0;
        while self.waiting > 0 {
            match reply(&self.input, used, 0) {
                Ok(Some((end, error))) => {
                    if error {
                        let text = String::from_utf8_lossy(&self.input[used..end]);
                        let text = text.trim_start_matches(['-', '!']).trim_end().to_owned();
                        return Err(if self.answered == 0 && self.first_is_auth {
                            LoginError::Refused(text)
                        } else {
                            LoginError::Failed(format!("the replica refused HELLO: {text}"))
                        });
                    }
                    used = end;
                    self.waiting -= 1;
                    self.answered += 1;
                }
                Ok(None) if self.input.len() <= MAX_HELD => break,
                Ok(None) => return Err(LoginError::Failed("a login reply over 64 KiB".into())),
                Err(e) => return Err(LoginError::Failed(e)),
            }
        }
        self.input.drain(..used);
        if self.waiting == 0 && !self.input.is_empty() {
            return Err(LoginError::Failed(
                "the replica sent more than its login replies".into(),
            ));
        }
        Ok(())
    }

    fn logged_in(&self) -> bool {
        self.waiting == 0
    }
}

#[cfg(test)]
#[path = "redis_tests.rs"]
mod tests;
