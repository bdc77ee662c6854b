//! Recording: run a program under the supervisor and write every
//! nondeterministic input and scheduling decision to a log.
//!
//! One thread runs user code at a time (the *current* thread). Threads switch
//! only at syscall boundaries. A thread that enters a syscall which may block
//! goes into the kernel and, if it does not come back at once while another
//! thread is runnable, is logged as `Enter` and another thread runs. A
//! completed syscall is logged when its thread is next allowed to run user
//! code, so the log order is the order in which user code observed results.
//! Asynchronous signals are held back and delivered at a syscall boundary,
//! which is logged as a `Signal` event.
//!
//! This module holds the scheduler; [`crate::syscall`] what happens at a
//! syscall, [`crate::signal`] signals and rdtsc, [`crate::net`] the
//! program's connections, [`crate::live`] a program taken over from a
//! replay. The mirror image, module by module, is `hotstandby-replayer`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hotstandby_protocol::decide::Plan;
use hotstandby_protocol::observe::NetObserver;
use hotstandby_protocol::record::{Event, Identity};
use hotstandby_protocol::shadow::{Change, Shadow};
use hotstandby_protocol::sysmodel::Spec;
use hotstandby_tracer::mem::EntryInfo;
use hotstandby_tracer::nsid::IdMap;
use hotstandby_tracer::spawn::{self, SpawnError};
use hotstandby_tracer::{fdclass, task, Running, Stop, Stopped, SysError, TaskError, Tid, Waited};
use thiserror::Error;

use crate::logfile::{LogError, LogWriter};

/// Errors of a recording.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The data directory could not be copied into the log.
    #[error("copying the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The log directory lies inside the data directory: the log would be
    /// part of the state it records.
    #[error("the log directory {log} is inside the data directory {data}: put the log elsewhere")]
    LogInDataDir { log: PathBuf, data: PathBuf },
    /// The syscall buffer of a thread could not be read or written.
    #[error("syscall buffer: {0}")]
    Buffer(String),
    /// The kernel reported a thread whose id in the program's PID
    /// namespace cannot be read.
    #[error("thread {0}: its id in the program's PID namespace cannot be read")]
    NoNsId(Tid),
}

/// What to record.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub log_dir: PathBuf,
    pub argv: Vec<String>,
    /// A directory whose starting state is copied into the log, so replay
    /// can start from it.
    pub data_dir: Option<PathBuf>,
    /// Backpressure from a replication driver (`hotstandby run`).
    pub throttle: Option<Arc<crate::logfile::Throttle>>,
    /// The network side: captures accepted connections for a standby's
    /// rebuild and feeds the output rule.
    pub net: Option<Arc<dyn NetObserver>>,
}

/// The result of a recording.
#[derive(Debug, Clone)]
pub struct RecordOutcome {
    /// Shell-style exit status of the program (128+N for signal N).
    pub exit_status: i32,
    pub events: u64,
    pub bytes: u64,
}

/// Events a thread runs before it yields to a waiting runnable thread.
const SLICE: u32 = 64;

/// A syscall on its way through the kernel.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub nr: u32,
    pub args: [u64; 6],
    pub plan: Plan,
    pub spec: &'static Spec,
    pub entry: EntryInfo,
    pub path: Vec<u8>,
}

/// Where a thread stands. A state that holds a [`Stopped`] is one the
/// supervisor must act on; one that holds a [`Running`] waits for the
/// kernel's next report.
#[derive(Debug)]
pub(crate) enum St {
    /// The current thread, running user code.
    Running(Running),
    /// Stopped; resumes user code when scheduled.
    Ready(Stopped),
    /// A new thread whose first stop has not been seen yet.
    Starting,
    /// In the kernel executing a syscall.
    InKernel(Pending, Running),
    /// Its syscall was interrupted (ERESTART code); a signal stop follows.
    Restarting(Pending, i64, Running),
    /// Syscall finished in the kernel, result not yet logged.
    Done(Pending, Stopped),
    /// Syscall interrupted by a signal, held at the signal-delivery-stop.
    Interrupted {
        p: Pending,
        code: i64,
        sig: i32,
        info: Vec<u8>,
        s: Stopped,
    },
    /// Exiting.
    Exiting,
    /// Stopped at a syscall entry not yet handled (after a takeover).
    AtEntry(Stopped),
}

