//! Driving the kernel's packet generator (`CONFIG_NET_PKTGEN`) through `/proc/net/pktgen`,
//! for hosts where the module is loaded: it sends from inside the kernel, faster than any
//! user-space back end of `ncp-pktgen`, but only UDP frames, so it measures the pass path
//! and the switch, not steering of a TCP service.
//!
//! The module is controlled by writing one command per `write(2)` to its files: the
//! per-CPU thread file (`kpktgend_N`: which devices it sends from), the device file (what
//! to send) and `pgctrl` (`start` blocks until the run ends). After each command the file
//! reads back `Result: OK: …` or an error text, which is checked. The command list and
//! the parsing are plain functions; the file access goes through [`PktgenFiles`] so they
//! are tested without the module.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// Where the module exposes its files (per network namespace).
pub const PROC_ROOT: &str = "/proc/net/pktgen";

/// What to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPktgenSpec {
    /// Interface to send from.
    pub interface: String,
    /// Kernel pktgen thread (CPU) that sends.
    pub thread: u32,
    /// Frames to send (the module's 0 means forever, which is refused here).
    pub count: u64,
    /// Frame size in bytes without the FCS (60 is the Ethernet minimum).
    pub frame_bytes: u16,
    /// Source IPv4 address.
    pub src_ip: Ipv4Addr,
    /// Destination IPv4 address.
    pub dst_ip: Ipv4Addr,
    /// Destination MAC address.
    pub dst_mac: [u8; 6],
    /// UDP source ports cycled through: first and last.
    pub src_ports: (u16, u16),
    /// UDP destination port.
    pub dst_port: u16,
    /// Frames per second; `None` sends as fast as the device takes them.
    pub rate: Option<u64>,
}

/// A file of the module's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PktgenFile {
    /// `kpktgend_N`: a sending thread.
    Thread(u32),
    /// The device file, named after the interface.
    Device(String),
    /// `pgctrl`: start and stop.
    Control,
}

impl PktgenFile {
    fn name(&self) -> String {
        match self {
            PktgenFile::Thread(n) => format!("kpktgend_{n}"),
            PktgenFile::Device(name) => name.clone(),
            PktgenFile::Control => "pgctrl".to_owned(),
        }
    }
}

/// What one run achieved, as the module reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PktgenResult {
    /// Frames sent.
    pub frames: u64,
    /// Duration of the run in microseconds.
    pub micros: u64,
    /// Frames per second.
    pub frames_per_second: u64,
}

