//! What replay does at a syscall: check that the program makes the recorded
//! call, make the model's decision again and check it is the recorded one,
//! then execute it (local objects), inject its result (the outside world),
//! or both, and apply its effects to the shadow state. Mirror:
//! `hotstandby_recorder::syscall`.

use std::io::Write;

use hotstandby_protocol::decide::{self, Decision};
use hotstandby_protocol::record::{Event, Mode, SyscallEvent};
use hotstandby_protocol::shadow::{self, Change, FdKind};
use hotstandby_protocol::sysmodel::{self, Arg, Class, Family, MaskAt};
use hotstandby_tracer::{
    fdclass, is_restart, mem, Regs, Running, Stop, Stopped, TaskPeek, Tid, Waited,
};

use crate::divergence::Kind;
use crate::engine::{call_str, describe, stray, wait_for, Engine, ReplayError, St};

/// A read asked for exactly its recorded byte count. A pipe read returns as
/// soon as some bytes are there, so the supervisor makes it again for the
/// rest as soon as it returns (while other threads go on), until it has
/// them all: the writer it is waiting for must not find the pipe full.
#[derive(Debug)]
pub(crate) struct Fill {
    entry: Regs,
    nr: u32,
    want: u64,
    total: u64,
    done: Option<Stopped>,
}

/// Where the thread of a syscall event stands when it is handled.
enum At {
    /// Stopped at the syscall's entry.
    Entry(Stopped),
    /// Let into the kernel at its `Enter` (with its entry registers).
    Kernel(Box<Regs>, Running),
}

/// For a read of the program's own pipe or file that returned bytes: how
/// many to ask for on replay.
fn read_fill(s: &SyscallEvent) -> Option<u64> {
    let fill = s.mode == Mode::Executed
        && s.ret > 0
        && matches!(
            sysmodel::spec(s.nr).map(|sp| sp.family),
            Some(Family::Read {
                data: sysmodel::Data::Buf(1),
                ..
            })
        );
    fill.then_some(s.ret as u64)
}

/// The decision's view of the calling process on replay.
struct Cx<'e, 'a> {
    e: &'e mut Engine<'a>,
    /// The calling thread (its state is out of the table while handled).
    tid: u32,
    tgid: Tid,
    ns_tgid: u32,
}

impl decide::Context for Cx<'_, '_> {
    fn kind(&mut self, fd: i32) -> FdKind {
        if let Some(k) = self.e.shadow.kind(self.ns_tgid, fd) {
            return k;
        }
        let kind = fdclass::classify(self.tgid, fd);
        self.e
            .shadow
            .apply(self.ns_tgid, Change::NewFd { fd, kind });
        kind
    }

    fn threads(&self) -> usize {
        self.e
            .threads
            .iter()
            .filter(|(k, t)| {
                t.ns_tgid == self.ns_tgid && (**k == self.tid || !matches!(t.st, St::Gone))
            })
            .count()
    }
}