#[derive(Debug)]
pub(crate) struct Th {
    /// Its process, as the supervisor and as the program know it.
    pub tgid: Tid,
    pub ns_tgid: u32,
    pub st: St,
    pub slice: u32,
    /// rip right after the last logged syscall, while no user code ran.
    pub resumed_rip: Option<u64>,
    /// Its syscall buffer, once registered.
    pub buf: Option<hotstandby_tracer::buffer::Buffer>,
}

pub(crate) struct Recorder {
    pub log: LogWriter,
    pub threads: BTreeMap<Tid, Th>,
    pub runq: VecDeque<Tid>,
    pub current: Option<Tid>,
    pub tentative: Option<Tid>,
    pub pending_sigs: VecDeque<(i32, Vec<u8>)>,
    /// The program's kernel state as both sides track it.
    pub shadow: Shadow<()>,
    /// The program's thread ids (what the log holds) and ours.
    pub ids: IdMap,
    pub leader: Tid,
    pub exit_status: Option<i32>,
    /// First stops of threads whose creation was not reported yet.
    pub early_stops: HashMap<Tid, Stopped>,
    pub warned: HashSet<u64>,
    /// The thread that last ran user code (for time slices).
    pub last_run: Option<Tid>,
    pub net: Option<Arc<dyn NetObserver>>,
    /// The CPU the supervisor and the program share, if pinned.
    pub pin: Option<hotstandby_tracer::pin::Pinning>,
    /// The syscall buffer is preloaded (from this library).
    pub buffering: bool,
    pub preload: Option<PathBuf>,
    /// Each process's fd table of the buffer library.
    pub fdtabs: crate::buffer::FdTabs,
}

/// Record a program into `opts.log_dir`. Blocks until it exits.
pub fn record(opts: &RecordOptions) -> Result<RecordOutcome, RecordError> {
    let cwd = std::env::current_dir().map_err(|source| RecordError::DataDir {
        path: ".".into(),
        source,
    })?;
    let data_dir = opts
        .data_dir
        .as_ref()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()));
    if let Some(d) = &data_dir {
        check_log_outside(&opts.log_dir, d)?;
    }
    let mut id: Identity =
        spawn::identity(&opts.argv, spawn::recorded_env(), &cwd, data_dir.as_deref())?;
    let preload = if hotstandby_tracer::buffer::enabled() {
        let p = hotstandby_tracer::buffer::install()?;
        id.preload = hotstandby_tracer::buffer::preload_entry(&p, &id.env);
        Some(p)
    } else {
        None
    };
    let mut log = LogWriter::create(&opts.log_dir, &id)?;
    if let Some(t) = &opts.throttle {
        log.set_throttle(t.clone());
    }
    if let Some(d) = &data_dir {
        copy_tree(d, &opts.log_dir.join(crate::logfile::DATA_START)).map_err(|source| {
            RecordError::DataDir {
                path: d.clone(),
                source,
            }
        })?;
    }
    let pin = hotstandby_tracer::pin::pin_here();
    let started = spawn::spawn(&id, None)?;
    let pid = started.task.tid();
    forward_signals(pid);
    let ns = started.ns_pid;
    let mut r = Recorder::new(log, pid, Shadow::new(ns, fdclass::open_fds(pid)));
    r.net = opts.net.clone();
    r.pin = pin;
    r.buffering = preload.is_some();
    r.preload = preload;
    r.ids.insert(ns, pid);
    r.last_run = Some(pid);
    r.threads.insert(
        pid,
        Th {
            tgid: pid,
            ns_tgid: ns,
            st: St::Running(started.task.resume(0)?),
            slice: 0,
            resumed_rip: None,
            buf: None,
        },
    );
    r.current = Some(pid);
    let status = r.run()?;
    r.finish(status)
}

