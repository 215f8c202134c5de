//! The fault matrix's client (`cargo xtask fault-writer`, run inside the source host): a
//! steady stream of Redis writes `SET f:<seq> <seq>`, one every interval, in sessions of a
//! fixed number of writes (a new TCP connection each, as real clients come and go, so a
//! repaired replication is picked up by the next session). One line per write on stdout:
//! `ok SEQ SENT_US ACKED_US` or `err SEQ SENT_US REASON` (Unix microseconds). A write that
//! fails ends its session; the next write opens a new one. Stops by itself after the
//! given time.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a write may wait for its answer (and a connection for its handshake) before
/// it counts as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Unix time in microseconds: the clock both the writer and the fault driver stamp with.
pub(super) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn set_command(seq: u64) -> Vec<u8> {
    let key = format!("f:{seq}");
    let value = seq.to_string();
    format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
        key.len(),
        value.len()
    )
    .into_bytes()
}

/// Sends one write on `conn` and reads its answer line.
fn write_one(conn: &mut BufReader<TcpStream>, seq: u64) -> Result<(), String> {
    conn.get_mut()
        .write_all(&set_command(seq))
        .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    // An answer line longer than this is not Redis's +OK; bounded so a hostile or broken
    // peer cannot make the writer buffer without end.
    let read = conn
        .by_ref()
        .take(512)
        .read_line(&mut line)
        .map_err(|e| format!("answer: {e}"))?;
    match line.trim_end() {
        "+OK" => Ok(()),
        _ if read == 0 => Err("answer: connection closed".into()),
        other => Err(format!("answer: {other:?}")),
    }
}

/// Runs the writer; see the module documentation.
pub fn writer_main(
    target: SocketAddr,
    seconds: u64,
    interval: Duration,
    per_session: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut out = std::io::stdout().lock();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut in_session = 0;
    let mut seq = 0u64;
    let mut next = Instant::now();
    while Instant::now() < deadline {
        if in_session >= per_session.max(1) {
            conn = None;
            in_session = 0;
        }
        let sent = now_us();
        let result = match conn.as_mut() {
            Some(c) => write_one(c, seq),
            None => TcpStream::connect_timeout(&target, ANSWER_TIMEOUT)
                .and_then(|s| {
                    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
                    s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    Ok(BufReader::new(s))
                })
                .map_err(|e| format!("connect: {e}"))
                .and_then(|mut c| {
                    let r = write_one(&mut c, seq);
                    conn = Some(c);
                    r
                }),
        };
        match result {
            Ok(()) => {
                writeln!(out, "ok {seq} {sent} {}", now_us())?;
                in_session += 1;
            }
            Err(why) => {
                writeln!(out, "err {seq} {sent} {why}")?;
                conn = None;
                in_session = 0;
            }
        }
        seq += 1;
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            // Behind (a write waited for its timeout): carry on from now rather than
            // sending a burst to catch up.
            next = now;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_a_well_formed_resp_set() {
        assert_eq!(
            set_command(42),
            b"*3\r\n$3\r\nSET\r\n$4\r\nf:42\r\n$2\r\n42\r\n".to_vec()
        );
    }
}