impl Engine<'_> {
    fn check_call(
        &mut self,
        tid: u32,
        nr: u32,
        args: &[u64; 6],
        s: &mut Stopped,
    ) -> Result<(), ReplayError> {
        let r = s.regs()?;
        let anr = r.orig_rax as u32;
        let aargs = mem::args_of(&r);
        let n = sysmodel::spec(nr)
            .map(|s| sysmodel::meaningful_args(s, args))
            .unwrap_or(0);
        if anr != nr || args[..n] != aargs[..n] {
            return self.diverge(
                Kind::Call,
                tid,
                sysmodel::name(nr),
                call_str(nr, args),
                call_str(anr, &aargs),
            );
        }
        Ok(())
    }

    /// The model decides this call here as it did when recording.
    fn check_decision(&mut self, ev: &SyscallEvent) -> Result<(), ReplayError> {
        let interrupted = ev.mode == Mode::Restart
            || (ev.mode == Mode::Emulated && ev.ret == -(libc::EINTR as i64));
        if interrupted {
            return Ok(());
        }
        let th = self.th(ev.tid)?;
        let (tgid, ns_tgid) = (th.tgid, th.ns_tgid);
        let d = decide::decide(
            ev.nr,
            &ev.args,
            &mut Cx {
                e: self,
                tid: ev.tid,
                tgid,
                ns_tgid,
            },
        );
        let here = match &d {
            Decision::Run(p) => Some(p.mode),
            Decision::Refuse { .. } => Some(Mode::Refused),
            Decision::Exit { .. } => None,
        };
        if here != Some(ev.mode) {
            return self.diverge(
                Kind::Decision,
                ev.tid,
                sysmodel::name(ev.nr),
                format!("mode {:?} as recorded", ev.mode),
                format!("this replay decides {d:?}"),
            );
        }
        Ok(())
    }

    pub(crate) fn on_syscall(&mut self, ev: &SyscallEvent) -> Result<(), ReplayError> {
        let tid = ev.tid;
        let name = sysmodel::name(ev.nr);
        let at = match self.take(tid)? {
            St::Reserved { entry, mut s, fd } => {
                if ev.mode == Mode::PlaceholderFd && ev.ret >= 0 {
                    if fd != ev.ret {
                        self.set(tid, St::Reserved { entry, s, fd })?;
                        return self.diverge(
                            Kind::Result,
                            tid,
                            name,
                            format!("accepted fd {}", ev.ret),
                            format!("placeholder socket got fd {fd}"),
                        );
                    }
                    let mut x = s.regs()?;
                    x.rax = ev.ret as u64;
                    s.set_regs(&x)?;
                    for w in &ev.writes {
                        s.write(w.addr, &w.data)?;
                    }
                    self.effects(tid, &s, ev, None)?;
                    return self.after(tid, s);
                }
                At::Entry(self.unreserve(tid, entry, s, fd)?)
            }
            // The clone's result: the same id in the program's PID namespace.
            St::AfterClone(s) => return self.check_ret(tid, s, ev, Kind::Spawn),
            // A vfork parent, released.
            St::InKernel(None, run) => {
                let x = self.finish_exec(tid, run, &name)?;
                return self.check_ret(tid, x, ev, Kind::Result);
            }
            St::InKernel(Some(entry), run) => At::Kernel(entry, run),
            other => {
                self.set(tid, other)?;
                let mut s = self.entry(tid, &call_str(ev.nr, &ev.args))?;
                if let Err(e) = self.check_call(tid, ev.nr, &ev.args, &mut s) {
                    self.set(tid, St::AtEntry(s))?;
                    return Err(e);
                }
                At::Entry(s)
            }
        };
        let live = self.th(tid)?.live;
        let spec = sysmodel::spec(ev.nr);
        if !ev.path.is_empty() {
            if let Some(i) = spec.and_then(|sp| sp.args.iter().position(|a| *a == Arg::Path)) {
                let p =
                    hotstandby_tracer::sys::read_cstr(live, ev.args[i], 4096).unwrap_or_default();
                if p != ev.path {
                    self.park(tid, at)?;
                    return self.diverge(
                        Kind::Path,
                        tid,
                        name,
                        format!("path \"{}\"", String::from_utf8_lossy(&ev.path)),
                        format!("path \"{}\"", String::from_utf8_lossy(&p)),
                    );
                }
            }
        }
        if let Err(e) = self.check_decision(ev) {
            self.park(tid, at)?;
            return Err(e);
        }
        // What the program writes on a connection, kept for its rebuild
        // (read now: sendfile's offset is still the one it passed).
        let tail = self.tail_bytes(tid, live, ev);
        self.note_setup(tid, live, ev)?;
        let class = spec.map(|sp| sp.class);
        if class == Some(Class::FdWrite) && ev.hash != 0 && ev.mode != Mode::Executed {
            let data = mem::moved_bytes_nr(live, ev.nr, &ev.args, ev.ret)?;
            let h = mem::hash(&data);
            if h != ev.hash {
                self.park(tid, at)?;
                return self.diverge(
                    Kind::Written,
                    tid,
                    name,
                    format!(
                        "{} bytes with hash {:016x} written to fd {}",
                        ev.ret, ev.hash, ev.args[0] as i32
                    ),
                    format!(
                        "bytes with hash {h:016x}: \"{}\"",
                        String::from_utf8_lossy(&data[..data.len().min(80)]).escape_debug()
                    ),
                );
            }
            if self.opts.show_output {
                match ev.args[0] {
                    1 => {
                        let _ = std::io::stdout().write_all(&data);
                        let _ = std::io::stdout().flush();
                    }
                    2 => {
                        let _ = std::io::stderr().write_all(&data);
                    }
                    _ => {}
                }
            }
        }
        let s = match ev.mode {
            Mode::Emulated | Mode::Refused => {
                let At::Entry(mut s) = at else {
                    unreachable!("only executed calls are let into the kernel")
                };
                if let Some(mask) = self.mask_wait_signal(tid, live, ev)? {
                    return self.suspend_deliver(tid, s, mask);
                }
                if spec.map(|sp| sp.family) == Some(Family::BufferRegister) && ev.ret == 0 {
                    self.register(tid, &s, &ev.args)?;
                }
                s.skip(ev.ret)?;
                for w in &ev.writes {
                    s.write(w.addr, &w.data)?;
                }
                s
            }
            Mode::Restart => match at {
                At::Entry(mut s) => {
                    s.rewind()?;
                    s
                }
                // Let into the kernel here (a pipe read that blocked): a
                // signal interrupted it when recording; here the same
                // signal does, and it is then delivered as logged next.
                At::Kernel(_, run) => self.interrupt(tid, run)?,
            },
            Mode::Executed | Mode::ExecutedInjected => {
                let wait = spec.map(|sp| sp.family) == Some(Family::Wait);
                let at = match at {
                    At::Entry(mut s) if spec.map(|sp| sp.family) == Some(Family::Exec) => {
                        // The new program loads the buffer library too, as
                        // when recording.
                        if let Some(p) = self.preload.clone() {
                            let envp = if ev.nr as i64 == libc::SYS_execveat {
                                3
                            } else {
                                2
                            };
                            hotstandby_tracer::buffer::inject_preload(&mut s, envp, &p)?;
                        }
                        At::Entry(s)
                    }
                    other => other,
                };
                let mut x = if wait {
                    self.reap(tid, at, ev)?
                } else {
                    self.run_executed(tid, at, ev)?
                };
                let mut r = x.regs()?;
                let mut actual = r.rax as i64;
                if ev.mode == Mode::Executed && actual == -(libc::EAGAIN as i64) && ev.ret != actual
                {
                    // A non-blocking call on the program's own socketpair or
                    // pipe found it empty (or full): the thread that fills it
                    // (or drains it) was let into the kernel at its Enter
                    // but, sharing this CPU, has not run yet. It will.
                    x = self.again(tid, x, ev)?;
                    r = x.regs()?;
                    actual = r.rax as i64;
                }
                if ev.mode == Mode::Executed && actual != ev.ret {
                    self.set(tid, St::Ready(x))?;
                    return self.diverge(
                        Kind::Result,
                        tid,
                        name,
                        format!("{} = {}", call_str(ev.nr, &ev.args), ev.ret),
                        format!("= {actual}"),
                    );
                }
                if ev.hash != 0 && class == Some(Class::FdRead) {
                    let h = mem::hash(&mem::moved_bytes_nr(live, ev.nr, &ev.args, actual)?);
                    if h != ev.hash {
                        self.set(tid, St::Ready(x))?;
                        return self.diverge(
                            Kind::Read,
                            tid,
                            name,
                            format!(
                                "{} bytes read from fd {} with hash {:016x}",
                                ev.ret, ev.args[0] as i32, ev.hash
                            ),
                            format!("different bytes (hash {h:016x}): the file differs from the recording"),
                        );
                    }
                }
                if ev.mode == Mode::ExecutedInjected {
                    r.rax = ev.ret as u64;
                    x.set_regs(&r)?;
                    for w in &ev.writes {
                        x.write(w.addr, &w.data)?;
                    }
                }
                x
            }
            Mode::PlaceholderFd => {
                let At::Entry(s) = at else {
                    unreachable!("accept is held at its entry")
                };
                self.placeholder(tid, s, ev)?
            }
        };
        self.effects(tid, &s, ev, tail)?;
        self.after(tid, s)
    }

    /// A syscall already run to its exit must have returned the recorded
    /// result; then the thread goes on.
    fn check_ret(
        &mut self,
        tid: u32,
        mut s: Stopped,
        ev: &SyscallEvent,
        kind: Kind,
    ) -> Result<(), ReplayError> {
        let got = s.regs()?.rax as i64;
        if got != ev.ret {
            self.set(tid, St::Ready(s))?;
            return self.diverge(
                kind,
                tid,
                sysmodel::name(ev.nr),
                format!("{} = {}", call_str(ev.nr, &ev.args), ev.ret),
                format!("= {got}"),
            );
        }
        self.after(tid, s)
    }

    /// Interrupt a syscall running in the kernel with the signal the log
    /// delivers next to this thread: the syscall returns with the kernel's
    /// restart code, and the thread waits at its exit for that delivery.
    fn interrupt(&mut self, tid: u32, mut run: Running) -> Result<Stopped, ReplayError> {
        let mut j = self.idx + 1;
        let sig = loop {
            match self.ev(j)? {
                Some(Event::Signal { tid: t, signo, .. }) if t == tid => break signo,
                Some(_) => j += 1,
                None => {
                    return self.diverge(
                        Kind::Signal,
                        tid,
                        "interrupted syscall",
                        "the signal that interrupted it",
                        "no signal follows in the log",
                    )
                }
            }
        };
        let live = run.tid();
        self.fills.remove(&live);
        let tgid = self.th(tid)?.tgid;
        hotstandby_tracer::sys::tgkill(tgid, live, sig)?;
        loop {
            match run.wait()? {
                Waited::Stopped(mut s, Stop::Exit) => {
                    if !is_restart(s.regs()?.rax as i64) {
                        // It completed before the signal came: make it
                        // again as the restart would.
                        s.rerun()?;
                    }
                    return Ok(s);
                }
                Waited::Stopped(s, Stop::Signal { sig: got, .. }) if got == sig => {
                    // The signal is taken here; it is delivered (again)
                    // at the logged point.
                    run = s.syscall(0)?;
                }
                Waited::Stopped(s, _) => run = s.syscall(0)?,
                other => {
                    let d = describe(&other);
                    return self.diverge(Kind::Stop, tid, "interrupted syscall", "its exit", d);
                }
            }
        }
    }

    /// Make an executed call that answered EAGAIN again, letting the other
    /// threads in the kernel run between tries (bounded: 2 s).
    fn again(
        &mut self,
        tid: u32,
        mut x: Stopped,
        ev: &SyscallEvent,
    ) -> Result<Stopped, ReplayError> {
        let name = sysmodel::name(ev.nr);
        for _ in 0..20_000 {
            if x.regs()?.rax as i64 != -(libc::EAGAIN as i64) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
            let orig = x.regs()?;
            x.rerun()?;
            let s = match wait_for(x.resume(0)?)? {
                Waited::Stopped(s, Stop::Entry) => s,
                other => {
                    let d = describe(&other);
                    return self.diverge(Kind::Stop, tid, name, "the call made again", d);
                }
            };
            x = self.finish_exec(tid, s.syscall(0)?, &name)?;
            let mut r = x.regs()?;
            // The program's argument registers, as it passed them.
            r.rdi = orig.rdi;
            r.rsi = orig.rsi;
            r.rdx = orig.rdx;
            r.r10 = orig.r10;
            r.r8 = orig.r8;
            r.r9 = orig.r9;
            x.set_regs(&r)?;
        }
        Ok(x)
    }

    /// Put a thread back in a state replay can hand over or kill.
    fn park(&mut self, tid: u32, at: At) -> Result<(), ReplayError> {
        match at {
            At::Entry(s) => self.set(tid, St::AtEntry(s)),
            At::Kernel(e, run) => self.set(tid, St::InKernel(Some(e), run)),
        }
    }

    /// Apply a replayed syscall's effects to the shadow state, as the
    /// recorder did.
    fn effects(
        &mut self,
        tid: u32,
        s: &Stopped,
        ev: &SyscallEvent,
        tail: Option<Vec<u8>>,
    ) -> Result<(), ReplayError> {
        let Some(spec) = sysmodel::spec(ev.nr) else {
            return Ok(());
        };
        let (tgid, ns_tgid) = (self.th(tid)?.tgid, self.th(tid)?.ns_tgid);
        let changes = shadow::effects(spec, &ev.args, ev.ret, &mut TaskPeek { tid: s.tid(), tgid });
        let mut fds: Vec<i32> = Vec::new();
        for c in &changes {
            fds.extend(hotstandby_recorder::fd_touched(c).unwrap_or_default());
        }
        if matches!(spec.family, Family::Fcntl | Family::Ioctl) && ev.ret >= 0 {
            fds.push(ev.args[0] as i32);
        }
        for c in changes {
            tracing::trace!(idx = self.idx, call = sysmodel::name(ev.nr), change = ?c, "shadow");
            let notes = self.shadow.apply(ns_tgid, c);
            self.conn_notes(notes, tail.as_deref());
        }
        if !fds.is_empty() {
            self.fd_sync(tid, fds)?;
        }
        Ok(())
    }

    /// Whether an emulated mask-changing wait returned EINTR for a signal
    /// logged next: the signal must be delivered under the program's mask.
    fn mask_wait_signal(
        &mut self,
        tid: u32,
        live: Tid,
        ev: &SyscallEvent,
    ) -> Result<Option<u64>, ReplayError> {
        let Some(Family::MaskWait(at)) = sysmodel::spec(ev.nr).map(|s| s.family) else {
            return Ok(None);
        };
        if ev.ret != -(libc::EINTR as i64) {
            return Ok(None);
        }
        match self.ev(self.idx + 1)? {
            Some(Event::Signal {
                tid: t,
                at_entry: false,
                ..
            }) if t == tid => {}
            _ => return Ok(None),
        }
        let p = match at {
            MaskAt::Arg(i) => ev.args[i],
            MaskAt::Pselect(i) => {
                if ev.args[i] == 0 {
                    return Ok(None);
                }
                let b = hotstandby_tracer::sys::read_mem(live, ev.args[i], 8)?;
                u64::from_le_bytes(b.try_into().expect("8 bytes"))
            }
        };
        Ok((p != 0).then_some(p))
    }

    /// Execute an accepted connection's placeholder: a socket of the
    /// recorded family at the recorded fd number.
    fn placeholder(
        &mut self,
        tid: u32,
        mut s: Stopped,
        ev: &SyscallEvent,
    ) -> Result<Stopped, ReplayError> {
        let name = sysmodel::name(ev.nr);
        if ev.ret < 0 {
            s.skip(ev.ret)?;
            for w in &ev.writes {
                s.write(w.addr, &w.data)?;
            }
            return Ok(s);
        }
        let orig = s.regs()?;
        let family = if ev.aux == 0 {
            libc::AF_INET as u64
        } else {
            ev.aux
        };
        let (mut x, fd) = s.inject(
            libc::SYS_socket,
            &[
                family,
                libc::SOCK_STREAM as u64 | accept_flags(ev.nr, &ev.args),
                0,
                0,
                0,
                0,
            ],
        )?;
        if fd != ev.ret {
            self.set(tid, St::Ready(x))?;
            return self.diverge(
                Kind::Result,
                tid,
                name,
                format!("accepted fd {}", ev.ret),
                format!("placeholder socket got fd {fd}"),
            );
        }
        let mut r = x.regs()?;
        r.rdi = orig.rdi;
        r.rsi = orig.rsi;
        r.rdx = orig.rdx;
        x.set_regs(&r)?;
        for w in &ev.writes {
            x.write(w.addr, &w.data)?;
        }
        Ok(x)
    }

    /// A wait4/waitid: reap exactly the child the recording reaped (the
    /// same id: the program runs in its own PID namespace), waiting for it
    /// if it has not exited here yet; nothing reaped, nothing run.
    fn reap(&mut self, tid: u32, at: At, ev: &SyscallEvent) -> Result<Stopped, ReplayError> {
        let At::Entry(mut s) = at else {
            unreachable!("a wait is held at its entry")
        };
        let waitid = ev.nr as i64 == libc::SYS_waitid;
        let reaped: u32 = if waitid {
            ev.writes
                .iter()
                .find(|w| w.addr == ev.args[2] && w.data.len() >= 20)
                .map(|w| u32::from_le_bytes(w.data[16..20].try_into().expect("4 bytes")))
                .unwrap_or(0)
        } else if ev.ret > 0 {
            ev.ret as u32
        } else {
            0
        };
        let nowait = ev.args[if waitid { 3 } else { 2 }] & libc::WNOWAIT as u64 != 0;
        if reaped == 0 || ev.ret < 0 || nowait {
            s.skip(ev.ret)?;
            return Ok(s);
        }
        let orig = s.regs()?;
        let mut a = ev.args;
        if waitid {
            a[0] = libc::P_PID as u64;
            a[1] = reaped as u64;
            a[3] &= !(libc::WNOHANG as u64);
        } else {
            a[0] = reaped as u64;
            a[2] &= !(libc::WNOHANG as u64);
        }
        let (mut x, got) = s.inject(ev.nr as i64, &a)?;
        let want = if waitid { 0 } else { reaped as i64 };
        if got != want {
            self.set(tid, St::Ready(x))?;
            return self.diverge(
                Kind::Result,
                tid,
                sysmodel::name(ev.nr),
                format!("child {reaped} reaped"),
                format!("= {got}"),
            );
        }
        let mut r = x.regs()?;
        r.rdi = orig.rdi;
        r.rsi = orig.rsi;
        r.rdx = orig.rdx;
        r.r10 = orig.r10;
        r.r8 = orig.r8;
        x.set_regs(&r)?;
        Ok(x)
    }

    /// Run an executed syscall (or finish one already in the kernel) and
    /// return its thread at the exit. A read from the program's own pipe is
    /// asked for exactly the bytes it got when recording, and completed on
    /// the program's behalf if the data arrives in pieces: a pipe is a
    /// FIFO, so the bytes are the same.
    fn run_executed(
        &mut self,
        tid: u32,
        at: At,
        ev: &SyscallEvent,
    ) -> Result<Stopped, ReplayError> {
        let name = sysmodel::name(ev.nr);
        let run = match at {
            At::Entry(mut s) => {
                if let Some(w) = read_fill(ev) {
                    let entry = s.regs()?;
                    let mut q = entry;
                    q.rdx = w;
                    s.set_regs(&q)?;
                    self.fills.insert(
                        s.tid(),
                        Fill {
                            entry,
                            nr: ev.nr,
                            want: w,
                            total: 0,
                            done: None,
                        },
                    );
                }
                s.syscall(0)?
            }
            At::Kernel(_, run) => run,
        };
        let live = run.tid();
        if self.fills.contains_key(&live) {
            drop(run);
            loop {
                if self.fills.get(&live).is_some_and(|f| f.done.is_some()) {
                    let f = self.fills.remove(&live).expect("checked");
                    return Ok(f.done.expect("checked"));
                }
                if !self.pump(tid, live)? {
                    self.pump_others(live)?;
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            }
        }
        self.finish_exec(tid, run, &name)
    }

    /// Move a filling read of `live` on without blocking; true when it
    /// made progress.
    fn pump(&mut self, tid: u32, live: Tid) -> Result<bool, ReplayError> {
        let w = match Running::from_tid(live).try_wait()? {
            Err(_still) => return Ok(false),
            Ok(w) => w,
        };
        match w {
            Waited::Stopped(s, Stop::Entry | Stop::SyscallEnter) => {
                let _ = s.syscall(0)?;
            }
            Waited::Stopped(s, stop) if stray(&stop) => {
                let _ = s.syscall(0)?;
            }
            Waited::Stopped(mut s, Stop::Exit) => {
                let mut x = s.regs()?;
                let k = x.rax as i64;
                if is_restart(k) {
                    let _ = s.syscall(0)?;
                    return Ok(true);
                }
                let f = self.fills.get_mut(&live).expect("a fill");
                if k > 0 {
                    f.total += k as u64;
                }
                if k > 0 && f.total < f.want {
                    x.rip -= 2;
                    x.rax = x.orig_rax;
                    x.rsi = f.entry.rsi + f.total;
                    x.rdx = f.want - f.total;
                    if f.nr as i64 == libc::SYS_pread64 {
                        x.r10 = f.entry.r10 + f.total;
                    }
                    s.set_regs(&x)?;
                    let _ = s.resume(0)?;
                } else {
                    if f.total > 0 {
                        x.rax = f.total;
                    }
                    x.rsi = f.entry.rsi;
                    x.rdx = f.entry.rdx;
                    x.r10 = f.entry.r10;
                    s.set_regs(&x)?;
                    f.done = Some(s);
                }
            }
            other => {
                let d = describe(&other);
                return self.diverge(Kind::Stop, tid, "read", "the read to complete", d);
            }
        }
        Ok(true)
    }

    /// Move every other filling read on.
    pub(crate) fn pump_others(&mut self, except: Tid) -> Result<(), ReplayError> {
        let pending: Vec<Tid> = self
            .fills
            .iter()
            .filter(|(l, f)| **l != except && f.done.is_none())
            .map(|(l, _)| *l)
            .collect();
        for l in pending {
            let tid = self
                .threads
                .iter()
                .find(|(_, t)| t.live == l)
                .map(|(k, _)| *k)
                .unwrap_or(0);
            while self.pump(tid, l)? {}
        }
        Ok(())
    }

    /// Wait for the exit stop of a syscall already let into the kernel.
    pub(crate) fn finish_exec(
        &mut self,
        tid: u32,
        mut run: Running,
        name: &str,
    ) -> Result<Stopped, ReplayError> {
        let live = run.tid();
        loop {
            let w = if self.fills.values().any(|f| f.done.is_none()) {
                // Keep pipe reads moving while this syscall waits, or it
                // may wait for them.
                match run.try_wait()? {
                    Err(still) => {
                        run = still;
                        self.pump_others(live)?;
                        std::thread::sleep(std::time::Duration::from_micros(20));
                        continue;
                    }
                    Ok(Waited::Stopped(s, stop)) if stray(&stop) => {
                        run = s.syscall(0)?;
                        continue;
                    }
                    Ok(w) => w,
                }
            } else {
                wait_for(run)?
            };
            match w {
                Waited::Stopped(mut s, Stop::Exit) => {
                    if is_restart(s.regs()?.rax as i64) {
                        // Interrupted by a signal replay passes over: the
                        // kernel restarts it.
                        run = s.syscall(0)?;
                        continue;
                    }
                    return Ok(s);
                }
                Waited::Stopped(s, Stop::Entry | Stop::SyscallEnter) => run = s.syscall(0)?,
                Waited::Stopped(s, Stop::Exec) => {
                    hotstandby_tracer::sys::hide_vdso(s.tid())?;
                    let (tgid, ns_tgid) = (self.th(tid)?.tgid, self.th(tid)?.ns_tgid);
                    // A new program: its library registers again.
                    self.th(tid)?.buf = None;
                    self.fdtabs.remove(&ns_tgid);
                    let open = fdclass::open_fds(tgid);
                    let notes = self.shadow.apply(ns_tgid, Change::Exec { open });
                    self.conn_notes(notes, None);
                    run = s.syscall(0)?;
                }
                other => {
                    let d = describe(&other);
                    if let Waited::Stopped(s, _) = other {
                        self.set(tid, St::Ready(s))?;
                    }
                    return self.diverge(Kind::Stop, tid, name, format!("{name} to complete"), d);
                }
            }
        }
    }

    pub(crate) fn on_enter(
        &mut self,
        tid: u32,
        nr: u32,
        args: &[u64; 6],
        mode: Mode,
    ) -> Result<(), ReplayError> {
        if matches!(self.th(tid)?.st, St::InKernel(..)) {
            return Ok(()); // a vfork parent, already waiting in the kernel
        }
        let mut s = self.entry(tid, &call_str(nr, args))?;
        if let Err(e) = self.check_call(tid, nr, args, &mut s) {
            self.set(tid, St::AtEntry(s))?;
            return Err(e);
        }
        // A write to the program's own pipe that blocked while recording
        // wrote part of its bytes before blocking; readers logged before it
        // completes may have read them. Let it into the kernel now, as it
        // was then. Everything else waits at its entry until its result.
        match mode {
            Mode::Executed => {
                let entry = s.regs()?;
                // Only a read needs its result now (to ask for exactly the
                // recorded byte count); it looks ahead for its completion.
                if let Some(want) = self.completion_of(tid)?.as_ref().and_then(read_fill) {
                    let mut q = entry;
                    q.rdx = want;
                    s.set_regs(&q)?;
                    self.fills.insert(
                        s.tid(),
                        Fill {
                            entry,
                            nr,
                            want,
                            total: 0,
                            done: None,
                        },
                    );
                }
                let run = s.syscall(0)?;
                self.set(tid, St::InKernel(Some(Box::new(entry)), run))
            }
            Mode::PlaceholderFd => self.reserve(tid, nr, args, s),
            _ => self.set(tid, St::Blocked(s)),
        }
    }

    /// A thread blocks in accept: take the fd number the kernel reserved
    /// then (the lowest free one) with the placeholder socket right away.
    fn reserve(
        &mut self,
        tid: u32,
        nr: u32,
        args: &[u64; 6],
        mut s: Stopped,
    ) -> Result<(), ReplayError> {
        let tgid = self.th(tid)?.tgid;
        let family = match self.completion_of(tid)? {
            Some(c) if c.aux != 0 => c.aux,
            _ => crate::net::socket_domain(tgid, args[0] as i32).unwrap_or(libc::AF_INET as u64),
        };
        let entry = s.regs()?;
        let (mut x, fd) = s.inject(
            libc::SYS_socket,
            &[
                family,
                libc::SOCK_STREAM as u64 | accept_flags(nr, args),
                0,
                0,
                0,
                0,
            ],
        )?;
        let mut r = x.regs()?;
        r.rdi = entry.rdi;
        r.rsi = entry.rsi;
        r.rdx = entry.rdx;
        x.set_regs(&r)?;
        self.set(
            tid,
            St::Reserved {
                entry: Box::new(entry),
                s: x,
                fd,
            },
        )
    }

    /// Give a reserved fd back (the accept failed, was interrupted, or the
    /// program goes live) and put the thread back at its accept's entry.
    pub(crate) fn unreserve(
        &mut self,
        tid: u32,
        entry: Box<Regs>,
        mut s: Stopped,
        fd: i64,
    ) -> Result<Stopped, ReplayError> {
        // At the exit of the placeholder's socket(): run close(fd) from the
        // same syscall instruction.
        let mut q = s.regs()?;
        q.rip -= 2;
        q.rax = libc::SYS_close as u64;
        q.orig_rax = libc::SYS_close as u64;
        q.rdi = fd as u64;
        s.set_regs(&q)?;
        let run = s.syscall(0)?;
        let s = match wait_for(run)? {
            Waited::Stopped(s, Stop::Exit | Stop::Entry | Stop::SyscallEnter) => s,
            other => {
                let d = describe(&other);
                return self.diverge(Kind::Stop, tid, "accept", "closing its placeholder", d);
            }
        };
        let run = s.syscall(0)?;
        let mut s = self.finish_exec(tid, run, "close")?;
        // Back to the accept's entry: rewind over the syscall instruction and
        // stop again where the filter traps it.
        let mut e = *entry;
        e.rip -= 2;
        e.rax = entry.orig_rax;
        s.set_regs(&e)?;
        let run = s.resume(0)?;
        match wait_for(run)? {
            Waited::Stopped(s, Stop::Entry) => Ok(s),
            other => {
                let d = describe(&other);
                self.diverge(Kind::Stop, tid, "accept", "its entry again", d)
            }
        }
    }
}

/// SOCK_NONBLOCK / SOCK_CLOEXEC an accept4 asked for.
fn accept_flags(nr: u32, args: &[u64; 6]) -> u64 {
    if nr as i64 == libc::SYS_accept4 {
        args[3] & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64
    } else {
        0
    }
}
