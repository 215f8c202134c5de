//! One AF_XDP socket with its own UMEM, over xdpilone. This is the only module that
//! touches AF_XDP rings, so the socket library could be swapped here alone.
//!
//! The UMEM is split in two pools: frames lent to the kernel through the fill ring for
//! receiving, and frames kept in a free list for transmitting (refilled from the
//! completion ring). The socket is split the same way, into a receive half ([`XskRx`]:
//! RX ring and fill ring) and a transmit half ([`XskTx`]: TX ring and completion ring),
//! so a caller can hold a received frame and write a transmit frame at the same time (a
//! TCP stack answers a segment while it still reads it). [`XskSocket::receive`] and
//! [`XskSocket::transmit`] remain as simple callback forms over the halves.
//!
//! Frames are handles ([`RxFrame`], [`TxFrame`]) naming a UMEM offset and the UMEM they
//! belong to. A worker holds several sockets, so a handle could be given to the wrong
//! one; each socket therefore checks, in O(1), that a handle is its own before it turns
//! it into bytes, and refuses it otherwise ([`ForeignFrame`]). Bytes borrow the half that
//! lent them, so they cannot outlive the frame's return to the kernel. The intended use:
//!
//! ```no_run
//! # use ncp_dataplane::xdp::xsk::XskRx;
//! fn first_byte(rx: &mut XskRx) -> Option<u8> {
//!     let frame = rx.take()?;
//!     let first = rx.data(&frame).ok().and_then(|bytes| bytes.first().copied());
//!     rx.release(frame);
//!     first
//! }
//! ```
//!
//! and what does not compile:
//!
//! ```compile_fail,E0502
//! # use ncp_dataplane::xdp::xsk::XskRx;
//! fn read_after_release(rx: &mut XskRx) {
//!     let frame = rx.take().unwrap();
//!     let bytes = rx.data(&frame).unwrap();
//!     rx.release(frame); // needs `&mut rx` while `bytes` still borrows it
//!     assert_eq!(bytes[0], 0);
//! }
//! ```
//!
//! ```compile_fail,E0382
//! # use ncp_dataplane::xdp::xsk::XskRx;
//! fn read_a_released_frame(rx: &mut XskRx) {
//!     let frame = rx.take().unwrap();
//!     rx.release(frame);
//!     let _ = rx.data(&frame); // the handle was given up
//! }
//! ```
//!
//! ```compile_fail,E0451
//! # use ncp_dataplane::xdp::xsk::RxFrame;
//! // Handles only come from a socket: there is no way to make one up.
//! let frame = RxFrame { umem: 1, addr: 0, len: 64 };
//! ```
//!
//! The only raw memory here is the UMEM; system calls go through [`crate::sys`].

