//! What the recorder does at a syscall: decide (the model's pure
//! [`decide`]), let it into the kernel, and when its thread next runs user
//! code, log its result and the memory the kernel wrote, and apply its
//! effects to the shadow state. Mirror: `hotstandby_replayer::syscall`.

use hotstandby_protocol::decide::{self, Decision, HashOf};
use hotstandby_protocol::record::{Event, MemWrite, Mode, SyscallEvent};
use hotstandby_protocol::shadow::{self, FdKind};
use hotstandby_protocol::sysmodel::{self, Arg, Family, Spec};
use hotstandby_tracer::mem::{self, EntryInfo};
use hotstandby_tracer::{fdclass, task, Running, Stopped, TaskPeek, Tid, Waited};

use crate::record::{Pending, RecordError, Recorder, St};

/// The decision's view of the calling process.
struct Cx<'a> {
    r: &'a mut Recorder,
    tgid: Tid,
    ns_tgid: u32,
}

impl decide::Context for Cx<'_> {
    fn kind(&mut self, fd: i32) -> FdKind {
        if let Some(k) = self.r.shadow.kind(self.ns_tgid, fd) {
            return k;
        }
        // An fd the shadow missed (inherited across a path it does not
        // follow): classify it now, once.
        let kind = fdclass::classify(self.tgid, fd);
        let ns = self.ns_tgid;
        self.r.apply(ns, shadow::Change::NewFd { fd, kind });
        kind
    }

    fn threads(&self) -> usize {
        self.r
            .threads
            .values()
            .filter(|t| t.tgid == self.tgid)
            .count()
    }
}

