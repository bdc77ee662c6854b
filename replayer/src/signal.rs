//! Signals, faults and rdtsc on replay: each is made to happen where the
//! log says — a signal queued with its recorded siginfo at the recorded
//! boundary, a fault checked to happen at the recorded instruction, rdtsc
//! answered with the recorded value. Mirror: `hotstandby_recorder::signal`.

use hotstandby_protocol::record::Event;
use hotstandby_recorder::rdtsc_len;
use hotstandby_tracer::{Stop, Stopped, Waited};

use crate::divergence::Kind;
use crate::engine::{describe, wait_for, Engine, ReplayError, St};

impl Engine<'_> {
    /// Deliver the recorded signal now, from a thread stopped where it is
    /// to be taken.
    fn deliver(&mut self, tid: u32, s: Stopped, sig: i32, info: &[u8]) -> Result<(), ReplayError> {
        let tgid = self.th(tid)?.tgid;
        // The handler (and what follows) may run through buffered calls.
        self.prepare(tid, self.idx + 1)?;
        // Other signals met on the way are the standby's own (a replayed
        // child's SIGCHLD): the recorded ones come from the log.
        let (run, _others) = s.deliver(tgid, sig, info)?;
        self.set(tid, St::Running(run))
    }

    pub(crate) fn on_signal(
        &mut self,
        tid: u32,
        sig: i32,
        info: &[u8],
        at_entry: bool,
    ) -> Result<(), ReplayError> {
        match self.take(tid)? {
            St::Ready(s) if !at_entry => self.deliver(tid, s, sig, info),
            st @ (St::Running(_) | St::AtEntry(_)) if at_entry => {
                self.set(tid, st)?;
                let mut s = self.entry(tid, "a syscall (signal delivery point)")?;
                s.rewind()?;
                self.deliver(tid, s, sig, info)
            }
            other => {
                let name = other.name();
                self.set(tid, other)?;
                self.diverge(
                    Kind::Signal,
                    tid,
                    "signal",
                    "a thread at a syscall boundary",
                    format!("the thread is {name}"),
                )
            }
        }
    }

    /// An emulated mask-changing wait (sigsuspend, ppoll, pselect,
    /// epoll_pwait) returned EINTR for the signal logged next: deliver it
    /// the way it was taken, by running rt_sigsuspend with the program's
    /// mask, so the kernel delivers it under that mask.
    pub(crate) fn suspend_deliver(
        &mut self,
        tid: u32,
        mut s: Stopped,
        mask: u64,
    ) -> Result<(), ReplayError> {
        let Some(Event::Signal { signo, siginfo, .. }) = self.ev(self.idx + 1)? else {
            unreachable!("checked by mask_wait_signal");
        };
        let mut r = s.regs()?;
        r.orig_rax = libc::SYS_rt_sigsuspend as u64;
        r.rdi = mask;
        r.rsi = 8;
        s.set_regs(&r)?;
        self.idx += 1; // the Signal event is consumed here
        self.deliver(tid, s, signo, &siginfo)
    }

    pub(crate) fn on_fault(&mut self, tid: u32, signo: i32, rip: u64) -> Result<(), ReplayError> {
        let St::Running(run) = self.take(tid)? else {
            return self.diverge(
                Kind::Schedule,
                tid,
                "fault",
                "a running thread",
                "a stopped one",
            );
        };
        match wait_for(run)? {
            Waited::Stopped(mut s, Stop::Signal { sig, .. }) if sig == signo => {
                let at = s.regs()?.rip;
                if at == rip {
                    self.settle(tid, s.tid())?;
                    self.prepare(tid, self.idx + 1)?;
                    return self.set(tid, St::Running(s.resume(signo)?));
                }
                self.set(tid, St::Ready(s))?;
                self.diverge(
                    Kind::Instruction,
                    tid,
                    "fault",
                    format!("signal {signo} at {rip:#x}"),
                    format!("signal {sig} at {at:#x}"),
                )
            }
            other => {
                let d = describe(&other);
                self.diverge(
                    Kind::Instruction,
                    tid,
                    "fault",
                    format!("signal {signo} at {rip:#x}"),
                    d,
                )
            }
        }
    }

    pub(crate) fn on_rdtsc(
        &mut self,
        tid: u32,
        rip: u64,
        value: u64,
        aux: u32,
        rdtscp: bool,
    ) -> Result<(), ReplayError> {
        let St::Running(run) = self.take(tid)? else {
            return self.diverge(
                Kind::Schedule,
                tid,
                "rdtsc",
                "a running thread",
                "a stopped one",
            );
        };
        match wait_for(run)? {
            Waited::Stopped(
                mut s,
                Stop::Signal {
                    sig: libc::SIGSEGV, ..
                },
            ) => {
                let mut r = s.regs()?;
                match rdtsc_len(s.tid(), r.rip) {
                    Some(len) if r.rip == rip => {
                        r.rax = value & 0xffff_ffff;
                        r.rdx = value >> 32;
                        if rdtscp {
                            r.rcx = aux as u64;
                        }
                        r.rip += len;
                        s.set_regs(&r)?;
                        self.settle(tid, s.tid())?;
                        self.prepare(tid, self.idx + 1)?;
                        self.set(tid, St::Running(s.resume(0)?))
                    }
                    _ => {
                        let at = r.rip;
                        self.set(tid, St::Ready(s))?;
                        self.diverge(
                            Kind::Instruction,
                            tid,
                            "rdtsc",
                            format!("rdtsc at {rip:#x}"),
                            format!("SIGSEGV at {at:#x}"),
                        )
                    }
                }
            }
            other => {
                let d = describe(&other);
                self.diverge(
                    Kind::Instruction,
                    tid,
                    "rdtsc",
                    format!("rdtsc at {rip:#x}"),
                    d,
                )
            }
        }
    }
}