/// Why driving the module failed.
#[derive(Debug, thiserror::Error)]
pub enum PktgenError {
    #[error(
        "the kernel packet generator is not available: {0} does not exist (load it with `modprobe pktgen`; kernels without CONFIG_NET_PKTGEN have none, use `--backend xdp` or `--backend packet` instead)"
    )]
    Missing(PathBuf),
    #[error("pktgen refused `{command}` in {file}: {answer}")]
    Refused {
        file: String,
        command: String,
        answer: String,
    },
    #[error("{0}")]
    BadSpec(String),
    #[error("pktgen's report in {file} has no result this tool can read: {text:?}")]
    Unreadable { file: String, text: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The module's files, behind a seam so the driving logic is testable without it.
pub trait PktgenFiles {
    /// Writes one command to a file (one `write(2)`).
    fn command(&mut self, file: &PktgenFile, command: &str) -> Result<(), PktgenError>;
    /// Reads a file whole.
    fn read(&mut self, file: &PktgenFile) -> Result<String, PktgenError>;
}

/// The real files under [`PROC_ROOT`] (or another root).
pub struct ProcFiles {
    root: PathBuf,
}

impl ProcFiles {
    /// Opens the module's directory, with a clear error when the module is not there.
    pub fn open(root: &Path) -> Result<Self, PktgenError> {
        if !root.join("pgctrl").exists() {
            return Err(PktgenError::Missing(root.to_owned()));
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }
}

impl PktgenFiles for ProcFiles {
    fn command(&mut self, file: &PktgenFile, command: &str) -> Result<(), PktgenError> {
        let path = self.root.join(file.name());
        // One write per command: the module parses each write as one command.
        std::fs::write(&path, command).map_err(|source| PktgenError::Io {
            what: "writing to",
            path,
            source,
        })
    }

    fn read(&mut self, file: &PktgenFile) -> Result<String, PktgenError> {
        let path = self.root.join(file.name());
        std::fs::read_to_string(&path).map_err(|source| PktgenError::Io {
            what: "reading",
            path,
            source,
        })
    }
}

/// The commands that set a run up, in order (the start is separate).
pub fn setup_commands(spec: &KernelPktgenSpec) -> Result<Vec<(PktgenFile, String)>, PktgenError> {
    if spec.count == 0 {
        return Err(PktgenError::BadSpec(
            "count must be at least 1 (the module's 0 would send forever)".into(),
        ));
    }
    if spec.frame_bytes < 60 {
        return Err(PktgenError::BadSpec(format!(
            "frame size {} is below the Ethernet minimum of 60 bytes",
            spec.frame_bytes
        )));
    }
    if spec.src_ports.0 > spec.src_ports.1 {
        return Err(PktgenError::BadSpec(format!(
            "source ports {}..{} run backwards",
            spec.src_ports.0, spec.src_ports.1
        )));
    }
    let thread = PktgenFile::Thread(spec.thread);
    let device = PktgenFile::Device(spec.interface.clone());
    let mac = spec
        .dst_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut commands = vec![
        (thread.clone(), "rem_device_all".to_owned()),
        (thread, format!("add_device {}", spec.interface)),
        (device.clone(), format!("count {}", spec.count)),
        (device.clone(), format!("pkt_size {}", spec.frame_bytes)),
        // One socket buffer sent again and again: the generator's cost, not allocation.
        (device.clone(), "clone_skb 0".to_owned()),
        (device.clone(), format!("src_min {}", spec.src_ip)),
        (device.clone(), format!("src_max {}", spec.src_ip)),
        (device.clone(), format!("dst {}", spec.dst_ip)),
        (device.clone(), format!("dst_mac {mac}")),
        (device.clone(), format!("udp_src_min {}", spec.src_ports.0)),
        (device.clone(), format!("udp_src_max {}", spec.src_ports.1)),
        (device.clone(), format!("udp_dst_min {}", spec.dst_port)),
        (device.clone(), format!("udp_dst_max {}", spec.dst_port)),
    ];
    commands.push(match spec.rate {
        Some(fps) if fps > 0 => (device, format!("ratep {fps}")),
        _ => (device, "delay 0".to_owned()),
    });
    Ok(commands)
}

/// The answer to the last command, from a file's `Result:` line (`None`: no such line).
pub fn last_answer(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("Result:"))
        .map(str::trim)
}

/// Reads a finished run's figures from the device file. The module writes, after a run,
/// `Result: OK: <µs>(c…+d…) usec, <frames> (<size>byte,<frags>frags)` followed by
/// `<pps>pps <Mb>Mb/sec (<bps>bps) errors: <n>`.
pub fn parse_result(text: &str) -> Option<PktgenResult> {
    let answer = last_answer(text)?.strip_prefix("OK:")?.trim();
    let micros: u64 = answer
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let frames: u64 = answer
        .split("usec,")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let frames_per_second = text
        .split_whitespace()
        .find_map(|word| word.strip_suffix("pps")?.parse().ok())
        .unwrap_or_else(|| {
            // Older modules print no rate: derive it.
            (frames as f64 / (micros.max(1) as f64 / 1e6)) as u64
        });
    Some(PktgenResult {
        frames,
        micros,
        frames_per_second,
    })
}

/// Sets a run up, starts it (the start returns when the run has ended), reads the result
/// and removes the device from the thread again.
pub fn run(
    files: &mut impl PktgenFiles,
    spec: &KernelPktgenSpec,
) -> Result<PktgenResult, PktgenError> {
    for (file, command) in setup_commands(spec)? {
        files.command(&file, &command)?;
        let answer = files.read(&file)?;
        match last_answer(&answer) {
            Some(a) if a.starts_with("OK") => {}
            other => {
                return Err(PktgenError::Refused {
                    file: file.name(),
                    command,
                    answer: other.unwrap_or("no Result line").to_owned(),
                });
            }
        }
    }
    let device = PktgenFile::Device(spec.interface.clone());
    let started = files.command(&PktgenFile::Control, "start");
    let report = files.read(&device);
    // Leave the module as found, whatever happened.
    let _ = files.command(&PktgenFile::Thread(spec.thread), "rem_device_all");
    started?;
    let report = report?;
    parse_result(&report).ok_or_else(|| PktgenError::Unreadable {
        file: device.name(),
        text: last_answer(&report).unwrap_or(&report).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec() -> KernelPktgenSpec {
        KernelPktgenSpec {
            interface: "eth0".into(),
            thread: 0,
            count: 100_000,
            frame_bytes: 60,
            src_ip: Ipv4Addr::new(198, 18, 1, 1),
            dst_ip: Ipv4Addr::new(198, 18, 1, 2),
            dst_mac: [2, 0, 0, 0, 4, 1],
            src_ports: (40000, 40007),
            dst_port: 5201,
            rate: None,
        }
    }

    const AFTER_RUN: &str = "Params: count 100000  min_pkt_size: 60  max_pkt_size: 60\n\
        Current:\n     pkts-sofar: 100000  errors: 0\n\
        Result: OK: 123456(c120000+d3456) usec, 100000 (60byte,0frags)\n  \
        810012pps 388Mb/sec (388805760bps) errors: 0\n";

    /// Answers like the module: OK for the commands it knows, an error text otherwise, and
    /// the report of a run after `start`.
    #[derive(Default)]
    struct FakeModule {
        log: Vec<(String, String)>,
        answers: BTreeMap<String, String>,
        known: Vec<&'static str>,
    }

    impl FakeModule {
        fn new() -> Self {
            Self {
                known: vec![
                    "rem_device_all",
                    "add_device",
                    "count",
                    "pkt_size",
                    "clone_skb",
                    "src_min",
                    "src_max",
                    "dst",
                    "dst_mac",
                    "udp_src_min",
                    "udp_src_max",
                    "udp_dst_min",
                    "udp_dst_max",
                    "delay",
                    "ratep",
                    "start",
                ],
                ..Self::default()
            }
        }
    }

    impl PktgenFiles for FakeModule {
        fn command(&mut self, file: &PktgenFile, command: &str) -> Result<(), PktgenError> {
            self.log.push((file.name(), command.to_owned()));
            let verb = command.split_whitespace().next().unwrap_or("");
            let answer = if !self.known.contains(&verb) {
                format!("Result: No such parameter \"{verb}\"\n")
            } else if verb == "start" {
                self.answers.insert("eth0".into(), AFTER_RUN.into());
                return Ok(());
            } else {
                format!("Result: OK: {command}\n")
            };
            self.answers.insert(file.name(), answer);
            Ok(())
        }

        fn read(&mut self, file: &PktgenFile) -> Result<String, PktgenError> {
            Ok(self.answers.get(&file.name()).cloned().unwrap_or_default())
        }
    }

    #[test]
    fn a_run_sets_up_the_device_starts_and_reads_the_rate() {
        let mut module = FakeModule::new();
        let result = run(&mut module, &spec()).expect("the run succeeds");
        assert_eq!(result.frames, 100_000);
        assert_eq!(result.micros, 123_456);
        assert_eq!(result.frames_per_second, 810_012);
        let log: Vec<String> = module
            .log
            .iter()
            .map(|(f, c)| format!("{f}: {c}"))
            .collect();
        assert_eq!(log[0], "kpktgend_0: rem_device_all");
        assert_eq!(log[1], "kpktgend_0: add_device eth0");
        assert!(log.contains(&"eth0: dst_mac 02:00:00:00:04:01".to_owned()));
        assert!(log.contains(&"eth0: udp_src_max 40007".to_owned()));
        assert!(log.contains(&"eth0: delay 0".to_owned()));
        // Started once, and the device is released afterwards.
        let start = log
            .iter()
            .position(|l| l == "pgctrl: start")
            .expect("started");
        assert_eq!(log[start + 1], "kpktgend_0: rem_device_all");
        assert_eq!(log.len(), start + 2);
    }

    #[test]
    fn a_refused_command_is_named_and_nothing_is_started() {
        let mut module = FakeModule::new();
        module.known.retain(|v| *v != "ratep");
        let paced = KernelPktgenSpec {
            rate: Some(10_000),
            ..spec()
        };
        let error = run(&mut module, &paced).expect_err("ratep is refused");
        let text = error.to_string();
        assert!(text.contains("ratep 10000"), "{text}");
        assert!(text.contains("No such parameter"), "{text}");
        assert!(!module.log.iter().any(|(_, c)| c == "start"));
    }

    #[test]
    fn bad_specs_are_refused_before_touching_the_module() {
        for bad in [
            KernelPktgenSpec { count: 0, ..spec() },
            KernelPktgenSpec {
                frame_bytes: 20,
                ..spec()
            },
            KernelPktgenSpec {
                src_ports: (5, 4),
                ..spec()
            },
        ] {
            let mut module = FakeModule::new();
            assert!(matches!(
                run(&mut module, &bad),
                Err(PktgenError::BadSpec(_))
            ));
            assert!(module.log.is_empty());
        }
    }

    #[test]
    fn reports_without_a_result_or_rate_are_handled() {
        assert_eq!(parse_result("Params: count 5\n"), None);
        assert_eq!(parse_result("Result: Idle\n"), None);
        let derived = parse_result("Result: OK: 2000000(c1+d2) usec, 500000 (60byte,0frags)\n")
            .expect("readable");
        assert_eq!(derived.frames_per_second, 250_000);
    }

    #[test]
    fn a_missing_module_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("ncp-no-pktgen-{}", std::process::id()));
        let error = match ProcFiles::open(&dir) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a directory without pgctrl was accepted"),
        };
        assert!(error.contains("modprobe pktgen"), "{error}");
    }
}
