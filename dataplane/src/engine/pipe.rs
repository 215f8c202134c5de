//! An in-memory IP link for tests: two devices whose frames land in each other's queue,
//! so engines (and what is built on them) run without sockets or privileges.

use std::{cell::RefCell, collections::VecDeque, rc::Rc};

use smoltcp::phy::{self, DeviceCapabilities, Medium};

use super::EngineDevice;

/// Packets in flight one way.
pub(crate) type Queue = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// One end of an in-memory IP link.
pub(crate) struct Pipe {
    pub(crate) inbox: Queue,
    pub(crate) outbox: Queue,
    peeked: Option<Vec<u8>>,
    /// The IP MTU the link reports (1500 unless a test sets another).
    pub(crate) mtu: usize,
}

/// Two ends joined to each other.
pub(crate) fn pipe_pair() -> (Pipe, Pipe) {
    let ab: Queue = Rc::default();
    let ba: Queue = Rc::default();
    (
        Pipe {
            inbox: ba.clone(),
            outbox: ab.clone(),
            peeked: None,
            mtu: 1500,
        },
        Pipe {
            inbox: ab,
            outbox: ba,
            peeked: None,
            mtu: 1500,
        },
    )
}

pub(crate) struct PipeRx(Vec<u8>);
pub(crate) struct PipeTx(Queue);

impl phy::RxToken for PipeRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for PipeTx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.borrow_mut().push_back(buf);
        r
    }
}

impl phy::Device for Pipe {
    type RxToken<'a> = PipeRx;
    type TxToken<'a> = PipeTx;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.inbox.borrow_mut().pop_front()?;
        Some((PipeRx(frame), PipeTx(self.outbox.clone())))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(PipeTx(self.outbox.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

impl EngineDevice for Pipe {
    fn peek_packet(&mut self) -> Option<&[u8]> {
        // The queue sits behind a `RefCell`, so no borrow of it can be handed out: a copy
        // of the head packet is, which tests can afford. `receive` still takes the
        // original from the queue.
        self.peeked = self.inbox.borrow().front().cloned();
        self.peeked.as_deref()
    }
}
