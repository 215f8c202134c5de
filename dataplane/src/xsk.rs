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

use std::{collections::VecDeque, ffi::CString, io, num::NonZeroU32, ptr::NonNull};

use xdpilone::{
    BufIdx, CompletionQueue, FillQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem,
    UmemConfig, xdp::XdpDesc,
};

/// Bytes per UMEM frame: one page, room for a 1500-byte MTU frame and then some.
pub const FRAME_SIZE: u32 = 4096;
/// Descriptors handled per ring operation.
const BATCH: u32 = 64;
/// Copy mode sends at most this many frames per `sendto` kick (the kernel's
/// `TX_BATCH_SIZE`), so a flush kicks repeatedly.
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
}

/// Anonymous, page-aligned memory for the UMEM, unmapped on drop.
struct MmapArea {
    ptr: NonNull<u8>,
    len: usize,
}

impl MmapArea {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    fn as_slice_ptr(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    fn view(&self) -> UmemView {
        UmemView {
            base: self.ptr,
            len: self.len,
        }
    }
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; nothing refers to it anymore
        // because the socket halves and UMEM fields are dropped before this one.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Where the UMEM lives, as seen by one half of the socket. The halves never outlive the
/// [`XskSocket`] that owns the mapping (they are only reachable through it).
#[derive(Clone, Copy)]
struct UmemView {
    base: NonNull<u8>,
    len: usize,
}

impl UmemView {
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

/// A received frame still owned by the receive half. Give it back with
/// [`XskRx::release`]: until then the kernel cannot reuse it (a frame never released is a
/// frame lost to the fill ring, hence no `Clone`).
#[derive(Debug)]
pub struct RxFrame {
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

    /// The bytes of a frame handed out by [`XskRx::take`].
    pub fn data(&self, frame: &RxFrame) -> &[u8] {
        // SAFETY: `take` checked that the range lies inside the mapping and one frame; the
        // kernel does not write the frame until `release` returns it through the fill ring,
        // which needs `&mut self` and so cannot overlap this borrow.
        unsafe {
            std::slice::from_raw_parts(
                self.view.base.as_ptr().add(frame.addr as usize),
                frame.len as usize,
            )
        }
    }

    /// Gives a frame back for receiving. Returns frames to the fill ring in batches.
    pub fn release(&mut self, frame: RxFrame) {
        self.fill_backlog.push(frame_base(frame.addr));
        if self.fill_backlog.len() >= BATCH as usize {
            self.refill();
        }
    }

    /// Returns all released frames to the kernel now.
    pub fn refill(&mut self) {
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
    pub fn raw_fd(&self) -> i32 {
        self.ring.as_raw_fd()
    }
}

/// A free UMEM frame lent to the caller for transmitting: fill it through
/// [`XskTx::buffer`], then [`XskTx::submit`] or [`XskTx::discard`] it.
#[derive(Debug)]
pub struct TxFrame {
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
}

impl XskTx {
    /// Takes a free frame, first reclaiming completed ones when the free list is empty.
    /// Returns `None` (and counts it) when every frame is still in flight.
    pub fn alloc(&mut self) -> Option<TxFrame> {
        if self.free.is_empty() {
            self.reclaim();
        }
        match self.free.pop() {
            Some(addr) => Some(TxFrame { addr }),
            None => {
                self.full += 1;
                None
            }
        }
    }

    /// The whole UMEM frame behind `frame`, [`FRAME_SIZE`] bytes.
    pub fn buffer<'a>(&'a mut self, frame: &'a mut TxFrame) -> &'a mut [u8] {
        // SAFETY: `frame` came from the free list, so the kernel does not touch it until it
        // is submitted; free-list entries are frame bases inside the mapping (checked when
        // the list was built and when completions are reclaimed). The exclusive borrow of
        // `self` keeps two such slices from coexisting.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.view.base.as_ptr().add(frame.addr as usize),
                FRAME_SIZE as usize,
            )
        }
    }

    /// Queues the first `len` bytes of `frame` for sending. Returns false when the TX ring
    /// is full or `len` is too large; the frame then goes back to the free list.
    pub fn submit(&mut self, frame: TxFrame, len: usize) -> bool {
        self.submit_at(frame, 0, len)
    }

    /// Queues `len` bytes starting `offset` bytes into `frame` (a frame may start past the
    /// beginning of its UMEM frame, e.g. when the link header was sized after the payload
    /// was written). Returns false, and keeps the frame free, when the range leaves the
    /// frame or the TX ring is full.
    pub fn submit_at(&mut self, frame: TxFrame, offset: usize, len: usize) -> bool {
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

    /// Returns an unused frame to the free list.
    pub fn discard(&mut self, frame: TxFrame) {
        self.free.push(frame.addr);
    }

    /// Makes the kernel send what is on the TX ring. In copy mode each `sendto` sends at
    /// most 32 frames, so this kicks in a loop while frames are pending; it stops early
    /// when a kick makes no progress (the kernel is out of room), leaving the rest for
    /// the next flush rather than spinning.
    pub fn flush(&mut self) {
        let mut pending = self.ring.pending();
        // Enough rounds to drain a full ring, plus one.
        let rounds = pending / COPY_MODE_KICK_FRAMES + 2;
        for _ in 0..rounds {
            if pending == 0 || (self.zero_copy && !self.ring.needs_wakeup()) {
                break;
            }
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
    area: MmapArea,
}

impl XskSocket {
    /// Creates the UMEM, the socket and its rings, and binds it to the queue.
    pub fn open(options: &XskOptions) -> io::Result<Self> {
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
        let area = MmapArea::new(frames as usize * FRAME_SIZE as usize)?;
        let half = frames / 2;
        let config = UmemConfig {
            fill_size: half,
            complete_size: half,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page aligned (fresh mmap) and outlives the UMEM: both live in
        // the returned struct, the area dropped last.
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
            | if options.zero_copy {
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
                    if options.zero_copy {
                        "zero-copy"
                    } else {
                        "copy"
                    }
                ),
                e,
            )
        })?;
        let (fill, completion) = device_queue.into_parts();

        // First half of the frames go to the kernel for receiving, second half stay ours.
        let offset = |i: u32| umem.frame(BufIdx(i)).map(|chunk| chunk.offset);
        let view = area.view();
        let mut rx = XskRx {
            ring: ring_rx,
            fill,
            view,
            ready: VecDeque::with_capacity(BATCH as usize),
            fill_backlog: (0..half).filter_map(offset).collect(),
            frames: 0,
            bytes: 0,
            bad_desc: 0,
        };
        rx.refill();
        let tx = XskTx {
            ring: ring_tx,
            completion,
            view,
            free: (half..frames)
                .filter_map(offset)
                .filter(|&o| view.holds_frame(o))
                .collect(),
            zero_copy: options.zero_copy,
            frames: 0,
            full: 0,
            kicks: 0,
        };

        Ok(Self { rx, tx, umem, area })
    }

    /// The socket's file descriptor, for the XSKMAP and for `poll(2)`.
    pub fn raw_fd(&self) -> i32 {
        self.rx.raw_fd()
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
            handle(self.rx.data(&frame));
            self.rx.release(frame);
            done += 1;
        }
        self.rx.refill();
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
        write(&mut self.tx.buffer(&mut frame)[..len]);
        self.tx.submit(frame, len)
    }

    /// Kicks the kernel to send what is on the TX ring (see [`XskTx::flush`]).
    pub fn flush(&mut self) {
        self.tx.flush();
    }

    /// Sleeps until frames arrive or `timeout_ms` passes.
    pub fn wait(&self, timeout_ms: i32) {
        wait_readable(self.raw_fd(), timeout_ms);
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
        self.area.len
    }
}

/// Sleeps until `fd` is readable or `timeout_ms` passes (negative: no timeout).
pub fn wait_readable(fd: i32, timeout_ms: i32) {
    let mut fds = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fds, 1, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umem_view_bounds() {
        let view = UmemView {
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
}
