//! Tracee threads as types: a [`Stopped`] thread can be inspected, changed
//! and resumed; resuming consumes it and gives a [`Running`] one; waiting
//! gives back a `Stopped` with the typed [`Stop`] it is in. There is one
//! wait ([`wait`]) for both sides, one place that makes a syscall at an
//! entry stop do something else ([`Stopped::skip`], [`Stopped::rewind`],
//! [`Stopped::inject`]) and one that delivers a signal at a boundary
//! ([`Stopped::deliver`]).
//!
//! Ids here are the supervisor's (its PID namespace); what the program
//! calls them is [`crate::nsid`]'s business.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys::{self, Regs, SysError};

/// A thread id as the supervisor sees it.
pub type Tid = i32;

/// A signal held back: its number and the kernel's siginfo bytes.
pub type HeldSignal = (i32, Vec<u8>);

/// Where a stopped thread stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// At a syscall entry the seccomp filter traps.
    Entry,
    /// At a syscall's exit (after `PTRACE_SYSCALL`).
    Exit,
    /// At a syscall's entry reached with `PTRACE_SYSCALL` from outside a
    /// syscall (the filter's stop for it follows).
    SyscallEnter,
    /// A signal is about to be delivered (signal-delivery-stop).
    Signal { sig: i32, info: Box<[u8; 128]> },
    /// A group stop (SIGSTOP and friends), not a signal to deliver.
    Group { sig: i32 },
    /// clone, fork or vfork created thread or process `child`.
    Spawned { child: Tid, vfork: bool },
    /// A vfork child released its parent.
    VforkDone,
    /// execve succeeded; the thread is at the new program's start.
    Exec,
    /// The thread is on its way out (`PTRACE_EVENT_EXIT`).
    Exiting,
}

/// What a wait found.
#[derive(Debug)]
pub enum Waited {
    Stopped(Stopped, Stop),
    /// The thread is gone with this exit code.
    Exited(Tid, i32),
    /// The thread was killed by this signal.
    Killed(Tid, i32),
}

impl Waited {
    pub fn tid(&self) -> Tid {
        match self {
            Waited::Stopped(s, _) => s.tid,
            Waited::Exited(t, _) | Waited::Killed(t, _) => *t,
        }
    }
}

/// Errors of the wait.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// waitpid failed.
    #[error("waiting for the program: {0}")]
    Wait(nix::Error),
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A syscall made in a thread by the supervisor faulted instead.
    #[error("thread {tid} got signal {sig} instead of making injected syscall {nr}")]
    Injected { tid: Tid, nr: i64, sig: i32 },
}

/// A thread stopped under ptrace.
#[derive(Debug)]
pub struct Stopped {
    tid: Tid,
    /// The registers, once read (boxed: a `Stopped` moves around in state
    /// enums and stays small).
    regs: Option<Box<Regs>>,
}

/// A thread let go: it runs user code or sits in a syscall.
#[derive(Debug)]
#[must_use = "a running thread must be waited for"]
pub struct Running {
    tid: Tid,
}

impl Running {
    /// A thread known to be running (the replayer's and recorder's tables
    /// are built from tids the kernel reported).
    pub fn from_tid(tid: Tid) -> Self {
        Running { tid }
    }

    pub fn tid(&self) -> Tid {
        self.tid
    }

    /// A wait (of any thread) reported this thread stopped as `s`: the
    /// running token is used up.
    pub fn stopped_as(self, s: &Stopped) {
        debug_assert_eq!(self.tid, s.tid, "a stop reported for another thread");
    }

    /// Wait for this thread's next stop.
    pub fn wait(self) -> Result<Waited, TaskError> {
        loop {
            match wait_on(Some(self.tid), false)? {
                Some(w) => return Ok(w),
                None => continue,
            }
        }
    }

    /// Its next stop if there is one already.
    pub fn try_wait(self) -> Result<Result<Waited, Running>, TaskError> {
        match wait_on(Some(self.tid), true)? {
            Some(w) => Ok(Ok(w)),
            None => Ok(Err(self)),
        }
    }
}

impl Stopped {
    /// A thread known to be stopped (the first stop after a spawn or a
    /// takeover hands it over).
    pub fn from_tid(tid: Tid) -> Self {
        Stopped { tid, regs: None }
    }

    pub fn tid(&self) -> Tid {
        self.tid
    }

    pub fn regs(&mut self) -> Result<Regs, SysError> {
        if let Some(r) = &self.regs {
            return Ok(**r);
        }
        let r = sys::get_regs(self.tid)?;
        self.regs = Some(Box::new(r));
        Ok(r)
    }

    pub fn set_regs(&mut self, r: &Regs) -> Result<(), SysError> {
        sys::set_regs(self.tid, r)?;
        self.regs = Some(Box::new(*r));
        Ok(())
    }

