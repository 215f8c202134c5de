//! Bounds-checked big-endian cursor and writer helpers.
//!
//! Every read goes through [`Reader`], which returns [`Truncated`] instead of panicking, so
//! the decoder can be fed arbitrary bytes from an untrusted peer.

/// A read ran past the end of the available bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// Cursor over a byte slice; all accessors are checked.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if n > self.buf.len() {
            return Err(Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn skip(&mut self, n: usize) -> Result<(), Truncated> {
        self.bytes(n).map(|_| ())
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Everything not yet read.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Look at a big-endian u16 `offset` bytes ahead without consuming anything; used to
    /// read the length field of a TLV before splitting it off.
    pub fn peek_u16(&self, offset: usize) -> Result<u16, Truncated> {
        let b = self.buf.get(offset..offset + 2).ok_or(Truncated)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Big-endian append helpers on `Vec<u8>`.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_zeros(&mut self, n: usize);
    /// Pad with zeros up to the next multiple of 8 counted from `start`.
    fn pad_to_8(&mut self, start: usize);
    /// Overwrite a big-endian u16 at `at` (a length field patched after the body is known).
    fn patch_u16(&mut self, at: usize, v: u16);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_zeros(&mut self, n: usize) {
        self.resize(self.len() + n, 0);
    }
    fn pad_to_8(&mut self, start: usize) {
        let used = self.len() - start;
        self.put_zeros((8 - used % 8) % 8);
    }
    fn patch_u16(&mut self, at: usize, v: u16) {
        self[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Length of a TLV clamped into its u16 length field. Bodies we build are far below
/// 64 KiB; saturating keeps an oversized one detectable by the peer instead of wrapping.
pub fn len16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_is_checked() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u16(), Err(Truncated));
        assert_eq!(r.u8(), Ok(3));
        assert!(r.is_empty());
        assert_eq!(Reader::new(&[0]).peek_u16(0), Err(Truncated));
    }

    #[test]
    fn pad_to_8_pads_relative_to_start() {
        let mut v = vec![9u8; 3];
        v.put_u8(1);
        v.pad_to_8(3);
        assert_eq!(v.len(), 3 + 8);
        let mut w = vec![0u8; 8];
        w.pad_to_8(0);
        assert_eq!(w.len(), 8);
    }
}
