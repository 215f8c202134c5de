//! `ncp-pktgen`: a small packet generator. Frames are built in user space and sent from
//! one interface, as fast as possible or at a fixed rate, and the achieved rate is
//! reported. Back ends: an AF_PACKET socket (one `sendto` per frame; works anywhere), an
//! AF_XDP socket (frames written into a UMEM and sent in batches; the faster one where
//! AF_XDP is available), and the kernel's own pktgen module driven through
//! `/proc/net/pktgen` where it is loaded (UDP frames only).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use ncp_dataplane::{
    frame::{Malformation, TcpFrameSpec, malformed_frame, tcp_frame},
    sys::{PacketSocket, interface_mac},
};

/// Send TCP frames (or deliberately malformed ones) out of an interface.
///
/// Example, from inside a test-bed host:
///   ip netns exec ncp-source ncp-pktgen --interface eth0 --dst-mac 02:00:00:00:04:01 \
///       --src-ip 198.18.1.1 --dst-ip 198.18.1.2 --dst-port 5201 --count 100000
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Interface to send from.
    #[arg(long)]
    interface: String,
    /// Destination MAC address (aa:bb:cc:dd:ee:ff).
    #[arg(long, value_parser = parse_mac)]
    dst_mac: [u8; 6],
    /// Source MAC address; defaults to the interface's own.
    #[arg(long, value_parser = parse_mac)]
    src_mac: Option<[u8; 6]>,
    /// Source IPv4 address.
    #[arg(long)]
    src_ip: Ipv4Addr,
    /// Destination IPv4 address.
    #[arg(long)]
    dst_ip: Ipv4Addr,
    /// Source TCP port (successive frames count up from here over --flows ports).
    #[arg(long, default_value_t = 40000)]
    src_port: u16,
    /// Destination TCP port.
    #[arg(long, default_value_t = 5201)]
    dst_port: u16,
    /// Number of distinct source ports to cycle through.
    #[arg(long, default_value_t = 1)]
    flows: u16,
    /// Frames to send.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// TCP payload bytes per frame.
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// Frames per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Send this kind of malformed frame instead of valid segments.
    #[arg(long, value_enum)]
    malformed: Option<Malformation>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// How frames are sent.
    #[arg(long, value_enum, default_value_t = Backend::Packet)]
    backend: Backend,
    /// Transmit queue for the AF_XDP back end.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Kernel pktgen thread (CPU) that sends, for `--backend kernel`.
    #[arg(long, default_value_t = 0)]
    kernel_thread: u32,
}

/// Sending back ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// AF_PACKET raw socket, one system call per frame.
    Packet,
    /// AF_XDP socket in copy mode, batched kicks.
    Xdp,
    /// The kernel's pktgen module through /proc/net/pktgen (needs `modprobe pktgen`); it
    /// sends UDP frames to --dst-port from --flows source ports.
    Kernel,
}

/// Anything that can put one frame on the wire.
trait FrameSink {
    fn send(&mut self, frame: &[u8]) -> anyhow::Result<()>;
    /// Pushes out whatever is still queued.
    fn finish(&mut self) {}
}

impl FrameSink for PacketSocket {
    fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        PacketSocket::send(self, frame).map_err(Into::into)
    }
}

/// AF_XDP transmit: frames are copied into free UMEM frames and the kernel is kicked
/// every batch (copy mode sends at most 32 frames per kick).
struct XdpSink {
    socket: ncp_dataplane::xdp::xsk::XskSocket,
    queued: u32,
}

