//! A layer that damages the packets a device receives, deterministically: drops,
//! duplicates and reorders a chosen fraction of them (by a seeded random draw) or exactly
//! the ones a script names, so tests can exercise loss recovery and out-of-order
//! delivery and get the same run every time. Wrap the receiving end of a link to damage
//! what its peer sends.
//!
//! Received packets are copied out of the device below into the layer's own queue (the
//! damage needs packets it can hold back or repeat); meant for tests, not the data path.

use std::collections::{BTreeMap, VecDeque};

use smoltcp::{
    phy::{self, Device},
    time::Instant,
};

use super::forward_to_inner;
use crate::engine::EngineDevice;

/// What happens to one received packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Never delivered.
    Drop,
    /// Delivered twice in a row.
    Duplicate,
    /// Delivered after the next packet (or at the end of the round when none follows).
    Delay,
}

/// Which packets to damage. Fractions are probabilities per packet, drawn in this order
/// from one seeded generator; a scripted fault replaces the draw for its packet.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Seed of the random draws: the same seed and traffic give the same faults.
    pub seed: u64,
    /// Fraction of packets dropped.
    pub drop: f64,
    /// Fraction of packets duplicated.
    pub duplicate: f64,
    /// Fraction of packets delayed past the next one.
    pub delay: f64,
    /// Faults for exact packets, by their index among received packets (0-based).
    pub script: BTreeMap<u64, Fault>,
}

impl FaultPlan {
    /// A plan that only applies `script`.
    pub fn scripted(script: impl IntoIterator<Item = (u64, Fault)>) -> Self {
        Self {
            script: script.into_iter().collect(),
            ..Self::default()
        }
    }
}

/// What the layer did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Packets taken from the device below.
    pub seen: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Packets duplicated.
    pub duplicated: u64,
    /// Packets delayed.
    pub delayed: u64,
}

/// SplitMix64: tiny, seedable and good enough to pick packets; not for secrets.
#[derive(Clone, Debug)]
struct SeededRng(u64);

impl SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Wraps a device and damages what it receives according to a [`FaultPlan`].
#[derive(Debug)]
pub struct Faults<D> {
    inner: D,
    plan: FaultPlan,
    rng: SeededRng,
    /// Packets to deliver, in order.
    ready: VecDeque<Vec<u8>>,
    /// A delayed packet waiting for the next one.
    delayed: Option<Vec<u8>>,
    counters: FaultCounters,
    /// The time of the engine's last call, used to pull packets while peeking (the
    /// device below takes a timestamp there; the ones in use ignore it).
    now: Instant,
}

impl<D> Faults<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, plan: FaultPlan) -> Self {
        Self {
            inner,
            rng: SeededRng(plan.seed),
            plan,
            ready: VecDeque::new(),
            delayed: None,
            counters: FaultCounters::default(),
            now: Instant::ZERO,
        }
    }

    /// What was done so far.
    pub fn counters(&self) -> FaultCounters {
        self.counters
    }

    /// The device underneath.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The device underneath, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    /// The fate of the next packet: its scripted fault, else a draw.
    fn fate(&mut self) -> Option<Fault> {
        let index = self.counters.seen;
        self.counters.seen += 1;
        // Drawn for every packet, so adding a scripted fault does not shift the others.
        let draw = self.rng.unit();
        if let Some(fault) = self.plan.script.get(&index) {
            return Some(*fault);
        }
        let plan = &self.plan;
        if draw < plan.drop {
            Some(Fault::Drop)
        } else if draw < plan.drop + plan.duplicate {
            Some(Fault::Duplicate)
        } else if draw < plan.drop + plan.duplicate + plan.delay {
            Some(Fault::Delay)
        } else {
            None
        }
    }
}

impl<D: EngineDevice> Faults<D> {
    /// Takes packets from below until one is ready to deliver or none is left.
    fn pull(&mut self) {
        while self.ready.is_empty() {
            // The transmit token that comes along is not needed: dropping it unused sends
            // nothing.
            let Some((rx, _)) = self.inner.receive(self.now) else {
                return;
            };
            let packet = phy::RxToken::consume(rx, <[u8]>::to_vec);
            match self.fate() {
                Some(Fault::Drop) => self.counters.dropped += 1,
                Some(Fault::Duplicate) => {
                    self.counters.duplicated += 1;
                    self.ready.push_back(packet.clone());
                    self.ready.push_back(packet);
                }
                Some(Fault::Delay) if self.delayed.is_none() => {
                    self.counters.delayed += 1;
                    self.delayed = Some(packet);
                }
                Some(Fault::Delay) | None => {
                    self.ready.push_back(packet);
                    self.ready.extend(self.delayed.take());
                }
            }
        }
    }
}

/// A packet the layer lets through.
pub struct FaultRx(Vec<u8>);

