//! Deterministic workloads for tests, the demo and benchmarks: the same seed always gives
//! the same bytes, so a primary and a replica fed the same workload must end in the same
//! state.

/// `len` pseudo-random bytes from `seed` (xorshift64*; not for cryptography).
pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `commands` Redis writes (SET, INCR, LPUSH, HSET, DEL over 5,000 keys of each type),
/// RESP-encoded, ready for `redis-cli --pipe`.
pub fn redis_writes(commands: usize, seed: u64) -> Vec<u8> {
    let randoms = seeded_bytes(seed, commands * 8);
    let mut out = Vec::with_capacity(commands * 40);
    for (i, chunk) in randoms.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let r = u64::from_le_bytes(word);
        // Key and command come from different bits, so every type sees every key.
        let key = (r >> 24) % 5000;
        let args: Vec<String> = match r % 5 {
            0 => vec!["SET".into(), format!("str:{key}"), format!("v{i}")],
            1 => vec!["INCR".into(), format!("ctr:{key}")],
            2 => vec!["LPUSH".into(), format!("list:{key}"), format!("e{i}")],
            3 => vec![
                "HSET".into(),
                format!("hash:{key}"),
                format!("f{}", (r >> 40) % 16),
                format!("v{i}"),
            ],
            _ => {
                let kind = ["str", "ctr", "list", "hash"][((r >> 48) % 4) as usize];
                vec!["DEL".into(), format!("{kind}:{key}")]
            }
        };
        out.extend_from_slice(&redis_command(&args));
    }
    out
}

/// One Redis command, RESP-encoded (an array of bulk strings).
pub fn redis_command<S: AsRef<str>>(args: &[S]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        assert_eq!(seeded_bytes(7, 1000), seeded_bytes(7, 1000));
        assert_ne!(seeded_bytes(7, 1000), seeded_bytes(8, 1000));
        assert_eq!(seeded_bytes(7, 13).len(), 13);
    }

    #[test]
    fn redis_command_is_a_resp_array_of_bulk_strings() {
        assert_eq!(
            redis_command(&["GET", "k:1"]),
            b"*2\r\n$3\r\nGET\r\n$3\r\nk:1\r\n"
        );
    }

    #[test]
    fn redis_writes_are_well_formed_resp() {
        let w = redis_writes(1000, 1);
        let text = String::from_utf8(w).unwrap();
        for verb in ["SET", "INCR", "LPUSH", "HSET", "DEL"] {
            assert!(text.contains(&format!("\r\n{verb}\r\n")), "no {verb}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with('*')).count(), 1000);
    }
}