impl FrameSink for XdpSink {
    fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        let mut spins = 0u32;
        while !self
            .socket
            .transmit(frame.len(), |buf| buf.copy_from_slice(frame))
        {
            // Ring full or no free frame: let the kernel drain, then retry (bounded).
            self.socket.kick_tx();
            spins += 1;
            if spins > 1_000_000 {
                bail!("AF_XDP transmit ring made no progress");
            }
            std::hint::spin_loop();
        }
        self.queued += 1;
        if self.queued >= 64 {
            self.socket.kick_tx();
            self.queued = 0;
        }
        Ok(())
    }

    fn finish(&mut self) {
        for _ in 0..10_000 {
            self.socket.kick_tx();
            if self.socket.tx().pending() == 0 {
                break;
            }
            std::thread::yield_now();
        }
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("`{s}` is not a MAC address"))?;
    }
    Ok(mac)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.flows == 0 {
        bail!("--flows must be at least 1");
    }
    if args.backend == Backend::Kernel {
        return run_kernel(&args);
    }
    let packet = PacketSocket::open(&args.interface)?;
    let src_mac = match args.src_mac {
        Some(mac) => mac,
        None => interface_mac(&args.interface)?,
    };
    let mut sink: Box<dyn FrameSink> = match args.backend {
        Backend::Kernel => unreachable!("the kernel back end returns before any socket opens"),
        Backend::Packet => Box::new(packet),
        Backend::Xdp => {
            let socket =
                ncp_dataplane::xdp::xsk::XskSocket::open(&ncp_dataplane::xdp::xsk::XskOptions {
                    interface: args.interface.clone(),
                    queue: args.queue,
                    frames: 4096,
                    zero_copy: false,
                })
                .with_context(|| {
                    format!(
                        "opening an AF_XDP socket on {} queue {}",
                        args.interface, args.queue
                    )
                })?;
            Box::new(XdpSink { socket, queued: 0 })
        }
    };
    let payload = vec![0x5a; args.payload];
    let frames: Vec<Vec<u8>> = (0..args.flows)
        .map(|i| {
            let spec = TcpFrameSpec {
                src_mac,
                dst_mac: args.dst_mac,
                src_ip: args.src_ip,
                dst_ip: args.dst_ip,
                src_port: args.src_port.wrapping_add(i),
                dst_port: args.dst_port,
                flags: 0x10,
                seq: 1,
            };
            match args.malformed {
                Some(kind) => malformed_frame(&spec, kind),
                None => tcp_frame(&spec, &payload),
            }
        })
        .collect();

    let start = Instant::now();
    let gap = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut bytes = 0u64;
    for i in 0..args.count {
        if let Some(gap) = gap {
            let due = start + gap.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let frame = &frames[(i % u64::from(args.flows)) as usize];
        sink.send(frame)
            .with_context(|| format!("sending frame {i} on {}", args.interface))?;
        bytes += frame.len() as u64;
    }
    sink.finish();
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let fps = args.count as f64 / secs;
    if args.json {
        println!(
            "{{\"frames\":{},\"bytes\":{bytes},\"seconds\":{secs:.6},\"frames_per_second\":{fps:.0}}}",
            args.count
        );
    } else {
        println!(
            "sent {} frames ({bytes} bytes) in {secs:.3} s: {fps:.0} frames/s",
            args.count
        );
    }
    Ok(())
}

/// `--backend kernel`: the same traffic shape from the kernel's pktgen (UDP instead of TCP).
fn run_kernel(args: &Args) -> anyhow::Result<()> {
    use ncp_dataplane::kernel_pktgen::{self, KernelPktgenSpec, ProcFiles};
    if args.malformed.is_some() {
        bail!(
            "--malformed needs a user-space back end (--backend packet or xdp): the kernel's pktgen only builds valid UDP frames"
        );
    }
    // Ethernet 14 + IPv4 20 + UDP 8 bytes of headers; the module pads to 60.
    let frame_bytes =
        u16::try_from((42 + args.payload).max(60)).context("--payload too large for one frame")?;
    let last_port = args
        .src_port
        .checked_add(args.flows - 1)
        .context("--src-port + --flows runs past port 65535")?;
    let spec = KernelPktgenSpec {
        interface: args.interface.clone(),
        thread: args.kernel_thread,
        count: args.count,
        frame_bytes,
        src_ip: args.src_ip,
        dst_ip: args.dst_ip,
        dst_mac: args.dst_mac,
        src_ports: (args.src_port, last_port),
        dst_port: args.dst_port,
        rate: (args.rate > 0).then_some(args.rate),
    };
    let mut files = ProcFiles::open(std::path::Path::new(kernel_pktgen::PROC_ROOT))?;
    let result = kernel_pktgen::run(&mut files, &spec)?;
    let secs = result.micros as f64 / 1e6;
    let bytes = result.frames * u64::from(frame_bytes);
    if args.json {
        println!(
            "{{\"frames\":{},\"bytes\":{bytes},\"seconds\":{secs:.6},\"frames_per_second\":{}}}",
            result.frames, result.frames_per_second
        );
    } else {
        println!(
            "kernel pktgen sent {} frames ({bytes} bytes) in {secs:.3} s: {} frames/s",
            result.frames, result.frames_per_second
        );
    }
    Ok(())
}
