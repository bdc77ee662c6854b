//! Signals and rdtsc while recording. Asynchronous signals are held back
//! and delivered at a syscall boundary (logged as `Signal`); synchronous
//! faults are delivered where they happen (`Fault`); rdtsc/rdtscp fault
//! under `PR_SET_TSC` and are emulated (`Rdtsc`). Mirror:
//! `hotstandby_replayer::signal`.

use hotstandby_protocol::record::Event;
use hotstandby_protocol::shadow::Disposition;
use hotstandby_tracer::{sys, Regs, Stopped, Tid};

use crate::record::{RecordError, Recorder, St};

/// Length of the rdtsc (2) or rdtscp (3) instruction at `rip`, if any.
pub fn rdtsc_len(tid: Tid, rip: u64) -> Option<u64> {
    let b = sys::read_mem(tid, rip, 3).ok()?;
    if b[0] == 0x0f && b[1] == 0x31 {
        Some(2)
    } else if b == [0x0f, 0x01, 0xf9] {
        Some(3)
    } else {
        None
    }
}

/// Whether a signal with this siginfo is a synchronous fault of the
/// thread's own instruction (delivered where it happened, on both sides).
pub fn is_fault(sig: i32, info: &[u8]) -> bool {
    sys::si_code(info) > 0
        && matches!(
            sig,
            libc::SIGSEGV
                | libc::SIGBUS
                | libc::SIGILL
                | libc::SIGFPE
                | libc::SIGTRAP
                | libc::SIGSYS
        )
}

impl Recorder {
    pub(crate) fn on_signal(
        &mut self,
        mut s: Stopped,
        sig: i32,
        info: Vec<u8>,
    ) -> Result<(), RecordError> {
        let t = s.tid();
        let ns_tgid = self.th(t).ns_tgid;
        if sig == libc::SIGSTOP && matches!(self.th(t).st, St::Starting) {
            self.th(t).st = St::Ready(s);
            self.runq.push_back(t);
            return Ok(());
        }
        let st = std::mem::replace(&mut self.th(t).st, St::Exiting);
        match st {
            St::Restarting(p, code, run) => {
                run.stopped_as(&s);
                if self.shadow.disposition(ns_tgid, sig) == Disposition::Ignore {
                    self.th(t).st = St::InKernel(p, s.syscall(0)?);
                    return Ok(());
                }
                self.th(t).st = St::Interrupted {
                    p,
                    code,
                    sig,
                    info,
                    s,
                };
                self.became_runnable(t)
            }
            St::Running(run) => {
                run.stopped_as(&s);
                let regs = s.regs()?;
                if sig == libc::SIGSEGV {
                    if let Some(len) = rdtsc_len(t, regs.rip) {
                        return self.emulate_rdtsc(s, regs, len);
                    }
                }
                // Its buffered calls come before an event logged here (only
                // where replay stops too: a fault, a delivery right after a
                // logged syscall), never before a signal merely held.
                let deliver_now = if is_fault(sig, &info) {
                    self.flush(t)?;
                    self.log.event(Event::Fault {
                        tid: self.ns(t),
                        signo: sig,
                        rip: regs.rip,
                    })?;
                    true
                } else if self.shadow.disposition(ns_tgid, sig) == Disposition::Ignore {
                    false
                } else if self.th(t).resumed_rip == Some(regs.rip) {
                    // Right at the return of the syscall just logged: deliver here.
                    self.flush(t)?;
                    self.log.event(Event::Signal {
                        tid: self.ns(t),
                        signo: sig,
                        siginfo: info,
                        at_entry: false,
                    })?;
                    true
                } else {
                    self.pending_sigs.push_back((sig, info));
                    // Delivered at its next traced boundary: make it come.
                    self.nudge(t);
                    false
                };
                if deliver_now {
                    self.th(t).resumed_rip = None;
                }
                self.th(t).st = St::Running(s.resume(if deliver_now { sig } else { 0 })?);
                Ok(())
            }
            St::InKernel(p, run) => {
                run.stopped_as(&s);
                // Held for a boundary; the syscall goes on.
                self.pending_sigs.push_back((sig, info));
                self.th(t).st = St::InKernel(p, s.syscall(0)?);
                Ok(())
            }
            other => {
                // Exiting, or a state that cannot take a signal: keep it for
                // a boundary (an exiting thread's is moot).
                if !matches!(other, St::Exiting) {
                    self.pending_sigs.push_back((sig, info));
                }
                self.th(t).st = other;
                let _ = s.resume(0)?;
                Ok(())
            }
        }
    }

    fn emulate_rdtsc(
        &mut self,
        mut s: Stopped,
        mut regs: Regs,
        len: u64,
    ) -> Result<(), RecordError> {
        let t = s.tid();
        let value = sys::rdtsc();
        regs.rax = value & 0xffff_ffff;
        regs.rdx = value >> 32;
        let rdtscp = len == 3;
        if rdtscp {
            regs.rcx = 0;
        }
        let rip = regs.rip;
        regs.rip += len;
        s.set_regs(&regs)?;
        self.th(t).resumed_rip = None;
        self.flush(t)?;
        self.log.event(Event::Rdtsc {
            tid: self.ns(t),
            rip,
            value,
            aux: 0,
            rdtscp,
        })?;
        self.th(t).st = St::Running(s.resume(0)?);
        Ok(())
    }

    /// A pending asynchronous signal the thread does not block.
    pub(crate) fn take_deliverable(&mut self, t: Tid) -> Option<(i32, Vec<u8>)> {
        if self.pending_sigs.is_empty() {
            return None;
        }
        let blocked = sys::blocked_mask(t);
        let idx = self
            .pending_sigs
            .iter()
            .position(|(s, _)| blocked & (1u64 << (*s - 1)) == 0)?;
        self.pending_sigs.remove(idx)
    }

    /// Deliver a held signal at this syscall entry: the syscall is not made
    /// now but again after the handler returns.
    pub(crate) fn deliver_at_entry(
        &mut self,
        mut s: Stopped,
        sig: i32,
        info: Vec<u8>,
    ) -> Result<(), RecordError> {
        let t = s.tid();
        self.log.event(Event::Signal {
            tid: self.ns(t),
            signo: sig,
            siginfo: info.clone(),
            at_entry: true,
        })?;
        s.rewind()?;
        let tgid = self.th(t).tgid;
        let (run, others) = s.deliver(tgid, sig, &info)?;
        self.pending_sigs.extend(others);
        self.th(t).st = St::Running(run);
        Ok(())
    }
}
