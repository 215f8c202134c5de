//! One AF_XDP socket with its own UMEM, over xdpilone. This is the only module that
//! touches AF_XDP rings, so the socket library could be swapped here alone.
//!
//! The UMEM is split in two pools: frames lent to the kernel through the fill ring for
//! receiving, and frames kept in a free list for transmitting (refilled from the
//! completion ring). A received frame is handed to the caller as a borrowed slice and goes
//! straight back to the fill ring afterwards; a transmitted frame is written in place.

use std::{ffi::CString, io, num::NonZeroU32, ptr::NonNull};

use xdpilone::{
    BufIdx, DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig,
};

/// Bytes per UMEM frame: one page, room for a 1500-byte MTU frame and then some.
pub const FRAME_SIZE: u32 = 4096;
/// Descriptors handled per ring operation.
const BATCH: u32 = 64;

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
    /// Frames placed on the TX ring.
    pub tx_frames: u64,
    /// Transmit attempts refused because no TX frame was free.
    pub tx_full: u64,
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
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; nothing refers to it anymore
        // because the socket and UMEM fields are dropped before this one.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn errno(what: &str, e: xdpilone::Errno) -> io::Error {
    let os = io::Error::from_raw_os_error(e.get_raw());
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

/// An AF_XDP socket bound to one queue, with its UMEM and rings.
pub struct XskSocket {
    rx: RingRx,
    tx: RingTx,
    fill_completion: DeviceQueue,
    umem: Umem,
    /// Offsets of frames free for transmitting.
    tx_free: Vec<u64>,
    /// Received frames waiting to go back to the fill ring (kept when the ring is full).
    fill_backlog: Vec<u64>,
    counters: XskCounters,
    // Last: the memory must outlive the UMEM registration above.
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
        let mut fill_completion = umem
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
        let rx = rxtx.map_rx().map_err(|e| errno("mapping the RX ring", e))?;
        let tx = rxtx.map_tx().map_err(|e| errno("mapping the TX ring", e))?;
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

        // First half of the frames go to the kernel for receiving, second half stay ours.
        let offset = |i: u32| umem.frame(BufIdx(i)).map(|chunk| chunk.offset);
        let rx_frames: Vec<u64> = (0..half).filter_map(offset).collect();
        let tx_free: Vec<u64> = (half..frames).filter_map(offset).collect();
        let mut writer = fill_completion.fill(half);
        let filled = writer.insert(rx_frames.iter().copied());
        writer.commit();
        drop(writer);
        let fill_backlog = rx_frames[filled as usize..].to_vec();

        Ok(Self {
            rx,
            tx,
            fill_completion,
            umem,
            tx_free,
            fill_backlog,
            counters: XskCounters::default(),
            area,
        })
    }

    /// The socket's file descriptor, for the XSKMAP and for `poll(2)`.
    pub fn raw_fd(&self) -> i32 {
        self.rx.as_raw_fd()
    }

    /// Counters so far.
    pub fn counters(&self) -> XskCounters {
        self.counters
    }

    /// Reads up to `max` frames, hands each to `handle` and returns them to the fill ring.
    /// Returns the number of frames read.
    pub fn receive(&mut self, max: u32, mut handle: impl FnMut(&[u8])) -> u32 {
        let mut done = 0;
        let mut reader = self.rx.receive(max.min(BATCH));
        while let Some(desc) = reader.read() {
            done += 1;
            let start = desc.addr as usize;
            let end = start.saturating_add(desc.len as usize);
            if end <= self.area.len {
                // SAFETY: the kernel handed this range to us through the RX ring and will not
                // write it until we return the frame through the fill ring below; the bounds
                // were checked against the mapping.
                let frame = unsafe {
                    std::slice::from_raw_parts(self.area.ptr.as_ptr().add(start), desc.len as usize)
                };
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += u64::from(desc.len);
                handle(frame);
            }
            // Any address inside a frame identifies it; return the frame's base.
            self.fill_backlog
                .push(desc.addr & !u64::from(FRAME_SIZE - 1));
        }
        reader.release();
        drop(reader);
        self.refill();
        done
    }

    /// Returns received frames to the kernel.
    fn refill(&mut self) {
        if self.fill_backlog.is_empty() {
            return;
        }
        let mut writer = self.fill_completion.fill(self.fill_backlog.len() as u32);
        let n = writer.insert(self.fill_backlog.iter().copied());
        writer.commit();
        drop(writer);
        self.fill_backlog.drain(..n as usize);
        if self.fill_completion.needs_wakeup() {
            self.fill_completion.wake();
        }
    }

    /// Writes one frame of `len` bytes with `write` into a free TX frame and queues it.
    /// Returns false (and counts it) when no frame is free: the caller drops the frame,
    /// as a NIC with a full ring would.
    pub fn transmit(&mut self, len: usize, write: impl FnOnce(&mut [u8])) -> bool {
        self.reclaim_completed();
        if len > FRAME_SIZE as usize {
            return false;
        }
        let Some(offset) = self.tx_free.pop() else {
            self.counters.tx_full += 1;
            return false;
        };
        // SAFETY: `offset` is a frame we own (from the free list), so the kernel does not
        // touch it until we submit it on the TX ring; offset+len is inside the mapping.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(self.area.ptr.as_ptr().add(offset as usize), len)
        };
        write(buf);
        let desc = xdpilone::xdp::XdpDesc {
            addr: offset,
            len: len as u32,
            options: 0,
        };
        let mut writer = self.tx.transmit(1);
        let queued = writer.insert_once(desc);
        writer.commit();
        drop(writer);
        if !queued {
            self.tx_free.push(offset);
            self.counters.tx_full += 1;
            return false;
        }
        self.counters.tx_frames += 1;
        true
    }

    /// Kicks the kernel to send what is on the TX ring. Copy mode sends a bounded batch per
    /// kick, so this repeats while frames are pending, a bounded number of times.
    pub fn flush(&mut self) {
        for _ in 0..64 {
            if self.tx.pending() == 0 {
                break;
            }
            self.tx.wake();
            self.reclaim_completed();
        }
        self.reclaim_completed();
    }

    /// Moves transmitted frames from the completion ring back to the free list.
    fn reclaim_completed(&mut self) {
        let mut reader = self.fill_completion.complete(BATCH * 4);
        while let Some(addr) = reader.read() {
            self.tx_free.push(addr & !u64::from(FRAME_SIZE - 1));
        }
        reader.release();
    }

    /// Sleeps until frames arrive or `timeout_ms` passes.
    pub fn wait(&self, timeout_ms: i32) {
        let mut fds = libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut fds, 1, timeout_ms) };
    }

    /// Frames queued in the RX ring right now.
    pub fn rx_available(&self) -> u32 {
        self.rx.available()
    }

    /// Number of UMEM frames.
    pub fn frames(&self) -> u32 {
        self.umem.len_frames()
    }
}