/// Refuse a log directory inside the data directory (the log would record
/// itself, and replay's copy of the data directory would hold the log).
fn check_log_outside(log: &Path, data: &Path) -> Result<(), RecordError> {
    let abs = |p: &Path| -> PathBuf {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        // The log directory may not exist yet: canonicalize what does.
        let mut existing = p.clone();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.file_name(), existing.parent()) {
                (Some(n), Some(parent)) => {
                    rest.push(n.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut c = std::fs::canonicalize(&existing).unwrap_or(existing);
        for n in rest.into_iter().rev() {
            c.push(n);
        }
        c
    };
    let (log, data) = (abs(log), abs(data));
    if log.starts_with(&data) {
        return Err(RecordError::LogInDataDir { log, data });
    }
    Ok(())
}

static TRACEE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = TRACEE.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes plain integers.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH sent to
/// the supervisor go to the program (which then records them like any
/// other signal) instead of ending the supervisor and losing the end of the
/// log. This is how an operator signals the program: in its own PID
/// namespace, the pids it writes into pid files are not the host's.
pub(crate) fn forward_signals(pid: Tid) {
    TRACEE.store(pid, std::sync::atomic::Ordering::Relaxed);
    for sig in hotstandby_tracer::sys::FORWARDED {
        // SAFETY: installs an async-signal-safe handler (it only calls
        // kill); the sigaction struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Copy a directory tree (regular files, directories, symlinks), keeping
/// modes and, as root, owners: a program that drops privileges (nginx's
/// workers run as `nobody`) must find its files as readable as they were.
pub fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let ft = e.file_type()?;
        let to = dst.join(e.file_name());
        if ft.is_dir() {
            copy_tree(&e.path(), &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &to)?;
        } else if ft.is_file() {
            std::fs::copy(e.path(), &to)?;
        } else {
            continue;
        }
        let m = std::fs::symlink_metadata(e.path())?;
        let _ = std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()));
    }
    let m = std::fs::metadata(src)?;
    let _ = std::os::unix::fs::chown(dst, Some(m.uid()), Some(m.gid()));
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
}

impl Recorder {
    pub(crate) fn new(log: LogWriter, leader: Tid, shadow: Shadow<()>) -> Self {
        Recorder {
            log,
            threads: BTreeMap::new(),
            runq: VecDeque::new(),
            current: None,
            tentative: None,
            pending_sigs: VecDeque::new(),
            shadow,
            ids: IdMap::default(),
            leader,
            exit_status: None,
            early_stops: HashMap::new(),
            warned: HashSet::new(),
            last_run: None,
            net: None,
            pin: None,
            buffering: false,
            preload: None,
            fdtabs: Default::default(),
        }
    }

    pub(crate) fn finish(mut self, status: i32) -> Result<RecordOutcome, RecordError> {
        let bytes = self.log.bytes();
        self.log.flush()?;
        let events = self.log.finish(status)?;
        Ok(RecordOutcome {
            exit_status: status,
            events,
            bytes,
        })
    }

    pub(crate) fn run(&mut self) -> Result<i32, RecordError> {
        loop {
            if self.threads.is_empty() {
                break;
            }
            if self.current.is_none() {
                if let Some(t) = self.tentative {
                    if !self.runq.is_empty() {
                        self.enter_logged(t)?;
                    }
                }
                if let Some(t) = self.runq.pop_front() {
                    self.schedule(t)?;
                    continue;
                }
            }
            self.log.flush()?;
            match task::wait()? {
                Some(w) => self.handle(w)?,
                None => break,
            }
        }
        Ok(self.exit_status.unwrap_or(0))
    }

    /// The thread let into a blocking syscall did not come back while
    /// others are runnable: log that it is in the kernel.
    fn enter_logged(&mut self, t: Tid) -> Result<(), RecordError> {
        self.tentative = None;
        let (nr, args, mode) = match self.threads.get(&t).map(|th| &th.st) {
            Some(St::InKernel(p, _)) | Some(St::Restarting(p, _, _)) => (p.nr, p.args, p.plan.mode),
            _ => return Ok(()),
        };
        self.log.event(Event::Enter {
            tid: self.ns(t),
            nr,
            args,
            mode,
        })?;
        Ok(())
    }

    pub(crate) fn th(&mut self, t: Tid) -> &mut Th {
        self.threads.get_mut(&t).expect("known thread")
    }

    /// The id the program knows thread `t` by.
    pub(crate) fn ns(&self, t: Tid) -> u32 {
        self.ids.ns(t).unwrap_or(t as u32)
    }

    fn remove_thread(&mut self, t: Tid) {
        self.threads.remove(&t);
        self.ids.remove_tid(t);
        hotstandby_tracer::sys::forget(t);
        self.runq.retain(|x| *x != t);
        if self.current == Some(t) {
            self.current = None;
        }
        if self.tentative == Some(t) {
            self.tentative = None;
        }
    }

