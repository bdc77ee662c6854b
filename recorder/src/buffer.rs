//! The in-process syscall buffer while recording (the library is
//! `tracer/preload/hsbuf.c`, its layout `hotstandby_tracer::buffer`): a
//! thread's buffered calls are taken and logged as one `Batch` before any
//! event of that thread is logged; the library's table of which fds it may
//! buffer on is kept up to date from the shadow state; a thread that makes
//! only buffered calls is asked to make a traced one when a signal waits
//! or another thread wants to run. Mirror: `hotstandby_replayer::buffer`.

use hotstandby_protocol::record::{BufCall, Event};
use hotstandby_protocol::shadow::{self, Change, FdKind};
use hotstandby_tracer::buffer::{self, Buffer};
use hotstandby_tracer::{Stopped, Tid};

use crate::record::{RecordError, Recorder};

/// Per process: where its fd table is in its memory.
pub type FdTabs = std::collections::HashMap<u32, u64>;

impl From<buffer::BufferError> for RecordError {
    fn from(e: buffer::BufferError) -> Self {
        RecordError::Buffer(e.to_string())
    }
}

/// The fd-table entries of fds `fds` of a process, from the shadow state.
pub fn entries<T: Clone>(
    shadow: &shadow::Shadow<T>,
    ns_tgid: u32,
    pid: Tid,
    fds: impl IntoIterator<Item = i32>,
) -> Vec<(i32, u8)> {
    fds.into_iter()
        .filter(|fd| *fd >= 0 && (*fd as usize) < buffer::FDTAB)
        .map(|fd| {
            let external = shadow.kind(ns_tgid, fd) == Some(FdKind::External);
            (fd, buffer::fd_entry(pid, fd, external))
        })
        .collect()
}

/// The fds a change touched (whose table entries must be computed again),
/// or `None` for "all of them".
pub fn touched(c: &Change) -> Option<Vec<i32>> {
    match c {
        Change::NewFd { fd, .. } | Change::Close { fd } => Some(vec![*fd]),
        Change::Dup { to, .. } => Some(vec![*to]),
        Change::CloseRange { lo, hi } => {
            let hi = (*hi).min(buffer::FDTAB as u32 - 1);
            Some((*lo..=hi.max(*lo)).map(|f| f as i32).collect())
        }
        Change::Exec { .. } | Change::Fork { .. } | Change::Gone => None,
        Change::SigAction { .. } | Change::Io { .. } | Change::Shutdown { .. } => Some(vec![]),
    }
}

impl Recorder {
    /// Log the calls thread `t` made through its buffer since its last
    /// event, as one batch, and apply their effects. Called before any
    /// event of `t` is logged.
    pub(crate) fn flush(&mut self, t: Tid) -> Result<(), RecordError> {
        let Some(buf) = self.th(t).buf else {
            return Ok(());
        };
        let calls = buf.take(t)?;
        if calls.is_empty() {
            return Ok(());
        }
        let ns_tgid = self.th(t).ns_tgid;
        let calls: Vec<BufCall> = calls
            .into_iter()
            .map(|c| BufCall {
                nr: c.nr,
                flags: c.flags,
                extra: c.extra,
                fd: c.fd,
                ret: c.ret,
                hash: c.hash,
                data: c.data,
            })
            .collect();
        let mut notes = Vec::new();
        for c in &calls {
            for ch in shadow::buffered_effects(c) {
                notes.extend(self.shadow.apply(ns_tgid, ch));
            }
        }
        self.log.event(Event::batch(self.ns(t), &calls))?;
        self.net_notes(notes);
        Ok(())
    }

    /// A thread registers its buffer (`hotstandby_buffer(addr, size, fdtab,
    /// n)`): answered 0 and the buffer put in record mode, or `-ENOSYS`
    /// (the library then traces everything) when recording without it.
    pub(crate) fn register(&mut self, s: &Stopped, args: &[u64; 6]) -> Result<i64, RecordError> {
        let t = s.tid();
        if !self.buffering
            || args[1] as usize != buffer::BUF_SIZE
            || args[3] as usize != buffer::FDTAB
        {
            return Ok(-(libc::ENOSYS as i64));
        }
        let b = Buffer::register(t, args[0], buffer::MODE_RECORD)?;
        if self.net.as_ref().is_some_and(|n| n.holds_output()) {
            b.set_eager(t, true)?;
        }
        self.th(t).buf = Some(b);
        let (tgid, ns_tgid) = (self.th(t).tgid, self.th(t).ns_tgid);
        self.fdtabs.insert(ns_tgid, args[2]);
        let fds: Vec<i32> = self
            .shadow
            .process(ns_tgid)
            .map(|p| p.fds.keys().copied().collect())
            .unwrap_or_default();
        for (fd, e) in entries(&self.shadow, ns_tgid, tgid, fds) {
            buffer::set_fd(tgid, args[2], fd, e)?;
        }
        Ok(0)
    }

    /// Keep the library's fd table right after changes to a process's fds
    /// (and after `fcntl`/`ioctl`, which may change O_NONBLOCK).
    pub(crate) fn fd_sync(&mut self, t: Tid, fds: Vec<i32>) -> Result<(), RecordError> {
        let (tgid, ns_tgid) = (self.th(t).tgid, self.th(t).ns_tgid);
        let Some(tab) = self.fdtabs.get(&ns_tgid).copied() else {
            return Ok(());
        };
        for (fd, e) in entries(&self.shadow, ns_tgid, tgid, fds) {
            buffer::set_fd(tgid, tab, fd, e)?;
        }
        Ok(())
    }

    /// Ask the running thread to come to a traced boundary at its next
    /// buffered call (a signal waits, or another thread became runnable).
    pub(crate) fn nudge(&mut self, t: Tid) {
        if let Some(b) = self.threads.get(&t).and_then(|th| th.buf) {
            let _ = b.force(t);
        }
    }
}