    /// The six syscall arguments as the program passed them.
    pub fn args(&mut self) -> Result<[u64; 6], SysError> {
        Ok(crate::mem::args_of(&self.regs()?))
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, SysError> {
        sys::read_mem(self.tid, addr, len)
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), SysError> {
        sys::write_mem(self.tid, addr, data)
    }

    pub fn read_cstr(&self, addr: u64, max: usize) -> Result<Vec<u8>, SysError> {
        sys::read_cstr(self.tid, addr, max)
    }

    pub fn set_siginfo(&self, info: &[u8]) -> Result<(), SysError> {
        sys::set_siginfo(self.tid, info)
    }

    /// Let it run user code, delivering `sig` (0: none).
    pub fn resume(self, sig: i32) -> Result<Running, SysError> {
        sys::cont(self.tid, sig)?;
        Ok(Running { tid: self.tid })
    }

    /// Let it into the syscall it is stopped at (or run to the next entry),
    /// stopping again at the syscall's exit.
    pub fn syscall(self, sig: i32) -> Result<Running, SysError> {
        sys::syscall(self.tid, sig)?;
        Ok(Running { tid: self.tid })
    }

    /// Stop tracing it.
    pub fn detach(self) -> Result<(), SysError> {
        nix::sys::ptrace::detach(Pid::from_raw(self.tid), None).map_err(|e| SysError::Os {
            what: "PTRACE_DETACH",
            tid: self.tid,
            source: e,
        })
    }

    /// At a syscall entry: do not make the syscall; it returns `ret`.
    pub fn skip(&mut self, ret: i64) -> Result<(), SysError> {
        let mut r = self.regs()?;
        r.orig_rax = u64::MAX;
        r.rax = ret as u64;
        self.set_regs(&r)
    }

    /// At a syscall entry: do not make it now; when resumed, the thread
    /// makes it again (a signal handler may run first).
    pub fn rewind(&mut self) -> Result<(), SysError> {
        let mut r = self.regs()?;
        r.rax = r.orig_rax;
        r.orig_rax = u64::MAX;
        r.rip -= 2;
        self.set_regs(&r)
    }

    /// At an exit stop: make the same syscall instruction run again when
    /// resumed (the next stop is its entry).
    pub fn rerun(&mut self) -> Result<(), SysError> {
        let mut r = self.regs()?;
        r.rip -= 2;
        r.rax = r.orig_rax;
        self.set_regs(&r)
    }

    /// At a syscall entry: make syscall `nr(args)` instead, run it to its
    /// exit and return the thread there with its result. The caller puts
    /// back whatever registers the program must see.
    pub fn inject(mut self, nr: i64, args: &[u64; 6]) -> Result<(Stopped, i64), TaskError> {
        let mut r = self.regs()?;
        r.orig_rax = nr as u64;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        self.set_regs(&r)?;
        let mut run = self.syscall(0)?;
        loop {
            match run.wait()? {
                Waited::Stopped(mut s, Stop::Exit) => {
                    let ret = s.regs()?.rax as i64;
                    if crate::is_restart(ret) {
                        // A signal we pass over interrupted it: again.
                        run = s.syscall(0)?;
                        continue;
                    }
                    return Ok((s, ret));
                }
                Waited::Stopped(s, Stop::Entry) => run = s.syscall(0)?,
                Waited::Stopped(s, Stop::Signal { .. } | Stop::Group { .. }) => {
                    run = s.syscall(0)?
                }
                Waited::Stopped(s, _) => run = s.syscall(0)?,
                Waited::Exited(t, _) | Waited::Killed(t, _) => {
                    return Err(SysError::Died { tid: t }.into())
                }
            }
        }
    }

    /// From any stop: make syscall `nr(args)` from the `syscall`
    /// instruction at `site`, run it to its exit and return the thread
    /// there with its result (and the thread or process it created, for a
    /// clone). A syscall the thread stood at the entry of is skipped first.
    /// The caller puts back the registers the program must see.
    pub fn call_at(
        mut self,
        site: u64,
        nr: i64,
        args: &[u64; 6],
    ) -> Result<(Stopped, i64, Option<Tid>), TaskError> {
        let mut r = self.regs()?;
        r.orig_rax = u64::MAX;
        r.rax = nr as u64;
        r.rip = site;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        self.set_regs(&r)?;
        let mut entered = false;
        let mut child = None;
        let mut run = self.syscall(0)?;
        loop {
            match run.wait()? {
                Waited::Stopped(mut s, Stop::Exit) if entered => {
                    let ret = s.regs()?.rax as i64;
                    if crate::is_restart(ret) {
                        s.rerun()?;
                        entered = false;
                        run = s.syscall(0)?;
                        continue;
                    }
                    return Ok((s, ret, child));
                }
                Waited::Stopped(mut s, Stop::Entry | Stop::SyscallEnter) => {
                    entered |= s.regs()?.orig_rax == nr as u64;
                    run = s.syscall(0)?
                }
                Waited::Stopped(s, Stop::Spawned { child: c, .. }) => {
                    child = Some(c);
                    run = s.syscall(0)?
                }
                Waited::Stopped(
                    s,
                    Stop::Signal {
                        sig: sig @ (libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE),
                        ..
                    },
                ) => {
                    return Err(TaskError::Injected {
                        tid: s.tid,
                        nr,
                        sig,
                    })
                }
                Waited::Stopped(s, _) => run = s.syscall(0)?,
                Waited::Exited(t, _) | Waited::Killed(t, _) => {
                    return Err(SysError::Died { tid: t }.into())
                }
            }
        }
    }

    /// Deliver `sig` with its recorded `info` now: queue it to the thread,
    /// let it run to the signal-delivery-stop, put the siginfo in and let
    /// the handler run (or the default action happen). Other signals met
    /// on the way are held back and returned.
    pub fn deliver(
        self,
        tgid: Tid,
        sig: i32,
        info: &[u8],
    ) -> Result<(Running, Vec<HeldSignal>), TaskError> {
        let tid = self.tid;
        sys::tgkill(tgid, tid, sig)?;
        let mut run = self.resume(0)?;
        let mut others = Vec::new();
        loop {
            match run.wait()? {
                Waited::Stopped(s, Stop::Signal { sig: got, .. }) if got == sig => {
                    s.set_siginfo(info)?;
                    return Ok((s.resume(sig)?, others));
                }
                Waited::Stopped(s, Stop::Signal { sig: got, info }) => {
                    others.push((got, info.to_vec()));
                    run = s.resume(0)?;
                }
                Waited::Stopped(s, _) => run = s.resume(0)?,
                Waited::Exited(t, _) | Waited::Killed(t, _) => {
                    return Err(SysError::Died { tid: t }.into())
                }
            }
        }
    }
}

fn stopped(tid: Tid, stop: Stop) -> Waited {
    Waited::Stopped(Stopped { tid, regs: None }, stop)
}

fn classify(ws: WaitStatus) -> Result<Option<Waited>, TaskError> {
    Ok(Some(match ws {
        WaitStatus::Exited(p, c) => Waited::Exited(p.as_raw(), c),
        WaitStatus::Signaled(p, s, _) => Waited::Killed(p.as_raw(), s as i32),
        WaitStatus::PtraceSyscall(p) => {
            let tid = p.as_raw();
            if sys::at_syscall_entry(tid)? {
                stopped(tid, Stop::SyscallEnter)
            } else {
                stopped(tid, Stop::Exit)
            }
        }
        WaitStatus::PtraceEvent(p, _, ev) => {
            let tid = p.as_raw();
            let stop = match ev {
                libc::PTRACE_EVENT_SECCOMP => Stop::Entry,
                libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                    Stop::Spawned {
                        child: sys::event_msg(tid)? as Tid,
                        vfork: ev == libc::PTRACE_EVENT_VFORK,
                    }
                }
                libc::PTRACE_EVENT_VFORK_DONE => Stop::VforkDone,
                libc::PTRACE_EVENT_EXEC => Stop::Exec,
                libc::PTRACE_EVENT_EXIT => Stop::Exiting,
                _ => Stop::Group { sig: 0 },
            };
            stopped(tid, stop)
        }
        WaitStatus::Stopped(p, sig) => {
            let tid = p.as_raw();
            match sys::get_siginfo(tid) {
                Ok(info) => stopped(
                    tid,
                    Stop::Signal {
                        sig: sig as i32,
                        info: Box::new(info),
                    },
                ),
                // No siginfo: a group stop.
                Err(_) => stopped(tid, Stop::Group { sig: sig as i32 }),
            }
        }
        WaitStatus::StillAlive => return Ok(None),
        WaitStatus::Continued(_) => return Ok(None),
    }))
}

fn wait_on(tid: Option<Tid>, nohang: bool) -> Result<Option<Waited>, TaskError> {
    let mut flags = WaitPidFlag::__WALL;
    if nohang {
        flags |= WaitPidFlag::WNOHANG;
    }
    loop {
        match waitpid(tid.map(Pid::from_raw), Some(flags)) {
            Ok(ws) => match classify(ws) {
                // A thread that vanished between its stop and our look.
                Err(TaskError::Sys(SysError::Died { .. })) => continue,
                other => return other,
            },
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) if tid.is_none() => return Ok(None),
            Err(e) => return Err(TaskError::Wait(e)),
        }
    }
}

/// The next stop of any tracee (`None`: no tracee or child is left).
pub fn wait() -> Result<Option<Waited>, TaskError> {
    wait_on(None, false)
}

/// The next stop of any tracee if one is waiting.
pub fn try_wait() -> Result<Option<Waited>, TaskError> {
    wait_on(None, true)
}

#[cfg(test)]
mod tests;