    pub(crate) fn handle(&mut self, w: Waited) -> Result<(), RecordError> {
        let t = w.tid();
        if !self.threads.contains_key(&t) {
            // The first stop of a thread whose creation was not reported
            // yet (or the init's exit).
            if let Waited::Stopped(s, _) = w {
                self.early_stops.insert(t, s);
            }
            return Ok(());
        }
        match w {
            Waited::Exited(_, code) => {
                if t == self.leader {
                    self.exit_status = Some(code);
                }
                self.remove_thread(t);
            }
            Waited::Killed(_, sig) => {
                if t == self.leader {
                    self.exit_status = Some(128 + sig);
                }
                self.remove_thread(t);
            }
            Waited::Stopped(s, stop) => self.on_stop(s, stop)?,
        }
        Ok(())
    }

    fn on_stop(&mut self, s: Stopped, stop: Stop) -> Result<(), RecordError> {
        let t = s.tid();
        match stop {
            Stop::Entry => {
                let st = std::mem::replace(&mut self.th(t).st, St::Exiting);
                match st {
                    St::Restarting(p, _, run) | St::InKernel(p, run) => {
                        // The kernel restarts an interrupted syscall.
                        run.stopped_as(&s);
                        self.th(t).st = St::InKernel(p, s.syscall(0)?);
                    }
                    St::Running(run) => {
                        run.stopped_as(&s);
                        self.on_entry(s)?
                    }
                    other => {
                        tracing::warn!(t, "syscall entry from a thread that is not running");
                        self.th(t).st = other;
                        let _ = s.resume(0)?;
                    }
                }
            }
            Stop::Exit => self.on_exit_stop(s)?,
            Stop::Signal { sig, info } => self.on_signal(s, sig, info.to_vec())?,
            Stop::Spawned { child, .. } => {
                let flags = match &self.th(t).st {
                    St::InKernel(p, _) => hotstandby_protocol::decide::clone_flags(p.nr, &p.args),
                    _ => 0,
                };
                self.spawned(t, child, flags)?;
                self.continue_in_kernel(s)?;
            }
            Stop::Exec => {
                hotstandby_tracer::sys::hide_vdso(t)?;
                let tgid = self.th(t).tgid;
                let ns_tgid = self.th(t).ns_tgid;
                // A new program: its library registers again.
                self.th(t).buf = None;
                self.fdtabs.remove(&ns_tgid);
                let open = fdclass::open_fds(tgid);
                self.apply(ns_tgid, Change::Exec { open });
                self.continue_in_kernel(s)?;
            }
            Stop::Exiting => {
                self.th(t).st = St::Exiting;
                self.runq.retain(|x| *x != t);
                if self.current == Some(t) {
                    self.current = None;
                }
                if self.tentative == Some(t) {
                    self.tentative = None;
                }
                let _ = s.resume(0)?;
            }
            Stop::SyscallEnter | Stop::VforkDone | Stop::Group { .. } => {
                self.continue_in_kernel(s)?
            }
        }
        Ok(())
    }

    /// A thread stopped at a ptrace event inside a syscall goes on with it
    /// (to its exit stop).
    fn continue_in_kernel(&mut self, s: Stopped) -> Result<(), RecordError> {
        let t = s.tid();
        let st = std::mem::replace(&mut self.th(t).st, St::Exiting);
        self.th(t).st = match st {
            St::InKernel(p, run) => {
                run.stopped_as(&s);
                St::InKernel(p, s.syscall(0)?)
            }
            St::Restarting(p, c, run) => {
                run.stopped_as(&s);
                St::Restarting(p, c, s.syscall(0)?)
            }
            St::Running(run) => {
                run.stopped_as(&s);
                St::Running(s.resume(0)?)
            }
            St::Exiting => {
                let _ = s.resume(0)?;
                St::Exiting
            }
            other => {
                let _ = s.syscall(0)?;
                other
            }
        };
        Ok(())
    }

    fn on_exit_stop(&mut self, mut s: Stopped) -> Result<(), RecordError> {
        let t = s.tid();
        let st = std::mem::replace(&mut self.th(t).st, St::Exiting);
        let p = match st {
            St::InKernel(p, run) => {
                run.stopped_as(&s);
                p
            }
            other => {
                self.th(t).st = other;
                let r = s.resume(0)?;
                if matches!(self.th(t).st, St::Running(_)) {
                    self.th(t).st = St::Running(r);
                }
                return Ok(());
            }
        };
        let ret = s.regs()?.rax as i64;
        if hotstandby_tracer::is_restart(ret) {
            self.th(t).st = St::Restarting(p, ret, s.syscall(0)?);
            return Ok(());
        }
        self.th(t).st = St::Done(p, s);
        self.became_runnable(t)
    }

