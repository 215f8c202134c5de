//! One copy of a byte stream, read by several destinations at their own pace.
//!
//! The client's stream must reach the primary and every replica. Copying it once per
//! destination would multiply memory and copy cost by the replica count, so the bytes are
//! stored once, in fixed-size chunks, and every destination ("reader") keeps only a stream
//! offset. A chunk is freed as soon as every live reader has moved past it; a reader that is
//! detached stops pinning memory at once.
//!
//! Offsets are absolute positions in the stream (`u64`, they never wrap in practice), which
//! keeps the arithmetic free of ring-buffer wrap-around cases.

use std::collections::VecDeque;

/// Size of one storage chunk. Large enough that a destination's socket gets a useful
/// slice per call, small enough that an idle session's leftovers stay cheap.
pub const CHUNK_SIZE: usize = 16 * 1024;

const CHUNK_U64: u64 = CHUNK_SIZE as u64;

/// Worst-case allocated bytes for a buffer holding `logical` unread bytes: the unread range
/// may start in the middle of its first chunk, so it can span one chunk more than
/// `logical / CHUNK_SIZE` rounded up.
pub fn max_allocated(logical: u64) -> u64 {
    logical
        .div_ceil(CHUNK_U64)
        .saturating_add(1)
        .saturating_mul(CHUNK_U64)
}

/// A byte stream stored once with one read offset per reader.
///
/// Invariants: `base + Σ chunk lengths == end`; every chunk but the last is full; every live
/// reader offset lies in `base..=end`.
#[derive(Debug)]
pub struct SharedBuffer {
    chunks: VecDeque<Vec<u8>>,
    /// Stream offset of the first byte of `chunks[0]`.
    base: u64,
    /// Stream offset one past the last byte pushed.
    end: u64,
    /// Stream offset of each reader's next byte; `None` once the reader is detached.
    readers: Vec<Option<u64>>,
}

impl SharedBuffer {
    /// A buffer with `readers` live readers, all at offset 0.
    pub fn new(readers: usize) -> Self {
        Self {
            chunks: VecDeque::new(),
            base: 0,
            end: 0,
            readers: vec![Some(0); readers],
        }
    }

    /// Total bytes ever pushed.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Appends `data` for every live reader. With no live reader the bytes are counted in
    /// the stream offset but not stored, since nobody could ever read them.
    pub fn push(&mut self, mut data: &[u8]) {
        if !self.readers.iter().any(Option::is_some) {
            self.end = self.end.saturating_add(data.len() as u64);
            self.chunks.clear();
            self.base = self.end;
            return;
        }
        while !data.is_empty() {
            if self.chunks.back().is_none_or(|c| c.len() >= CHUNK_SIZE) {
                self.chunks.push_back(Vec::with_capacity(CHUNK_SIZE));
            }
            let Some(last) = self.chunks.back_mut() else {
                break;
            };
            let take = (CHUNK_SIZE - last.len()).min(data.len());
            let (head, rest) = data.split_at(take);
            last.extend_from_slice(head);
            data = rest;
            self.end += take as u64;
        }
    }

    /// The next contiguous unread bytes of `reader` (empty if none, or if the reader is
    /// unknown or detached). At most one chunk long: call again after consuming it.
    pub fn readable(&self, reader: usize) -> &[u8] {
        let Some(Some(pos)) = self.readers.get(reader) else {
            return &[];
        };
        let Some(rel) = pos.checked_sub(self.base) else {
            return &[];
        };
        let Ok(idx) = usize::try_from(rel / CHUNK_U64) else {
            return &[];
        };
        let off = (rel % CHUNK_U64) as usize;
        self.chunks
            .get(idx)
            .and_then(|c| c.get(off..))
            .unwrap_or(&[])
    }

    /// Bytes `reader` has not consumed yet, `None` if unknown or detached.
    pub fn lag(&self, reader: usize) -> Option<u64> {
        let pos = (*self.readers.get(reader)?)?;
        Some(self.end - pos)
    }

    /// Marks `n` bytes as delivered to `reader` and frees what nobody needs any more.
    /// Returns `false` (and changes nothing) if the reader is unknown, detached, or `n`
    /// exceeds its lag.
    pub fn consume(&mut self, reader: usize, n: u64) -> bool {
        let end = self.end;
        let Some(Some(pos)) = self.readers.get_mut(reader) else {
            return false;
        };
        if n > end - *pos {
            return false;
        }
        *pos += n;
        self.release();
        true
    }

