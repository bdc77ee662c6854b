//! The tracer core both sides share: starting the program in its own
//! namespaces ([`spawn`]), ptrace control of its threads as types with one
//! typed wait ([`task`]), the seccomp filter ([`seccomp`]), reading and
//! writing the memory the syscall model names ([`mem`]), what an fd is
//! ([`fdclass`]) and the ids the program knows ([`nsid`]).
//!
//! Mechanism only: recording and replay are policies over it (the
//! `hotstandby-recorder` and `hotstandby-replayer` crates). Raw kernel access
//! lives in [`sys`]; each `unsafe` block there says why it holds.

pub mod buffer;
pub mod fdclass;
pub mod mem;
pub mod nsid;
pub mod pin;
pub mod seccomp;
pub mod spawn;
pub mod sys;
pub mod task;

pub use sys::{Regs, SysError};
pub use task::{Running, Stop, Stopped, TaskError, Tid, Waited};

use hotstandby_protocol::shadow::{FdKind, Peek};

pub const ERESTARTSYS: i64 = -512;
pub const ERESTARTNOINTR: i64 = -513;
pub const ERESTARTNOHAND: i64 = -514;
pub const ERESTART_RESTARTBLOCK: i64 = -516;

/// Whether a syscall's return value is one of the kernel's internal
/// "interrupted, restart me" codes, never seen by the program.
pub fn is_restart(ret: i64) -> bool {
    matches!(
        ret,
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
    )
}

/// The memory and fds of a stopped thread, for the shadow state's
/// `effects` (see `hotstandby_protocol::shadow`).
#[derive(Debug)]
pub struct TaskPeek {
    /// The thread (its memory).
    pub tid: Tid,
    /// Its process (its fds), supervisor's id.
    pub tgid: Tid,
}

impl Peek for TaskPeek {
    fn read(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
        sys::read_mem(self.tid, addr, len).ok()
    }

    fn classify(&mut self, fd: i32) -> FdKind {
        fdclass::classify(self.tgid, fd)
    }
}