    pub(crate) fn became_runnable(&mut self, t: Tid) -> Result<(), RecordError> {
        if self.tentative == Some(t) && self.current.is_none() {
            self.tentative = None;
            self.schedule(t)
        } else {
            self.runq.push_back(t);
            // The running thread comes to a boundary soon, even if it makes
            // only buffered calls.
            if let Some(c) = self.current {
                self.nudge(c);
            }
            Ok(())
        }
    }

    /// Apply a change to the shadow state; what it ends goes to the
    /// network side.
    pub(crate) fn apply(&mut self, ns_tgid: u32, change: Change) {
        let notes = self.shadow.apply(ns_tgid, change);
        self.net_notes(notes);
    }

    /// A new thread or process appeared (ptrace clone/fork/vfork event).
    fn spawned(&mut self, parent: Tid, child: Tid, flags: u64) -> Result<(), RecordError> {
        let child_ns = hotstandby_tracer::nsid::ns_tid(child).ok_or(RecordError::NoNsId(child))?;
        self.ids.insert(child_ns, child);
        let (ptgid, pns) = (self.th(parent).tgid, self.th(parent).ns_tgid);
        let (tgid, ns_tgid) = if flags & libc::CLONE_THREAD as u64 != 0 {
            (ptgid, pns)
        } else {
            self.apply(pns, Change::Fork { child: child_ns });
            if let Some(tab) = self.fdtabs.get(&pns).copied() {
                self.fdtabs.insert(child_ns, tab);
            }
            (child, child_ns)
        };
        // A new process (or a vfork child on its parent's memory) goes on
        // with the parent thread's buffer, at the same address; a new
        // thread registers its own.
        let buf = if flags & libc::CLONE_THREAD as u64 != 0 {
            None
        } else {
            self.th(parent).buf
        };
        let early = self.early_stops.remove(&child);
        let started = early.is_some();
        self.threads.insert(
            child,
            Th {
                tgid,
                ns_tgid,
                st: match early {
                    Some(s) => St::Ready(s),
                    None => St::Starting,
                },
                slice: 0,
                resumed_rip: None,
                buf,
            },
        );
        if started {
            self.runq.push_back(child);
        }
        self.log.event(Event::Spawn {
            tid: self.ns(parent),
            child: child_ns,
            flags,
        })?;
        Ok(())
    }

    /// Let `t` run user code, logging what it observes first.
    pub(crate) fn schedule(&mut self, t: Tid) -> Result<(), RecordError> {
        let st = std::mem::replace(&mut self.th(t).st, St::Exiting);
        self.current = Some(t);
        if self.last_run != Some(t) {
            self.th(t).slice = 0;
            self.last_run = Some(t);
        }
        match st {
            St::AtEntry(s) => self.on_entry(s)?,
            St::Ready(s) => {
                self.log.event(Event::Switch { tid: self.ns(t) })?;
                self.th(t).resumed_rip = None;
                self.th(t).st = St::Running(s.resume(0)?);
            }
            St::Done(p, s) => self.complete(p, s)?,
            St::Interrupted {
                p,
                code,
                sig,
                info,
                s,
            } => self.log_interrupted(p, code, sig, info, s)?,
            other => {
                // Not schedulable after all (it died meanwhile).
                self.th(t).st = other;
                self.current = None;
            }
        }
        Ok(())
    }

    /// Go on with user code after a logged syscall, or yield to another
    /// runnable thread at the end of a time slice.
    ///
    /// A thread whose syscall may have waited (`blocking`) yields to one
    /// that became runnable meanwhile: otherwise a thread that sleeps in
    /// short steps (memcached's maintainer) keeps the others waiting for a
    /// whole time slice of sleeps (35 ms per memcached request, measured).
    pub(crate) fn resume_after_syscall(
        &mut self,
        s: Stopped,
        rip: u64,
        nr: u32,
        blocking: bool,
    ) -> Result<(), RecordError> {
        let t = s.tid();
        let th = self.th(t);
        th.slice += 1;
        let yield_now = nr as i64 == libc::SYS_sched_yield || th.slice >= SLICE || blocking;
        if yield_now && !self.runq.is_empty() {
            self.th(t).st = St::Ready(s);
            self.runq.push_back(t);
            self.current = None;
            return Ok(());
        }
        self.th(t).resumed_rip = Some(rip);
        self.th(t).st = St::Running(s.resume(0)?);
        self.current = Some(t);
        Ok(())
    }
}