    /// Forgets `reader`; its unread bytes no longer hold memory.
    pub fn detach(&mut self, reader: usize) {
        if let Some(slot) = self.readers.get_mut(reader) {
            *slot = None;
        }
        self.release();
    }

    /// Detaches every reader and frees all memory.
    pub fn detach_all(&mut self) {
        self.readers.iter_mut().for_each(|r| *r = None);
        self.release();
    }

    /// Unread bytes of the slowest live reader: what the buffer must keep.
    pub fn buffered(&self) -> u64 {
        self.min_reader().map_or(0, |m| self.end - m)
    }

    /// Bytes of chunk memory currently held.
    pub fn allocated(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_U64
    }

    fn min_reader(&self) -> Option<u64> {
        self.readers.iter().flatten().copied().min()
    }

    fn release(&mut self) {
        let Some(min) = self.min_reader() else {
            self.chunks.clear();
            self.base = self.end;
            return;
        };
        if min == self.end {
            // Everyone is caught up: drop everything, even a partly filled last chunk, so an
            // idle session holds no memory.
            self.chunks.clear();
            self.base = self.end;
            return;
        }
        while self.chunks.front().is_some_and(|c| c.len() == CHUNK_SIZE)
            && self.base + CHUNK_U64 <= min
        {
            self.chunks.pop_front();
            self.base += CHUNK_U64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(buf: &mut SharedBuffer, reader: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let s = buf.readable(reader).to_vec();
            if s.is_empty() {
                return out;
            }
            out.extend_from_slice(&s);
            assert!(buf.consume(reader, s.len() as u64));
        }
    }

    #[test]
    fn each_reader_gets_every_byte_once() {
        let mut buf = SharedBuffer::new(2);
        let data: Vec<u8> = (0..3 * CHUNK_SIZE + 17).map(|i| i as u8).collect();
        buf.push(&data[..100]);
        buf.push(&data[100..]);
        assert_eq!(drain(&mut buf, 0), data);
        // Reader 1 still pins everything.
        assert_eq!(buf.buffered(), data.len() as u64);
        assert_eq!(drain(&mut buf, 1), data);
        assert_eq!(buf.buffered(), 0);
        assert_eq!(buf.allocated(), 0);
    }

    #[test]
    fn slices_stop_at_chunk_boundaries() {
        let mut buf = SharedBuffer::new(1);
        buf.push(&vec![1; CHUNK_SIZE + 10]);
        assert_eq!(buf.readable(0).len(), CHUNK_SIZE);
        assert!(buf.consume(0, CHUNK_SIZE as u64 - 1));
        assert_eq!(buf.readable(0).len(), 1);
        assert!(buf.consume(0, 1));
        assert_eq!(buf.readable(0).len(), 10);
        // The first chunk was freed.
        assert_eq!(buf.allocated(), CHUNK_SIZE as u64);
    }

    #[test]
    fn detaching_the_slowest_reader_frees_memory() {
        let mut buf = SharedBuffer::new(2);
        buf.push(&vec![0; 4 * CHUNK_SIZE]);
        let _ = drain(&mut buf, 0);
        assert_eq!(buf.allocated(), 4 * CHUNK_SIZE as u64);
        buf.detach(1);
        assert_eq!(buf.allocated(), 0);
        assert_eq!(buf.lag(1), None);
        assert!(buf.readable(1).is_empty());
    }

    #[test]
    fn bad_input_changes_nothing() {
        let mut buf = SharedBuffer::new(1);
        buf.push(b"abc");
        assert!(!buf.consume(0, 4));
        assert!(!buf.consume(7, 1));
        assert!(buf.readable(7).is_empty());
        assert_eq!(buf.lag(0), Some(3));
    }

    #[test]
    fn no_readers_store_nothing() {
        let mut buf = SharedBuffer::new(1);
        buf.detach_all();
        buf.push(&[0; 100]);
        assert_eq!(buf.end(), 100);
        assert_eq!(buf.allocated(), 0);
    }

    #[test]
    fn allocation_stays_within_the_advertised_bound() {
        let mut buf = SharedBuffer::new(1);
        let mut seed = 7u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 5000) as usize;
            buf.push(&vec![0; n]);
            let s = buf.readable(0).len() as u64;
            buf.consume(0, s.min(seed % 7000));
            assert!(buf.allocated() <= max_allocated(buf.buffered()));
        }
    }
}
