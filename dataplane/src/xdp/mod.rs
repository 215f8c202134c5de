//! The kernel-bypass data plane below the replication driver, bottom up:
//!
//! - [`steering`]: the XDP program and its maps (which frames reach the workers);
//! - [`xsk`]: one AF_XDP socket and its UMEM, whose frames only their own socket can use;
//! - [`device`]: a smoltcp device over that socket, doing Ethernet itself;
//! - [`handover`]: which worker owns a frame, the queues between workers, and the device
//!   layer that uses them;
//! - [`layers`]: further device layers (taps, fault injection);
//! - [`kernel_ports`]: whether the kernel may take the workers' upstream ports;
//! - [`neighbours`]: upstream next hops resolved through the kernel's neighbour table;
//! - [`transport`]: a worker's TCP engines as the driver's [`crate::driver::Transport`];
//! - [`worker`]: per-queue worker threads pinned to cores.

pub mod device;
pub mod handover;
pub mod kernel_ports;
pub mod layers;
pub mod neighbours;
pub mod steering;
pub mod transport;
pub mod worker;
pub mod xsk;