impl Recorder {
    /// The current thread stopped at a syscall entry.
    pub(crate) fn on_entry(&mut self, mut s: Stopped) -> Result<(), RecordError> {
        let t = s.tid();
        let regs = s.regs()?;
        let nr = regs.orig_rax as u32;
        let args = mem::args_of(&regs);
        self.th(t).resumed_rip = None;
        // What it did through its buffer comes first in the log.
        self.flush(t)?;
        if let Some((sig, info)) = self.take_deliverable(t) {
            return self.deliver_at_entry(s, sig, info);
        }
        let (tgid, ns_tgid) = (self.th(t).tgid, self.th(t).ns_tgid);
        let decision = decide::decide(
            nr,
            &args,
            &mut Cx {
                r: self,
                tgid,
                ns_tgid,
            },
        );
        let plan = match decision {
            Decision::Refuse { errno, why } => return self.refuse(s, nr, args, errno, why),
            Decision::Exit { group } => return self.on_exit_call(s, args, group),
            Decision::Run(plan) => plan,
        };
        let spec = sysmodel::spec(nr).expect("a decided syscall is in the model");
        match spec.family {
            Family::BufferRegister => {
                let ret = self.register(&s, &args)?;
                return self.answer(s, nr, args, ret, plan);
            }
            Family::BufferDrain => {
                // Only a replaying library drains; answered, not logged.
                s.skip(0)?;
                self.th(t).st = St::Running(s.resume(0)?);
                self.current = Some(t);
                return Ok(());
            }
            Family::Exec => {
                if let Some(p) = self.preload.clone() {
                    let envp = if nr as i64 == libc::SYS_execveat {
                        3
                    } else {
                        2
                    };
                    hotstandby_tracer::buffer::inject_preload(&mut s, envp, &p)?;
                }
            }
            _ => {}
        }
        let mut p = Pending {
            nr,
            args,
            plan,
            spec,
            entry: EntryInfo::default(),
            path: Vec::new(),
        };
        if let Some(i) = spec.args.iter().position(|a| *a == Arg::Path) {
            if args[i] != 0 {
                p.path = s.read_cstr(args[i], 4096).unwrap_or_default();
            }
        }
        p.entry = mem::entry_info(t, spec, &args);
        let blocking = plan.blocking;
        self.th(t).st = St::InKernel(p, s.syscall(0)?);
        self.current = None;
        self.tentative = Some(t);
        if !blocking {
            // Wait for this thread only; others' stops stay queued.
            while self.tentative == Some(t) {
                let w = task::Running::from_tid(t).wait()?;
                self.handle(w)?;
            }
            return Ok(());
        }
        if self.runq.is_empty() {
            return Ok(());
        }
        // Others are runnable: give the syscall a moment to complete.
        for _ in 0..50 {
            match Running::from_tid(t).try_wait()? {
                Err(_still_running) => std::thread::yield_now(),
                Ok(w) => {
                    self.handle(w)?;
                    if self.tentative != Some(t) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Answer a syscall the supervisor itself answers (`ret`), logged as
    /// emulated.
    fn answer(
        &mut self,
        mut s: Stopped,
        nr: u32,
        args: [u64; 6],
        ret: i64,
        plan: decide::Plan,
    ) -> Result<(), RecordError> {
        s.skip(ret)?;
        let t = s.tid();
        self.log.event(Event::Syscall(SyscallEvent {
            tid: self.ns(t),
            nr,
            args,
            ret,
            mode: plan.mode,
            writes: vec![],
            hash: 0,
            aux: 0,
            path: vec![],
        }))?;
        let rip = s.regs()?.rip;
        self.resume_after_syscall(s, rip, nr, false)
    }

    /// Answer a syscall with `-errno` without running it.
    fn refuse(
        &mut self,
        mut s: Stopped,
        nr: u32,
        args: [u64; 6],
        errno: i32,
        why: Option<String>,
    ) -> Result<(), RecordError> {
        if let Some(msg) = why {
            if self.warned.insert(nr as u64 | (errno as u64) << 32) {
                tracing::warn!("{msg}");
            }
        }
        s.skip(-(errno as i64))?;
        let t = s.tid();
        self.log.event(Event::Syscall(SyscallEvent {
            tid: self.ns(t),
            nr,
            args,
            ret: -(errno as i64),
            mode: Mode::Refused,
            writes: vec![],
            hash: 0,
            aux: 0,
            path: vec![],
        }))?;
        let rip = s.regs()?.rip;
        self.resume_after_syscall(s, rip, nr, false)
    }

    /// exit / exit_group: log it and let the thread (or process) go.
    fn on_exit_call(&mut self, s: Stopped, args: [u64; 6], group: bool) -> Result<(), RecordError> {
        let t = s.tid();
        self.log.event(Event::Exit {
            tid: self.ns(t),
            code: args[0] as i32,
            group,
        })?;
        self.current = None;
        let tgid = self.th(t).tgid;
        let ns_tgid = self.th(t).ns_tgid;
        let last = self.threads.values().filter(|x| x.tgid == tgid).count() == 1;
        if group || last {
            // The process ends: its connections close with it.
            self.apply(ns_tgid, shadow::Change::Gone);
            if tgid == self.leader {
                let off = self.log.bytes();
                if let Some(n) = &self.net {
                    n.closed(None, off);
                }
            }
        }
        self.th(t).st = St::Exiting;
        if group {
            let members: Vec<Tid> = self
                .threads
                .iter()
                .filter(|(_, x)| x.tgid == tgid)
                .map(|(k, _)| *k)
                .collect();
            for m in members {
                // The whole process is going: a syscall of another thread
                // that completes now is never logged (its thread is killed).
                self.th(m).st = St::Exiting;
                self.runq.retain(|x| *x != m);
                if self.tentative == Some(m) {
                    self.tentative = None;
                }
            }
        }
        let run = s.resume(0)?;
        if !group && t != tgid {
            // The kernel clears the thread's CLONE_CHILD_CLEARTID word (and
            // wakes its joiner) late in the exit, after PTRACE_EVENT_EXIT:
            // no other thread runs user code until that has happened, or a
            // joiner could see the word set or clear depending on timing
            // (Apache's child diverged so at its shutdown). Replay waits
            // the same way.
            let mut run = run;
            loop {
                match run.wait()? {
                    Waited::Stopped(s, _) => run = s.resume(0)?,
                    gone => {
                        self.handle(gone)?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Log a completed syscall (its thread is about to run user code).
    pub(crate) fn complete(&mut self, p: Pending, mut s: Stopped) -> Result<(), RecordError> {
        let t = s.tid();
        let regs = s.regs()?;
        let ret = regs.rax as i64;
        let (tgid, ns_tgid) = (self.th(t).tgid, self.th(t).ns_tgid);
        if let (Family::Affinity, Some(pin)) = (p.spec.family, &self.pin) {
            if ret > 0 && p.args[2] != 0 {
                // The CPUs it would have had, not the supervisor's pin.
                let n = (ret as usize).min(pin.original.len());
                s.write(p.args[2], &pin.original[..n])?;
            }
        }
        let writes = outputs(t, &p, ret)?;
        let hash = match p.plan.hash {
            HashOf::Nothing => 0,
            HashOf::Written | HashOf::Read => {
                mem::hash(&mem::moved_bytes(t, p.spec, &p.args, ret)?)
            }
        };
        let aux = if p.plan.mode == Mode::PlaceholderFd {
            writes
                .iter()
                .find(|w| w.addr == p.args[1] && w.data.len() >= 2)
                .map(|w| u16::from_le_bytes([w.data[0], w.data[1]]) as u64)
                .unwrap_or(libc::AF_INET as u64)
        } else {
            0
        };
        let changes = shadow::effects(p.spec, &p.args, ret, &mut TaskPeek { tid: t, tgid });
        let mut fds: Vec<i32> = Vec::new();
        for c in &changes {
            fds.extend(crate::buffer::touched(c).unwrap_or_default());
        }
        if matches!(p.spec.family, Family::Fcntl | Family::Ioctl) {
            fds.push(p.args[0] as i32);
        }
        let mut notes = Vec::new();
        for c in changes {
            tracing::trace!(call = p.spec.name, change = ?c, "shadow");
            notes.extend(self.shadow.apply(ns_tgid, c));
        }
        self.log.event(Event::Syscall(SyscallEvent {
            tid: self.ns(t),
            nr: p.nr,
            args: p.args,
            ret,
            mode: p.plan.mode,
            writes,
            hash,
            aux,
            path: p.path,
        }))?;
        // The network side learns of it once the record is in the log.
        self.net_notes(notes);
        if !fds.is_empty() {
            self.fd_sync(t, fds)?;
        }
        if ret >= 0 {
            self.net_after(t, p.spec, &p.args, ret)?;
        }
        self.resume_after_syscall(s, regs.rip, p.nr, p.plan.blocking)
    }

    /// A syscall interrupted by a signal, when its thread runs again: log
    /// what the program sees (restarted or EINTR) and the signal.
    pub(crate) fn log_interrupted(
        &mut self,
        p: Pending,
        code: i64,
        sig: i32,
        info: Vec<u8>,
        s: Stopped,
    ) -> Result<(), RecordError> {
        use hotstandby_protocol::shadow::Disposition;
        let t = s.tid();
        let ns_tgid = self.th(t).ns_tgid;
        let restart = match self.shadow.disposition(ns_tgid, sig) {
            Disposition::Handler { restart } => match code {
                hotstandby_tracer::ERESTARTSYS => restart,
                hotstandby_tracer::ERESTARTNOINTR => true,
                _ => false,
            },
            _ => true,
        };
        self.log.event(Event::Syscall(SyscallEvent {
            tid: self.ns(t),
            nr: p.nr,
            args: p.args,
            ret: if restart {
                p.nr as i64
            } else {
                -(libc::EINTR as i64)
            },
            mode: if restart {
                Mode::Restart
            } else {
                Mode::Emulated
            },
            writes: vec![],
            hash: 0,
            aux: 0,
            path: p.path.clone(),
        }))?;
        self.log.event(Event::Signal {
            tid: self.ns(t),
            signo: sig,
            siginfo: info,
            at_entry: false,
        })?;
        self.th(t).resumed_rip = None;
        self.th(t).st = St::Running(s.resume(sig)?);
        Ok(())
    }
}

/// The memory the kernel wrote that replay must inject.
fn outputs(t: Tid, p: &Pending, ret: i64) -> Result<Vec<MemWrite>, RecordError> {
    match p.plan.mode {
        Mode::Emulated | Mode::ExecutedInjected | Mode::PlaceholderFd => {
            let spec = match p.plan.outs {
                Some(out) => Spec { out, ..*p.spec },
                None => *p.spec,
            };
            Ok(mem::collect_outputs(t, &spec, &p.args, ret, &p.entry)?)
        }
        _ => Ok(Vec::new()),
    }
}