impl phy::RxToken for FaultRx {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl<D: EngineDevice> Device for Faults<D> {
    type RxToken<'a>
        = FaultRx
    where
        Self: 'a;
    forward_to_inner!(type TxToken of D);

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.now = timestamp;
        self.pull();
        if self.ready.is_empty() {
            return None;
        }
        // The answer needs a transmit token; without one the packet waits.
        let tx = self.inner.transmit(timestamp)?;
        let packet = self.ready.pop_front()?;
        Some((FaultRx(packet), tx))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.now = timestamp;
        self.inner.transmit(timestamp)
    }

    forward_to_inner!(capabilities);
}

impl<D: EngineDevice> EngineDevice for Faults<D> {
    forward_to_inner!(start_round, poll_at);

    /// Ends the round below, and releases a delayed packet no other one followed.
    fn flush(&mut self) {
        self.inner.flush();
        self.ready.extend(self.delayed.take());
    }

    fn peek_packet(&mut self) -> Option<&[u8]> {
        self.pull();
        self.ready.front().map(Vec::as_slice)
    }

    forward_to_inner!(readiness_fd);
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant as StdInstant};

    use super::*;
    use crate::{
        engine::{
            EngineEvent,
            pipe::{Pipe, pipe_pair},
        },
        xdp::layers::test_scene::{SERVER, engines},
    };

    /// Queues packets 0..n (one byte each, its number) into a pipe wrapped in faults.
    fn faulty_pipe(n: u8, plan: FaultPlan) -> Faults<Pipe> {
        let (sender, receiver) = pipe_pair();
        for i in 0..n {
            sender.outbox.borrow_mut().push_back(vec![i]);
        }
        Faults::new(receiver, plan)
    }

    fn receive_all(device: &mut Faults<Pipe>) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            let peeked = device.peek_packet().map(<[u8]>::to_vec);
            let Some((rx, _)) = device.receive(Instant::ZERO) else {
                break;
            };
            let packet = phy::RxToken::consume(rx, <[u8]>::to_vec);
            assert_eq!(peeked.as_ref(), Some(&packet), "peek shows what comes next");
            got.extend(packet);
        }
        device.flush();
        got
    }

    #[test]
    fn scripted_faults_hit_exactly_their_packets() {
        let plan = FaultPlan::scripted([
            (1, Fault::Drop),
            (3, Fault::Duplicate),
            (4, Fault::Delay),
            (7, Fault::Delay),
        ]);
        let mut device = faulty_pipe(8, plan);
        assert_eq!(receive_all(&mut device), [0, 2, 3, 3, 5, 4, 6]);
        // The last delayed packet had no successor: it comes after the round ends.
        assert_eq!(receive_all(&mut device), [7]);
        let counters = device.counters();
        assert_eq!(
            counters,
            FaultCounters {
                seen: 8,
                dropped: 1,
                duplicated: 1,
                delayed: 2
            }
        );
    }

    #[test]
    fn drawn_faults_follow_the_seed_and_the_fractions() {
        let plan = FaultPlan {
            seed: 7,
            drop: 0.2,
            duplicate: 0.1,
            ..FaultPlan::default()
        };
        let run = |plan: FaultPlan| {
            let mut device = faulty_pipe(200, plan);
            (receive_all(&mut device), device.counters())
        };
        let (first, counters) = run(plan.clone());
        assert_eq!(run(plan.clone()).0, first, "the same seed, the same damage");
        assert_ne!(run(FaultPlan { seed: 8, ..plan }).0, first);
        assert!((20..=60).contains(&counters.dropped), "{counters:?}");
        assert!((5..=35).contains(&counters.duplicated), "{counters:?}");
        let expected = 200 - counters.dropped + counters.duplicated;
        assert_eq!(first.len() as u64, expected);
    }

    /// A transfer through a link that loses, duplicates and reorders packets still
    /// arrives whole: the engine's recovery at work, on a simulated clock.
    #[test]
    fn an_engine_recovers_from_scripted_and_random_damage() {
        let plan = FaultPlan {
            seed: 42,
            drop: 0.05,
            duplicate: 0.05,
            delay: 0.05,
            // The first packet after the handshake (SYN, ACK) is lost for sure.
            script: [(2, Fault::Drop)].into(),
        };
        let (mut client, mut receiver) = engines(|end| Faults::new(end, plan));
        let conn = client.connect(SERVER).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut sent, mut received) = (0, Vec::new());
        let mut now = StdInstant::now();
        let mut events = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        for _ in 0..200_000 {
            events.clear();
            client.poll(now, &mut events);
            if sent < data.len() {
                sent += client.send(conn, &data[sent..]).unwrap_or(0);
            }
            events.clear();
            receiver.poll(now, &mut events);
            for event in &events {
                if let EngineEvent::Readable { conn } = *event {
                    while let Ok(n @ 1..) = receiver.recv(conn, &mut buf) {
                        received.extend_from_slice(&buf[..n]);
                    }
                }
            }
            if received.len() == data.len() {
                break;
            }
            now += Duration::from_millis(5);
        }
        assert!(
            received == data,
            "{} of {} bytes",
            received.len(),
            data.len()
        );
        let counters = receiver.device().counters();
        assert!(
            counters.dropped >= 1 && counters.duplicated >= 1,
            "{counters:?}"
        );
    }
}