use std::{
    collections::VecDeque,
    ffi::CString,
    io,
    num::NonZeroU32,
    os::fd::{BorrowedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use xdpilone::{
    BufIdx, CompletionQueue, FillQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem,
    UmemConfig, xdp::XdpDesc,
};

use crate::sys::{self, Mapping};

/// Bytes per UMEM frame: one page, room for a 1500-byte MTU frame and then some.
pub const FRAME_SIZE: u32 = 4096;
/// Descriptors handled per ring operation.
const BATCH: u32 = 64;
/// Copy mode sends at most this many frames per `sendto` kick (the kernel's
/// `TX_BATCH_SIZE`), so [`XskTx::kick`] kicks repeatedly.
const COPY_MODE_KICK_FRAMES: u32 = 32;

/// How to open a socket.
#[derive(Clone, Debug)]
pub struct XskOptions {
    /// Interface name.
    pub interface: String,
    /// Receive queue to bind to.
    pub queue: u32,
    /// UMEM frames (power of two); half receive, half transmit.
    pub frames: u32,
    /// Force zero-copy mode (fails where the driver lacks it) instead of copy mode.
    pub zero_copy: bool,
}

/// Counters kept by the socket itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct XskCounters {
    /// Frames read from the RX ring.
    pub rx_frames: u64,
    /// Bytes read from the RX ring.
    pub rx_bytes: u64,
    /// RX descriptors pointing outside the UMEM or across a frame boundary (recycled unread).
    pub rx_bad_desc: u64,
    /// Frames placed on the TX ring.
    pub tx_frames: u64,
    /// Transmit attempts refused because no TX frame or ring slot was free.
    pub tx_full: u64,
    /// `sendto` kicks issued to make the kernel transmit.
    pub tx_kicks: u64,
    /// Frame handles of another socket given to this one (a bug in the caller; refused).
    pub foreign_frames: u64,
}

/// A frame handle given to a socket that did not lend it. Refused: its offset means
/// nothing in this socket's UMEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame handle of another AF_XDP socket's UMEM")]
pub struct ForeignFrame;

/// Which UMEM a frame belongs to: unique per socket opened in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct UmemId(u64);

impl UmemId {
    fn fresh() -> Self {
        // Only uniqueness matters, not ordering with other memory.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Where the UMEM lives, as seen by one half of the socket. The halves never outlive the
/// [`XskSocket`] that owns the mapping (they are only reachable through it).
#[derive(Clone, Copy)]
struct UmemView {
    id: UmemId,
    base: NonNull<u8>,
    len: usize,
}

impl UmemView {
    fn of(id: UmemId, mapping: &Mapping) -> Self {
        Self {
            id,
            base: mapping.base(),
            len: mapping.len(),
        }
    }

    /// Where `[addr, addr+len)` of UMEM `umem` starts in memory: refused unless `umem` is
    /// this UMEM and the range lies inside it and inside one frame. This check is what
    /// makes the byte accessors of the halves sound.
    fn locate(&self, umem: UmemId, addr: u64, len: usize) -> Result<NonNull<u8>, ForeignFrame> {
        if umem != self.id || !self.holds(addr, len) {
            return Err(ForeignFrame);
        }
        let offset = usize::try_from(addr).map_err(|_| ForeignFrame)?;
        // SAFETY: `holds` checked `offset + len <= self.len`, so the result stays inside
        // (or one past the end of) the mapping `base` points to.
        Ok(unsafe { self.base.add(offset) })
    }

    /// Whether `[addr, addr+len)` lies inside the mapping and inside one frame.
    fn holds(&self, addr: u64, len: usize) -> bool {
        let Ok(start) = usize::try_from(addr) else {
            return false;
        };
        let in_frame = start % FRAME_SIZE as usize + len <= FRAME_SIZE as usize;
        in_frame && start.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Whether `base` is the start of a whole frame inside the mapping.
    fn holds_frame(&self, base: u64) -> bool {
        base.is_multiple_of(u64::from(FRAME_SIZE)) && self.holds(base, FRAME_SIZE as usize)
    }
}

fn frame_base(addr: u64) -> u64 {
    addr & !u64::from(FRAME_SIZE - 1)
}

fn errno(what: &str, e: xdpilone::Errno) -> io::Error {
    let os = io::Error::from_raw_os_error(e.get_raw());
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

/// A received frame still owned by the receive half that handed it out. Give it back
/// with [`XskRx::release`]: until then the kernel cannot reuse it (a frame never released
/// is a frame lost to the fill ring, hence no `Clone`).
#[derive(Debug)]
pub struct RxFrame {
    umem: UmemId,
    addr: u64,
    len: u32,
}

impl RxFrame {
    /// Length of the frame in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The receive half: the RX ring and the fill ring.
pub struct XskRx {
    ring: RingRx,
    fill: FillQueue,
    view: UmemView,
    /// Descriptors already taken off the RX ring but not handed out yet. Taking a batch
    /// at once keeps ring operations (and their memory barriers) per batch, not per frame.
    ready: VecDeque<XdpDesc>,
    /// Frames waiting to go back to the fill ring (batched; kept when the ring is full).
    fill_backlog: Vec<u64>,
    frames: u64,
    bytes: u64,
    bad_desc: u64,
    foreign: u64,
}

impl XskRx {
    /// The next received frame, if any. Reads the RX ring in batches.
    pub fn take(&mut self) -> Option<RxFrame> {
        loop {
            if self.ready.is_empty() {
                self.pull();
            }
            let desc = self.ready.pop_front()?;
            if self.view.holds(desc.addr, desc.len as usize) {
                self.frames += 1;
                self.bytes += u64::from(desc.len);
                return Some(RxFrame {
                    umem: self.view.id,
                    addr: desc.addr,
                    len: desc.len,
                });
            }
            // A descriptor the kernel should never produce; recycle the frame it names
            // when that frame is ours at all, and move on.
            self.bad_desc += 1;
            if self.view.holds_frame(frame_base(desc.addr)) {
                self.fill_backlog.push(frame_base(desc.addr));
            }
        }
    }

    fn pull(&mut self) {
        let mut reader = self.ring.receive(BATCH);
        while let Some(desc) = reader.read() {
            self.ready.push_back(desc);
        }
        reader.release();
    }

    /// The bytes of a frame this half handed out by [`XskRx::take`]; a frame of another
    /// socket is refused.
    pub fn data(&self, frame: &RxFrame) -> Result<&[u8], ForeignFrame> {
        let start = self
            .view
            .locate(frame.umem, frame.addr, frame.len as usize)?;
        // SAFETY: `locate` checked that the frame is this UMEM's and that the range lies
        // inside the mapping and one frame. The kernel does not write the frame until
        // `release` returns it through the fill ring, which needs `&mut self` and takes
        // the handle by value, so it cannot overlap this borrow of `self`.
        Ok(unsafe { std::slice::from_raw_parts(start.as_ptr(), frame.len as usize) })
    }

    /// Gives a frame back for receiving. Returns frames to the fill ring in batches. A
    /// frame of another socket is refused and counted (it is not ours to hand the kernel).
    pub fn release(&mut self, frame: RxFrame) {
        if frame.umem != self.view.id {
            self.foreign += 1;
            tracing::error!(
                ?frame,
                "an RX frame was released to a socket that did not lend it"
            );
            return;
        }
        self.fill_backlog.push(frame_base(frame.addr));
        if self.fill_backlog.len() >= BATCH as usize {
            self.refill_fill_ring();
        }
    }

    /// Returns all released frames to the kernel through the fill ring now.
    pub fn refill_fill_ring(&mut self) {
        if self.fill_backlog.is_empty() {
            return;
        }
        let want = u32::try_from(self.fill_backlog.len()).unwrap_or(u32::MAX);
        let mut writer = self.fill.fill(want);
        let n = writer.insert(self.fill_backlog.iter().copied());
        writer.commit();
        drop(writer);
        self.fill_backlog.drain(..n as usize);
        if self.fill.needs_wakeup() {
            self.fill.wake();
        }
    }

    /// Frames received and not handed out yet (taken off the ring or still on it).
    pub fn available(&self) -> u32 {
        let ready = u32::try_from(self.ready.len()).unwrap_or(u32::MAX);
        ready.saturating_add(self.ring.available())
    }

    /// The socket's file descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// A free UMEM frame lent to the caller for transmitting: fill it through
/// [`XskTx::buffer`], then [`XskTx::submit`] or [`XskTx::discard`] it, on the half that
/// lent it.
#[derive(Debug)]
pub struct TxFrame {
    umem: UmemId,
    addr: u64,
}

/// The transmit half: the TX ring and the completion ring.
pub struct XskTx {
    ring: RingTx,
    completion: CompletionQueue,
    view: UmemView,
    /// Offsets of frames free for transmitting.
    free: Vec<u64>,
    zero_copy: bool,
    frames: u64,
    full: u64,
    kicks: u64,
    foreign: u64,
}

impl XskTx {
    /// Takes a free frame, first reclaiming completed ones when the free list is empty.
    /// Returns `None` (and counts it) when every frame is still in flight.
    pub fn alloc(&mut self) -> Option<TxFrame> {
        if self.free.is_empty() {
            self.reclaim();
        }
        match self.free.pop() {
            Some(addr) => Some(TxFrame {
                umem: self.view.id,
                addr,
            }),
            None => {
                self.full += 1;
                None
            }
        }
    }

    /// The whole UMEM frame behind `frame`, [`FRAME_SIZE`] bytes; a frame this half did
    /// not lend is refused.
    pub fn buffer<'a>(&'a mut self, frame: &'a mut TxFrame) -> Result<&'a mut [u8], ForeignFrame> {
        let start = self
            .view
            .locate(frame.umem, frame.addr, FRAME_SIZE as usize)?;
        // SAFETY: `locate` checked that the frame is this UMEM's and lies whole inside the
        // mapping. It came from this half's free list, so the kernel does not touch it
        // until it is submitted, and no other handle names it (free-list entries are
        // distinct frame bases). The exclusive borrow of `self` keeps two such slices from
        // coexisting.
        Ok(unsafe { std::slice::from_raw_parts_mut(start.as_ptr(), FRAME_SIZE as usize) })
    }

    /// Whether `frame` is this half's; counts and logs it when not.
    fn owns(&mut self, frame: &TxFrame) -> bool {
        if frame.umem == self.view.id {
            return true;
        }
        self.foreign += 1;
        tracing::error!(
            ?frame,
            "a TX frame was given to a socket that did not lend it"
        );
        false
    }

    /// Queues the first `len` bytes of `frame` for sending. Returns false when the TX ring
    /// is full or `len` is too large; the frame then goes back to the free list.
    pub fn submit(&mut self, frame: TxFrame, len: usize) -> bool {
        self.submit_at(frame, 0, len)
    }

    /// Queues `len` bytes starting `offset` bytes into `frame` (a frame may start past the
    /// beginning of its UMEM frame, e.g. when the link header was sized after the payload
    /// was written). Returns false, and keeps the frame free, when the range leaves the
    /// frame or the TX ring is full; a frame of another socket is refused (and counted).
    pub fn submit_at(&mut self, frame: TxFrame, offset: usize, len: usize) -> bool {
        if !self.owns(&frame) {
            return false;
        }
        let fits = offset
            .checked_add(len)
            .is_some_and(|end| end <= FRAME_SIZE as usize);
        let (Ok(offset64), Ok(len32)) = (u64::try_from(offset), u32::try_from(len)) else {
            self.discard(frame);
            return false;
        };
        if !fits {
            self.discard(frame);
            return false;
        }
        let desc = XdpDesc {
            addr: frame.addr + offset64,
            len: len32,
            options: 0,
        };
        let mut writer = self.ring.transmit(1);
        let queued = writer.insert_once(desc);
        writer.commit();
        drop(writer);
        if !queued {
            self.full += 1;
            self.free.push(frame.addr);
            return false;
        }
        self.frames += 1;
        true
    }

    /// Returns an unused frame to the free list (a frame of another socket is refused).
    pub fn discard(&mut self, frame: TxFrame) {
        if self.owns(&frame) {
            self.free.push(frame.addr);
        }
    }

    /// Kicks the kernel into sending what is on the TX ring, then reclaims completed
    /// frames. In copy mode each `sendto` sends at most 32 frames, so this kicks in a loop
    /// while frames are pending; it stops early when a kick makes no progress (the kernel
    /// is out of room), leaving the rest for the next kick rather than spinning.
    pub fn kick(&mut self) {
        let mut pending = self.ring.pending();
        // Enough rounds to drain a full ring, plus one.
        let rounds = pending / COPY_MODE_KICK_FRAMES + 2;
        for _ in 0..rounds {
            if pending == 0 || (self.zero_copy && !self.ring.needs_wakeup()) {
                break;
            }
            // xdpilone's wake issues the `sendto` and ignores its result on purpose: EAGAIN
            // and EBUSY only mean "try again", which the progress check below does.
            self.ring.wake();
            self.kicks += 1;
            let now = self.ring.pending();
            if now >= pending {
                break;
            }
            pending = now;
        }
        self.reclaim();
    }

    /// Frames on the TX ring the kernel has not consumed yet.
    pub fn pending(&self) -> u32 {
        self.ring.pending()
    }

    /// Frames free for transmitting right now (without reclaiming).
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Moves transmitted frames from the completion ring back to the free list.
    pub fn reclaim(&mut self) {
        let mut reader = self.completion.complete(BATCH * 4);
        while let Some(addr) = reader.read() {
            let base = frame_base(addr);
            if self.view.holds_frame(base) {
                self.free.push(base);
            }
        }
        reader.release();
    }
}

/// An AF_XDP socket bound to one queue, with its UMEM and rings.
pub struct XskSocket {
    rx: XskRx,
    tx: XskTx,
    umem: Umem,
    // Last: the memory must outlive the UMEM registration and the halves above.
    area: Mapping,
}

impl XskSocket {
    /// Creates the UMEM, the socket and its rings, and binds it to the queue. With
    /// `zero_copy`, a driver that refuses zero-copy binding (veth, and NICs without
    /// AF_XDP zero-copy support) gets a fresh socket in copy mode instead, with a warning
    /// that says so: the data plane works either way, only slower without zero-copy.
    pub fn open(options: &XskOptions) -> io::Result<Self> {
        match Self::open_in(options, options.zero_copy) {
            Err(e) if options.zero_copy => {
                tracing::warn!(
                    interface = %options.interface,
                    queue = options.queue,
                    error = %e,
                    "the driver refused zero-copy AF_XDP; falling back to copy mode \
                     (zero_copy = true needs a NIC driver with AF_XDP zero-copy support)"
                );
                Self::open_in(options, false)
            }
            opened => opened,
        }
    }

    /// Whether the socket is bound in zero-copy mode.
    pub fn is_zero_copy(&self) -> bool {
        self.tx.zero_copy
    }

    fn open_in(options: &XskOptions, zero_copy: bool) -> io::Result<Self> {
        let frames = options.frames;
        if !frames.is_power_of_two() || frames < 2 * BATCH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "UMEM frame count {frames} must be a power of two >= {}",
                    2 * BATCH
                ),
            ));
        }
        let area = Mapping::anonymous(frames as usize * FRAME_SIZE as usize)?;
        let half = frames / 2;
        let config = UmemConfig {
            fill_size: half,
            complete_size: half,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page aligned (a fresh anonymous mmap), nothing else refers to
        // it, and it outlives the UMEM: both live in the returned struct, the area dropped
        // last.
        let umem = unsafe { Umem::new(config, area.as_slice_ptr()) }
            .map_err(|e| errno("registering the UMEM", e))?;

        let name = CString::new(options.interface.as_str()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL")
        })?;
        let mut info = IfInfo::invalid();
        info.from_name(&name)
            .map_err(|e| errno(&format!("looking up interface {}", options.interface), e))?;
        info.set_queue(options.queue);
        let socket = Socket::with_shared(&info, &umem)
            .map_err(|e| errno("creating the AF_XDP socket", e))?;
        let device_queue = umem
            .fq_cq(&socket)
            .map_err(|e| errno("mapping fill/completion rings", e))?;
        let bind_flags = SocketConfig::XDP_BIND_NEED_WAKEUP
            | if zero_copy {
                SocketConfig::XDP_BIND_ZEROCOPY
            } else {
                SocketConfig::XDP_BIND_COPY
            };
        let ring_size = NonZeroU32::new(half);
        let rxtx = umem
            .rx_tx(
                &socket,
                &SocketConfig {
                    rx_size: ring_size,
                    tx_size: ring_size,
                    bind_flags,
                },
            )
            .map_err(|e| errno("creating RX/TX rings", e))?;
        let ring_rx = rxtx.map_rx().map_err(|e| errno("mapping the RX ring", e))?;
        let ring_tx = rxtx.map_tx().map_err(|e| errno("mapping the TX ring", e))?;
        umem.bind(&rxtx).map_err(|e| {
            errno(
                &format!(
                    "binding to {} queue {} in {} mode",
                    options.interface,
                    options.queue,
                    if zero_copy { "zero-copy" } else { "copy" }
                ),
                e,
            )
        })?;
        let (fill, completion) = device_queue.into_parts();

        // First half of the frames go to the kernel for receiving, second half stay ours.
        let offset = |i: u32| umem.frame(BufIdx(i)).map(|chunk| chunk.offset);
        let view = UmemView::of(UmemId::fresh(), &area);
        let mut rx = XskRx {
            ring: ring_rx,
            fill,
            view,
            ready: VecDeque::with_capacity(BATCH as usize),
            fill_backlog: (0..half).filter_map(offset).collect(),
            frames: 0,
            bytes: 0,
            bad_desc: 0,
            foreign: 0,
        };
        rx.refill_fill_ring();
        let tx = XskTx {
            ring: ring_tx,
            completion,
            view,
            free: (half..frames)
                .filter_map(offset)
                .filter(|&o| view.holds_frame(o))
                .collect(),
            zero_copy,
            frames: 0,
            full: 0,
            kicks: 0,
            foreign: 0,
        };

        Ok(Self { rx, tx, umem, area })
    }

    /// The socket's file descriptor, for the XSKMAP.
    pub fn raw_fd(&self) -> RawFd {
        self.rx.raw_fd()
    }

    /// The socket's descriptor to wait on for received frames.
    pub fn readiness_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor belongs to the socket inside `self.rx`, which stays open
        // for as long as `self` is borrowed.
        unsafe { BorrowedFd::borrow_raw(self.rx.raw_fd()) }
    }

    /// Counters so far.
    pub fn counters(&self) -> XskCounters {
        XskCounters {
            rx_frames: self.rx.frames,
            rx_bytes: self.rx.bytes,
            rx_bad_desc: self.rx.bad_desc,
            tx_frames: self.tx.frames,
            tx_full: self.tx.full,
            tx_kicks: self.tx.kicks,
            foreign_frames: self.rx.foreign + self.tx.foreign,
        }
    }

    /// Both halves at once, for a caller that reads and writes frames interleaved.
    pub fn split(&mut self) -> (&mut XskRx, &mut XskTx) {
        (&mut self.rx, &mut self.tx)
    }

    /// The receive half.
    pub fn rx(&mut self) -> &mut XskRx {
        &mut self.rx
    }

    /// The receive half, to read frames already taken.
    pub fn rx_ref(&self) -> &XskRx {
        &self.rx
    }

    /// The transmit half.
    pub fn tx(&mut self) -> &mut XskTx {
        &mut self.tx
    }

    /// Reads up to `max` frames, hands each to `handle` and returns them to the fill ring.
    /// Returns the number of frames read.
    pub fn receive(&mut self, max: u32, mut handle: impl FnMut(&[u8])) -> u32 {
        let mut done = 0;
        while done < max.min(BATCH) {
            let Some(frame) = self.rx.take() else { break };
            if let Ok(data) = self.rx.data(&frame) {
                handle(data);
            }
            self.rx.release(frame);
            done += 1;
        }
        self.rx.refill_fill_ring();
        done
    }

    /// Writes one frame of `len` bytes with `write` into a free TX frame and queues it.
    /// Returns false (and counts it) when no frame is free: the caller drops the frame,
    /// as a NIC with a full ring would.
    pub fn transmit(&mut self, len: usize, write: impl FnOnce(&mut [u8])) -> bool {
        if len > FRAME_SIZE as usize {
            return false;
        }
        let Some(mut frame) = self.tx.alloc() else {
            return false;
        };
        // The frame was just lent by this same half, so it cannot be refused.
        let Ok(buffer) = self.tx.buffer(&mut frame) else {
            return false;
        };
        write(&mut buffer[..len]);
        self.tx.submit(frame, len)
    }

    /// Kicks the kernel to send what is on the TX ring (see [`XskTx::kick`]).
    pub fn kick_tx(&mut self) {
        self.tx.kick();
    }

    /// Sleeps until frames arrive or `timeout_ms` passes. Returns whether frames wait.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        sys::wait_readable(self.readiness_fd(), timeout_ms)
    }

    /// Frames queued in the RX ring right now.
    pub fn rx_available(&self) -> u32 {
        self.rx.available()
    }

    /// Number of UMEM frames.
    pub fn frames(&self) -> u32 {
        self.umem.len_frames()
    }

    /// Bytes of UMEM mapped.
    pub fn umem_bytes(&self) -> usize {
        self.area.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umem_view_bounds() {
        let view = UmemView {
            id: UmemId::fresh(),
            base: NonNull::dangling(),
            len: 4 * FRAME_SIZE as usize,
        };
        assert!(view.holds(0, FRAME_SIZE as usize));
        assert!(view.holds(u64::from(FRAME_SIZE) + 100, 1500));
        assert!(
            !view.holds(u64::from(FRAME_SIZE) - 10, 20),
            "crosses a frame"
        );
        assert!(!view.holds(4 * u64::from(FRAME_SIZE), 1), "past the end");
        assert!(!view.holds(u64::MAX, 1));
        assert_eq!(frame_base(u64::from(FRAME_SIZE) * 3 + 77), 3 * 4096);
        assert!(view.holds_frame(3 * u64::from(FRAME_SIZE)));
        assert!(!view.holds_frame(4 * u64::from(FRAME_SIZE)));
        assert!(!view.holds_frame(100));
    }

    /// The misuse the ids exist for: a worker holds two sockets, and a handle of the
    /// larger UMEM given to the smaller one would name memory past its end.
    #[test]
    fn a_frame_of_another_umem_is_refused_before_any_memory_is_touched() {
        let small = Mapping::anonymous(2 * FRAME_SIZE as usize).unwrap();
        let large = Mapping::anonymous(8 * FRAME_SIZE as usize).unwrap();
        let small_view = UmemView::of(UmemId::fresh(), &small);
        let large_view = UmemView::of(UmemId::fresh(), &large);
        let far = 6 * u64::from(FRAME_SIZE);
        assert!(large_view.locate(large_view.id, far, 64).is_ok());
        assert_eq!(
            small_view.locate(large_view.id, far, 64),
            Err(ForeignFrame),
            "past the smaller UMEM's end"
        );
        // Refused by identity even where the offset would fit.
        assert_eq!(small_view.locate(large_view.id, 0, 64), Err(ForeignFrame));
        assert!(small_view.locate(small_view.id, 0, 64).is_ok());
        // And its own frames only within bounds.
        assert_eq!(small_view.locate(small_view.id, far, 64), Err(ForeignFrame));
        assert_ne!(UmemId::fresh(), UmemId::fresh());
    }
}
