//! Every raw system call of the data plane, each behind a safe wrapper that checks its
//! result. The rest of the crate never calls `libc` functions directly, so the unsafe
//! surface to review is this file plus the UMEM accesses in [`crate::xdp::xsk`].
//!
//! - [`Mapping`]: anonymous, page-aligned memory (the UMEM);
//! - [`PollSet`] and [`wait_readable`]: `poll(2)`, with `EINTR` turned into an early
//!   return and every other failure surfaced;
//! - [`EventFd`]: the hand-over wake-up between workers;
//! - [`interface_mac`], [`interface_index`], [`PacketSocket`]: interface facts and the
//!   packet generator's raw socket;
//! - [`raise_memlock_limit`]: lifting `RLIMIT_MEMLOCK` for UMEM registration.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr::NonNull,
};

/// The error of the last failed call, with what was being done.
fn last_error(what: &str) -> io::Error {
    let os = io::Error::last_os_error();
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

/// Anonymous, private, page-aligned read-write memory, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes (populated up front, so the data path never page-faults on them).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty mapping",
            ));
        }
        // SAFETY: an anonymous private mapping with no address hint and no file: it cannot
        // alias any memory Rust knows about, and MAP_FAILED is checked below.
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
            return Err(last_error("mapping UMEM memory"));
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    /// Where the mapping starts.
    pub fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: `anonymous` refuses a zero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole mapping as a raw slice pointer (for registering it with the kernel).
    pub fn as_slice_ptr(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `anonymous` mapped, once. Owners of a Mapping
        // drop it only after everything that points into it (see `XskSocket`'s field
        // order). munmap of a valid mapping cannot fail; if it did, the memory would only
        // leak, so the result is not acted on.
        let _ = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Descriptors to wait on for readability, reusable across waits without allocating.
#[derive(Debug, Default)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
}

impl PollSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every descriptor (keeps the allocation).
    pub fn clear(&mut self) {
        self.fds.clear();
    }

    /// Adds a descriptor to wait on for input. The caller keeps it open until the next
    /// [`PollSet::clear`] (a closed descriptor is reported as `POLLNVAL`, not UB).
    pub fn add(&mut self, fd: BorrowedFd<'_>) {
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }

    /// Sleeps until a descriptor is readable or `timeout_ms` passes (negative: no
    /// timeout). Returns how many are ready; an interrupted wait (`EINTR`) returns 0, as
    /// every caller loops around and re-checks its state anyway. Other failures are
    /// returned.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<usize> {
        let count = libc::nfds_t::try_from(self.fds.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
        // SAFETY: `fds` is an initialised array of `count` pollfds that lives, unaliased,
        // for the duration of the call; poll(2) writes only their `revents`.
        let ready = unsafe { libc::poll(self.fds.as_mut_ptr(), count, timeout_ms) };
        if ready >= 0 {
            return Ok(usize::try_from(ready).unwrap_or(0));
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(err)
        }
    }
}

/// Sleeps until `fd` is readable or `timeout_ms` passes. Returns whether it is readable.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut set = PollSet::new();
    set.add(fd);
    Ok(set.wait(timeout_ms)? > 0)
}

/// A non-blocking eventfd: a counter another thread bumps to make it readable.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) takes plain integers and touches no memory of ours.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(last_error("creating an eventfd"));
        }
        // SAFETY: `fd` was just returned by eventfd(2), is open, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Adds one to the counter, making the descriptor readable. A full counter
    /// (`EAGAIN`) counts as success: the descriptor is readable already.
    pub fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live u64 to a descriptor this struct owns.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
        nothing_to_do_is_fine(n)
    }

    /// Resets the counter, so the descriptor is no longer readable. Nothing pending
    /// (`EAGAIN`) counts as success.
    pub fn drain(&self) -> io::Result<()> {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from a descriptor this struct owns.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut count).cast(), 8) };
        nothing_to_do_is_fine(n)
    }
}

