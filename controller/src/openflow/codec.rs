//! Framing: `encode` turns a message into bytes, [`Decoder`] turns a byte stream into
//! messages. No sockets here, so both sides are tested with plain byte vectors.

use super::bytes::{Reader, len16};
use super::header::{HEADER_LEN, Header, MsgType, OFP_VERSION_1_3};
use super::messages::{BodyError, Message};

/// Largest message the OpenFlow length field can describe.
pub const MAX_MESSAGE_LEN: usize = u16::MAX as usize;

/// Encodes `msg` as an OpenFlow 1.3 message with transaction id `xid`.
pub fn encode(msg: &Message, xid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let version = match msg {
        Message::Unknown { version, .. } => *version,
        _ => OFP_VERSION_1_3,
    };
    Header {
        version,
        msg_type: msg.msg_type(),
        length: 0,
        xid,
    }
    .emit(&mut out);
    msg.emit_body(&mut out);
    let len = len16(out.len());
    out[2..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// One decoded message with the header fields a caller needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub version: u8,
    pub xid: u32,
    pub message: Message,
}

/// Why the stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The header's length cannot be right. The stream has lost framing, so the
    /// connection must be closed.
    #[error("message length {length} outside 8..={max}")]
    BadLength { length: usize, max: usize },
    /// One message had a malformed body. It has been consumed; the stream is still in
    /// sync and the caller may answer with an OpenFlow error and go on.
    #[error("malformed {msg_type} body (xid {xid}): {source}")]
    Body {
        xid: u32,
        msg_type: u8,
        source: BodyError,
    },
}

impl DecodeError {
    /// True when the stream cannot continue after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, DecodeError::BadLength { .. })
    }
}

/// Streaming decoder: feed bytes in any chunking, pull complete messages out.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max_len: usize,
    /// Set once framing is lost; the stream is dead from then on.
    failed: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(MAX_MESSAGE_LEN)
    }
}

impl Decoder {
    /// A decoder refusing messages longer than `max_len` bytes (clamped to 8..=65535).
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_len: max_len.clamp(HEADER_LEN, MAX_MESSAGE_LEN),
            failed: None,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes held that do not yet form a whole message. A caller uses this to notice a
    /// peer that starts a message and never finishes it.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. After a fatal
    /// error every later call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut r = Reader::new(&self.buf);
        let Ok(h) = Header::parse(&mut r) else {
            return Ok(None);
        };
        let length = usize::from(h.length);
        if length < HEADER_LEN || length > self.max_len {
            let e = DecodeError::BadLength {
                length,
                max: self.max_len,
            };
            self.failed = Some(e.clone());
            self.buf = Vec::new();
            return Err(e);
        }
        if self.buf.len() < length {
            return Ok(None);
        }
        let frame: Vec<u8> = self.buf.drain(..length).collect();
        let body = &frame[HEADER_LEN..];
        let parsed = if h.version == OFP_VERSION_1_3 || h.msg_type == MsgType::Hello as u8 {
            Message::parse_body(h.version, h.msg_type, body)
        } else {
            Ok(Message::Unknown {
                version: h.version,
                msg_type: h.msg_type,
                body: body.to_vec(),
            })
        };
        match parsed {
            Ok(message) => Ok(Some(Frame {
                version: h.version,
                xid: h.xid,
                message,
            })),
            Err(source) => Err(DecodeError::Body {
                xid: h.xid,
                msg_type: h.msg_type,
                source,
            }),
        }
    }
}

impl Iterator for Decoder {
    type Item = Result<Frame, DecodeError>;

    /// Yields frames until more input is needed; stops for good after a fatal error.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed.is_some() {
            return None;
        }
        self.next_frame().transpose()
    }
}
