//! What the recorder tells the network side about the program's TCP
//! connections, as a trait: the recorder knows nothing of TCP_REPAIR or of
//! the output rule (`hotstandby-netguard` implements this), and the
//! network side knows nothing of ptrace or logs.

use std::os::fd::BorrowedFd;

use crate::record::TcpConn;

/// The network side of a recording.
pub trait NetObserver: Send + Sync + std::fmt::Debug {
    /// The program accepted a connection: `sock` is the supervisor's
    /// duplicate of its fd `fd` (thread `tid`). The TCP state a standby
    /// needs to rebuild it, or `None` when the socket is not TCP.
    fn capture(&self, sock: BorrowedFd<'_>, tid: u32, fd: i32) -> Result<Option<TcpConn>, String>;
    /// The captured connection is in the log.
    fn accepted(&self, conn: &TcpConn);
    /// The program read or wrote `n` bytes on `conn`; the record saying so
    /// ends at log byte `log_offset`.
    fn io(&self, conn: &TcpConn, wrote: bool, n: u64, log_offset: u64);
    /// The program closed or shut down `conn` (`None`: every connection,
    /// the program is exiting).
    fn closed(&self, conn: Option<&TcpConn>, log_offset: u64);
    /// The program listens on `sock` (the supervisor's duplicate).
    fn listening(&self, sock: BorrowedFd<'_>);
    /// A connection carried over a takeover, with what was read and
    /// written on it so far.
    fn adopt(&self, conn: &TcpConn, written: u64, read: u64);
    /// A listening port carried over a takeover.
    fn listening_port(&self, port: u16);
    /// Whether the program's output waits for the log to reach the standby
    /// (an output rule). Then a thread that wrote to a socket through its
    /// syscall buffer logs the batch at its next `epoll_wait` instead of
    /// when it next blocks, so the held reply is not kept waiting on the
    /// program's next idle moment.
    fn holds_output(&self) -> bool {
        false
    }
}
