//! The in-process syscall buffer on replay: before a thread runs user code,
//! the batch it will use up before its next event is written into its
//! buffer (so it runs through the batch without a stop); at that next
//! event's stop, replay checks the batch was used exactly, applies the
//! batch's effects, and keeps what the program wrote to its connections
//! (the library's outbox). Mirror: `hotstandby_recorder::buffer`.

use hotstandby_protocol::record::{BufCall, Event};
use hotstandby_protocol::shadow;
use hotstandby_protocol::sysmodel;
use hotstandby_tracer::buffer::{self, Buffer, Call};
use hotstandby_tracer::{Stopped, Tid};

use crate::divergence::Kind;
use crate::engine::{Engine, ReplayError};

impl From<buffer::BufferError> for ReplayError {
    fn from(e: buffer::BufferError) -> Self {
        ReplayError::Buffer(e.to_string())
    }
}

/// A batch written into a thread's buffer.
#[derive(Debug)]
pub(crate) struct Filled {
    /// The log index of its `Batch` event.
    pub idx: usize,
    pub calls: Vec<BufCall>,
}

fn to_call(c: &BufCall) -> Call {
    Call {
        nr: c.nr,
        flags: c.flags,
        extra: c.extra,
        fd: c.fd,
        ret: c.ret,
        hash: c.hash,
        data: c.data.clone(),
    }
}

impl Engine<'_> {
    /// Before `tid` runs user code: the batch it uses up before its next
    /// event (at or after log index `from`), or none (its next wrapped call
    /// is traced, as it was).
    pub(crate) fn prepare(&mut self, tid: u32, from: usize) -> Result<(), ReplayError> {
        let Some(th) = self.threads.get(&tid) else {
            return Ok(());
        };
        let (Some(buf), live) = (th.buf, th.live) else {
            return Ok(());
        };
        if self.filled.contains_key(&tid) {
            return Ok(());
        }
        let mut j = from;
        let next = loop {
            match self.ev(j)? {
                Some(Event::Tcp(_)) => j += 1,
                other => break other,
            }
        };
        match next {
            Some(e @ Event::Batch { tid: t, .. }) if t == tid => {
                let calls = e.calls()?;
                let raw: Vec<Call> = calls.iter().map(to_call).collect();
                buf.fill(live, &raw)?;
                self.filled.insert(tid, Filled { idx: j, calls });
            }
            _ => buf.fill(live, &[])?,
        }
        Ok(())
    }

    /// The `Batch` event of a thread: it runs through it now.
    pub(crate) fn on_batch(&mut self, tid: u32) -> Result<(), ReplayError> {
        match self.filled.get(&tid) {
            Some(f) if f.idx == self.idx => Ok(()),
            _ => self.diverge(
                Kind::Schedule,
                tid,
                "buffered calls",
                "the thread running through its buffered calls",
                "the thread was not resumed with them",
            ),
        }
    }

    /// At a stop of `tid` after it ran user code: its batch must be used up
    /// exactly; then its effects apply.
    pub(crate) fn settle(&mut self, tid: u32, live: Tid) -> Result<(), ReplayError> {
        let Some(buf) = self.threads.get(&tid).and_then(|t| t.buf) else {
            return Ok(());
        };
        let p = buf.progress(live)?;
        let filled = self.filled.remove(&tid);
        if p.fault != 0 {
            let what = match p.fault {
                2 => "other bytes written",
                3 => "a shorter write",
                _ => "another call",
            };
            let at = filled.as_ref().map(|f| f.idx).unwrap_or(self.idx);
            return self.diverge(
                Kind::Call,
                tid,
                "buffered call",
                format!("buffered call {} of the batch at event #{at}", p.count + 1),
                format!("{what}: {}", sysmodel::name(p.fault_nr)),
            );
        }
        if p.pos < p.len {
            let n = filled.as_ref().map(|f| f.calls.len()).unwrap_or(0);
            return self.diverge(
                Kind::Schedule,
                tid,
                "buffered calls",
                format!("all {n} buffered calls used before this event"),
                format!("only {} used", p.count),
            );
        }
        let Some(f) = filled else {
            return Ok(());
        };
        self.drain(tid, live, buf)?;
        let ns_tgid = self.th(tid)?.ns_tgid;
        for c in &f.calls {
            let wrote = c.ret > 0
                && matches!(
                    sysmodel::spec(c.nr as u32).map(|s| s.family),
                    Some(sysmodel::Family::Write(_))
                );
            let tail = if wrote {
                self.outbox
                    .get_mut(&tid)
                    .and_then(|q| q.pop_front())
                    .filter(|(fd, _)| *fd == c.fd)
                    .map(|(_, b)| b)
            } else {
                None
            };
            for ch in shadow::buffered_effects(c) {
                let notes = self.shadow.apply(ns_tgid, ch);
                self.conn_notes(notes, tail.as_deref());
            }
        }
        Ok(())
    }

    /// Take what the library kept of the program's socket writes.
    pub(crate) fn drain(&mut self, tid: u32, live: Tid, buf: Buffer) -> Result<(), ReplayError> {
        let got = buf.drain(live)?;
        if !got.is_empty() {
            self.outbox.entry(tid).or_default().extend(got);
        }
        Ok(())
    }

    /// A thread registers its buffer (the recording answered 0): replay
    /// mode, and the fd table as the recorder kept it.
    pub(crate) fn register(
        &mut self,
        tid: u32,
        s: &Stopped,
        args: &[u64; 6],
    ) -> Result<(), ReplayError> {
        let live = s.tid();
        let b = Buffer::register(live, args[0], buffer::MODE_REPLAY)?;
        self.th(tid)?.buf = Some(b);
        let (tgid, ns_tgid) = (self.th(tid)?.tgid, self.th(tid)?.ns_tgid);
        self.fdtabs.insert(ns_tgid, args[2]);
        let fds: Vec<i32> = self
            .shadow
            .process(ns_tgid)
            .map(|p| p.fds.keys().copied().collect())
            .unwrap_or_default();
        for (fd, e) in hotstandby_recorder::fd_entries(&self.shadow, ns_tgid, tgid, fds) {
            buffer::set_fd(tgid, args[2], fd, e)?;
        }
        Ok(())
    }

    /// Keep the library's fd table as the recorder did.
    pub(crate) fn fd_sync(&mut self, tid: u32, fds: Vec<i32>) -> Result<(), ReplayError> {
        let (tgid, ns_tgid) = (self.th(tid)?.tgid, self.th(tid)?.ns_tgid);
        let Some(tab) = self.fdtabs.get(&ns_tgid).copied() else {
            return Ok(());
        };
        for (fd, e) in hotstandby_recorder::fd_entries(&self.shadow, ns_tgid, tgid, fds) {
            buffer::set_fd(tgid, tab, fd, e)?;
        }
        Ok(())
    }
}
