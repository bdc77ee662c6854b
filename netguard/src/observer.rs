//! The recorder's network side ([`NetObserver`]): captures the TCP state
//! of each accepted connection and, with an output rule in force, tells
//! the [`Gate`] what the program read, wrote and closed.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use hotstandby_protocol::observe::NetObserver;
use hotstandby_protocol::record::TcpConn;

use crate::gate::{key_of, Gate};
use crate::tcp;

/// Connection capture, and the output rule's gate if there is one.
#[derive(Debug, Default)]
pub struct Observer {
    pub gate: Option<Arc<Gate>>,
}

impl Observer {
    pub fn new(gate: Option<Arc<Gate>>) -> Arc<Self> {
        Arc::new(Observer { gate })
    }
}

impl NetObserver for Observer {
    fn holds_output(&self) -> bool {
        self.gate.is_some()
    }

    fn capture(&self, sock: BorrowedFd<'_>, tid: u32, fd: i32) -> Result<Option<TcpConn>, String> {
        if !tcp::is_tcp(sock) {
            return Ok(None);
        }
        tcp::capture(sock, tid, fd)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn accepted(&self, c: &TcpConn) {
        if let (Some(g), Some(k)) = (&self.gate, key_of(&c.local, &c.remote)) {
            g.accepted(k, c.snd_base, c.rcv_base);
        }
    }

    fn io(&self, c: &TcpConn, wrote: bool, n: u64, log_offset: u64) {
        if let (Some(g), Some(k)) = (&self.gate, key_of(&c.local, &c.remote)) {
            g.io(k, wrote, n, log_offset);
        }
    }

    fn closed(&self, c: Option<&TcpConn>, log_offset: u64) {
        let Some(g) = &self.gate else {
            return;
        };
        match c {
            None => g.closed(None, log_offset),
            Some(c) => {
                if let Some(k) = key_of(&c.local, &c.remote) {
                    g.closed(Some(k), log_offset);
                }
            }
        }
    }

    fn listening(&self, sock: BorrowedFd<'_>) {
        if let (Some(g), Some(p)) = (&self.gate, tcp::local_port(sock)) {
            g.listening(p);
        }
    }

    fn adopt(&self, c: &TcpConn, written: u64, read: u64) {
        if let (Some(g), Some(k)) = (&self.gate, key_of(&c.local, &c.remote)) {
            g.adopt(k, c.snd_base, c.rcv_base, written, read);
        }
    }

    fn listening_port(&self, port: u16) {
        if let Some(g) = &self.gate {
            g.listening(port);
        }
    }
}