/// The result of an eventfd read or write: `EAGAIN` means the counter is already where
/// the call wanted it (full, or empty), so it counts as success.
fn nothing_to_do_is_fine(n: isize) -> io::Result<()> {
    if n >= 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(())
    } else {
        Err(err)
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The MAC address of interface `name` in the calling thread's network namespace.
pub fn interface_mac(name: &str) -> io::Result<[u8; 6]> {
    let bytes = name.as_bytes();
    // SAFETY: `ifreq` is a plain C struct of integers and arrays, for which all zeroes is
    // a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // The name stays NUL-terminated: it is shorter than the zeroed array.
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) takes plain integers and touches no memory of ours.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_error("opening a socket for SIOCGIFHWADDR"));
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it; it is closed
    // when this goes out of scope.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name from and writes the address
    // into the `ifreq` we pass, which is live and exclusively ours for the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if rc < 0 {
        return Err(last_error(&format!("reading the MAC of {name}")));
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union's active member is the hardware
    // address; reading a plain array of integers out of it is valid either way.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL"))?;
    // SAFETY: `c_name` is a live NUL-terminated string; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(last_error(&format!("no interface named {name}")));
    }
    Ok(index)
}

/// A raw AF_PACKET socket that sends whole Ethernet frames out of one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
}

impl PacketSocket {
    /// Opens the socket for `interface` (needs `CAP_NET_RAW`).
    pub fn open(interface: &str) -> io::Result<Self> {
        let ifindex = interface_index(interface)?;
        // SAFETY: socket(2) takes plain integers and touches no memory of ours.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(last_error("opening an AF_PACKET socket (needs root)"));
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `sockaddr_ll` is a plain C struct of integers and arrays, for which all
        // zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = i32::try_from(ifindex)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index"))?;
        addr.sll_halen = 6;
        Ok(Self { fd, addr })
    }

    /// Sends one frame; retries while the device queue is full (`ENOBUFS`, `EAGAIN`).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `frame` is readable for `frame.len()` bytes and `addr` is a live
            // sockaddr_ll of the size passed; sendto(2) only reads both.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const self.addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOBUFS)
                || err.kind() == io::ErrorKind::WouldBlock
                || err.kind() == io::ErrorKind::Interrupted
            {
                std::thread::yield_now();
                continue;
            }
            return Err(err);
        }
    }
}

/// AF_XDP UMEMs count against `RLIMIT_MEMLOCK` on older kernels: lifts it to unlimited.
/// Fails without `CAP_SYS_RESOURCE` when the hard limit is lower.
pub fn raise_memlock_limit() -> io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit(2) only reads the live rlimit we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(last_error("raising RLIMIT_MEMLOCK"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eventfd_wakes_a_poll_and_drains() {
        let event = EventFd::new().unwrap();
        assert!(!wait_readable(event.as_fd(), 0).unwrap(), "fresh");
        event.signal().unwrap();
        event.signal().unwrap();
        assert!(wait_readable(event.as_fd(), 0).unwrap(), "signalled");
        event.drain().unwrap();
        assert!(!wait_readable(event.as_fd(), 0).unwrap(), "drained");
        event.drain().unwrap();
    }

    #[test]
    fn a_poll_set_reports_only_ready_descriptors() {
        let (a, b) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        let mut set = PollSet::new();
        set.add(a.as_fd());
        set.add(b.as_fd());
        assert_eq!(set.wait(0).unwrap(), 0);
        b.signal().unwrap();
        assert_eq!(set.wait(0).unwrap(), 1);
        set.clear();
        set.add(a.as_fd());
        assert_eq!(set.wait(0).unwrap(), 0, "only a left in the set");
    }

    #[test]
    fn mappings_and_interface_lookups_check_their_input() {
        let mapping = Mapping::anonymous(8192).unwrap();
        assert_eq!(mapping.len(), 8192);
        assert!(Mapping::anonymous(0).is_err());
        let loopback = interface_index("lo");
        assert!(
            loopback.is_ok_and(|i| i > 0),
            "lo exists in every namespace"
        );
        assert!(interface_index("no-such-if0").is_err());
        assert!(interface_mac("").is_err());
    }
}
